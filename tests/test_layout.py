"""The code layout: no import cycles among the project's modules, and nothing but tests, configs and benchmarks
refers to ../shared (users of the project do not have it)."""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def _project_imports() -> dict[str, set[str]]:
    """Module -> the project modules it imports anywhere in its body (lazy imports and TYPE_CHECKING blocks too)."""
    modules = {}
    for path in (ROOT / "src").rglob("*.py"):
        name = ".".join(path.relative_to(ROOT / "src").with_suffix("").parts).removesuffix(".__init__")
        modules[name] = path
    graph: dict[str, set[str]] = {m: set() for m in modules}
    for name, path in modules.items():
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and node.module:
                targets = [node.module] + [f"{node.module}.{a.name}" for a in node.names]
            elif isinstance(node, ast.Import):
                targets = [a.name for a in node.names]
            else:
                continue
            graph[name] |= {t for t in targets if t in modules and t != name}
    return graph


def _cycle(graph: dict[str, set[str]]) -> list[str] | None:
    state: dict[str, int] = {}  # 1: on the current path, 2: done
    stack: list[str] = []

    def visit(node: str) -> list[str] | None:
        state[node] = 1
        stack.append(node)
        for nxt in sorted(graph[node]):
            if state.get(nxt) == 1:
                return stack[stack.index(nxt):] + [nxt]
            if nxt not in state and (found := visit(nxt)):
                return found
        stack.pop()
        state[node] = 2
        return None

    for node in sorted(graph):
        if node not in state and (found := visit(node)):
            return found
    return None


def test_no_import_cycles():
    graph = _project_imports()
    assert {"lowgrad.config", "lowgrad.route", "lowgrad.stages.score"} <= set(graph)
    assert _cycle(graph) is None, " -> ".join(_cycle(graph))
    # negative control: a cycle is found when there is one
    graph["lowgrad.paths"] = graph["lowgrad.paths"] | {"lowgrad.config"}
    graph["lowgrad.config"] = graph["lowgrad.config"] | {"lowgrad.paths"}
    assert _cycle(graph) is not None


def test_shared_is_referred_to_only_by_tests_configs_and_benchmarks():
    for folder in ("src", "flows", "stages", "docs"):
        for path in (ROOT / folder).rglob("*"):
            if path.is_file() and path.suffix in (".py", ".md", ".yaml"):
                assert "shared/METHOD" not in path.read_text(), path
    assert "shared/METHOD" not in (ROOT / "README.md").read_text()


def _misordered(plan: list[str], graph) -> list[str]:
    """Edges of DVC's stage graph (a stage -> a stage it depends on) that ``plan`` runs the wrong way round."""
    position = {name: i for i, name in enumerate(plan)}
    return [f"{a.name} before {b.name}" for a, b in graph.edges
            if getattr(a, "cmd", None) and getattr(b, "cmd", None) and position[a.name] < position[b.name]]


def test_the_stage_plan_is_dvc_yaml_in_an_order_dvc_can_run():
    """``stage_plan`` (dvc.yaml's order, foreach expanded) names exactly DVC's stages, each after what it needs."""
    from dvc.repo import Repo

    from lowgrad.config import load_params
    from lowgrad.plan import stage_plan

    plan = stage_plan(load_params(ROOT / "params.yaml"), ROOT)
    with Repo(str(ROOT)) as repo:
        graph = repo.index.graph
        assert set(plan) == {stage.name for stage in graph.nodes if getattr(stage, "cmd", None)}
        assert _misordered(plan, graph) == []
        # negative control: report moved to the front is caught
        assert "report before score" in _misordered(["report", *[p for p in plan if p != "report"]], graph)


def test_light_stages_do_not_import_heavy_libraries():
    """What a stage process imports is paid on every run of it (the suite runs hundreds): the project stage needs
    neither scikit-learn nor torch, the report needs torch's version only (read from its file, checked against
    torch itself). Negative control: the score stage does import both."""
    import json
    import subprocess
    import sys

    code = ("import sys, json, importlib\n"
            "importlib.import_module(sys.argv[1])\n"
            "extra = []\n"
            "if sys.argv[1] == 'stages.report':\n"
            "    from lowgrad.stages.report import torch_version\n"
            "    extra = [torch_version()]\n"
            "print(json.dumps([m in sys.modules for m in ('sklearn', 'torch')] + extra))\n")
    root = Path(__file__).resolve().parents[1]
    seen = {}
    for module in ("stages.project", "stages.report", "stages.score"):
        out = subprocess.run([sys.executable, "-c", code, module], cwd=root, capture_output=True, text=True, check=True)
        seen[module] = json.loads(out.stdout)
    import torch

    assert seen["stages.project"] == [False, False]
    assert seen["stages.report"][1:] == [False, torch.__version__]
    assert seen["stages.score"] == [True, True]


def own_error_exits(tree: ast.AST) -> list[int]:
    """Lines that exit or print an ``error:`` line by hand (``sys.exit(...)``, ``print(f"error: ...")``) instead of
    through :mod:`lowgrad.errors`."""
    lines = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.Call):
            continue
        func = node.func
        if isinstance(func, ast.Attribute) and func.attr == "exit" and getattr(func.value, "id", None) == "sys":
            lines.append(node.lineno)
        elif isinstance(func, ast.Name) and func.id == "print" and node.args:
            first = node.args[0]
            text = first.value if isinstance(first, ast.Constant) else \
                first.values[0].value if isinstance(first, ast.JoinedStr) and isinstance(first.values[0], ast.Constant) else ""
            if isinstance(text, str) and text.startswith("error:"):
                lines.append(node.lineno)
    return sorted(lines)


