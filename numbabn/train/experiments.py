"""The batch-norm papers' experiments at small scale, one function each, and the
``EXPERIMENTS`` registry behind ``numbabn experiment NAME`` (:mod:`numbabn.cli.experiment`).

Every experiment is called as ``fn(*, steps=None, seed=0, lr=None, out=None,
progress=True)``: ``steps`` and ``lr`` None mean the set-up described in its
docstring; ``seed`` fixes data split, initialisation, batch order and noise; ``out``
is an existing directory that receives ``<name>.json`` (every raw series, as
:meth:`History.to_dict`, plus the configuration and the summary) and PNG figures,
or None to write nothing; ``progress`` shows progress bars on a terminal. It returns
a JSON-ready summary dict (the numbers quoted in docs/what_bn_does.md).

Data: scikit-learn's bundled 8×8 digits (1797 images, no download), split 70/30
(stratified by ``seed``) and standardised per pixel with the training statistics;
and, for the deep linear network, Gaussian data from a random linear map. All
networks compute in float64 (probe differences at η = lr/100 need the precision)
and train with plain SGD (no momentum), batch 60, except the deep linear network
(full-batch gradient descent). The probes are the line-search measurements of
:mod:`numbabn.train.metrics` (same batch, θ_t − η g_t), not learning-rate sweeps.

The papers: Ioffe & Szegedy 2015, "Batch Normalization: Accelerating Deep Network
Training by Reducing Internal Covariate Shift" (ICML); Santurkar, Tsipras, Ilyas &
Madry 2018, "How Does Batch Normalization Help Optimization?" (NeurIPS).
"""
import json
import math
import time
from contextlib import contextmanager

import numpy as np

from ..layers import (BatchNorm1d, BatchNorm2d, Conv2d, Flatten, Linear, MSELoss, ReLU, Sequential, Sigmoid,
                      SoftmaxCrossEntropy)
from ..optim import SGD
from ..registry import get_layer
from . import _plots as P
from .history import jsonable
from .metrics import DLN_ETA_RANGE, ActivationPercentiles, InternalCovariateShift, LandscapeProbe, leaf_layers
from .trainer import Trainer

DTYPE = np.float64
BATCH = 60             # Ioffe & Szegedy's MNIST batch size, used throughout
RECORDS = 40           # probes per run: every steps // RECORDS steps
HIDDEN = (100, 100, 100)


# ---------------------------------------------------------------- set-up helpers
@contextmanager
def single_threaded():
    """Numba kernels, BLAS and OpenMP on one thread while an experiment runs.

    These models are tiny (batch 60, width 100): thread hand-offs cost more than the
    arithmetic, and on a loaded machine two threads per step were measured at 5-50 ms
    against 0.75 ms on one. One thread also makes BLAS results reproducible.
    """
    from threadpoolctl import threadpool_limits

    from .._threads import limit_threads

    with limit_threads(1), threadpool_limits(1):
        yield


