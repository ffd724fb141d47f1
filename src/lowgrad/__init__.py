"""lowgrad: OOD detection from low-dimensional per-sample gradients."""

__version__ = "0.1.0"


def __getattr__(name: str):
    """``lowgrad.OODDetector``, imported on first use (the stages import this package and never need torch here)."""
    if name == "OODDetector":
        from lowgrad.api import OODDetector

        return OODDetector
    raise AttributeError(f"module 'lowgrad' has no attribute {name!r}")
