"""Exceptions that carry a message meant for the user, and the one way every entry point (the stages, the flows,
``lowgrad score``) prints them: one ``error:`` line on stderr and a non-zero exit status."""

from __future__ import annotations

import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NoReturn


class LowgradError(Exception):
    """Base class: a problem the user can fix (bad input, bad configuration)."""


class ConfigError(LowgradError):
    """Invalid or unknown configuration."""


class DataError(LowgradError):
    """A dataset is missing, unreadable or of the wrong shape."""


class CheckpointError(LowgradError):
    """A checkpoint is missing or does not fit the configured architecture."""


class StoreError(LowgradError):
    """A zarr store is incomplete, corrupt or was written with other settings."""


class GradientError(LowgradError):
    """Gradients cannot be computed as configured (too large, NaN, ...)."""


class DetectorError(LowgradError):
    """A saved detector is missing, damaged, or does not belong with the run's files."""


def fail(message: str, status: int = 1) -> NoReturn:
    """Print ``error: <message>`` on stderr and exit with ``status``."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(status)


@contextmanager
def exit_on_user_error(interrupted: str | None = None, access_advice: str = "") -> Iterator[None]:
    """The body of an entry point: a :class:`LowgradError` is its message on one line (exit status 1), an
    ``OSError`` (permissions, a full disk, a vanished file) names the path, followed by ``access_advice``; with
    ``interrupted``, Ctrl-C says what was kept (exit status 130), else it propagates."""
    try:
        yield
    except LowgradError as err:
        fail(str(err))
    except OSError as err:
        where = f" '{err.filename}'" if err.filename else ""
        fail(f"cannot access{where}: {err.strerror or err}{access_advice}")
    except KeyboardInterrupt as err:
        if interrupted is None:
            raise
        fail(f"interrupted{f' ({err})' if str(err) else ''}: {interrupted}", 130)
