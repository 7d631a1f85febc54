"""A mini-batch training loop over NumPy arrays for the explicit layer API.

One step t, on the batch (x_t, y_t)::

    metrics, when t % record_every == 0    each probes θ_t on (x_t, y_t), then restores everything
    out = model.forward(x_t)               (training mode)
    L_t, dout = loss(out, y_t)             recorded: L_t and, for classification, accuracy
                                           (loss(out, y_t, sample_weight=w_t) given weights)
    optimizer.zero_grad(); model.backward(dout)
    optimizer.step()                       θ_{t+1}

The metrics run before the step's forward pass so that a stochastic layer's
generator, which every probe pass rewinds to its saved state, gives the probes the
noise draw of this very step: they measure the function the step optimises.

Batches: every epoch draws one permutation of the n samples from
``numpy.random.default_rng(seed)`` and cuts it into ⌊n / batch_size⌋ batches; the
remaining n mod batch_size samples of that epoch are skipped (a batch-norm batch of
one or two samples would be degenerate). With ``shuffle=False`` every epoch takes
the samples in order, and the n mod batch_size left over join the epoch's last
batch instead: skipping the same samples every epoch would never train on them.

So the run is a function of ``seed``, the model's initial state and the data: the same
inputs give a bit-identical run, and the metrics (which restore everything they touch,
:mod:`numbabn.train.metrics`) do not change it. A run starts with a Trainer's first
``fit`` (later calls continue it) and starts each
:class:`~numbabn.train.metrics.Metric` afresh (its ``reset``), so a metric instance
reused from an earlier run records the same values as a new one.
"""

import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, TextIO

import numpy as np
from numpy.typing import NDArray

from .. import _checks as V
from ..layers import Layer, SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy
from .history import History
from .metrics import Metric

_positive_int = V.check_int  # (fn, name, value) -> int >= 1


def _metric_name(fn: str, metric: Any) -> str:
    if not callable(metric):
        raise TypeError(
            f"{fn}: each metric must be callable as metric(model, loss, optimizer, batch), got {V.describe(metric)}"
        )
    name = getattr(metric, "name", None) or getattr(metric, "__name__", None)
    if not isinstance(name, str):
        raise TypeError(f"{fn}: metric {metric!r} has neither a 'name' nor a '__name__'")
    return name


def _check_data(fn: str, X: Any, y: Any) -> tuple[NDArray[Any], NDArray[Any]]:
    if not isinstance(X, np.ndarray) or not isinstance(y, np.ndarray):
        raise TypeError(f"{fn}: X and y must be NumPy arrays, got {V.describe(X)} and {V.describe(y)}")
    if X.ndim < 1 or y.ndim < 1 or len(X) != len(y) or len(X) == 0:
        raise ValueError(
            f"{fn}: X and y must hold the same (non-zero) number of samples, got shapes {X.shape} and {y.shape}"
        )
    return X, y


