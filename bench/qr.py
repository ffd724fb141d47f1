"""The matrix-free route's QR at the paper's size on the CPU (issue 40): ``lowgrad.matrix_free.tall_qr`` of a
``P x w`` float32 matrix, ResNet-18's P = 11,173,962 and w = k + oversample = 220 by default (9.8 GB), with its time,
the process's peak memory against the matrix's own size, and its accuracy.

    python -m bench.qr --out bench/results/qr_resnet18_cpu.json            # about 10 GB of memory, minutes
    python -m bench.qr --rows 200000 --out /tmp/qr_small.json              # a quick look

The matrix is seeded Gaussian, generated in place block by block. Accuracy: ``||Q^T Q - I||_max`` (one more blocked
float64 Gram pass) and, on 4,096 rows kept before the factorisation, ``max |Q R - A| / max |A|``. A same-run baseline:
``numpy.linalg.qr`` and ``tall_qr`` on a 400,000-row slice (NumPy's QR needs the whole matrix and its copies in
memory, which the full size would not leave).
"""

from __future__ import annotations

import argparse
import json
import platform
import resource
import time
from pathlib import Path

import numpy as np
import torch

from lowgrad.matrix_free import QR_BLOCK_ROWS, blocked_gram, tall_qr

RESNET18_P = 11_173_962


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024**2  # Linux: kilobytes


def gaussian(rows: int, cols: int, seed: int) -> torch.Tensor:
    gen = torch.Generator().manual_seed(seed)
    a = torch.empty(rows, cols, dtype=torch.float32)
    for start in range(0, rows, QR_BLOCK_ROWS):
        a[start : start + QR_BLOCK_ROWS] = torch.randn(min(QR_BLOCK_ROWS, rows - start), cols, generator=gen)
    return a


def orthogonality(q: torch.Tensor) -> float:
    gram = blocked_gram(q)
    return float((gram - torch.eye(q.shape[1], dtype=torch.float64)).abs().max())


def run(rows: int, cols: int, seed: int = 0) -> dict:
    before = peak_rss_gb()
    a = gaussian(rows, cols, seed)
    kept_rows = torch.from_numpy(np.sort(np.random.default_rng(seed).choice(rows, size=min(4096, rows), replace=False)))
    kept = a[kept_rows].clone()
    generated = peak_rss_gb()
    start = time.perf_counter()
    q, r = tall_qr(a)
    seconds = time.perf_counter() - start
    residual = float(((q[kept_rows].double() @ r.double()) - kept.double()).abs().max() / kept.abs().max())
    return {"rows": rows, "cols": cols, "matrix_gb": rows * cols * 4 / 1024**3, "seconds": round(seconds, 2),
            "peak_rss_gb_before": round(before, 2), "peak_rss_gb_after_generation": round(generated, 2),
            "peak_rss_gb_after_qr": round(peak_rss_gb(), 2), "orthogonality_max_abs": orthogonality(q),
            "reconstruction_rel_max_abs": residual, "q_is_a": q.data_ptr() == a.data_ptr()}


def baseline(rows: int, cols: int, seed: int = 1) -> dict:
    """NumPy's QR and ``tall_qr`` on the same smaller matrix: times and the distance between their spans."""
    a = gaussian(rows, cols, seed)
    start = time.perf_counter()
    q_np, _ = np.linalg.qr(a.numpy().astype(np.float64))
    numpy_s = time.perf_counter() - start
    start = time.perf_counter()
    q, _ = tall_qr(a.clone())
    tall_s = time.perf_counter() - start
    projector_gap = float(np.abs(q_np @ (q_np.T @ q.double().numpy()) - q.double().numpy()).max())
    return {"rows": rows, "cols": cols, "numpy_qr_float64_s": round(numpy_s, 2), "tall_qr_s": round(tall_s, 2),
            "ratio_tall_over_numpy": round(tall_s / numpy_s, 3), "span_gap_max_abs": projector_gap}


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=RESNET18_P)
    parser.add_argument("--cols", type=int, default=220)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                          "torch": torch.__version__},
              "baseline_400k": baseline(400_000, args.cols)}
    print(json.dumps(result["baseline_400k"]), flush=True)
    result["full"] = run(args.rows, args.cols)
    print(json.dumps(result["full"]), flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")


if __name__ == "__main__":
    main()
