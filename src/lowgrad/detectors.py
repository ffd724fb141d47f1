"""OOD detectors in scikit-learn style: ``fit(X, y)`` on the ID bank, ``score_samples(X)`` with
higher = more in-distribution (METHOD.md sections 5-6).

Each detector names the input it reads (``logits`` or ``features``); on the gradient side every detector
reads ``G_low``. The registry maps ``params.yaml`` names to classes.
"""

from __future__ import annotations

import inspect
from typing import Any, ClassVar

import numpy as np
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

from lowgrad.errors import ConfigError


class Detector:
    """Base class. ``input`` is ``"logits"`` or ``"features"`` (penultimate features, or ``G_low``)."""

    input: ClassVar[str] = "features"

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "Detector":
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


class MSP(Detector):
    """Maximum softmax probability (Hendrycks & Gimpel 2017)."""

    input = "logits"

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(X, dtype=np.float64), axis=1).max(axis=1)


class Energy(Detector):
    """Negative free energy ``T * logsumexp(logits / T)`` (Liu et al. 2020)."""

    input = "logits"

    def __init__(self, temperature: float = 1.0) -> None:
        self.temperature = temperature

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        t = self.temperature
        return t * logsumexp(np.asarray(X, dtype=np.float64) / t, axis=1)


class KNN(Detector):
    """Minus the distance to the ``k``-th nearest L2-normalised bank row (Sun et al. 2022)."""

    def __init__(self, k: int = 5) -> None:
        if k < 1:
            raise ValueError("k must be >= 1")
        self.k = k

    @staticmethod
    def _normalise(X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "KNN":
        if self.k > len(X):
            raise ValueError(f"KNN k={self.k} exceeds the bank size {len(X)}")
        self.index_ = NearestNeighbors(n_neighbors=self.k, algorithm="brute").fit(self._normalise(X))
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        dist, _ = self.index_.kneighbors(self._normalise(X))
        return -dist[:, -1]


class Mahalanobis(Detector):
    """Class means plus one tied covariance; score = max_c -(u - mu_c)^T S^-1 (u - mu_c) (Lee et al. 2018)."""

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "Mahalanobis":
        if y is None:
            raise ValueError("Mahalanobis needs the bank labels")
        X = np.asarray(X, dtype=np.float64)
        self.classes_ = np.unique(y)
        self.means_ = np.stack([X[y == c].mean(axis=0) for c in self.classes_])
        centred = X - self.means_[np.searchsorted(self.classes_, y)]
        self.precision_ = EmpiricalCovariance(assume_centered=True).fit(centred).precision_
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        best = np.full(len(X), np.inf)
        for mean in self.means_:  # one class at a time keeps memory at N x D
            diff = X - mean
            best = np.minimum(best, np.einsum("nd,nd->n", diff @ self.precision_, diff))
        return -best


FORWARD_DETECTORS: dict[str, type[Detector]] = {"msp": MSP, "energy": Energy, "knn": KNN, "mahalanobis": Mahalanobis}
GRADIENT_DETECTORS: dict[str, type[Detector]] = {"knn": KNN, "mahalanobis": Mahalanobis}


def check_detector_config(config: dict[str, dict[str, Any]], where: str) -> None:
    """Unknown detector names or hyper-parameters are configuration errors."""
    registry = GRADIENT_DETECTORS if where.endswith("gradient") else FORWARD_DETECTORS
    for name, kwargs in config.items():
        if name not in registry:
            raise ValueError(f"unknown detector '{name}' in {where} (known: {sorted(registry)})")
        allowed = set(inspect.signature(registry[name].__init__).parameters) - {"self"}
        unknown = set(kwargs or {}) - allowed
        if unknown:
            raise ValueError(f"{where}.{name}: unknown option(s) {sorted(unknown)} (allowed: {sorted(allowed)})")


def make_detector(name: str, kwargs: dict[str, Any] | None, gradient: bool) -> Detector:
    registry = GRADIENT_DETECTORS if gradient else FORWARD_DETECTORS
    if name not in registry:
        raise ConfigError(f"unknown detector '{name}'")
    return registry[name](**(kwargs or {}))
