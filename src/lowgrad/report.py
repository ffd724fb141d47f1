"""Markdown report and PNG plots (no CDN, opens anywhere)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lowgrad.config import Params  # noqa: E402
from lowgrad.paths import atomic_dir, atomic_path  # noqa: E402
from lowgrad.route import Route  # noqa: E402
from lowgrad.rows import Row, report_order, rows_from_metrics  # noqa: E402


def _row_order(metrics: dict[str, Any], names: Any = None) -> list[str]:
    """The metrics' rows (or just ``names``) in the report's order (:func:`lowgrad.rows.report_order`)."""
    return report_order(rows_from_metrics(metrics), list(metrics["methods"] if names is None else names))


GRADIENT_COLUMN = {"forward": "no", "gradient": "yes", "fused": "fused", "forward_only": "no (fused)"}


def _with_interval(value: float, ci: list[float] | None) -> str:
    return f"{value:.2f}" if ci is None else f"{value:.2f} ({ci[0]:.2f}–{ci[1]:.2f})"


def results_table(metrics: dict[str, Any], columns: list[str]) -> str:
    """Rows = methods (without / with low-dim gradient), columns = FPR95 / AUROC per OOD set and the mean,
    each with its bootstrap interval in brackets. The best value of each column is bold."""
    methods, kinds = metrics["methods"], rows_from_metrics(metrics)
    rows = _row_order(metrics)
    header = ["method", "gradient"] + [f"{c} {m}" for c in columns for m in ("FPR95↓", "AUROC↑")]
    best = {}
    for c in columns:
        best[(c, "fpr95")] = min(methods[r][c]["fpr95"] for r in rows)
        best[(c, "auroc")] = max(methods[r][c]["auroc"] for r in rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = [kinds[r].label, GRADIENT_COLUMN[kinds[r].kind]]
        for c in columns:
            for m in ("fpr95", "auroc"):
                v = methods[r][c][m]
                text = _with_interval(v, methods[r][c].get("ci", {}).get(m))
                cells.append(f"**{text}**" if np.isclose(v, best[(c, m)]) else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _delta_text(d: dict[str, Any]) -> str:
    return f"{d['delta']:+.2f} [{d['ci'][0]:+.2f}, {d['ci'][1]:+.2f}]"


def _comparisons(metrics: dict[str, Any]) -> list[tuple[str, str, str, dict[str, Any]]]:
    """``(gradient row, kind, baseline row, comparison)`` for every paired comparison in the metrics (one line
    when the twin is the best forward-only row)."""
    out = []
    for row in _row_order(metrics, metrics["deltas"]):
        comps = metrics["deltas"][row]
        twin, best = comps.get("twin"), comps.get("best_forward_only")
        if twin is not None:
            same = best is not None and best["against"] == twin["against"]
            out.append((row, "twin = best forward-only" if same else "twin", twin["against"], twin))
            if same:
                continue
        if best is not None:
            out.append((row, "best forward-only", best["against"], best))
    return out


def _reading(verdict: str) -> str:
    return "no detectable difference" if verdict == "no detectable difference" else f"the gradient row is {verdict}"


def _sentence(row: str, base: str, comp: dict[str, Any]) -> str:
    fpr, auc = comp["mean"]["fpr95"], comp["mean"]["auroc"]
    words = {"better": "better than", "worse": "worse than", "no detectable difference": "not distinguishable from"}
    if fpr["verdict"] == auc["verdict"]:
        return f"{row} is {words[fpr['verdict']]} {base} on both mean FPR95 and mean AUROC."
    return (f"{row} is {words[fpr['verdict']]} {base} on mean FPR95 and {words[auc['verdict']]} it on mean AUROC.")


def _familywise_text(comp: dict[str, Any]) -> str:
    """The comparison read at the family-wise level: each metric's simultaneous interval and reading."""
    fpr, auc = comp["mean"]["fpr95"], comp["mean"]["auroc"]
    if "ci_familywise" not in fpr:
        return "not computed (metrics written before the family-wise intervals)"
    return (f"FPR95 [{fpr['ci_familywise'][0]:+.2f}, {fpr['ci_familywise'][1]:+.2f}] {fpr['verdict_familywise']}; "
            f"AUROC [{auc['ci_familywise'][0]:+.2f}, {auc['ci_familywise'][1]:+.2f}] {auc['verdict_familywise']}")


