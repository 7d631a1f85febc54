"""Noisy batch norm (Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch
Normalization Help Optimization?", NeurIPS, Section 2.1 and Appendix A.2.1)."""

from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from numbabn._typing import FloatArray
from numbabn.layers import BatchNormBase
from numbabn.layers.base import check_rng


class NoisyBatchNorm(BatchNormBase):
    """Batch norm followed by time-varying, non-zero-mean, non-unit-variance noise,
    the paper's test of whether BN works by controlling activation distributions.

    Training step t, per unit (channel) c, then per element i of that channel::

        a_i   = BN(x)_i                                  (batch norm with gamma, beta)
        mu_t  ~ U(-0.5, 0.5)       sigma_t ~ U(1, 1.25)   (drawn once per unit per step)
        m_i   ~ U(mu_t - 0.1, mu_t + 0.1)                 (per element)
        s_i   ~ N(sigma_t, 0.1)                           (per element, std 0.1)
        y_i   = s_i * a_i + m_i

    Backward passes through the multiplicative noise (the noise is a constant of
    the step): dBN = dy * s, then the batch-norm backward. Eval mode is plain batch
    norm: the noise perturbs training only.

    Draws come from ``rng`` (a numpy Generator, an int seed, or None for fresh entropy), in the
    layer's dtype. Input (N, C, ...), channels on axis 1 (float16 input of a float32
    layer: batch norm and noise in float32, float16 output).
    """

    _transient = ("_scale", "_out_dtype")

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: DTypeLike = np.float32,
        rng: np.random.Generator | int | None = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, None, dtype)
        self.rng = check_rng(type(self).__name__, rng)
        self._scale = self._out_dtype = None

    def forward(self, x: FloatArray) -> FloatArray:
        x = self._check_input(x)
        out_dtype = x.dtype
        y = super().forward(x.astype(self.dtype, copy=False))  # float16: noise in float32 too
        self._out_dtype = out_dtype
        if not self.training:
            self._scale = None
            return y.astype(out_dtype, copy=False)
        rng, dt = self.rng, self.dtype
        unit = (1, self.num_features) + (1,) * (y.ndim - 2)  # broadcast over all but channels
        mu_t = rng.random(unit, dtype=dt) - 0.5
        sigma_t = 1 + 0.25 * rng.random(unit, dtype=dt)
        m = mu_t + 0.2 * rng.random(y.shape, dtype=dt) - 0.1
        s = sigma_t + 0.1 * rng.standard_normal(y.shape, dtype=dt)
        y *= s
        y += m
        self._scale = s
        return y.astype(out_dtype, copy=False)

    def backward(self, dy: FloatArray) -> FloatArray:
        ctx = self._cached("_ctx")
        dy = self._check_dy(dy, ctx.shape, self._out_dtype).astype(ctx.dtype, copy=False)
        if self._scale is not None:
            dy = dy * self._scale
        return super().backward(dy).astype(self._out_dtype, copy=False)

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["NoisyBatchNorm", FloatArray]:
        layer = cls(3, dtype=dtype, rng=np.random.default_rng(rng.integers(2**32)))._randomize_state(rng)
        return layer, rng.standard_normal((5, 3, 2)).astype(dtype)
