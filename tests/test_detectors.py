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


# -- head-based detectors -------------------------------------------------------------------------------------
import torch  # noqa: E402

from lowgrad.detectors import BATS, ODIN, GradNorm, Head, ReAct, ViM, make_detector  # noqa: E402
from lowgrad.fusion import ScoreCalibrator, fuse  # noqa: E402
from lowgrad.probe import train_probe  # noqa: E402

from tests.conftest import DIGITS


def _head(rng, d=6, c=3, bn=False) -> Head:
    head = Head(weight=rng.standard_normal((c, d)), bias=rng.standard_normal(c))
    if bn:
        head.bn_mean, head.bn_var = rng.standard_normal(d), rng.uniform(0.5, 2, d)
        head.bn_weight, head.bn_bias = rng.uniform(0.5, 1.5, d), rng.standard_normal(d) * 0.1
    return head


def test_react_clips_at_bank_percentile_then_energy():
    rng = np.random.default_rng(3)
    head = _head(rng)
    bank = rng.standard_normal((200, 6))
    det = ReAct(head, percentile=90, start=2).fit(bank)
    assert det.threshold_ == pytest.approx(np.percentile(bank[:, 2:], 90))
    x = rng.standard_normal((5, 6)) * 3
    clipped = x.copy()
    clipped[:, 2:] = np.minimum(clipped[:, 2:], det.threshold_)
    expected = np.log(np.exp(clipped @ head.weight.T + head.bias).sum(1))
    np.testing.assert_allclose(det.score_samples(x), expected, rtol=1e-10)
    # fewer coordinates than ``start`` (a k-sweep point k' <= 10): nothing to clip, plain Energy
    short = ReAct(_head(rng, d=2), percentile=90, start=10).fit(bank[:, :2])
    energy = np.log(np.exp(x[:, :2] @ short.head.weight.T + short.head.bias).sum(1))
    np.testing.assert_allclose(short.score_samples(x[:, :2]), energy, rtol=1e-10)


def test_bats_truncates_probe_bn_output():
    rng = np.random.default_rng(4)
    head = _head(rng, bn=True)
    x = rng.standard_normal((7, 6)) * 4
    z = (x - head.bn_mean) / np.sqrt(head.bn_var + 1e-5) * head.bn_weight + head.bn_bias
    z = np.clip(z, head.bn_bias - 0.3 * head.bn_weight, head.bn_bias + 0.3 * head.bn_weight)
    expected = np.log(np.exp(z @ head.weight.T + head.bias).sum(1))
    np.testing.assert_allclose(BATS(head, lam=0.3).score_samples(x), expected, rtol=1e-10)


