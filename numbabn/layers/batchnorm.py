"""Batch-norm layers: thin stateful wrappers around :mod:`numbabn.functional`.

The layers hold the state (gamma, beta, running statistics, the batch counter) and
call :func:`~numbabn.functional.batch_norm_forward` /
:func:`~numbabn.functional.batch_norm_backward`; all the math lives there. Per
channel c over its m values (Ioffe & Szegedy 2015, Alg. 1)::

    mean = (1/m) sum x_i ;  var = (1/m) sum (x_i - mean)^2     (biased, normalises)
    y_i  = gamma * (x_i - mean) / sqrt(var + eps) + beta       (then ReLU if fused)

    running_mean <- (1 - momentum)*running_mean + momentum*mean
    running_var  <- (1 - momentum)*running_var  + momentum*var*m/(m - 1)
    momentum=None: cumulative average, momentum_t = 1/num_batches_tracked

Which statistics normalise, as in PyTorch. The buffers exist when the layer was
built with ``track_running_stats=True``; the flag may be switched afterwards, and
then, as in ``torch.nn``, the *flag* decides whether training updates the buffers
and the *buffers* decide what eval mode uses:

============  ===================================  ==============================
mode          buffers exist                        no buffers
============  ===================================  ==============================
train()       batch stats; buffers updated only    batch stats
              while ``track_running_stats`` is on
eval()        running stats (never updated)        batch stats
============  ===================================  ==============================

So ``bn.track_running_stats = False`` freezes the running statistics (training
uses batch statistics, eval still normalises with the frozen ones), and eval mode
never changes any state.

Empty batches (N = 0, or a zero-length spatial axis) give an empty output; the
backward gives an empty input gradient and zero weight/bias gradients. The
running statistics keep their values and ``num_batches_tracked`` counts the call,
as in ``torch.nn``. One value per channel in training raises, as in PyTorch.

Mixed precision: a float32 layer takes float16 input (statistics and arithmetic
in float32, float16 output and input gradient, float32 parameter gradients), as
PyTorch's CPU batch norm does.

Layers: :class:`BatchNorm1d` ((N, C) or (N, C, L)), :class:`BatchNorm2d` (NCHW or
NHWC) and :class:`BatchNorm3d` (NCDHW or NDHWC).
"""

import inspect
from typing import Any, Self

import numpy as np
from numpy.typing import DTypeLike, NDArray

from .. import _checks as V
from .._context import BatchNormContext
from .._typing import AnyArray, FloatArray
from ..functional import batch_norm_backward, batch_norm_forward
from ..stats import Moments
from .base import Layer, Parameter, check_layer_dtype, check_positive_int


