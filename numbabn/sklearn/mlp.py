"""``BNMLPClassifier`` / ``BNMLPRegressor``: multi-layer perceptrons with batch norm,
built on :mod:`numbabn.layers`, :mod:`numbabn.optim` and :class:`numbabn.train.Trainer`,
mirroring :class:`sklearn.neural_network.MLPClassifier` / ``MLPRegressor``.

Network for ``hidden_layer_sizes=(h1, ..., hk)``, ``batch_norm=True``::

    [Linear(no bias) -> BatchNorm1d -> activation] x k -> Linear -> output

(the batch norm's beta replaces the linear bias; ReLU is fused into the batch-norm
kernel). With ``batch_norm=False`` each block is ``Linear -> activation``. Per hidden
unit, over the mini-batch (Ioffe & Szegedy 2015)::

    y = gamma * (z - mean_batch) / sqrt(var_batch + eps) + beta       (training)
    y = gamma * (z - running_mean) / sqrt(running_var + eps) + beta   (predict)

    running_mean <- 0.9*running_mean + 0.1*mean_batch
    running_var  <- 0.9*running_var  + 0.1*var_batch*m/(m - 1)

Losses, per mini-batch of N samples (Adam or SGD with momentum on their gradient;
``solver="lbfgs"`` minimises them on the whole training set at once, penalty
included, see ``numbabn.sklearn._lbfgs``)::

    classifier: (1/N) sum_n [ logsumexp(z_n) - z_n[t_n] ]     softmax cross-entropy
                (1/N) sum_n [ log(1 + e^z_n) - t_n z_n ]      two classes: one logistic output,
                                                              t_n = 1 for classes_[1]
    regressor:  (1/N) sum_n (1/2) sum_k (prediction - y)^2     half the squared error
                                                              (scikit-learn's gradient)
                (1/N) sum_n sum_k [ y log y - y - y z + e^z ]  loss="poisson": half the
                                                              deviance, prediction e^z
    penalty:    alpha/(2N) * sum of ||W||^2 over every Linear weight matrix W

With ``sample_weight`` w, a batch's loss is the weighted mean (1/S) sum_n w_n l_n and its
penalty alpha/(2S) * sum of ||W||^2, S = sum_n w_n over the batch (scikit-learn's MLPs).

As scikit-learn's ``alpha`` (default 1e-4): the L2 penalty's gradient alpha*W/N is
added to the weights' gradients (the optimizer's ``weight_decay`` alpha/N on the
weights only, :mod:`numbabn.optim`), not to biases or batch-norm gamma/beta, and each
``fit`` / ``partial_fit`` uses the ``alpha`` set at that call. ``loss_curve_`` holds
the data loss without the penalty (scikit-learn adds it; with batch norm the weights
before a batch norm can grow without changing the function, so the penalty's value
says little about the fit), and the training-loss stopping rule uses the same.

An epoch is one :meth:`numbabn.train.Trainer.fit` call with ``epochs=1``: a fresh
permutation (or the samples in order, ``shuffle=False``) cut as scikit-learn's
``gen_batches`` cuts it, into batches of ``batch_size`` and a last one of the n mod
batch_size samples left over, except that with batch norm a single sample left over
joins the batch before it (batch norm cannot normalise one value per channel); each batch's L2
penalty is over its own size. ``loss_curve_`` holds each epoch's mean mini-batch
loss weighted by the batches' sizes (scikit-learn's ``loss_``, without the penalty).
Stopping follows scikit-learn: training stops when the training loss (or, with
``early_stopping``, the validation score) has not improved by ``tol`` for more than
``n_iter_no_change`` consecutive epochs; otherwise ``max_iter`` epochs run and a
``ConvergenceWarning`` is issued.

Early stopping holds out ``ceil(validation_fraction * n)`` samples (scikit-learn's
split) and needs at least 2 of them -- else the same ``ValueError`` as scikit-learn's
MLPs ("The validation set is too small ...") -- and at least 2 training samples with
batch norm (1 without); both are checked before anything is trained. The network of
the best validation score is restored at the end. A validation score that is not
finite (NaN when the network's output on the validation set is not finite, for the
classifier too; an R^2 that overflowed) never counts as an improvement; if no epoch
had a finite score, ``fit`` raises a ``ValueError`` rather than return the untrained
network. With or without early stopping, a ``fit`` or ``partial_fit`` that leaves a weight
or a running statistic NaN or infinite (training diverged, or X too large) raises
scikit-learn's ``ValueError`` ("Solver produced non-finite parameter weights ...")
instead of returning a network that predicts NaN. Constant validation targets give R^2
0 or 1 (scikit-learn's ``r2_score``), as in ``MLPRegressor``.

Float32 X trains a float32 network; any other X trains in float64. The network
computes in the dtype it was fitted in, whatever the input: float64 X given to a
float32 network (and a regressor's y trained in float32) is rounded to float32, and
values beyond the float32 range (magnitude > 3.4e38), which would become infinite,
raise a ``ValueError`` naming X or y. (scikit-learn's MLPs compute float64 input in
float64 even with float32 weights; here the kernels run in the network's dtype.)

Defaults follow scikit-learn's MLPs except the learning rate: ``learning_rate_init="auto"``
is 0.01 (scikit-learn: 0.001) but for the regressor's SGD: batch norm keeps every
layer's input normalised, so it tolerates -- and needs, to learn as fast per epoch --
ten times larger Adam steps (Ioffe & Szegedy 2015, §3.3). At 0.001 the regressor failed
scikit-learn's ``check_regressors_train`` at 50 epochs (R^2 0.38 on seed 0) where
``MLPRegressor`` passes at 20; the measured comparison at equal budgets is
``bench/mlp_vs_sklearn.py``. SGD steps, unlike Adam's, grow with the gradient, which a
regressor's unscaled targets make large: at 0.01 the regressor's SGD diverged on
scikit-learn's own check data (``check_regressor_multioutput``, with or without batch
norm) where ``MLPRegressor``'s passes, so there "auto" is scikit-learn's 0.001 (the
classifier's SGD passes every check at 0.01).

``fit`` and ``partial_fit`` train a working copy of the estimator and swap it in only
when they succeed: a call that raises (bad X or y, an early-stopping split that cannot
be stratified, a failing metric, an interrupt) leaves the estimator exactly as it was,
still fitted with its previous model -- or still unfitted (``NotFittedError``).
"""

import copy
from collections.abc import Sequence
from math import ceil
from typing import Any, Self

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray
from scipy.special import expit, log_expit
from sklearn.base import BaseEstimator, ClassifierMixin, RegressorMixin
from sklearn.exceptions import ConvergenceWarning
from sklearn.metrics import accuracy_score, r2_score
from sklearn.model_selection import train_test_split
from sklearn.utils import check_random_state
from sklearn.utils.metaestimators import available_if
from sklearn.utils.multiclass import check_classification_targets, type_of_target, unique_labels
from sklearn.utils.validation import check_is_fitted, column_or_1d, validate_data

from .._checks import is_int, is_real
from .._warnings import warn_at_caller
from ._sample_weight import check_sample_weight

FLOAT_DTYPES = (np.float64, np.float32)
ACTIVATIONS = ("relu", "tanh", "logistic")
SOLVERS = ("sgd", "adam", "lbfgs")
STOCHASTIC = ("sgd", "adam")
SCHEDULES = ("constant", "invscaling", "adaptive")


_is_int, _is_real = is_int, is_real  # the shared checks: not bool; finite


def _is_auto(value: Any) -> bool:
    return isinstance(value, str) and value == "auto"