def familywise_summary(metrics: dict[str, Any]) -> dict[str, list[str]]:
    """The readings on mean FPR95 / AUROC, one per distinct comparison and metric: ``better`` and ``worse``, those
    still better / worse at the family-wise level; ``lost``, those "better" or "worse" per comparison only."""
    out: dict[str, list[str]] = {"better": [], "worse": [], "lost": []}
    for row, _, base, comp in _comparisons(metrics):
        for m, name in (("fpr95", "FPR95"), ("auroc", "AUROC")):
            entry = comp["mean"][m]
            family = entry.get("verdict_familywise", "no detectable difference")
            if family != "no detectable difference":
                out[family].append(f"{row} vs {base} ({name})")
            elif entry["verdict"] != "no detectable difference":
                out["lost"].append(f"{row} vs {base} ({name}, {entry['verdict']} per comparison)")
    return out


def verdict_rows(metrics: dict[str, Any]) -> list[dict[str, Any]]:
    """The verdict table as data: one row per paired comparison (mean Δ FPR95 / Δ AUROC, intervals, readings)."""
    rows = []
    for row, kind, base, comp in _comparisons(metrics):
        fpr, auc = comp["mean"]["fpr95"], comp["mean"]["auroc"]
        rows.append({"gradient_row": row, "vs": kind, "baseline": base,
                     "delta_fpr95": round(fpr["delta"], 2), "fpr95_ci": "[{:+.2f}, {:+.2f}]".format(*fpr["ci"]),
                     "delta_auroc": round(auc["delta"], 2), "auroc_ci": "[{:+.2f}, {:+.2f}]".format(*auc["ci"]),
                     "reading": _sentence(row, base, comp), "familywise": _familywise_text(comp)})
    return rows


