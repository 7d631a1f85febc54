"""Per-sample normalisations on the batch-norm kernels: LayerNorm (Ba, Kiros &
Hinton 2016, "Layer Normalization") and GroupNorm (Wu & He 2018, "Group
Normalization", ECCV).

Both normalise groups of values *within each sample*. Viewing the input as
(1, R, D) -- R groups (one "channel" each), D values per group -- turns that into
batch norm with R channels, so the batch-norm kernels compute the statistics and
the exact backward; only the per-feature affine is done here. The view is free for
C-contiguous input.

    xhat = (v - mean_group) / sqrt(var_group + eps)          (biased variance)
    y    = weight * xhat + bias                              (per feature)

As in ``torch.nn``, and without calling the kernels:

* a group of ONE value normalises to 0 (``x - mean = 0``), so the output is the
  bias (``LayerNorm(1)``, ``GroupNorm(C, C)`` on (N, C)) and the input gradient 0;
* an input without values (zero-size leading or spatial dimensions) gives an empty
  output, an empty input gradient and zero weight/bias gradients (PyTorch gives NaN
  for GroupNorm's weight gradient when the spatial size is 0; numbabn gives 0, the
  gradient of a sum over nothing).

Both take float16 input in a float32 layer (statistics and arithmetic in float32,
float16 output and input gradient), as PyTorch's CPU kernels do. Neither has
running statistics: train and eval mode compute the same thing.
"""

from collections.abc import Sequence
from math import prod
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from numbabn import _checks as V
from numbabn._typing import FloatArray
from numbabn.functional import batch_norm_backward, batch_norm_forward
from numbabn.layers import Layer
from numbabn.layers.base import check_layer_dtype, check_positive_int


class _PerSampleNorm(Layer):
    """Shared forward/backward; subclasses define the group view and affine layout:
    ``_groups(x) -> (R, D)``, ``_affine_shape(x)`` (weight broadcast shape) and
    ``_affine_axes(x)`` (axes the weight is constant along, summed for its grad)."""

    _accepts_float16 = True
    _transient = ("_cache",)

    def __init__(
        self, eps: float, affine: bool, affine_shape: tuple[int, ...], dtype: DTypeLike, bias: bool = True
    ) -> None:
        super().__init__()
        owner = type(self).__name__
        self.eps = V.check_eps(owner, eps)
        self.affine = V.check_bool(owner, "affine", affine)
        bias = V.check_bool(owner, "bias", bias)
        self.dtype = check_layer_dtype(owner, dtype)
        self.weight = self.add_parameter("weight", np.ones(affine_shape, self.dtype)) if affine else None
        self.bias = self.add_parameter("bias", np.zeros(affine_shape, self.dtype)) if affine and bias else None
        self._cache = None

    def _init_parameters(self) -> None:
        """weight = 1, bias = 0."""
        self.weight.value[...] = 1
        if self.bias is not None:
            self.bias.value[...] = 0

    def forward(self, x: FloatArray) -> FloatArray:
        """Normalised per (sample, group) in either mode (no running statistics)."""
        x = self._check_input(x)
        out_dtype = x.dtype
        x = x.astype(self.dtype, copy=False)  # float16 -> float32
        R, D = self._groups(x)
        if R == 0 or D <= 1:  # nothing to normalise: xhat = 0, no kernel
            ctx, xhat = None, np.zeros(x.shape, self.dtype)
        else:
            xhat, ctx = batch_norm_forward(x.reshape((1, R, D)), eps=self.eps, axis=1)
            xhat = xhat.reshape(x.shape)
        self._cache = (ctx, xhat, out_dtype)
        y = xhat
        if self.weight is not None:
            y = xhat * self.weight.value.reshape(self._affine_shape(x))
        if self.bias is not None:
            y = y + self.bias.value.reshape(self._affine_shape(x))
        return y.astype(out_dtype, copy=False)

    def backward(self, dy: FloatArray) -> FloatArray:
        """dxhat = dy*weight; dweight = sum dy*xhat, dbias = sum dy over the other axes."""
        ctx, xhat, out_dtype = self._cached("_cache")
        dy = self._check_dy(dy, xhat.shape, out_dtype).astype(self.dtype, copy=False)
        axes = self._affine_axes(xhat)
        if self.bias is not None:
            self.bias.grad = dy.sum(axis=axes).reshape(self.bias.value.shape)
        if self.weight is not None:
            self.weight.grad = (dy * xhat).sum(axis=axes).reshape(self.weight.value.shape)
            dy = dy * self.weight.value.reshape(self._affine_shape(xhat))
        if ctx is None:
            dx = np.zeros(xhat.shape, self.dtype)
        else:
            dx = batch_norm_backward(dy.reshape(ctx.shape), ctx)[0].reshape(xhat.shape)
        return dx.astype(out_dtype, copy=False)


