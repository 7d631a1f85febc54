"""Measurements of what batch norm does to training (README, "What batch norm really does").

Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch Normalization Help
Optimization?" (NeurIPS) defines the quantities but publishes no code; Ioffe &
Szegedy 2015, "Batch Normalization" (ICML), Fig. 1, tracks activation percentiles.
Notation: θ_t are all parameters at step t, (x_t, y_t) the training batch,
L(θ) = loss(model(x_t; θ), y_t) and g_t = ∇L(θ_t).

``internal_covariate_shift``
    Santurkar Definition 2.1. G = ∇_{W_i} L(W_1..W_k), then the optimizer's real update
    (momentum / Adam state included, from this same gradient) is applied to every
    parameter that precedes layer i, layers i..k are kept, and on the same batch
    G′ = ∇_{W_i} L(W_1′..W_{i−1}′, W_i..W_k). Reported: l2 = ‖G − G′‖₂ and
    cosine = ⟨G, G′⟩ / (‖G‖₂ ‖G′‖₂).
``landscape_probe``
    Line-search probes along the gradient on the SAME batch, θ(η) = θ_t − η g_t for η
    in a grid (paper: [½, 4]·lr for VGG, [1/100, 30]·lr for the deep linear network):
    loss band [min_η L(θ(η)), max_η L(θ(η))], gradient-predictiveness band
    [min_η, max_η] of ‖∇L(θ_t) − ∇L(θ(η))‖₂, and effective β-smoothness
    max_η ‖∇L(θ_t) − ∇L(θ(η))‖₂ / ‖η g_t‖₂. These are NOT learning-rate-sweep
    envelopes nor differences of gradients at consecutive training steps (which most
    public reproductions compute instead).
``activation_percentiles``
    {15, 50, 85}th percentiles over the batch of the input to one (or each) unit of a
    chosen layer (Ioffe & Szegedy Fig. 1: the input to a sigmoid).
``hessian_top_eigenvalue``
    The largest-magnitude eigenvalue λ of ∇²L(θ_t) on the batch (its magnitude is ‖H‖₂), by
    power iteration on Hessian-vector products from central gradient differences,
    H v ≈ (∇L(θ_t + εv) − ∇L(θ_t − εv)) / (2ε), and the largest algebraic one λ_max
    (λ itself when λ > 0). Gradient descent is stable along the top eigenvector only
    while lr·λ_max < 2, so λ_max·lr/2 = 1 marks the stability edge; a negative λ
    (curving down) has no edge, so ‖H‖₂·lr/2 is the edge only where λ > 0.
``gradient_norm`` / ``weight_norm``
    ‖∇_p L‖₂ and ‖p‖₂ per named parameter.

Every function is usable standalone on ``(model, loss, optimizer, batch)`` (the
landscape and percentile probes need no optimizer) and, through the classes at the
end, as a :class:`~numbabn.train.Trainer` metric. All probes run the model in
training mode on the given batch, as the Trainer's steps do (a model in eval mode
is put in training mode for the probe; a layer in eval mode inside a training model
stays so), and leave everything exactly as they found it:
parameter values, buffers (BN running statistics, ``num_batches_tracked``), each
parameter's ``.grad``, the layers' forward caches (so a pending ``backward`` still
works), the training flag, the optimizer state and the state of every
``numpy.random.Generator`` a layer holds; as Trainer metrics, also the optimizer's
hyperparameters, which a loss may set for each batch (the scikit-learn estimators'
weight decay). Each forward pass of a probe starts from
that saved generator state, so a stochastic layer (NoisyBatchNorm) draws the same
noise in every pass of a probe, and, called before a training step's forward pass
(as the Trainer does), the same noise as that step: the probed function is the one
the step optimises.

Layers are addressed in the order a forward pass runs them: a :class:`Sequential`
is flattened recursively into its leaves (:func:`leaf_layers`); any other layer is
one leaf. "Parameterized layers" (the W_i of Definition 2.1) are the Linear and
Conv2d leaves (:func:`weight_layers`), indexed 0, 1, ... in that order. PyTorch
models are probed through :func:`numbabn.train.torch_adapter.from_torch`.
"""

import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any, Literal

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .. import _checks as V
from .._typing import FloatArray
from ..layers import Conv2d, Layer, Linear, Sequential
from ..layers.base import Parameter, train_for_fit
from ..optim import Optimizer

WEIGHT_LAYER_TYPES = (Linear, Conv2d)
PAPER_ETA_RANGE = (0.5, 4.0)  # Santurkar et al. Fig. 4 (VGG): η in [1/2, 4]·lr
DLN_ETA_RANGE = (0.01, 30.0)  # Santurkar et al. Fig. 10 of arXiv v3 (deep linear network): [1/100, 30]·lr
KINK_TOL = 1e-2  # hessian_top_eigenvalue: λ at ε and at ε/10 must agree to this (relative)
LOST_STEP = 0.1  # hessian_top_eigenvalue: every parameter's spacing must be below this fraction of ε


# ---------------------------------------------------------------- layer addressing
def leaf_layers(model: Layer) -> list[Layer]:
    """The layers a forward pass of ``model`` runs, in order (Sequentials flattened)."""
    if isinstance(model, Sequential):
        return [leaf for layer in model.layers for leaf in leaf_layers(layer)]
    return [model]


