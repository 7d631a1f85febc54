"""Explicit layers (no autograd): each has ``forward(x)`` and ``backward(dy)``.

See :mod:`numbabn.layers.base` for the contract. ``BUILTIN_LAYERS`` names the
built-in layers; :mod:`numbabn.registry` reads it on its first lookup (the layers
never import the registry, so there is no import circle).
"""

from .activations import ReLU, Sigmoid, Tanh
from .base import Layer, Parameter
from .batchnorm import BatchNorm1d, BatchNorm2d, BatchNorm3d, BatchNormBase
from .containers import Sequential
from .conv import Conv2d
from .linear import Linear
from .losses import HalfSquaredError, MSELoss, PoissonDeviance, SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy
from .shape import Flatten

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "BatchNormBase",
    "Conv2d",
    "Flatten",
    "HalfSquaredError",
    "Layer",
    "Linear",
    "MSELoss",
    "Parameter",
    "PoissonDeviance",
    "ReLU",
    "Sequential",
    "Sigmoid",
    "SigmoidBinaryCrossEntropy",
    "SoftmaxCrossEntropy",
    "Tanh",
]

# Registry names of the built-in layers (numbabn.registry.get_layer(name, ...)).
BUILTIN_LAYERS = {
    "batch_norm1d": BatchNorm1d,
    "batch_norm2d": BatchNorm2d,
    "batch_norm3d": BatchNorm3d,
    "conv2d": Conv2d,
    "flatten": Flatten,
    "linear": Linear,
    "relu": ReLU,
    "sequential": Sequential,
    "sigmoid": Sigmoid,
    "tanh": Tanh,
}
