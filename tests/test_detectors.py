"""Detectors: hand-computed scores, independent references and sign checks."""

from __future__ import annotations

import numpy as np
import pytest
from scipy.spatial.distance import cdist

from lowgrad.detectors import KNN, MSP, Energy, Mahalanobis


def test_msp_and_energy_hand_computed():
    logits = np.array([[0.0, np.log(3.0)], [1000.0, 1000.0]])
    np.testing.assert_allclose(MSP().score_samples(logits), [0.75, 0.5])
    np.testing.assert_allclose(Energy().score_samples(logits), [np.log(4.0), 1000.0 + np.log(2.0)])  # stable
    np.testing.assert_allclose(Energy(temperature=2.0).score_samples(logits[:1]), [2 * np.log(1 + np.sqrt(3))])


def test_knn_matches_brute_force_normalised_distance():
    rng = np.random.default_rng(0)
    bank, query = rng.standard_normal((50, 4)), rng.standard_normal((7, 4))
    nb = bank / np.linalg.norm(bank, axis=1, keepdims=True)
    nq = query / np.linalg.norm(query, axis=1, keepdims=True)
    expected = -np.sort(cdist(nq, nb), axis=1)[:, 4]
    np.testing.assert_allclose(KNN(k=5).fit(bank).score_samples(query), expected, rtol=1e-10)


def test_mahalanobis_matches_direct_formula():
    rng = np.random.default_rng(1)
    x = rng.standard_normal((60, 3))
    y = np.repeat([0, 1, 2], 20)
    x[y == 1] += 3
    q = rng.standard_normal((5, 3))
    means = np.stack([x[y == c].mean(0) for c in range(3)])
    centred = x - means[y]
    prec = np.linalg.inv(centred.T @ centred / len(x))
    expected = np.max([-np.einsum("nd,de,ne->n", q - m, prec, q - m) for m in means], axis=0)
    np.testing.assert_allclose(Mahalanobis().fit(x, y).score_samples(q), expected, rtol=1e-8)


def test_gaussian_toy_optimal_ranking_and_sign():
    """ID ~ N(5 e1, I); far OOD ~ N(-5 e1, I) (opposite direction, so also far after L2 normalisation)."""
    rng = np.random.default_rng(2)
    shift = np.r_[5.0, np.zeros(4)]
    bank = rng.standard_normal((400, 5)) + shift
    y = (bank[:, 1] > 0).astype(int)
    id_q, ood_q = rng.standard_normal((100, 5)) + shift, rng.standard_normal((100, 5)) - shift
    for det in (KNN(k=5).fit(bank), Mahalanobis().fit(bank, y)):
        assert det.score_samples(id_q).min() > det.score_samples(ood_q).max(), type(det).__name__


def test_knn_k_larger_than_bank():
    with pytest.raises(ValueError, match="exceeds the bank size"):
        KNN(k=10).fit(np.ones((3, 2)))