def digits(seed, images=False):
    """``(X_train, X_test, y_train, y_test)`` of sklearn's digits: stratified 70/30 split
    by ``seed``, x ← (x − mean_train) / std_train per pixel (constant pixels → 0).
    ``images=True`` gives (N, 1, 8, 8) arrays instead of (N, 64)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    data = load_digits()
    X_tr, X_te, y_tr, y_te = train_test_split(data.data.astype(DTYPE), data.target.astype(np.int64),
                                              test_size=0.3, random_state=seed, stratify=data.target)
    mean, std = X_tr.mean(axis=0), X_tr.std(axis=0)
    std[std == 0] = 1.0
    X_tr, X_te = (X_tr - mean) / std, (X_te - mean) / std
    if images:
        X_tr, X_te = X_tr.reshape(-1, 1, 8, 8), X_te.reshape(-1, 1, 8, 8)
    return X_tr, X_te, y_tr, y_te


def norm_factory(kind, seed, dim=1):
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


def mlp(kind, seed, activation=ReLU, widths=(64, *HIDDEN, 10)):
    """Linear → [norm] → activation per hidden layer, then a Linear output layer
    (Glorot-uniform weights from ``seed``). Norm before the nonlinearity, as in Ioffe
    & Szegedy §3.2."""
    rng, norm = np.random.default_rng(seed), norm_factory(kind, seed)
    layers = []
    for fan_in, fan_out in zip(widths[:-2], widths[1:-1]):
        layers.append(Linear(fan_in, fan_out, rng=rng, dtype=DTYPE))
        if norm is not None:
            layers.append(norm(fan_out))
        layers.append(activation())
    layers.append(Linear(widths[-2], widths[-1], rng=rng, dtype=DTYPE))
    return Sequential(*layers)


def cnn(kind, seed):
    """Conv2d(1→16, 3×3, pad 1) → [BN2d] → ReLU → Conv2d(16→32, 3×3, stride 2, pad 1)
    → [BN2d] → ReLU → Flatten → Linear(512 → 10), for 8×8 digit images."""
    rng, norm = np.random.default_rng(seed), norm_factory(kind, seed, dim=2)
    layers = [Conv2d(1, 16, 3, padding=1, rng=rng, dtype=DTYPE)]
    layers += [norm(16)] if norm else []
    layers += [ReLU(), Conv2d(16, 32, 3, stride=2, padding=1, rng=rng, dtype=DTYPE)]
    layers += [norm(32)] if norm else []
    layers += [ReLU(), Flatten(), Linear(32 * 4 * 4, 10, rng=rng, dtype=DTYPE)]
    return Sequential(*layers)


def deep_linear(kind, seed, depth=25, width=10):
    """Santurkar et al.'s deep linear network: ``depth`` Linear(width, width) layers,
    with BatchNorm1d after each but the last for ``kind="bn"``."""
    rng, norm = np.random.default_rng(seed), norm_factory(kind, seed)
    layers = []
    for i in range(depth):
        layers.append(Linear(width, width, rng=rng, dtype=DTYPE))
        if norm is not None and i < depth - 1:
            layers.append(norm(width))
    return Sequential(*layers)


def _check_args(name, steps, default_steps, lr, default_lr):
    if steps is None:
        steps = default_steps
    elif isinstance(steps, bool) or not isinstance(steps, (int, np.integer)) or steps < 1:
        raise ValueError(f"experiment {name}: steps must be a positive int, got {steps!r}")
    if lr is None:
        lr = default_lr
    elif isinstance(lr, bool) or not isinstance(lr, (int, float)) or not math.isfinite(lr) or lr <= 0:
        raise ValueError(f"experiment {name}: lr must be a finite number > 0, got {lr!r}")
    return int(steps), float(lr)


def _train(model, loss, data, *, steps, lr, seed, metrics=(), eval_every=None, batch_size=BATCH, progress, label):
    X_tr, X_te, y_tr, y_te = data
    every = max(1, steps // RECORDS)
    trainer = Trainer(model, loss, SGD(model.parameters(), lr=lr), batch_size=batch_size, seed=seed,
                      metrics=metrics, record_every=every, eval_every=eval_every or every,
                      eval_data=None if X_te is None else (X_te, y_te), verbose=int(bool(progress)), label=label)
    return trainer.fit(X_tr, y_tr, steps=steps)


def _finish(name, out, config, histories, summary, figures, started):
    """Write ``<name>.json`` and the figures (when ``out`` is given); the summary."""
    summary = jsonable(summary)
    if out is not None:
        summary["figures"] = [fig(out) for fig in figures]
        path = out / f"{name}.json"
        payload = {"experiment": name, "config": config, "summary": summary,
                   "runs": {k: h.to_dict() for k, h in histories.items()}}
        path.write_text(json.dumps(payload))
        summary["json"] = str(path)
    summary["seconds"] = round(time.perf_counter() - started, 2)
    return summary


def _series(history, metric, key):
    steps, values = history.metric(metric)
    return np.array(steps), np.array([v[key] for v in values], dtype=np.float64)


def _compare(bn, std):
    """Per recorded step r_t = bn_t / std_t: the median ratio, on how many steps BN's
    value is the smaller one, and each network's median."""
    return {"median_ratio": float(np.median(bn / std)), "bn_smaller_steps": int(np.sum(bn < std)),
            "recorded_steps": len(bn), "standard_median": float(np.median(std)), "bn_median": float(np.median(bn))}


def _landscape_summary(runs):
    """BN-vs-standard comparison of the three landscape measures per recorded step."""
    out = {}
    for measure, (low, high) in {"loss_band_width": ("loss_min", "loss_max"),
                                 "grad_pred_max": (None, "grad_diff_max"),
                                 "beta_smoothness": (None, "beta_smoothness")}.items():
        values = {}
        for net in ("standard", "bn"):
            _, hi = _series(runs[net], "landscape", high)
            values[net] = hi - _series(runs[net], "landscape", low)[1] if low else hi
        out[measure] = _compare(values["bn"], values["standard"])
    return out


