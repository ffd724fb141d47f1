"""The row model: kinds, members and twins as data (``lowgrad.rows``), the report's order from it, reserved names
refused with the config, and no other module spelling out row-name prefixes to find a row's kind."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from lowgrad.config import ConfigError, load_params
from lowgrad.rows import Row, detector_rows, fusion_rows, member_detector, report_order

ROOT = Path(__file__).resolve().parents[1]


def test_detector_rows_carry_kind_detector_and_twin():
    rows = {r.name: r for r in detector_rows(["knn", "vim"], ["knn", "residual"])}
    assert rows["grad_knn"] == Row("grad_knn", "gradient", True, "knn", detector="knn", twin="knn")
    assert rows["grad_residual"].twin is None  # no forward detector of that name: nothing to pair with
    assert rows["vim"].kind == "forward" and not rows["vim"].gradient
    assert all(Row.from_dict(r.as_dict()) == r for r in rows.values())  # what metrics.json stores reads back


def test_report_order_pairs_each_detector_with_its_gradient_row():
    rows = {r.name: r for r in detector_rows(["msp", "knn"], ["knn", "residual", "msp"])}
    rows.update({n: r for n, (r, _) in fusion_rows([("g", ["knn", "grad_residual"], "zscore")]).items()})
    names = ["msp", "knn", "grad_knn", "grad_residual", "grad_msp", "fused_g_forward_only", "fused_g"]
    assert report_order(rows, names) == [
        "msp", "grad_msp", "knn", "grad_knn", "grad_residual", "fused_g_forward_only", "fused_g"]
    assert report_order(rows, ["grad_knn", "knn"]) == ["knn", "grad_knn"]  # a subset, reordered
    assert rows["fused_g"].label == "g" and rows["fused_g_forward_only"].label == "g_forward_only"


def test_a_group_named_like_a_baseline_is_refused_with_the_config():
    """``x_forward_only`` would collide with group x's forward-only baseline row."""
    groups = [{"name": "x_forward_only", "members": ["knn", "grad_knn"]}]
    with pytest.raises(ConfigError, match="fusion group name 'x_forward_only' is reserved") as err:
        load_params(ROOT / "params.yaml", {"scoring.fusion.groups": groups})
    assert "\n" not in str(err.value)
    load_params(ROOT / "params.yaml", {"scoring.fusion.groups": [{"name": "x_forward", "members": ["knn", "grad_knn"]}]})
    assert member_detector("grad_knn") == ("knn", True) and member_detector("knn") == ("knn", False)


PREFIXES = ("grad_", "fused_", "_forward_only")
TESTS_OF_NAMES = {"startswith", "endswith", "removeprefix", "removesuffix"}


def prefix_parsing(source: str) -> list[str]:
    """Places that test or strip a row-name prefix (``name.startswith("grad_")``, ``m[5:]`` is not caught) or build a
    row name by hand (``f"grad_{name}"``)."""
    found = []
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr in TESTS_OF_NAMES:
            consts = [a.value for a in ast.walk(node) if isinstance(a, ast.Constant) and isinstance(a.value, str)]
            if any(p in c for c in consts for p in PREFIXES):
                found.append(f"line {node.lineno}: .{node.func.attr}(...)")
        elif isinstance(node, ast.JoinedStr) and node.values and isinstance(node.values[0], ast.Constant):
            if str(node.values[0].value).startswith(PREFIXES[:2]):
                found.append(f"line {node.lineno}: f-string {node.values[0].value!r}...")
    return found


def test_no_module_but_the_row_model_parses_row_names():
    problems = []
    for path in [*(ROOT / "src/lowgrad").rglob("*.py"), *(ROOT / "bench").glob("*.py"), *(ROOT / "flows").glob("*.py")]:
        if path.name != "rows.py":
            problems += [f"{path.relative_to(ROOT)} {p}" for p in prefix_parsing(path.read_text())]
    assert problems == []
    # negative control: the checks see both forms
    assert len(prefix_parsing('a = name.startswith("grad_")\nb = f"fused_{group}"\n')) == 2