def test_every_entry_point_reports_errors_through_one_helper():
    """The stages, the flows and ``lowgrad score`` print a user error and exit through lowgrad.errors only."""
    found = {str(path.relative_to(ROOT)): lines for base in ("src", "stages", "flows")
             for path in sorted((ROOT / base).rglob("*.py")) if path != ROOT / "src/lowgrad/errors.py"
             if (lines := own_error_exits(ast.parse(path.read_text())))}
    assert found == {}, found
    # negative control: the handlers this replaced are found
    before = 'import sys\ntry:\n    run()\nexcept E as err:\n    print(f"error: {err}", file=sys.stderr)\n    sys.exit(1)\n' \
             'sys.exit(f"error: {err}")\n'
    assert own_error_exits(ast.parse(before)) == [5, 6, 7]


ARTIFACT_PREFIXES = ("artifacts/", "report/", "data/prepared", "models/model.", "models/trained.")


def artifact_path_literals(tree: ast.AST, names: set[str]) -> list[int]:
    """Lines of string constants that spell a project path (``"report/metrics.json"``, ``"params.yaml"``) instead
    of naming it from lowgrad.paths; docstrings and longer messages that merely mention one are not paths."""
    docstrings = {id(node.body[0].value) for node in ast.walk(tree)
                  if isinstance(node, (ast.Module, ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)) and node.body
                  and isinstance(node.body[0], ast.Expr) and isinstance(node.body[0].value, ast.Constant)}
    lines = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in docstrings:
            text = node.value
            if text in names or (text.startswith(ARTIFACT_PREFIXES) and " " not in text):
                lines.append(node.lineno)
    return sorted(lines)


def test_every_project_path_is_named_in_paths_py():
    """The artifact layout has one source, lowgrad.paths (tests may spell paths out: they check that layout)."""
    import lowgrad.paths as paths

    names = {v for k, v in vars(paths).items() if k.isupper() and isinstance(v, str)}
    assert {"params.yaml", "dvc.lock", "report/metrics.json"} <= names
    found = {str(path.relative_to(ROOT)): lines for base in ("src", "stages", "flows", "bench")
             for path in sorted((ROOT / base).rglob("*.py")) if path != ROOT / "src/lowgrad/paths.py"
             if (lines := artifact_path_literals(ast.parse(path.read_text()), names))}
    assert found == {}, found
    # negative control: the literals this replaced are found; a message that mentions a path is not one
    before = 'm = json.loads((root / "report/metrics.json").read_text())\nload_params("params.yaml")\n' \
             'x = Path("artifacts/extract") / name\nraise E("no dvc.lock (stages run outside DVC)")\n'
    assert artifact_path_literals(ast.parse(before), names) == [1, 2, 3]


# parameters named like an option but not one: the probe's fixed SGD constants (the authors' setting, not
# scoring.probe options) share names with the classifier's train options; a seed is each caller's
NOT_OPTIONS = {"momentum", "weight_decay", "seed"}


def restated_defaults(tree: ast.AST, defaults: dict[str, set]) -> list[str]:
    """``function(name=value)`` for each literal default equal to an option model's default of a field of that name."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            positional = a.posonlyargs + a.args
            pairs = [*zip(positional[len(positional) - len(a.defaults):], a.defaults),
                     *((x, d) for x, d in zip(a.kwonlyargs, a.kw_defaults) if d is not None)]
            found += [f"{node.name}({arg.arg}={d.value!r})" for arg, d in pairs
                      if isinstance(d, ast.Constant) and arg.arg not in NOT_OPTIONS and d.value in defaults.get(arg.arg, ())]
    return found


def test_option_defaults_are_stated_only_in_the_option_models():
    """A library signature takes an option's default from its option model (``lowgrad.config``, ``lowgrad.options``,
    ``lowgrad.estimator_options``) or has none; a literal copy would drift from the model silently."""
    import inspect

    from pydantic import BaseModel

    import lowgrad.config
    import lowgrad.estimator_options
    import lowgrad.options

    models = [lowgrad.config, lowgrad.options, lowgrad.estimator_options]
    defaults: dict[str, set] = {}
    for module in models:
        for cls in vars(module).values():
            if inspect.isclass(cls) and issubclass(cls, BaseModel) and cls.__module__ == module.__name__:
                for field, info in cls.model_fields.items():
                    if isinstance(info.default, (int, float, str)) and not isinstance(info.default, bool):
                        defaults.setdefault(field, set()).add(info.default)
    assert defaults["k"] >= {32} and defaults["epochs"] >= {10}
    model_files = {Path(m.__file__).resolve() for m in models}
    found = {str(path.relative_to(ROOT)): hits for path in sorted((ROOT / "src/lowgrad").rglob("*.py"))
             if path.resolve() not in model_files and (hits := restated_defaults(ast.parse(path.read_text()), defaults))}
    assert found == {}, found
    # negative control: the signatures this replaced are found
    before = "def __init__(self, kernel='nfk', k=32, oversample=10, seed=0): ...\ndef train_probe(x, *, epochs=10): ...\n"
    assert restated_defaults(ast.parse(before), defaults) == ["__init__(kernel='nfk')", "__init__(k=32)",
                                                              "__init__(oversample=10)", "train_probe(epochs=10)"]
