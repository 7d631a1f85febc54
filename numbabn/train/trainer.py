"""A mini-batch training loop over NumPy arrays for the explicit layer API.

One step t, on the batch (x_t, y_t)::

    metrics, when t % record_every == 0    each probes θ_t on (x_t, y_t), then restores everything
    out = model.forward(x_t)               (training mode, see below)
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
``leftover`` chooses either rule, or scikit-learn's (``gen_batches``): the samples
left over form a last, smaller batch ("keep"), or the same except that one sample left
over joins the batch before it ("batch": batch norm cannot normalise one value per
channel).

The epoch in progress is trainer state (pickled with it, and put back with the rest
when a call raises): a ``fit`` that stops inside an epoch leaves its order and
position behind, and the next ``fit`` takes that epoch's remaining batches first if
it is given the same data and ``batch_size``, ``shuffle`` and ``leftover`` are as they
were. Same
data means the very same X and y objects (not hashed again: an array changed in place
counts as the same), or arrays of the same shapes and dtypes whose values have the
same CRC-32, so a copy of the arrays continues the epoch, and so does an unpickled
trainer given the arrays again. The CRC costs one pass over the data (a strided
array's in blocks of about 1 MiB, not one copy): once when a call leaves an epoch it
began unfinished, and once more when a later call gets other array objects;
``sample_weight`` is not part of it. Other data, or another ``batch_size``,
``shuffle`` or ``leftover``, drops the rest of that epoch, and the call begins a new
one. Thus ``fit(steps=3)`` then ``fit(steps=2)``
train on the batches of ``fit(steps=5)``, bit for bit, with or without shuffling,
across epoch boundaries and with ``sample_weight``.

Modes: ``fit`` puts a model in eval mode (``model.eval()``) in training mode, every
layer of it, and leaves a model in training mode as it is, so a layer the user put
in eval mode inside it (``model.train(); bn.eval()``: a batch norm frozen for
fine-tuning, its running statistics kept) stays in eval mode through ``fit`` and
``evaluate``, which puts every layer back in the mode it found it in.

So the run is a function of ``seed``, the model's initial state and the data: the same
inputs give a bit-identical run, however its steps are split into ``fit`` calls, and
the metrics (which restore everything they touch, :mod:`numbabn.train.metrics`) do not
change it. A run starts with a Trainer's first ``fit`` (later calls continue it) and
starts each :class:`~numbabn.train.metrics.Metric` afresh (its ``reset``), so a metric
instance reused from an earlier run records the same values as a new one.
"""

import pickle
import sys
import weakref
import zlib
from collections.abc import Callable, Iterable, Sequence
from contextlib import AbstractContextManager, nullcontext
from typing import Any, NamedTuple, TextIO

import numpy as np
from numpy.typing import NDArray

from .. import _checks as V
from ..layers import Layer, SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy
from ..layers.base import capture, forget_caches, restore, saved_modes, train_for_fit
from ..optim import Optimizer
from .history import History
from .metrics import Metric

_positive_int = V.check_int  # (fn, name, value) -> int >= 1


def accuracy(out: NDArray[Any], target: NDArray[Any], sigmoid: bool = False) -> float:
    """The share of samples predicted right: the argmax of the logits ``out`` against
    integer labels, or with ``sigmoid`` every output's sign against 0/1 targets (subset
    accuracy). NaN where an output is not finite: a diverged network's NaN rows would
    otherwise "predict" class 0."""
    if not np.isfinite(out).all():
        return float("nan")
    if sigmoid:
        return float(np.mean(np.all((out > 0) == (target > 0.5), axis=1)))
    return float(np.mean(np.argmax(out, axis=1) == target))


def _metric_name(fn: str, metric: Any) -> str:
    if isinstance(metric, type):  # callable too, but calling it would construct a metric, not measure
        raise TypeError(
            f"{fn}: metrics must hold metric instances, callables metric(model, loss, optimizer, batch), got the "
            f"class {metric.__name__}; write {metric.__name__}() (or {metric.__name__}(...) with its settings)"
        )
    if not callable(metric):
        raise TypeError(
            f"{fn}: each metric must be callable as metric(model, loss, optimizer, batch), got {V.describe(metric)}"
        )
    name = getattr(metric, "name", None) or getattr(metric, "__name__", None)
    if not isinstance(name, str):
        raise TypeError(f"{fn}: metric {metric!r} has neither a 'name' nor a '__name__'")
    return name