class _BaseBNMLP(BaseEstimator):
    """What the classifier and the regressor share: parameters, network, training loop."""

    # Fitted state (see _FITTED_PRIVATE), declared for the type checker.
    _arch: dict[str, Any]
    _model: Any
    _optimizer: Any

    def __init__(
        self,
        hidden_layer_sizes: Sequence[int] = (100,),
        activation: str = "relu",
        *,
        batch_norm: bool = True,
        solver: str = "adam",
        alpha: float = 0.0001,
        learning_rate: str = "constant",
        learning_rate_init: float | str = "auto",
        power_t: float = 0.5,
        momentum: float = 0.9,
        nesterovs_momentum: bool = True,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        batch_size: int | str = "auto",
        shuffle: bool = True,
        max_iter: int = 200,
        tol: float = 1e-4,
        n_iter_no_change: int = 10,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        warm_start: bool = False,
        random_state: int | np.random.RandomState | None = None,
        verbose: bool | int = False,
        record_metrics: Sequence[Any] = (),
        record_every: int = 1,
        max_fun: int = 15000,
    ) -> None:
        self.hidden_layer_sizes = hidden_layer_sizes
        self.activation = activation
        self.batch_norm = batch_norm
        self.solver = solver
        self.alpha = alpha
        self.learning_rate = learning_rate
        self.learning_rate_init = learning_rate_init
        self.power_t = power_t
        self.momentum = momentum
        self.nesterovs_momentum = nesterovs_momentum
        self.beta_1 = beta_1
        self.beta_2 = beta_2
        self.epsilon = epsilon
        self.batch_size = batch_size
        self.shuffle = shuffle
        self.max_iter = max_iter
        self.tol = tol
        self.n_iter_no_change = n_iter_no_change
        self.early_stopping = early_stopping
        self.validation_fraction = validation_fraction
        self.warm_start = warm_start
        self.random_state = random_state
        self.verbose = verbose
        self.record_metrics = record_metrics
        self.record_every = record_every
        self.max_fun = max_fun

    # ------------------------------------------------------------ parameters
    def _check_params(self) -> tuple[tuple[int, ...], list[Any]]:
        """Clear errors for bad hyper-parameters; returns (hidden sizes as a tuple, metrics)."""
        name = type(self).__name__
        sizes = self.hidden_layer_sizes
        sizes = (sizes,) if _is_int(sizes) else sizes
        try:
            sizes = tuple(sizes)
        except TypeError:
            sizes = None
        if sizes is None or not all(_is_int(h) and h > 0 for h in sizes):
            raise ValueError(
                f"{name}: hidden_layer_sizes must be a positive int or a sequence of positive "
                f"ints, got {self.hidden_layer_sizes!r}"
            )
        if self.activation not in ACTIVATIONS:
            raise ValueError(f"{name}: activation must be one of {ACTIVATIONS}, got {self.activation!r}")
        if self.solver not in SOLVERS:
            raise ValueError(f"{name}: solver must be one of {SOLVERS}, got {self.solver!r}")
        if self.learning_rate not in SCHEDULES:
            raise ValueError(f"{name}: learning_rate must be one of {SCHEDULES}, got {self.learning_rate!r}")
        for param in ("batch_norm", "early_stopping", "warm_start", "shuffle", "nesterovs_momentum"):
            if not isinstance(getattr(self, param), (bool, np.bool_)):
                raise ValueError(f"{name}: {param} must be a bool, got {getattr(self, param)!r}")
        if not (isinstance(self.verbose, (bool, np.bool_)) or (_is_int(self.verbose) and self.verbose >= 0)):
            raise ValueError(f"{name}: verbose must be a bool or an int >= 0, got {self.verbose!r}")
        checks = [
            (
                "learning_rate_init",
                lambda v: _is_auto(v) or _is_real(v),
                lambda v: _is_auto(v) or v > 0,
                "'auto' or a number > 0",
            ),
            ("alpha", _is_real, lambda v: v >= 0, "a number >= 0"),
            ("power_t", _is_real, lambda v: v >= 0, "a number >= 0"),
            ("momentum", _is_real, lambda v: 0 <= v <= 1, "a number in [0, 1]"),
            ("beta_1", _is_real, lambda v: 0 <= v < 1, "a number in [0, 1)"),
            ("beta_2", _is_real, lambda v: 0 <= v < 1, "a number in [0, 1)"),
            ("epsilon", _is_real, lambda v: v > 0, "a number > 0"),
            ("tol", _is_real, lambda v: v >= 0, "a number >= 0"),
            ("validation_fraction", _is_real, lambda v: 0 < v < 1, "a number in (0, 1)"),
            ("max_iter", _is_int, lambda v: v > 0, "an int > 0"),
            ("n_iter_no_change", _is_int, lambda v: v > 0, "an int > 0"),
            ("record_every", _is_int, lambda v: v > 0, "an int > 0"),
            ("max_fun", _is_int, lambda v: v > 0, "an int > 0"),
        ]
        for param, kind, ok, what in checks:
            value = getattr(self, param)
            if not (kind(value) and ok(value)):
                raise ValueError(f"{name}: {param} must be {what}, got {value!r}")
        # Batch statistics need two samples per batch; without batch norm a batch of one
        # is plain stochastic gradient descent, as scikit-learn's MLPs allow.
        bn = self._has_batch_norm()
        smallest = 2 if bn else 1
        if self.batch_size != "auto" and not (_is_int(self.batch_size) and self.batch_size >= smallest):
            why = f" (batch norm needs two samples per batch{self._fitted_bn_note()})" if bn else ""
            raise ValueError(
                f"{name}: batch_size must be 'auto' or an int > {smallest - 1}{why}, got {self.batch_size!r}"
            )
        # scikit-learn's rule for random_state, checked here so that a bad one is named
        # (check_random_state's own message does not say which argument it was).
        rs = self.random_state
        if not (rs is None or isinstance(rs, np.random.RandomState) or (_is_int(rs) and 0 <= rs < 2**32)):
            raise ValueError(
                f"{name}: random_state must be None, an int in [0, 2**32 - 1] or a numpy.random.RandomState "
                f"instance (as in scikit-learn; for a numpy Generator pass an int drawn from it), got {rs!r}"
            )
        metrics = self._metrics()
        if metrics and self.solver not in STOCHASTIC:
            raise ValueError(
                f"{name}: record_metrics are recorded by the mini-batch Trainer of the stochastic solvers "
                f"{STOCHASTIC}; solver={self.solver!r} has no steps to record them at"
            )
        return sizes, metrics

    def _check_solver(self) -> bool:
        """``partial_fit`` exists for the stochastic solvers only (scikit-learn's rule and
        message; ``hasattr(estimator, "partial_fit")`` is False for "lbfgs")."""
        if self.solver not in STOCHASTIC:
            raise AttributeError(
                f"partial_fit is only available for stochastic optimizers. {self.solver} is not stochastic."
            )
        return True

    def _has_batch_norm(self) -> bool:
        """Whether the network trained has batch norm: the fitted one's architecture when
        partial_fit continues it (a later set_params(batch_norm=False) changes nothing
        there), else the ``batch_norm`` parameter."""
        return bool(self._arch["batch_norm"] if "_arch" in self.__dict__ else self.batch_norm)

    def _fitted_bn_note(self) -> str:
        """For messages: why batch norm applies although ``batch_norm`` is now False."""
        if self.batch_norm:
            return ""
        return "; the fitted network partial_fit continues has batch norm, batch_norm=False applies from the next fit"

    def _metrics(self) -> list[Any]:
        """``record_metrics`` as Trainer metrics: names of the toolkit's metrics
        ("ics", "landscape", "grad_norm", "weight_norm") or metric callables."""
        if isinstance(self.record_metrics, str):
            raise ValueError(
                f"{type(self).__name__}: record_metrics must be a sequence of names or metrics, "
                f"got the string {self.record_metrics!r} (write [{self.record_metrics!r}])"
            )
        from ..train.metrics import METRIC_NAMES as named  # the measurement toolkit, loaded when used

        metrics = []
        for item in self.record_metrics:
            if isinstance(item, str):
                if item not in named:
                    raise ValueError(
                        f"{type(self).__name__}: unknown metric {item!r} in record_metrics; "
                        f"names: {sorted(named)}, or pass a metric object from numbabn.train "
                        "(e.g. ActivationPercentiles(layer=2))"
                    )
                item = named[item]()
            metrics.append(item)
        return metrics

    # ------------------------------------------------------------ network
    @staticmethod
    def _build(arch: Any, rng: np.random.Generator) -> tuple[Any, Any]:
        """The network (see the module docstring) and its optimizer, from ``arch``: the
        settings they were fitted with (so a later set_params cannot change them)."""
        from ..layers import BatchNorm1d, Linear, ReLU, Sequential, Sigmoid, Tanh

        layers = []
        n_in, dtype, activation, bn = arch["n_in"], arch["dtype"], arch["activation"], arch["batch_norm"]
        init = "he" if activation == "relu" else "glorot"
        for width in arch["sizes"]:
            layers.append(Linear(n_in, width, bias=not bn, init=init, rng=rng, dtype=dtype))
            if bn:
                layers.append(BatchNorm1d(width, activation="relu" if activation == "relu" else None, dtype=dtype))
            if not (bn and activation == "relu"):
                layers.append({"relu": ReLU, "tanh": Tanh, "logistic": Sigmoid}[activation]())
            n_in = width
        layers.append(Linear(n_in, arch["n_out"], init="glorot", rng=rng, dtype=dtype))
        model = Sequential(*layers)
        return model, _BaseBNMLP._new_optimizer(arch, model)

    @staticmethod
    def _new_optimizer(arch: Any, model: Any) -> Any:
        """A fresh optimizer of ``arch``'s solver over ``model``'s parameters; alpha's
        L2 on the weight matrices only (its weight_decay is set per batch, :meth:`_trainer`)."""
        from ..layers import Linear
        from ..optim import SGD, Adam

        weights = [layer.weight for layer in model.layers if isinstance(layer, Linear)]
        if arch["solver"] == "lbfgs":
            return None  # scipy's L-BFGS-B keeps its own state, for one fit (._lbfgs)
        # .get: the defaults of an estimator pickled before these settings existed
        if arch["solver"] == "adam":
            betas, eps = arch.get("betas", (0.9, 0.999)), arch.get("epsilon", 1e-8)
            return Adam(model.parameters(), lr=arch["lr"], betas=betas, eps=eps, decayed=weights)
        momentum = arch["momentum"]
        nesterov = arch.get("nesterov", False) and momentum > 0  # no Nesterov step without momentum, as scikit-learn
        return SGD(model.parameters(), lr=arch["lr"], momentum=momentum, nesterov=nesterov, decayed=weights)

    def _learning_rate_init(self) -> float:
        """``learning_rate_init`` with "auto" resolved (module docstring): 0.01, or
        scikit-learn's 0.001 for the regressor's SGD."""
        if _is_auto(self.learning_rate_init):
            return 0.001 if self._regression and self.solver == "sgd" else 0.01
        return float(self.learning_rate_init)

    def _solver_settings(self) -> dict[str, Any]:
        """The optimizer's settings, as the fitted architecture keeps them: a fit (or a
        warm start) takes them from the parameters, partial_fit continues with them."""
        return dict(
            solver=self.solver,
            lr=self._learning_rate_init(),
            momentum=self.momentum,
            nesterov=bool(self.nesterovs_momentum),
            betas=(float(self.beta_1), float(self.beta_2)),
            epsilon=float(self.epsilon),
            schedule=self.learning_rate,
            power_t=float(self.power_t),
        )

    def _end_epoch(self, improved: bool) -> bool:
        """scikit-learn's end of an epoch (``fit`` and ``partial_fit``): the SGD learning
        rate schedule, then the no-improvement count; True when training should stop.

        ``"invscaling"``: lr = learning_rate_init / (t_ + 1)**power_t. ``"adaptive"``:
        where training would stop (no improvement by ``tol`` for more than
        ``n_iter_no_change`` epochs) the learning rate is divided by 5 and the count
        restarts, until it is <= 1e-6. Adam ignores ``learning_rate``, as scikit-learn's."""
        arch, opt = self._arch, self._optimizer
        sgd = arch["solver"] == "sgd"
        if sgd and arch.get("schedule") == "invscaling":
            opt.lr = float(arch["lr"]) / (self.t_ + 1) ** arch["power_t"]
        count = 0 if improved else getattr(self, "_no_improvement_count", 0) + 1
        self._no_improvement_count = count
        if count <= self.n_iter_no_change:
            return False
        what = "Validation score" if self.early_stopping else "Training loss"
        message = f"{what} did not improve more than tol={self.tol:f} for {self.n_iter_no_change} consecutive epochs."
        if sgd and arch.get("schedule") == "adaptive" and opt.lr > 1e-6:
            opt.lr /= 5.0
            self._no_improvement_count = 0
            if self.verbose:
                print(f"{message} Setting learning rate to {opt.lr:f}")
            return False
        if self.verbose:
            print(f"{message} Stopping.")
        return True

    def _continue(self, sizes: tuple[int, ...]) -> None:
        """A ``warm_start`` fit: keep the fitted network (its shape must be the one the
        parameters ask for) and give it a fresh optimizer with the current ``solver``,
        ``learning_rate_init`` and ``momentum``, as scikit-learn's warm start does."""
        arch = self._arch
        for param, key, value in (
            ("hidden_layer_sizes", "sizes", sizes),
            ("activation", "activation", self.activation),
            ("batch_norm", "batch_norm", self.batch_norm),
        ):
            if arch[key] != value:
                raise ValueError(
                    f"{type(self).__name__}: warm_start=True continues the fitted network, which has "
                    f"{param}={arch[key]!r}, but {param} is now {getattr(self, param)!r}; set "
                    "warm_start=False to fit a new network"
                )
        self._new_solver()
        self.n_iter_ = 0  # epochs of this call, as in scikit-learn

    def _new_solver(self) -> None:
        """A fresh optimizer with the current solver settings for the fitted network."""
        self._arch = {**self._arch, **self._solver_settings()}
        self._optimizer = self._new_optimizer(self._arch, self._model)
        self._start_stochastic()

    def _initialize(self, sizes: Sequence[int], n_in: int, n_out: int, dtype: DTypeLike) -> None:
        rs = check_random_state(self.random_state)
        self._rng = np.random.default_rng(rs.randint(np.iinfo(np.int32).max))
        self._dtype = np.dtype(dtype)
        self._arch = dict(
            sizes=sizes,
            n_in=n_in,
            n_out=n_out,
            dtype=self._dtype,
            activation=self.activation,
            batch_norm=self.batch_norm,
            # the regressor's squared loss: scikit-learn's half squared error (networks
            # fitted before 2026-12-05 lack the key and keep the mean squared error)
            squared_loss="half",
            **self._solver_settings(),
        )
        self._model, self._optimizer = self._build(self._arch, self._rng)
        self.n_iter_ = 0
        self.t_ = 0
        self.n_layers_ = len(sizes) + 2  # input, hidden and output layers, as scikit-learn counts
        self.out_activation_ = self._out_activation()
        self.n_outputs_ = n_out  # (the regressor's was set with its targets: the same number)
        self.history_ = None
        self._start_stochastic()

    def _start_stochastic(self) -> None:
        """The epoch records of a stochastic solver, where a network has none yet (a new
        one, or one fitted by "lbfgs" that a stochastic solver continues); "lbfgs" keeps
        none, as in scikit-learn."""
        if self._arch["solver"] not in STOCHASTIC or "loss_curve_" in self.__dict__:
            return
        self.loss_curve_: list[float] = []
        self.best_loss_: float | None = None if self.early_stopping else np.inf  # scikit-learn's convention
        if not self.early_stopping:  # scikit-learn's: None unless early stopping keeps scores
            self.validation_scores_: list[float] | None = None
            self.best_validation_score_: float | None = None

    def _trainer(self, n_samples: int, metrics: list[Any]) -> Any:
        """A Trainer over the fitted network, seeded from the estimator's generator,
        cutting epochs as scikit-learn's ``gen_batches`` (a last, smaller batch; with
        batch norm one sample left over joins the batch before). Its loss sets the weight decay per
        batch: alpha / (the batch's size, or its weight sum), :mod:`._weighted`."""
        from ..train import Trainer
        from ._weighted import WEIGHTED

        return Trainer(
            self._model,
            WEIGHTED[self._loss_class()](self._optimizer, self.alpha),
            self._optimizer,
            batch_size=int(min(200 if self.batch_size == "auto" else self.batch_size, n_samples)),
            seed=int(self._rng.integers(np.iinfo(np.int32).max)),
            shuffle=bool(self.shuffle),
            leftover="batch" if self._has_batch_norm() else "keep",
            metrics=metrics,
            record_every=self.record_every,
            verbose=0,
        )

    def _reported_loss(self, loss: float) -> float:
        """An epoch's mean batch loss as ``loss_``/``loss_curve_`` report it."""
        return loss

    def _epoch(
        self, trainer: Any, X: NDArray[Any], targets: NDArray[Any], weights: NDArray[Any] | None = None
    ) -> float:
        """One epoch (see the module docstring); appends to loss_curve_ and history_
        (as new objects: a working copy shares the committed ones, see :meth:`_working_copy`).
        The epoch's loss is the mean of its batches' losses weighted by their sizes, as
        scikit-learn's; with ``weights``, over the batches whose weights do not sum to 0
        (the others have a NaN loss: they weigh nothing)."""
        from ..train import History

        sizes = trainer.epoch_batch_sizes(X.shape[0])
        trainer.loss.totals.clear()
        part = trainer.fit(X, targets, epochs=1, sample_weight=weights)
        if weights is not None:
            carried = [total > 0 for total in trainer.loss.totals]
            sizes = [size if keep else 0 for size, keep in zip(sizes, carried, strict=True)]
        loss = (
            float(sum(v * s for v, s in zip(part.loss, sizes, strict=True) if s) / sum(sizes))
            if sum(sizes)
            else float("nan")
        )
        self.n_iter_ += 1
        # every sample of the epoch, as scikit-learn counts (getattr: an estimator
        # pickled before t_ existed)
        self.t_ = getattr(self, "t_", 0) + X.shape[0]
        loss = self._reported_loss(loss)
        self.loss_ = loss
        self.loss_curve_ = self.loss_curve_ + [loss]
        if not self.early_stopping:  # None after an early-stopping fit: partial_fit starts the count
            self.best_loss_ = min(np.inf if self.best_loss_ is None else self.best_loss_, loss)
        if self.history_ is None:
            self.history_ = part
        else:
            old, merged = self.history_, History(classification=part.accuracy is not None, meta=self.history_.meta)
            merged.step, merged.loss = old.step + part.step, old.loss + part.loss
            if old.accuracy is not None:
                merged.accuracy = old.accuracy + part.accuracy
            merged.eval = {k: list(v) for k, v in old.eval.items()}
            merged.metrics = {name: {k: list(v) for k, v in series.items()} for name, series in old.metrics.items()}
            for name, series in part.metrics.items():
                total = merged.metrics.setdefault(name, {"step": [], "value": []})
                total["step"] += series["step"]
                total["value"] += series["value"]
            self.history_ = merged
        if self.verbose:
            print(f"Iteration {self.n_iter_}, loss = {loss:.8f}")
        return loss

    @property
    def coefs_(self) -> list[NDArray[Any]]:
        """The weight matrix of every linear layer, in scikit-learn's layout: entry i of
        shape (units of layer i, units of layer i + 1). Views of the network's weights
        (writing into one changes the network, as with scikit-learn's arrays) until the
        next ``fit`` or ``partial_fit``: those train a copy of the network and swap it in
        on success (so a call that raises changes nothing), and arrays read before them
        keep the old weights; read ``coefs_`` again after them. The output layer has one
        column per class, and one for two classes (as scikit-learn's binary network).
        AttributeError until fitted."""
        from ..layers import Linear

        return [layer.weight.value.T for layer in self._fitted_model("coefs_").layers if isinstance(layer, Linear)]

    @property
    def intercepts_(self) -> list[NDArray[Any]]:
        """The bias vector of every linear layer (views, like ``coefs_``), for a network
        without batch norm. With batch norm the hidden linear layers have no bias --
        batch norm's beta takes its place, after the normalisation, which this layout
        cannot express -- so the attribute does not exist (AttributeError)."""
        from ..layers import Linear

        model = self._fitted_model("intercepts_")
        if self._arch["batch_norm"]:
            raise AttributeError(
                f"{type(self).__name__} has no intercepts_ with batch norm: its hidden linear layers have no "
                "bias (batch norm's beta follows the normalisation); coefs_ holds their weights"
            )
        return [layer.bias.value for layer in model.layers if isinstance(layer, Linear)]

    def _fitted_model(self, attribute: str) -> Any:
        model = self.__dict__.get("_model")
        if model is None:
            raise AttributeError(f"{type(self).__name__} has no {attribute} before it is fitted")
        return model

    def _forward(self, X: NDArray[Any]) -> NDArray[np.floating[Any]]:
        """Network output for validated X, in eval mode (running statistics)."""
        self._model.eval()
        return self._model.forward(self._in_network_dtype("X", X))

    def _in_network_dtype(self, arg: str, a: NDArray[Any]) -> NDArray[Any]:
        """Validated (finite) ``a`` in the network's dtype. Values beyond that dtype's
        range (float64 X or y for a float32 network) would become infinite: they raise."""
        limit = float(np.finfo(self._dtype).max)
        # float(): NumPy 2 would cast a float64 limit to a float32 maximum's dtype
        # (an overflow warning, an error under -W error) for float32 X and a float64 network
        if a.dtype.kind == "f" and float(np.finfo(a.dtype).max) > limit and a.size:
            largest = float(np.max(np.abs(a)))
            if largest > limit:
                raise ValueError(
                    f"{type(self).__name__}: {arg} has values up to {largest:.3g} in magnitude, beyond the "
                    f"{self._dtype} range (+-{limit:.3g}) of the fitted network, which "
                    f"computes in {self._dtype} because it was fitted on {self._dtype} X; scale {arg}, or "
                    "fit on float64 X"
                )
        return np.asarray(a, dtype=self._dtype)

    # ------------------------------------------------------------ fitting
    def _validate_xy(self, X: ArrayLike, y: ArrayLike, reset: bool) -> tuple[NDArray[Any], NDArray[Any]]:
        X, y = validate_data(
            self,
            X,
            y,
            reset=reset,
            dtype=FLOAT_DTYPES,
            accept_sparse=False,
            multi_output=True,  # the classifier checks a 2-D y is a multilabel indicator
            y_numeric=self._regression,
        )
        if self._regression and y.dtype.kind not in "biuf":
            # scikit-learn's y_numeric converts only object arrays: strings would be
            # parsed as numbers later on, or fail inside NumPy.
            raise ValueError(f"{type(self).__name__}: y must hold numbers (a regression target), got dtype {y.dtype}")
        if y.ndim == 2 and y.shape[1] == 1:  # scikit-learn's MLPRegressor: one target, warned
            y = column_or_1d(y, warn=True)
        if self._has_batch_norm() and X.shape[0] < 2:
            raise ValueError(
                f"{type(self).__name__} with batch_norm=True needs at least 2 samples to train "
                f"(batch statistics{self._fitted_bn_note()}), got 1 sample"
            )
        return X, y

    # Fitting works on a copy of the estimator and commits it only when it succeeds: a
    # call that raises (bad X or y, a stratified split that cannot be made, a failing
    # metric, an interrupt) leaves the estimator exactly as it was -- still fitted with
    # the previous model, or still unfitted.
    _FITTED_PRIVATE = ("_rng", "_dtype", "_arch", "_model", "_optimizer", "_no_improvement_count")

    @classmethod
    def _is_fitted_attribute(cls, name: str) -> bool:
        return (name.endswith("_") and not name.startswith("__")) or name in cls._FITTED_PRIVATE

    def _working_copy(self, fresh: bool) -> Self:
        """A copy to train: without any fitted state (``fresh``, for :meth:`fit`), or with
        copies of the mutable fitted state (network, optimizer, generator) for
        :meth:`partial_fit`. Hyper-parameters are shared, not copied."""
        work = object.__new__(type(self))
        work.__dict__.update((k, v) for k, v in self.__dict__.items() if not (fresh and self._is_fitted_attribute(k)))
        if not fresh and "_model" in self.__dict__:
            work._model, work._optimizer = self._build(self._arch, np.random.default_rng(0))
            work._model.load_state_dict(self._model.state_dict())
            if self._optimizer is not None:
                work._optimizer.load_state_dict(self._optimizer.state_dict())
            work._rng = copy.deepcopy(self._rng)
        return work

    def _commit(self, work: Self) -> Self:
        self.__dict__.clear()
        self.__dict__.update(work.__dict__)
        return self

    def fit(self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | float | None = None) -> Self:
        """Train from scratch for up to ``max_iter`` epochs (see the module docstring),
        or, with ``warm_start=True`` and a fitted network, continue that network.

        ``sample_weight`` (None, a number, or one weight >= 0 per sample), as
        scikit-learn's MLPs (>= 1.7): each mini-batch's loss is the weighted mean of
        its samples' losses, and its L2 penalty is divided by the batch's weight sum
        instead of its size, so all weights 1 fit as no weights (up to rounding) and
        weight k counts a sample as k copies in the loss and the penalty. Batch norm's
        batch statistics stay unweighted (as in Keras and PyTorch, where weights enter
        the loss only): a sample of weight 0 still enters its batch's mean and
        variance. With early stopping, the validation score is weighted too. Unlike
        scikit-learn, negative weights are refused (a loss they weigh down is not one
        to minimise), as are weights summing to 0 (nothing to fit); a batch whose
        weights sum to 0 makes a step without data gradient or penalty, and
        ``loss_curve_`` averages the batches that carry weight.

        Trains a copy and replaces the fitted state only on success: on an error the
        previous fit (or the unfitted state) is kept unchanged."""
        warm = bool(self.warm_start) and "_model" in self.__dict__
        work = self._working_copy(fresh=not warm)
        work._fit(X, y, warm, sample_weight)
        return self._commit(work)

    def _check_warm_targets(self, y: NDArray[Any]) -> None:
        """A warm-started fit's y against the fitted network (the classifier's classes;
        a regressor's target count is checked with the targets)."""

    def _check_validation_split(self, n_samples: int) -> None:
        """Early stopping's split (scikit-learn's sizes: ceil(validation_fraction * n)
        held out) must leave 2 validation samples for a score and 2 training samples
        for batch statistics (1 without batch norm)."""
        name, fraction = type(self).__name__, self.validation_fraction
        n_val = ceil(fraction * n_samples)
        if n_val < 2:
            raise ValueError(
                f"{name}: early_stopping=True with validation_fraction={fraction!r} of {n_samples} samples "
                f"holds out {n_val} for validation; a validation score needs at least 2. The validation "
                "set is too small. Increase 'validation_fraction' or the size of your dataset."
            )
        needed = 2 if self.batch_norm else 1
        if n_samples - n_val < needed:
            why = "batch_norm=True needs 2 (batch statistics)" if self.batch_norm else "training needs 1"
            raise ValueError(
                f"{name}: early_stopping=True with validation_fraction={fraction!r} of {n_samples} samples "
                f"holds out {n_val} for validation and leaves {n_samples - n_val} to train on; {why}. "
                "Decrease 'validation_fraction' or increase the size of your dataset."
            )

    def _fit(self, X: ArrayLike, y: ArrayLike, warm: bool, sample_weight: Any = None) -> None:
        sizes, metrics = self._check_params()
        X, y = self._validate_xy(X, y, reset=not warm)
        weights = check_sample_weight(type(self).__name__, sample_weight, X.shape[0])
        if warm:
            self._check_warm_targets(y)
        targets = self._encode_targets(y, fitting=not warm)
        stochastic = self.solver in STOCHASTIC  # "lbfgs" ignores early_stopping, as scikit-learn's
        if self.early_stopping and stochastic:
            self._check_validation_split(X.shape[0])
        if warm:
            self._continue(sizes)
            X = self._in_network_dtype("X", X)
        else:
            self._initialize(sizes, X.shape[1], self._n_outputs(), X.dtype)
        if not stochastic:
            self._fit_lbfgs(X, self._as_training_targets(targets), weights)
            self._check_finite_network()
            return
        w_val = None
        if self.early_stopping:
            # scikit-learn's split: stratified only where its network has one output
            # (binary classification); a multiclass y with a class of one sample, or more
            # classes than validation samples, must still fit.
            binary = isinstance(self, ClassifierMixin) and targets.ndim == 1 and self._n_outputs() == 1
            stratify = targets if binary else None
            X, X_val, targets, t_val, *w_split = train_test_split(
                X,
                targets,
                *(() if weights is None else (weights,)),
                test_size=self.validation_fraction,
                stratify=stratify,
                random_state=int(self._rng.integers(np.iinfo(np.int32).max)),
            )
            if weights is not None:
                weights, w_val = w_split
                for part, held, task in (("validation", w_val, "score"), ("training", weights, "fit")):
                    if not held.any():
                        raise ValueError(
                            f"{type(self).__name__}: early_stopping's {part} samples all have sample_weight 0: "
                            f"there is nothing to {task}"
                        )
            # A warm start continues an earlier early-stopping fit's scores (new list:
            # the working copy shares the committed one).
            self.validation_scores_ = list(getattr(self, "validation_scores_", None) or [])
            if getattr(self, "best_validation_score_", None) is None:
                self.best_validation_score_ = -np.inf
            best_state = self._model.state_dict()
        targets = self._as_training_targets(targets)
        trainer = self._trainer(X.shape[0], metrics)
        # The no-improvement count (_end_epoch) carries on across warm-started fits, as in
        # scikit-learn; a fresh fit's working copy starts without one.
        for _ in range(self.max_iter):
            best_loss = np.inf if self.best_loss_ is None else self.best_loss_  # None after early stopping
            loss = self._epoch(trainer, X, targets, weights)
            if self.early_stopping:
                score = self._score_targets(X_val, t_val, w_val)
                self.validation_scores_.append(score)
                if self.verbose:
                    print(f"Validation score: {score:f}")
                improved = score >= self.best_validation_score_ + self.tol  # never for NaN
                if score > self.best_validation_score_:
                    self.best_validation_score_ = score
                    best_state = self._model.state_dict()
            else:
                improved = loss <= best_loss - self.tol
            if self._end_epoch(improved):
                break
        else:
            warn_at_caller(
                f"Stochastic Optimizer: Maximum iterations ({self.max_iter}) reached and the "
                "optimization hasn't converged yet.",
                ConvergenceWarning,
            )
        if self.early_stopping:
            if self.best_validation_score_ == -np.inf:
                raise ValueError(
                    f"{type(self).__name__}: early stopping found no epoch with a finite validation score "
                    f"(validation scores of the {self.n_iter_} epochs: {self.validation_scores_[:5]}"
                    f"{' ...' if self.n_iter_ > 5 else ''}): the network's output on the validation set, or "
                    "its score, overflowed, so there is no trained state to keep; lower learning_rate_init, "
                    "or scale X and y"
                )
            self._model.load_state_dict(best_state)
        self._check_finite_network()
        return self

    def _fit_lbfgs(self, X: NDArray[Any], targets: NDArray[Any], weights: NDArray[Any] | None) -> None:
        """``solver="lbfgs"`` (:mod:`._lbfgs`): ``n_iter_`` its iterations, ``loss_`` the
        objective at the solution (penalty included, as scikit-learn's)."""
        from ._lbfgs import fit_lbfgs

        result = fit_lbfgs(
            self._model, self._loss_class()(), X, targets, weights, self.alpha, self.max_iter, self.max_fun, self.tol
        )
        self.n_iter_ = min(int(result.nit), self.max_iter)
        self.loss_ = float(result.fun)
        if self.verbose:
            print(f"lbfgs: {result.nit} iterations, {result.nfev} evaluations, loss = {self.loss_:.8f}")
        if not result.success:
            warn_at_caller(
                f"lbfgs failed to converge after {result.nit} iteration(s) (status={result.status}): "
                f"{result.message}. Increase the number of iterations (max_iter={self.max_iter}) "
                f"or function evaluations (max_fun={self.max_fun}).",
                ConvergenceWarning,
            )

    def _partial_fit(
        self, X: ArrayLike, y: ArrayLike, classes: ArrayLike | None = None, sample_weight: Any = None
    ) -> Self:
        """One epoch on a working copy, committed on success (see :meth:`fit`)."""
        work = self._working_copy(fresh=False)
        work._partial_fit_epoch(X, y, classes, sample_weight)
        return self._commit(work)

    def _partial_fit_epoch(self, X: ArrayLike, y: ArrayLike, classes: ArrayLike | None, sample_weight: Any) -> Self:
        sizes, metrics = self._check_params()
        if self.early_stopping:  # scikit-learn's message and rule: no validation split of one batch
            raise ValueError(
                f"{type(self).__name__}: partial_fit does not support early_stopping=True "
                "(set early_stopping=False to train on one batch, or use fit)"
            )
        first = not hasattr(self, "_model")
        X, y = self._validate_xy(X, y, reset=first)
        weights = check_sample_weight(type(self).__name__, sample_weight, X.shape[0])
        targets = self._encode_targets(y, fitting=first, classes=classes)
        if first:
            self._initialize(sizes, X.shape[1], self._n_outputs(), X.dtype)
        elif self._optimizer is None:  # a network fitted by "lbfgs": the stochastic solver starts, as in scikit-learn
            self._new_solver()
        X = self._in_network_dtype("X", X)
        trainer = self._trainer(X.shape[0], metrics)
        self.n_iter_ = 0  # the epochs of this call (one), as in scikit-learn; loss_curve_ carries on
        best_loss = np.inf if self.best_loss_ is None else self.best_loss_
        loss = self._epoch(trainer, X, self._as_training_targets(targets), weights)
        self._end_epoch(loss <= best_loss - self.tol)  # the schedule; one epoch either way
        self._check_finite_network()
        return self

    def _check_finite_network(self) -> None:
        """Raise, like scikit-learn's MLPs, when training left a weight or a running
        statistic NaN or infinite (diverged, or X too large): such a network predicts NaN,
        so :meth:`fit` / :meth:`partial_fit` fail and keep the previous state instead."""
        for key, value in self._model.state_dict().items():
            if np.asarray(value).dtype.kind == "f" and not np.isfinite(value).all():
                raise ValueError(
                    f"{type(self).__name__}: Solver produced non-finite parameter weights ({key!r} of the "
                    "trained network). The input data may contain large values and need to be preprocessed "
                    "(or lower learning_rate_init)."
                )

    # Pickles hold the network's parameters and buffers and the optimizer state, not the
    # layer objects: no cached activations of the last batch, and unpickling rebuilds
    # writeable arrays even from read-only memory maps (joblib's mmap_mode="r").
    def __getstate__(self) -> dict[str, Any]:
        state = dict(super().__getstate__())  # object.__getstate__ may return __dict__ itself
        if "_model" in state:
            state["_model"] = self._model.state_dict()
            state["_optimizer"] = None if self._optimizer is None else self._optimizer.state_dict()
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        super().__setstate__(state)
        if "_model" in state:
            self._model, self._optimizer = self._build(self._arch, np.random.default_rng(0))
            self._model.load_state_dict(state["_model"])
            if state["_optimizer"] is not None:
                self._optimizer.load_state_dict(state["_optimizer"])


