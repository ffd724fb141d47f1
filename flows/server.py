"""Prefect's temporary API server, started by the flows themselves with its output sent to a log file."""

from __future__ import annotations

import os
import sys
from pathlib import Path

from lowgrad.errors import LowgradError


def start_temporary_server() -> Path | None:
    """Start Prefect's temporary API server (when no ``PREFECT_API_URL`` is set) with its own output sent to
    ``$PREFECT_HOME/temporary-server.log``; returns that path, or None when a server is configured.

    Prefect starts the same server lazily and lets it write to our terminal; its shutdown can race with its own
    database sessions and print a sqlalchemy traceback under the user's one ``error:`` line. Started here
    first, the server is the singleton Prefect's client reuses, and it inherits the log file as stdout/stderr."""
    from prefect.server.api.server import SubprocessASGIServer
    from prefect.settings import PREFECT_API_URL, PREFECT_HOME

    if PREFECT_API_URL.value():
        return None
    home = Path(PREFECT_HOME.value()).expanduser()
    log_path = home / "temporary-server.log"
    try:
        home.mkdir(parents=True, exist_ok=True)
        log = open(log_path, "ab")  # appended: a second flow refused by the run lock must not truncate it
    except OSError as err:
        raise LowgradError(f"cannot write the temporary Prefect server's log {log_path} ({err.strerror or err}); "
                           "set PREFECT_HOME to a writable directory") from None
    with log:
        for stream in (sys.stdout, sys.stderr):
            if stream is not None:
                stream.flush()
        saved = [(fd, os.dup(fd)) for fd in (1, 2) if _is_open(fd)]
        try:
            for fd, _ in saved:
                os.dup2(log.fileno(), fd)
            SubprocessASGIServer().start()  # stopped by Prefect at exit, after its log and event workers drain
        except Exception as err:
            raise LowgradError(f"the temporary Prefect server did not start ({err}); its log: {log_path}") from err
        finally:
            for fd, copy in saved:
                os.dup2(copy, fd)
                os.close(copy)
    return log_path


def _is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False
