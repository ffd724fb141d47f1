"""The ``lowgrad`` command: score new images with a finished run's saved detector.

    lowgrad score --run DIR --images PATH [--rows knn,grad_residual] --out FILE.csv|FILE.json

``PATH``: an ``.npz`` (``images`` uint8 N x H x W x C, or the JPEG layout), a folder of images, or an ImageFolder
tree. The CSV has one line per image (its name, then each row's score); the JSON holds, per row, the scores, the
threshold at 95 % ID TPR and which images it flags as OOD. Errors are one ``error:`` line (exit status 1).
"""

from __future__ import annotations

import argparse
import csv
import json
import logging
from pathlib import Path

from lowgrad.errors import LowgradError, exit_on_user_error


def parse_rows(text: str | None) -> list[str] | None:
    """``--rows knn,grad_residual`` as a list (None: every row)."""
    return None if text is None else [r.strip() for r in text.split(",") if r.strip()]


def _write(out: Path, names: list[str], scores: dict, thresholds: dict[str, float]) -> None:
    from lowgrad.paths import atomic_path, write_json
    from lowgrad.saved_detector import flagged

    if out.suffix == ".json":
        write_json(out, {
            "images": names,
            "rows": {row: {"threshold": thresholds[row], "scores": s.tolist(), "flagged": flagged(s, thresholds[row]).tolist()}
                     for row, s in scores.items()},
        })
        return
    with atomic_path(out) as tmp, open(tmp, "w", newline="") as fh:
        writer = csv.writer(fh)
        writer.writerow(["image", *scores])
        for i, name in enumerate(names):
            writer.writerow([name, *(repr(float(s[i])) for s in scores.values())])


def score_command(args: argparse.Namespace) -> None:
    from lowgrad.api import OODDetector
    from lowgrad.data import read_images

    out = Path(args.out)
    if out.suffix not in (".csv", ".json"):
        raise LowgradError(f"--out {out}: write a .csv or a .json file")
    if not out.parent.is_dir():
        raise LowgradError(f"--out {out}: the folder {out.parent} does not exist")
    if out.is_dir():
        raise LowgradError(f"--out {out}: a folder of that name exists; name a file (FILE.csv or FILE.json)")
    detector = OODDetector.load(args.run, device=args.device)
    rows = detector.check_rows(parse_rows(args.rows))
    images, names = read_images(args.images, detector.params.data)
    logging.getLogger("lowgrad.cli").info("scoring %d images from %s with %s", len(images), args.images, args.run)
    scores = detector.score(images, rows=rows, progress=True)
    _write(out, names, scores, detector.thresholds)
    print(f"{out}: {len(names)} images x {len(scores)} rows ({', '.join(scores)})")


def build_parser() -> argparse.ArgumentParser:
    """The ``lowgrad`` command line (``tests/test_docs_commands.py`` parses the documented ones)."""
    parser = argparse.ArgumentParser(prog="lowgrad", description=__doc__.split("\n\n")[0], allow_abbrev=False)
    commands = parser.add_subparsers(dest="command", required=True)
    score = commands.add_parser("score", help="score images with a run's saved detector (artifacts/detector)",
                                allow_abbrev=False)
    score.add_argument("--run", required=True, help="the project directory of a finished run")
    score.add_argument("--images", required=True, help="an .npz, a folder of images or an ImageFolder tree")
    score.add_argument("--rows", help="comma-separated rows to score (default: every row of the report)")
    score.add_argument("--out", required=True, help="FILE.csv (an image per line) or FILE.json")
    score.add_argument("--device", default="cpu", choices=["cpu", "cuda", "auto"])
    return parser


def main(argv: list[str] | None = None) -> None:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    with exit_on_user_error(interrupted="nothing was written"):
        score_command(args)


if __name__ == "__main__":
    main()