def weight_layers(model: Layer) -> list[tuple[int, Layer]]:
    """``[(leaf position, layer)]`` for the Linear/Conv2d leaves (and any leaf that
    says ``is_weight_layer``, such as a wrapped torch Linear/Conv, see
    :mod:`numbabn.train.torch_adapter`), in forward order."""
    return [
        (pos, leaf)
        for pos, leaf in enumerate(leaf_layers(model))
        if isinstance(leaf, WEIGHT_LAYER_TYPES) or getattr(leaf, "is_weight_layer", False)
    ]


def _check_model(fn: str, model: Any) -> None:
    if not isinstance(model, Layer):
        raise TypeError(f"{fn}: model must be a numbabn Layer, got {V.describe(model)}")


def _check_batch(fn: str, batch: Any) -> Sequence[Any]:
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise TypeError(f"{fn}: batch must be a pair (x, y), got {V.describe(batch)}")
    return batch


def _check_layer_indices(
    fn: str,
    model: Layer,
    layers: Iterable[int] | None,
) -> tuple[list[int], list[tuple[int, Layer]]]:
    """Validated indices into :func:`weight_layers` (None: all of them)."""
    weights = weight_layers(model)
    if not weights:
        raise ValueError(f"{fn}: the model has no parameterized layer (Linear/Conv2d)")
    if layers is None:
        return list(range(len(weights))), weights
    if isinstance(layers, (int, np.integer)) and not isinstance(layers, bool):
        layers = [layers]
    indices = []
    for i in layers:
        if isinstance(i, (bool, np.bool_)) or not isinstance(i, (int, np.integer)):
            raise TypeError(f"{fn}: layer indices must be ints, got {i!r}")
        if not 0 <= i < len(weights):
            raise ValueError(
                f"{fn}: unknown layer index {i}: the model has {len(weights)} parameterized "
                f"layers (Linear/Conv2d), indices 0..{len(weights) - 1}"
            )
        indices.append(int(i))
    if len(set(indices)) != len(indices) or not indices:
        raise ValueError(f"{fn}: layers must be distinct indices, at least one, got {list(layers)!r}")
    return indices, weights


def eta_grid(
    lr: float, low: float = PAPER_ETA_RANGE[0], high: float = PAPER_ETA_RANGE[1], num: int = 8, spacing: str = "linear"
) -> NDArray[np.float64]:
    """Step sizes ``lr·[low, high]`` with ``num`` points, evenly ("linear") or
    geometrically ("log") spaced. The default is Santurkar et al.'s grid for VGG."""
    return _eta_grid("eta_grid", lr, low, high, num, spacing)


def _check_positive(fn: str, name: str, value: Any) -> float:
    return V.check_number(fn, name, value, 0, low_open=True, expected="a finite number > 0")


def _eta_grid(fn: str, lr: float, low: float, high: float, num: int, spacing: str) -> NDArray[np.float64]:
    """:func:`eta_grid`, its errors named after ``fn`` (the function or class given them)."""
    for name, value in (("lr", lr), ("low", low), ("high", high)):
        _check_positive(fn, name, value)
    if high < low:
        raise ValueError(f"{fn}: high must be >= low, got low={low!r}, high={high!r}")
    V.check_int(fn, "num", num)
    if spacing == "linear":
        return float(lr) * np.linspace(low, high, num)
    if spacing == "log":
        return float(lr) * np.geomspace(low, high, num)
    raise ValueError(f"{fn}: spacing must be 'linear' or 'log', got {spacing!r}")


def _check_etas(fn: str, etas: ArrayLike) -> NDArray[np.float64]:
    arr = np.asarray(etas, dtype=np.float64) if not isinstance(etas, str) else None
    if arr is None or arr.ndim != 1 or arr.size == 0 or not np.all(np.isfinite(arr)) or np.any(arr <= 0):
        raise ValueError(
            f"{fn}: bad eta grid: etas must be a non-empty 1-D sequence of finite step sizes > 0, got {etas!r}"
        )
    return arr


# ---------------------------------------------------------------- snapshot / restore
def _all_layers(model: Layer) -> list[Layer]:
    out = [model]
    for child in model.children():
        out.extend(_all_layers(child))
    return out