class _Clamp(torch.nn.Module):
    def __init__(self, low: torch.Tensor, high: torch.Tensor) -> None:
        super().__init__()
        self.low, self.high = low.view(1, -1, 1, 1), high.view(1, -1, 1, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.maximum(torch.minimum(x, self.high), self.low)


def test_forward_bats_truncates_the_last_feature_batchnorm_inside_the_network():
    """Reference: a copy of ResNet-20 whose last 64-channel BatchNorm is followed by an explicit clamp module
    (so the clamp acts per position, before the residual addition, ReLU and pooling), then Energy."""
    import copy

    from lowgrad.models import build_model
    from tests.test_gradients import _randomise_bn

    torch.manual_seed(0)
    model = build_model("resnet20_cifar", 10).eval()
    _randomise_bn(model)
    x = torch.randn(12, 3, 32, 32)
    head = Head(weight=model.head.weight.detach().double().numpy(), bias=model.head.bias.detach().double().numpy())
    reference = copy.deepcopy(model)
    bn = reference.layer3[2].bn2
    spread = 0.3 * bn.weight.detach().abs()
    reference.layer3[2].bn2 = torch.nn.Sequential(bn, _Clamp(bn.bias.detach() - spread, bn.bias.detach() + spread))
    with torch.no_grad():
        expected = torch.logsumexp(reference(x).double(), dim=1).numpy()
        plain = torch.logsumexp(model(x).double(), dim=1).numpy()
    bats = BATS(head, lam=0.3, typical="batchnorm")
    assert bats.uses_model
    got = bats.score_inputs(model, x, batch_size=5)
    np.testing.assert_allclose(got, expected, rtol=1e-5)
    assert np.abs(got - plain).max() > 1e-3  # the truncation changed the scores
    np.testing.assert_allclose(BATS(head, lam=1e6, typical="batchnorm").score_inputs(model, x), plain, rtol=1e-5)  # no clamp = Energy
    with torch.no_grad():  # the hook is gone afterwards
        np.testing.assert_allclose(torch.logsumexp(model(x).double(), dim=1).numpy(), plain, rtol=1e-12)
    with pytest.raises(ValueError, match="use score_inputs"):
        bats.score_samples(np.zeros((2, 64)))


def test_forward_bats_clamps_features_to_the_bank_typical_range():
    """``typical: features`` (the BATS authors' CIFAR code): mean +- lam * std of the bank's features."""
    rng = np.random.default_rng(5)
    head = _head(rng)
    bank = rng.standard_normal((300, 6)) * rng.uniform(0.5, 2, 6) + rng.standard_normal(6)
    x = rng.standard_normal((9, 6)) * 5
    det = make_detector("bats", {"lam": 1.5}, False, head).fit(bank)
    assert not det.uses_model
    z = np.clip(x, bank.mean(0) - 1.5 * bank.std(0), bank.mean(0) + 1.5 * bank.std(0))
    expected = np.log(np.exp(z @ head.weight.T + head.bias).sum(1))
    np.testing.assert_allclose(det.score_samples(x), expected, rtol=1e-10)
    assert not np.allclose(det.score_samples(x), np.log(np.exp(x @ head.weight.T + head.bias).sum(1)))
    assert make_detector("bats", {}, True, _head(rng, bn=True)).lam == 0.1  # docs/method.md's gradient-side lam


def test_gradnorm_closed_form_matches_autograd():
    rng = np.random.default_rng(5)
    head = _head(rng, bn=True)
    x = rng.standard_normal((4, 6))
    ours = GradNorm(head).score_samples(x)
    w = torch.tensor(head.weight, requires_grad=True)
    for i in range(4):
        z = torch.tensor(head.normalised(x[i : i + 1]))
        logits = z @ w.T + torch.tensor(head.bias)
        loss = -(torch.log_softmax(logits, 1)).mean()  # KL(uniform || p) up to a constant
        (g,) = torch.autograd.grad(loss, w)
        assert ours[i] == pytest.approx(g.abs().sum().item(), rel=1e-9)


def test_vim_matches_independent_computation():
    rng = np.random.default_rng(6)
    d = 8
    head = _head(rng, d=d, c=3)
    bank = rng.standard_normal((300, d)) @ np.diag(np.linspace(3, 0.1, d))
    x = rng.standard_normal((5, d))
    det = ViM(head, dim=5).fit(bank)
    u = -np.linalg.pinv(head.weight) @ head.bias
    cov = np.cov((bank - u).T, bias=True, ddof=0) + np.outer((bank - u).mean(0), (bank - u).mean(0))
    vals, vecs = np.linalg.eigh(cov)
    ns = vecs[:, np.argsort(vals)[: d - 5]]
    alpha = (bank @ head.weight.T + head.bias).max(1).mean() / np.linalg.norm((bank - u) @ ns, axis=1).mean()
    expected = np.log(np.exp(x @ head.weight.T + head.bias).sum(1)) - alpha * np.linalg.norm((x - u) @ ns, axis=1)
    np.testing.assert_allclose(det.score_samples(x), expected, rtol=1e-8)


def test_odin_hand_computed_on_linear_model():
    """Logits = W x: the input step is -eps * sign(grad of CE at the argmax class), computed by hand."""
    rng = np.random.default_rng(7)
    head = _head(rng, d=4, c=3)
    head.bias[:] = 0
    x = rng.standard_normal((6, 4))
    t, eps = 10.0, 0.05
    ours = ODIN(head, temperature=t, epsilon=eps).score_samples(x)
    w = head.weight
    for i in range(6):
        p = np.exp(w @ x[i] / t) / np.exp(w @ x[i] / t).sum()
        c = p.argmax()
        grad = (w.T @ (p - np.eye(3)[c])) / t  # d CE / d x
        xs = x[i] - eps * np.sign(grad)
        q = np.exp(w @ xs / t) / np.exp(w @ xs / t).sum()
        assert ours[i] == pytest.approx(q.max(), rel=1e-9)


def test_probe_learns_separable_classes():
    rng = np.random.default_rng(8)
    y = np.repeat(np.arange(3), 60)
    x = rng.standard_normal((180, 5)) + 4 * np.eye(5)[y]
    head = train_probe(x, y, 3, epochs=10, batch_size=16, seed=0)
    assert (head.logits(x).argmax(1) == y).mean() > 0.95


def _probe_logits_on_reoriented_features():
    """A probe trained on ``x`` and one trained on ``x``'s columns permuted and sign-flipped, on their inputs."""
    rng = np.random.default_rng(9)
    y = np.repeat(np.arange(3), 50)
    x = rng.standard_normal((150, 6)) + 2 * np.eye(6)[y] + rng.exponential(size=(150, 6))
    perm, signs = rng.permutation(6), np.array([1, -1, -1, 1, -1, 1])
    x_other = x[:, perm] * signs
    here = train_probe(x, y, 3, epochs=3, batch_size=16, seed=0).logits(x)
    return here, train_probe(x_other, y, 3, epochs=3, batch_size=16, seed=0).logits(x_other)


def test_probe_does_not_depend_on_how_the_basis_orients_its_columns(monkeypatch):
    """Zero-initialised linear layer: training commutes with flipping or permuting ``G_low``'s columns, so the
    probe rows do not move with the PCA's column signs. Control: PyTorch's random start of the linear weight breaks
    it (only the 2-D weight keeps it: BatchNorm's bias, zeroed by the same function, must not stay uninitialised)."""
    here, there = _probe_logits_on_reoriented_features()
    np.testing.assert_allclose(there, here, atol=1e-4)
    zeros = torch.nn.init.zeros_
    monkeypatch.setattr(torch.nn.init, "zeros_", lambda tensor: tensor if tensor.dim() == 2 else zeros(tensor))
    here, there = _probe_logits_on_reoriented_features()
    assert np.abs(there - here).max() > 0.05


def test_fusion_calibrators():
    cal = np.array([1.0, 2.0, 3.0, 4.0])
    z = ScoreCalibrator("zscore").fit(cal).transform(np.array([2.5]))
    assert z[0] == pytest.approx(0.0)
    p = ScoreCalibrator("pvalue").fit(cal).transform(np.array([0.0, 2.0, 10.0]))
    np.testing.assert_allclose(p, [1 / 5, 3 / 5, 5 / 5])  # conformal: (1 + #{cal <= s}) / (n + 1)
    fused = fuse([cal, 10 * cal], [np.array([4.0]), np.array([40.0])], "zscore")
    assert fused[0] == pytest.approx(2 * (4 - 2.5) / np.std(cal))


def test_fusion_of_three_members_against_explicit_formulas():
    """zscore: the sum of standardised scores; fisher: sum of log conformal p-values (= -Fisher's statistic / 2)."""
    rng = np.random.default_rng(3)
    cals = [rng.normal(m, s, 40) for m, s in ((0, 1), (5, 2), (-3, 0.5))]
    xs = [rng.normal(m, s, 7) for m, s in ((0, 1), (5, 2), (-3, 0.5))]
    want_z = sum((x - c.mean()) / c.std() for c, x in zip(cals, xs))
    np.testing.assert_allclose(fuse(cals, xs, "zscore"), want_z, rtol=1e-12)
    want_f = np.zeros(7)
    for c, x in zip(cals, xs):
        for i, v in enumerate(x):
            want_f[i] += np.log((1 + sum(cv <= v for cv in c)) / (len(c) + 1))
    np.testing.assert_allclose(fuse(cals, xs, "fisher"), want_f, rtol=1e-12)
    # negative control: the fused score is not just the first member's calibrated score
    assert not np.allclose(fuse(cals, xs, "zscore"), (xs[0] - cals[0].mean()) / cals[0].std())
    with pytest.raises(ValueError, match="fusion rule"):
        fuse(cals, xs, "pvalue")


@pytest.mark.parametrize("name", ["msp", "energy", "gradnorm", "react", "bats", "vim", "odin", "fdbd", "rmds", "gen", "ash"])
def test_forward_head_detectors_rank_far_ood_below_id(name):
    """Sign check: features far from the ID bank (large-norm noise) score lower for every head-based score
    that is supposed to catch them; ID = samples confidently on one class. (Not SCALE: with 6 features its
    sharpening ratio s1 / s2 is largest for flat activations, so this toy inverts it; its formula test pins it.)"""
    rng = np.random.default_rng(9)
    y = rng.integers(0, 3, 300)
    bank = np.abs(rng.normal(0, 0.2, (300, 6))) + 2.0 * np.eye(3, 6)[y]
    head = Head(weight=np.eye(3, 6) * 3, bias=np.zeros(3))
    id_q = np.abs(rng.normal(0, 0.2, (50, 6))) + 2.0 * np.eye(3, 6)[rng.integers(0, 3, 50)]
    ood_q = np.abs(rng.normal(0, 0.2, (50, 6))) + 0.6  # ambiguous: equal evidence for every class
    det = make_detector(name, {}, False, head)
    if det.input == "logits":
        score = lambda q: det.score_samples(head.logits(q))  # noqa: E731
    else:
        det.fit(bank, y)
        score = det.score_samples
    assert np.median(score(id_q)) > np.median(score(ood_q))


def test_fusion_with_a_model_dependent_forward_detector_scores_held_out_images():
    """run_all: a fused pair whose forward side runs the network (BATS on BatchNorm outputs) gets the
    calibration images of the held-out ID rows, and its scores are finite for every set."""
    from lowgrad.config import parse_params
    from lowgrad.models import build_model
    from lowgrad.detectors import Head
    from lowgrad.scoring import ScoringContext, run_all

    torch.manual_seed(0)
    model = build_model("small_cnn", 3, 1).eval()
    rng = np.random.default_rng(0)
    images = {name: torch.randn(n, 1, 8, 8) for name, n in (("id_train", 60), ("id_test", 20), ("ood", 20))}
    sets = {}
    for name, x in images.items():
        with torch.no_grad():
            logits, feats = model(x, return_features=True)
        sets[name] = {"name": name, "logits": logits.numpy(), "features": feats.numpy(),
                      "labels": np.arange(len(x)) % 3, "g_low": rng.standard_normal((len(x), 4))}
    params = parse_params({
        "data": {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5], "datasets": {
            "id_train": {"source": "npz", "path": DIGITS, "classes": [0, 1, 2]},
            "id_test": {"source": "npz", "path": DIGITS, "classes": [0, 1, 2]},
            "ood": {"source": "npz", "path": DIGITS, "classes": [7]}}},
        "model": {"arch": "small_cnn", "num_classes": 3},
        "scoring": {"forward": {"bats": {"lam": 0.5, "typical": "batchnorm"}}, "gradient": {"knn": {"k": 3}},
                    "fusion": {"groups": [{"name": "bats_grad_knn", "members": ["bats", "grad_knn"]}]}},
    })
    loaded = []
    ctx = ScoringContext(forward_head=Head.from_linear(model.head), num_classes=3, model_forward=model,
                         load_images=lambda name: loaded.append(name) or images[name])
    scores, _, _ = run_all(params, sets, ctx)
    assert "id_train" in loaded  # the calibration rows' images were loaded for the forward side
    for label in ("bats", "grad_knn", "fused_bats_grad_knn", "fused_bats_grad_knn_forward_only"):
        assert all(np.isfinite(scores[label][s]).all() for s in ("id_test", "ood"))


