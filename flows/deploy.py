"""Serve the pipeline flow as a scheduled Prefect deployment (``flow.serve``).

Schedules only fire on a real Prefect server; the temporary API that ``python -m flows.pipeline`` starts
never runs them. So this refuses to start unless ``PREFECT_API_URL`` points at a reachable server::

    prefect server start --host 127.0.0.1 --port 4200 &
    export PREFECT_API_URL=http://127.0.0.1:4200/api
    python -m flows.deploy --cron "0 3 * * *" --push            # serves until stopped (Ctrl-C)
    prefect deployment run 'lowgrad-pipeline/lowgrad-scheduled'   # an extra run now, from any shell
"""

from __future__ import annotations

import argparse
import json
import os
import urllib.request

from lowgrad.errors import LowgradError, exit_on_user_error
from lowgrad.paths import PARAMS

os.environ.setdefault("PREFECT_SERVER_ANALYTICS_ENABLED", "false")

DEPLOYMENT = "lowgrad-scheduled"


def require_server() -> str:
    """The API URL of a running Prefect server; a :class:`LowgradError` saying what to do when there is none."""
    from prefect.settings import PREFECT_API_URL

    url = PREFECT_API_URL.value()
    if not url:
        raise LowgradError(
            "schedules need a running Prefect server, and PREFECT_API_URL is not set: start one with "
            "'prefect server start --host 127.0.0.1' and export PREFECT_API_URL=http://127.0.0.1:4200/api"
        )
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/health", timeout=5) as resp:
            if resp.status != 200:
                raise OSError(f"HTTP {resp.status}")
    except OSError as err:
        raise LowgradError(f"no Prefect server answers at {url} ({err}); start it with 'prefect server start'") from None
    return url


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description="Serve the lowgrad pipeline on a cron schedule.")
    parser.add_argument("--cron", default="0 3 * * *", help="cron schedule (default: daily at 03:00)")
    parser.add_argument("--params-file", default=PARAMS)
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE")
    parser.add_argument("--root", default=None, help="project directory (default: this checkout)")
    parser.add_argument("--push", action="store_true", help="dvc push --run-cache after each run")
    parser.add_argument("--name", default=DEPLOYMENT)
    args = parser.parse_args(argv)
    with exit_on_user_error():
        url = require_server()

        from flows.params_file import parse_overrides
        from flows.pipeline import pipeline

        parameters = {
            "params_file": args.params_file,
            "overrides": parse_overrides(args.set) or None,
            "root": args.root,
            "push": args.push,
        }
    print(f"serving deployment 'lowgrad-pipeline/{args.name}' on {url}, cron '{args.cron}', parameters {json.dumps(parameters)}")
    pipeline.serve(name=args.name, cron=args.cron, parameters=parameters)


if __name__ == "__main__":
    main()
