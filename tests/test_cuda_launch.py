"""CUDA launch geometry: the kernels' plans (blocks, channels per block, splits of a
channel) and bit-identical results of repeated launches.

Without a GPU these run on Numba's CUDA simulator (tests/conftest.py). The numbers
of the partitioned paths these plans produce are checked in test_numerics.py
(test_partitioned_paths, which uses the same shapes).
"""

import numpy as np
import pytest
from numba import cuda

import numbabn
from numbabn import config
from numbabn.kernels import cuda as K

from .helpers import make_inputs
from .test_numerics import CUDA_PARTITIONED as MULTI_BLOCK


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else a


def ncl_plan(x, axis):
    """The plan the kernels use for ``x`` (channel axis ``axis``)."""
    _, layout, cshape, C, m = numbabn._layout.layout_of("t", "x", x.shape, axis)
    return K.plan(C, m, cshape[2] if layout == "ncl" else 1, config.CUDA_THREADS)


@pytest.fixture
def threads32(monkeypatch):
    monkeypatch.setattr(config, "CUDA_THREADS", 32)


@pytest.mark.parametrize("shape,axis", MULTI_BLOCK)
def test_multi_block_shapes_launch_several_blocks(threads32, shape, axis):
    assert ncl_plan(np.empty(shape), axis).blocks > 1


def test_plans_cover_the_multi_block_cases(threads32):
    plans = [ncl_plan(np.empty(s), a) for s, a in MULTI_BLOCK]
    assert plans[0].S > 1 and not plans[0].cfast  # ncl channel split over blocks
    assert plans[1].S > 1 and plans[1].cfast and plans[1].G == 3  # channels-last split
    assert plans[2].G == 32 and 37 % plans[2].G  # tail tile of channels
    assert plans[3].G > 1 and plans[3].S == 1  # several channels per block


@pytest.mark.parametrize(
    "C,m,L,check",
    [
        (100_000, 64, 8, lambda p: p.G > 1 and p.S == 1),  # many small channels: packed
        (2, 10**8, 10**4, lambda p: p.G == 1 and p.W == 256),  # few huge channels: split
        (3, 10**7, 1, lambda p: p.cfast and p.G == 3),  # channels-last, few channels
    ],
)
def test_plan_saturates_both_extremes(C, m, L, check):
    p = K.plan(C, m, L, threads=256)
    assert check(p)
    assert p.threads == p.G * p.W <= 256
    assert p.blocks >= K.TARGET_BLOCKS // 2
    assert (p.S - 1) * p.span < m <= p.S * p.span  # every split non-empty


def test_plan_rejects_bad_block_size():
    with pytest.raises(ValueError, match="threads per block"):
        K.plan(C=3, m=10, L=1, threads=2048)


def test_bit_identical_runs(rng, threads32):
    shape, axis = (4, 3, 130), 1  # several blocks per channel at 32 threads
    x, g, b = make_inputs(rng, shape, axis, np.float32, loc=3.0)
    dy = cuda.to_device(rng.standard_normal(shape).astype(np.float32))
    dxd = cuda.to_device(x)
    runs = []
    for _ in range(2):
        y, ctx = numbabn.batch_norm_forward(dxd, g, b, axis=axis, activation="relu")
        runs.append([host(a) for a in (y, ctx.mean, ctx.invstd, *numbabn.batch_norm_backward(dy, ctx))])
    for a, b_ in zip(*runs, strict=True):
        assert np.array_equal(a, b_)


class _LaunchChecker:
    """A kernel whose launches refuse ``None`` arguments, as a real GPU's do (the
    simulator accepts them): ``kernel[config](*args)`` with a ``None`` in ``args``
    raises there with ``NotImplementedError: (none, None)``."""

    def __init__(self, name, kernel, launches):
        self.name, self.kernel, self.launches = name, kernel, launches

    def __getitem__(self, launch_config):
        def launch(*args):
            assert all(a is not None for a in args), f"{self.name} launched with a None argument"
            self.launches.append(self.name)
            return self.kernel[launch_config](*args)

        return launch


@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("residual", [False, True])
@pytest.mark.parametrize("training", [True, False])
def test_no_kernel_is_launched_with_none(monkeypatch, rng, relu, residual, training):
    """Every launch of a forward and backward, with and without the fused ReLU and
    residual, in training and eval, passes only arrays and scalars."""
    launches = []
    for name in [n for n in vars(K) if n.endswith("_kernel")]:
        monkeypatch.setattr(K, name, _LaunchChecker(name, getattr(K, name), launches))
    x, dy = rng.standard_normal((2, 4, 6, 3, 5)).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    kw = dict(training=training, activation="relu" if relu else None)
    kw["running_mean"] = cuda.to_device(np.zeros(6, np.float32))
    kw["running_var"] = cuda.to_device(np.ones(6, np.float32))
    if residual:
        kw["residual"] = cuda.to_device(r)
    y, ctx = numbabn.batch_norm_forward(cuda.to_device(x), **kw)
    grads = numbabn.batch_norm_backward(cuda.to_device(dy), ctx)
    assert {"_apply_kernel", "_grad_sums_kernel", "_grad_apply_kernel"} <= set(launches)
    assert len(grads) == (4 if residual else 3)