def test_fusion_plan_shares_identical_forward_only_baselines():
    from lowgrad.options import FusionGroup
    from lowgrad.scoring import fusion_plan

    plan = fusion_plan([
        FusionGroup(name="a", members=["vim", "knn", "grad_knn"]),
        FusionGroup(name="b", members=["vim", "knn", "grad_residual"]),
        FusionGroup(name="c", members=["vim", "knn", "grad_residual"], rule="fisher"),
        FusionGroup(name="d", members=["grad_knn", "grad_residual"]),
    ])
    summary = {name: (list(row.members), rule, row.twin, row.kind) for name, (row, rule) in plan.items()}
    assert summary == {
        "fused_a_forward_only": (["vim", "knn"], "zscore", None, "forward_only"),
        "fused_a": (["vim", "knn", "grad_knn"], "zscore", "fused_a_forward_only", "fused"),
        "fused_b": (["vim", "knn", "grad_residual"], "zscore", "fused_a_forward_only", "fused"),  # same baseline, once
        "fused_c_forward_only": (["vim", "knn"], "fisher", None, "forward_only"),  # another rule: another baseline
        "fused_c": (["vim", "knn", "grad_residual"], "fisher", "fused_c_forward_only", "fused"),
        "fused_d": (["grad_knn", "grad_residual"], "zscore", None, "fused"),  # gradient only: no forward-only twin
    }
    assert [row.gradient for row, _ in plan.values()] == [False, True, True, False, True, True]