class _Snapshot:
    """Everything a probe may change, saved on entry and put back exactly on exit.

    Parameter values and buffers are restored in place (``load_state_dict``), so the
    arrays keep their identity. The optimizer gets a private deep copy of its state
    for the probe, and its original state objects and hyperparameter attributes are
    put back on exit. The
    layers' attributes (forward caches, the training flag) are restored as they were:
    layers rebind their caches on every forward instead of writing into them, so the
    saved references still hold the values a pending backward needs.
    """

    def __init__(self, model: Layer, optimizer: Optimizer | None = None) -> None:
        self.model, self.optimizer = model, optimizer
        self.state = model.state_dict()
        self.params = model.parameters()
        self.grads = [(p.grad, None if p.grad is None else p.grad.copy()) for p in self.params]
        self.layers = _all_layers(model)
        self.attrs = [dict(vars(layer)) for layer in self.layers]
        # layers over foreign modules (TorchLayer) keep those modules' flags apart
        self.modes = [layer.snapshot_modes() for layer in self.layers if hasattr(layer, "snapshot_modes")]
        self.rngs = [
            (g, g.bit_generator.state)
            for layer in self.layers
            for g in vars(layer).values()
            if isinstance(g, np.random.Generator)
        ]
        if optimizer is not None:
            self.opt_objects, self.opt_hyper = optimizer.state, optimizer.hyperparameters()
            self.opt_state = optimizer.state_dict()
            optimizer.load_state_dict(self.opt_state)  # the probe works on a copy

    def __enter__(self) -> "_Snapshot":
        train_for_fit(self.model)  # the modes of the Trainer's steps (and restored on exit)
        return self

    def reset(self) -> None:
        """θ_t, the buffers and the optimizer state as saved, and every generator
        rewound: the start of a forward pass of the probe. The optimizer's
        hyperparameters stay as they are: a loss may set them for its batch right
        before the step that uses them (the scikit-learn estimators' weight decay,
        alpha over the batch's size), so after the probe's own call of the loss they
        are those of the real step of this batch, which a replayed update must use
        (with ``sample_weight``, the estimators' real step divides alpha by the
        batch's weight sum and the probe's unweighted call by its size)."""
        self.model.load_state_dict(self.state)
        if self.optimizer is not None:
            self.optimizer.load_state_dict({**self.opt_state, "hyperparameters": self.optimizer.hyperparameters()})
        for g, state in self.rngs:
            g.bit_generator.state = state

    def __exit__(self, *exc: object) -> Literal[False]:
        self.reset()
        if self.optimizer is not None:
            self.optimizer.state = self.opt_objects
            _set_hyperparameters(self.optimizer, self.opt_hyper)
        for layer, attrs in zip(self.layers, self.attrs, strict=True):
            vars(layer).clear()
            vars(layer).update(attrs)
        for restore in self.modes:
            restore()
        for p, (grad, saved) in zip(self.params, self.grads, strict=True):
            p.grad = grad
            if grad is not None:
                np.copyto(grad, saved)
        return False


def _set_hyperparameters(optimizer: Any, values: dict[str, Any]) -> None:
    for name, value in values.items():
        setattr(optimizer, name, value)


@contextmanager
def _hyperparameters_kept(optimizer: Any) -> Iterator[None]:
    """The optimizer's hyperparameters put back on exit, for the probes that call the
    loss without the optimizer in their snapshot: a loss may set them (the
    scikit-learn estimators' sets the weight decay of each batch). An optimizer
    without ``hyperparameters()`` has none to keep."""
    values = optimizer.hyperparameters() if hasattr(optimizer, "hyperparameters") else {}
    try:
        yield
    finally:
        _set_hyperparameters(optimizer, values)


def _forward_backward(model: Layer, loss: Any, x: FloatArray, y: ArrayLike) -> float:
    """One training-mode pass: sets every parameter's .grad; returns the loss."""
    value, dout = loss(model.forward(x), y)
    for p in model.parameters():
        p.grad = None
    model.backward(dout)
    return value


def _grad_of(param: Parameter) -> NDArray[np.float64]:
    """``param.grad`` as float64 (zeros when the backward pass did not reach it)."""
    if param.grad is None:
        return np.zeros(param.value.shape)
    return param.grad.astype(np.float64)


def _flat_grad(params: Iterable[Parameter]) -> NDArray[np.float64]:
    return np.concatenate([_grad_of(p).ravel() for p in params])


# ---------------------------------------------------------------- the measurements
def internal_covariate_shift(
    model: Layer,
    loss: Any,
    optimizer: Optimizer,
    batch: tuple[FloatArray, ArrayLike],
    layers: Sequence[int] | None = None,
) -> dict[str, Any]:
    """Internal covariate shift of parameterized layers (Santurkar et al. 2018, Def. 2.1).

    For each chosen layer i (index into :func:`weight_layers`; None: all)::

        G  = ∇_{W_i} L(W_1, ..., W_k; x_t, y_t)
        W_j′ = the optimizer's real update of W_j from this gradient, for every
               parameter preceding layer i (BN γ/β included); W_j′ = W_j from i on
        G′ = ∇_{W_i} L(W_1′, ..., W_{i−1}′, W_i, ..., W_k; x_t, y_t)
        l2 = ‖G − G′‖₂          cosine = ⟨G, G′⟩ / (‖G‖₂ ‖G′‖₂)

    W_i is the layer's ``weight``. The update is ``optimizer.step(params_before)``,
    so momentum buffers and Adam moments/step counts enter exactly as in the real
    step, and so do the hyperparameters as ``loss`` leaves them for this batch (a
    loss that sets the weight decay per batch, as the scikit-learn estimators' do,
    sets it for the replay as for the real step); every preceding parameter must be
    managed by ``optimizer``. A layer with no parameter before it (layer 0, unless
    a batch norm on the input precedes it) has l2 = 0, cosine = 1. ``cosine`` is NaN
    when G or G′ is 0.

    Returns ``{i: {"l2": float, "cosine": float, "grad_norm": ‖G‖₂}}`` (``grad_norm``
    puts l2 on the gradient's scale, which BN changes). Leaves model, optimizer and
    generators as found (module docstring).
    """
    fn = "internal_covariate_shift"
    _check_model(fn, model)
    x, y = _check_batch(fn, batch)
    if not hasattr(optimizer, "step") or not hasattr(optimizer, "state_dict"):
        raise TypeError(f"{fn}: optimizer must be a numbabn optimizer, got {V.describe(optimizer)}")
    indices, weights = _check_layer_indices(fn, model, layers)
    leaves = leaf_layers(model)
    result = {}
    with _Snapshot(model, optimizer) as snap:
        snap.reset()
        _forward_backward(model, loss, x, y)
        grads = [p.grad for p in snap.params]  # g_t of every parameter (new arrays per backward)
        G = {i: _grad_of(weights[i][1].weight).ravel() for i in indices}
        for i in indices:
            position, layer = weights[i]
            before = [p for leaf in leaves[:position] for p in leaf.parameters()]
            snap.reset()
            for p, g in zip(snap.params, grads, strict=True):
                p.grad = g
            optimizer.step(before)
            _forward_backward(model, loss, x, y)
            G2 = _grad_of(layer.weight).ravel()
            norms = np.linalg.norm(G[i]) * np.linalg.norm(G2)
            result[i] = {
                "l2": float(np.linalg.norm(G[i] - G2)),
                "cosine": float(G[i] @ G2 / norms) if norms > 0 else float("nan"),
                "grad_norm": float(np.linalg.norm(G[i])),
            }
    return result