class Trainer:
    """Train ``model`` with ``loss`` and ``optimizer`` on mini-batches (module docstring).

    Parameters
    ----------
    model : Layer
        A :class:`~numbabn.layers.Layer` (usually a Sequential).
    loss : callable
        ``loss(prediction, target) -> (value, dprediction)``. With
        :class:`~numbabn.layers.SoftmaxCrossEntropy` the accuracy is recorded too
        (argmax against the class index); with
        :class:`~numbabn.layers.SigmoidBinaryCrossEntropy` the subset accuracy (every
        output's sign against its 0/1 target: the accuracy of a one-output binary
        classifier).
    optimizer : optimizer
        A :mod:`numbabn.optim` optimizer over the model's parameters.
    batch_size : int
        Samples per step (at most the number of training samples).
    seed : int
        Seeds the generator that orders the batches (an int >= 0).
    shuffle : bool
        True (default): a new random order every epoch. False: the samples in order,
        the last batch of an epoch taking the n mod batch_size left over (module
        docstring).
    metrics : sequence of callables
        ``metric(model, loss, optimizer, batch)`` (e.g. those of
        :mod:`numbabn.train.metrics`), named by ``.name`` (else ``__name__``).
        Each :class:`~numbabn.train.metrics.Metric` is ``reset`` by the first
        ``fit`` (a later ``fit`` continues the run, and the metrics' state).
    record_every : int
        The metrics run at steps 0, k, 2k, ...
    eval_data : tuple or None
        ``(X, y)`` evaluated in eval mode at step 0, every ``eval_every`` steps and
        after the last step.
    eval_every : int or None
        Steps between evaluations of ``eval_data`` (default ``record_every``).
    verbose : int
        0 silent; 1 a progress bar on stderr when stderr is a terminal.
    label : str
        The progress bar's label.
    """

    def __init__(
        self,
        model: Layer,
        loss: Callable[..., Any],
        optimizer: Any,
        *,
        batch_size: int,
        seed: int,
        shuffle: bool = True,
        metrics: Sequence[Callable[..., Any]] = (),
        record_every: int = 1,
        eval_data: tuple[NDArray[Any], NDArray[Any]] | None = None,
        eval_every: int | None = None,
        verbose: int = 1,
        label: str = "training",
    ) -> None:
        fn = "Trainer"
        if not isinstance(model, Layer):
            raise TypeError(f"{fn}: model must be a numbabn Layer, got {V.describe(model)}")
        if not callable(loss):
            raise TypeError(f"{fn}: loss must be callable as loss(prediction, target), got {V.describe(loss)}")
        if not (hasattr(optimizer, "step") and hasattr(optimizer, "zero_grad")):
            raise TypeError(f"{fn}: optimizer must have step() and zero_grad(), got {V.describe(optimizer)}")
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.batch_size = _positive_int(fn, "batch_size", batch_size)
        if not V.is_int(seed):
            raise TypeError(f"{fn}: seed must be an int, got {seed!r}")
        self.seed = V.check_int(fn, "seed", seed, minimum=0)
        self.rng = np.random.default_rng(self.seed)
        self.shuffle = V.check_bool(fn, "shuffle", shuffle)
        self.metrics = list(metrics)
        names = [_metric_name(fn, m) for m in self.metrics]
        if len(set(names)) != len(names):
            raise ValueError(f"{fn}: metric names must be distinct, got {names}")
        self.metric_names = names
        self.record_every = _positive_int(fn, "record_every", record_every)
        self.eval_every = self.record_every if eval_every is None else _positive_int(fn, "eval_every", eval_every)
        if eval_data is not None:
            if not isinstance(eval_data, (tuple, list)) or len(eval_data) != 2:
                raise TypeError(f"{fn}: eval_data must be a pair (X, y), got {V.describe(eval_data)}")
            eval_data = _check_data(fn, *eval_data)
        self.eval_data = eval_data
        if verbose not in (0, 1, True, False):
            raise ValueError(f"{fn}: verbose must be 0 or 1, got {verbose!r}")
        self.verbose = int(verbose)
        self.label = str(label)
        self.classification = isinstance(loss, (SoftmaxCrossEntropy, SigmoidBinaryCrossEntropy))
        self._sigmoid = isinstance(loss, SigmoidBinaryCrossEntropy)
        self.steps_done = 0

    # ------------------------------------------------------------ pieces
    def _batches(self, n: int, steps: int) -> Iterator[NDArray[np.intp]]:
        """Index arrays of ``steps`` batches, epoch after epoch (module docstring)."""
        per_epoch = n // self.batch_size
        done = 0
        while done < steps:
            order = self.rng.permutation(n) if self.shuffle else np.arange(n)
            for b in range(min(per_epoch, steps - done)):
                end = n if not self.shuffle and b == per_epoch - 1 else (b + 1) * self.batch_size
                yield order[b * self.batch_size : end]
            done += per_epoch

    def _accuracy(self, out: NDArray[Any], target: NDArray[Any]) -> float:
        if self._sigmoid:
            return float(np.mean(np.all((out > 0) == (target > 0.5), axis=1)))
        return float(np.mean(np.argmax(out, axis=1) == target))

    def evaluate(self, X: NDArray[Any], y: NDArray[Any]) -> tuple[float, float | None]:
        """``(loss, accuracy or None)`` of the model in eval mode on (X, y); the model is
        put back in training mode afterwards."""
        self.model.eval()
        try:
            out = self.model.forward(X)
        finally:
            self.model.train()
        value, _ = self.loss(out, y)
        return value, (self._accuracy(out, y) if self.classification else None)

    def _progress(self, steps: int) -> AbstractContextManager[Any]:
        if self.verbose and sys.stderr.isatty():
            return _TextProgress(self.label, steps, sys.stderr)
        return nullcontext()

    # ------------------------------------------------------------ the loop
    def fit(
        self,
        X: NDArray[Any],
        y: NDArray[Any],
        steps: int | None = None,
        epochs: int | None = None,
        sample_weight: NDArray[Any] | None = None,
    ) -> History:
        """Train for ``steps`` steps or ``epochs`` epochs (exactly one of them) and
        return the :class:`History` of this call.

        ``sample_weight``: None, or one weight per sample (finite, >= 0); each step
        then calls ``loss(out, y_t, sample_weight=w_t)`` with the batch's weights (the
        losses of :mod:`numbabn.layers` take their weighted mean). The recorded
        accuracy stays unweighted, and the metrics, which take (x, y) batches, probe
        the unweighted loss.

        The first call (no step done yet) resets every
        :class:`~numbabn.train.metrics.Metric` among the metrics before its first
        step, so a run is a function of the model, the optimizer, the seed and the
        data alone; a later call continues the run, metrics' state included (a
        warm-started probe stays warm).

        All or nothing: if any step raises (a loss that rejects a label, a metric that
        fails, a layer that rejects a batch), the model (parameters, buffers, caches,
        gradients, generators), the optimizer, the attributes of every Metric (such as
        a warm-start vector) and the trainer (batch order, step count) are put back as
        they were before the call. An interrupt (Ctrl-C) is not an error: the steps
        done so far are kept."""
        from ..layers.base import capture, restore

        saved = capture(self.model, parameters=True, optimizer=self.optimizer)
        trainer_state = (self.rng.bit_generator.state, self.steps_done)
        metric_state = [(m, dict(vars(m))) for m in self.metrics if isinstance(m, Metric)]
        try:
            return self._fit(X, y, steps, epochs, sample_weight)
        except Exception:
            restore(saved)
            self.rng.bit_generator.state, self.steps_done = trainer_state
            for metric, attrs in metric_state:
                vars(metric).clear()
                vars(metric).update(attrs)
            raise

    def _fit(
        self, X: NDArray[Any], y: NDArray[Any], steps: int | None, epochs: int | None, sample_weight: Any
    ) -> History:
        fn = "Trainer.fit"
        X, y = _check_data(fn, X, y)
        weights = None if sample_weight is None else V.check_weights(fn, sample_weight, len(X))
        if (steps is None) == (epochs is None):
            raise ValueError(f"{fn}: give exactly one of steps and epochs, got steps={steps!r}, epochs={epochs!r}")
        n = len(X)
        if self.batch_size > n:
            raise ValueError(f"{fn}: batch_size {self.batch_size} is larger than the {n} training samples")
        total = (
            _positive_int(fn, "steps", steps)
            if steps is not None
            else _positive_int(fn, "epochs", epochs) * (n // self.batch_size)
        )
        history = History(
            classification=self.classification,
            meta={
                "batch_size": self.batch_size,
                "seed": self.seed,
                "record_every": self.record_every,
                "eval_every": self.eval_every,
                "samples": n,
                "first_step": self.steps_done,
            },
        )
        model, loss, optimizer = self.model, self.loss, self.optimizer
        if self.steps_done == 0:  # a new run; a later fit continues this one
            for metric in self.metrics:
                if isinstance(metric, Metric):
                    metric.reset()
        model.train()
        with self._progress(total) as bar:
            for idx in self._batches(n, total):
                t = self.steps_done
                if self.eval_data is not None and t % self.eval_every == 0:
                    history.record_eval(t, *self.evaluate(*self.eval_data))
                xb, yb = X[idx], y[idx]
                if t % self.record_every == 0:
                    for name, metric in zip(self.metric_names, self.metrics, strict=True):
                        history.record_metric(name, t, metric(model, loss, optimizer, (xb, yb)))
                out = model.forward(xb)
                value, dout = loss(out, yb) if weights is None else loss(out, yb, sample_weight=weights[idx])
                history.record_step(t, value, self._accuracy(out, yb) if self.classification else None)
                optimizer.zero_grad()
                model.backward(dout)
                optimizer.step()
                self.steps_done += 1
                if bar is not None:
                    bar.update(1)
        if self.eval_data is not None:
            history.record_eval(self.steps_done, *self.evaluate(*self.eval_data))
        return history


class _TextProgress:
    """``label  [####    ]  step/total`` redrawn in place on a terminal, at most once
    per percent. The library's own few lines, so that training does not load the
    command-line toolkit (click) for a progress bar."""

    WIDTH = 30

    def __init__(self, label: str, total: int, file: TextIO) -> None:
        self.label, self.total, self.file = label, max(total, 1), file
        self.done, self._shown = 0, -1

    def __enter__(self) -> "_TextProgress":
        self._draw()
        return self

    def update(self, n: int) -> None:
        self.done += n
        self._draw()

    def _draw(self) -> None:
        percent = 100 * self.done // self.total
        if percent == self._shown:
            return
        self._shown = percent
        filled = self.WIDTH * self.done // self.total
        self.file.write(
            f"\r{self.label}  [{'#' * filled}{' ' * (self.WIDTH - filled)}]  {self.done}/{self.total}  {percent:3d}%"
        )
        self.file.flush()

    def __exit__(self, *exc: object) -> None:
        self.file.write("\n")
        self.file.flush()
