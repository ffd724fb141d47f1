"""lowgrad: OOD detection from low-dimensional per-sample gradients."""

import os

# torch, scikit-learn and NumPy's OpenBLAS each keep a thread pool, and libgomp's threads spin for a while after
# each parallel region: a pipeline that alternates between them (scoring, above all) has each library's idle threads
# taking the cores from the next one. Passive waiting ends that (docs/benchmarks.md, "Thread pools"); it only takes
# effect when set before torch is imported, and a value already set is kept.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

__version__ = "0.1.0"


def __getattr__(name: str):
    """``lowgrad.OODDetector``, imported on first use (the stages import this package and never need torch here)."""
    if name == "OODDetector":
        from lowgrad.api import OODDetector

        return OODDetector
    raise AttributeError(f"module 'lowgrad' has no attribute {name!r}")