class BatchNormBase(Layer):
    """Shared state and functional calls of the batch-norm layers; plugins that vary
    batch norm (``numbabn_plugins``) subclass it too.

    Parameters ``weight`` (gamma, ones) and ``bias`` (beta, zeros) of shape (C,) when
    ``affine``; buffers ``running_mean`` (zeros), ``running_var`` (ones) and
    ``num_batches_tracked`` (int64 scalar, >= 0) when ``track_running_stats``.
    ``activation="relu"`` fuses a ReLU into the same pass. This base accepts any
    (N, C, ...) input with channels on axis 1.

    Subclasses that compute outside ``batch_norm_forward`` follow the module
    docstring's table through :attr:`uses_batch_stats` and
    :attr:`updates_running_stats`.

    Parameters
    ----------
    num_features : int >= 1
        C, the number of channels.
    eps : float > 0
        Added to the variance (``torch.nn``'s default).
    momentum : float in [0, 1] or None
        Weight of the batch in the running statistics; None: the cumulative
        average over ``num_batches_tracked`` batches.
    affine : bool
        Learn ``weight`` and ``bias``.
    track_running_stats : bool
        Keep running statistics and use them in eval mode (without them, eval
        normalises with the batch's own statistics, as ``torch.nn`` does).
    activation : None or "relu"
        A ReLU fused into the same pass.
    dtype : float32 or float64
        Of the parameters and buffers, and of the inputs the layer takes (a float32
        layer also takes float16 input: see the module docstring).
    """

    axis = 1
    _accepts_float16 = True
    _transient: tuple[str, ...] = ("_ctx",)
    dtype: np.dtype[Any]  # always set (the Layer default None means "follows its input")
    weight: Parameter | None  # None unless affine
    bias: Parameter | None
    # (C,) arrays (a 0-d int64 counter) when track_running_stats, else None; the
    # layer's code reads them under that condition, which the types cannot express.
    running_mean: Any
    running_var: Any
    num_batches_tracked: Any
    _ctx: BatchNormContext | None

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str | None = None,
        dtype: DTypeLike = np.float32,
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.num_features = C = check_positive_int(owner, "num_features", num_features)
        self.eps = V.check_eps(owner, eps)
        self.momentum = V.check_momentum(owner, momentum)
        # Stored as the plain string: an np.str_ would show in the repr as np.str_('relu').
        self.activation = "relu" if V.check_activation(owner, activation) else None
        self.affine = V.check_bool(owner, "affine", affine)
        self.track_running_stats = V.check_bool(owner, "track_running_stats", track_running_stats)
        self.dtype = check_layer_dtype(owner, dtype)
        self.weight = self.add_parameter("weight", np.ones(C, self.dtype)) if affine else None
        self.bias = self.add_parameter("bias", np.zeros(C, self.dtype)) if affine else None
        self.running_mean = self.running_var = self.num_batches_tracked = None
        if track_running_stats:
            self._add_running_stats(C)
        self._ctx = None

    def _add_running_stats(self, C: int) -> None:
        """Buffers of the running statistics; variants tracking other ones override it."""
        self.running_mean = self.add_buffer("running_mean", np.zeros(C, self.dtype))
        self.running_var = self.add_buffer("running_var", np.ones(C, self.dtype))
        self._add_counter()

    def _add_counter(self) -> None:
        self.num_batches_tracked = self.add_buffer(
            "num_batches_tracked", np.zeros((), np.int64), check=_check_loaded_counter
        )

    def _init_parameters(self) -> None:
        """gamma = 1, beta = 0 (``reset_parameters`` also resets the running statistics)."""
        if self.weight is not None and self.bias is not None:  # affine
            self.weight.value[...] = 1
            self.bias.value[...] = 0

    # ------------------------------------------------------------ input
    def _expected_shape(self) -> str:
        return f"(N, {self.num_features}, ...)"

    def _check_input(self, x: Any) -> FloatArray:
        x = self._input(x)
        if x.ndim < 2 or x.shape[self.axis] != self.num_features:
            raise self._shape_error(self._expected_shape(), x)
        return x

    # ------------------------------------------------------------ functional calls
    @property
    def uses_batch_stats(self) -> bool:
        """True when the forward normalises with the batch's statistics: in training,
        and in eval mode when the layer has no running statistics (see the module
        docstring's table)."""
        return self.training or self.running_mean is None

    @property
    def updates_running_stats(self) -> bool:
        """True when the forward moves the running statistics: training mode, the
        buffers exist and ``track_running_stats`` is (still) on."""
        return self.training and bool(self.track_running_stats) and self.running_mean is not None

    def _running_args(self) -> dict[str, Any]:
        """The running statistics to hand to ``batch_norm_forward`` (read in eval mode,
        updated in training), as ``torch.nn`` passes them: none in training while
        ``track_running_stats`` is off."""
        if self.training and not self.updates_running_stats:
            return dict(running_mean=None, running_var=None, num_batches_tracked=None)
        return dict(
            running_mean=self.running_mean, running_var=self.running_var, num_batches_tracked=self.num_batches_tracked
        )

    def _affine_values(self) -> tuple[FloatArray | None, FloatArray | None]:
        if self.weight is not None and self.bias is not None:  # affine
            return self.weight.value, self.bias.value
        return None, None

    def _bn_forward(
        self,
        x: AnyArray,
        gamma: AnyArray | None,
        beta: AnyArray | None,
        out: AnyArray | None = None,
        moments: Moments | None = None,
    ) -> tuple[AnyArray, BatchNormContext]:
        """batch_norm_forward with this layer's state and settings -> (y, ctx);
        ``moments``: statistics to normalise with instead of the batch's (SyncBN)."""
        return batch_norm_forward(
            x,
            gamma,
            beta,
            **self._running_args(),
            training=self.uses_batch_stats,
            momentum=self.momentum,
            eps=self.eps,
            axis=self.axis,
            activation=self.activation,
            out=out,
            moments=moments,
        )

    def forward(self, x: FloatArray) -> FloatArray:
        """y = BN(x) (see the module docstring); same shape and dtype as x."""
        x = self._check_input(x)
        y, self._ctx = self._bn_forward(x, *self._affine_values())
        return y

    def backward(self, dy: FloatArray) -> FloatArray:
        """dx; sets weight.grad = sum g*xhat and bias.grad = sum g (per channel),
        NumPy arrays also for GPU input (the parameters live on the host)."""
        dx, dgamma, dbeta = self._bn_backward(dy)
        if self.weight is not None and self.bias is not None:  # affine
            self.weight.grad = _on_host(dgamma)
            self.bias.grad = _on_host(dbeta)
        return dx

    def _bn_backward(self, dy: AnyArray) -> tuple[AnyArray, ...]:
        """The one backward hook -> (dx, dgamma, dbeta) of the cached forward: variants
        change how the gradient sums are combined (SyncBN: over ranks) or how the
        parameter gradients map back (BatchRenorm: through r and d)."""
        ctx = self._cached("_ctx")
        return batch_norm_backward(self._check_dy(dy, ctx.shape, ctx.dtype), ctx)

    # ------------------------------------------------------------ repr / examples
    def extra_repr(self) -> str:
        text = f"{self.num_features}, eps={self.eps}, momentum={self.momentum}, affine={self.affine}"
        # the constructor's arguments only: a subclass that always tracks (BatchRenorm)
        # takes no track_running_stats, and its repr must not offer one
        if "track_running_stats" in inspect.signature(type(self)).parameters:
            text += f", track_running_stats={self.track_running_stats}"
        if self.activation is not None:
            text += f", activation={self.activation!r}"
        return text

    def _randomize_state(self, rng: np.random.Generator) -> Self:
        """Non-trivial gamma, beta and running statistics (for tests and examples)."""
        C = self.num_features
        if self.weight is not None and self.bias is not None:  # affine
            self.weight.value[...] = rng.uniform(0.5, 1.5, C)
            self.bias.value[...] = rng.standard_normal(C)
        for name, buf in self._buffers.items():
            if name == "running_mean":
                buf[...] = rng.standard_normal(C) * 0.3
            elif buf.dtype.kind == "f":  # scales: running_var and the like
                buf[...] = rng.uniform(0.5, 2.0, C)
        return self