def test_a_detector_is_one_registered_class(monkeypatch):
    """Registering a class is all it takes: its name is then valid in the params on the sides it declares, with the
    options, defaults and gradient-side defaults of its ``Options`` model, and ``make_detector`` builds it."""
    from pydantic import Field

    from lowgrad import detectors as D
    from lowgrad.options import check_detector_config

    monkeypatch.setattr(D, "REGISTRY", dict(D.REGISTRY))  # the toy below stays in this test

    @D.register("toy_scale", gradient_defaults={"factor": 3.0})
    class ToyScale(D.Detector):
        class Options(D.NoOptions):
            factor: float = Field(2.0, gt=0)

        def score_samples(self, X):
            return self.factor * np.asarray(X).sum(axis=1)

    x = np.arange(6.0).reshape(3, 2)
    assert "toy_scale" in D.detector_names(False) and "toy_scale" in D.detector_names(True)
    np.testing.assert_allclose(D.make_detector("toy_scale", {}, False).score_samples(x), [2, 10, 18])
    np.testing.assert_allclose(D.make_detector("toy_scale", {}, True).score_samples(x), [3, 15, 27])
    assert D.make_detector("toy_scale", {"factor": 0.5}, True).factor == 0.5
    check_detector_config({"toy_scale": {"factor": 1.0}}, "scoring.forward")
    with pytest.raises(ValueError, match=r"scoring.forward.toy_scale.factor: Input should be greater than 0"):
        check_detector_config({"toy_scale": {"factor": -1.0}}, "scoring.forward")
    with pytest.raises(ValueError, match=r"toy_scale.facto: unknown option \(allowed: \['factor'\]\)"):
        check_detector_config({"toy_scale": {"facto": 1.0}}, "scoring.forward")
    assert not D.uses_probe("toy_scale")  # reads G_low itself: no probe

    @D.register("toy_forward_only", gradient=False)
    class ToyForwardOnly(D.Detector):
        input = "logits"

    assert "toy_forward_only" in D.detector_names(False) and "toy_forward_only" not in D.detector_names(True)
    with pytest.raises(ValueError, match="unknown detector 'toy_forward_only'"):
        check_detector_config({"toy_forward_only": {}}, "scoring.gradient")
    # refused at registration: a name taken twice, gradient defaults for an option the class does not have
    with pytest.raises(ValueError, match="registered twice"):
        D.register("knn")(ToyScale)
    with pytest.raises(ValueError, match=r"unknown options \['lam'\]"):
        D.register("toy_other", gradient_defaults={"lam": 1.0})(ToyScale)


