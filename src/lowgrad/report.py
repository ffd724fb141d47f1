"""Markdown report and PNG plots (no CDN, opens anywhere)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from lowgrad.config import Params  # noqa: E402


def _row_order(methods: list[str]) -> list[str]:
    """Each base method's forward row, then its ``grad_`` row; gradient-only methods, then fused rows last."""
    fused = [m for m in methods if m.startswith("fused_")]
    bases = [m for m in methods if not m.startswith(("grad_", "fused_"))]
    bases += [m[5:] for m in methods if m.startswith("grad_") and m[5:] not in bases]
    order = []
    for base in bases:
        order += [m for m in (base, f"grad_{base}") if m in methods]
    return order + fused


def _gradient_column(method: str) -> tuple[str, str]:
    if method.startswith("fused_"):
        return method.removeprefix("fused_"), "fused"
    if method.startswith("grad_"):
        return method.removeprefix("grad_"), "yes"
    return method, "no"


def results_table(metrics: dict[str, Any], columns: list[str]) -> str:
    """Rows = methods (without / with low-dim gradient), columns = FPR95 / AUROC per OOD set and the mean.
    The best value of each column is bold (lowest FPR95, highest AUROC)."""
    methods = metrics["methods"]
    rows = _row_order(list(methods))
    header = ["method", "gradient"] + [f"{c} {m}" for c in columns for m in ("FPR95↓", "AUROC↑")]
    best = {}
    for c in columns:
        best[(c, "fpr95")] = min(methods[r][c]["fpr95"] for r in rows)
        best[(c, "auroc")] = max(methods[r][c]["auroc"] for r in rows)
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for r in rows:
        cells = list(_gradient_column(r))
        for c in columns:
            for m in ("fpr95", "auroc"):
                v = methods[r][c][m]
                text = f"{v:.2f}"
                cells.append(f"**{text}**" if np.isclose(v, best[(c, m)]) else text)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _plot_histograms(scores: dict[str, np.ndarray], methods: list[str], ood: list[str], path: Path) -> None:
    fig, axes = plt.subplots(len(methods), len(ood), figsize=(3.2 * len(ood), 2.2 * len(methods)), squeeze=False)
    for i, m in enumerate(methods):
        for j, o in enumerate(ood):
            ax = axes[i, j]
            id_s, ood_s = scores[f"{m}/id_test"], scores[f"{m}/{o}"]
            bins = np.histogram_bin_edges(np.concatenate([id_s, ood_s]), bins=40)
            ax.hist(id_s, bins=bins, alpha=0.6, density=True, label="ID test")
            ax.hist(ood_s, bins=bins, alpha=0.6, density=True, label=o)
            ax.set_title(f"{m} vs {o}", fontsize=8)
            ax.tick_params(labelsize=6)
            if i == 0 and j == 0:
                ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _roc_points(id_s: np.ndarray, ood_s: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    thresholds = np.unique(np.concatenate([id_s, ood_s]))[::-1]
    tpr = np.r_[0.0, [(id_s >= t).mean() for t in thresholds]]
    fpr = np.r_[0.0, [(ood_s >= t).mean() for t in thresholds]]
    return fpr, tpr


def _plot_roc(scores: dict[str, np.ndarray], methods: list[str], ood: list[str], path: Path) -> None:
    fig, axes = plt.subplots(1, len(ood), figsize=(4 * len(ood), 3.6), squeeze=False)
    for j, o in enumerate(ood):
        ax = axes[0, j]
        for m in methods:
            fpr, tpr = _roc_points(scores[f"{m}/id_test"], scores[f"{m}/{o}"])
            ax.plot(fpr, tpr, lw=1.2, ls="-" if m.startswith("grad_") else "--", label=m)
        ax.plot([0, 1], [0, 1], color="grey", lw=0.5)
        ax.set(title=f"ROC, OOD = {o}", xlabel="FPR (OOD kept as ID)", ylabel="TPR (ID kept)")
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
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


def _plot_k_sweep(sweep: dict[str, dict[str, dict[str, float]]], full_k: int, full: dict[str, Any], path: Path) -> None:
    """Mean FPR95 over the OOD sets against k, one line per gradient detector (the full-k point from the main
    table), with each detector's forward counterpart as a dashed horizontal line."""
    ks = sorted({int(k) for k in sweep} | {full_k})
    detectors = sorted({d for rows in sweep.values() for d in rows})
    fig, ax = plt.subplots(figsize=(6, 4))
    for i, det in enumerate(detectors):
        values = [full[det]["mean"]["fpr95"] if k == full_k else sweep[str(k)][det]["fpr95"] for k in ks]
        color = f"C{i % 10}"
        ax.plot(ks, values, marker="o", color=color, label=det)
        base = det.removeprefix("grad_")
        if base in full:
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


def write_report(
    params: Params,
    metrics: dict[str, Any],
    scores: dict[str, np.ndarray],
    explained_variance_ratio: np.ndarray,
    run: dict[str, Any],
    hashes: dict[str, str],
    report_path: str,
    plots_dir: str,
) -> None:
    """Write ``report.md`` and its plots; the previous report is replaced only once the new one is complete."""
    ood = params.data.ood_names
    methods = _row_order(list(metrics["methods"]))
    plots = Path(plots_dir)
    staging = plots.with_name(plots.name + ".tmp")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    _plot_histograms(scores, methods, ood, staging / "score_histograms.png")
    _plot_roc(scores, methods, ood, staging / "roc.png")
    _plot_spectrum(explained_variance_ratio, staging / "spectrum.png")
    sweep = metrics.get("k_sweep") or {}
    if sweep:
        _plot_k_sweep(sweep, params.subspace.k, metrics["methods"], staging / "fpr95_vs_k.png")

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
        "## Results",
        "",
        results_table(metrics, [*ood, "mean"]),
        "",
        "gradient = yes: the detector on the low-dimensional gradient G_low (probe-based scores use the linear "
        "probe trained on the bank's G_low); fused: forward + gradient scores, each standardised on held-out ID "
        "data (see run settings). Best value per column in bold. AUPR-In, AUPR-Out and FPR95 with OOD as the "
        "positive class (OpenOOD's convention) are in `report/metrics.json`.",
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
        f"- detectors (forward): {json.dumps(params.scoring.forward)}",
        f"- detectors (gradient): {json.dumps(params.scoring.gradient)}; probe: {params.scoring.probe.model_dump()}",
        f"- fusion: {params.scoring.fusion.model_dump()}",
        f"- seed: {params.seed}; samples per set: {json.dumps(metrics.get('samples', {}))}",
        "",
        "```json",
        json.dumps(run, indent=2),
        "```",
        "",
        "## Artifact hashes (sha256, first 12 hex digits)",
        "",
        *[f"- `{p}`: `{h}`" for p, h in hashes.items()],
        "",
        "## Plots",
        "",
        "![score histograms](plots/score_histograms.png)",
        "",
        "![ROC curves](plots/roc.png)",
        "",
        "![spectrum](plots/spectrum.png)",
        "",
    ]
    shutil.rmtree(plots, ignore_errors=True)
    staging.replace(plots)
    tmp = Path(report_path + ".tmp")
    tmp.write_text("\n".join(text))
    tmp.replace(report_path)
