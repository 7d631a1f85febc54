"""Instance normalization (Ulyanov, Vedaldi & Lempitsky 2016, "Instance
Normalization: The Missing Ingredient for Fast Stylization") on the batch-norm
kernels: ``InstanceNorm1d`` and ``InstanceNorm2d``, like ``torch.nn``'s."""

from math import prod
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from numbabn import _bn_checks as V
from numbabn._typing import FloatArray
from numbabn.functional import batch_norm_backward, batch_norm_forward
from numbabn.layers import BatchNormBase


class _InstanceNorm(BatchNormBase):
    """Each (sample, channel) pair normalised over its ``L`` spatial values::

        xhat[n, c, :] = (x[n, c, :] - mean_nc) / sqrt(var_nc + eps)      (biased variance)
        y[n, c, :]    = weight[c] * xhat[n, c, :] + bias[c]              (when affine)

    Implementation: the input viewed as (1, N*C, L) is batch norm with N*C channels,
    so the batch-norm kernels compute the statistics and the exact backward (weight
    and bias tiled N times; their gradients summed over the samples).

    Defaults as in ``torch.nn``: ``affine=False``, ``track_running_stats=False``.
    With running statistics (PyTorch's rule): in training each instance's copy of
    them moves with its own mean and unbiased variance and the buffers become the
    average over the samples::

        running_mean <- (1 - momentum)*running_mean + momentum * mean_n(mean_nc)
        running_var  <- (1 - momentum)*running_var  + momentum * mean_n(var_nc * L/(L - 1))

    and eval mode normalises every instance with them (batch norm's eval pass). Which
    statistics normalise follows ``torch.nn.InstanceNorm``: the instance's own in
    training and whenever ``track_running_stats`` is off (also when switched off
    after construction), the running ones in eval mode otherwise. Unlike PyTorch,
    eval mode never changes the buffers (PyTorch updates them when the flag is
    switched off after construction), ``num_batches_tracked`` counts the training
    steps that update them (PyTorch's stays 0) and ``momentum=None`` is the
    cumulative average over those steps (PyTorch then never moves the buffers).

    Training needs more than one spatial value per instance (PyTorch's rule). An
    empty batch gives an empty output, zero weight/bias gradients, and keeps the
    running statistics (the counter counts the call). A float32 layer takes float16
    input (float32 statistics, float16 output). Unbatched input (C, *spatial) is
    taken as one sample, as PyTorch does.
    """

    _spatial = 1
    _dims = "L"
    _transient = ("_cache",)

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = False,
        track_running_stats: bool = False,
        dtype: DTypeLike = np.float32,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, None, dtype)
        self._cache = None

    @property
    def uses_batch_stats(self) -> bool:
        """Instance statistics: in training, and whenever ``track_running_stats`` is off."""
        return self.training or not self.track_running_stats or self.running_mean is None

    def _expected_shape(self) -> str:
        C = self.num_features
        return f"(N, {C}, {self._dims}) or ({C}, {self._dims})"

    def _check_input(self, x: FloatArray) -> FloatArray:
        x = self._input(x)
        k = self._spatial
        if x.ndim not in (k + 1, k + 2) or x.shape[x.ndim - k - 1] != self.num_features:
            raise self._shape_error(self._expected_shape(), x)
        return x

    def forward(self, x: FloatArray) -> FloatArray:
        x = self._check_input(x)
        xb = x if x.ndim == self._spatial + 2 else x[None]
        N, C, L = xb.shape[0], self.num_features, prod(xb.shape[2:])
        gamma, beta = self._affine_values()
        if not self.uses_batch_stats:  # eval with running statistics: batch norm's eval pass
            y, ctx = batch_norm_forward(
                xb.reshape(N, C, L),
                gamma,
                beta,
                running_mean=self.running_mean,
                running_var=self.running_var,
                training=False,
                eps=self.eps,
                axis=1,
            )
            self._cache = (x.shape, x.dtype, ctx, None)
            return y.reshape(x.shape)
        if L == 1 and N > 0:
            raise ValueError(
                f"{self._short()}: Expected more than 1 spatial element when training, got input of shape {x.shape}"
            )
        update = self.updates_running_stats
        nbt = V.check_counter(self._short(), self.num_batches_tracked) if update else None
        if xb.size == 0:
            y, ctx = np.empty(x.shape, x.dtype), None
        else:
            rm = rv = None
            factor = 0.0
            if update:
                factor = V.resolve_momentum(True, self.momentum, nbt)
                rm, rv = np.tile(self.running_mean, N), np.tile(self.running_var, N)

            def tile(v: FloatArray | None) -> FloatArray | None:
                return None if v is None else np.tile(v, N)

            y, ctx = batch_norm_forward(
                xb.reshape(1, N * C, L),
                tile(gamma),
                tile(beta),
                running_mean=rm,
                running_var=rv,
                training=True,
                momentum=factor,
                eps=self.eps,
                axis=1,
            )
            y = y.reshape(x.shape)
            if update:
                self.running_mean[...] = rm.reshape(N, C).mean(axis=0, dtype=np.float64)
                self.running_var[...] = rv.reshape(N, C).mean(axis=0, dtype=np.float64)
        if update:
            nbt += 1
        self._cache = (x.shape, x.dtype, ctx, N)
        return y

    def backward(self, dy: FloatArray) -> FloatArray:
        """dx; weight.grad = sum over samples and positions of dy*xhat, bias.grad = sum of dy."""
        shape, dtype, ctx, N = self._cached("_cache")
        dy = self._check_dy(dy, shape, dtype)
        C = self.num_features
        if ctx is None:  # empty batch
            dx, dgamma, dbeta = np.empty(shape, dtype), np.zeros(C, self.dtype), np.zeros(C, self.dtype)
        else:
            dx, dgamma, dbeta = batch_norm_backward(dy.reshape(ctx.shape), ctx)
            dx = dx.reshape(shape)
            if N is not None and self.affine:  # per-instance channels: sum the samples
                dgamma = dgamma.reshape(N, C).sum(axis=0, dtype=np.float64).astype(self.dtype)
                dbeta = dbeta.reshape(N, C).sum(axis=0, dtype=np.float64).astype(self.dtype)
        if self.affine:
            self.weight.grad = dgamma
            self.bias.grad = dbeta
        return dx


class InstanceNorm1d(_InstanceNorm):
    """Instance norm of (N, C, L) input (or unbatched (C, L)), like
    ``torch.nn.InstanceNorm1d``; see :class:`_InstanceNorm` for the formulas and
    the running statistics."""

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["_InstanceNorm", FloatArray]:
        layer = cls(3, affine=True, track_running_stats=True, dtype=dtype)._randomize_state(rng)
        return layer, (rng.standard_normal((4, 3, 5)) + 0.5).astype(dtype)


class InstanceNorm2d(_InstanceNorm):
    """Instance norm of (N, C, H, W) input (or unbatched (C, H, W)), like
    ``torch.nn.InstanceNorm2d``; see :class:`_InstanceNorm`."""

    _spatial = 2
    _dims = "H, W"

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["_InstanceNorm", FloatArray]:
        layer = cls(2, affine=True, dtype=dtype)._randomize_state(rng)
        return layer, rng.standard_normal((3, 2, 2, 3)).astype(dtype)
