"""Copy ../shared's image sets in pieces small enough to carry to a GPU machine, and join them there.

    python -m bench.subset_shared split --out DIR --parts 20000 30000 --eval 2000
    python -m bench.subset_shared join DIR/part0 DIR/part1 --out DIR/shared/data

``split`` writes the CIFAR-10 train file as disjoint random parts (``part<i>/cifar10_train_jpeg.npz``, JPEG bytes
unchanged), and random subsets of ``--eval`` images of the ID test and OOD sets into ``eval/`` (decoded sets
compressed losslessly; Textures whole). ``join`` concatenates the parts into one file with the shared layout, so
``LOWGRAD_SHARED`` / ``--set data.datasets.id_train.path=`` can point at it. Pixels and labels are the shared
files' own; only the selection of images differs.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

import numpy as np

SHARED = Path(__file__).resolve().parents[2] / "shared"
TRAIN = "cifar10_train_jpeg.npz"


def _write_jpeg_npz(dest: Path, jpeg: np.ndarray, sizes: np.ndarray, labels: np.ndarray) -> None:
    """The shared encoded layout: concatenated JPEG bytes, N+1 offsets, labels."""
    dest.parent.mkdir(parents=True, exist_ok=True)
    np.savez(dest, jpeg=jpeg, offsets=np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64), labels=labels)


def _jpeg_subset(src: Path, rows: np.ndarray, dest: Path) -> None:
    with np.load(src) as z:
        jpeg, offsets, labels = z["jpeg"], z["offsets"], z["labels"]
    pieces = [jpeg[offsets[i] : offsets[i + 1]] for i in rows]
    _write_jpeg_npz(dest, np.concatenate(pieces), np.array([len(p) for p in pieces]), labels[rows])


def split(shared: Path, out: Path, parts: list[int], n_eval: int, seed: int) -> None:
    rng = np.random.default_rng(seed)
    with np.load(shared / "data" / TRAIN) as z:
        n_train = len(z["labels"])
    order = rng.permutation(n_train)
    if sum(parts) > n_train:
        raise SystemExit(f"--parts add up to {sum(parts)}, the train file has {n_train}")
    start = 0
    for i, size in enumerate(parts):
        _jpeg_subset(shared / "data" / TRAIN, np.sort(order[start : start + size]), out / f"part{i}" / TRAIN)
        start += size
    for name in ("cifar10_test_jpeg.npz", "tinyimagenet_test.npz", "textures10.npz", "fashionmnist_test.npz"):
        src = shared / "data" / name
        with np.load(src) as z:
            n = len(z["labels"])
            rows = np.sort(rng.permutation(n)[:n_eval]) if n > n_eval else np.arange(n)
            if "jpeg" in z.files:
                _jpeg_subset(src, rows, out / "eval" / name)
            else:
                (out / "eval").mkdir(parents=True, exist_ok=True)
                np.savez_compressed(out / "eval" / name, images=z["images"][rows], labels=z["labels"][rows])


def join(parts: list[Path], out: Path) -> None:
    loaded = [np.load(p / TRAIN) for p in parts]
    _write_jpeg_npz(
        out / TRAIN, np.concatenate([z["jpeg"] for z in loaded]),
        np.concatenate([np.diff(z["offsets"]) for z in loaded]), np.concatenate([z["labels"] for z in loaded]),
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    s = sub.add_parser("split")
    s.add_argument("--shared", type=Path, default=SHARED)
    s.add_argument("--out", type=Path, required=True)
    s.add_argument("--parts", type=int, nargs="+", required=True, help="train images per part")
    s.add_argument("--eval", type=int, default=2000, help="images per ID test / OOD subset")
    s.add_argument("--seed", type=int, default=0)
    j = sub.add_parser("join")
    j.add_argument("parts", type=Path, nargs="+")
    j.add_argument("--out", type=Path, required=True)
    j.add_argument("--with-eval", type=Path, default=None, help="also copy this eval/ folder's files into --out")
    args = parser.parse_args()
    if args.command == "split":
        split(args.shared, args.out, args.parts, args.eval, args.seed)
    else:
        join(args.parts, args.out)
        if args.with_eval is not None:
            for f in args.with_eval.glob("*.npz"):
                shutil.copy(f, args.out / f.name)


if __name__ == "__main__":
    main()
