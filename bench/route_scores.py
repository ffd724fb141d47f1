"""Every route's scores on the embedded default's arrays, for checking that a refactor changes no number on any route
(the embedded default itself runs the exact route only).

    python -m bench.route_scores --out /tmp/before.npz                        # on the commit before
    python -m bench.route_scores --out /tmp/after.npz --compare /tmp/before.npz   # after: exit 1 if any array differs

The estimator (``lowgrad.LowGrad.from_params`` on ``params.yaml`` with the finished run's model) is fitted on
``id_train`` with ``id_test`` as its test set, once per route with small sketch settings, and scores 200 images of
``digits_6to9``; every row's scores are saved as ``<route>/<row>``. ``--compare`` reports the arrays that are not
bitwise equal.
"""

from __future__ import annotations

import argparse
import copy
import sys
from pathlib import Path

import numpy as np

from lowgrad import paths
from lowgrad.config import read_raw
from lowgrad.route import ROUTES

ROOT = Path(__file__).resolve().parents[1]
SMALL = {"sketch_rank": 4, "sketch_dim": 512, "factor_samples": 64}  # the check is of equality, not of quality


def route_change(route) -> dict[str, dict]:
    """The params sections that switch the embedded default to ``route`` (a class of :data:`lowgrad.route.ROUTES`),
    with the small settings it reads."""
    switch = route.switch()
    small = {k: v for k, v in SMALL.items() if k in route.reads or (k == "factor_samples" and route.is_sketch)}
    return {"gradient": {"sketch": switch["gradient.sketch"], **small}, "subspace": {"method": switch["subspace.method"]}}


def route_scores(root: Path = ROOT, n_scored: int = 200) -> dict[str, np.ndarray]:
    import torch

    from lowgrad import LowGrad
    from lowgrad.data import load_image_set

    torch.set_num_threads(1)
    sets = {name: load_image_set(root / paths.PREPARED.format(name=name)) for name in ("id_train", "id_test", "digits_6to9")}
    base = read_raw(root / paths.PARAMS)
    out = {}
    for route, cls in ROUTES.items():
        raw = copy.deepcopy(base)
        for section, values in route_change(cls).items():
            raw[section] = {**raw[section], **values}
        raw["scoring"]["bootstrap"] = {"replicates": 100}
        det = LowGrad.from_params(raw).fit(sets["id_train"].images, sets["id_train"].labels,
                                           test=(sets["id_test"].images, sets["id_test"].labels))
        for row, scores in det.score_samples(sets["digits_6to9"].images[:n_scored]).items():
            out[f"{route}/{row}"] = np.asarray(scores)
        print(f"{route}: {sum(k.startswith(route + '/') for k in out)} rows", flush=True)
    return out


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, type=Path, help="where the scores go (.npz)")
    parser.add_argument("--compare", type=Path, help="an earlier --out to compare with (bitwise)")
    args = parser.parse_args(argv)
    scores = route_scores()
    np.savez(args.out, **scores)
    if args.compare:
        with np.load(args.compare) as before:
            missing = sorted(set(before.files) ^ set(scores))
            differ = [k for k in sorted(set(before.files) & set(scores)) if not np.array_equal(before[k], scores[k])]
        print(f"{len(scores)} arrays; not in both: {missing or 'none'}; not bitwise equal: {differ or 'none'}")
        if missing or differ:
            sys.exit(1)


if __name__ == "__main__":
    main()