def _crc(a: NDArray[Any]) -> int:
    """CRC-32 of ``a``'s values in C order, without copying a C-contiguous array (a
    strided one is copied a block of about 1 MiB of rows at a time; an object array is
    hashed by its pickled values)."""
    if a.dtype.hasobject:
        return zlib.crc32(pickle.dumps(a))
    if a.size == 0:
        return 0
    if a.flags.c_contiguous:
        return zlib.crc32(a.reshape(-1).view(np.uint8).data)
    rows = max(1, (1 << 20) // max(1, a[0].nbytes))
    crc = 0
    for i in range(0, len(a), rows):
        crc = zlib.crc32(np.ascontiguousarray(a[i : i + rows]).reshape(-1).view(np.uint8).data, crc)
    return crc


def _fingerprint(X: NDArray[Any], y: NDArray[Any]) -> tuple[Any, ...]:
    """What identifies the data an epoch orders (module docstring): each array's shape,
    dtype and the CRC-32 of its values."""
    return tuple((a.shape, a.dtype.str, _crc(a)) for a in (X, y))


class _Data:
    """The data an epoch orders: its fingerprint, and weak references to its X and y so
    that a later call given the very same arrays continues without hashing them again
    (the references are not pickled: an unpickled trainer compares fingerprints)."""

    __slots__ = ("fingerprint", "refs")

    def __init__(self, X: NDArray[Any], y: NDArray[Any]) -> None:
        self.fingerprint = _fingerprint(X, y)
        self.refs: tuple[Any, Any] | None = (weakref.ref(X), weakref.ref(y))

    def same(self, X: NDArray[Any], y: NDArray[Any]) -> bool:
        if self.refs is not None and self.refs[0]() is X and self.refs[1]() is y:
            return True
        return self.fingerprint == _fingerprint(X, y)

    def __getstate__(self) -> tuple[Any, ...]:
        return self.fingerprint

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.fingerprint, self.refs = state, None


class _Epoch(NamedTuple):
    """The epoch in progress: its sample order, the position of its next batch, its
    data (None while the call that began it runs: fingerprinted only if the call
    leaves the epoch unfinished) and the (batch_size, shuffle, leftover rule) it is
    cut with."""

    order: NDArray[np.intp]
    position: int
    data: _Data | None
    cut: tuple[int, bool, str] | None = None


def _lengths(history: History) -> tuple[int, int, dict[str, int]]:
    """How many steps, evaluations and records of each metric ``history`` holds."""
    return len(history.step), len(history.eval["step"]), {k: len(v["step"]) for k, v in history.metrics.items()}


def _truncate(history: History, lengths: tuple[int, int, dict[str, int]]) -> None:
    """Drop the records ``history`` gained since :func:`_lengths` gave ``lengths``."""
    steps, evals, metrics = lengths
    for series in (history.step, history.loss, history.accuracy or []):
        del series[steps:]
    for series in history.eval.values():
        del series[evals:]
    for name in list(history.metrics):
        if name in metrics:
            for series in history.metrics[name].values():
                del series[metrics[name] :]
        else:
            del history.metrics[name]


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
        A :mod:`numbabn.optim` optimizer over the model's parameters (all or some:
        one that manages none of them is refused).
    batch_size : int
        Samples per step (at most the number of training samples).
    seed : int
        Seeds the generator that orders the batches (an int >= 0).
    shuffle : bool
        True (default): a new random order every epoch. False: the samples in order,
        the last batch of an epoch taking the n mod batch_size left over (module
        docstring).
    leftover : {"skip", "join", "batch", "keep"} or None
        What an epoch does with the n mod batch_size samples left over: skip them,
        join them to its last batch, or train them as a last batch of their own
        ("keep", scikit-learn's; "batch": the same, but one sample joins the batch
        before). None (default): "skip" when shuffling, else "join".
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
    exact_resume : bool
        Save the model and the optimizer at every step boundary, so that an interrupt
        (Ctrl-C) undoes the step it cut short and a later ``fit`` continues bit for bit
        as the uninterrupted run (see :meth:`fit`). Off by default: the copies cost
        10-18 % of a small network's step (7 layers of 100 units, batch 16: 950 to
        1100 us a step; 3 layers of 512, batch 60: 2000 to 2240 us).

    Attributes
    ----------
    steps_done : int
        Steps trained so far, over every ``fit`` of the run (the next step's number).
    history : History or None
        The :class:`History` of the latest ``fit`` (None before the first), the object
        that call returns. An interrupted call returns nothing: this holds what its
        completed steps recorded (a call interrupted in its first step changes nothing,
        this included).
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
        exact_resume: bool = False,
        leftover: str | None = None,
    ) -> None:
        fn = "Trainer"
        if not isinstance(model, Layer):
            raise TypeError(f"{fn}: model must be a numbabn Layer, got {V.describe(model)}")
        if not callable(loss):
            raise TypeError(f"{fn}: loss must be callable as loss(prediction, target), got {V.describe(loss)}")
        if not (hasattr(optimizer, "step") and hasattr(optimizer, "zero_grad")):
            raise TypeError(f"{fn}: optimizer must have step() and zero_grad(), got {V.describe(optimizer)}")
        if isinstance(optimizer, Optimizer) and (params := model.parameters()):
            # An optimizer built for another model (or before the model was rebuilt)
            # would run without error and train nothing.
            mine = {id(p) for p in params}
            if not any(id(p) in mine for p in optimizer.params):
                raise ValueError(
                    f"{fn}: optimizer manages {len(optimizer.params)} Parameters, none of the model's "
                    f"{len(params)}, so fit would train nothing; build it from model.parameters()"
                )
        self.model, self.loss, self.optimizer = model, loss, optimizer
        self.batch_size = _positive_int(fn, "batch_size", batch_size)
        if not V.is_int(seed):
            raise TypeError(f"{fn}: seed must be an int, got {seed!r}")
        self.seed = V.check_int(fn, "seed", seed, minimum=0)
        self.rng = np.random.default_rng(self.seed)
        self.shuffle = V.check_bool(fn, "shuffle", shuffle)
        if not isinstance(metrics, Iterable):
            raise TypeError(
                f"{fn}: metrics must be a sequence of callables metric(model, loss, optimizer, batch), "
                f"got {V.describe(metrics)}"
            )
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
        self.exact_resume = V.check_bool(fn, "exact_resume", exact_resume)
        if leftover not in (None, "skip", "join", "batch", "keep"):
            raise ValueError(f"{fn}: leftover must be None, 'skip', 'join', 'batch' or 'keep', got {leftover!r}")
        self.leftover = leftover
        self.history: History | None = None
        self._epoch: _Epoch | None = None  # the epoch in progress, None between epochs

    def __setstate__(self, state: dict[str, Any]) -> None:
        # Trainers pickled before the epoch in progress, ``history`` and
        # ``exact_resume`` existed (2026-12-05) load with their defaults.
        state.setdefault("history", None)
        state.setdefault("_epoch", None)
        state.setdefault("exact_resume", False)
        state.setdefault("leftover", None)
        state.pop("_step_checkpoints", None)
        epoch = state["_epoch"]
        if epoch is not None and epoch.cut is None:
            state["_epoch"] = None  # an epoch of that day's first version: begin a new one
        elif epoch is not None and len(epoch.cut) == 2:  # (batch_size, shuffle): before ``leftover``
            state["_epoch"] = epoch._replace(cut=(*epoch.cut, "skip" if epoch.cut[1] else "join"))
        self.__dict__.update(state)

    # ------------------------------------------------------------ pieces
    def _next_batch(self, n: int) -> NDArray[np.intp]:
        """The index array of the next batch (module docstring); draws the order of a
        new epoch when none is in progress."""
        if self._epoch is None:
            order = self.rng.permutation(n) if self.shuffle else np.arange(n)
            self._epoch = _Epoch(order, 0, None, self._cut())
        order, b, data, cut = self._epoch
        per_epoch, to_end = self._per_epoch(n)
        end = n if to_end and b == per_epoch - 1 else (b + 1) * self.batch_size
        self._epoch = None if b + 1 == per_epoch else _Epoch(order, b + 1, data, cut)
        return order[b * self.batch_size : end]

    def _cut(self) -> tuple[int, bool, str]:
        """(batch_size, shuffle, leftover rule): how the epoch in progress was cut."""
        return self.batch_size, self.shuffle, self.leftover or ("skip" if self.shuffle else "join")

    def _per_epoch(self, n: int) -> tuple[int, bool]:
        """(batches in an epoch of ``n`` samples, whether its last batch runs to the n-th)."""
        full, left = divmod(n, self.batch_size)
        rule = self._cut()[2]
        if (rule == "batch" and left > 1) or (rule == "keep" and left > 0):
            return full + 1, True
        return full, rule != "skip"

    def epoch_batch_sizes(self, n: int) -> list[int]:
        """The sizes of the batches an epoch of ``n`` samples is cut into (module
        docstring: ``batch_size`` and the ``leftover`` rule)."""
        per_epoch, to_end = self._per_epoch(n)
        sizes = [self.batch_size] * per_epoch
        if to_end and per_epoch:
            sizes[-1] = n - self.batch_size * (per_epoch - 1)
        return sizes

    def _seal_epoch(self, X: NDArray[Any], y: NDArray[Any]) -> None:
        """Give an epoch that this call began and leaves unfinished its data's fingerprint."""
        if self._epoch is not None and self._epoch.data is None:
            self._epoch = self._epoch._replace(data=_Data(X, y))

    def _checkpoint(self, model: bool = True) -> tuple[Any, ...]:
        """Everything a step may change, for :meth:`_rewind`: the model and the optimizer
        (unless ``model`` is False), the attributes of every Metric, the trainer's state
        and the length of each series of its history. Not the layers' forward caches
        (a rewound model needs a new forward before a backward): kept, the call's first
        checkpoint would hold the caches from before the call to its end, and with
        ``exact_resume`` each step's would double the step's activation memory."""
        history = self.history
        saved = capture(self.model, parameters=True, optimizer=self.optimizer) if model else None
        if saved is not None:
            forget_caches(saved)
        return (
            saved,
            [(m, dict(vars(m))) for m in self.metrics if isinstance(m, Metric)],
            (self.rng.bit_generator.state, self.steps_done, self._epoch, history),
            None if history is None else _lengths(history),
        )

    def _rewind(self, checkpoint: tuple[Any, ...]) -> None:
        """Put back what :meth:`_checkpoint` saved; records made since are dropped."""
        saved, metric_state, (rng_state, self.steps_done, self._epoch, self.history), lengths = checkpoint
        if saved is not None:
            restore(saved)
        self.rng.bit_generator.state = rng_state
        for metric, attrs in metric_state:
            vars(metric).clear()
            vars(metric).update(attrs)
        if self.history is not None:
            _truncate(self.history, lengths)

    def _accuracy(self, out: NDArray[Any], target: NDArray[Any]) -> float:
        return accuracy(out, target, sigmoid=self._sigmoid)

    def evaluate(self, X: NDArray[Any], y: NDArray[Any]) -> tuple[float, float | None]:
        """``(loss, accuracy or None)`` of the model in eval mode on (X, y); every layer
        is put back in the mode it was in (a layer in eval mode inside a training
        model stays so)."""
        put_back = saved_modes(self.model)
        self.model.eval()
        try:
            out = self.model.forward(X)
        finally:
            put_back()
        value, _ = self.loss(out, y)
        return value, (self._accuracy(out, y) if self.classification else None)

    def _progress(self, steps: int) -> AbstractContextManager[Any]:
        if self.verbose and sys.stderr is not None and sys.stderr.isatty():  # None: no fd 2
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
        return the :class:`History` of this call (also ``self.history``).

        ``epochs`` counts steps: ``epochs`` × the batches of an epoch (⌊n / batch_size⌋,
        one more for a leftover batch of its own) of them, from where the
        previous call stopped. Given the same data, a call continues the epoch that an
        earlier one left unfinished; given other data, it begins a new epoch (module
        docstring). Several calls thus train as one call of all their steps, bit for
        bit; their histories together hold that call's records, except that each call
        also evaluates ``eval_data`` after its last step.

        ``sample_weight``: None, or one weight per sample (finite, >= 0, not all 0); each step
        then calls ``loss(out, y_t, sample_weight=w_t)`` with the batch's weights (the
        losses of :mod:`numbabn.layers` take their weighted mean). The recorded
        accuracy stays unweighted, and the metrics, which take (x, y) batches, probe
        the unweighted loss.

        The first call (no step done yet) resets every
        :class:`~numbabn.train.metrics.Metric` among the metrics before its first
        step, so a run is a function of the model, the optimizer, the seed and the
        data alone; a later call continues the run, metrics' state included (a
        warm-started probe stays warm).

        All or nothing: if any step raises an Exception (a loss that rejects a label, a
        metric that fails, a layer that rejects a batch), the model (parameters,
        buffers, gradients, generators; its forward caches are let go, so a backward
        needs a new forward), the optimizer, the attributes of every
        Metric (such as a warm-start vector) and the trainer (batch order, epoch
        position, step count, ``history``) are put back as they were before the call.
        An interrupt (Ctrl-C's KeyboardInterrupt, or any other BaseException that is
        not an Exception) is not an error: the steps completed before it are kept, with
        their records in ``self.history``, and the trainer's own state (batch order,
        epoch position, step count, records, Metric attributes) is put back as it was
        before the step it cut short, so a later ``fit`` trains that step's batch again.
        The model and the optimizer keep what that step did to them before the
        interrupt (its forward may have moved the running statistics, its update may
        have reached some parameters), unless ``exact_resume`` is on: then they are put
        back too, and the later ``fit`` continues exactly as the uninterrupted call
        would have. An interrupt in a call's first step changes nothing (the whole call
        is undone, as for an error), and one in the final evaluation drops that
        evaluation. The interrupt propagates."""
        before = self._checkpoint()
        latest = [before]  # the checkpoint of the latest step boundary (_fit moves it on)
        try:
            return self._fit(X, y, steps, epochs, sample_weight, latest)
        except Exception:
            self._rewind(before)
            raise
        except BaseException:
            self._rewind(latest[0])
            self._seal_epoch(X, y)  # only an epoch this call began, on the data it checked
            raise

    def _fit(
        self,
        X: NDArray[Any],
        y: NDArray[Any],
        steps: int | None,
        epochs: int | None,
        sample_weight: Any,
        latest: list[tuple[Any, ...]],
    ) -> History:
        fn = "Trainer.fit"
        X, y = _check_data(fn, X, y)
        weights = None if sample_weight is None else V.check_weights(fn, sample_weight, len(X))
        if weights is not None and len(weights) and not weights.any():  # every step's loss a NaN, no gradient
            raise ValueError(f"{fn}: sample_weight is all zero; weights must contain at least one non-zero number")
        if (steps is None) == (epochs is None):
            raise ValueError(f"{fn}: give exactly one of steps and epochs, got steps={steps!r}, epochs={epochs!r}")
        n = len(X)
        if self.batch_size > n:
            raise ValueError(f"{fn}: batch_size {self.batch_size} is larger than the {n} training samples")
        total = (
            _positive_int(fn, "steps", steps)
            if steps is not None
            else _positive_int(fn, "epochs", epochs) * self._per_epoch(n)[0]
        )
        epoch = self._epoch
        if epoch is not None and (epoch.cut != self._cut() or epoch.data is None or not epoch.data.same(X, y)):
            self._epoch = None  # other data, or batch_size or shuffle changed: the epoch in progress ends here
        history = self.history = History(
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
        train_for_fit(model)  # keeps a layer put in eval mode inside a training model in eval mode
        with self._progress(total) as bar:
            for step in range(total):
                if step:  # an interrupt in this step rewinds to here (in the first: to the call's start)
                    latest[0] = self._checkpoint(self.exact_resume)
                t = self.steps_done
                if self.eval_data is not None and t % self.eval_every == 0:
                    history.record_eval(t, *self.evaluate(*self.eval_data))
                idx = self._next_batch(n)
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
        self._seal_epoch(X, y)
        if self.eval_data is not None:
            latest[0] = self._checkpoint(self.exact_resume)
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