def landscape_probe(
    model: Layer, loss: Any, batch: tuple[FloatArray, ArrayLike], lr: float, etas: ArrayLike | None = None
) -> dict[str, Any]:
    """Loss landscape, gradient predictiveness and effective β-smoothness along the
    gradient, by line-search probes on one batch (Santurkar et al. 2018, §3.1, Fig. 4).

    With g = ∇L(θ_t) over all parameters and θ(η) = θ_t − η g for each η in ``etas``
    (default :func:`eta_grid`\\ (lr): 8 points evenly over [½, 4]·lr, the paper's grid)::

        loss band                  [min_η L(θ(η)),  max_η L(θ(η))]
        gradient predictiveness    [min_η d(η), max_η d(η)],  d(η) = ‖∇L(θ_t) − ∇L(θ(η))‖₂
        effective β-smoothness     max_η d(η) / ‖η g‖₂

    For a quadratic L = ½ θᵀAθ: d(η) = η‖A g‖₂ and the β-smoothness is ‖A g‖₂/‖g‖₂.

    Returns a dict: ``loss`` (L(θ_t)), ``grad_norm`` (‖g‖₂), ``etas``, ``losses`` and
    ``grad_diffs`` (per η), ``loss_min``, ``loss_max``, ``grad_diff_min``,
    ``grad_diff_max``, ``beta_smoothness`` (NaN when g = 0). A step that overflows
    gives non-finite values, reported as they are.
    """
    fn = "landscape_probe"
    _check_model(fn, model)
    x, y = _check_batch(fn, batch)
    lr = _check_positive(fn, "lr", lr)
    etas = eta_grid(lr) if etas is None else _check_etas(fn, etas)
    losses, diffs = [], []
    with _Snapshot(model) as snap:
        snap.reset()
        loss0 = _forward_backward(model, loss, x, y)
        params = snap.params
        steps = [_grad_of(p) for p in params]
        g = np.concatenate([s.ravel() for s in steps])
        gnorm = float(np.linalg.norm(g))
        with np.errstate(over="ignore", invalid="ignore"):
            for eta in etas:
                snap.reset()
                for p, s in zip(params, steps, strict=True):
                    p.value -= (eta * s).astype(p.value.dtype)
                losses.append(float(_forward_backward(model, loss, x, y)))
                diffs.append(float(np.linalg.norm(g - _flat_grad(params))))
    losses, diffs = np.array(losses), np.array(diffs)
    with np.errstate(divide="ignore", invalid="ignore"):
        beta = float(np.max(diffs / (etas * gnorm))) if gnorm > 0 else float("nan")
    return {
        "loss": float(loss0),
        "grad_norm": gnorm,
        "etas": etas.tolist(),
        "losses": losses.tolist(),
        "grad_diffs": diffs.tolist(),
        "loss_min": float(losses.min()),
        "loss_max": float(losses.max()),
        "grad_diff_min": float(diffs.min()),
        "grad_diff_max": float(diffs.max()),
        "beta_smoothness": beta,
    }


