"""The params files the flow writes: a profile merged with its bases into the complete ``params.yaml`` DVC reads
(comments kept, ruamel round-trip YAML), and ``--set KEY=VALUE`` overrides."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from lowgrad.config import compose, parse_yaml
from lowgrad.errors import ConfigError


def parse_overrides(pairs: list[str]) -> dict[str, Any]:
    """``--set KEY=VALUE`` pairs as a mapping, each value read as YAML (one :class:`ConfigError` line otherwise)."""
    out = {}
    for pair in pairs:
        if "=" not in pair:
            raise ConfigError(f"--set expects key=value, got '{pair}'")
        key, value = pair.split("=", 1)
        out[key] = parse_yaml(value, f"--set {key}")
    return out


def round_trip_yaml():
    """ruamel's round-trip YAML (comments kept) as the flow writes params files."""
    from ruamel.yaml import YAML

    rt = YAML()
    rt.width = 4096  # a merged flow mapping stays on one line
    rt.indent(mapping=2, sequence=4, offset=2)  # list items indented under their key, as in the committed files
    rt.representer.add_representer(type(None), lambda rep, _: rep.represent_scalar("tag:yaml.org,2002:null", "null"))
    return rt


def composed_text(source: Path) -> str:
    """A params file, or a profile merged with its bases, as the complete YAML text the flow would write."""
    import io

    rt = round_trip_yaml()
    out = io.StringIO()
    rt.dump(composed_document(source, rt), out)
    return out.getvalue()


def composed_document(source: Path, rt) -> Any:
    """``source`` as one ruamel document: a profile's ``extends`` chain merged by the rule of
    :func:`lowgrad.config.merge_profile` (comments kept), headed by the profile's own first comment and a line
    that says where it came from (params.yaml must be complete: DVC keys the stages by its values)."""
    doc, chain = compose(source, lambda path: rt.load(path.read_text()))
    if len(chain) > 1:
        names = " -> ".join(path.name for path, _ in chain)
        own = chain[-1][1].ca.comment
        header = "".join(token.value for token in (own[1] or [])) if own else ""
        lines = [line[2:] if line.startswith("# ") else line[1:] for line in header.rstrip("\n").splitlines()]
        lines.append(f"Written by flows.pipeline from {source.name}, merged as {names}: edit the profile, not this file.")
        doc.ca.comment = None
        doc.yaml_set_start_comment("\n".join(lines))
    return doc
