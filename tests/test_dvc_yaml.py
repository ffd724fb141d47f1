"""dvc.yaml cannot drift from the code: every stage of the tiny config is run as DVC runs it, with its params
reads and project imports recorded (``tests/stage_probe.py``); each must be declared by its dvc.yaml entry.
Plus the DVC behaviours that drift used to break: switching routes, and editing one stage's code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lowgrad.store import ChunkedStore
from tests.test_pipeline import TINY, _env, dvc, make_project, ran_stages, set_param

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
UNTRACKED = ("cluster",)  # where extraction runs: results do not depend on it, so DVC does not track it


def declared(dvc_yaml: dict, stage: str) -> tuple[set[str], set[str]]:
    """``(params, deps)`` of one stage name (``extract@id_train``), with ``${key}`` resolved."""
    name, _, key = stage.partition("@")
    body = dvc_yaml["stages"][name]
    body = body.get("do", body)
    fill = lambda s: s.replace("${key}", key)  # noqa: E731
    params = {fill(p) for p in body.get("params", []) if isinstance(p, str)}
    deps = {fill(d) for d in body.get("deps", [])}
    return params, deps


def undeclared(probe: dict, params: set[str], deps: set[str]) -> list[str]:
    """What the stage read or imported that dvc.yaml does not declare."""
    problems = []
    for read in probe["params"]:
        if read.split(".")[0] in UNTRACKED:
            continue
        covered = any(read == p or read.startswith(p + ".") or p.startswith(read + ".") for p in params)
        if not covered:
            problems.append(f"{probe['stage']} reads param '{read}'")
    for module in probe["modules"]:
        if not any(module == d or module.startswith(d.rstrip("/") + "/") for d in deps):
            problems.append(f"{probe['stage']} imports '{module}'")
    return problems


ROUTES = {  # the tiny config on each route whose stages import different code
    "exact": {},
    "kronecker": {"gradient": {"sketch": "kronecker", "sketch_rank": 4, "factor_samples": 64}},
    "matrix_free": {"subspace": {"method": "exact_randomized", "k": 8, "oversample": 6, "power_iters": 1}},
}


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> list[dict]:
    """Every stage of the tiny project on every route, in dependency order, probed."""
    out = []
    for route, change in ROUTES.items():
        raw = json.loads(json.dumps(TINY))
        for section, values in change.items():
            raw[section] = {**raw[section], **values}
        out += _probe_all(make_project(tmp_path_factory.mktemp(f"probe-{route}"), raw), raw)
    return out


def _probe_all(root: Path, raw: dict) -> list[dict]:
    from lowgrad.config import parse_params
    from lowgrad.stages import stage_names

    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    out = []
    for stage in stage_names(parse_params(raw)):
        proc = subprocess.run([sys.executable, str(ROOT / "tests/stage_probe.py"), stage], cwd=root, env=env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
        out.append(json.loads(proc.stdout.strip().splitlines()[-1]))
    return out


def test_every_param_read_and_module_imported_is_declared(probes):
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    problems = [p for probe in probes for p in undeclared(probe, *declared(dvc_yaml, probe["stage"]))]
    assert not problems, "dvc.yaml does not declare:\n" + "\n".join(problems)
    # negative control: the same check on dvc.yaml with one param taken away fails, naming it
    broken = json.loads(json.dumps(dvc_yaml))
    broken["stages"]["extract"]["do"]["params"].remove("subspace.method")
    probe = next(p for p in probes if p["stage"] == "extract@id_train")  # the exact route's
    assert "extract@id_train reads param 'subspace.method'" in undeclared(probe, *declared(broken, "extract@id_train"))
    broken["stages"]["report"]["deps"].remove("src/lowgrad/report.py")
    probe = next(p for p in probes if p["stage"] == "report")
    assert "report imports 'src/lowgrad/report.py'" in undeclared(probe, *declared(broken, "report"))


def test_stages_read_only_their_own_code(probes):
    """No stage imports another stage's body, and the report stage does not import the scoring code."""
    for probe in probes:
        name = probe["stage"].partition("@")[0]
        others = [m for m in probe["modules"] if m.startswith("src/lowgrad/stages/") and
                  Path(m).stem not in (name, "__init__", "common", "prepare")]
        assert not others, (probe["stage"], others)
    report = next(p for p in probes if p["stage"] == "report")
    assert "src/lowgrad/scoring.py" not in report["modules"] and "src/lowgrad/detectors.py" not in report["modules"]


def test_route_switches_finish_under_dvc(tmp_path):
    """randomized -> exact_randomized -> randomized, and none -> kronecker -> none: every dvc repro finishes."""
    root = make_project(tmp_path, TINY)
    set_param(root, "scoring", {"forward": {"knn": {"k": 5}}, "gradient": {"knn": {"k": 5}, "residual": {}},
                                "bootstrap": {"replicates": 100}})
    dvc(root, "repro")
    for sketch, method in (("none", "exact_randomized"), ("none", "randomized"), ("kronecker", "randomized"),
                           ("none", "randomized")):
        set_param(root, "gradient.sketch", sketch)
        set_param(root, "subspace.method", method)
        dvc(root, "repro")  # finishes (stages whose deps match an earlier run are restored from DVC's run cache)
        store = ChunkedStore.open(root / "artifacts/extract/id_train.zarr")
        expected = "not stored (matrix-free route)" if method == "exact_randomized" else \
            {"none": "exact", "kronecker": "kronecker_sketch"}[sketch]
        assert store.meta["gradients"] == expected and ("grads" in store.columns) == (method != "exact_randomized")
        metrics = json.loads((root / "report/metrics.json").read_text())
        assert "grad_knn" in metrics["methods"], (sketch, method)
    assert ran_stages(dvc(root, "repro")) == set()


def test_editing_the_report_code_reruns_only_the_report(tmp_path):
    root = make_project(tmp_path, TINY)
    dvc(root, "repro")
    with open(root / "src/lowgrad/report.py", "a") as fh:
        fh.write("\n# an edit to the report code\n")
    assert ran_stages(dvc(root, "repro")) == {"report"}