def hessian_top_eigenvalue(
    model: Layer,
    loss: Any,
    batch: tuple[FloatArray, ArrayLike],
    iters: int = 20,
    tol: float = 1e-4,
    eps: float = 1e-6,
    v0: ArrayLike | None = None,
) -> dict[str, Any]:
    """Top (largest-magnitude) eigenvalue of the Hessian of L(θ; x_t, y_t) over all
    parameters, by power iteration with finite-difference Hessian-vector products::

        H v ≈ (∇L(θ_t + εv) − ∇L(θ_t − εv)) / (2ε)         ‖v‖₂ = 1
        λ_k = v_kᵀ H v_k,   v_{k+1} = H v_k / ‖H v_k‖₂

    stopping when ``|λ_k − λ_{k−1}| <= tol·|λ_k|`` or after ``iters`` products (two
    backward passes each). The difference is exact for a quadratic L, with error
    O(ε²) where L is smooth. ``eps`` is absolute (v has unit norm) and must be small
    enough that θ ± εv crosses no ReLU kink: a difference across a kink measures
    the gradient's jump divided by 2ε, not curvature. Measured on a trained 8×100
    ReLU MLP (batch 60, float64): ε from 1e-8 to 1e-5 all gave λ = 36.66, ε = 1e-4
    gave −718. The default 1e-6 sits in the middle of that plateau for float64
    networks; float32 networks need ε ~ 1e-2 and then pick up kinks: measure
    those in float64.
    A kink can lie within ε of θ_t all the same (a pre-activation of one sample
    near 0): the product is then dominated by jump/(2ε), and power iteration
    converges onto it (the ``landscape`` MLP, seed 0, step 45: λ = 3671 at
    ε = 1e-6, 1224 at 3e-6, 367 at 1e-5 — the 1/ε signature — and 74.4 at every ε
    from 3e-7 to 1e-9). So the result is checked: the Rayleigh quotient of the
    final direction is recomputed at ε/10, and where the two differ by more than
    ``KINK_TOL`` (1 %; on a smooth piece they agree to O(ε²)) the iteration is
    rerun from the same start with ε/10 (each rerun up to ``iters`` products
    more), down to 0.1·√(machine ε) of the parameters' dtype (1.5e-9 in float64).
    The check costs one product (two gradient evaluations) per call. If no ε down
    to there agrees with its ε/10 (rounding grows as ε shrinks: a float32 network
    can have no good ε), the result whose check agreed best is returned, with a
    RuntimeWarning.
    ``v0``: a starting direction (a flat array over all parameters, e.g. the
    ``vector`` of the previous call, which makes the next call converge in a few
    products); None: a fixed pseudo-random direction (seed 0), so the result does
    not depend on any generator the caller holds.

    Gradient descent's stability edge is set by the largest *algebraic* eigenvalue
    λ_max (lr·λ_max < 2), which is λ itself when λ > 0. Where λ < 0 (a ReLU
    network's batch loss can curve down more steeply than up), λ_max is found by
    Lanczos (scipy's ``eigsh``) with the same products, at the ε the check accepted,
    to relative accuracy ``tol`` (11-31 products on the experiments' networks; NaN if
    about max(``iters``, 100) do not converge). A power iteration on H − λI, used
    before, converged too slowly where λ is large in magnitude and reported λ_max up to ~1700x
    too low.

    The products need every parameter to move by steps much smaller than ε: where
    one's spacing (the gap to the next representable value) exceeds ``LOST_STEP`` ε,
    10 % of it (a diverged run's weights of 1e12 in float64; in float32 any weight
    above ~0.8 at ε = 1e-6), the products are NaN and so is the eigenvalue (such a
    parameter's coordinate rounded away: its curvature was never seen, a wholly lost
    step read 0, "flat").

    Returns ``{"eigenvalue": λ (signed), "iterations": products used (by the
    iteration that gave λ), "residual": ‖Hv − λv‖₂ / |λ|, "eps": the ε that gave
    λ, "eps_agreement": |λ(ε/10) − λ| / |λ| of its check, "max_eigenvalue": λ_max,
    "max_iterations": the products Lanczos used (0 when λ >= 0),
    "vector": v (float64 ndarray, not JSON)}``.
    Leaves model, gradients and generators as found (module docstring).
    """
    fn = "hessian_top_eigenvalue"
    _check_model(fn, model)
    x, y = _check_batch(fn, batch)
    _check_power_iteration(fn, iters, tol, eps)
    with _Snapshot(model) as snap:
        params = snap.params
        size = sum(p.value.size for p in params)
        v = np.random.default_rng(0).standard_normal(size) if v0 is None else np.array(v0, dtype=np.float64)
        if v.shape != (size,) or not np.all(np.isfinite(v)) or not np.any(v):
            raise ValueError(
                f"{fn}: v0 must be a finite non-zero vector of the {size} parameters, got shape {np.shape(v0)}"
            )
        start = v / np.linalg.norm(v)
        shapes = [(p.value.shape, p.value.size) for p in params]
        floor = 0.1 * float(np.sqrt(max(np.finfo(p.value.dtype).eps for p in params)))

        # The coarsest spacing between a parameter's value and the next representable
        # one: a step ±εu cannot move a parameter by less (NaN: a non-finite one).
        coarsest = max(float(np.max(np.spacing(np.abs(p.value)), initial=0.0)) for p in params)

        def grad_at(direction: NDArray[np.float64]) -> NDArray[np.float64]:
            snap.reset()
            offset = 0
            for p, (shape, n) in zip(params, shapes, strict=True):
                p.value += direction[offset : offset + n].reshape(shape).astype(p.value.dtype)
                offset += n
            _forward_backward(model, loss, x, y)
            return _flat_grad(params)

        def product(u: NDArray[np.float64], e: float) -> NDArray[np.float64]:
            if not coarsest <= LOST_STEP * e:
                # A parameter too large (or too coarse: float32) to move by ε: its
                # coordinate of every step rounds away and the difference never sees
                # its curvature (weights of 1e12 read as a flat loss, eigenvalue 0).
                return np.full(u.shape, np.nan)
            return (grad_at(e * u) - grad_at(-e * u)) / (2 * e)

        def power(
            e: float, first: NDArray[np.float64]
        ) -> tuple[float, int, float, NDArray[np.float64], NDArray[np.float64]]:
            """Power iteration on H from ``first`` -> (λ, products, residual, last
            direction, the direction λ is the Rayleigh quotient of)."""
            v, lam, k = first, float("nan"), 0
            u, residual = v, float("inf")
            for k in range(1, iters + 1):  # noqa: B007  (k is returned: the iterations used)
                hv = product(v, e)
                u, previous, lam = v, lam, float(v @ hv)
                norm = np.linalg.norm(hv)
                residual = float(np.linalg.norm(hv - lam * v) / abs(lam)) if lam != 0 else float("inf")
                if norm == 0 or not np.isfinite(norm):
                    break
                v = hv / norm
                if abs(lam - previous) <= tol * abs(lam):
                    break
            return lam, k, residual, v, u

        best: dict[str, Any] | None = None  # the checked result whose check agreed best
        while True:
            lam, k, residual, v, u = power(eps, start)
            result = {"eigenvalue": lam, "iterations": k, "residual": residual, "eps": eps, "vector": v}
            if np.isfinite(lam):
                check = float(u @ product(u, eps / 10))
                agreement = abs(check - lam) / abs(lam) if lam != 0 else (0.0 if check == 0 else float("inf"))
                result["eps_agreement"] = agreement if np.isfinite(agreement) else float("inf")
                if best is None or result["eps_agreement"] < best["eps_agreement"]:
                    best = result
                if agreement <= KINK_TOL:
                    break
                if np.isfinite(check) and eps / 10 >= floor:
                    eps /= 10  # a kink within ε: its jump / 2ε, not curvature
                    continue
            else:
                result["eps_agreement"] = float("nan")
                if best is None:  # not even the first ε measured anything: NaN
                    if np.isfinite(coarsest) and coarsest > LOST_STEP * eps:
                        warnings.warn(
                            f"{fn}: eps={eps:.3g} is too small a step for these parameters (the largest is "
                            f"{coarsest:.3g} from its next representable value, more than {LOST_STEP} eps): the "
                            f"eigenvalue is NaN; pass eps >= {coarsest / LOST_STEP:.3g} (float32: measure in float64)",
                            RuntimeWarning,
                            stacklevel=2,
                        )
                    break
            # No ε agreed with the next smaller one (rounding grows as ε shrinks: a float32
            # network can have no good ε; a smaller one can lose its step to rounding):
            # the closest agreement, flagged.
            result = best
            warnings.warn(
                f"{fn}: no finite-difference step gave a stable eigenvalue (closest: "
                f"{result['eigenvalue']:.6g} at eps={result['eps']:.3g}, which differs by "
                f"{result['eps_agreement']:.3g} relative from the value at eps/10); measure in float64",
                RuntimeWarning,
                stacklevel=2,
            )
            break
        lam = result["eigenvalue"]
        if np.isfinite(lam) and lam < 0:
            # λ_max by Lanczos at the checked ε, started away from λ's eigenvector (a
            # warm start ``v0`` is that vector, whose Krylov space is itself): the
            # fixed direction less its component along it.
            other = np.random.default_rng(0).standard_normal(size)
            other -= (other @ result["vector"]) * result["vector"]
            result["max_eigenvalue"], result["max_iterations"] = _largest_algebraic(
                lambda u: product(u, result["eps"]), other / np.linalg.norm(other), lam, iters, tol
            )
        else:
            result["max_eigenvalue"], result["max_iterations"] = lam, 0
    return result