def _on_host(a: AnyArray | None) -> NDArray[Any] | None:
    """A gradient as a NumPy array (device arrays, from GPU input, are copied back)."""
    return a if a is None or isinstance(a, np.ndarray) else a.copy_to_host()


def _check_loaded_counter(fn: str, key: str, value: Any) -> None:
    """``num_batches_tracked`` from a state dict: a count, >= 0."""
    if value.item() < 0:
        raise ValueError(f"{fn}: {key!r} counts batches and must be >= 0, got {value.item()}")


class BatchNorm1d(BatchNormBase):
    """Batch norm over (N, C) or (N, C, L) input (statistics over N, or N and L).

    See :class:`BatchNormBase` for the arguments and the module docstring for the
    formulas; ``torch.nn.BatchNorm1d`` has the same semantics.
    """

    _accepts_device = True

    def _expected_shape(self) -> str:
        return f"(N, {self.num_features}) or (N, {self.num_features}, L)"

    def _check_input(self, x: Any) -> FloatArray:
        x = super()._check_input(x)
        if x.ndim > 3:
            raise self._shape_error(self._expected_shape(), x)
        return x

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["BatchNorm1d", FloatArray]:
        layer = cls(3, activation="relu", dtype=dtype)._randomize_state(rng)
        return layer, (rng.standard_normal((5, 3, 2)) + 0.5).astype(dtype)


class _SpatialBatchNorm(BatchNormBase):
    """Batch norm over inputs with ``_spatial`` spatial axes: channels on axis 1, or
    last with ``channels_last=True`` (statistics over N and the spatial axes)."""

    _accepts_device = True

    _spatial = 2
    _dims = "H, W"

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str | None = None,
        dtype: DTypeLike = np.float32,
        channels_last: bool = False,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation, dtype)
        self.channels_last = V.check_bool(type(self).__name__, "channels_last", channels_last)
        self.axis = -1 if self.channels_last else 1

    def _expected_shape(self) -> str:
        C = self.num_features
        return f"(N, {self._dims}, {C}) (channels_last)" if self.channels_last else f"(N, {C}, {self._dims})"

    def _check_input(self, x: Any) -> FloatArray:
        x = self._input(x)
        if x.ndim != self._spatial + 2 or tuple(x.shape)[self.axis] != self.num_features:
            raise self._shape_error(self._expected_shape(), x)
        return x

    def extra_repr(self) -> str:
        return super().extra_repr() + (", channels_last=True" if self.channels_last else "")


class BatchNorm2d(_SpatialBatchNorm):
    """Batch norm over images: NCHW, or NHWC with ``channels_last=True`` (statistics
    over N, H and W per channel). Same semantics as ``torch.nn.BatchNorm2d``."""

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["BatchNorm2d", FloatArray]:
        layer = cls(2, channels_last=True, dtype=dtype)._randomize_state(rng)
        return layer, rng.standard_normal((2, 3, 2, 2)).astype(dtype)


class BatchNorm3d(_SpatialBatchNorm):
    """Batch norm over volumes: NCDHW, or NDHWC with ``channels_last=True``
    (statistics over N, D, H and W per channel). Same semantics as
    ``torch.nn.BatchNorm3d`` (whose channels-last 3-D memory format is NDHWC)."""

    _spatial = 3
    _dims = "D, H, W"

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["BatchNorm3d", FloatArray]:
        layer = cls(2, dtype=dtype)._randomize_state(rng)
        return layer, (rng.standard_normal((3, 2, 2, 1, 2)) - 0.3).astype(dtype)