class BNMLPClassifier(ClassifierMixin, _BaseBNMLP):
    """Multi-layer perceptron classifier with batch norm (softmax cross-entropy; for two
    classes one logistic output and the binary cross-entropy, as scikit-learn's).

    Parameters mirror :class:`sklearn.neural_network.MLPClassifier`:
    ``hidden_layer_sizes``, ``activation`` ("relu", "tanh", "logistic"),
    ``solver`` ("adam": Adam with ``beta_1``, ``beta_2``, ``epsilon``; "sgd": SGD with
    ``momentum``, Nesterov's when ``nesterovs_momentum``; "lbfgs": scipy's full-batch
    L-BFGS-B for up to ``max_iter`` iterations and ``max_fun`` evaluations, ``tol`` its
    gradient tolerance, batch norm normalising with the whole training set's
    statistics, see ``numbabn.sklearn._lbfgs``; as in scikit-learn it has no
    ``partial_fit``, ignores ``early_stopping`` and keeps no ``loss_curve_``), ``alpha`` (L2 penalty on
    the weight matrices, default 1e-4), ``learning_rate_init`` (default "auto": 0.01, ten times
    scikit-learn's, but 0.001 for the regressor's SGD: see the module docstring), ``learning_rate`` (the SGD schedule:
    "constant"; "invscaling", ``learning_rate_init / (t_ + 1)**power_t`` after each
    epoch; "adaptive", divided by 5 wherever training would stop, until <= 1e-6; Adam
    ignores it, as scikit-learn's), ``batch_size`` ("auto" = min(200, n); an int >= 2
    with batch norm, >= 1 without), ``shuffle`` (False: the same batches in order every
    epoch; see the module docstring for how an epoch is cut), ``max_iter`` (epochs), ``tol``, ``n_iter_no_change``,
    ``early_stopping`` (``fit`` only: ``partial_fit`` raises, as scikit-learn's does),
    ``validation_fraction``, ``random_state`` (None, an int in [0, 2**32 - 1] or a
    ``numpy.random.RandomState``, as in scikit-learn), ``verbose`` (bool or int >= 0;
    progress is printed when true/nonzero). Added: ``batch_norm`` (True: BatchNorm1d
    after every hidden linear layer), ``record_metrics`` (names "ics", "landscape",
    "grad_norm", "weight_norm" or metric objects of :mod:`numbabn.train`, recorded by
    the Trainer every ``record_every`` steps). ``warm_start=True``: ``fit`` continues
    the fitted network as scikit-learn's does (same classes required; a fresh
    optimizer with the current solver and learning rate; ``n_iter_`` counts this
    call's epochs; ``loss_curve_``, ``best_loss_``, the early-stopping scores and the
    no-improvement count carry on); changing ``hidden_layer_sizes``, ``activation``
    or ``batch_norm`` in between raises. ``partial_fit`` continues with the optimizer
    settings and the (scheduled) learning rate of the fit that started the network.
    The optimizers are PyTorch's formulations (:mod:`numbabn.optim`): with a constant
    learning rate SGD steps as scikit-learn's; when a schedule changes it, the momentum
    buffer carries no old rate (scikit-learn's velocity does), and Adam adds
    ``epsilon`` to the bias-corrected root (scikit-learn: to the uncorrected one).
    ``fit`` and ``partial_fit`` take ``sample_weight`` as scikit-learn's (see
    ``fit``; the classifier's ``partial_fit`` takes it by keyword, after ``classes``).
    A 2-D ``y`` of 0s and 1s (n_samples, n_labels) is multilabel, as in scikit-learn:
    one sigmoid output per label, the loss :class:`numbabn.layers.SigmoidBinaryCrossEntropy`
    (summed over labels, averaged over samples), ``classes_`` the label indices,
    ``predict`` the indicator of probabilities > 0.5, ``score`` the subset accuracy.

    Attributes: ``classes_``, ``loss_`` (the last epoch's loss), ``loss_curve_``,
    ``n_iter_`` (epochs of the last ``fit``
    or ``partial_fit`` call: 1 after ``partial_fit``, as in scikit-learn), ``t_``
    (training samples seen: n per epoch, as in scikit-learn),
    ``n_layers_``, ``out_activation_`` ("softmax" for three or more classes;
    "logistic" for two classes and for multilabel y), ``n_outputs_`` (the network's
    outputs: one per class, or one per label, and 1 for two classes, as in
    scikit-learn), ``best_loss_`` (lowest
    epoch loss; None after a fit with early stopping, as in scikit-learn -- a later
    ``partial_fit`` counts from its own epochs), ``validation_scores_`` and
    ``best_validation_score_`` (early stopping; None without, as in scikit-learn), ``history_`` (the
    :class:`numbabn.train.History` of all epochs: per-step loss and accuracy, and the
    recorded metrics), ``n_features_in_``, ``feature_names_in_``, ``coefs_`` and,
    without batch norm, ``intercepts_`` (scikit-learn's layout, views of the network's
    arrays). See the module docstring for the math.
    """

    _regression = False
    _FITTED_PRIVATE = _BaseBNMLP._FITTED_PRIVATE + ("_multilabel", "_binary")
    _multilabel = False  # the class default: single-label (also for estimators pickled before multilabel)
    # Two classes: one logistic output, the probability of classes_[1], trained with the
    # binary cross-entropy, as scikit-learn's network. The class default (False) keeps the
    # two softmax outputs of an estimator pickled before, which also continues that way.
    _binary = False

    def _logistic(self) -> bool:
        """Whether the outputs are sigmoids (multilabel, or one output for two classes)."""
        return self._multilabel or self._binary

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.classifier_tags.multi_label = True
        return tags

    def _loss_class(self) -> Any:
        from ..layers import SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy

        return SigmoidBinaryCrossEntropy if self._logistic() else SoftmaxCrossEntropy

    def _out_activation(self) -> str:
        return "logistic" if self._logistic() else "softmax"

    def _n_outputs(self) -> int:
        return 1 if self._binary else len(self.classes_)

    def _check_warm_targets(self, y: NDArray[Any]) -> None:
        check_classification_targets(y)
        self._check_target_kind(y)
        got = unique_labels(y)
        if not np.array_equal(got, self.classes_):  # scikit-learn's rule and message
            raise ValueError(
                f"{type(self).__name__}: warm_start can only be used where `y` has the same classes as in the "
                f"previous call to fit. Previously got {self.classes_}, `y` has {got}"
            )

    def _check_target_kind(self, y: NDArray[Any]) -> bool:
        """Whether ``y`` is a multilabel indicator (n_samples, n_labels) of 0s and 1s,
        the one 2-D y taken (scikit-learn's rule); for a fitted network, the kind it
        was fitted on."""
        kind = type_of_target(y)
        multilabel = kind == "multilabel-indicator"
        name = type(self).__name__
        if y.ndim == 2 and not (multilabel and np.isin(y, (0, 1)).all()):
            raise ValueError(
                f"{name}: a 2-D y must be a multilabel indicator (0 or 1 per sample and label), got {kind} "
                f"of shape {y.shape}"
            )
        if "_model" in self.__dict__ and multilabel != self._multilabel:
            fitted = "multilabel indicators" if self._multilabel else "single labels"
            raise ValueError(f"{name}: y is {kind}, but the network was fitted on {fitted}")
        return multilabel

    def _encode_targets(self, y: ArrayLike, fitting: bool, classes: ArrayLike | None = None) -> NDArray[Any]:
        """Labels -> indices into classes_ (set when fitting: from ``classes`` or y); a
        multilabel indicator stays as it is, its classes_ the label indices 0..K-1."""
        check_classification_targets(y)
        name = type(self).__name__
        multilabel = self._check_target_kind(y)  # (a fit's working copy has no network yet: any kind)
        if multilabel:
            labels = np.arange(y.shape[1])
            if fitting:
                self._multilabel = True
                self._binary = False
                self.classes_ = labels
            if classes is not None and not np.array_equal(unique_labels(classes), labels):
                raise ValueError(
                    f"{name}: a multilabel y of {y.shape[1]} labels has classes {labels.tolist()}, got "
                    f"classes={np.asarray(classes).tolist()!r}"
                )
            if y.shape[1] != len(self.classes_):
                raise ValueError(
                    f"{name}: y has {y.shape[1]} labels, but the network was fitted on {len(self.classes_)}"
                )
            return y
        if fitting:
            self._multilabel = False
            self.classes_ = unique_labels(y) if classes is None else unique_labels(classes)
            self._binary = len(self.classes_) == 2
        elif classes is not None and not np.array_equal(unique_labels(classes), self.classes_):
            raise ValueError(
                f"{name}.partial_fit: classes={np.asarray(classes).tolist()!r} differs from the "
                f"classes of the first call {self.classes_.tolist()!r}"
            )
        unknown = np.setdiff1d(y, self.classes_)
        if unknown.size:
            raise ValueError(
                f"{name}: y contains labels {unknown.tolist()} that are not in classes_ {self.classes_.tolist()}"
            )
        return np.searchsorted(self.classes_, y)

    def _as_training_targets(self, targets: NDArray[Any]) -> NDArray[Any]:
        """Class indices -> what the loss takes: 0/1 per label (multilabel), the index of
        the class as a (n, 1) 0/1 column (two classes), or the indices (softmax)."""
        if self._multilabel:
            return targets.astype(self._dtype)
        if self._binary:
            return targets.astype(self._dtype).reshape(-1, 1)
        return targets

    def _predicted(self, out: NDArray[Any]) -> NDArray[Any]:
        """Network output -> class indices (for two classes: logit > 0, i.e. probability
        of classes_[1] > 0.5), or a multilabel indicator (logit > 0 per label)."""
        if self._logistic():
            hit = (out > 0).astype(int)
            return hit if self._multilabel else hit[:, 0]
        return out.argmax(axis=1)

    def _score_targets(self, X: NDArray[Any], targets: NDArray[Any], weights: NDArray[Any] | None = None) -> float:
        """Validation accuracy (subset accuracy for multilabel, weighted by ``weights``);
        NaN when the network's output is not finite."""
        out = self._forward(X)
        if not np.isfinite(out).all():
            return np.nan
        return accuracy_score(targets, self._predicted(out), sample_weight=weights)

    @available_if(_BaseBNMLP._check_solver)
    def partial_fit(
        self,
        X: ArrayLike,
        y: ArrayLike,
        classes: ArrayLike | None = None,
        *,
        sample_weight: ArrayLike | float | None = None,
    ) -> Self:
        """One epoch over (X, y); ``classes`` (every label) is required on the first call.
        ``sample_weight`` as in ``fit`` (keyword only: ``classes`` keeps its place,
        where scikit-learn's third argument is ``sample_weight``)."""
        if classes is None and not hasattr(self, "classes_"):
            raise ValueError(
                f"{type(self).__name__}.partial_fit: classes must be given on the first call "
                "(every label that will ever appear)"
            )
        return self._partial_fit(X, y, classes, sample_weight)

    def _logits(self, X: ArrayLike) -> NDArray[np.floating[Any]]:
        """The network output (eval mode), shape (n_samples, n_outputs_)."""
        check_is_fitted(self)
        return self._forward(validate_data(self, X, reset=False, dtype=FLOAT_DTYPES, accept_sparse=False))

    def predict_proba(self, X: ArrayLike) -> NDArray[np.floating[Any]]:
        """Softmax of the network output (eval mode), shape (n_samples, n_classes); for
        two classes [sigmoid(-z), sigmoid(z)] of the one output z; for multilabel y the
        sigmoid of each output, one probability per label."""
        z = self._logits(X)
        if self._multilabel:
            return expit(z)
        if self._binary:
            return expit(np.hstack([-z, z]))  # 1 - p as expit(-z): exact where p is near 1
        z = z - z.max(axis=1, keepdims=True)
        with np.errstate(under="ignore"):  # far smaller logits give 0 by design, also under np.seterr(all="raise")
            p = np.exp(z)
            p /= p.sum(axis=1, keepdims=True)
        return p

    def predict_log_proba(self, X: ArrayLike) -> NDArray[np.floating[Any]]:
        """Log of :meth:`predict_proba`, as log-softmax (log-sigmoid for multilabel) of
        the network output: finite where a probability underflows to 0
        (scikit-learn's ``log(predict_proba)`` gives -inf there)."""
        z = self._logits(X)
        if self._multilabel:
            return log_expit(z)
        if self._binary:
            return log_expit(np.hstack([-z, z]))
        z = z - z.max(axis=1, keepdims=True)
        with np.errstate(under="ignore"):
            return z - np.log(np.exp(z).sum(axis=1, keepdims=True))

    def predict(self, X: ArrayLike) -> NDArray[Any]:
        """The class of highest probability; for multilabel y the indicator of the labels
        of probability > 0.5 (n_samples, n_labels)."""
        predicted = self._predicted(self._logits(X))
        return predicted if self._multilabel else self.classes_[predicted]


