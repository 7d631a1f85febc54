"""Small networks and data shared by the numbabn.train tests."""

import numpy as np
from numbabn_plugins.noisy_batch_norm import NoisyBatchNorm

from numbabn.layers import BatchNorm1d, Linear, ReLU, Sequential, Sigmoid
from numbabn.train import (
    ActivationPercentiles,
    GradientNorm,
    HessianEigenvalue,
    InternalCovariateShift,
    LandscapeProbe,
    WeightNorm,
)

F64 = np.float64


def two_layer(rng):
    model = Sequential(Linear(3, 4, rng=rng, dtype=F64), Linear(4, 2, rng=rng, dtype=F64))
    model[0].bias.value[...] = rng.standard_normal(4)
    return model


def bn_net(seed, dtype=F64, noisy=True):
    rng = np.random.default_rng(seed)
    norm = NoisyBatchNorm(8, dtype=dtype, rng=np.random.default_rng(seed + 1)) if noisy else BatchNorm1d(8, dtype=dtype)
    return Sequential(
        Linear(5, 8, rng=rng, dtype=dtype),
        norm,
        ReLU(),
        Linear(8, 6, rng=rng, dtype=dtype),
        BatchNorm1d(6, dtype=dtype),
        Sigmoid(),
        Linear(6, 3, rng=rng, dtype=dtype),
    )


def data(seed, n=120):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, 5)), rng.integers(0, 3, n)


def all_metrics():
    return [
        InternalCovariateShift(),
        LandscapeProbe(),
        ActivationPercentiles(5, unit=1),
        GradientNorm(),
        WeightNorm(),
        HessianEigenvalue(iters=3, eps=1e-2),
    ]