def verdict_section(metrics: dict[str, Any], plot: bool = True) -> list[str]:
    """"Does the gradient help here?": the headline comparison, then one line per paired comparison (``plot``: and
    the link to the forest plot beside the report)."""
    level = 100 * metrics["bootstrap"]["level"]
    methods, deltas = metrics["methods"], metrics["deltas"]
    best_fwd = metrics.get("best_forward_only")
    lines = ["## Does the gradient help here?", ""]
    if not deltas:
        return lines + ["No row uses the gradient in this run.", ""]
    best_grad = min(deltas, key=lambda r: methods[r]["mean"]["fpr95"])
    fmt = lambda r: _with_interval(methods[r]["mean"]["fpr95"], methods[r]["mean"]["ci"]["fpr95"])  # noqa: E731
    family = metrics.get("familywise")
    primary = metrics.get("primary")
    if primary is not None:
        head = primary["mean"]["fpr95"]
        auc = primary["mean"]["auroc"]
        lines += [
            f"**Primary comparison (declared in `scoring.primary` before the run): `{primary['row']}`, mean FPR95 "
            f"{fmt(primary['row'])}, against `{primary['against']}`, {fmt(primary['against'])}. Difference "
            f"{_delta_text(head)} points: {_reading(head['verdict'])} at the {level:.0f} % level "
            f"(AUROC {_delta_text(auc)}: {_reading(auc['verdict'])}).**",
            "",
            "Every other reading below is secondary: read it in the family-wise column.",
            "",
        ]
    elif best_fwd is not None:
        head = deltas[best_grad]["best_forward_only"]["mean"]["fpr95"]
        fw = (f" Family-wise ({family['comparisons']} comparisons): [{head['ci_familywise'][0]:+.2f}, "
              f"{head['ci_familywise'][1]:+.2f}], {_reading(head['verdict_familywise'])}."
              if family is not None and "ci_familywise" in head else "")
        lines += [
            f"**Best row using the gradient: `{best_grad}`, mean FPR95 {fmt(best_grad)}; best forward-only row: "
            f"`{best_fwd}`, {fmt(best_fwd)}. Difference {_delta_text(head)} points: "
            f"{_reading(head['verdict'])} at the {level:.0f} % level.{fw}**",
            "",
            "(Both rows are the best of their kind on these test sets, so this headline is chosen after the fact: "
            "read it at the family-wise level. No comparison was declared in advance (`scoring.primary`); each line "
            "below is a comparison fixed by the configuration.)",
            "",
        ]
    lines += [
        f"Δ = gradient row − baseline, in points, with paired {level:.0f} % bootstrap intervals "
        f"({metrics['bootstrap']['replicates']} replicates; ID test and each OOD set resampled independently, "
        "both rows on the same resamples). FPR95: negative is better; AUROC: positive is better. "
        "Twin: the same detector without the gradient, or a fusion group without its gradient members. "
        "The Δ columns' intervals are per comparison (about one reading in twenty may be wrong by chance); the "
        "family-wise column's hold for every comparison at once. Both cover the test "
        "sets' sampling only, not the method's own random draws (`seed`: the linear probe's training, the "
        "randomized SVD's start, the sketch and its kernel sample, the fusion split), which can move a reading; "
        "rows read through the linear probe by more than their interval (docs/method.md, section 8).",
        "",
    ]
    if family is not None and family.get("alpha"):
        summary = familywise_summary(metrics)
        lines += [
            f"Family-wise: the {family['comparisons']} distinct comparisons below form one family per metric; their "
            f"simultaneous {level:.0f} % intervals (each a percentile interval at tail probability "
            f"{100 * family['alpha']['fpr95']:.2f} % for FPR95, {100 * family['alpha']['auroc']:.2f} % for AUROC, "
            f"instead of {100 - level:.0f} %) hold all at once in {level:.0f} % of the paired replicates "
            f"({metrics['bootstrap']['replicates']} replicates: so thin a tail rests on the few most extreme of them; "
            "more `scoring.bootstrap.replicates` make it finer). "
            f"Better at the family-wise level: {'; '.join(summary['better']) or 'none'}. "
            f"Worse at the family-wise level: {len(summary['worse'])} readings. "
            f"Per comparison only (not at the family-wise level): {'; '.join(summary['lost']) or 'none'}.",
            "",
        ]
    lines += [
        "| gradient row | vs | baseline | Δ mean FPR95 | Δ mean AUROC | reading | family-wise |",
        "|---|---|---|---|---|---|---|",
    ]
    for row, kind, base, comp in _comparisons(metrics):
        lines.append(f"| {row} | {kind} | {base} | {_delta_text(comp['mean']['fpr95'])} | "
                     f"{_delta_text(comp['mean']['auroc'])} | {_sentence(row, base, comp)} | {_familywise_text(comp)} |")
    return lines + (["", "![paired differences](plots/deltas.png)", ""] if plot else [""])


def _plot_deltas(metrics: dict[str, Any], path: Path) -> None:
    """Forest plot: Δ mean FPR95 with its paired interval, one line per gradient row (vs twin and vs the best
    forward-only row)."""
    rows = _row_order(metrics, metrics["deltas"])
    fig, ax = plt.subplots(figsize=(7, 0.45 * len(rows) + 1.4))
    styles = {"twin": ("o", "C0", -0.15), "best_forward_only": ("s", "C3", 0.15)}
    for kind, (marker, color, offset) in styles.items():
        ys, xs, lows, highs = [], [], [], []
        for i, row in enumerate(rows):
            if kind in metrics["deltas"][row]:
                d = metrics["deltas"][row][kind]["mean"]["fpr95"]
                ys.append(i + offset)
                xs.append(d["delta"])
                lows.append(d["delta"] - d["ci"][0])
                highs.append(d["ci"][1] - d["delta"])
        label = "vs twin (same detector / group without gradient)" if kind == "twin" else \
            f"vs best forward-only row ({metrics.get('best_forward_only')})"
        ax.errorbar(xs, ys, xerr=[lows, highs], fmt=marker, color=color, capsize=3, label=label)
    ax.axvline(0.0, color="grey", lw=0.8)
    ax.set_yticks(range(len(rows)), rows, fontsize=8)
    ax.invert_yaxis()
    ax.set(xlabel="Δ mean FPR95 (points; < 0: the gradient row is better)",
           title=f"Paired differences, {100 * metrics['bootstrap']['level']:.0f} % bootstrap intervals")
    ax.legend(fontsize=7, loc="upper center", bbox_to_anchor=(0.5, -0.12 - 1.0 / (len(rows) + 4)), ncol=1)
    fig.tight_layout()
    fig.savefig(path, dpi=110, bbox_inches="tight")
    plt.close(fig)


