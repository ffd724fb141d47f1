"""The result rows and their kinds, as data. A row is a forward detector, a gradient detector, a fusion group, or
a group's forward-only baseline; this is the one module that knows how their names are spelt (``knn``,
``grad_knn``, ``fused_<group>``, ``fused_<group>_forward_only``). The score stage writes every row's
:class:`Row` into ``metrics.json`` (``rows``), and the comparison, the report and the benchmarks read kinds,
members and twins from there instead of parsing names."""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Literal

Kind = Literal["forward", "gradient", "fused", "forward_only"]
GRADIENT_PREFIX = "grad_"  # also how a fusion group's members name gradient detectors in params.yaml
FUSED_PREFIX = "fused_"
FORWARD_ONLY_SUFFIX = "_forward_only"


@dataclass(frozen=True)
class Row:
    """One row of the results. ``detector``: the detector a forward / gradient row scores with; ``members``: the
    rows a fused row combines; ``gradient``: whether the row uses the gradient; ``twin``: the same row without the
    gradient (a gradient detector's forward detector, a group's forward-only baseline), None if not configured."""

    name: str
    kind: Kind
    gradient: bool
    label: str  # what the report's tables call it: the detector, or the fusion group
    detector: str | None = None
    members: tuple[str, ...] = ()
    twin: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return {**asdict(self), "members": list(self.members)}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> "Row":
        return cls(**{**data, "members": tuple(data.get("members", ()))})


def detector_row_name(detector: str, gradient: bool) -> str:
    """``knn`` / ``grad_knn``."""
    return f"{GRADIENT_PREFIX}{detector}" if gradient else detector


def member_detector(member: str) -> tuple[str, bool]:
    """A fusion member as written in params.yaml, as ``(detector, is gradient)``: ``grad_knn`` -> ``("knn", True)``."""
    if member.startswith(GRADIENT_PREFIX):
        return member.removeprefix(GRADIENT_PREFIX), True
    return member, False


def check_group_name(name: str) -> str:
    """A fusion group's name: letters, digits and ``_``, and not one that would collide with another group's
    forward-only baseline (``<name>_forward_only``). Raises ``ValueError``."""
    if not name.replace("_", "").isalnum():
        raise ValueError(f"fusion group name '{name}' may only hold letters, digits and '_'")
    if name.endswith(FORWARD_ONLY_SUFFIX):
        raise ValueError(f"fusion group name '{name}' is reserved: '{FUSED_PREFIX}<group>{FORWARD_ONLY_SUFFIX}' names "
                         "a group's forward-only baseline; rename the group")
    return name


def detector_rows(forward: list[str], gradient: list[str]) -> list[Row]:
    """The configured detectors' rows; a gradient row's twin is the forward detector of the same name, if configured."""
    rows = [Row(name, "forward", False, name, detector=name) for name in forward]
    rows += [Row(detector_row_name(name, True), "gradient", True, name, detector=name,
                 twin=name if name in forward else None) for name in gradient]
    return rows


def fusion_rows(groups: list[tuple[str, list[str], str]]) -> dict[str, tuple[Row, str]]:
    """``row name -> (Row, fusion rule)`` for groups given as ``(name, members, rule)``. A group mixing forward and
    gradient members gets a twin: the same rule on its forward members alone (``fused_<name>_forward_only``,
    shared by every group with the same forward members and rule), listed before the group."""
    out: dict[str, tuple[Row, str]] = {}
    forward_only: dict[tuple[tuple[str, ...], str], str] = {}
    for name, members, rule in groups:
        forward = tuple(m for m in members if not member_detector(m)[1])
        uses_gradient = len(forward) < len(members)
        twin = None
        if forward and uses_gradient:
            twin = forward_only.setdefault((forward, rule), f"{FUSED_PREFIX}{name}{FORWARD_ONLY_SUFFIX}")
            out.setdefault(twin, (Row(twin, "forward_only", False, f"{name}{FORWARD_ONLY_SUFFIX}", members=forward), rule))
        row = f"{FUSED_PREFIX}{name}"
        out[row] = (Row(row, "fused", uses_gradient, name, members=tuple(members), twin=twin), rule)
    return out


def configured(forward: list[str], gradient: list[str], groups: list[tuple[str, list[str], str]]) -> dict[str, Row]:
    """Every row of a scoring configuration by name, in the order they are scored and reported: the detectors'
    rows, then the fusion rows (``groups`` as for :func:`fusion_rows`)."""
    rows = {row.name: row for row in detector_rows(forward, gradient)}
    rows.update({name: row for name, (row, _) in fusion_rows(groups).items()})
    return rows


def rows_from_metrics(metrics: dict[str, Any]) -> dict[str, Row]:
    """The rows a ``metrics.json`` describes, by name (``ValueError`` for one written before rows were recorded)."""
    if "rows" not in metrics:
        raise ValueError("these metrics have no 'rows' (written by an older lowgrad): rerun the score stage")
    return {name: Row.from_dict(data) for name, data in metrics["rows"].items()}


def report_order(rows: dict[str, Row], names: list[str]) -> list[str]:
    """``names`` in the report's order: each forward detector's row followed by its gradient row, the gradient-only
    detectors' rows, then the fusion rows (each forward-only baseline before the first group that uses it)."""
    kinds = {n: rows[n].kind for n in names}
    bases = [rows[n].detector for n in names if kinds[n] == "forward"]
    bases += [rows[n].detector for n in names if kinds[n] == "gradient" and rows[n].detector not in bases]
    by_detector = {(rows[n].detector, rows[n].gradient): n for n in names if kinds[n] in ("forward", "gradient")}
    order = [by_detector[(b, g)] for b in bases for g in (False, True) if (b, g) in by_detector]
    return order + [n for n in names if kinds[n] in ("fused", "forward_only")]
