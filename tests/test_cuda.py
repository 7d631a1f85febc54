"""CUDA backend vs the float64 reference and vs the CPU backend.

Without a GPU, conftest.py switches Numba to its CUDA simulator and sets 32 threads
per block, so these tests run (slowly, one Python thread per CUDA thread) on any
machine: shapes stay small but still give several blocks, tail tiles and channels
split over several blocks. On a machine with a GPU the same tests run for real.
"""
import functools
import subprocess
import sys

import numpy as np
import pytest
from numba import cuda

import numbabn
from numbabn import config
from numbabn.kernels import cuda as K
from numbabn.kernels import reference as R

from .helpers import CASES, TOL, make_inputs, param_dtype
from .test_errors import BAD_FORWARD

SIMULATOR = bool(cuda.config.ENABLE_CUDASIM)
# CUDA vs CPU: both round once from float64, but reduce in different orders.
CPU_TOL = {np.float64: dict(rtol=1e-12, atol=1e-12),
           np.float32: dict(rtol=3e-6, atol=3e-6),
           np.float16: dict(rtol=2e-3, atol=2e-3)}


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else a


def assert_device(*arrays):
    for a in arrays:
        assert numbabn._layout.is_device_array(a), type(a)


def ncl_plan(x, axis):
    """The plan the kernels use for ``x`` (channel axis ``axis``)."""
    _, layout, cshape, C, m = numbabn._layout.layout_of("t", "x", x.shape, axis)
    return K.plan(C, m, cshape[2] if layout == "ncl" else 1, config.CUDA_THREADS)


# ---------------------------------------------------------------- numerics


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("relu,affine", [(False, True), (True, True), (True, False)])
def test_train_forward_backward(rng, shape, axis, dtype, relu, affine):
    x, gamma, beta = make_inputs(rng, shape, axis, dtype)
    if not affine:
        gamma = beta = None
    act = "relu" if relu else None
    dy = rng.standard_normal(shape).astype(dtype)
    y, ctx = numbabn.batch_norm_forward(cuda.to_device(x), gamma, beta, axis=axis, activation=act)
    dx, dg, db = numbabn.batch_norm_backward(cuda.to_device(dy), ctx)
    assert ctx.backend == "cuda"
    assert_device(y, dx)
    assert y.dtype == dtype and y.shape == shape and dx.dtype == dtype and dx.shape == shape

    y_ref, mean, _ = R.forward(x, gamma, beta, axis=axis, relu=relu)
    dx_ref, dg_ref, db_ref = R.backward(dy, x, gamma, beta, axis=axis, relu=relu)
    np.testing.assert_allclose(host(y), y_ref, **TOL[dtype])
    np.testing.assert_allclose(host(ctx.mean), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(host(dx), dx_ref, **TOL[dtype])

    y_cpu, ctx_cpu = numbabn.batch_norm_forward(x, gamma, beta, axis=axis, activation=act)
    dx_cpu, dg_cpu, db_cpu = numbabn.batch_norm_backward(dy, ctx_cpu)
    np.testing.assert_allclose(host(y), y_cpu, **CPU_TOL[dtype])
    np.testing.assert_allclose(host(dx), dx_cpu, **CPU_TOL[dtype])
    if affine:
        assert_device(dg, db)
        assert dg.dtype == param_dtype(dtype) and db.dtype == param_dtype(dtype)
        np.testing.assert_allclose(host(dg), dg_ref, **TOL[dtype])
        np.testing.assert_allclose(host(db), db_ref, **TOL[dtype])
        np.testing.assert_allclose(host(dg), dg_cpu, **CPU_TOL[dtype])
        np.testing.assert_allclose(host(db), db_cpu, **CPU_TOL[dtype])
    else:
        assert dg is None and db is None


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_eval_forward_backward(rng, shape, axis, dtype, relu):
    x, gamma, beta = make_inputs(rng, shape, axis, dtype)
    C = shape[axis]
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2.0, C).astype(dtype)
    d_rm, d_rv = cuda.to_device(rm), cuda.to_device(rv)
    act = "relu" if relu else None
    y, ctx = numbabn.batch_norm_forward(cuda.to_device(x), cuda.to_device(gamma), beta,
                                        running_mean=d_rm, running_var=d_rv,
                                        training=False, axis=axis, activation=act)
    np.testing.assert_allclose(host(y), R.forward(x, gamma, beta, mean=rm, var=rv, axis=axis,
                                                  relu=relu)[0], **TOL[dtype])
    np.testing.assert_array_equal(host(d_rm), rm)     # eval never touches running stats
    np.testing.assert_array_equal(host(d_rv), rv)
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dg, db = numbabn.batch_norm_backward(cuda.to_device(dy), ctx)
    dx_ref, dg_ref, db_ref = R.backward(dy, x, gamma, beta, mean=rm, var=rv, axis=axis,
                                        relu=relu, training=False)
    np.testing.assert_allclose(host(dx), dx_ref, **TOL[dtype])
    np.testing.assert_allclose(host(dg), dg_ref, **TOL[dtype])
    np.testing.assert_allclose(host(db), db_ref, **TOL[dtype])


