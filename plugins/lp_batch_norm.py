"""lp batch norm (Santurkar, Tsipras, Ilyas & Madry 2018, "How Does Batch
Normalization Help Optimization?", NeurIPS, Section 3.3 and Appendix A)."""
import numpy as np

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

    (p = 2 is the standard deviation; eps is added to s, not to s^2.)

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
    reductions in float64.
    """

    def __init__(self, num_features, p=2, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 dtype=np.float32):
        if p not in P_VALUES:
            raise ValueError(f"{type(self).__name__}: p must be 1, 2 or numpy.inf, got {p!r}")
        self.p = p
        super().__init__(num_features, eps, momentum, affine, track_running_stats, None, dtype)
        self._cache = None

    def _add_running_stats(self, C):
        self.running_mean = self.add_buffer("running_mean", np.zeros(C, self.dtype))
        self.running_norm = self.add_buffer("running_norm", np.ones(C, self.dtype))
        self.num_batches_tracked = self.add_buffer("num_batches_tracked", np.zeros((), np.int64))

    def _sum(self, a):
        """Per-channel float64 sum over every axis but 1."""
        return a.sum(axis=(0,) + tuple(range(2, a.ndim)), dtype=np.float64)

    def _norm(self, u, m):
        if self.p == np.inf:
            return np.abs(u).max(axis=(0,) + tuple(range(2, u.ndim))).astype(np.float64)
        if self.p == 1:
            return self._sum(np.abs(u)) / m
        return np.sqrt(self._sum(u * u) / m)

    def _dnorm(self, u, s, m, bcast):
        """ds/du (shape of u) for the batch's norm s (float64, (C,))."""
        if self.p == 1:
            return np.sign(u) / m
        if self.p == 2:
            inv = np.divide(1.0, m * s, out=np.zeros_like(s), where=s > 0)   # constant channel: u = 0
            return u * bcast(inv)
        is_max = np.abs(u) == bcast(s)
        return np.sign(u) * is_max / bcast(self._sum(is_max))

    def forward(self, x):
        x = self._check_input(x)
        C, dt = self.num_features, self.dtype
        m = x.size // C
        shape = (1, C) + (1,) * (x.ndim - 2)

        def bcast(v):
            return np.asarray(v, dtype=dt).reshape(shape)

        batch = self.uses_batch_stats
        if batch:
            if m <= 1:
                raise ValueError(f"{self._short()}: training needs more than 1 value per channel, "
                                 f"got input of shape {x.shape}")
            mean = self._sum(x) / m
            u = x - bcast(mean)
            s = self._norm(u, m)
            if self.track_running_stats:
                nbt = self.num_batches_tracked
                f = self.momentum if self.momentum is not None else 1.0 / (int(nbt) + 1)
                self.running_mean[...] = (1 - f) * self.running_mean + f * mean
                self.running_norm[...] = (1 - f) * self.running_norm + f * s
                nbt += 1
        else:
            u = x - self.running_mean.reshape(shape)
            s = self.running_norm.astype(np.float64)
        D = s + self.eps
        xhat = u / bcast(D)
        self._cache = (u, s, D, xhat, batch, bcast)
        if not self.affine:
            return xhat
        return xhat * bcast(self.weight.value) + bcast(self.bias.value)

    def backward(self, dy):
        u, s, D, xhat, batch, bcast = self._cached("_cache")
        dy = self._check_dy(dy, u.shape, self.dtype)
        h = dy
        if self.affine:
            self.weight.grad = self._sum(dy * xhat).astype(self.dtype)
            self.bias.grad = self._sum(dy).astype(self.dtype)
            h = dy * bcast(self.weight.value)
        du = h / bcast(D)
        if not batch:
            return du
        m = u.size // self.num_features
        du -= bcast(self._sum(h * u) / D**2) * self._dnorm(u, s, m, bcast)
        du -= bcast(self._sum(du) / m)
        return du

    def extra_repr(self):
        return super().extra_repr() + f", p={self.p}"

    @classmethod
    def _contract_example(cls, rng, dtype):
        # p = inf: the one whose backward (a single active element) is easiest to get wrong.
        layer = cls(3, p=np.inf, dtype=dtype)._randomize_state(rng)
        return layer, rng.standard_normal((5, 3, 2)).astype(dtype)
