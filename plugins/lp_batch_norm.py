"""lp batch norm (Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch
Normalization Help Optimization?", NeurIPS, Section 3.3 and Appendix A)."""

from typing import Any

import numpy as np
from numpy.typing import ArrayLike, DTypeLike, NDArray

from numbabn import _bn_checks as V
from numbabn._typing import FloatArray
from numbabn.layers import BatchNormBase

P_VALUES = (1, 2, np.inf)


class LpBatchNorm(BatchNormBase):
    """Batch norm that divides by the mean lp norm of the centred values instead of
    the standard deviation, p in {1, 2, inf}: the paper's evidence that BN's benefit
    does not hinge on Gaussian-like (mean 0, variance 1) activations.

    Per channel c over its m values (axes: all but 1)::

        u_i = x_i - mean(x)
        s   = ((1/m) sum |u_i|^p)^(1/p)     p = 1, 2;   s = max_i |u_i|   p = inf
        y_i = gamma * u_i / (s + eps) + beta

    (p = 2 is the standard deviation; eps is added to s, not to s^2.) No scaling
    constant, as in Santurkar et al.: on Gaussian input the output's standard
    deviation is then about sqrt(pi/2) = 1.25 for p = 1 and about 1/sqrt(2 ln m) for
    p = inf. Hoffer et al. 2018 ("Norm matters") scale their L1 and L-inf batch
    norms by such constants to mimic standard BN; here gamma can learn them.

    Exact backward, with h = dy * gamma, D = s + eps::

        du_j = h_j / D - (sum_i h_i u_i) / D^2 * ds/du_j
            ds/du_j = sign(u_j)/m                   p = 1
                    = u_j / (m s)                   p = 2
                    = sign(u_j) [|u_j| = s] / k     p = inf (k = number of maxima)
        dx_j = du_j - (1/m) sum_i du_i             (through the mean)

    Running statistics (when tracked) are ``running_mean`` and ``running_norm``
    (of s), updated like batch norm's: r <- (1 - momentum) r + momentum * batch
    (cumulative average for momentum=None). Eval mode with them:
    y = gamma * (x - running_mean) / (running_norm + eps) + beta (backward:
    dx = dy * gamma / (running_norm + eps)).

    Input (N, C, ...), channels on axis 1. Computed in NumPy in the layer's dtype,
    reductions in float64 (float16 input of a float32 layer is computed in float32
    and returned as float16). Running statistics follow batch norm's rules for
    ``track_running_stats`` switched after construction and for empty batches (see
    :mod:`numbabn.layers.batchnorm`).
    """

    _transient = ("_cache",)

    def __init__(
        self,
        num_features: int,
        p: float = 2,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        dtype: DTypeLike = np.float32,
    ) -> None:
        if (
            isinstance(p, (bool, np.bool_))
            or not isinstance(p, (int, float, np.integer, np.floating))
            or p not in P_VALUES
        ):
            raise ValueError(f"{type(self).__name__}: p must be 1, 2 or numpy.inf, got {p!r}")
        self.p = np.inf if p == np.inf else int(p)
        super().__init__(num_features, eps, momentum, affine, track_running_stats, None, dtype)
        self._cache = None

    def _add_running_stats(self, C: int) -> None:
        self.running_mean = self.add_buffer("running_mean", np.zeros(C, self.dtype))
        self.running_norm = self.add_buffer("running_norm", np.ones(C, self.dtype))
        self._add_counter()

    @staticmethod
    def _sum(a: NDArray[Any]) -> NDArray[np.float64]:
        """Per-channel float64 sum over every axis but 1."""
        return a.sum(axis=(0,) + tuple(range(2, a.ndim)), dtype=np.float64)

    def _bcast(self, v: ArrayLike, ndim: int) -> FloatArray:
        """A per-channel vector in the layer's dtype, shaped to broadcast over axis 1."""
        return np.asarray(v, dtype=self.dtype).reshape((1, self.num_features) + (1,) * (ndim - 2))

    def _norm(self, u: FloatArray, m: int) -> NDArray[np.float64]:
        if self.p == np.inf:
            return np.abs(u).max(axis=(0,) + tuple(range(2, u.ndim))).astype(np.float64)
        if self.p == 1:
            return self._sum(np.abs(u)) / m
        return np.sqrt(self._sum(u * u) / m)

    def _dnorm(self, u: FloatArray, s: NDArray[np.float64], m: int) -> FloatArray:
        """ds/du (shape of u) for the batch's norm s (float64, (C,))."""
        if self.p == 1:
            return np.sign(u) / m
        if self.p == 2:
            inv = np.divide(1.0, m * s, out=np.zeros_like(s), where=s > 0)  # constant channel: u = 0
            return u * self._bcast(inv, u.ndim)
        is_max = np.abs(u) == self._bcast(s, u.ndim)
        return np.sign(u) * is_max / self._bcast(self._sum(is_max), u.ndim)

    def forward(self, x: FloatArray) -> FloatArray:
        x = self._check_input(x)
        out_dtype = x.dtype
        x = x.astype(self.dtype, copy=False)  # float16 -> float32
        C = self.num_features
        m = x.size // C
        batch = self.uses_batch_stats
        update = self.updates_running_stats
        nbt = V.check_counter(self._short(), self.num_batches_tracked) if update else None
        if batch and m == 1:
            raise ValueError(
                f"{self._short()}: training needs more than 1 value per channel, got input of shape {x.shape}"
            )
        if m == 0:  # empty batch: empty output, zero gradients, running statistics kept
            if update:
                nbt += 1
            self._cache = (x, None, None, x, batch, out_dtype)
            return np.empty(x.shape, out_dtype)
        if batch:
            mean = self._sum(x) / m
            u = x - self._bcast(mean, x.ndim)
            s = self._norm(u, m)
            if update:
                f = V.resolve_momentum(True, self.momentum, nbt)
                self.running_mean[...] = (1 - f) * self.running_mean + f * mean
                self.running_norm[...] = (1 - f) * self.running_norm + f * s
                nbt += 1
        else:
            u = x - self._bcast(self.running_mean, x.ndim)
            s = self.running_norm.astype(np.float64)
        D = s + self.eps
        xhat = u / self._bcast(D, x.ndim)
        self._cache = (u, s, D, xhat, batch, out_dtype)
        if not self.affine:
            return xhat.astype(out_dtype, copy=False)
        y = xhat * self._bcast(self.weight.value, x.ndim) + self._bcast(self.bias.value, x.ndim)
        return y.astype(out_dtype, copy=False)

    def backward(self, dy: FloatArray) -> FloatArray:
        u, s, D, xhat, batch, out_dtype = self._cached("_cache")
        dy = self._check_dy(dy, u.shape, out_dtype).astype(self.dtype, copy=False)
        h = dy
        if self.affine:
            self.weight.grad = self._sum(dy * xhat).astype(self.dtype)
            self.bias.grad = self._sum(dy).astype(self.dtype)
            h = dy * self._bcast(self.weight.value, dy.ndim)
        if u.size == 0:
            return np.empty(u.shape, out_dtype)
        du = h / self._bcast(D, h.ndim)
        if batch:
            m = u.size // self.num_features
            du -= self._bcast(self._sum(h * u) / D**2, h.ndim) * self._dnorm(u, s, m)
            du -= self._bcast(self._sum(du) / m, h.ndim)
        return du.astype(out_dtype, copy=False)

    def extra_repr(self) -> str:
        return super().extra_repr() + f", p={self.p}"

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["LpBatchNorm", FloatArray]:
        # p = inf: the one whose backward (a single active element) is easiest to get wrong.
        layer = cls(3, p=np.inf, dtype=dtype)._randomize_state(rng)
        return layer, rng.standard_normal((5, 3, 2)).astype(dtype)
