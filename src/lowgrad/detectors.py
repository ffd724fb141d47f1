"""OOD detectors in scikit-learn style: ``fit(X, y)`` on the ID bank, ``score_samples(X)`` with
higher = more in-distribution (docs/method.md sections 5-6).

Like pytorch-ood, detectors split into *feature-only* ones (``score_samples`` on stored logits / features /
``G_low``) and *model-dependent* ones (:class:`ODIN` on images needs the network). Detectors that need the
classifier's last layer receive it as a :class:`Head` (``Linear``, or the probe ``BatchNorm1d -> Linear``).

One registry (OpenOOD's one class per method): each detector class declares, where it is defined, its
``params.yaml`` name and sides (``@register``: forward on penultimate features / logits, gradient on ``G_low``,
gradient-side defaults where docs/method.md differs), its hyper-parameters with their defaults (its ``Options``
model, validated with the params file by :mod:`lowgrad.options`) and what it reads (``input``, ``needs_head``,
``uses_model``). Adding a detector is one class here.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, StrictInt, ValidationError
from scipy.special import logsumexp, softmax
from sklearn.covariance import EmpiricalCovariance
from sklearn.neighbors import NearestNeighbors

from lowgrad.errors import ConfigError


@dataclass
class Head:
    """The map from features to logits: ``logits = W @ bn(u) + b`` where ``bn`` is optional.

    ``bn_*`` describe an eval-mode BatchNorm1d (the probe) applied first.
    """

    weight: np.ndarray  # (C, D)
    bias: np.ndarray  # (C,)
    bn_mean: np.ndarray | None = None
    bn_var: np.ndarray | None = None
    bn_weight: np.ndarray | None = None
    bn_bias: np.ndarray | None = None
    bn_eps: float = 1e-5

    @classmethod
    def from_linear(cls, linear) -> "Head":
        """A network's last ``Linear`` layer (torch) as a :class:`Head`, in float64."""
        as_np = lambda t: t.detach().double().cpu().numpy().copy()  # noqa: E731
        bias = as_np(linear.bias) if linear.bias is not None else np.zeros(linear.out_features)
        return cls(weight=as_np(linear.weight), bias=bias)

    def normalised(self, u: np.ndarray) -> np.ndarray:
        """Output of the probe's BatchNorm (identity without one)."""
        if self.bn_mean is None:
            return np.asarray(u, dtype=np.float64)
        return (u - self.bn_mean) / np.sqrt(self.bn_var + self.bn_eps) * self.bn_weight + self.bn_bias

    def logits_from_normalised(self, z: np.ndarray) -> np.ndarray:
        return z @ self.weight.T + self.bias

    def logits(self, u: np.ndarray) -> np.ndarray:
        return self.logits_from_normalised(self.normalised(u))