def _plot_histograms(scores: dict[str, np.ndarray], methods: list[str], ood: list[str], path: Path) -> None:
    fig, axes = plt.subplots(len(methods), len(ood), figsize=(3.2 * len(ood), 2.2 * len(methods)), squeeze=False)
    for i, m in enumerate(methods):
        for j, o in enumerate(ood):
            ax = axes[i, j]
            id_s, ood_s = scores[f"{m}/id_test"], scores[f"{m}/{o}"]
            bins = np.histogram_bin_edges(np.concatenate([id_s, ood_s]), bins=40)
            # stepfilled: one polygon per histogram, not 40 bar patches (the same picture, drawn ~5x faster)
            ax.hist(id_s, bins=bins, alpha=0.6, density=True, histtype="stepfilled", label="ID test")
            ax.hist(ood_s, bins=bins, alpha=0.6, density=True, histtype="stepfilled", label=o)
            ax.set_title(f"{m} vs {o}", fontsize=8)
            ax.tick_params(labelsize=6)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _roc_points(id_s: np.ndarray, ood_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """(FPR, TPR) at every distinct threshold, descending (a sample counts as ID when its score >= threshold)."""
    thresholds = np.unique(np.concatenate([id_s, ood_s]))[::-1]
    at_or_above = lambda s: len(s) - np.searchsorted(np.sort(s), thresholds, side="left")  # noqa: E731
    return np.r_[0.0, at_or_above(ood_s) / len(ood_s)], np.r_[0.0, at_or_above(id_s) / len(id_s)]


def _roc_pairs(methods: list[str], deltas: dict[str, Any]) -> list[tuple[str | None, str]]:
    """(forward baseline or None, gradient row) per panel row: each gradient row with its twin (``methods``: in the
    report's order)."""
    pairs = []
    for row in methods:
        if row in deltas:
            pairs.append((deltas[row].get("twin", {}).get("against"), row))
    return pairs


def _plot_roc(scores: dict[str, np.ndarray], pairs: list[tuple[str | None, str]], ood: list[str], path: Path) -> None:
    """Small multiples: one panel row per gradient row (solid) and its twin without gradient (dashed), one
    column per OOD set."""
    fig, axes = plt.subplots(len(pairs), len(ood), figsize=(2.8 * len(ood), 2.5 * len(pairs)), squeeze=False)
    for i, (base, row) in enumerate(pairs):
        for j, o in enumerate(ood):
            ax = axes[i, j]
            for m, style, color in ((base, "--", "C1"), (row, "-", "C0")):
                if m is not None:
                    fpr, tpr = _roc_points(scores[f"{m}/id_test"], scores[f"{m}/{o}"])
                    ax.plot(fpr, tpr, ls=style, color=color, lw=1.2, label=m)
            ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
            ax.set_title(f"{row}, OOD = {o}", fontsize=7)
            ax.tick_params(labelsize=6)
            if j == 0:
                ax.set_ylabel("TPR (ID kept)", fontsize=7)
                ax.legend(fontsize=6, loc="lower right")
            if i == len(pairs) - 1:
                ax.set_xlabel("FPR (OOD kept as ID)", fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)


def _plot_spectrum(ratio: np.ndarray, path: Path) -> None:
    fig, ax = plt.subplots(figsize=(5, 3.4))
    idx = np.arange(1, len(ratio) + 1)
    ax.bar(idx, 100 * ratio, color="tab:blue", label="per component")
    ax2 = ax.twinx()
    ax2.plot(idx, 100 * np.cumsum(ratio), color="tab:red", label="cumulative")
    ax.set(xlabel="component", ylabel="explained variance (%)", title="Gradient spectrum (kernel set)")
    ax2.set_ylabel("cumulative (%)")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _plot_k_sweep(sweep: dict[str, dict[str, dict[str, float]]], full_k: int, full: dict[str, Any], rows: dict[str, Row],
                  path: Path) -> None:
    """Mean FPR95 over the OOD sets against k, one line per gradient detector (the full-k point from the main
    table), with each detector's forward counterpart as a dashed horizontal line."""
    ks = sorted({int(k) for k in sweep} | {full_k})
    detectors = sorted({d for rows in sweep.values() for d in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, det in enumerate(detectors):
        values = [full[det]["mean"]["fpr95"] if k == full_k else sweep[str(k)][det]["fpr95"] for k in ks]
        color = f"C{i % 10}"
        ax.plot(ks, values, marker="o", color=color, label=det)
        base = rows[det].twin
        if base is not None:
            ax.axhline(full[base]["mean"]["fpr95"], color=color, ls="--", lw=0.8)
    ax.set(xscale="log", xlabel="k (PCA components of the gradient)", ylabel="mean FPR95 (%) ↓",
           title="Mean FPR95 vs k (dashed: the same detector without gradient)")
    ax.set_xticks(ks, [str(k) for k in ks])
    ax.minorticks_off()
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def timings_table(timings: dict[str, dict[str, Any]]) -> str:
    lines = ["| stage | wall s | peak RSS MB | peak GPU MB |", "|---|---|---|---|"]
    for stage, t in timings.items():
        lines.append(f"| {stage} | {t['wall_s']:.1f} | {t['peak_rss_mb']:.0f} | {t.get('peak_gpu_mb', '–')} |")
    total = sum(t["wall_s"] for t in timings.values())
    lines.append(f"| **total** | **{total:.1f}** | **{max(t['peak_rss_mb'] for t in timings.values()):.0f}** (max) | |")
    return "\n".join(lines)


def _short(md5: str | None) -> str:
    return md5[:12] if md5 else "not recorded"


def provenance_line(provenance: dict[str, Any] | None) -> list[str]:
    """One line under the title: the inputs' hashes and the code, so two reports compare at a glance."""
    if not provenance:
        return []
    users: dict[tuple[str, str], list[str]] = {}  # (path, md5) -> the keys that read it
    for key, v in provenance["inputs"].items():
        users.setdefault((v["path"], _short(v["md5"])), []).append(key.split(".")[2] if key.startswith("data.") else key)
    inputs = "; ".join(f"`{path}` {md5} ({', '.join(keys)})" for (path, md5), keys in users.items())
    commit = provenance["git_commit"][:10] + (" + uncommitted changes" if provenance["git_dirty"] else "") \
        if provenance["git_commit"] else "no git commit"
    return [f"Computed from (md5, {provenance['hashes_from']}): {inputs}. Code: lowgrad {provenance['lowgrad']}, "
            f"{commit}. `dvc status` lists nothing while this report is current.", ""]


def provenance_section(provenance: dict[str, Any] | None) -> list[str]:
    """Every input and main artifact with the md5 DVC recorded."""
    if not provenance:
        return []
    rows = [f"| {key} | `{v['path']}` | `{v['md5'] or 'not recorded'}` |" for key, v in provenance["inputs"].items()]
    rows += [f"| artifact | `{path}` | `{md5 or 'not recorded'}` |" for path, md5 in provenance["artifacts"].items()]
    return ["## Provenance", "", f"Content hashes from {provenance['hashes_from']} (never recomputed); lowgrad "
            f"{provenance['lowgrad']}, commit `{provenance['git_commit']}`"
            + (" with uncommitted changes" if provenance["git_dirty"] else "") + ".", "",
            "| what | path | md5 |", "|---|---|---|", *rows, ""]


def small_sets_note(metrics: dict[str, Any]) -> list[str]:
    """The line that says which OOD sets were too small for the mean (``scoring.min_ood_samples``)."""
    small = metrics.get("small_sets") or {}
    if not small:
        return []
    listed = ", ".join(f"`{s}` ({n} images)" for s, n in small.items())
    return [f"**Left out of the mean and of every verdict (fewer than `scoring.min_ood_samples` images): {listed}.** "
            f"Their columns are shown on their own; the mean is over {', '.join(f'`{s}`' for s in metrics['mean_over'])}.", ""]


def write_report(
    params: Params,
    metrics: dict[str, Any],
    scores: dict[str, np.ndarray],
    explained_variance_ratio: np.ndarray,
    run: dict[str, Any],
    report_path: str,
    plots_dir: str,
) -> None:
    """Write ``report.md`` and its plots; the previous report and plots are replaced only once both new ones are
    complete (the plots' folder, then the text, each in one rename)."""
    with atomic_dir(plots_dir) as staging, atomic_path(report_path) as text_file:
        text_file.write_text(_write_report(params, metrics, scores, explained_variance_ratio, run, staging))


def _write_report(params: Params, metrics: dict[str, Any], scores: dict[str, np.ndarray],
                  explained_variance_ratio: np.ndarray, run: dict[str, Any], staging: Path) -> str:
    """Draw the plots into ``staging`` and return the report's text."""
    ood = params.data.ood_names
    methods = _row_order(metrics)
    _plot_histograms(scores, methods, ood, staging / "score_histograms.png")
    deltas = metrics.get("deltas", {})
    if deltas:
        _plot_roc(scores, _roc_pairs(methods, deltas), ood, staging / "roc.png")
        _plot_deltas(metrics, staging / "deltas.png")
    _plot_spectrum(explained_variance_ratio, staging / "spectrum.png")
    sweep = metrics.get("k_sweep") or {}
    if sweep:
        _plot_k_sweep(sweep, params.subspace.k, metrics["methods"], rows_from_metrics(metrics), staging / "fpr95_vs_k.png")

    s, g = params.subspace, params.gradient
    text = [
        "# lowgrad report",
        "",
        "OOD detection with and without the low-dimensional gradient (Wu et al., arXiv 2310.17163).",
        "Scores: higher = in-distribution. FPR95: ID positive (fraction of OOD accepted at 95 % ID kept), in %.",
        "",
        f"**ID test accuracy of the classifier: {metrics['id_accuracy']:.2f} %**"
        + (f"; of the linear probe on G_low: {metrics['probe_accuracy']:.2f} %" if "probe_accuracy" in metrics else ""),
        "",
        *provenance_line(metrics.get("provenance")),
        *verdict_section(metrics),
        "## Results",
        "",
        results_table(metrics, [*ood, "mean"]),
        "",
        *small_sets_note(metrics),
        "gradient = yes: the detector on the low-dimensional gradient G_low (probe-based scores use the linear "
        "probe trained on the bank's G_low); fused: a fusion group, its members calibrated on held-out ID data "
        "and added with equal weights (see run settings); no (fused): the same group without its gradient "
        f"members. In brackets: {100 * metrics['bootstrap']['level']:.0f} % bootstrap intervals. Best value per "
        "column in bold. AUPR-In, AUPR-Out and FPR95 with OOD as the positive class (OpenOOD's convention), each "
        "with its interval, are in `report/metrics.json`.",
        "",
        *(["## Mean FPR95 vs k", "", "The gradient detectors refitted on the first k PCA components of G_low "
            "(dashed: the same detector without gradient):", "", "![mean FPR95 vs k](plots/fpr95_vs_k.png)", ""]
          if sweep else []),
        *(["## Stage timings", "", "Wall seconds and peak resident memory of each stage's process (this run's "
           "machine; Dask workers not included; `report` itself is not listed).", "",
           timings_table(metrics["timings"]), ""] if metrics.get("timings") else []),
        "## Run settings",
        "",
        f"- kernel: {s.kernel}; gradient parameters: {g.params}; basis: {s.basis}"
        + (f" ({s.method}, k = {s.k}, oversampling {s.oversample}, power iterations {s.power_iters})" if s.basis == "pca" else ""),
        f"- explained variance of the kept components: {100 * explained_variance_ratio.sum():.1f} %",
        *[f"- unused setting: {line}" for line in Route.from_params(params).unused_lines(params)],
        f"- detectors (forward): {json.dumps(params.scoring.forward)}",
        f"- detectors (gradient): {json.dumps(params.scoring.gradient)}; probe: {params.scoring.probe.model_dump()}",
        f"- fusion: {params.scoring.fusion.model_dump()}",
        f"- bootstrap: {json.dumps(metrics['bootstrap'])}",
        f"- seed: {params.seed}; samples per set: {json.dumps(metrics.get('samples', {}))}",
        "",
        "```json",
        json.dumps(run, indent=2),
        "```",
        "",
        *provenance_section(metrics.get("provenance")),
        "## Plots",
        "",
        "![score histograms](plots/score_histograms.png)",
        "",
        *(["ROC curves, each gradient row (solid) beside its twin without the gradient (dashed):", "",
            "![ROC curves](plots/roc.png)", ""] if deltas else []),
        "![spectrum](plots/spectrum.png)",
        "",
    ]
    return "\n".join(text)