class BNMLPRegressor(RegressorMixin, _BaseBNMLP):
    """Multi-layer perceptron regressor with batch norm; parameters and attributes as
    :class:`BNMLPClassifier` (no ``classes_``; ``history_`` has no accuracy), plus
    ``loss``, as ``MLPRegressor``'s (keyword-only here: scikit-learn >= 1.7 made it its
    first positional parameter, which would change what ``BNMLPRegressor((64,))``
    means):

    * ``"squared_error"`` (default): half the squared error, identity output
      (:class:`numbabn.layers.HalfSquaredError`: scikit-learn's gradient, so the same
      ``learning_rate_init`` and ``alpha`` mean what they mean in ``MLPRegressor``;
      ``loss_``, ``loss_curve_`` and ``best_loss_`` are its value divided by the number of
      outputs, as scikit-learn reports it, ``history_`` holds the undivided batch losses
      and ``solver="lbfgs"`` minimises the undivided function, whose gradient it is,
      and reports it, penalty included, as ``loss_``; networks fitted before 2026-12-05
      used the mean squared error, twice this loss for one output, and a warm start or
      ``partial_fit`` of one continues with it);
    * ``"poisson"``: half the Poisson deviance (:class:`numbabn.layers.PoissonDeviance`)
      of the mean exp(z) of the network output z, ``out_activation_`` "exp" (the log
      link), y finite and >= 0 (counts or rates); ``predict`` returns exp(z).

    The loss a network was fitted with is kept: ``partial_fit`` or a warm-started
    ``fit`` after ``set_params(loss=...)`` to the other loss raises (a fresh ``fit``
    takes it). ``y`` may have several columns (``n_outputs_``); predictions of a single
    target are 1-D. A ``y`` of shape (n_samples, 1) is one target and gives a
    ``DataConversionWarning``, as in ``MLPRegressor``."""

    _regression = True
    _LOSSES = ("squared_error", "poisson")
    _FITTED_PRIVATE = _BaseBNMLP._FITTED_PRIVATE + ("_poisson",)
    # Class defaults for estimators pickled before ``loss`` existed: squared error.
    loss = "squared_error"
    _poisson = False

    def __init__(
        self,
        hidden_layer_sizes: Sequence[int] = (100,),
        activation: str = "relu",
        *,
        loss: str = "squared_error",
        batch_norm: bool = True,
        solver: str = "adam",
        alpha: float = 0.0001,
        learning_rate: str = "constant",
        learning_rate_init: float | str = "auto",
        power_t: float = 0.5,
        momentum: float = 0.9,
        nesterovs_momentum: bool = True,
        beta_1: float = 0.9,
        beta_2: float = 0.999,
        epsilon: float = 1e-8,
        batch_size: int | str = "auto",
        shuffle: bool = True,
        max_iter: int = 200,
        tol: float = 1e-4,
        n_iter_no_change: int = 10,
        early_stopping: bool = False,
        validation_fraction: float = 0.1,
        warm_start: bool = False,
        random_state: int | np.random.RandomState | None = None,
        verbose: bool | int = False,
        record_metrics: Sequence[Any] = (),
        record_every: int = 1,
        max_fun: int = 15000,
    ) -> None:
        # scikit-learn reads the parameters from the signature, so each estimator lists them
        # all (as MLPClassifier and MLPRegressor do); every one but loss is the base's
        shared = {k: v for k, v in locals().items() if k not in ("self", "loss", "__class__")}
        super().__init__(**shared)
        self.loss = loss

    def __sklearn_tags__(self) -> Any:
        tags = super().__sklearn_tags__()
        tags.target_tags.multi_output = True
        tags.target_tags.positive_only = self.loss == "poisson"  # scikit-learn's checks then draw y >= 0
        return tags

    def _check_params(self) -> tuple[tuple[int, ...], list[Any]]:
        if self.loss not in self._LOSSES:
            raise ValueError(f"{type(self).__name__}: loss must be 'squared_error' or 'poisson', got {self.loss!r}")
        return super()._check_params()

    def _loss_class(self) -> Any:
        from ..layers import HalfSquaredError, MSELoss, PoissonDeviance

        if self._poisson:
            return PoissonDeviance
        return HalfSquaredError if self._arch.get("squared_loss") == "half" else MSELoss

    def _reported_loss(self, loss: float) -> float:
        # scikit-learn's squared loss averages over the K outputs where its gradient
        # (ours) sums over them: its loss_curve_ and tol rule see the loss / K.
        return loss / self.n_outputs_ if self._loss_class().__name__ == "HalfSquaredError" else loss

    def _out_activation(self) -> str:
        return "exp" if self._poisson else "identity"

    def _n_outputs(self) -> int:
        return self.n_outputs_

    def _encode_targets(self, y: ArrayLike, fitting: bool, classes: ArrayLike | None = None) -> NDArray[Any]:
        name = type(self).__name__
        y = y.reshape(y.shape[0], -1)
        poisson = self.loss == "poisson"
        if fitting:
            self.n_outputs_ = y.shape[1]
            self._poisson = poisson
        elif y.shape[1] != self.n_outputs_:
            raise ValueError(f"{name}: y has {y.shape[1]} targets, but the model was fitted with {self.n_outputs_}")
        elif poisson != self._poisson:
            fitted = "poisson" if self._poisson else "squared_error"
            raise ValueError(
                f"{name}: loss={self.loss!r}, but the network was fitted with loss={fitted!r}; set it back, "
                "or fit a new network (warm_start=False)"
            )
        if poisson and y.size and y.min() < 0:
            raise ValueError(f"{name}: loss='poisson' needs y >= 0 (counts or rates), got min(y) = {y.min().item()}")
        return y

    def _predictions(self, out: NDArray[Any]) -> NDArray[Any]:
        """The network output -> predictions: exp(out) with the Poisson loss (its log link)."""
        if not self._poisson:
            return out
        with np.errstate(over="ignore"):  # a log-mean beyond the dtype's range predicts inf
            return np.exp(out)

    def _as_training_targets(self, targets: NDArray[Any]) -> NDArray[Any]:
        return self._in_network_dtype("y", targets)

    def _score_targets(self, X: NDArray[Any], targets: NDArray[Any], weights: NDArray[Any] | None = None) -> float:
        """Validation R^2 (weighted by ``weights``); NaN when the predictions are not finite."""
        out = self._predictions(self._forward(X))
        return r2_score(targets, out, sample_weight=weights) if np.isfinite(out).all() else np.nan

    @available_if(_BaseBNMLP._check_solver)
    def partial_fit(self, X: ArrayLike, y: ArrayLike, sample_weight: ArrayLike | float | None = None) -> Self:
        """One epoch over (X, y); the first call initialises the network. ``sample_weight``
        as in ``fit``."""
        return self._partial_fit(X, y, None, sample_weight)

    def predict(self, X: ArrayLike) -> NDArray[Any]:
        """Network output (eval mode; exp of it with ``loss="poisson"``): (n_samples,) for
        one target, else (n_samples, n_targets)."""
        check_is_fitted(self)
        out = self._forward(validate_data(self, X, reset=False, dtype=FLOAT_DTYPES, accept_sparse=False))
        out = self._predictions(out)
        return out.ravel() if self.n_outputs_ == 1 else out
