"""Explicit layers (no autograd): each has ``forward(x)`` and ``backward(dy)``.

See :mod:`numbabn.layers.base` for the contract. Importing this package registers
the built-in layers in :mod:`numbabn.registry`.
"""
from .activations import ReLU, Sigmoid, Tanh
from .base import Layer, Parameter
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from .containers import Sequential
from .conv import Conv2d
from .linear import Linear
from .losses import MSELoss, SoftmaxCrossEntropy
from .shape import Flatten

__all__ = ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "BatchNormBase", "Conv2d", "Flatten", "Layer", "Linear",
           "MSELoss", "Parameter", "ReLU", "Sequential", "Sigmoid", "SoftmaxCrossEntropy", "Tanh"]
