"""Run DVC stages' commands in one process, in order, the way ``dvc repro`` runs each
(``python -m stages.<name> [set]``), recording which params each reads; print them as JSON on the last line.

    python tests/stage_probe.py prepare@id_train train ... report   # in a project directory (lowgrad from src/)

Reads are recorded from the moment a stage's params are loaded (validation itself reads every key, so it is left
out): every access to a field of the params models, as a dotted path (``subspace.method``,
``data.datasets.id_train.source``). Each stage also lists the project modules first imported while it ran (a
lower bound of what it imports: the test checks the static import graph covers it). ``tests/test_dvc_yaml.py``
compares both with ``dvc.yaml``.
"""

from __future__ import annotations

import json
import runpy
import sys
from pathlib import Path

from pydantic import BaseModel


def _paths(obj, prefix: str, out: dict[int, str]) -> None:
    """``id(model) -> dotted path`` for every params model in the tree (dict values included)."""
    if isinstance(obj, BaseModel):
        out[id(obj)] = prefix
        for name in type(obj).model_fields:
            _paths(getattr(obj, name), f"{prefix}.{name}" if prefix else name, out)
    elif isinstance(obj, dict):
        for key, value in obj.items():
            _paths(value, f"{prefix}.{key}", out)


def _project_modules(root: Path) -> set[str]:
    """Project files (outside ``tests/``) among the loaded modules, relative to ``root``."""
    files = set()
    for mod in list(sys.modules.values()):
        file = getattr(mod, "__file__", None)
        path = Path(file).resolve() if file else None
        if path and path.is_file() and path.is_relative_to(root) and path.relative_to(root).parts[0] != "tests":
            files.add(str(path.relative_to(root)))
    return files


def main() -> None:
    root = Path.cwd().resolve()
    sys.path.insert(0, str(root))
    import lowgrad.config as config
    import stages._run as entry

    reads: set[str] = set()
    where: dict[int, str] = {}
    original_load = entry.load_params

    def load_and_record(*args, **kwargs):
        params = original_load(*args, **kwargs)
        found: dict[int, str] = {}
        _paths(params, "", found)  # walked before recording starts: the walk itself reads every field
        where.update(found)
        return params

    def spy(self, name):
        value = object.__getattribute__(self, name)
        if where and name in type(self).model_fields and id(self) in where:
            path = where[id(self)]
            reads.add(f"{path}.{name}" if path else name)
        return value

    original_schema = config.scored_params_schema

    def scored_schema_spied():  # the scoring section's models: spied once a stage loads them (score does first)
        schema = original_schema()
        import lowgrad.options as options

        options._Strict.__getattribute__ = spy
        return schema

    entry.load_params = load_and_record
    config._Strict.__getattribute__ = spy
    config.scored_params_schema = scored_schema_spied
    out = []
    for stage in sys.argv[1:]:
        module, _, dataset = stage.partition("@")
        reads.clear()
        where.clear()
        before = _project_modules(root)
        sys.argv = [f"stages/{module}.py", *([dataset] if dataset else [])]
        try:
            runpy.run_module(f"stages.{module}", run_name="__main__", alter_sys=True)
        except SystemExit as stop:
            if stop.code:
                raise SystemExit(f"stage {stage} exited with {stop.code}") from None
        out.append({"stage": stage, "params": sorted(reads), "first_imported": sorted(_project_modules(root) - before)})
    print(json.dumps(out))


if __name__ == "__main__":
    main()
