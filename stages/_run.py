"""Shared entry point: parse arguments, load params, run one pipeline function, one-line errors."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable

from lowgrad.config import load_params
from lowgrad.errors import LowgradError


def run_stage(func: Callable, description: str, per_dataset: bool = False) -> None:
    parser = argparse.ArgumentParser(description=description)
    if per_dataset:
        parser.add_argument("dataset", help="dataset name from params.yaml (data.datasets)")
    parser.add_argument("--params", default="params.yaml", help="params file (default: params.yaml)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s: %(message)s")
    try:
        params = load_params(args.params)
        if per_dataset:
            if args.dataset not in params.data.datasets:
                raise LowgradError(f"unknown dataset '{args.dataset}' (data.datasets has {sorted(params.data.datasets)})")
            func(params, args.dataset)
        else:
            func(params)
    except LowgradError as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
