"""Element-wise activations. They hold no arrays, so they follow the input's dtype.

=========  ==========================  ===========================
layer      forward                     backward (g = dy)
=========  ==========================  ===========================
ReLU       y = max(x, 0)               dx = g * [not x <= 0]
Sigmoid    y = 1 / (1 + exp(-x))       dx = g * y * (1 - y)
Tanh       y = tanh(x)                 dx = g * (1 - y^2)
=========  ==========================  ===========================
"""

from typing import Any

import numpy as np
from numpy.typing import NDArray
from scipy.special import expit

from .._typing import FloatArray
from .base import Layer


class _Elementwise(Layer):
    """Forward keeps one array (the mask or the output) that backward maps with dy.

    Outputs may be that kept array: do not modify them in place before backward.
    """

    _transient = ("_saved", "_out_dtype")

    def __init__(self) -> None:
        super().__init__()
        self._saved = None
        self._out_dtype = None

    def forward(self, x: FloatArray) -> FloatArray:
        x = self._input(x)
        self._out_dtype = x.dtype
        y, self._saved = self._apply(x)
        return y

    def backward(self, dy: FloatArray) -> FloatArray:
        saved = self._cached("_saved")
        return self._grad(self._check_dy(dy, saved.shape, self._out_dtype), saved)

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["_Elementwise", FloatArray]:
        return cls(), rng.standard_normal((4, 3, 2)).astype(dtype)


class ReLU(_Elementwise):
    """y = max(x, 0); dx = dy * [not x <= 0]: PyTorch's mask, which passes the gradient
    of a NaN (NaN in, NaN out). Any shape."""

    @staticmethod
    def _apply(x: FloatArray) -> tuple[FloatArray, NDArray[np.bool_]]:
        return np.maximum(x, 0), ~(x <= 0)

    @staticmethod
    def _grad(dy: FloatArray, mask: NDArray[np.bool_]) -> FloatArray:
        return dy * mask


class Sigmoid(_Elementwise):
    """y = 1 / (1 + exp(-x)); dx = dy * y * (1 - y). Any shape."""

    @staticmethod
    def _apply(x: FloatArray) -> tuple[FloatArray, FloatArray]:
        # SciPy's expit: in the input's dtype, no overflow warnings, and accurate where
        # y is tiny (0.5 + 0.5*tanh(x/2) cancelled there: 44 % off at x = -17 in
        # float32, and 0 from x = -20 where y is 2e-9).
        y = expit(x)  # float32 and float64 keep their dtype; float16 comes back float64
        if y.dtype != x.dtype:
            y = y.astype(x.dtype)
        return y, y

    @staticmethod
    def _grad(dy: FloatArray, y: FloatArray) -> FloatArray:
        return dy * y * (1 - y)


class Tanh(_Elementwise):
    """y = tanh(x); dx = dy * (1 - y^2). Any shape."""

    @staticmethod
    def _apply(x: FloatArray) -> tuple[FloatArray, FloatArray]:
        y = np.tanh(x)
        return y, y

    @staticmethod
    def _grad(dy: FloatArray, y: FloatArray) -> FloatArray:
        return dy * (1 - y * y)
