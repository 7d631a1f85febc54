"""Fully connected layer and the weight initialisations shared with Conv2d."""

from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from .._checks import check_bool
from .._typing import FloatArray
from .base import Layer, check_layer_dtype, check_positive_int, check_rng

INITS = ("glorot", "he")


def init_weight(
    owner: str, init: str, shape: tuple[int, ...], fan_in: int, fan_out: int, rng: np.random.Generator, dtype: DTypeLike
) -> FloatArray:
    """Random weights drawn in float64 and rounded once to ``dtype``.

    glorot (Glorot & Bengio 2010, uniform): U(-a, a), a = sqrt(6 / (fan_in + fan_out))
    he     (He et al. 2015, normal):        N(0, 2 / fan_in)   -- for ReLU networks
    """
    if init == "glorot":
        limit = np.sqrt(6.0 / (fan_in + fan_out))
        w = rng.uniform(-limit, limit, shape)
    elif init == "he":
        w = rng.normal(0.0, np.sqrt(2.0 / fan_in), shape)
    else:
        raise ValueError(f"{owner}: init must be one of {INITS}, got {init!r}")
    return w.astype(dtype)


class Linear(Layer):
    """y = x W^T + b.

    Shapes: x (N, in_features), W (out_features, in_features) (PyTorch's layout),
    b (out_features,), y (N, out_features).

    Backward, with g = dy::

        dW = g^T x    db = sum_n g_n    dx = g W

    ``init``: "glorot" (uniform, the default) or "he" (normal, for ReLU networks),
    see :func:`init_weight`. ``rng``: a ``numpy.random.Generator``, an int seed, or
    None (a generator seeded from the OS: different weights in every run). It is kept
    by the layer: ``reset_parameters()`` draws new weights from it and zeroes the bias.
    """

    _transient = ("_x",)

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init: str = "glorot",
        rng: np.random.Generator | int | None = None,
        dtype: DTypeLike = np.float32,
    ) -> None:
        super().__init__()
        owner = "Linear"
        self.in_features = check_positive_int(owner, "in_features", in_features)
        self.out_features = check_positive_int(owner, "out_features", out_features)
        bias = check_bool(owner, "bias", bias)  # bias='no' is truthy: it would add one
        self.dtype = check_layer_dtype(owner, dtype)
        self.init = init
        self.rng = check_rng(owner, rng)
        self.weight = self.add_parameter(
            "weight",
            init_weight(
                owner,
                init,
                (self.out_features, self.in_features),
                self.in_features,
                self.out_features,
                self.rng,
                self.dtype,
            ),
        )
        self.bias = self.add_parameter("bias", np.zeros(self.out_features, self.dtype)) if bias else None
        self._x = None

    def _init_parameters(self) -> None:
        """Weights drawn anew from ``rng`` with the layer's ``init``; bias zeros."""
        self.weight.value[...] = init_weight(
            "Linear", self.init, self.weight.value.shape, self.in_features, self.out_features, self.rng, self.dtype
        )
        if self.bias is not None:
            self.bias.value[...] = 0

    def forward(self, x: FloatArray) -> FloatArray:
        x = self._input(x)
        if x.ndim != 2 or x.shape[1] != self.in_features:
            raise self._shape_error(f"(N, {self.in_features})", x)
        self._x = x
        y = x @ self.weight.value.T
        if self.bias is not None:
            y += self.bias.value
        return y

    def backward(self, dy: FloatArray) -> FloatArray:
        x = self._cached("_x")
        dy = self._check_dy(dy, (x.shape[0], self.out_features), self.dtype)
        self.weight.grad = dy.T @ x
        if self.bias is not None:
            self.bias.grad = dy.sum(axis=0)
        return dy @ self.weight.value

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}"

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["Linear", FloatArray]:
        return cls(4, 3, rng=rng, dtype=dtype), rng.standard_normal((5, 4)).astype(dtype)
