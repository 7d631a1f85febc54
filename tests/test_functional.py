"""CPU-only behaviour of the functional API: bit-identical results across thread
counts and on the serial path for small inputs, zero-copy canonical layouts,
read-only / strided host input and host ``out`` arrays.

The numbers of both backends (reference, finite differences, running statistics,
moments, synchronized statistics) are checked in test_numerics.py.
"""

import numpy as np
import pytest

import numbabn
from numbabn import config
from numbabn.kernels import reference as R

from .helpers import make_inputs, param_dtype


# (900, 1024): wide channels-last rows, whose reductions take four runs a pass;
# (40, 24, 16): short rows, whose reductions walk tiles (2 samples x 16 channels here)
@pytest.mark.parametrize("shape,axis", [((8, 16, 300), 1), ((3000, 24), 1), ((900, 1024), 1), ((40, 24, 16), 1)])
def test_bit_identical_across_thread_counts(rng, shape, axis, monkeypatch):
    monkeypatch.setattr(config, "CHUNK", 512)  # many chunks, so threads really split the work
    x, g, b = make_inputs(rng, shape, axis, np.float32, loc=3.0)
    dy = rng.standard_normal(shape).astype(np.float32)
    monkeypatch.setattr(config, "SERIAL_MAX", 0)  # every size goes through the thread pool
    results = []
    for threads in (1, 2, 3, 7):  # more threads than CPUs is allowed (only oversubscribes)
        with numbabn.limit_threads(threads):
            y, ctx = numbabn.batch_norm_forward(x, g, b, axis=axis)
            results.append((y, ctx.mean, ctx.invstd) + numbabn.batch_norm_backward(dy, ctx))
    for other in results[1:]:
        for a, b_ in zip(results[0], other, strict=True):
            assert np.array_equal(a, b_)


def _block_endings(C):
    """Row counts M for (M, C) channels-last statistics that end a block in every way
    the kernel's loops meet: a partial run, one run, one pair of runs, a pair and a
    run, a pair, a run and a partial one, four runs, four and three, and several
    blocks with a ragged last one (a run is F = _fold(C) rows, a block >= 256 rows)."""
    from numbabn.kernels import cpu

    F = cpu._fold.py_func(C)
    ends = {2, max(2, F - 1), F, 2 * F, 3 * F, 3 * F + 1, 4 * F, 7 * F, 7 * F + 1}
    return sorted(ends | {256 + 5 * F + 1, 256 + 7 * F, 3 * 256 + 2 * F + 1})


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("C", [3, 64, 100, 1024, 2048])
def test_channels_last_statistics_for_every_block_ending(rng, C, dtype):
    """Channels-last statistics sum runs of F rows four at a time (long runs: float32
    C >= 1024, 16-bit C >= 2048), then two at a time (float32, 16-bit), then one at a
    time: every way a block ends gives the float64 reference's moments."""
    for M in _block_endings(C):
        x = (rng.standard_normal((M, C)) * 3 + 50).astype(dtype)
        m = numbabn.moments(x, axis=-1)
        count, mean, m2 = R.moments(x, axis=-1)
        assert m.count == count
        np.testing.assert_allclose(m.mean, mean, rtol=1e-12, err_msg=f"M={M}")
        np.testing.assert_allclose(m.m2, m2, rtol=1e-9, err_msg=f"M={M}")


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_channels_last_gradient_sums_for_every_block_ending(rng, dtype, relu):
    """The backward's channels-last sums take long runs (C >= 1024 values) four at a
    time, then one at a time: dx, dgamma and dbeta match the float64 reference for
    every way a block ends, with and without the fused ReLU's mask."""
    C = 1024
    tol = dict(rtol=1e-10, atol=1e-10) if dtype == np.float64 else dict(rtol=2e-5, atol=2e-5)
    for M in [m for m in _block_endings(C) if m > 1]:  # training needs 2 values a channel
        x = (rng.standard_normal((M, C)) * 3 + 50).astype(dtype)
        dy = rng.standard_normal((M, C)).astype(dtype)
        g = (1 + 0.3 * rng.standard_normal(C)).astype(dtype)
        b = rng.standard_normal(C).astype(dtype)
        _, ctx = numbabn.batch_norm_forward(x, g, b, axis=-1, activation="relu" if relu else None)
        got = numbabn.batch_norm_backward(dy, ctx)
        want = R.backward(dy, x, g, b, axis=-1, relu=relu)
        for name, v, w in zip(("dx", "dgamma", "dbeta"), got, want, strict=True):
            s = np.abs(w).max() + 1
            np.testing.assert_allclose(v / s, w / s, **tol, err_msg=f"{name}, M={M}")


def test_layouts_agree_and_zero_copy(rng):
    x = rng.standard_normal((4, 5, 3, 3)).astype(np.float32)
    g = rng.standard_normal(5).astype(np.float32)
    y1, ctx1 = numbabn.batch_norm_forward(x, g)
    assert np.shares_memory(ctx1.x, x)  # canonical view, no copy
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))  # NHWC copy
    y2, ctx2 = numbabn.batch_norm_forward(xl, g, axis=-1)
    assert ctx2.layout == "mc" and ctx1.layout == "ncl"
    np.testing.assert_allclose(y2.transpose(0, 3, 1, 2), y1, rtol=1e-6, atol=1e-6)
    # a non-contiguous NHWC view of the NCHW array gives the same numbers
    y3, _ = numbabn.batch_norm_forward(x.transpose(0, 2, 3, 1), g, axis=-1)
    np.testing.assert_allclose(y3, y2, rtol=1e-6, atol=1e-6)


