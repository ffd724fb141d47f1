"""The stage plan: which DVC stages a configuration has, in an order to run them in, read from ``dvc.yaml``.
Used by the flow, ``bench.routes`` and the tests; no stage imports it, so editing it reruns nothing."""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from lowgrad.config import Params, get_dotted, parse_yaml
from lowgrad.errors import ConfigError
from lowgrad.paths import DVC_YAML


def stage_plan(params: Params, root: str | Path = ".") -> list[str]:
    """This configuration's DVC stage names (``prepare@id_train``, ..., ``report``) in the order ``root/dvc.yaml``
    lists them, each ``foreach: ${key}`` expanded over that params key. dvc.yaml lists its stages in dependency
    order (``tests/test_layout.py`` checks that against DVC's own graph), so this is an order to run them in."""
    dvc_yaml = parse_yaml((Path(root) / DVC_YAML).read_text(), DVC_YAML)
    return expand_stages(dvc_yaml["stages"], params.model_dump())


def expand_stages(stages: Mapping[str, Any], values: Mapping[str, Any]) -> list[str]:
    """Stage names of a dvc.yaml ``stages`` mapping, ``foreach`` expanded over ``values`` (validated params)."""
    names = []
    for name, body in stages.items():
        over = body.get("foreach") if isinstance(body, Mapping) else None
        if over is None:
            names.append(name)
            continue
        key = str(over).removeprefix("${").removesuffix("}")
        found, items = get_dotted(values, key)
        if "matrix" in body or not str(over).startswith("${") or not found or not isinstance(items, Mapping):
            raise ConfigError(f"dvc.yaml: stage '{name}': only `foreach: ${{<params key>}}` over a mapping is supported "
                              f"here (got {over!r}); DVC names such stages <name>@<key>")
        names += [f"{name}@{item}" for item in items]
    return names
