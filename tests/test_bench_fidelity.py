"""bench.fidelity's basis control: the orthogonal map it reads between two routes' G_low, and its direction."""

import numpy as np
from scipy.stats import ortho_group

from bench.fidelity import _rotation_onto


def test_rotation_onto_recovers_a_known_turn_in_its_direction():
    rng = np.random.default_rng(0)
    g = rng.standard_normal((200, 6))
    turn = ortho_group.rvs(6, random_state=1)
    rotation, error = _rotation_onto(g, g @ turn)
    np.testing.assert_allclose(rotation, turn, atol=1e-10)
    assert error < 1e-12
    # negative controls: the opposite direction is another matrix (a turn is not symmetric), and a change that is
    # not a turn leaves its size as the error
    assert np.abs(rotation - turn.T).max() > 0.1
    noise = 0.1 * rng.standard_normal(g.shape)
    _, noisy_error = _rotation_onto(g, g @ turn + noise)
    assert 0.5 * np.linalg.norm(noise) / np.linalg.norm(g) < noisy_error < 1.5 * np.linalg.norm(noise) / np.linalg.norm(g)