def test_registered_detectors_and_their_defaults():
    """The sides and the defaults that differ between them (docs/method.md sections 5-6); a hyper-parameter passed to
    a class is validated by its options model (the one place a default or a range is written)."""
    from lowgrad.detectors import KNN, detector_names, uses_probe

    paper = {"msp", "energy", "odin", "mahalanobis", "knn", "react", "bats", "gradnorm"}  # docs/method.md section 6
    assert paper <= set(detector_names(False)) & set(detector_names(True))  # each on both sides
    assert set(detector_names(True)) - set(detector_names(False)) == {"residual", "gradnorm_phi"}  # gradient only
    head = _head(np.random.default_rng(0), bn=True)
    gradient_odin, forward_odin = make_detector("odin", {}, True, head), make_detector("odin", {}, False)
    assert (gradient_odin.temperature, gradient_odin.epsilon, gradient_odin.head) == (100.0, 50.0, head)
    assert vars(forward_odin) == {"head": None, "temperature": 1000.0, "epsilon": 0.0014, "input_std": None}
    assert (make_detector("react", {}, True, head).start, make_detector("react", {}, False, head).start) == (10, 0)
    assert {n for n in paper | {"residual", "gradnorm_phi"} if uses_probe(n)} == \
        {"msp", "energy", "odin", "react", "bats", "gradnorm"}  # on the probe's head or logits; KNN etc. on G_low
    with pytest.raises(ValueError, match="greater than or equal to 1"):
        KNN(k=0)
    with pytest.raises(ValueError, match="'features' or 'batchnorm'"):
        BATS(head, typical="bn")
    with pytest.raises(TypeError, match="KNN takes no head"):
        KNN(head)
    with pytest.raises(TypeError, match="ReAct needs the classifier head"):
        ReAct()
    no_bias = Head.from_linear(torch.nn.Linear(4, 3, bias=False))  # a head without a bias: a zero bias
    assert no_bias.bias.tolist() == [0.0, 0.0, 0.0] and no_bias.weight.shape == (3, 4)


# -- OpenOOD v1.5's strongest post-hoc detectors, each against its paper's formula written as loops --------------
from lowgrad.detectors import ASH, FDBD, GEN, RMDS, SCALE  # noqa: E402


def test_gen_against_the_generalised_entropy_loop():
    rng = np.random.default_rng(11)
    logits = rng.normal(0, 3, (7, 5))
    for gamma, m in ((0.1, 100), (0.5, 3)):
        expected = []
        for row in logits:
            p = sorted(np.exp(row) / np.exp(row).sum())[-m:]
            expected.append(-sum(pi**gamma * (1 - pi) ** gamma for pi in p))
        np.testing.assert_allclose(GEN(gamma=gamma, M=m).score_samples(logits), expected, rtol=1e-12)
    # negative control: M = 3 keeps only the three largest probabilities, so it differs from M = all
    assert not np.allclose(GEN(M=3).score_samples(logits), GEN().score_samples(logits))
    confident, flat = np.array([[20.0, 0, 0, 0, 0]]), np.zeros((1, 5))
    assert GEN().score_samples(confident)[0] > GEN().score_samples(flat)[0]  # higher = in-distribution


