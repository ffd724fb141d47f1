"""dvc.yaml cannot drift from the code: every stage of the tiny config is run in one process per route with its
params reads recorded (``tests/stage_probe.py``), and its project imports are read from the static import graph
of ``stages/<name>.py``; each must be declared by its dvc.yaml entry. Plus the DVC behaviours that drift used to
break: switching routes, and editing one stage's code."""

from __future__ import annotations

import ast
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lowgrad.store import ChunkedStore
from tests.test_pipeline import TINY, _env, dvc, make_project, ran_stages, set_param, status_stages

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.slow
UNTRACKED = ("cluster",)  # where extraction runs: results do not depend on it, so DVC does not track it
SEARCH = ("src", ".")  # where the project's modules are found, as on the stages' sys.path
NOT_FOLLOWED = {  # import edges the static graph leaves out, each taken only where DVC must not key on it
    ("src/lowgrad/config.py", "src/lowgrad/options.py"):
        "the scoring section's schema, loaded by parse_params(scoring=True) only: score and report (the probe shows "
        "no stage before score loads it)",
    ("src/lowgrad/stages/common.py", "src/lowgrad/scaleout.py"): "where the work runs (params 'cluster', untracked; "
        "Dask results equal single-process ones: tests/test_scaleout.py)",
    ("src/lowgrad/stages/extract.py", "src/lowgrad/scaleout.py"): "as above",
    ("src/lowgrad/__init__.py", "src/lowgrad/api.py"): "lowgrad.OODDetector (scoring new images with a finished "
        "run's saved detector), imported on first use of that attribute, which no stage makes (the probe records "
        "what each stage imports)",
    ("src/lowgrad/__init__.py", "src/lowgrad/estimator.py"): "lowgrad.LowGrad (fitting in Python), likewise imported on "
        "first use of that attribute, which no stage makes",
}
ROUTE_STEPS = ("factors", "extract")  # the stages that take a route's own steps (its factors and its sketch)
FOLLOWED_ONLY_FOR = {  # import edges followed for some stages only: the probe shows no other stage takes them
    ("src/lowgrad/route.py", "src/lowgrad/kronecker.py"): ROUTE_STEPS,  # the Kronecker sketch
    ("src/lowgrad/route.py", "src/lowgrad/exact_nfk.py"): ROUTE_STEPS,  # the exact-NFK sketch
    ("src/lowgrad/route.py", "src/lowgrad/nfk_factors.py"): ROUTE_STEPS,  # their NFK factors
    ("src/lowgrad/route.py", "src/lowgrad/dense_sketch.py"): ROUTE_STEPS,  # the dense route's
    ("src/lowgrad/route.py", "src/lowgrad/gradients.py"): ROUTE_STEPS,  # the exact route's size check (the flow's)
    ("src/lowgrad/route.py", "src/lowgrad/memory.py"): (*ROUTE_STEPS, "subspace", "project"),  # the batch a device
    # holds, where exact gradients are formed (the matrix-free route recomputes them in subspace and project)
}


def skipped_for(stage: str) -> dict:
    """The import edges the static graph of ``stage`` (``extract``) leaves out."""
    return {**NOT_FOLLOWED, **{edge: stages for edge, stages in FOLLOWED_ONLY_FOR.items() if stage not in stages}}


def declared(dvc_yaml: dict, stage: str) -> tuple[set[str], set[str]]:
    """``(params, deps)`` of one stage name (``extract@id_train``), with ``${key}`` resolved."""
    name, _, key = stage.partition("@")
    body = dvc_yaml["stages"][name]
    body = body.get("do", body)
    fill = lambda s: s.replace("${key}", key)  # noqa: E731
    params = {fill(p) for p in body.get("params", []) if isinstance(p, str)}
    deps = {fill(d) for d in body.get("deps", [])}
    return params, deps


def _module_file(root: Path, dotted: str) -> str | None:
    """The project file of a module name (``lowgrad.data`` -> ``src/lowgrad/data.py``), None if not ours."""
    for base in SEARCH:
        stem = root / base / Path(*dotted.split("."))
        for path in (stem.with_suffix(".py"), stem / "__init__.py"):
            if path.is_file() and path.resolve().relative_to(root.resolve()).parts[0] != "tests":
                return str(path.resolve().relative_to(root.resolve()))
    return None


def _imported_names(tree: ast.AST) -> set[str]:
    """Every module name an ``import`` anywhere in the tree (function bodies too) can load, parents included."""
    names = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            found = [node.module] + [f"{node.module}.{a.name}" for a in node.names]  # `from pkg import module`
        else:
            continue
        for name in found:
            parts = name.split(".")
            names |= {".".join(parts[: i + 1]) for i in range(len(parts))}
    return names