class LayerNorm(_PerSampleNorm):
    """Layer norm over the trailing ``normalized_shape`` dimensions of ``(*, *normalized_shape)``
    input, like ``torch.nn.LayerNorm``: one group per leading index (none at all is
    one group; zero-size leading dimensions give an empty output), D =
    prod(normalized_shape) values; weight and bias have shape ``normalized_shape``.
    ``elementwise_affine=False`` drops both, ``bias=False`` only the bias (PyTorch's
    arguments). ``LayerNorm(1)`` normalises single values: its output is the bias.
    """

    def __init__(
        self,
        normalized_shape: int | Sequence[int],
        eps: float = 1e-5,
        elementwise_affine: bool = True,
        dtype: DTypeLike = np.float32,
        *,
        bias: bool = True,
    ) -> None:
        owner = type(self).__name__
        # An int, or a sequence of them (a tuple, list, torch.Size or NumPy array), as torch.nn takes.
        if V.is_int(normalized_shape):
            shape: tuple[Any, ...] = (normalized_shape,)
        elif (isinstance(normalized_shape, Sequence) and not isinstance(normalized_shape, str)) or (
            isinstance(normalized_shape, np.ndarray) and normalized_shape.ndim == 1
        ):
            shape = tuple(normalized_shape)
        else:
            shape = ("not an int",)
        expected = "an int >= 1 or a non-empty sequence of them"
        if not all(V.is_int(d) for d in shape):
            raise TypeError(f"{owner}: normalized_shape must be {expected}, got {V.describe(normalized_shape)}")
        if not shape or min(shape) < 1:
            raise ValueError(f"{owner}: normalized_shape must be {expected}, got {normalized_shape!r}")
        self.normalized_shape = tuple(int(d) for d in shape)
        V.check_bool(owner, "elementwise_affine", elementwise_affine)
        super().__init__(eps, elementwise_affine, self.normalized_shape, dtype, bias)

    def _check_input(self, x: FloatArray) -> FloatArray:
        x = self._input(x)
        k = len(self.normalized_shape)
        if x.ndim < k or x.shape[x.ndim - k :] != self.normalized_shape:
            raise self._shape_error(f"(..., {', '.join(map(str, self.normalized_shape))})", x)
        return x

    def _groups(self, x: FloatArray) -> tuple[int, int]:
        D = prod(self.normalized_shape)
        return x.size // D, D

    def _affine_shape(self, x: FloatArray) -> tuple[int, ...]:
        return self.normalized_shape

    def _affine_axes(self, x: FloatArray) -> tuple[int, ...]:
        return tuple(range(x.ndim - len(self.normalized_shape)))

    def extra_repr(self) -> str:
        text = f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.affine}"
        return text + (", bias=False" if self.affine and self.bias is None else "")

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["LayerNorm", FloatArray]:
        layer = cls((2, 3), dtype=dtype)
        layer.weight.value[...] = rng.uniform(0.5, 1.5, (2, 3))
        layer.bias.value[...] = rng.standard_normal((2, 3))
        return layer, rng.standard_normal((4, 2, 3)).astype(dtype)


class GroupNorm(_PerSampleNorm):
    """Group norm of (N, C, ...) input, like ``torch.nn.GroupNorm``: the C channels
    of each sample split into ``num_groups`` groups of C/G consecutive channels, each
    normalised over its channels and spatial positions; per-channel weight and bias
    (none with ``affine=False``). A group of one value normalises to 0.
    """

    def __init__(
        self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True, dtype: DTypeLike = np.float32
    ) -> None:
        owner = type(self).__name__
        self.num_groups = check_positive_int(owner, "num_groups", num_groups)
        self.num_channels = check_positive_int(owner, "num_channels", num_channels)
        if num_channels % num_groups:
            raise ValueError(f"{owner}: num_channels ({num_channels}) must be divisible by num_groups ({num_groups})")
        super().__init__(eps, affine, (self.num_channels,), dtype)

    def _check_input(self, x: FloatArray) -> FloatArray:
        x = self._input(x)
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise self._shape_error(f"(N, {self.num_channels}, ...)", x)
        return x

    def _groups(self, x: FloatArray) -> tuple[int, int]:
        return x.shape[0] * self.num_groups, prod(x.shape[1:]) // self.num_groups

    def _affine_shape(self, x: FloatArray) -> tuple[int, ...]:
        return (self.num_channels,) + (1,) * (x.ndim - 2)

    def _affine_axes(self, x: FloatArray) -> tuple[int, ...]:
        return (0,) + tuple(range(2, x.ndim))

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["GroupNorm", FloatArray]:
        layer = cls(2, 4, dtype=dtype)
        layer.weight.value[...] = rng.uniform(0.5, 1.5, 4)
        layer.bias.value[...] = rng.standard_normal(4)
        return layer, rng.standard_normal((3, 4, 3)).astype(dtype)