def test_rmds_against_the_relative_mahalanobis_formula():
    rng = np.random.default_rng(12)
    y = np.repeat([0, 1, 2], 30)
    x = rng.standard_normal((90, 3)) * [1.0, 2.0, 0.5] + 3 * np.eye(3)[y]
    q = rng.standard_normal((6, 3)) * 2
    means = [x[y == c].mean(0) for c in range(3)]
    centred = np.concatenate([x[y == c] - means[c] for c in range(3)])
    prec = np.linalg.inv(np.cov(centred.T, bias=True))
    mu0 = x.mean(0)
    prec0 = np.linalg.inv(np.cov(x.T, bias=True))
    expected = []
    for u in q:
        d0 = (u - mu0) @ prec0 @ (u - mu0)
        expected.append(max(-((u - m) @ prec @ (u - m) - d0) for m in means))
    ours = RMDS().fit(x, y).score_samples(q)
    np.testing.assert_allclose(ours, expected, rtol=1e-9)
    assert not np.allclose(ours, Mahalanobis().fit(x, y).score_samples(q))  # the background term matters


def test_fdbd_against_the_boundary_distance_loop():
    rng = np.random.default_rng(13)
    head = _head(rng, d=5, c=4)
    bank, q = rng.standard_normal((40, 5)), rng.standard_normal((6, 5))
    mean = bank.mean(0)
    w, b = head.weight, head.bias
    expected = []
    for u in q:
        logits = w @ u + b
        c = int(np.argmax(logits))
        # distance from u to the hyperplane {v: (w_i - w_c) v + b_i - b_c = 0}
        dists = [abs((w[i] - w[c]) @ u + b[i] - b[c]) / np.linalg.norm(w[i] - w[c]) for i in range(4) if i != c]
        expected.append(np.mean(dists) / np.linalg.norm(u - mean))
    np.testing.assert_allclose(FDBD(head).fit(bank).score_samples(q), expected, rtol=1e-10)
    # negative control: normalising by ||u|| instead of ||u - mean|| gives other values
    plain = np.array(expected) * np.linalg.norm(q - mean, axis=1) / np.linalg.norm(q, axis=1)
    assert not np.allclose(FDBD(head).fit(bank).score_samples(q), plain)


def _ash_loop(u: np.ndarray, percentile: float, variant: str) -> np.ndarray:
    n = len(u)
    k = n - int(np.round(n * percentile / 100.0))
    keep = sorted(range(n), key=lambda j: (-u[j], j))[:k]
    out = np.zeros(n)
    for j in keep:
        out[j] = {"b": u.sum() / k, "p": u[j]}.get(variant, u[j])
    if variant == "s":
        out = out * np.exp(u.sum() / out.sum())
    return out


def test_ash_variants_against_the_pruning_loop():
    rng = np.random.default_rng(14)
    head = _head(rng, d=20, c=3)
    q = np.abs(rng.standard_normal((5, 20)))  # post-ReLU activations
    for variant in ("b", "p", "s"):
        for percentile in (90.0, 65.0):
            det = ASH(head, percentile=percentile, variant=variant)
            shaped = np.stack([_ash_loop(u, percentile, variant) for u in q])
            np.testing.assert_allclose(det.shape(q), shaped, rtol=1e-12)
            energy = np.log(np.exp(shaped @ head.weight.T + head.bias).sum(1))
            np.testing.assert_allclose(det.score_samples(q), energy, rtol=1e-10)
    assert (ASH(head, percentile=90).shape(q) > 0).sum(axis=1).tolist() == [2] * 5  # 20 - round(18) kept


def test_scale_against_the_sharpening_formula():
    rng = np.random.default_rng(15)
    head = _head(rng, d=20, c=3)
    q = np.abs(rng.standard_normal((5, 20)))
    expected = []
    for u in q:
        top = np.sort(u)[::-1][: 20 - int(np.round(20 * 0.85))]
        scaled = u * np.exp(u.sum() / top.sum())  # every activation kept, only scaled
        expected.append(np.log(np.exp(head.weight @ scaled + head.bias).sum()))
    np.testing.assert_allclose(SCALE(head, percentile=85).score_samples(q), expected, rtol=1e-10)
    # negative control: SCALE is not ASH-S (which also prunes)
    assert not np.allclose(SCALE(head, percentile=85).score_samples(q), ASH(head, percentile=85, variant="s").score_samples(q))


