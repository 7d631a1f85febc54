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
"""
from math import prod

import numpy as np

from numbabn.functional import batch_norm_backward, batch_norm_forward
from numbabn.layers import Layer
from numbabn.layers.base import check_layer_dtype, check_positive_int
from numbabn import _validation as V


class _PerSampleNorm(Layer):
    """Shared forward/backward; subclasses define the group view and affine layout:
    ``_groups(x) -> (R, D)``, ``_affine_shape(x)`` (weight broadcast shape) and
    ``_affine_axes(x)`` (axes the weight is constant along, summed for its grad)."""

    def __init__(self, eps, affine, affine_shape, dtype):
        super().__init__()
        owner = type(self).__name__
        self.eps = V.check_eps(owner, eps)
        self.affine = V.check_bool(owner, "affine", affine)
        self.dtype = check_layer_dtype(owner, dtype)
        self.weight = self.add_parameter("weight", np.ones(affine_shape, self.dtype)) if affine else None
        self.bias = self.add_parameter("bias", np.zeros(affine_shape, self.dtype)) if affine else None
        self._cache = None

    def forward(self, x):
        """Normalised per (sample, group) in either mode (no running statistics)."""
        x = self._check_input(x)
        xhat, ctx = batch_norm_forward(x.reshape((1,) + self._groups(x)), eps=self.eps, axis=1)
        xhat = xhat.reshape(x.shape)
        self._cache = (ctx, xhat)
        if not self.affine:
            return xhat
        shape = self._affine_shape(x)
        return xhat * self.weight.value.reshape(shape) + self.bias.value.reshape(shape)

    def backward(self, dy):
        """dxhat = dy*weight; dweight = sum dy*xhat, dbias = sum dy over the other axes."""
        ctx, xhat = self._cached("_cache")
        dy = self._check_dy(dy, xhat.shape, self.dtype)
        if self.affine:
            axes = self._affine_axes(xhat)
            self.weight.grad = (dy * xhat).sum(axis=axes).reshape(self.weight.value.shape)
            self.bias.grad = dy.sum(axis=axes).reshape(self.bias.value.shape)
            dy = dy * self.weight.value.reshape(self._affine_shape(xhat))
        dx, _, _ = batch_norm_backward(dy.reshape(ctx.shape), ctx)
        return dx.reshape(xhat.shape)


class LayerNorm(_PerSampleNorm):
    """Layer norm over the trailing ``normalized_shape`` dimensions of (*, *normalized_shape)
    input, like ``torch.nn.LayerNorm``: one group per leading index, D = prod(normalized_shape)
    values; weight and bias have shape ``normalized_shape``.
    """

    def __init__(self, normalized_shape, eps=1e-5, elementwise_affine=True, dtype=np.float32):
        owner = type(self).__name__
        shape = (normalized_shape,) if isinstance(normalized_shape, (int, np.integer)) else tuple(normalized_shape)
        self.normalized_shape = tuple(check_positive_int(owner, "normalized_shape", d) for d in shape)
        if not self.normalized_shape or prod(self.normalized_shape) < 2:
            raise ValueError(f"{owner}: normalized_shape must hold at least 2 values to normalise, "
                             f"got {normalized_shape!r}")
        super().__init__(eps, elementwise_affine, self.normalized_shape, dtype)

    def _check_input(self, x):
        x = self._input(x)
        k = len(self.normalized_shape)
        if x.ndim <= k or x.shape[-k:] != self.normalized_shape:
            raise self._shape_error(f"(N, ..., {', '.join(map(str, self.normalized_shape))})", x)
        return x

    def _groups(self, x):
        D = prod(self.normalized_shape)
        return x.size // D, D

    def _affine_shape(self, x):
        return self.normalized_shape

    def _affine_axes(self, x):
        return tuple(range(x.ndim - len(self.normalized_shape)))

    def extra_repr(self):
        return f"{self.normalized_shape}, eps={self.eps}, elementwise_affine={self.affine}"

    @classmethod
    def _contract_example(cls, rng, dtype):
        layer = cls((2, 3), dtype=dtype)
        layer.weight.value[...] = rng.uniform(0.5, 1.5, (2, 3))
        layer.bias.value[...] = rng.standard_normal((2, 3))
        return layer, rng.standard_normal((4, 2, 3)).astype(dtype)


class GroupNorm(_PerSampleNorm):
    """Group norm of (N, C, ...) input, like ``torch.nn.GroupNorm``: the C channels
    of each sample split into ``num_groups`` groups of C/G consecutive channels, each
    normalised over its channels and spatial positions; per-channel weight and bias.
    """

    def __init__(self, num_groups, num_channels, eps=1e-5, affine=True, dtype=np.float32):
        owner = type(self).__name__
        self.num_groups = check_positive_int(owner, "num_groups", num_groups)
        self.num_channels = check_positive_int(owner, "num_channels", num_channels)
        if num_channels % num_groups:
            raise ValueError(f"{owner}: num_channels ({num_channels}) must be divisible by num_groups "
                             f"({num_groups})")
        super().__init__(eps, affine, (self.num_channels,), dtype)

    def _check_input(self, x):
        x = self._input(x)
        if x.ndim < 2 or x.shape[1] != self.num_channels:
            raise self._shape_error(f"(N, {self.num_channels}, ...)", x)
        if x.size // x.shape[0] // self.num_groups < 2:
            raise ValueError(f"{self._short()}: each group needs at least 2 values, got input of shape {x.shape}")
        return x

    def _groups(self, x):
        R = x.shape[0] * self.num_groups
        return R, x.size // R

    def _affine_shape(self, x):
        return (self.num_channels,) + (1,) * (x.ndim - 2)

    def _affine_axes(self, x):
        return (0,) + tuple(range(2, x.ndim))

    def extra_repr(self):
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}"

    @classmethod
    def _contract_example(cls, rng, dtype):
        layer = cls(2, 4, dtype=dtype)
        layer.weight.value[...] = rng.uniform(0.5, 1.5, 4)
        layer.bias.value[...] = rng.standard_normal(4)
        return layer, rng.standard_normal((3, 4, 3)).astype(dtype)
