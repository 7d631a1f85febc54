"""Layers that only change the shape of their input."""

from math import prod
from typing import Any

import numpy as np

from .._typing import FloatArray
from .base import Layer


class Flatten(Layer):
    """(N, d1, d2, ...) -> (N, d1*d2*...); backward reshapes dy back.

    Follows the input's dtype. The output is a view of the input when it can be.
    """

    _transient = ("_in",)

    def __init__(self) -> None:
        super().__init__()
        self._in = None

    def forward(self, x: FloatArray) -> FloatArray:
        x = self._input(x)
        if x.ndim < 2:
            raise self._shape_error("(N, d1, ...) with at least 2 dimensions", x)
        self._in = (x.shape, x.dtype)
        return x.reshape(x.shape[0], prod(x.shape[1:]))  # -1 fails for N = 0

    def backward(self, dy: FloatArray) -> FloatArray:
        shape, dtype = self._cached("_in")
        dy = self._check_dy(dy, (shape[0], prod(shape[1:])), dtype)
        return dy.reshape(shape)

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["Flatten", FloatArray]:
        return cls(), rng.standard_normal((3, 2, 2, 3)).astype(dtype)