def static_imports(root: Path, entry: str, skip: dict = NOT_FOLLOWED) -> set[str]:
    """The project files ``entry`` (``stages/extract.py``) imports, directly or through other project files,
    leaving out the edges in ``skip``."""
    seen, todo = set(), [entry]
    while todo:
        file = todo.pop()
        if file in seen:
            continue
        seen.add(file)
        tree = ast.parse((root / file).read_text(), filename=file)
        found = {_module_file(root, name) for name in _imported_names(tree)} - {None}
        todo += [f for f in found if f not in seen and (file, f) not in skip]
    return seen


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


ROUTES = {  # the tiny config on each route whose stages read different params
    "exact": {},
    "kronecker": {"gradient": {"sketch": "kronecker", "sketch_rank": 4, "factor_samples": 64}},
    "matrix_free": {"subspace": {"method": "exact_randomized", "k": 8, "oversample": 6, "power_iters": 1}},
}


@pytest.fixture(scope="module")
def probes(tmp_path_factory) -> list[dict]:
    """Every stage of the tiny project on every route, in dependency order, run in one process per route."""
    out = []
    for route, change in ROUTES.items():
        raw = json.loads(json.dumps(TINY))
        for section, values in change.items():
            raw[section] = {**raw[section], **values}
        out += _probe_all(make_project(tmp_path_factory.mktemp(f"probe-{route}"), raw), raw)
    return out


def _probe_all(root: Path, raw: dict) -> list[dict]:
    from lowgrad.config import parse_params
    from lowgrad.plan import stage_plan

    env = {**_env(), "PYTHONPATH": os.pathsep.join([str(root / "src"), str(root)])}
    proc = subprocess.run([sys.executable, str(ROOT / "tests/stage_probe.py"), *stage_plan(parse_params(raw), root)],
                          cwd=root, env=env, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-3000:]
    probes = json.loads(proc.stdout.strip().splitlines()[-1])
    for probe in probes:
        name = probe["stage"].partition("@")[0]
        probe["modules"] = sorted(static_imports(root, f"stages/{name}.py", skip=skipped_for(name)))
    return probes


def test_the_static_import_graph_covers_what_each_stage_imported(probes, tmp_path):
    """The static graph is what dvc.yaml is checked against: it must hold every module a stage loaded first."""
    for probe in probes:
        missed = set(probe["first_imported"]) - set(probe["modules"])
        assert not missed, (probe["stage"], missed)
    assert any("src/lowgrad/detectors.py" in p["first_imported"] for p in probes if p["stage"] == "score")
    # a function-level import is followed, through a package's __init__; a third-party one is not ours
    for rel, text in {"stages/entry.py": "import numpy\n\ndef later():\n    from lowgrad.store import ChunkedStore\n",
                      "src/lowgrad/__init__.py": "", "src/lowgrad/store.py": "import lowgrad.paths\n",
                      "src/lowgrad/paths.py": "", "src/lowgrad/unused.py": ""}.items():
        (tmp_path / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / rel).write_text(text)
    assert static_imports(tmp_path, "stages/entry.py") == {
        "stages/entry.py", "src/lowgrad/__init__.py", "src/lowgrad/store.py", "src/lowgrad/paths.py"}
    assert static_imports(tmp_path, "stages/entry.py", skip={("src/lowgrad/store.py", "src/lowgrad/paths.py"): ""}) \
        == {"stages/entry.py", "src/lowgrad/__init__.py", "src/lowgrad/store.py"}
    # each edge left out is real (so the list cannot go stale): its importer names the module it leaves out
    for importer, imported in [*NOT_FOLLOWED, *FOLLOWED_ONLY_FOR]:
        module = imported.removeprefix("src/").removesuffix(".py").replace("/", ".")
        assert module in _imported_names(ast.parse((ROOT / importer).read_text())), (importer, imported)
    # and the scoring schema really is loaded first by score: no earlier stage imported it
    for probe in probes:
        assert ("src/lowgrad/options.py" in probe["first_imported"]) == (probe["stage"] == "score"), probe["stage"]


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
    """No stage imports another stage's body, and the report stage does not import the scoring code (it does load the
    detectors' registry, through which it validates the scoring section: an edit there reruns score anyway)."""
    for probe in probes:
        name = probe["stage"].partition("@")[0]
        others = [m for m in probe["modules"] if m.startswith("src/lowgrad/stages/") and
                  Path(m).stem not in (name, "__init__", "common", "prepare")]
        assert not others, (probe["stage"], others)
    report = next(p for p in probes if p["stage"] == "report")
    assert "src/lowgrad/scoring.py" not in report["modules"] and "src/lowgrad/fusion.py" not in report["modules"]


