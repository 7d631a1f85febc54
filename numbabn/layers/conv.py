"""2-D convolution (cross-correlation, as in PyTorch) by im2col + one BLAS matmul."""

from typing import Any

import numpy as np
from numpy.lib.stride_tricks import sliding_window_view
from numpy.typing import DTypeLike

from .._checks import check_bool
from .._typing import FloatArray
from .base import Layer, check_layer_dtype, check_positive_int, check_rng
from .linear import init_weight


def _pair(owner: str, name: str, value: Any, minimum: int) -> tuple[int, int]:
    pair = value if isinstance(value, tuple) else (value, value)
    if len(pair) != 2 or any(isinstance(v, bool) or not isinstance(v, (int, np.integer)) or v < minimum for v in pair):
        raise ValueError(f"{owner}: {name} must be an int >= {minimum} or a pair of them, got {value!r}")
    return int(pair[0]), int(pair[1])


class Conv2d(Layer):
    """y[n, o, i, j] = b[o] + sum_{c, u, v} W[o, c, u, v] * xp[n, c, i*sh + u, j*sw + v]

    xp is x zero-padded by ``padding`` on each side of H and W. Shapes: x (N, C, H, W),
    W (out_channels, C, kh, kw), y (N, out_channels, Ho, Wo) with
    Ho = (H + 2*ph - kh) // sh + 1 (same for Wo).

    im2col: the kh*kw windows of xp at the strided positions form the matrix
    ``cols`` of shape (N*Ho*Wo, C*kh*kw) (a sliding_window_view, copied once), so
    ``y = cols @ W.reshape(out, -1).T + b``. Backward, with G = dy as (N*Ho*Wo, out)::

        dW = (G^T cols).reshape(W.shape)      db = sum of G over rows
        dcols = G @ W.reshape(out, -1)        dx = col2im(dcols)

    col2im adds each window back where it came from: one strided slice-add per kernel
    offset (u, v), so overlapping windows accumulate.

    ``init`` and ``rng`` as for :class:`~numbabn.layers.Linear` (fan-in C*kh*kw,
    fan-out out_channels*kh*kw).
    """

    _transient = ("_cache",)

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel_size: int | tuple[int, int],
        stride: int | tuple[int, int] = 1,
        padding: int | tuple[int, int] = 0,
        bias: bool = True,
        init: str = "glorot",
        rng: np.random.Generator | int | None = None,
        dtype: DTypeLike = np.float32,
    ) -> None:
        super().__init__()
        owner = "Conv2d"
        self.in_channels = check_positive_int(owner, "in_channels", in_channels)
        self.out_channels = check_positive_int(owner, "out_channels", out_channels)
        bias = check_bool(owner, "bias", bias)  # bias='no' is truthy: it would add one
        self.kernel_size = _pair(owner, "kernel_size", kernel_size, 1)
        self.stride = _pair(owner, "stride", stride, 1)
        self.padding = _pair(owner, "padding", padding, 0)
        self.dtype = check_layer_dtype(owner, dtype)
        kh, kw = self.kernel_size
        shape = (self.out_channels, self.in_channels, kh, kw)
        self.init = init
        self.rng = check_rng(owner, rng)
        self.weight = self.add_parameter(
            "weight",
            init_weight(
                owner, init, shape, self.in_channels * kh * kw, self.out_channels * kh * kw, self.rng, self.dtype
            ),
        )
        self.bias = self.add_parameter("bias", np.zeros(self.out_channels, self.dtype)) if bias else None
        self._cache = None

    def _init_parameters(self) -> None:
        """Weights drawn anew from ``rng`` with the layer's ``init``; bias zeros."""
        kh, kw = self.kernel_size
        self.weight.value[...] = init_weight(
            "Conv2d",
            self.init,
            self.weight.value.shape,
            self.in_channels * kh * kw,
            self.out_channels * kh * kw,
            self.rng,
            self.dtype,
        )
        if self.bias is not None:
            self.bias.value[...] = 0

    def _padded(self, x: FloatArray) -> FloatArray:
        ph, pw = self.padding
        if ph == 0 and pw == 0:
            return x
        return np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))

    def forward(self, x: FloatArray) -> FloatArray:
        x = self._input(x)
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise self._shape_error(f"(N, {self.in_channels}, H, W)", x)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        xp = self._padded(x)
        if xp.shape[2] < kh or xp.shape[3] < kw:
            raise ValueError(
                f"{self._short()}: the padded input {xp.shape[2:]} is smaller than the kernel "
                f"{self.kernel_size} (input shape {x.shape})"
            )
        # (N, C, Ho, Wo, kh, kw) view -> (N, Ho, Wo, C, kh, kw) rows: one copy.
        win = sliding_window_view(xp, (kh, kw), axis=(2, 3))[:, :, ::sh, ::sw]
        N, C, Ho, Wo = win.shape[:4]
        cols = win.transpose(0, 2, 3, 1, 4, 5).reshape(N * Ho * Wo, C * kh * kw)
        y = cols @ self.weight.value.reshape(self.out_channels, -1).T
        if self.bias is not None:
            y += self.bias.value
        self._cache = (cols, x.shape, xp.shape, (N, Ho, Wo))
        # (N*Ho*Wo, out) -> NCHW, contiguous so a following BatchNorm2d reads it without a copy.
        return np.ascontiguousarray(y.reshape(N, Ho, Wo, self.out_channels).transpose(0, 3, 1, 2))

    def backward(self, dy: FloatArray) -> FloatArray:
        cols, x_shape, xp_shape, (N, Ho, Wo) = self._cached("_cache")
        dy = self._check_dy(dy, (N, self.out_channels, Ho, Wo), self.dtype)
        g = dy.transpose(0, 2, 3, 1).reshape(N * Ho * Wo, self.out_channels)
        w2 = self.weight.value.reshape(self.out_channels, -1)
        self.weight.grad = (g.T @ cols).reshape(self.weight.value.shape)
        if self.bias is not None:
            self.bias.grad = g.sum(axis=0)
        (kh, kw), (sh, sw) = self.kernel_size, self.stride
        dcols = (g @ w2).reshape(N, Ho, Wo, x_shape[1], kh, kw)
        dxp = np.zeros(xp_shape, self.dtype)
        for u in range(kh):
            for v in range(kw):
                dxp[:, :, u : u + sh * Ho : sh, v : v + sw * Wo : sw] += dcols[..., u, v].transpose(0, 3, 1, 2)
        ph, pw = self.padding
        return dxp[:, :, ph : ph + x_shape[2], pw : pw + x_shape[3]]

    def extra_repr(self) -> str:
        return (
            f"{self.in_channels}, {self.out_channels}, kernel_size={self.kernel_size}, "
            f"stride={self.stride}, padding={self.padding}, bias={self.bias is not None}"
        )

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["Conv2d", FloatArray]:
        layer = cls(2, 3, 3, stride=2, padding=1, rng=rng, dtype=dtype)
        layer.bias.value[...] = rng.standard_normal(3)
        return layer, rng.standard_normal((2, 2, 5, 6)).astype(dtype)
