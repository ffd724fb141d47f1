"""lowgrad: OOD detection from low-dimensional per-sample gradients."""

__version__ = "0.1.0"
