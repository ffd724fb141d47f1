"""Shared entry point: parse arguments, load params, run one pipeline function, one-line errors (lowgrad.errors)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path

from lowgrad import timing
from lowgrad.config import load_params
from lowgrad.errors import LowgradError, exit_on_user_error
from lowgrad.paths import PARAMS


def _stage_name() -> str:
    """DVC's stage name: the module run by ``python -m stages.<name>``."""
    spec = getattr(sys.modules["__main__"], "__spec__", None)
    return spec.name.rsplit(".", 1)[-1] if spec is not None else Path(sys.argv[0]).stem


def run_stage(func: Callable, description: str, per_dataset: bool = False, record_timing: bool = True,
              scoring: bool = False) -> None:
    """``record_timing``: write ``artifacts/timings/<stage>.json`` (score and report put theirs in their outputs);
    ``scoring``: validate the ``scoring`` section's schema too (only the stages that read it load that code)."""
    parser = argparse.ArgumentParser(description=description)
    if per_dataset:
        parser.add_argument("dataset", help="dataset name from params.yaml (data.datasets)")
    parser.add_argument("--params", default=PARAMS, help=f"params file (default: {PARAMS})")
    args = parser.parse_args()
    timing.start()
    stage = _stage_name()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    with exit_on_user_error(access_advice=" (check that it exists, is writable and the disk has room, then rerun)"):
        params = load_params(args.params, scoring=scoring)
        if per_dataset:
            if args.dataset not in params.data.datasets:
                raise LowgradError(f"unknown dataset '{args.dataset}' (data.datasets has {sorted(params.data.datasets)})")
            func(params, args.dataset)
        else:
            func(params)
        if record_timing:
            timing.record(f"{stage}@{args.dataset}" if per_dataset else stage)