EXPENSIVE = ("prepare", "train", "model", "factors", "extract", "subspace", "project")
SCORING_CODE = ("src/lowgrad/options.py", "src/lowgrad/rows.py", "src/lowgrad/detectors.py", "src/lowgrad/fusion.py", "src/lowgrad/scoring.py",
                "src/lowgrad/probe.py", "src/lowgrad/comparison.py", "src/lowgrad/bootstrap.py",
                "src/lowgrad/report.py", "src/lowgrad/provenance.py")


def scoring_code_in(dvc_yaml: dict, probes: list[dict]) -> list[str]:
    """Stages before ``score`` that import, or declare as a dependency, detector / fusion / report code."""
    problems = []
    for probe in probes:
        stage = probe["stage"]
        if stage.partition("@")[0] in EXPENSIVE:
            _, deps = declared(dvc_yaml, stage)
            problems += [f"{stage} depends on {m}" for m in sorted((set(probe["modules"]) | deps) & set(SCORING_CODE))]
    return problems


def test_expensive_stages_do_not_depend_on_scoring_code(probes):
    """Editing a detector's options, adding a detector, or editing the report reruns score / report only."""
    dvc_yaml = yaml.safe_load((ROOT / "dvc.yaml").read_text())
    assert {p["stage"].partition("@")[0] for p in probes} >= set(EXPENSIVE)
    assert scoring_code_in(dvc_yaml, probes) == []
    broken = json.loads(json.dumps(dvc_yaml))  # negative control: the check sees a declared one
    broken["stages"]["extract"]["do"]["deps"].append("src/lowgrad/options.py")
    assert "extract@id_train depends on src/lowgrad/options.py" in scoring_code_in(broken, probes)
    score = next(p for p in probes if p["stage"] == "score")
    assert "src/lowgrad/options.py" in score["modules"]  # and score does load it (the check can fire)


@pytest.mark.timeout(1200)  # four routes' stages and score four times (its persistent outputs skip the run cache)
def test_route_switches_finish_under_dvc(tiny_project):
    """exact -> matrix-free -> Kronecker -> exact again (the stages before score restored from DVC's run cache):
    every dvc repro finishes (up to ``score``: the report reads only score's outputs and the subspace, which every
    route writes alike)."""
    root = tiny_project
    set_param(root, "scoring", {"forward": {"knn": {"k": 5}}, "gradient": {"knn": {"k": 5}, "residual": {}},
                                "bootstrap": {"replicates": 100}})
    for sketch, method in (("none", "exact_randomized"), ("kronecker", "randomized"), ("none", "randomized")):
        set_param(root, "gradient.sketch", sketch)
        set_param(root, "subspace.method", method)
        dvc(root, "repro", "score")  # finishes (stages whose deps match an earlier run come from DVC's run cache)
        store = ChunkedStore.open(root / "artifacts/extract/id_train.zarr")
        expected = "not stored (matrix-free route)" if method == "exact_randomized" else \
            {"none": "exact", "kronecker": "kronecker_sketch"}[sketch]
        assert store.meta["gradients"] == expected and ("grads" in store.columns) == (method != "exact_randomized")
        metrics = json.loads((root / "report/metrics.json").read_text())
        assert "grad_knn" in metrics["methods"], (sketch, method)
    assert ran_stages(dvc(root, "repro", "score")) == set()
    assert ran_stages(dvc(root, "repro")) == {"report"}  # and the report of the last route


def test_editing_detector_options_or_report_code_reruns_only_score_and_report(tiny_project):
    root = tiny_project
    assert status_stages(root) == set()  # the copy is up to date (DVC rehashes it, nothing to run)
    with open(root / "src/lowgrad/options.py", "a") as fh:
        fh.write("\n# an edit to the scoring schema\n")
    assert status_stages(root) == {"score", "report"}
    assert ran_stages(dvc(root, "repro")) == {"score", "report"}
    with open(root / "src/lowgrad/detectors.py", "a") as fh:  # where a detector and its options are declared
        fh.write("\n# an edit to a detector\n")
    assert status_stages(root) == {"score", "report"}
    assert ran_stages(dvc(root, "repro")) == {"score", "report"}
    with open(root / "src/lowgrad/report.py", "a") as fh:
        fh.write("\n# an edit to the report code\n")
    assert status_stages(root) == {"report"}
    assert ran_stages(dvc(root, "repro")) == {"report"}
    with open(root / "src/lowgrad/data.py", "a") as fh:  # negative control: the data code feeds every stage
        fh.write("\n# an edit to the data code\n")
    assert {"prepare@id_train", "model", "extract@id_train"} <= status_stages(root)