def test_openood_defaults_of_the_new_detectors():
    """The hyper-parameters are OpenOOD v1.5's postprocessor settings, fixed before any run."""
    head = _head(np.random.default_rng(0))
    assert vars(make_detector("gen", {}, False)) == {"gamma": 0.1, "M": 100}
    assert (make_detector("ash", {}, False, head).percentile, make_detector("ash", {}, False, head).variant) == (90.0, "b")
    assert make_detector("scale", {}, False, head).percentile == 85.0


def test_odin_step_is_epsilon_over_the_channel_std():
    """ODIN's epsilon is a pixel-space step: in normalised input space each channel moves by eps / std."""
    torch.manual_seed(0)
    weight = torch.randn(3, 2 * 4)
    seen = []

    def forward(x):
        seen.append(x.detach().clone())
        return x.flatten(1) @ weight.T

    x = torch.randn(5, 2, 2, 2)
    det = ODIN(temperature=1000.0, epsilon=0.0014)
    det.input_std = (0.2470, 0.1)
    det.score_inputs(forward, x)
    step = (x - seen[1]).abs()
    torch.testing.assert_close(step[:, 0], torch.full_like(step[:, 0], 0.0014 / 0.2470))
    torch.testing.assert_close(step[:, 1], torch.full_like(step[:, 1], 0.0014 / 0.1))
    # negative control: without the std (G_low through the probe) the step is eps itself
    seen.clear()
    det.input_std = None
    det.score_inputs(forward, x)
    torch.testing.assert_close((x - seen[1]).abs(), torch.full_like(x, 0.0014))


def test_the_scorer_gives_forward_odin_the_normalisation_std():
    from lowgrad.scoring import ScoringContext, score_detector

    torch.manual_seed(0)
    weight = torch.randn(3, 4)
    seen = []

    def forward(x):
        seen.append(x.detach().clone())
        return x.flatten(1) @ weight.T

    x = torch.randn(4, 1, 2, 2)
    ctx = ScoringContext(forward_head=Head(weight.double().numpy(), np.zeros(3)), num_classes=3, model_forward=forward,
                         input_std=(0.5,))
    data = {"name": "s", "images": x, "labels": np.zeros(4, int)}
    score_detector("odin", {"epsilon": 0.01}, False, data, {"s": data}, ctx)
    torch.testing.assert_close((x - seen[1]).abs(), torch.full_like(x, 0.02))


def test_fdbd_boundary_norms_at_imagenet_size_against_direct_norms():
    """1,000 classes x 2,048 features (ResNet-50 on ImageNet): the pairwise ||w_i - w_c|| come from the Gram matrix
    (a C x C x D difference tensor would be 16 GB); a few entries against the direct norm."""
    rng = np.random.default_rng(16)
    head = Head(weight=rng.standard_normal((1000, 2048)), bias=np.zeros(1000))
    det = FDBD(head).fit(rng.standard_normal((4, 2048)))
    for i, c in ((0, 1), (999, 3), (500, 501)):
        assert det.boundary_norms_[i, c] == pytest.approx(np.linalg.norm(head.weight[i] - head.weight[c]), rel=1e-10)
    assert np.all(np.diag(det.boundary_norms_) == 1.0)


def test_dice_against_the_sparsified_layer_loop():
    """DICE's energy through the layer that keeps weights whose contribution to the bank's mean feature is above
    the percentile, written as loops over classes and features."""
    from lowgrad.detectors import DICE, Energy

    rng = np.random.default_rng(21)
    bank, q = np.abs(rng.normal(0, 1, (40, 8))), np.abs(rng.normal(0, 1, (6, 8)))
    head = Head(weight=rng.normal(0, 1, (3, 8)), bias=rng.normal(0, 1, 3))
    mean = [sum(row[j] for row in bank) / len(bank) for j in range(8)]
    contribution = [[head.weight[c, j] * mean[j] for j in range(8)] for c in range(3)]
    threshold = np.percentile(np.array(contribution), 70)
    expected = []
    for u in q:
        logits = [head.bias[c] + sum(u[j] * head.weight[c, j] for j in range(8) if contribution[c][j] > threshold)
                  for c in range(3)]
        expected.append(np.log(sum(np.exp(v) for v in logits)))
    dice = DICE(head, percentile=70).fit(bank)
    np.testing.assert_allclose(dice.score_samples(q), expected, rtol=1e-10)
    kept = sum(v > threshold for row in contribution for v in row)
    assert 0 < kept < 24 and (dice.masked_weight_ != 0).sum() == kept
    # negative control: with the sparsification it is not the plain energy of the full layer
    assert not np.allclose(dice.score_samples(q), Energy().score_samples(head.logits(q)))
    assert make_detector("dice", {}, False, head).percentile == 90.0  # OpenOOD's p


