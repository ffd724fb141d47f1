"""lowgrad: OOD detection from low-dimensional per-sample gradients."""

import os

# torch and scikit-learn each load their own libgomp, whose threads spin for a while after each parallel region: a
# pipeline that alternates between them and NumPy (scoring, above all) has one library's idle threads taking the
# cores the next one needs. Passive waiting ends that (docs/benchmarks.md, "Thread pools"). A libgomp reads the
# variable when it loads, so this reaches torch's only when lowgrad is imported first; a value already set is kept
# (and, like any variable, passes to child processes).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def __getattr__(name: str):
    """``lowgrad.OODDetector`` and ``lowgrad.LowGrad``, imported on first use (the stages import this package and
    never need torch here)."""
    if name == "OODDetector":
        from lowgrad.api import OODDetector

        return OODDetector
    if name == "LowGrad":
        from lowgrad.estimator import LowGrad

        return LowGrad
    raise AttributeError(f"module 'lowgrad' has no attribute {name!r}")