@pytest.mark.parametrize("shape,axis", [((8, 3, 40), 1), ((200, 4), 1), ((6, 5, 4, 3), -1)])
def test_large_mean_float32_within_rounding(rng, shape, axis):
    """|mean| = 1e4 with std 1: Welford/Chan in float64 keeps y within float32 rounding."""
    x, gamma, beta = make_inputs(rng, shape, axis, np.float32, loc=1e4, scale=1.0)
    y, ctx = numbabn.batch_norm_forward(cuda.to_device(x), gamma, beta, axis=axis)
    y_ref, mean, var = R.forward(x, gamma, beta, axis=axis)
    np.testing.assert_allclose(host(y), y_ref, rtol=0,
                               atol=4 * np.finfo(np.float32).eps * np.abs(y_ref).max())
    np.testing.assert_allclose(host(ctx.mean), mean, rtol=1e-14)
    np.testing.assert_allclose(1 / host(ctx.invstd) ** 2 - 1e-5, var, rtol=1e-9)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dg, _ = numbabn.batch_norm_backward(cuda.to_device(dy), ctx)
    dx_ref, dg_ref, _ = R.backward(dy, x, gamma, beta, axis=axis)
    np.testing.assert_allclose(host(dx), dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(host(dg), dg_ref, rtol=1e-4, atol=1e-3)


# Shapes whose plan at 32 threads per block (forced, so that a real GPU runs the
# same paths as the simulator) splits a channel over several blocks, packs several
# channels per block, or leaves a tail tile of channels.
MULTI_BLOCK = [((4, 2, 300), 1), ((700, 3), 1), ((40, 37), 1), ((3, 45, 5), 1)]


@pytest.fixture
def threads32(monkeypatch):
    monkeypatch.setattr(config, "CUDA_THREADS", 32)


@pytest.mark.parametrize("shape,axis", MULTI_BLOCK)
def test_multi_block_paths(rng, threads32, shape, axis):
    p = ncl_plan(np.empty(shape), axis)
    assert p.blocks > 1
    x, g, b = make_inputs(rng, shape, axis, np.float64, loc=100.0)
    y, ctx = numbabn.batch_norm_forward(cuda.to_device(x), g, b, axis=axis, activation="relu")
    np.testing.assert_allclose(host(y), R.forward(x, g, b, axis=axis, relu=True)[0], rtol=1e-10, atol=1e-10)
    dy = rng.standard_normal(shape)
    dx, dg, db = numbabn.batch_norm_backward(cuda.to_device(dy), ctx)
    rdx, rdg, rdb = R.backward(dy, x, g, b, axis=axis, relu=True)
    np.testing.assert_allclose(host(dx), rdx, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(host(dg), rdg, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(host(db), rdb, rtol=1e-9, atol=1e-10)
    m = numbabn.moments(cuda.to_device(x), axis=axis)
    count, mean, m2 = R.moments(x, axis)
    assert m.count == count and isinstance(m.mean, np.ndarray)
    np.testing.assert_allclose(m.mean, mean, rtol=1e-13)
    np.testing.assert_allclose(m.m2, m2, rtol=1e-11)


def test_plans_cover_the_multi_block_cases(threads32):
    plans = [ncl_plan(np.empty(s), a) for s, a in MULTI_BLOCK]
    assert plans[0].S > 1 and not plans[0].cfast             # ncl channel split over blocks
    assert plans[1].S > 1 and plans[1].cfast and plans[1].G == 3   # channels-last split
    assert plans[2].G == 32 and 37 % plans[2].G                  # tail tile of channels
    assert plans[3].G > 1 and plans[3].S == 1                    # several channels per block


@pytest.mark.parametrize("C,m,L,check", [
    (100_000, 64, 8, lambda p: p.G > 1 and p.S == 1),      # many small channels: packed
    (2, 10**8, 10**4, lambda p: p.G == 1 and p.W == 256),  # few huge channels: split
    (3, 10**7, 1, lambda p: p.cfast and p.G == 3),         # channels-last, few channels
])
def test_plan_saturates_both_extremes(C, m, L, check):
    p = K.plan(C, m, L, threads=256)
    assert check(p)
    assert p.threads == p.G * p.W <= 256
    assert p.blocks >= K.TARGET_BLOCKS // 2
    assert (p.S - 1) * p.span < m <= p.S * p.span           # every split non-empty


def test_plan_rejects_bad_block_size():
    with pytest.raises(ValueError, match="threads per block"):
        K.plan(C=3, m=10, L=1, threads=2048)


def test_constant_channel_and_two_values(rng):
    x = np.ones((4, 2, 3), np.float32) * 7
    x[:, 1] = rng.standard_normal((4, 3))
    y, ctx = numbabn.batch_norm_forward(cuda.to_device(x))
    np.testing.assert_array_equal(host(y)[:, 0], 0)            # var 0 -> x - mean = 0 exactly
    dx, _, _ = numbabn.batch_norm_backward(cuda.to_device(np.ones_like(x)), ctx)
    assert np.all(np.isfinite(host(dx)))
    x2 = np.array([[1.0, -3.0], [2.0, 5.0]])                   # m = 2
    y2, _ = numbabn.batch_norm_forward(cuda.to_device(x2))
    np.testing.assert_allclose(host(y2), R.forward(x2)[0], rtol=1e-12)


def test_bit_identical_runs(rng, threads32):
    shape, axis = (4, 3, 130), 1          # several blocks per channel at 32 threads
    x, g, b = make_inputs(rng, shape, axis, np.float32, loc=3.0)
    dy = cuda.to_device(rng.standard_normal(shape).astype(np.float32))
    dxd = cuda.to_device(x)
    runs = []
    for _ in range(2):
        y, ctx = numbabn.batch_norm_forward(dxd, g, b, axis=axis, activation="relu")
        runs.append([host(a) for a in (y, ctx.mean, ctx.invstd, *numbabn.batch_norm_backward(dy, ctx))])
    for a, b_ in zip(*runs):
        assert np.array_equal(a, b_)


# ---------------------------------------------------------------- placement


def test_numpy_input_with_cuda_backend_returns_numpy(rng):
    x, g, b = make_inputs(rng, (5, 3, 4), 1, np.float32)
    y, ctx = numbabn.batch_norm_forward(x, g, b, backend="cuda")
    assert isinstance(y, np.ndarray) and ctx.backend == "cuda"
    np.testing.assert_allclose(y, R.forward(x, g, b)[0], **TOL[np.float32])
    dy = rng.standard_normal(x.shape).astype(np.float32)
    out = np.empty_like(x)
    dx, dg, db = numbabn.batch_norm_backward(dy, ctx, out=out)
    assert dx is out and isinstance(dg, np.ndarray) and isinstance(db, np.ndarray)
    np.testing.assert_allclose(dx, R.backward(dy, x, g, b)[0], **TOL[np.float32])
    m = numbabn.moments(x, backend="cuda")
    np.testing.assert_allclose(m.m2, R.moments(x)[2], rtol=1e-12)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_device_out_receives_result(rng, dtype):
    x, g, b = make_inputs(rng, (6, 3, 5), 1, dtype)
    out = cuda.device_array(x.shape, dtype)
    y, ctx = numbabn.batch_norm_forward(cuda.to_device(x), g, b, out=out)
    assert y is out
    np.testing.assert_allclose(host(out), R.forward(x, g, b)[0], **TOL[dtype])
    dx_out = cuda.device_array(x.shape, dtype)
    dx, _, _ = numbabn.batch_norm_backward(cuda.to_device(np.ones_like(x)), ctx, out=dx_out)
    assert dx is dx_out
    np.testing.assert_allclose(host(dx), R.backward(np.ones_like(x), x, g, b)[0], **TOL[dtype])


@pytest.mark.parametrize("on_device", [False, True])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_running_stats_over_steps(rng, on_device, momentum):
    shape, axis = (6, 3, 4), 1
    C = shape[axis]
    rm, rv = np.zeros(C), np.ones(C)
    d_rm, d_rv = cuda.to_device(rm), cuda.to_device(rv)
    cpu_rm, cpu_rv = rm.copy(), rv.copy()
    nbt, cpu_nbt = np.zeros((), np.int64), np.zeros((), np.int64)
    ref_m, ref_v = rm.copy(), rv.copy()
    for step in range(1, 4):
        x, _, _ = make_inputs(rng, shape, axis, np.float64, loc=step)
        numbabn.batch_norm_forward(cuda.to_device(x), running_mean=d_rm if on_device else rm,
                                   running_var=d_rv if on_device else rv,
                                   num_batches_tracked=nbt, momentum=momentum, axis=axis)
        numbabn.batch_norm_forward(x, running_mean=cpu_rm, running_var=cpu_rv,
                                   num_batches_tracked=cpu_nbt, momentum=momentum, axis=axis)
        count, mean, m2 = R.moments(x, axis)
        mom = momentum if momentum is not None else 1.0 / step
        ref_m, ref_v = R.update_running(ref_m, ref_v, mean, m2 / count, count, mom)
        assert int(nbt) == step
    got_m, got_v = (host(d_rm), host(d_rv)) if on_device else (rm, rv)
    if on_device:   # the host arrays were only the initial values
        np.testing.assert_array_equal(rm, 0)
        np.testing.assert_array_equal(rv, 1)
    np.testing.assert_allclose(got_m, ref_m, rtol=1e-12)
    np.testing.assert_allclose(got_v, ref_v, rtol=1e-12)
    np.testing.assert_allclose(got_m, cpu_rm, rtol=1e-13)
    np.testing.assert_allclose(got_v, cpu_rv, rtol=1e-13)


def test_float32_running_stats_host_arrays(rng):
    x, g, b = make_inputs(rng, (8, 2, 3), 1, np.float32)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    cpu_rm, cpu_rv = rm.copy(), rv.copy()
    numbabn.batch_norm_forward(cuda.to_device(x), g, b, running_mean=rm, running_var=rv)
    numbabn.batch_norm_forward(x, g, b, running_mean=cpu_rm, running_var=cpu_rv)
    assert rm.dtype == np.float32
    np.testing.assert_allclose(rm, cpu_rm, rtol=1e-6)
    np.testing.assert_allclose(rv, cpu_rv, rtol=1e-6)


def test_moments_of_empty_batch():
    m = numbabn.moments(cuda.to_device(np.empty((0, 3))), axis=1)
    assert m.count == 0 and m.channels == 3


@pytest.mark.parametrize("shape,axis", [((0, 3), 1), ((0, 3, 4), 1), ((4, 3, 0), 1), ((2, 0, 3), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
@pytest.mark.parametrize("on_device", [True, False])
def test_empty_batch(shape, axis, dtype, on_device):
    """No values per channel: empty output and dx, zero dgamma/dbeta, running
    statistics kept, the counter counting the training call; no kernel launch."""
    pdt = param_dtype(dtype)
    rm, rv, nbt = np.full(3, 0.5, pdt), np.full(3, 2.0, pdt), np.zeros((), np.int64)
    x = np.empty(shape, dtype)
    inp = cuda.to_device(x) if on_device else x
    for training in (True, False):
        y, ctx = numbabn.batch_norm_forward(inp, np.ones(3, pdt), np.zeros(3, pdt), running_mean=rm, running_var=rv,
                                            num_batches_tracked=nbt, training=training, axis=axis, backend="cuda")
        dx, dg, db = numbabn.batch_norm_backward(cuda.to_device(x) if on_device else x, ctx)
        assert host(y).shape == host(dx).shape == shape and host(y).dtype == host(dx).dtype == dtype
        assert np.all(host(dg) == 0) and np.all(host(db) == 0) and host(dg).dtype == pdt
        if on_device:
            assert_device(y, dx, dg, db)
    assert int(nbt) == 1 and np.all(rm == 0.5) and np.all(rv == 2.0)


def test_out_overlapping_running_stats_on_the_device(rng):
    x = cuda.to_device(rng.standard_normal((4, 3)).astype(np.float32))
    buf = cuda.device_array((4, 3), np.float32)
    rm = buf.reshape(12)[:3]
    with pytest.raises(ValueError, match="out must not overlap gamma, beta or the running statistics"):
        numbabn.batch_norm_forward(x, running_mean=rm, running_var=cuda.to_device(np.ones(3, np.float32)), out=buf)
    rv = cuda.to_device(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="running_mean and running_var must not overlap"):
        numbabn.batch_norm_forward(x, running_mean=rv, running_var=rv)


# ---------------------------------------------------------------- errors


def _device_kwargs(kw):
    """The same call with every NumPy array argument on the device."""
    return {k: cuda.to_device(v) if isinstance(v, np.ndarray) and v.ndim and k != "num_batches_tracked"
            else v for k, v in kw.items()}


# Host out= arrays with device input are a different error (see test_device_errors).
ERROR_CASES = [case + (False,) for case in BAD_FORWARD] + \
    [case + (True,) for case in BAD_FORWARD if "out" not in case[0]]


@pytest.mark.parametrize("override,exc,fragment,on_device", ERROR_CASES)
def test_forward_errors_match_cpu_and_leave_state_untouched(override, exc, fragment, on_device):
    """Every CPU validation error, with backend='cuda' (NumPy input) or device input."""
    X = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    rm, rv, nbt = np.arange(3, dtype=np.float32), np.full(3, 2, np.float32), np.array(5, np.int64)
    kw = dict(x=X, gamma=np.ones(3, np.float32), beta=np.zeros(3, np.float32),
              running_mean=rm, running_var=rv, num_batches_tracked=nbt, backend="cuda")
    kw.update(override)
    if on_device:
        kw = _device_kwargs(kw)
    x = kw.pop("x")
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        numbabn.batch_norm_forward(x, kw.pop("gamma"), kw.pop("beta"), **kw)
    if on_device and kw.get("running_mean") is not None and override.get("running_mean") is None:
        np.testing.assert_array_equal(host(kw["running_mean"]), np.arange(3))
    np.testing.assert_array_equal(rm, np.arange(3))
    np.testing.assert_array_equal(rv, 2)
    assert int(nbt) == 5


def test_device_errors():
    x = cuda.to_device(np.ones((4, 3, 5), np.float32))
    rm = cuda.to_device(np.arange(3, dtype=np.float32))
    rv = cuda.to_device(np.ones(3, np.float32))
    with pytest.raises(TypeError, match="gamma must have dtype float32"):
        numbabn.batch_norm_forward(x, cuda.to_device(np.ones(3)), running_mean=rm, running_var=rv)
    with pytest.raises(ValueError, match=r"beta must have shape \(3,\)"):
        numbabn.batch_norm_forward(x, None, cuda.to_device(np.ones(4, np.float32)),
                                   running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(host(rm), np.arange(3))
    with pytest.raises(TypeError, match="x is a GPU array .* but backend='cpu'"):
        numbabn.batch_norm_forward(x, backend="cpu")
    with pytest.raises(TypeError, match="x is a GPU array"):
        numbabn.moments(x, backend="cpu")
    with pytest.raises(ValueError, match="non-contiguous GPU array"):
        numbabn.batch_norm_forward(cuda.to_device(np.ones((4, 6, 5), np.float32))[:, ::2])
    with pytest.raises(TypeError, match="out must be a GPU array"):
        numbabn.batch_norm_forward(x, out=np.empty((4, 3, 5), np.float32))
    with pytest.raises(ValueError, match="out must not overlap x"):
        numbabn.batch_norm_forward(x, out=x)
    with pytest.raises(TypeError, match="out must have dtype float32"):
        numbabn.batch_norm_forward(x, out=cuda.device_array((4, 3, 5)))
    _, ctx = numbabn.batch_norm_forward(x)
    with pytest.raises(ValueError, match="dy must have the forward input's shape"):
        numbabn.batch_norm_backward(cuda.to_device(np.ones((4, 3, 6), np.float32)), ctx)
    with pytest.raises(TypeError, match="dy must have the forward input's dtype float32"):
        numbabn.batch_norm_backward(cuda.to_device(np.ones((4, 3, 5))), ctx)
    with pytest.raises(ValueError, match="out must not overlap dy or the forward input"):
        numbabn.batch_norm_backward(x, ctx, out=x)


# ---------------------------------------------------------------- environment


def test_importing_numbabn_does_not_import_numba_cuda():
    code = ("import sys, numbabn, numbabn.functional; numbabn.batch_norm_forward; "
            "assert not any(m.startswith('numba.cuda') for m in sys.modules), 'numba.cuda imported'")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_cuda_available_and_bandwidth():
    if SIMULATOR:
        assert numbabn.cuda_available() is False
        with pytest.raises(RuntimeError, match="simulator"):
            K.device_copy_bandwidth(1 << 20)
    else:
        assert numbabn.cuda_available() is True
        assert K.device_copy_bandwidth(1 << 24, repeats=3) > 0


@pytest.mark.skipif(SIMULATOR, reason="foreign __cuda_array_interface__ objects need a real GPU")
def test_cuda_array_interface_zero_copy(rng):
    class Foreign:    # what CuPy / PyTorch expose
        def __init__(self, d):
            self.__cuda_array_interface__ = d.__cuda_array_interface__

    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    d_out = cuda.device_array(x.shape, np.float32)
    y, _ = numbabn.batch_norm_forward(Foreign(cuda.to_device(x)), out=Foreign(d_out))
    np.testing.assert_allclose(d_out.copy_to_host(), R.forward(x)[0], **TOL[np.float32])


@pytest.mark.parametrize("on_device", [False, True])
def test_eval_with_float64_statistics_for_float32_input(on_device):
    """Eval mode accepts float64 running statistics for float32 input on the GPU too
    (host or device arrays), with the CPU backend's result."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 3, 5)) + 1e6).astype(np.float32)
    rm, rv = x.astype(np.float64).mean(axis=(0, 2)), np.full(3, 0.8)
    expected, _ = numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False)
    stats = (cuda.to_device(rm), cuda.to_device(rv)) if on_device else (rm, rv)
    y, _ = numbabn.batch_norm_forward(cuda.to_device(x) if on_device else x, running_mean=stats[0],
                                      running_var=stats[1], training=False, backend="cuda")
    np.testing.assert_allclose(host(y), expected, rtol=0, atol=2e-6)
    ref = (x.astype(np.float64) - rm[None, :, None]) / np.sqrt(0.8 + 1e-5)
    assert np.abs(host(y) - ref).max() < 2e-6


# ---------------------------------------------------------------- synchronized statistics


def _ranks_functional(xs, dys, gamma, beta, axis, device, act):
    """Synchronized BN over the ranks' batches ``xs`` through the functional hooks, one
    rank after the other in this process: merged moments into every forward, and the
    backward's sums combined over ranks (first each rank's own sums are collected,
    then every rank's backward receives their total). Returns per-rank outputs,
    input gradients, parameter gradients and the running statistics of rank 0."""
    put = cuda.to_device if device else (lambda a: a)
    merged = functools.reduce(numbabn.merge_moments, [numbabn.moments(put(x), axis=axis) for x in xs])
    rm, rv = np.zeros(gamma.size, gamma.dtype), np.ones(gamma.size, gamma.dtype)
    outs, ctxs = [], []
    for rank, x in enumerate(xs):
        # Every rank updates its own running statistics; rank 0's are compared.
        run = (rm, rv) if rank == 0 else (rm.copy(), rv.copy())
        y, ctx = numbabn.batch_norm_forward(put(x), gamma, beta, running_mean=run[0], running_var=run[1],
                                            axis=axis, activation=act, moments=merged)
        outs.append(host(y))
        ctxs.append(ctx)
    local = []
    for dy, ctx in zip(dys, ctxs):
        numbabn.batch_norm_backward(put(dy), ctx, allreduce=lambda s: local.append(s.copy()) or s)
    total = np.sum(local, axis=0)
    grads = [numbabn.batch_norm_backward(put(dy), ctx, allreduce=lambda s: total) for dy, ctx in zip(dys, ctxs)]
    return outs, [host(g[0]) for g in grads], [(host(g[1]), host(g[2])) for g in grads], (rm, rv)


@pytest.mark.parametrize("sizes", [(3, 5), (4, 0, 2)])
@pytest.mark.parametrize("shape_tail,axis", [((3, 4), 1), ((5,), 1), ((2, 3), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_moments_and_allreduce_on_device_match_the_cpu_path(rng, sizes, shape_tail, axis, dtype):
    """moments= and allreduce= on device arrays, 2 and 3 ranks (one of them empty):
    outputs, input gradients, parameter gradients and running statistics as on the CPU."""
    xs = [(rng.standard_normal((n,) + shape_tail) * 2 + 1).astype(dtype) for n in sizes]
    dys = [rng.standard_normal(x.shape).astype(dtype) for x in xs]
    C = shape_tail[0] if axis == 1 else shape_tail[-1]
    gamma, beta = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    gpu = _ranks_functional(xs, dys, gamma, beta, axis, True, "relu")
    cpu = _ranks_functional(xs, dys, gamma, beta, axis, False, "relu")
    tol = CPU_TOL[dtype]
    for a, b in zip(gpu[0] + gpu[1], cpu[0] + cpu[1]):
        np.testing.assert_allclose(a, b, **tol)
    for (ga, ba), (gb, bb) in zip(gpu[2], cpu[2]):
        np.testing.assert_allclose(ga, gb, **tol)
        np.testing.assert_allclose(ba, bb, **tol)
    np.testing.assert_allclose(gpu[3][0], cpu[3][0], **tol)
    np.testing.assert_allclose(gpu[3][1], cpu[3][1], **tol)
    # and the CPU path is batch norm of the concatenated batch
    ref_y, ctx = numbabn.batch_norm_forward(np.concatenate(xs), gamma, beta, axis=axis, activation="relu")
    np.testing.assert_allclose(np.concatenate(cpu[0]), ref_y, **tol)
    ref_dx, ref_dg, ref_db = numbabn.batch_norm_backward(np.concatenate(dys), ctx)
    np.testing.assert_allclose(np.concatenate(cpu[1]), ref_dx, **tol)
    np.testing.assert_allclose(cpu[2][0][0], ref_dg, **tol)


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("kind,shape", [("1d", (4, 3, 2)), ("2d", (2, 3, 2, 3))])
def test_sync_batch_norm_takes_device_arrays(rng, ranks, kind, shape):
    """SyncBatchNorm1d/2d on device input, ``ranks`` ranks holding identical batches
    (a mirror communicator): the CPU layer on the concatenated copies."""
    from numbabn.distributed import SyncBatchNorm1d, SyncBatchNorm2d

    from .test_distributed_mpi import MirrorComm

    cls, ref_cls = (SyncBatchNorm1d, numbabn.layers.BatchNorm1d) if kind == "1d" else \
        (SyncBatchNorm2d, numbabn.layers.BatchNorm2d)
    x = (rng.standard_normal(shape) + 2).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    sync = cls(3, activation="relu", comm=MirrorComm(ranks))._randomize_state(rng)
    ref = ref_cls(3, activation="relu")
    ref.load_state_dict(sync.state_dict())
    y = sync.forward(cuda.to_device(x))
    dx = sync.backward(cuda.to_device(dy))
    assert_device(y, dx)
    n = len(x)
    np.testing.assert_allclose(host(y), ref.forward(np.concatenate([x] * ranks))[:n], **CPU_TOL[np.float32])
    np.testing.assert_allclose(host(dx), ref.backward(np.concatenate([dy] * ranks))[:n], **CPU_TOL[np.float32])
    assert isinstance(sync.weight.grad, np.ndarray)
    np.testing.assert_allclose(sync.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sync.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
    for key, value in ref.state_dict().items():
        np.testing.assert_allclose(sync.state_dict()[key], value, rtol=1e-5, err_msg=key)
