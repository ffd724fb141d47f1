"""One pipeline run per checkout: a whole-run lock for the flow (and its scheduled deployment runs).

Two flows in one checkout would rewrite each other's ``params.yaml`` and mix their artifacts. The lock is an
advisory ``flock`` on ``.dvc/tmp/lowgrad-run.lock`` (DVC ignores ``.dvc/tmp``); the kernel releases it when
the holding process dies, however it dies, so a lock is never left held by a dead process. The file records
the holder (PID, start time, command) for the refusal message; a record left behind by a process that died
without releasing is reported as taken over.
"""

from __future__ import annotations

import fcntl
import json
import logging
import os
import sys
import time
from pathlib import Path
from typing import Any

from lowgrad.errors import LowgradError

log = logging.getLogger(__name__)

LOCK_FILE = ".dvc/tmp/lowgrad-run.lock"


class RunLockedError(LowgradError):
    """Another run holds this checkout's lock."""


def _holder(fd: int) -> dict[str, Any]:
    os.lseek(fd, 0, os.SEEK_SET)
    text = os.read(fd, 65536).decode(errors="replace").strip()
    try:
        return json.loads(text) if text else {}
    except json.JSONDecodeError:
        return {"pid": "?", "started": "?", "command": text[:80]}


class RunLock:
    """Context manager: ``with RunLock(root): ...`` holds the checkout's run lock; ``wait=True`` blocks until the
    running flow finishes instead of refusing at once."""

    def __init__(self, root: str | Path, wait: bool = False) -> None:
        self.path = Path(root) / LOCK_FILE
        self.wait = wait
        self._fd: int | None = None

    def acquire(self) -> "RunLock":
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = _holder(fd)
            who = f"PID {holder.get('pid', '?')}, started {holder.get('started', '?')}"
            if not self.wait:
                os.close(fd)
                raise RunLockedError(
                    f"another lowgrad run holds this checkout ({who}: {holder.get('command', '?')}); wait for it "
                    f"to finish or pass --wait (lock: {self.path})"
                ) from None
            log.warning("waiting for the lowgrad run in this checkout to finish (%s)", who)
            fcntl.flock(fd, fcntl.LOCK_EX)
        previous = _holder(fd)
        if previous:  # a record without a held lock: its process ended without releasing (killed)
            log.warning("taking over the run lock left by PID %s (started %s), which is no longer running",
                        previous.get("pid", "?"), previous.get("started", "?"))
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        record = {"pid": os.getpid(), "started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "command": " ".join(sys.argv)}
        os.write(fd, json.dumps(record).encode())
        os.fsync(fd)
        self._fd = fd
        return self

    def release(self) -> None:
        if self._fd is None:
            return
        os.ftruncate(self._fd, 0)  # an empty record = released cleanly
        fcntl.flock(self._fd, fcntl.LOCK_UN)
        os.close(self._fd)
        self._fd = None

    def __enter__(self) -> "RunLock":
        return self.acquire()

    def __exit__(self, *exc: object) -> None:
        self.release()