def _largest_algebraic(
    product: Callable[[NDArray[np.float64]], NDArray[np.float64]],
    start: NDArray[np.float64],
    lam: float,
    iters: int,
    tol: float,
) -> tuple[float, int]:
    """(λ_max, products) of the symmetric operator ``product`` whose largest-magnitude
    eigenvalue ``lam`` is negative, by Lanczos (scipy's ARPACK ``eigsh``, "LA") from
    ``start``, to relative accuracy ``tol``, within about max(``iters``, 100) products
    (on the experiments' networks it took 11-31); where that does not converge (a
    λ_max near 0), on the operator shifted by −λ, to an absolute accuracy of about
    tol·|λ| (as many products more); NaN if neither converges or a product is not finite.

    Power iteration on H − λI (the method before 2026-12-05) converges at the rate
    (μ₂ − λ)/(λ_max − λ), close to 1 when |λ| is large against the gap below λ_max,
    and its test of the shifted value let the error reach tol·|λ|: it reported
    λ_max 3.6x to ~1700x too low (a deep linear BN net, λ = −1268: 0.48 against 340.8)."""
    from scipy.sparse.linalg import ArpackError, LinearOperator, eigsh

    n = start.size
    if n < 2:  # one parameter: its one eigenvalue
        return lam, 0
    ncv = min(n, 20)  # Lanczos vectors kept; a restart costs about ncv products
    count = [0]

    def largest(shift: float) -> float:
        """The largest eigenvalue of the operator − shift·I (NaN: not converged, or a
        product that was not finite, which ARPACK reports as an error)."""

        def matvec(u: NDArray[np.float64]) -> NDArray[np.float64]:
            count[0] += 1
            u = np.asarray(u, dtype=np.float64).ravel()
            hu = product(u) - shift * u
            if not np.all(np.isfinite(hu)):
                raise _NotFinite
            return hu

        op = LinearOperator((n, n), matvec=matvec, dtype=np.float64)
        budget = max(1, max(iters, 100) // ncv)
        try:
            top = eigsh(op, k=1, which="LA", v0=start, tol=tol, ncv=ncv, maxiter=budget, return_eigenvectors=False)
        except (ArpackError, _NotFinite):  # ArpackNoConvergence is an ArpackError
            return float("nan")
        return float(top[0])

    # ARPACK's test is relative to the Ritz value: a λ_max of 0 (a loss flat in every
    # direction it does not curve down) never passes it. Shifted by λ, the top is
    # λ_max − λ >= |λ|, which it does pass (to an absolute accuracy of about tol·|λ|).
    top = largest(0.0)
    return (top if np.isfinite(top) else largest(lam) + lam), count[0]


class _NotFinite(Exception):
    """A Hessian-vector product with a non-finite entry, inside ARPACK's iteration."""


def _check_power_iteration(fn: str, iters: int, tol: float, eps: float) -> None:
    """:func:`hessian_top_eigenvalue`'s settings: ``iters`` a positive int, ``tol``
    and ``eps`` finite numbers > 0."""
    V.check_int(fn, "iters", iters)
    for name, value in (("tol", tol), ("eps", eps)):
        _check_positive(fn, name, value)


def _leaf_index(fn: str, model: Layer, layer: "int | Layer") -> tuple[int, list[Layer]]:
    leaves = leaf_layers(model)
    if isinstance(layer, Layer):
        for k, leaf in enumerate(leaves):
            if leaf is layer:
                return k, leaves
        raise ValueError(f"{fn}: layer {layer._short()} is not one of the model's leaf layers")
    if isinstance(layer, (bool, np.bool_)) or not isinstance(layer, (int, np.integer)):
        raise TypeError(f"{fn}: layer must be a leaf Layer of the model or its position (int), got {layer!r}")
    if not 0 <= layer < len(leaves):
        raise ValueError(
            f"{fn}: unknown layer position {layer}: the model has {len(leaves)} leaf layers, "
            f"positions 0..{len(leaves) - 1}"
        )
    return int(layer), leaves


def _check_q(fn: str, q: ArrayLike) -> NDArray[np.float64]:
    """``q`` as a float64 array: a non-empty 1-D sequence of percentiles in [0, 100]."""
    try:
        arr = np.asarray(q, dtype=np.float64)
    except (TypeError, ValueError):
        arr = None
    if arr is None or arr.ndim != 1 or arr.size == 0 or np.any(~np.isfinite(arr)) or np.any((arr < 0) | (arr > 100)):
        raise ValueError(f"{fn}: q must be a non-empty 1-D sequence of percentiles in [0, 100], got {V.describe(q)}")
    return arr


def activation_percentiles(
    model: Layer, layer: "int | Layer", batch: Any, q: ArrayLike = (15, 50, 85), unit: int | None = None
) -> NDArray[np.float64]:
    """Percentiles over the batch of the input to ``layer`` (Ioffe & Szegedy 2015, Fig. 1).

    ``layer``: a leaf layer of the model, or its position in :func:`leaf_layers`.
    The model runs in training mode on ``batch`` = (x, y) (``y`` unused; a bare x is
    accepted too) up to that layer; its input h has units on axis 1 (features, or
    channels of an image). Per unit c, over every other axis (the batch, and H, W)::

        P[k, c] = percentile_{q_k}(h[:, c, ...])         (numpy.percentile, linear)

    Returns P of shape (len(q), units), or (len(q),) for one ``unit``.
    """
    fn = "activation_percentiles"
    _check_model(fn, model)
    x = batch[0] if isinstance(batch, (tuple, list)) else batch
    q = _check_q(fn, q)
    position, leaves = _leaf_index(fn, model, layer)
    with _Snapshot(model) as snap:
        snap.reset()
        h = x
        for leaf in leaves[:position]:
            h = leaf.forward(h)
        h = np.asarray(h)
    if h.ndim < 2:
        raise ValueError(f"{fn}: the input to layer {position} has shape {h.shape}; it needs a unit axis 1")
    units = h.shape[1]
    values = np.moveaxis(h, 1, -1).reshape(-1, units)
    if unit is not None:
        if isinstance(unit, (bool, np.bool_)) or not isinstance(unit, (int, np.integer)) or not 0 <= unit < units:
            raise ValueError(
                f"{fn}: unit must be an int in [0, {units}) for the input to layer {position}, got {unit!r}"
            )
        return np.percentile(values[:, unit], q)
    return np.percentile(values, q, axis=0)


def gradient_norm(model: Layer, loss: Any, batch: tuple[FloatArray, ArrayLike]) -> dict[str, float]:
    """``{name: ‖∇_p L(θ_t; x_t, y_t)‖₂}`` per named parameter (training mode)."""
    fn = "gradient_norm"
    _check_model(fn, model)
    x, y = _check_batch(fn, batch)
    with _Snapshot(model) as snap:
        snap.reset()
        _forward_backward(model, loss, x, y)
        return {name: float(np.linalg.norm(_grad_of(p))) for name, p in model.named_parameters()}


def weight_norm(model: Layer) -> dict[str, float]:
    """``{name: ‖p‖₂}`` per named parameter (computed in float64)."""
    _check_model("weight_norm", model)
    return {name: float(np.linalg.norm(p.value.astype(np.float64))) for name, p in model.named_parameters()}


# ---------------------------------------------------------------- Trainer metrics
class Metric:
    """A measurement the :class:`~numbabn.train.Trainer` calls every ``record_every``
    steps as ``metric(model, loss, optimizer, (x_t, y_t))``, before that step's forward
    pass and optimizer step (so it sees θ_t and the step's batch). ``name`` keys its series in
    the :class:`~numbabn.train.History`. Any callable with that signature works too
    (its ``__name__`` is the key).

    A metric that carries state from one call to the next keeps it in its attributes
    and forgets it in :meth:`reset`, which a Trainer's first ``fit`` calls (a run's
    start; later calls continue it), so a run's values do not depend on what the
    instance measured before. A
    ``fit`` that raises puts every Metric's attributes back as they were before the
    call (as references: state must be rebound, not changed in place)."""

    name = "metric"

    def reset(self) -> None:
        """Forget the state of earlier calls (none here); a Trainer's first ``fit``
        calls it before the run's first step."""

    def __call__(self, model: Layer, loss: Any, optimizer: Optimizer, batch: tuple[FloatArray, ArrayLike]) -> Any:
        raise NotImplementedError

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"


class InternalCovariateShift(Metric):
    """:func:`internal_covariate_shift` of ``layers`` with the trainer's optimizer."""

    def __init__(self, layers: Sequence[int] | None = None, name: str = "ics") -> None:
        self.layers, self.name = layers, name

    def __call__(self, model: Layer, loss: Any, optimizer: Optimizer, batch: tuple[FloatArray, ArrayLike]) -> Any:
        return internal_covariate_shift(model, loss, optimizer, batch, layers=self.layers)


class LandscapeProbe(Metric):
    """:func:`landscape_probe` with η = ``lr``·[low, high] (``num`` points, ``spacing``
    "linear" or "log"); ``lr`` None: the optimizer's current ``lr``."""

    def __init__(
        self,
        lr: float | None = None,
        low: float = PAPER_ETA_RANGE[0],
        high: float = PAPER_ETA_RANGE[1],
        num: int = 8,
        spacing: str = "linear",
        name: str = "landscape",
    ) -> None:
        _eta_grid(type(self).__name__, 1.0 if lr is None else lr, low, high, num, spacing)  # now, not mid-training
        self.lr, self.low, self.high, self.num, self.spacing, self.name = lr, low, high, num, spacing, name

    def __call__(self, model: Layer, loss: Any, optimizer: Optimizer, batch: tuple[FloatArray, ArrayLike]) -> Any:
        lr = self.lr if self.lr is not None else getattr(optimizer, "lr", None)
        if lr is None:
            raise ValueError(f"{self!r}: no lr given and the optimizer has no 'lr'")
        etas = _eta_grid(type(self).__name__, lr, self.low, self.high, self.num, self.spacing)
        with _hyperparameters_kept(optimizer):
            return landscape_probe(model, loss, batch, lr, etas=etas)


class HessianEigenvalue(Metric):
    """:func:`hessian_top_eigenvalue`, warm-started from the previous call's vector
    (the top eigenvector moves little between probes, so later calls need a few
    products instead of ``iters``). The first call after construction or
    :meth:`reset` (every Trainer's run starts with one), and a call on a model with
    another number of parameters, start from the function's fixed direction.
    Records ``eigenvalue``, ``iterations``, ``residual``, ``eps``,
    ``eps_agreement``, ``max_eigenvalue`` and ``max_iterations`` (not the vector)."""

    def __init__(self, iters: int = 20, tol: float = 1e-4, eps: float = 1e-6, name: str = "hessian") -> None:
        _check_power_iteration(type(self).__name__, iters, tol, eps)  # now, not at the first probe
        self.iters, self.tol, self.eps, self.name = iters, tol, eps, name
        self._vector: NDArray[np.float64] | None = None

    def reset(self) -> None:
        """Forget the warm-start vector: the next call starts cold."""
        self._vector = None

    def __call__(self, model: Layer, loss: Any, optimizer: Optimizer, batch: tuple[FloatArray, ArrayLike]) -> Any:
        v0 = self._vector
        if v0 is not None and v0.size != sum(p.value.size for p in model.parameters()):
            v0 = None  # another model: start afresh
        with _hyperparameters_kept(optimizer):
            result = hessian_top_eigenvalue(model, loss, batch, iters=self.iters, tol=self.tol, eps=self.eps, v0=v0)
        self._vector = result.pop("vector")
        return result


class ActivationPercentiles(Metric):
    """:func:`activation_percentiles` of the input to ``layer`` (position or leaf)."""

    def __init__(
        self, layer: "int | Layer", q: ArrayLike = (15, 50, 85), unit: int | None = None, name: str = "percentiles"
    ) -> None:
        self.layer, self.q, self.unit, self.name = layer, tuple(_check_q(type(self).__name__, q).tolist()), unit, name

    def __call__(self, model: Layer, loss: Any, optimizer: Optimizer, batch: tuple[FloatArray, ArrayLike]) -> Any:
        return activation_percentiles(model, self.layer, batch, q=self.q, unit=self.unit)


class GradientNorm(Metric):
    """:func:`gradient_norm` per named parameter."""

    def __init__(self, name: str = "grad_norm") -> None:
        self.name = name

    def __call__(self, model: Layer, loss: Any, optimizer: Optimizer, batch: tuple[FloatArray, ArrayLike]) -> Any:
        with _hyperparameters_kept(optimizer):
            return gradient_norm(model, loss, batch)


class WeightNorm(Metric):
    """:func:`weight_norm` per named parameter."""

    def __init__(self, name: str = "weight_norm") -> None:
        self.name = name

    def __call__(self, model: Layer, loss: Any, optimizer: Optimizer, batch: tuple[FloatArray, ArrayLike]) -> Any:
        return weight_norm(model)


# Short names of the metrics that need no arguments (``BNMLPClassifier(record_metrics=
# ["ics", ...])``); a configured instance covers anything else.
METRIC_NAMES = {
    "ics": InternalCovariateShift,
    "landscape": LandscapeProbe,
    "grad_norm": GradientNorm,
    "weight_norm": WeightNorm,
}