def test_readonly_noncontiguous_and_out(rng):
    base = rng.standard_normal((6, 8, 10))
    x = base[:, ::2, 1::2]  # strided view
    x_ro = np.array(x)
    x_ro.setflags(write=False)
    y1, ctx = numbabn.batch_norm_forward(x)
    y2, ctx2 = numbabn.batch_norm_forward(x_ro)
    np.testing.assert_array_equal(y1, y2)
    np.testing.assert_allclose(y1, R.forward(x)[0], rtol=1e-12, atol=1e-12)
    out = np.empty_like(x_ro)
    y3, _ = numbabn.batch_norm_forward(x_ro, out=out)
    assert y3 is out
    np.testing.assert_array_equal(out, y1)
    dy = np.ones_like(x_ro)
    dy.setflags(write=False)
    dxo = np.empty_like(x_ro)
    dx, _, _ = numbabn.batch_norm_backward(dy, ctx2, out=dxo)
    assert dx is dxo
    np.testing.assert_allclose(dx, R.backward(dy, x)[0], atol=1e-12)


def test_serial_path_for_small_inputs_is_bit_identical(rng, monkeypatch):
    """Small inputs run on the calling thread; the result must not depend on it,
    and the thread setting is left alone."""
    x, g, b = make_inputs(rng, (64, 3, 50), 1, np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    threads = numbabn.get_num_threads()
    results = []
    for serial_max in (0, 10**9):
        monkeypatch.setattr(config, "SERIAL_MAX", serial_max)
        y, ctx = numbabn.batch_norm_forward(x, g, b)
        results.append((y,) + numbabn.batch_norm_backward(dy, ctx))
        assert numbabn.get_num_threads() == threads
    for a, b_ in zip(*results, strict=True):
        assert np.array_equal(a, b_)


def _step_on_short_rows(rng, shape, dtype, relu, residual):
    """Training forward (running statistics), backward, eval: every array it makes."""
    x, g, b = make_inputs(rng, shape, 1, dtype, loc=3.0)
    dy = rng.standard_normal(shape).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype) if residual else None
    pdt = param_dtype(dtype)
    rm, rv = np.zeros(shape[1], pdt), np.ones(shape[1], pdt)
    act = "relu" if relu else None
    y, ctx = numbabn.batch_norm_forward(x, g, b, running_mean=rm, running_var=rv, activation=act, residual=r)
    grads = numbabn.batch_norm_backward(dy, ctx)
    ye, ctxe = numbabn.batch_norm_forward(x, g, b, running_mean=rm, running_var=rv, training=False, activation=act)
    return (y, *grads, rm, rv, ye, *numbabn.batch_norm_backward(dy, ctxe))


@pytest.mark.parametrize("dtype", [np.float32, np.float64, np.float16])
@pytest.mark.parametrize("relu,residual", [(False, False), (True, False), (True, True), (False, True)])
@pytest.mark.parametrize("shape", [(6, 5, 4, 4), (9, 40, 7, 7), (3, 2, 31), (3, 2, 63), (5, 3, 1)])
def test_short_rows_give_the_ncl_kernels_bits(rng, monkeypatch, shape, dtype, relu, residual):
    """NCL rows shorter than SHORT_ROW (normalise) or SHORT_ROW_DX (dx) run those passes
    on the channels-last kernels over the (N, C*L) view with repeated coefficients:
    the same element helpers on the same coefficient values, so every output is the
    NCL kernels' bit for bit, on one thread and split among several."""
    from numbabn.kernels import cpu_driver

    monkeypatch.setattr(config, "CHUNK", 64)  # many blocks, so the threads split the work
    monkeypatch.setattr(config, "SERIAL_MAX", 0)
    seed = rng.integers(2**32)
    canonical = np.empty((shape[0], shape[1], int(np.prod(shape[2:]))), dtype)
    results = []
    L = canonical.shape[2]
    short = (cpu_driver.SHORT_ROW, cpu_driver.SHORT_ROW_DX)
    for shorts, threads in (((0, 0), 1), (short, 1), (short, 3)):
        monkeypatch.setattr(cpu_driver, "SHORT_ROW", shorts[0])
        monkeypatch.setattr(cpu_driver, "SHORT_ROW_DX", shorts[1])
        monkeypatch.setattr(cpu_driver, "_PLANS", {})  # plans are memoised per shape
        plan = cpu_driver.plan(canonical.view(np.int16) if dtype == np.float16 else canonical, "ncl", config.CHUNK)
        assert plan[3].repeat == (L if L < shorts[0] else 0) and plan[4].repeat == (L if L < shorts[1] else 0)
        with numbabn.limit_threads(threads):
            results.append(_step_on_short_rows(np.random.default_rng(seed), shape, dtype, relu, residual))
    for other in results[1:]:
        for a, b_ in zip(results[0], other, strict=True):
            assert (a is None and b_ is None) or np.array_equal(a, b_, equal_nan=True)


@pytest.mark.parametrize("shape", [(1, 1), (7, 3), (300, 64), (5, 5000), (4096, 1024), (3, 16384), (2, 20000)])
@pytest.mark.parametrize("chunk", [1, 64, 16384])
def test_channels_last_element_blocks_cover_every_row_once(shape, chunk):
    """mc_apply_blocks (the driver's count, in Python) and _mc_apply_rows (the element-wise
    kernels' rows per block) describe the same grid: the blocks cover rows 0..M once."""
    from numbabn.kernels import cpu

    blocks = cpu.mc_apply_blocks(shape, chunk)
    R = cpu._mc_apply_rows.py_func(shape, chunk)
    assert R >= 1 and (blocks - 1) * R < shape[0] <= blocks * R
