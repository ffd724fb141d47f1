"""One pipeline run per checkout: a whole-run lock for the flow (and its scheduled deployment runs).

Two flows in one checkout would rewrite each other's ``params.yaml`` and mix their artifacts. The lock is an
advisory ``flock`` on ``.dvc/tmp/lowgrad-run.lock`` (DVC ignores ``.dvc/tmp``); the kernel releases it when
the holding process dies, however it dies, so a lock is never left held by a dead process. The file records
the holder (PID, start time, command) for the refusal message; a record left behind by a process that died
without releasing is reported as taken over.

A DVC command started by hand (``dvc repro``, ``dvc exp run``) does not take this lock, but DVC's own: a flow
started while one runs refuses at once, naming it (:func:`running_dvc_command`); a ``dvc repro`` started while
the flow runs is refused by DVC's lock.
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


def running_dvc_command(root: str | Path) -> str | None:
    """``"PID 1234: dvc repro"`` when a live DVC process holds this checkout (its repo lock ``.dvc/tmp/lock`` or a
    path in ``.dvc/tmp/rwlock``), else None. Entries of dead processes, which DVC itself clears, do not count."""
    import psutil
    import zc.lockfile

    tmp = Path(root) / ".dvc" / "tmp"
    try:
        rwlock = json.loads((tmp / "rwlock").read_text())
    except (OSError, ValueError):
        rwlock = {}
    holders = [*rwlock.get("write", {}).values(), *(i for infos in rwlock.get("read", {}).values() for i in infos)]
    for info in holders:
        if isinstance(info, dict) and psutil.pid_exists(int(info.get("pid", 0))) and int(info["pid"]) != os.getpid():
            return f"PID {info['pid']}: {info.get('cmd', 'dvc')}"
    if (tmp / "lock").exists():
        try:
            zc.lockfile.LockFile(str(tmp / "lock")).close()  # free: taken and released at once
        except zc.lockfile.LockError:
            pid = (tmp / "lock").read_text().strip().split(" ")[0] or "?"
            return f"PID {pid}: {_command_line(pid)}"
    return None


def _command_line(pid: str) -> str:
    """The DVC command a live process runs (``dvc repro``), from its command line; "a dvc command" if unreadable."""
    import psutil

    try:
        argv = psutil.Process(int(pid)).cmdline()
    except (ValueError, psutil.Error):
        return "a dvc command"
    words = [a for a in argv if not a.startswith("-")]
    for i, word in enumerate(words):
        if word == "dvc" or word.endswith("/dvc"):
            return " ".join(["dvc", *words[i + 1 : i + 2]])
    return " ".join(argv)[:80] or "a dvc command"


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
        self.root = Path(root)
        self.path = self.root / LOCK_FILE
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
        dvc_command = running_dvc_command(self.root)
        if dvc_command is not None and not self.wait:
            fcntl.flock(fd, fcntl.LOCK_UN)
            os.close(fd)
            raise RunLockedError(f"a DVC command is running in this checkout ({dvc_command}); wait for it to finish, "
                                 "then rerun (or pass --wait)")
        while dvc_command is not None:
            log.warning("waiting for the DVC command in this checkout to finish (%s)", dvc_command)
            time.sleep(2)
            dvc_command = running_dvc_command(self.root)
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
