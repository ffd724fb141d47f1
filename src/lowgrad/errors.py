"""Exceptions that carry a message meant for the user (printed as one line by the stages)."""


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