def _fused_msp_grad_knn(sets: dict, rng: np.random.Generator, calibration_fraction: float = 0.2, rule: str = "zscore"):
    """``run_all`` of one fusion group of forward MSP and gradient KNN (k = 2) on ``sets``."""
    from lowgrad.config import parse_params
    from lowgrad.detectors import Head
    from lowgrad.scoring import ScoringContext, run_all

    params = parse_params({
        "data": {"image_size": 8, "channels": 1, "mean": [0.5], "std": [0.5], "datasets": {
            "id_train": {"source": "npz", "path": DIGITS}, "id_test": {"source": "npz", "path": DIGITS},
            "ood": {"source": "npz", "path": DIGITS}}},
        "model": {"arch": "small_cnn", "num_classes": 3},
        "scoring": {"forward": {"msp": {}}, "gradient": {"knn": {"k": 2}},
                    "fusion": {"calibration_fraction": calibration_fraction,
                               "groups": [{"name": "msp_grad_knn", "members": ["msp", "grad_knn"], "rule": rule}]}},
    })
    head = Head(weight=rng.standard_normal((3, 4)), bias=np.zeros(3))
    return run_all(params, sets, ScoringContext(forward_head=head, num_classes=3))[0]


def test_a_bank_too_small_for_the_stratified_calibration_split_is_one_line():
    """9 bank samples of 3 classes, calibration_fraction 0.2: 2 calibration samples cannot hold one of each class
    (scikit-learn's own error was a ValueError traceback); 0.34 leaves 4 and works."""
    from lowgrad.errors import ConfigError

    rng = np.random.default_rng(0)
    sets = {name: {"name": name, "logits": rng.standard_normal((n, 3)), "features": rng.standard_normal((n, 4)),
                   "labels": np.arange(n) % 3, "g_low": rng.standard_normal((n, 4))}
            for name, n in (("id_train", 9), ("id_test", 6), ("ood", 6))}
    with pytest.raises(ConfigError, match=r"splits the 9 id_train samples into 7 to fit and 2 to calibrate .* each of "
                                          r"the 3 classes") as err:
        _fused_msp_grad_knn(sets, rng, calibration_fraction=0.2)
    assert "\n" not in str(err.value)
    assert np.isfinite(_fused_msp_grad_knn(sets, rng, calibration_fraction=0.34)["fused_msp_grad_knn"]["ood"]).all()


def test_a_bank_class_of_one_sample_is_one_line_before_the_split():
    """12 bank samples, class 2 once: both parts of the split are large enough, but a stratified split needs two of
    each class (scikit-learn's own error was a ValueError traceback): one DataError line naming the class."""
    from lowgrad.errors import DataError

    rng = np.random.default_rng(0)
    labels = {"id_train": np.array([0] * 6 + [1] * 5 + [2]), "id_test": np.arange(6) % 3, "ood": np.arange(6) % 3}
    sets = {name: {"name": name, "logits": rng.standard_normal((len(y), 3)), "features": rng.standard_normal((len(y), 4)),
                   "labels": y, "g_low": rng.standard_normal((len(y), 4))} for name, y in labels.items()}
    with pytest.raises(DataError, match="id_train: class 2 has one image") as err:
        _fused_msp_grad_knn(sets, rng, calibration_fraction=0.34)
    assert "\n" not in str(err.value)


def test_a_fusion_member_constant_on_the_calibration_part_is_one_line():
    """A degenerate member (every held-out ID sample scores the same: here identical G_low rows, so grad_knn is 0
    everywhere) cannot be z-scored: one ConfigError naming the row and the member, not fusion's ValueError. The
    same group with rule fisher (p-values need no spread) runs: the control."""
    from lowgrad.errors import ConfigError

    rng = np.random.default_rng(0)
    sets = {name: {"name": name, "logits": rng.standard_normal((n, 3)), "features": rng.standard_normal((n, 4)),
                   "labels": np.arange(n) % 3, "g_low": np.ones((n, 4))}
            for name, n in (("id_train", 30), ("id_test", 12), ("ood", 12))}
    with pytest.raises(ConfigError, match=r"fusion row fused_msp_grad_knn: grad_knn scores all 6 held-out ID samples "
                                          r"the same, .* rule: fisher") as err:
        _fused_msp_grad_knn(sets, rng, rule="zscore")
    assert "\n" not in str(err.value)
    assert np.isfinite(_fused_msp_grad_knn(sets, rng, rule="fisher")["fused_msp_grad_knn"]["ood"]).all()