class NoOptions(BaseModel):
    """A detector's hyper-parameters (none here): subclasses declare each with its type, range and default, the one
    place a default is written. Unknown options are errors; values are frozen."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class TemperatureOptions(NoOptions):
    temperature: float = Field(1.0, gt=0)


@dataclass(frozen=True)
class Registration:
    """A detector's entry in the registry: its class, the sides it runs on, the gradient side's own defaults."""

    cls: type["Detector"]
    forward: bool
    gradient: bool
    gradient_defaults: Mapping[str, Any] = field(default_factory=dict)


REGISTRY: dict[str, Registration] = {}


def register(
    name: str, *, forward: bool = True, gradient: bool = True, gradient_defaults: Mapping[str, Any] | None = None
) -> Callable[[type["Detector"]], type["Detector"]]:
    """Class decorator: ``name`` in ``scoring.forward`` (``forward=True``) and / or ``scoring.gradient``."""

    def add(cls: type["Detector"]) -> type["Detector"]:
        if name in REGISTRY:
            raise ValueError(f"detector '{name}' is registered twice ({REGISTRY[name].cls.__name__}, {cls.__name__})")
        unknown = set(gradient_defaults or {}) - set(cls.Options.model_fields)
        if unknown:
            raise ValueError(f"detector '{name}': gradient defaults for unknown options {sorted(unknown)}")
        REGISTRY[name] = Registration(cls, forward, gradient, dict(gradient_defaults or {}))
        return cls

    return add


def detector_names(gradient: bool) -> list[str]:
    """The names ``scoring.gradient`` (``gradient=True``) or ``scoring.forward`` accepts, in registry order."""
    return [name for name, r in REGISTRY.items() if (r.gradient if gradient else r.forward)]


def _registration(name: str, gradient: bool) -> Registration:
    if name not in detector_names(gradient):
        raise ValueError(f"{name}: unknown detector '{name}' (known: {sorted(detector_names(gradient))})")
    return REGISTRY[name]


def detector_options(name: str, kwargs: dict[str, Any] | None, gradient: bool) -> dict[str, Any]:
    """Validated hyper-parameters of one configured detector (gradient-side defaults from docs/method.md where they
    differ); raises ``ValueError`` naming the option, e.g. ``knn.k: Input should be a valid integer``."""
    registration = _registration(name, gradient)
    options = registration.cls.Options
    try:
        defaults = registration.gradient_defaults if gradient else {}
        return options.model_validate({**defaults, **(kwargs or {})}).model_dump()
    except ValidationError as err:
        problems = []
        for item in err.errors():
            key = ".".join(str(p) for p in item["loc"])
            msg = f"unknown option (allowed: {sorted(options.model_fields)})" if item["type"] == "extra_forbidden" else item["msg"]
            problems.append(f"{name}.{key}: {msg}" if key else f"{name}: {msg}")
        raise ValueError("; ".join(problems)) from None


class Detector:
    """Base class. ``input`` is ``"logits"``, ``"features"`` (penultimate features, or ``G_low``) or
    ``"g_low_and_sqnorm"``; ``needs_head``: the constructor takes the :class:`Head` first; the hyper-parameters are
    keyword arguments, validated by ``Options`` and set as attributes."""

    Options: ClassVar[type[NoOptions]] = NoOptions
    input: ClassVar[str] = "features"
    needs_head: ClassVar[bool] = False
    head_optional: ClassVar[bool] = False  # needs_head, but runs without one too (ODIN on images)
    uses_model: bool = False  # forward side: scored by ``score_inputs(model, images)`` instead

    def __init__(self, head: Head | None = None, **options: Any) -> None:
        if self.needs_head:
            if head is None and not self.head_optional:
                raise TypeError(f"{type(self).__name__} needs the classifier head")
            self.head = head
        elif head is not None:
            raise TypeError(f"{type(self).__name__} takes no head")
        vars(self).update(self.Options.model_validate(options).model_dump())

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "Detector":
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:  # pragma: no cover - abstract
        raise NotImplementedError


def _energy(logits: np.ndarray, temperature: float = 1.0) -> np.ndarray:
    return temperature * logsumexp(np.asarray(logits, dtype=np.float64) / temperature, axis=1)


@register("msp")
class MSP(Detector):
    """Maximum softmax probability (Hendrycks & Gimpel 2017)."""

    input = "logits"

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return softmax(np.asarray(X, dtype=np.float64), axis=1).max(axis=1)


@register("energy")
class Energy(Detector):
    """Negative free energy ``T * logsumexp(logits / T)`` (Liu et al. 2020)."""

    Options = TemperatureOptions
    input = "logits"

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return _energy(X, self.temperature)


@register("knn")
class KNN(Detector):
    """Minus the distance to the ``k``-th nearest L2-normalised bank row (Sun et al. 2022)."""

    class Options(NoOptions):
        k: StrictInt = Field(5, ge=1)

    @staticmethod
    def _normalise(X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        return X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "KNN":
        if self.k > len(X):
            raise ValueError(f"KNN k={self.k} exceeds the bank size {len(X)}")
        self.bank_ = self._normalise(X)  # the fitted state (saved with the detector); the index is built from it
        self._index = None
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        if getattr(self, "_index", None) is None:
            self._index = NearestNeighbors(n_neighbors=self.k, algorithm="brute").fit(self.bank_)
        dist, _ = self._index.kneighbors(self._normalise(X))
        return -dist[:, -1]


@register("mahalanobis")
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


class _HeadDetector(Detector):
    needs_head = True


@register("react", gradient_defaults={"start": 10})
class ReAct(_HeadDetector):
    """Clip activations at the ``percentile`` of the ID bank's activations, then Energy (Sun et al. 2021).
    ``start`` leaves the first coordinates unclipped (the paper clips ``G_low`` coordinates j >= 10); with no
    coordinate at or past ``start`` nothing is clipped (plain Energy)."""

    class Options(NoOptions):
        percentile: float = Field(90.0, gt=0, le=100)
        start: StrictInt = Field(0, ge=0)

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "ReAct":
        tail = np.asarray(X)[:, self.start :]
        self.threshold_ = float(np.percentile(tail, self.percentile)) if tail.size else np.inf
        return self

    def clip(self, X: np.ndarray) -> np.ndarray:
        X = np.array(X, dtype=np.float64)
        X[:, self.start :] = np.minimum(X[:, self.start :], self.threshold_)
        return X

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return _energy(self.head.logits(self.clip(X)))


@register("bats", gradient_defaults={"lam": 0.1})
class BATS(_HeadDetector):
    """Truncate features to their typical range, then Energy (Zhu et al. 2022).

    Gradient side: the probe's BatchNorm1d output is clamped to ``beta +- lam * gamma`` (docs/method.md, lam = 0.1).
    Forward side, ``typical="features"`` (the BATS authors' CIFAR code): each penultimate feature is clamped
    to ``mean +- lam * std`` of the bank's features (their CIFAR lam: 3.25). ``typical="batchnorm"`` (the
    paper's formulation, model-dependent, :meth:`score_inputs`): the network's last BatchNorm2d whose width is
    the feature dimension has its output clamped to ``beta +- lam * gamma`` at every position, before the
    residual addition, ReLU and pooling that follow it."""

    class Options(NoOptions):
        lam: float = Field(3.25, gt=0)
        typical: Literal["features", "batchnorm"] = "features"

    @property
    def uses_model(self) -> bool:
        return self.head.bn_mean is None and self.typical == "batchnorm"

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "BATS":
        X = np.asarray(X, dtype=np.float64)
        self.mean_, self.std_ = X.mean(axis=0), X.std(axis=0)
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        h = self.head
        if h.bn_mean is not None:
            spread = self.lam * np.abs(h.bn_weight)
            z = np.clip(h.normalised(X), h.bn_bias - spread, h.bn_bias + spread)
            return _energy(h.logits_from_normalised(z))
        if self.typical == "batchnorm":
            raise ValueError("bats with typical: batchnorm runs the network: use score_inputs")
        z = np.clip(np.asarray(X, dtype=np.float64), self.mean_ - self.lam * self.std_, self.mean_ + self.lam * self.std_)
        return _energy(h.logits_from_normalised(z))

    def score_inputs(self, model, x, batch_size: int = 256) -> np.ndarray:
        import torch

        width = self.head.weight.shape[1]
        bns = [m for m in model.modules() if isinstance(m, torch.nn.BatchNorm2d) and m.num_features == width]
        if not bns:
            raise ValueError(f"forward BATS needs a BatchNorm2d with {width} channels producing the features")
        bn = bns[-1]
        shape = (1, -1) + (1,) * (x.dim() - 2)
        beta = bn.bias.detach().view(shape)
        spread = self.lam * bn.weight.detach().abs().view(shape)
        hook = bn.register_forward_hook(lambda _m, _i, out: torch.clamp(out, beta - spread, beta + spread))
        device = next(model.parameters()).device
        try:
            with torch.no_grad():
                logits = [model(x[i : i + batch_size].to(device)).double().cpu().numpy() for i in range(0, len(x), batch_size)]
        finally:
            hook.remove()
        return _energy(np.concatenate(logits))


@register("gradnorm")
class GradNorm(_HeadDetector):
    """L1 norm of the gradient of KL(uniform || softmax) w.r.t. the last weight (Huang et al. 2021), closed
    form: the gradient is ``(p - 1/C) z^T`` so its L1 norm is ``||p - 1/C||_1 * ||z||_1``."""

    Options = TemperatureOptions

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        z = self.head.normalised(X)
        p = softmax(self.head.logits_from_normalised(z) / self.temperature, axis=1)
        return np.abs(p - 1.0 / p.shape[1]).sum(axis=1) * np.abs(z).sum(axis=1)


@register("vim", gradient=False)
class ViM(_HeadDetector):
    """Virtual-logit matching (Wang et al. 2022): energy minus the scaled norm of the feature's residual
    outside the principal subspace of ID features (origin ``-W^+ b``)."""

    class Options(NoOptions):
        dim: StrictInt | None = Field(None, ge=1)

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "ViM":
        X = np.asarray(X, dtype=np.float64)
        d = X.shape[1]
        dim = self.dim or (1000 if d >= 2048 else 512 if d >= 768 else d // 2)
        if not 0 < dim < d:
            raise ValueError(f"ViM dim must be in 1..{d - 1}, got {dim}")
        self.origin_ = -np.linalg.pinv(self.head.weight) @ self.head.bias
        centred = X - self.origin_
        _, eigvec = np.linalg.eigh(centred.T @ centred / len(X))
        self.residual_basis_ = eigvec[:, : d - dim]  # eigh sorts ascending: the smallest d - dim directions
        residual = np.linalg.norm(centred @ self.residual_basis_, axis=1)
        self.alpha_ = self.head.logits(X).max(axis=1).mean() / residual.mean()
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        residual = np.linalg.norm((X - self.origin_) @ self.residual_basis_, axis=1)
        return _energy(self.head.logits(X)) - self.alpha_ * residual


@register("gen")
class GEN(Detector):
    """Generalised entropy (Liu et al. CVPR 2023): ``-sum_{top M} p^gamma (1 - p)^gamma`` over the ``M`` largest
    softmax probabilities (all of them when ``M`` >= the number of classes)."""

    class Options(NoOptions):  # OpenOOD v1.5's gen.yml (the paper's ImageNet setting; M caps at the number of classes)
        gamma: float = Field(0.1, gt=0)
        M: StrictInt = Field(100, ge=1)

    input = "logits"

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        p = np.sort(softmax(np.asarray(X, dtype=np.float64), axis=1), axis=1)[:, -self.M :]
        return -(p**self.gamma * (1.0 - p) ** self.gamma).sum(axis=1)


@register("rmds")
class RMDS(Mahalanobis):
    """Relative Mahalanobis distance (Ren et al. 2021): the class-conditional Mahalanobis score minus that of one
    background Gaussian fitted on the whole bank, ``max_c -(d_c(u) - d_0(u))``."""

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "RMDS":
        super().fit(X, y)
        X = np.asarray(X, dtype=np.float64)
        self.background_mean_ = X.mean(axis=0)
        self.background_precision_ = EmpiricalCovariance().fit(X).precision_
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        diff = np.asarray(X, dtype=np.float64) - self.background_mean_
        background = np.einsum("nd,nd->n", diff @ self.background_precision_, diff)
        return super().score_samples(X) + background


@register("fdbd", gradient=False)
class FDBD(_HeadDetector):
    """Feature distance to the decision boundaries (Liu & Qin, ICML 2024): the mean over classes ``i != c`` of the
    distance ``|l_i - l_c| / ||w_i - w_c||`` of the feature to the boundary between the predicted class ``c`` and
    ``i``, divided by the feature's distance to the mean of the bank's features."""

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "FDBD":
        self.mean_ = np.asarray(X, dtype=np.float64).mean(axis=0)
        w = self.head.weight
        sq = np.einsum("cd,cd->c", w, w)  # ||w_i - w_c||^2 from the Gram matrix: C x C memory, not C x C x D
        self.boundary_norms_ = np.sqrt(np.maximum(sq[:, None] + sq[None, :] - 2.0 * (w @ w.T), 0.0))
        np.fill_diagonal(self.boundary_norms_, 1.0)  # the predicted class's own term is 0 / 1
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        logits = self.head.logits(X)
        pred = logits.argmax(axis=1)
        gaps = np.abs(logits - logits[np.arange(len(X)), pred][:, None])
        distance = (gaps / self.boundary_norms_[pred]).sum(axis=1) / (logits.shape[1] - 1)
        return distance / np.maximum(np.linalg.norm(X - self.mean_, axis=1), 1e-12)


def _top_k_mask(X: np.ndarray, percentile: float) -> np.ndarray:
    """Per row, the ``n - round(n * percentile / 100)`` largest entries (ties: the lower index first)."""
    n = X.shape[1]
    k = n - int(np.round(n * percentile / 100.0))
    mask = np.zeros(X.shape, dtype=bool)
    np.put_along_axis(mask, np.argsort(-X, axis=1, kind="stable")[:, :k], True, axis=1)
    return mask


def _sharpening(X: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """``exp(s1 / s2)`` per row (N x 1): ``s1`` the sum of all activations, ``s2`` of those in ``mask`` (ASH-S and
    SCALE); 1 where ``s2`` is 0."""
    total = X.sum(axis=1, keepdims=True)
    kept = np.where(mask, X, 0.0).sum(axis=1, keepdims=True)
    return np.exp(np.divide(total, kept, out=np.ones_like(kept), where=kept != 0))


@register("ash", gradient=False)
class ASH(_HeadDetector):
    """Activation shaping (Djurisic et al. ICLR 2023) of the penultimate features, then Energy. Per sample the
    ``percentile`` % smallest activations are zeroed and the rest are ``variant``: ``b`` binarised (each set to the
    sum of all activations over the number kept, OpenOOD's setting), ``p`` kept as they are, ``s`` scaled by
    ``exp(s1 / s2)`` (sums before / after pruning)."""
    class Options(NoOptions):  # OpenOOD v1.5's ash.yml: ASH-B, 90th percentile
        percentile: float = Field(90.0, ge=0, lt=100)
        variant: Literal["b", "p", "s"] = "b"

    def shape(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        mask = _top_k_mask(X, self.percentile)
        if self.variant == "b":
            return np.where(mask, X.sum(axis=1, keepdims=True) / mask.sum(axis=1, keepdims=True), 0.0)
        pruned = np.where(mask, X, 0.0)
        return pruned if self.variant == "p" else pruned * _sharpening(X, mask)

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return _energy(self.head.logits_from_normalised(self.shape(X)))


@register("scale", gradient=False)
class SCALE(_HeadDetector):
    """SCALE (Xu et al. ICLR 2024): ASH-S's sharpening without its pruning, Energy of the features scaled by
    ``exp(s1 / s2)`` (``s1`` the sum of all activations, ``s2`` of the ``100 - percentile`` % largest)."""
    class Options(NoOptions):  # OpenOOD v1.5's scale.yml: 85th percentile
        percentile: float = Field(85.0, ge=0, lt=100)

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        X = np.asarray(X, dtype=np.float64)
        return _energy(self.head.logits_from_normalised(X * _sharpening(X, _top_k_mask(X, self.percentile))))


@register("dice", gradient=False)
class DICE(_HeadDetector):
    """Directed sparsification (Sun & Li, ECCV 2022): the last layer keeps only the weights ``w_cj`` whose
    contribution ``w_cj * mean_j`` to the bank's mean feature is above the ``percentile`` of all C x D
    contributions; score = Energy of the logits through the sparsified layer."""

    class Options(NoOptions):  # OpenOOD v1.5's dice.yml: p = 90
        percentile: float = Field(90.0, ge=0, lt=100)

    def fit(self, X: np.ndarray, y: np.ndarray | None = None) -> "DICE":
        w = self.head.weight
        contribution = np.asarray(X, dtype=np.float64).mean(axis=0)[None, :] * w
        self.masked_weight_ = np.where(contribution > np.percentile(contribution, self.percentile), w, 0.0)
        return self

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return _energy(np.asarray(X, dtype=np.float64) @ self.masked_weight_.T + self.head.bias)


@register("odin", gradient_defaults={"temperature": 100.0, "epsilon": 50.0})
class ODIN(Detector):
    """Temperature-scaled MSP after a small input step that raises the max softmax (Liang et al. 2018).

    Model-dependent: :meth:`score_inputs` takes a differentiable ``forward`` (images -> logits for the forward
    side; ``G_low`` -> probe logits on the gradient side) and the inputs as a torch tensor."""

    class Options(NoOptions):
        temperature: float = Field(1000.0, gt=0)
        epsilon: float = Field(0.0014, ge=0)

    needs_head = True
    head_optional = True  # None on images (forward side)
    uses_model = True  # forward side: perturbs the input images

    def __init__(self, head: Head | None = None, **options: Any) -> None:
        super().__init__(head, **options)
        self.input_std: Any = None  # per-channel std of the input normalisation (set by the scorer on images)

    def step(self, grad):
        """The input perturbation ``epsilon * sign(grad) / std``: ``epsilon`` is a step in pixel space ([0, 1]
        scale) as in the ODIN paper, so in normalised input space it is divided by each channel's std (the
        authors', OpenOOD's and pytorch-ood's code). Without ``input_std`` (G_low through the probe) no division."""
        step = self.epsilon * grad.sign()
        if self.input_std is None:
            return step
        import torch

        std = torch.as_tensor(self.input_std, dtype=grad.dtype, device=grad.device)
        return step / std.view(1, -1, *([1] * (grad.dim() - 2)))

    def score_inputs(self, forward, x, batch_size: int = 256) -> np.ndarray:
        import torch
        import torch.nn.functional as F

        out = []
        for start in range(0, len(x), batch_size):
            xb = x[start : start + batch_size].detach().clone().requires_grad_(True)
            logits = forward(xb) / self.temperature
            loss = F.cross_entropy(logits, logits.argmax(dim=1))
            (grad,) = torch.autograd.grad(loss, xb)
            with torch.no_grad():
                shifted = forward(xb - self.step(grad)) / self.temperature
                out.append(torch.softmax(shifted, dim=1).max(dim=1).values.double().cpu().numpy())
        return np.concatenate(out)

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        """Feature-space ODIN through the :class:`Head` (used for ``G_low`` through the probe)."""
        import torch

        if self.head is None:
            raise ValueError("ODIN on stored features needs a head; on images use score_inputs")
        h = self.head
        w, b = torch.tensor(h.weight), torch.tensor(h.bias)
        stats = None
        if h.bn_mean is not None:
            stats = [torch.tensor(a) for a in (h.bn_mean, h.bn_var, h.bn_weight, h.bn_bias)]

        def forward(u):
            if stats is not None:
                u = (u - stats[0]) / torch.sqrt(stats[1] + h.bn_eps) * stats[2] + stats[3]
            return u @ w.T + b

        return self.score_inputs(forward, torch.tensor(np.asarray(X, dtype=np.float64)))


class _WithGradientNorm(Detector):
    """Gradient-only detectors that read ``[G_low | ||phi||^2]`` (N x (k + 1)): the projection and the squared
    norm of the whole normalised gradient ``phi``, both written by the ``project`` stage in one pass."""

    input = "g_low_and_sqnorm"

    @staticmethod
    def split(X: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        X = np.asarray(X, dtype=np.float64)
        return X[:, :-1], X[:, -1]


@register("residual", forward=False)
class Residual(_WithGradientNorm):
    """Fraction of the normalised gradient inside the ID subspace, ``||V^T phi||^2 / ||phi||^2`` (as GradOrth,
    Behpour et al. NeurIPS 2023): the part of ``phi`` that PCA discards is what makes a sample look OOD.
    On an orthonormal (PCA) basis of the rows themselves the value lies in [0, 1]; a zero gradient scores 1 (nothing
    outside). On the ``exact_nfk`` route the numerator comes from the sketched row and the denominator is the exact
    ``||phi||^2``, so values slightly above 1 occur (the ranking is what counts)."""

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        g_low, sqnorm = self.split(X)
        inside = np.einsum("nk,nk->n", g_low, g_low)
        return np.divide(inside, sqnorm, out=np.ones_like(sqnorm), where=sqnorm > 0)


@register("gradnorm_phi", forward=False)
class PhiNorm(_WithGradientNorm):
    """Minus the norm of the whole normalised gradient, ``-||phi||`` (no projection)."""

    def score_samples(self, X: np.ndarray) -> np.ndarray:
        return -np.sqrt(self.split(X)[1])


def detector_class(name: str, gradient: bool) -> type[Detector]:
    """The class registered as ``name`` on that side (``ValueError`` naming the known ones)."""
    return _registration(name, gradient).cls


def uses_probe(name: str) -> bool:
    """Whether gradient detector ``name`` needs the linear probe trained on ``G_low`` (its head or its logits)."""
    cls = detector_class(name, gradient=True)
    return cls.input == "logits" or cls.needs_head


def make_detector(name: str, kwargs: dict[str, Any] | None, gradient: bool, head: Head | None = None) -> Detector:
    """Instantiate a configured detector with its validated hyper-parameters (gradient-side defaults included)."""
    try:
        options = detector_options(name, kwargs, gradient)
    except ValueError as err:
        raise ConfigError(str(err)) from None
    cls = detector_class(name, gradient)
    return cls(head, **options) if cls.needs_head else cls(**options)