def _landscape_panels(axes, runs, prefix=""):
    """Loss band, gradient-predictiveness band and β-smoothness (Santurkar Fig. 4 a-c)."""
    for net, h in runs.items():
        steps, lo = _series(h, "landscape", "loss_min")
        band_hi = _series(h, "landscape", "loss_max")[1]
        P.band(axes[0], steps, lo, band_hi, net)
        P.band(axes[1], steps, _series(h, "landscape", "grad_diff_min")[1],
               _series(h, "landscape", "grad_diff_max")[1], net)
        P.line(axes[2], steps, _series(h, "landscape", "beta_smoothness")[1], net)
    P.label(axes[0], "step", "loss L(θ − ηg) over η", f"{prefix}loss landscape", log=True)
    P.label(axes[1], "step", "‖∇L(θ) − ∇L(θ − ηg)‖ over η", f"{prefix}gradient predictiveness", log=True)
    P.label(axes[2], "step", "max_η ‖Δ∇L‖ / ‖ηg‖", f"{prefix}effective β-smoothness", log=True)


# ---------------------------------------------------------------- the experiments
def ioffe(*, steps=None, seed=0, lr=None, out=None, progress=True):
    """Ioffe & Szegedy 2015 Fig. 1: sigmoid MLP with vs without batch norm on digits.

    3 hidden layers × 100 sigmoid units, 10-way softmax, batch 60, SGD (default
    3000 steps, lr 0.2, the same for both nets); BN before each sigmoid. Records the
    test accuracy and the {15, 50, 85}th percentiles over the batch of the input to
    unit 0 of the last hidden layer's sigmoid, every steps/60 steps (Fig. 1 a-c).
    """
    started = time.perf_counter()
    steps, lr = _check_args("ioffe", steps, 3000, lr, 0.2)
    every = max(1, steps // 60)
    runs = {}
    with single_threaded():
        data = digits(seed)
        for net in ("standard", "bn"):
            model = mlp(net, seed, activation=Sigmoid)
            last_sigmoid = max(k for k, leaf in enumerate(leaf_layers(model)) if isinstance(leaf, Sigmoid))
            runs[net] = _train(model, SoftmaxCrossEntropy(), data, steps=steps, lr=lr, seed=seed,
                               metrics=[ActivationPercentiles(last_sigmoid, q=(15, 50, 85), unit=0)],
                               eval_every=every, progress=progress, label=f"ioffe {net}")
    summary = {}
    for net, h in runs.items():
        acc = np.array(h.eval["accuracy"])
        reached = [s for s, a in zip(h.eval["step"], acc) if a >= 0.9]
        med = np.array(h.metrics["percentiles"]["value"])[:, 1]
        summary[f"{net}_final_test_accuracy"] = float(acc[-1])
        summary[f"{net}_steps_to_90pct_test"] = reached[0] if reached else None
        summary[f"{net}_median_input_range"] = [float(med.min()), float(med.max())]

    def fig1(out):
        fig, axes = P.figure(1, 3, "Ioffe & Szegedy 2015, Fig. 1 (digits, 3×100 sigmoid MLP, batch 60)")
        for net, h in runs.items():
            P.line(axes[0, 0], h.eval["step"], h.eval["accuracy"], net)
        P.label(axes[0, 0], "step", "test accuracy", "(a) test accuracy")
        for ax, net in zip(axes[0, 1:], ("standard", "bn")):
            s, v = runs[net].metric("percentiles")
            v = np.array(v)
            ax.fill_between(s, v[:, 0], v[:, 2], color=P.COLORS[net], alpha=0.3, label="15th-85th percentile")
            ax.plot(s, v[:, 1], color=P.COLORS[net], label="median")
            P.label(ax, "step", "sigmoid input (last hidden layer, unit 0)",
                    f"({'b' if net == 'standard' else 'c'}) {P.LABELS[net]}")
        axes[0, 2].sharey(axes[0, 1])
        return P.save(fig, out, "ioffe_fig1.png")

    config = {"paper": "Ioffe & Szegedy 2015 Fig. 1", "steps": steps, "lr": lr, "seed": seed, "batch": BATCH,
              "hidden": HIDDEN, "activation": "sigmoid", "percentile_every": every}
    return _finish("ioffe", out, config, runs, summary, [fig1], started)


def landscape(*, steps=None, seed=0, lr=None, out=None, progress=True):
    """Santurkar et al. 2018 Fig. 4: loss landscape, gradient predictiveness and
    effective β-smoothness, standard vs batch norm.

    An MLP (3×100 ReLU) and a small CNN (two 3×3 conv layers + BN2d) on digits, SGD
    (default 1000 steps, lr 0.1, where both train), batch 60. Every steps/40 steps a
    line-search probe on the current batch along g_t with η in [½, 4]·lr (8 points).
    The summary compares BN with standard per recorded step: median ratio BN/standard
    and on how many recorded steps BN's value is smaller.
    """
    started = time.perf_counter()
    steps, lr = _check_args("landscape", steps, 1000, lr, 0.1)
    runs = {}
    with single_threaded():
        for arch, build in (("mlp", mlp), ("cnn", cnn)):
            data = digits(seed, images=arch == "cnn")
            for net in ("standard", "bn"):
                runs[f"{arch}_{net}"] = _train(build(net, seed), SoftmaxCrossEntropy(), data, steps=steps, lr=lr,
                                               seed=seed, metrics=[LandscapeProbe()], progress=progress,
                                               label=f"landscape {arch} {net}")
    summary = {}
    for arch in ("mlp", "cnn"):
        pair = {net: runs[f"{arch}_{net}"] for net in ("standard", "bn")}
        summary[arch] = _landscape_summary(pair)
        summary[arch].update({f"{net}_final_test_accuracy": h.eval["accuracy"][-1] for net, h in pair.items()})

    def fig4(out):
        fig, axes = P.figure(2, 3, "Santurkar et al. 2018, Fig. 4 (digits; η ∈ [½, 4]·lr, same batch)")
        for row, arch in enumerate(("mlp", "cnn")):
            _landscape_panels(axes[row], {net: runs[f"{arch}_{net}"] for net in ("standard", "bn")},
                              prefix=f"{arch.upper()}: ")
        return P.save(fig, out, "landscape_fig4.png")

    config = {"paper": "Santurkar et al. 2018 Fig. 4", "steps": steps, "lr": lr, "seed": seed, "batch": BATCH,
              "eta_range_times_lr": [0.5, 4.0], "etas": 8, "probe_every": max(1, steps // RECORDS)}
    return _finish("landscape", out, config, runs, summary, [fig4], started)


def ics(*, steps=None, seed=0, lr=None, out=None, progress=True):
    """Santurkar et al. 2018 Fig. 3: internal covariate shift (Definition 2.1),
    standard vs batch norm vs noisy batch norm.

    MLP 3×100 ReLU on digits, SGD (default 1000 steps, lr 0.1), batch 60. Every
    steps/40 steps, for weight layers 1 and 3 (the second hidden layer and the output
    layer): ℓ2 = ‖G − G′‖ and cos(G, G′), G′ after the real SGD update of every
    earlier parameter. The summary gives the medians over the recorded steps.
    """
    started = time.perf_counter()
    steps, lr = _check_args("ics", steps, 1000, lr, 0.1)
    layers = (1, 3)
    nets = ("standard", "bn", "noisy")
    runs = {}
    with single_threaded():
        data = digits(seed)
        for net in nets:
            runs[net] = _train(mlp(net, seed), SoftmaxCrossEntropy(), data, steps=steps, lr=lr, seed=seed,
                               metrics=[InternalCovariateShift(layers=layers)], progress=progress,
                               label=f"ics {net}")

    def series(net, layer, key):
        s, v = runs[net].metric("ics")
        return np.array(s), np.array([r[str(layer)][key] for r in v], dtype=np.float64)

    summary = {}
    for layer in layers:
        entry = {}
        for net in nets:
            l2, cos, g = (series(net, layer, k)[1] for k in ("l2", "cosine", "grad_norm"))
            entry[net] = {"median_l2": float(np.median(l2)), "median_cosine": float(np.median(cos)),
                          "median_relative_l2": float(np.median(l2 / g))}
        entry["bn_reduces_ics_l2"] = entry["bn"]["median_l2"] < entry["standard"]["median_l2"]
        entry["bn_reduces_ics_cosine"] = entry["bn"]["median_cosine"] > entry["standard"]["median_cosine"]
        summary[f"layer{layer}"] = entry
    summary.update({f"{net}_final_test_accuracy": runs[net].eval["accuracy"][-1] for net in nets})

    def fig3(out):
        fig, axes = P.figure(2, 2, "Santurkar et al. 2018, Fig. 3: internal covariate shift (digits MLP)")
        for row, layer in enumerate(layers):
            for net in nets:
                P.line(axes[row, 0], *series(net, layer, "l2"), net)
                P.line(axes[row, 1], *series(net, layer, "cosine"), net)
            P.label(axes[row, 0], "step", "‖G − G′‖₂", f"weight layer {layer}: ℓ2 difference", log=True)
            P.label(axes[row, 1], "step", "cos(G, G′)", f"weight layer {layer}: cosine")
        return P.save(fig, out, "ics_fig3.png")

    config = {"paper": "Santurkar et al. 2018 Fig. 3", "steps": steps, "lr": lr, "seed": seed, "batch": BATCH,
              "layers": layers, "probe_every": max(1, steps // RECORDS)}
    return _finish("ics", out, config, runs, summary, [fig3], started)


def _accuracy_panels(ax_train, ax_test, runs, window):
    for net, h in runs.items():
        P.line(ax_train, *P.moving_average(h.accuracy, window), net)
        P.line(ax_test, h.eval["step"], h.eval["accuracy"], net)
    P.label(ax_train, "step", f"training accuracy (mean of {window} batches)", "training accuracy")
    P.label(ax_test, "step", "test accuracy", "test accuracy")


def _accuracy_summary(runs, window):
    summary = {}
    for net, h in runs.items():
        s, avg = P.moving_average(h.accuracy, window)
        reached = s[avg >= 0.95]
        summary[net] = {"final_train_accuracy": float(avg[-1]), "final_test_accuracy": h.eval["accuracy"][-1],
                        "steps_to_95pct_train": int(reached[0]) if reached.size else None}
    return summary


def noisy(*, steps=None, seed=0, lr=None, out=None, progress=True):
    """Santurkar et al. 2018 Fig. 2: training with noisy batch norm (time-varying,
    non-zero-mean, non-unit-variance noise after each BN) vs BN vs standard.

    MLP 3×100 ReLU on digits, SGD (default 1000 steps, lr 0.1), batch 60. Records the
    mini-batch training accuracy (training mode, so with the noise), the test
    accuracy, and the {15, 50, 85}th percentiles of the input to the second hidden
    layer's ReLU (unit 0): the distribution the noise makes unstable.
    """
    started = time.perf_counter()
    steps, lr = _check_args("noisy", steps, 1000, lr, 0.1)
    nets = ("standard", "bn", "noisy")
    window = max(1, min(20, steps // 10))
    runs = {}
    with single_threaded():
        data = digits(seed)
        for net in nets:
            model = mlp(net, seed)
            relus = [k for k, leaf in enumerate(leaf_layers(model)) if isinstance(leaf, ReLU)]
            runs[net] = _train(model, SoftmaxCrossEntropy(), data, steps=steps, lr=lr, seed=seed,
                               metrics=[ActivationPercentiles(relus[1], unit=0)], progress=progress,
                               label=f"noisy {net}")
    summary = _accuracy_summary(runs, window)

    def fig2(out):
        fig, axes = P.figure(1, 3, "Santurkar et al. 2018, Fig. 2: noisy batch norm (digits MLP)")
        _accuracy_panels(axes[0, 0], axes[0, 1], runs, window)
        for net in nets:
            s, v = runs[net].metric("percentiles")
            v = np.array(v)
            P.band(axes[0, 2], s, v[:, 0], v[:, 2], net, line=v[:, 1])
        P.label(axes[0, 2], "step", "input to ReLU (layer 2, unit 0)", "15th/50th/85th percentiles")
        return P.save(fig, out, "noisy_fig2.png")

    config = {"paper": "Santurkar et al. 2018 Fig. 2", "steps": steps, "lr": lr, "seed": seed, "batch": BATCH,
              "smoothing_window": window}
    return _finish("noisy", out, config, runs, summary, [fig2], started)


def lp(*, steps=None, seed=0, lr=None, out=None, progress=True):
    """Santurkar et al. 2018 Fig. 5/12: ℓp batch norm (divide by the mean ℓp norm of
    the centred values, p = 1, 2, ∞) vs BN vs standard: accuracy and smoothness.

    MLP 3×100 ReLU on digits, SGD (default 1000 steps, lr 0.1), batch 60; every
    steps/40 steps a landscape probe (η ∈ [½, 4]·lr, 8 points) for the gradient
    predictiveness and effective β-smoothness.
    """
    started = time.perf_counter()
    steps, lr = _check_args("lp", steps, 1000, lr, 0.1)
    nets = ("standard", "bn", "l1", "l2", "linf")
    window = max(1, min(20, steps // 10))
    runs = {}
    with single_threaded():
        data = digits(seed)
        for net in nets:
            runs[net] = _train(mlp(net, seed), SoftmaxCrossEntropy(), data, steps=steps, lr=lr, seed=seed,
                               metrics=[LandscapeProbe()], progress=progress, label=f"lp {net}")
    summary = _accuracy_summary(runs, window)
    for net, h in runs.items():
        summary[net]["median_beta_smoothness"] = float(np.median(_series(h, "landscape", "beta_smoothness")[1]))
        summary[net]["median_grad_pred_max"] = float(np.median(_series(h, "landscape", "grad_diff_max")[1]))

    def fig5(out):
        fig, axes = P.figure(2, 2, "Santurkar et al. 2018, Fig. 5 / 12: ℓp batch norm (digits MLP)")
        _accuracy_panels(axes[0, 0], axes[0, 1], runs, window)
        for net, h in runs.items():
            P.line(axes[1, 0], *_series(h, "landscape", "grad_diff_max"), net)
            P.line(axes[1, 1], *_series(h, "landscape", "beta_smoothness"), net)
        P.label(axes[1, 0], "step", "max_η ‖∇L(θ) − ∇L(θ − ηg)‖", "gradient predictiveness (worst η)", log=True)
        P.label(axes[1, 1], "step", "max_η ‖Δ∇L‖ / ‖ηg‖", "effective β-smoothness", log=True)
        return P.save(fig, out, "lp_fig5.png")

    config = {"paper": "Santurkar et al. 2018 Fig. 5 and 12", "steps": steps, "lr": lr, "seed": seed,
              "batch": BATCH, "probe_every": max(1, steps // RECORDS), "smoothing_window": window}
    return _finish("lp", out, config, runs, summary, [fig5], started)


def dln(*, steps=None, seed=0, lr=None, out=None, progress=True):
    """Santurkar et al. 2018 Fig. 9 (deep linear network): landscape with vs without BN.

    25 Linear(10, 10) layers (BN after each but the last), data x ~ N(0, I₁₀),
    y = A x with A ~ N(0, 1/10) entries, 1000 samples, MSE, full-batch gradient
    descent (default 500 steps, lr 0.01). Every steps/40 steps a landscape probe with
    η on the paper's [1/100, 30]·lr grid (10 points, geometric spacing).
    """
    started = time.perf_counter()
    steps, lr = _check_args("dln", steps, 500, lr, 0.01)
    rng = np.random.default_rng([seed, 25])
    X = rng.standard_normal((1000, 10))
    Y = X @ (rng.standard_normal((10, 10)) / np.sqrt(10)).T
    probe = LandscapeProbe(low=DLN_ETA_RANGE[0], high=DLN_ETA_RANGE[1], num=10, spacing="log")
    runs = {}
    with single_threaded(), np.errstate(over="ignore", invalid="ignore"):
        for net in ("standard", "bn"):
            runs[net] = _train(deep_linear(net, seed), MSELoss(), (X, None, Y, None), steps=steps, lr=lr, seed=seed,
                               metrics=[probe], batch_size=len(X), progress=progress, label=f"dln {net}")
    summary = _landscape_summary(runs)
    summary.update({f"{net}_final_loss": h.loss[-1] for net, h in runs.items()})
    summary["two_over_lr"] = 2 / lr

    def fig9(out):
        fig, axes = P.figure(1, 4, "Santurkar et al. 2018, Fig. 9: 25-layer deep linear network (η ∈ [1/100, 30]·lr)",
                             width=3.6)
        for net, h in runs.items():
            P.line(axes[0, 0], h.step, h.loss, net)
        P.label(axes[0, 0], "step", "training loss (MSE)", "training loss", log=True)
        _landscape_panels(axes[0, 1:], runs)
        return P.save(fig, out, "dln_fig9.png")

    config = {"paper": "Santurkar et al. 2018 Fig. 9 (deep linear network)", "steps": steps, "lr": lr, "seed": seed,
              "depth": 25, "width": 10, "samples": 1000, "eta_range_times_lr": list(DLN_ETA_RANGE), "etas": 10,
              "probe_every": max(1, steps // RECORDS)}
    return _finish("dln", out, config, runs, summary, [fig9], started)


EXPERIMENTS = {"ioffe": ioffe, "landscape": landscape, "ics": ics, "noisy": noisy, "lp": lp, "dln": dln}
