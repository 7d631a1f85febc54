"""Numbers of the functional API on both backends, written once.

Every test takes the ``backend`` fixture (tests/conftest.py): "cpu", then "cuda"
(Numba's CUDA simulator without a GPU, with 32 threads per block so that several
blocks, tail tiles and the cross-block merge run). ``backend.put`` moves inputs to
the backend's device and ``backend.host`` brings results back; results are
compared with the float64 reference (:mod:`numbabn.kernels.reference`) or finite
differences. The simulator runs one Python thread per CUDA thread, so CUDA cases
stay small (``by_backend`` gives them their own shapes where the CPU's are big).

Backend-specific behaviour lives elsewhere: CPU threads, chunking and host-array
semantics in test_functional.py, device arrays and host/device mixing in
test_cuda_arrays.py, CUDA launch geometry in test_cuda_launch.py.
"""

import functools

import numpy as np
import pytest

import numbabn
from numbabn.kernels import reference as R

from .helpers import CASES, TOL, by_backend, central_diff, make_inputs, param_dtype

DTYPES = [np.float32, np.float64, np.float16]
# CUDA vs CPU: both round once from float64, but reduce in different orders.
CPU_TOL = {
    np.float64: dict(rtol=1e-12, atol=1e-12),
    np.float32: dict(rtol=3e-6, atol=3e-6),
    np.float16: dict(rtol=2e-3, atol=2e-3),
}


def _cpu_agrees(backend, dtype, got, x, dy, gamma, beta, **kw):
    """On CUDA: forward and backward results equal the CPU backend's to rounding."""
    if not backend.device:
        return
    y_cpu, ctx_cpu = numbabn.batch_norm_forward(x, gamma, beta, **kw)
    want = (y_cpu,) + numbabn.batch_norm_backward(dy, ctx_cpu)
    for a, b in zip(got, want, strict=True):
        if b is not None:
            np.testing.assert_allclose(backend.host(a), b, **CPU_TOL[dtype])


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
# CUDA (slow on the simulator) keeps the three combinations it has always run:
# ReLU off and no gamma/beta each occur in one of them.
@by_backend(
    "relu,affine",
    cpu=[(False, True), (True, True), (False, False), (True, False)],
    cuda=[(False, True), (True, True), (True, False)],
)
def test_train_forward_backward_vs_reference(backend, rng, shape, axis, dtype, relu, affine):
    x, gamma, beta = make_inputs(rng, shape, axis, dtype)
    if not affine:
        gamma = beta = None
    act = "relu" if relu else None
    dy = rng.standard_normal(shape).astype(dtype)
    y, ctx = numbabn.batch_norm_forward(backend.put(x), gamma, beta, axis=axis, activation=act)
    dx, dgamma, dbeta = numbabn.batch_norm_backward(backend.put(dy), ctx)
    assert ctx.backend == backend.name
    backend.assert_native(y, dx)
    assert y.dtype == dtype and y.shape == shape and dx.dtype == dtype and dx.shape == shape

    y_ref, mean, _ = R.forward(x, gamma, beta, axis=axis, relu=relu)
    dx_ref, dg_ref, db_ref = R.backward(dy, x, gamma, beta, axis=axis, relu=relu)
    np.testing.assert_allclose(backend.host(y), y_ref, **TOL[dtype])
    np.testing.assert_allclose(backend.host(ctx.mean), mean, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(backend.host(dx), dx_ref, **TOL[dtype])
    if affine:
        backend.assert_native(dgamma, dbeta)
        assert dgamma.dtype == param_dtype(dtype) and dbeta.dtype == param_dtype(dtype)
        np.testing.assert_allclose(backend.host(dgamma), dg_ref, **TOL[dtype])
        np.testing.assert_allclose(backend.host(dbeta), db_ref, **TOL[dtype])
    else:
        assert dgamma is None and dbeta is None
    _cpu_agrees(backend, dtype, (y, dx, dgamma, dbeta), x, dy, gamma, beta, axis=axis, activation=act)


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_eval_forward_backward_vs_reference(backend, rng, shape, axis, dtype, relu):
    x, gamma, beta = make_inputs(rng, shape, axis, dtype)
    C = shape[axis]
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2.0, C).astype(dtype)
    d_rm, d_rv = backend.put(rm.copy()), backend.put(rv.copy())
    act = "relu" if relu else None
    # gamma on the backend's side, beta from the host: both are accepted.
    y, ctx = numbabn.batch_norm_forward(
        backend.put(x),
        backend.put(gamma),
        beta,
        running_mean=d_rm,
        running_var=d_rv,
        training=False,
        axis=axis,
        activation=act,
    )
    y_ref, _, _ = R.forward(x, gamma, beta, mean=rm, var=rv, axis=axis, relu=relu)
    np.testing.assert_allclose(backend.host(y), y_ref, **TOL[dtype])
    np.testing.assert_array_equal(backend.host(d_rm), rm)  # eval never touches running stats
    np.testing.assert_array_equal(backend.host(d_rv), rv)
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dg, db = numbabn.batch_norm_backward(backend.put(dy), ctx)
    dx_ref, dg_ref, db_ref = R.backward(dy, x, gamma, beta, mean=rm, var=rv, axis=axis, relu=relu, training=False)
    np.testing.assert_allclose(backend.host(dx), dx_ref, **TOL[dtype])
    np.testing.assert_allclose(backend.host(dg), dg_ref, **TOL[dtype])
    np.testing.assert_allclose(backend.host(db), db_ref, **TOL[dtype])


@pytest.mark.parametrize("shape,axis", [((3, 2, 4), 1), ((5, 3), 1), ((2, 3, 2, 2), -1)])
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_finite_differences(backend, rng, shape, axis, training):
    x, gamma, beta = make_inputs(rng, shape, axis, np.float64)
    C = shape[axis]
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    w = rng.standard_normal(shape)  # loss = sum(w * y)
    kw = dict(axis=axis, training=training)
    if not training:
        kw.update(running_mean=rm, running_var=rv)

    def loss(x_=None, g_=None, b_=None):
        y, _ = numbabn.batch_norm_forward(
            backend.put(x if x_ is None else x_), gamma if g_ is None else g_, beta if b_ is None else b_, **kw
        )
        return float((w * backend.host(y)).sum())

    _, ctx = numbabn.batch_norm_forward(backend.put(x), gamma, beta, **kw)
    dx, dg, db = (backend.host(a) for a in numbabn.batch_norm_backward(backend.put(w), ctx))
    np.testing.assert_allclose(dx, central_diff(lambda v: loss(x_=v), x.copy()), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dg, central_diff(lambda v: loss(g_=v), gamma.copy()), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db, central_diff(lambda v: loss(b_=v), beta.copy()), rtol=1e-5, atol=1e-7)


RUNNING_SHAPES = [((6, 3, 4), 1), ((8, 5), 1), ((3, 2, 2, 4), -1)]


@by_backend(
    "momentum,shape,axis,stats_on_device",
    cpu=[(mom, s, a, False) for mom in (0.1, 0.5, None) for s, a in RUNNING_SHAPES],
    cuda=[(mom, s, a, dev) for mom in (0.1, 0.5, None) for s, a in RUNNING_SHAPES for dev in (False, True)],
)
def test_running_stats_over_steps(backend, rng, momentum, shape, axis, stats_on_device):
    """Training steps update the running statistics as PyTorch does; on CUDA the
    statistics may be host arrays (copied back in place) or device arrays."""
    C = shape[axis]
    rm, rv = np.zeros(C), np.ones(C)
    stats = (backend.put(rm), backend.put(rv)) if stats_on_device else (rm, rv)
    nbt = np.zeros((), np.int64)
    ref_m, ref_v = rm.copy(), rv.copy()
    batch_means, batch_vars = [], []
    for step in range(1, 5):
        x, _, _ = make_inputs(rng, shape, axis, np.float64, loc=step)
        numbabn.batch_norm_forward(
            backend.put(x),
            running_mean=stats[0],
            running_var=stats[1],
            num_batches_tracked=nbt,
            momentum=momentum,
            axis=axis,
        )
        count, mean, m2 = R.moments(x, axis)
        batch_means.append(mean)
        batch_vars.append(m2 / (count - 1))
        mom = momentum if momentum is not None else 1.0 / step
        ref_m, ref_v = R.update_running(ref_m, ref_v, mean, m2 / count, count, mom)
        assert int(nbt) == step
    got_m, got_v = backend.host(stats[0]), backend.host(stats[1])
    if stats_on_device:  # the host arrays were only the initial values
        np.testing.assert_array_equal(rm, 0)
        np.testing.assert_array_equal(rv, 1)
    np.testing.assert_allclose(got_m, ref_m, rtol=1e-12)
    np.testing.assert_allclose(got_v, ref_v, rtol=1e-12)
    if momentum is None:
        # Cumulative average == plain mean of the batch means (and of the unbiased
        # batch variances): Ioffe & Szegedy, Alg. 2; the first step replaces the initial values.
        np.testing.assert_allclose(got_m, np.mean(batch_means, axis=0), rtol=1e-12, atol=1e-15)
        np.testing.assert_allclose(got_v, np.mean(batch_vars, axis=0), rtol=1e-12)


@by_backend(
    "loc,shape,axis",
    cpu=[(loc, s, a) for loc in (1e4, 1e5, 1e6) for s, a in [((16, 3, 50), 1), ((200, 4), 1), ((10, 5, 4, 3), -1)]],
    cuda=[(1e4, s, a) for s, a in [((8, 3, 40), 1), ((200, 4), 1), ((6, 5, 4, 3), -1)]],
)
def test_large_mean_float32_within_rounding(backend, rng, loc, shape, axis):
    """|mean| >> std: a naive E[x^2]-E[x]^2 in float32 would give garbage."""
    x, gamma, beta = make_inputs(rng, shape, axis, np.float32, loc=loc, scale=1.0)
    y, ctx = numbabn.batch_norm_forward(backend.put(x), gamma, beta, axis=axis)
    y_ref, mean, var = R.forward(x, gamma, beta, axis=axis)  # float64 of the same float32 input
    # Within a few float32 ulps of the output (|y| = O(1..5)).
    np.testing.assert_allclose(backend.host(y), y_ref, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(y_ref).max())
    np.testing.assert_allclose(backend.host(ctx.mean), mean, rtol=1e-14)
    np.testing.assert_allclose(1 / backend.host(ctx.invstd) ** 2 - 1e-5, var, rtol=1e-9)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dg, db = numbabn.batch_norm_backward(backend.put(dy), ctx)
    dx_ref, dg_ref, _ = R.backward(dy, x, gamma, beta, axis=axis)
    np.testing.assert_allclose(backend.host(dx), dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(backend.host(dg), dg_ref, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("loc", [1e4, 1e8])
def test_large_mean_float64_eval_subtracts_first(backend, loc):
    """Eval with |running_mean| >> std in float64: y = a*(x - mean) + beta keeps the
    output to rounding; a*x + (beta - a*mean) cancels (the CUDA kernels did: 2.9e-12
    off at a mean of 1e4, 2.6e-8 at 1e8, against 1e-16 on the CPU)."""
    x = loc + np.arange(12.0).reshape(6, 2) / 7
    rm, rv = x.mean(0), x.var(0)
    gamma, beta = np.array([1.5, 0.5]), np.array([0.25, -1.0])
    y, _ = numbabn.batch_norm_forward(backend.put(x), gamma, beta, running_mean=rm, running_var=rv, training=False)
    ref = gamma * (x - rm) / np.sqrt(rv + 1e-5) + beta
    np.testing.assert_allclose(backend.host(y), ref, rtol=0, atol=8 * np.finfo(np.float64).eps)


def test_constant_channel_and_two_values(backend, rng):
    x = np.ones((4, 2, 3), np.float32) * 7
    x[:, 1] = rng.standard_normal((4, 3))
    y, ctx = numbabn.batch_norm_forward(backend.put(x))
    np.testing.assert_array_equal(backend.host(y)[:, 0], 0)  # var 0 -> x - mean = 0 exactly
    dx, _, _ = numbabn.batch_norm_backward(backend.put(np.ones_like(x)), ctx)
    assert np.all(np.isfinite(backend.host(dx)))
    x2 = np.array([[1.0, -3.0], [2.0, 5.0]])  # m = 2
    y2, _ = numbabn.batch_norm_forward(backend.put(x2))
    np.testing.assert_allclose(backend.host(y2), R.forward(x2)[0], rtol=1e-12)


@by_backend("C", cpu=[50_000], cuda=[70])
def test_many_channels_tiny_m(backend, rng, C):
    """Two values per channel and many channels (on CUDA: several tiles of channels)."""
    x = rng.standard_normal((2, C)).astype(np.float32)
    y, ctx = numbabn.batch_norm_forward(backend.put(x))
    np.testing.assert_allclose(backend.host(y), R.forward(x)[0], atol=1e-3)  # m=2: y = +-1/sqrt(1+eps/var)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, _, _ = numbabn.batch_norm_backward(backend.put(dy), ctx)
    np.testing.assert_allclose(backend.host(dx), R.backward(dy, x)[0], rtol=1e-3, atol=1e-2)


# Shapes that, with the work split finely (backend.force_partitions), give many
# chunks per channel, partial rows and ragged tails on the CPU (channels-last blocks
# hold >= 256 rows, so those cases have > 256 rows); and on CUDA at 32 threads per
# block split a channel over several blocks, pack several channels per block, or
# leave a tail tile of channels (test_cuda_launch.py checks those plans).
CPU_PARTITIONED = [((5, 3, 11), 1), ((600, 4), 1), ((40, 10, 3), -1), ((3, 2, 40), 1)]
CUDA_PARTITIONED = [((4, 2, 300), 1), ((700, 3), 1), ((40, 37), 1), ((3, 45, 5), 1)]


@by_backend("shape,axis", cpu=CPU_PARTITIONED, cuda=CUDA_PARTITIONED)
def test_partitioned_paths(backend, rng, monkeypatch, shape, axis):
    backend.force_partitions(monkeypatch)
    x, g, b = make_inputs(rng, shape, axis, np.float64, loc=100.0)
    y, ctx = numbabn.batch_norm_forward(backend.put(x), g, b, axis=axis, activation="relu")
    np.testing.assert_allclose(backend.host(y), R.forward(x, g, b, axis=axis, relu=True)[0], rtol=1e-10, atol=1e-10)
    dy = rng.standard_normal(shape)
    dx, dg, db = numbabn.batch_norm_backward(backend.put(dy), ctx)
    rdx, rdg, rdb = R.backward(dy, x, g, b, axis=axis, relu=True)
    np.testing.assert_allclose(backend.host(dx), rdx, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(backend.host(dg), rdg, rtol=1e-9, atol=1e-10)
    np.testing.assert_allclose(backend.host(db), rdb, rtol=1e-9, atol=1e-10)
    m = numbabn.moments(backend.put(x), axis=axis)
    count, mean, m2 = R.moments(x, axis)
    assert m.count == count and isinstance(m.mean, np.ndarray)  # moments are host arrays
    np.testing.assert_allclose(m.mean, mean, rtol=1e-13)
    np.testing.assert_allclose(m.m2, m2, rtol=1e-11)


@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_out_receives_result(backend, rng, dtype):
    x, g, b = make_inputs(rng, (6, 3, 5), 1, dtype)
    out = backend.empty(x.shape, dtype)
    y, ctx = numbabn.batch_norm_forward(backend.put(x), g, b, out=out)
    assert y is out and y.dtype == dtype
    np.testing.assert_allclose(backend.host(out), R.forward(x, g, b)[0], **TOL[dtype])
    dx_out = backend.empty(x.shape, dtype)
    dx, _, _ = numbabn.batch_norm_backward(backend.put(np.ones_like(x)), ctx, out=dx_out)
    assert dx is dx_out
    np.testing.assert_allclose(backend.host(dx), R.backward(np.ones_like(x), x, g, b)[0], **TOL[dtype])


def test_nan_propagates_only_in_its_channel(backend):
    x = np.ones((4, 3, 2))
    x[:, 0] = np.arange(8).reshape(4, 2)
    x[:, 2] = np.arange(8).reshape(4, 2) * 2
    x[1, 0, 1] = np.nan
    y, ctx = numbabn.batch_norm_forward(backend.put(x))
    y, mean = backend.host(y), backend.host(ctx.mean)
    assert np.all(np.isnan(y[:, 0]))
    assert np.all(np.isfinite(y[:, 1:]))
    assert np.isnan(mean[0]) and np.isfinite(mean[2])


@pytest.mark.parametrize("shape,axis", [((4, 3, 5), 1), ((20, 3), 1), ((2, 5, 3), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")  # the simulator's dgamma sum: 0*inf
def test_eval_backward_of_nonfinite_input_is_finite(backend, rng, shape, axis, dtype, relu):
    """Eval mode: dx = gamma*invstd*g does not depend on x (as in PyTorch), so inf,
    -inf and NaN inputs give a finite dx: dy*gamma*invstd, or 0 where a fused ReLU's
    output is <= 0 (a NaN output passes the gradient, as PyTorch's ReLU backward does)."""
    C = shape[axis]
    x = rng.standard_normal(shape).astype(dtype)
    flat = x.reshape(-1)
    flat[[0, 7, 11]] = [np.inf, -np.inf, np.nan]
    dy = rng.standard_normal(shape).astype(dtype)
    g = (1 + 0.3 * rng.standard_normal(C)).astype(dtype)
    rm, rv = rng.standard_normal(C).astype(dtype), (1 + rng.random(C)).astype(dtype)
    act = "relu" if relu else None
    y, ctx = numbabn.batch_norm_forward(
        backend.put(x), g, None, running_mean=rm, running_var=rv, training=False, axis=axis, activation=act
    )
    dx = backend.host(numbabn.batch_norm_backward(backend.put(dy), ctx)[0])
    shp = [1] * x.ndim
    shp[axis] = C
    scale = (g.astype(np.float64) / np.sqrt(rv.astype(np.float64) + 1e-5)).reshape(shp)
    mask = ~(backend.host(y) <= 0) if relu else np.ones(shape, bool)
    want = np.where(mask, dy, 0) * scale
    assert np.all(np.isfinite(dx))
    np.testing.assert_allclose(dx, want, **TOL[dtype])


def _with_infinities(x, axis):
    """x with channel 0 +inf at its first value (a block's shift), 1 +inf in the
    middle, 2 -inf at its last value, 3 both signs, 4 a NaN; channels 5.. finite."""
    v = np.moveaxis(x, axis, -1)  # a view, channels last
    m = v.size // v.shape[-1]

    def at(k, c):  # the k-th value of channel c in x's own order of values
        return (*np.unravel_index(k, v.shape[:-1]), c)

    v[at(0, 0)] = np.inf
    v[at(m // 2, 1)] = np.inf
    v[at(m - 1, 2)] = -np.inf
    v[at(1, 3)], v[at(m - 2, 3)] = np.inf, -np.inf
    v[at(m // 3, 4)] = np.nan
    return x


@by_backend(
    "shape,axis",
    cpu=[((5, 7, 11), 1), ((600, 7), 1), ((40, 3, 7), -1)],
    cuda=[((4, 7, 300), 1), ((700, 7), 1)],
)
@pytest.mark.filterwarnings("ignore:invalid value:RuntimeWarning")
def test_infinite_values_give_pytorch_statistics(backend, rng, monkeypatch, shape, axis):
    """PyTorch's batch statistics of a channel holding +inf are mean +inf and var
    NaN (running_mean +inf, running_var NaN, the channel's output NaN); -inf alike;
    both signs or a NaN: mean NaN. Wherever the infinity sits: at the first value of a
    block (the block's shift), in a later block (the merge), on many blocks
    (partitioned); the finite channels are untouched."""
    backend.force_partitions(monkeypatch)
    x = _with_infinities(rng.standard_normal(shape), axis)
    C = shape[axis]
    rm, rv = np.zeros(C), np.ones(C)
    y, ctx = numbabn.batch_norm_forward(backend.put(x), running_mean=rm, running_var=rv, axis=axis)
    want_mean = np.array([np.inf, np.inf, -np.inf, np.nan, np.nan])
    np.testing.assert_array_equal(backend.host(ctx.mean)[:5], want_mean)
    np.testing.assert_array_equal(rm[:5], want_mean * 0.1)
    assert np.all(np.isnan(rv[:5])) and np.all(np.isnan(backend.host(ctx.invstd)[:5]))
    yv = np.moveaxis(backend.host(y), axis, -1)
    assert np.all(np.isnan(yv[..., :5]))
    finite = np.moveaxis(np.moveaxis(x, axis, -1)[..., 5:], -1, axis)
    ref = R.forward(finite, axis=axis)[0]
    np.testing.assert_allclose(yv[..., 5:], np.moveaxis(ref, axis, -1), rtol=1e-10, atol=1e-10)
    m = numbabn.moments(backend.put(x), axis=axis)
    np.testing.assert_array_equal(m.mean[:5], want_mean)
    assert np.all(np.isnan(m.m2[:5])) and np.all(np.isfinite(m.m2[5:]))
    # merged from two shards, the infinite one first or last
    half = shape[0] // 2
    for a, b in [(x[:half], x[half:]), (x[half:], x[:half])]:
        merged = numbabn.merge_moments(
            numbabn.moments(backend.put(a), axis=axis), numbabn.moments(backend.put(b), axis=axis)
        )
        np.testing.assert_array_equal(merged.mean[:5], want_mean)
        assert np.all(np.isnan(merged.m2[:5]))
        np.testing.assert_allclose(merged.mean[5:], m.mean[5:], rtol=1e-12, atol=1e-12)


def test_moments_merge_equals_concatenation(backend, rng):
    a = rng.standard_normal((7, 3, 5)) + 1e3
    b = rng.standard_normal((4, 3, 5)) * 3 - 1e3
    m = numbabn.merge_moments(numbabn.moments(backend.put(a)), numbabn.moments(backend.put(b)))
    count, mean, m2 = R.moments(np.concatenate([a, b]), 1)
    assert m.count == count
    np.testing.assert_allclose(m.mean, mean, rtol=1e-13)
    np.testing.assert_allclose(m.m2, m2, rtol=1e-12)
    np.testing.assert_allclose(m.var(), m2 / count, rtol=1e-12)
    for empty_shape, axis in [((0, 3, 5), 1), ((0, 3), 1)]:
        empty = numbabn.moments(backend.put(np.empty(empty_shape)), axis=axis)
        assert empty.count == 0 and empty.channels == 3
    assert numbabn.merge_moments(empty, m) is m
    packed = numbabn.Moments.from_array(m.to_array())
    assert packed.count == m.count and np.array_equal(packed.mean, m.mean)


@pytest.mark.parametrize("shape,axis", [((9, 3, 4), 1), ((10, 5), 1), ((6, 2, 3, 4), -1)])
def test_sharded_batch_with_merged_moments_equals_whole_batch(backend, rng, shape, axis):
    """What synchronized BN does: shards normalise with the merged moments and
    all-reduce the backward sums; the result equals BN over the whole batch."""
    x, g, b = make_inputs(rng, shape, axis, np.float64, loc=50.0)
    dy = rng.standard_normal(shape)
    C = shape[axis]
    shards = [slice(0, 4), slice(4, 4), slice(4, None)]  # includes an empty shard
    merged = numbabn.Moments.empty(C)
    for s in shards:
        merged = numbabn.merge_moments(merged, numbabn.moments(backend.put(x[s]), axis=axis))
    rm, rv = np.zeros(C), np.ones(C)
    y_full, ctx_full = numbabn.batch_norm_forward(x, g, b, running_mean=rm, running_var=rv, axis=axis)
    dx_full, dg_full, db_full = numbabn.batch_norm_backward(dy, ctx_full)
    np.testing.assert_allclose(y_full, R.forward(x, g, b, axis=axis)[0], **TOL[np.float64])

    ctxs, ys = [], []
    for s in shards:
        rm_s, rv_s = np.zeros(C), np.ones(C)
        y, ctx = numbabn.batch_norm_forward(
            backend.put(x[s]), g, b, running_mean=rm_s, running_var=rv_s, axis=axis, moments=merged
        )
        np.testing.assert_allclose(rm_s, rm, rtol=1e-12)
        np.testing.assert_allclose(rv_s, rv, rtol=1e-12)
        ys.append(backend.host(y))
        ctxs.append(ctx)
    np.testing.assert_allclose(np.concatenate(ys), y_full, rtol=1e-12, atol=1e-12)
    # Pass 1 collects each shard's local sums; pass 2 hands every shard their total
    # (what an MPI Allreduce does when the ranks run concurrently).
    parts = []
    for s, ctx in zip(shards, ctxs, strict=True):
        numbabn.batch_norm_backward(backend.put(dy[s]), ctx, allreduce=lambda v: parts.append(v.copy()) or v)
    assert len(parts) == 3 and np.all(parts[1] == 0)  # the empty shard adds nothing
    grads = [
        [backend.host(a) for a in numbabn.batch_norm_backward(backend.put(dy[s]), ctx, allreduce=lambda v: sum(parts))]
        for s, ctx in zip(shards, ctxs, strict=True)
    ]
    np.testing.assert_allclose(np.concatenate([gr[0] for gr in grads]), dx_full, rtol=1e-10, atol=1e-12)
    for _dx, dg, db in grads:
        np.testing.assert_allclose(dg, dg_full, rtol=1e-10)
        np.testing.assert_allclose(db, db_full, rtol=1e-10)


def _ranks_functional(backend, xs, dys, gamma, beta, axis, act):
    """Synchronized BN over the ranks' batches ``xs`` through the functional hooks, one
    rank after the other in this process: merged moments into every forward, and the
    backward's sums combined over ranks (first each rank's own sums are collected,
    then every rank's backward receives their total). Returns per-rank outputs,
    input gradients, parameter gradients and the running statistics of rank 0."""
    put, host = backend.put, backend.host
    merged = functools.reduce(numbabn.merge_moments, [numbabn.moments(put(x), axis=axis) for x in xs])
    rm, rv = np.zeros(gamma.size, gamma.dtype), np.ones(gamma.size, gamma.dtype)
    outs, ctxs = [], []
    for rank, x in enumerate(xs):
        # Every rank updates its own running statistics; rank 0's are compared.
        run = (rm, rv) if rank == 0 else (rm.copy(), rv.copy())
        y, ctx = numbabn.batch_norm_forward(
            put(x), gamma, beta, running_mean=run[0], running_var=run[1], axis=axis, activation=act, moments=merged
        )
        outs.append(host(y))
        ctxs.append(ctx)
    local = []
    for dy, ctx in zip(dys, ctxs, strict=True):
        numbabn.batch_norm_backward(put(dy), ctx, allreduce=lambda s: local.append(s.copy()) or s)
    total = np.sum(local, axis=0)
    grads = [
        numbabn.batch_norm_backward(put(dy), ctx, allreduce=lambda s: total) for dy, ctx in zip(dys, ctxs, strict=True)
    ]
    return outs, [host(g[0]) for g in grads], [(host(g[1]), host(g[2])) for g in grads], (rm, rv)


@pytest.mark.parametrize("sizes", [(3, 5), (4, 0, 2)])
@pytest.mark.parametrize("shape_tail,axis", [((3, 4), 1), ((5,), 1), ((2, 3), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_ranks_with_moments_and_allreduce_match_the_whole_batch(backend, rng, sizes, shape_tail, axis, dtype):
    """moments= and allreduce= over 2 and 3 ranks (one of them empty), with ReLU:
    outputs, input gradients, parameter gradients and running statistics are those
    of batch norm over the concatenated batch (and, on CUDA, the CPU path's)."""
    xs = [(rng.standard_normal((n,) + shape_tail) * 2 + 1).astype(dtype) for n in sizes]
    dys = [rng.standard_normal(x.shape).astype(dtype) for x in xs]
    C = shape_tail[0] if axis == 1 else shape_tail[-1]
    gamma, beta = rng.uniform(0.5, 1.5, C).astype(dtype), rng.standard_normal(C).astype(dtype)
    got = _ranks_functional(backend, xs, dys, gamma, beta, axis, "relu")
    # the reference: the float64 formulas on the concatenated batch, and the CPU path on it
    x_all, dy_all = np.concatenate(xs), np.concatenate(dys)
    np.testing.assert_allclose(
        np.concatenate(got[0]), R.forward(x_all, gamma, beta, axis=axis, relu=True)[0], **TOL[dtype]
    )
    ref_dx, ref_dg, ref_db = R.backward(dy_all, x_all, gamma, beta, axis=axis, relu=True)
    np.testing.assert_allclose(np.concatenate(got[1]), ref_dx, **TOL[dtype])
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    y_all, ctx = numbabn.batch_norm_forward(
        x_all, gamma, beta, running_mean=rm, running_var=rv, axis=axis, activation="relu"
    )
    dx_all, dg_all, db_all = numbabn.batch_norm_backward(dy_all, ctx)
    tol = CPU_TOL[dtype]
    np.testing.assert_allclose(np.concatenate(got[0]), y_all, **tol)
    np.testing.assert_allclose(np.concatenate(got[1]), dx_all, **tol)
    for dg, db in got[2]:
        np.testing.assert_allclose(dg, ref_dg, **TOL[dtype])
        np.testing.assert_allclose(db, ref_db, **TOL[dtype])
        np.testing.assert_allclose(dg, dg_all, **tol)
        np.testing.assert_allclose(db, db_all, **tol)
    np.testing.assert_allclose(got[3][0], rm, **tol)
    np.testing.assert_allclose(got[3][1], rv, **tol)


@pytest.mark.parametrize("shape,axis", [((0, 3), 1), ((0, 3, 4), 1), ((4, 3, 0), 1), ((2, 0, 3), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_empty_batch(backend, shape, axis, dtype):
    """No values per channel: empty output and dx, zero dgamma/dbeta, running
    statistics kept, the counter counting the training call; no kernel launch."""
    pdt = param_dtype(dtype)
    rm, rv, nbt = np.full(3, 0.5, pdt), np.full(3, 2.0, pdt), np.zeros((), np.int64)
    x = np.empty(shape, dtype)
    for training in (True, False):
        y, ctx = numbabn.batch_norm_forward(
            backend.put(x),
            np.ones(3, pdt),
            np.zeros(3, pdt),
            running_mean=rm,
            running_var=rv,
            num_batches_tracked=nbt,
            training=training,
            axis=axis,
        )
        dx, dg, db = numbabn.batch_norm_backward(backend.put(x), ctx)
        assert backend.host(y).shape == backend.host(dx).shape == shape
        assert backend.host(y).dtype == backend.host(dx).dtype == dtype
        assert np.all(backend.host(dg) == 0) and np.all(backend.host(db) == 0) and backend.host(dg).dtype == pdt
        backend.assert_native(y, dx, dg, db)
    assert int(nbt) == 1 and np.all(rm == 0.5) and np.all(rv == 2.0)


def test_eval_with_float64_statistics_for_float32_input(backend):
    """Eval mode accepts float64 running statistics for float32 input (on CUDA as
    host or device arrays), with the float64 formula's result to float32 rounding."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 3, 5)) + 1e6).astype(np.float32)
    rm, rv = x.astype(np.float64).mean(axis=(0, 2)), np.full(3, 0.8)
    ref = (x.astype(np.float64) - rm[None, :, None]) / np.sqrt(0.8 + 1e-5)
    expected, _ = numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False)
    assert np.abs(expected - ref).max() < 2e-6
    y, _ = numbabn.batch_norm_forward(
        backend.put(x), running_mean=backend.put(rm), running_var=backend.put(rv), training=False
    )
    np.testing.assert_allclose(backend.host(y), expected, rtol=0, atol=2e-6)
    assert np.abs(backend.host(y) - ref).max() < 2e-6
    if backend.name == "cpu":  # byte order is a host array's property
        big, _ = numbabn.batch_norm_forward(
            x, running_mean=rm.astype(">f8"), running_var=rv.astype(">f8"), training=False
        )
        np.testing.assert_array_equal(big, expected)
    # one float64 and one float32 statistic: numbabn's error, not Numba's typing error
    for mean, var in ((rm, rv.astype(np.float32)), (rm.astype(np.float32), rv)):
        with pytest.raises(TypeError, match="running_mean and running_var must have one dtype, float32 .* or float64"):
            numbabn.batch_norm_forward(
                backend.put(x), running_mean=backend.put(mean), running_var=backend.put(var), training=False
            )


def test_moments_and_allreduce_errors(backend):
    x = backend.put(np.ones((4, 3)))
    with pytest.raises(TypeError, match="moments must be a numbabn.Moments"):
        numbabn.batch_norm_forward(x, moments=(1, 2))
    with pytest.raises(ValueError, match="moments must have 3 channels"):
        numbabn.batch_norm_forward(x, moments=numbabn.Moments.empty(2))
    # one value in all (an empty rank of SyncBatchNorm): the message says the count is the moments'
    with pytest.raises(
        ValueError, match=r"Expected more than 1 value per channel .*\(0, 3\) \(1 value per channel in the whole"
    ):
        numbabn.batch_norm_forward(backend.put(np.ones((0, 3))), moments=numbabn.Moments(1, np.zeros(3), np.zeros(3)))
    with pytest.raises(ValueError, match="needs training=True"):
        numbabn.batch_norm_forward(
            x, running_mean=np.zeros(3), running_var=np.ones(3), training=False, moments=numbabn.moments(x)
        )
    _, ctx = numbabn.batch_norm_forward(backend.put(np.ones((4, 3)) + np.arange(4)[:, None]))
    with pytest.raises(TypeError, match="allreduce must be a callable"):
        numbabn.batch_norm_backward(x, ctx, allreduce=3)
    with pytest.raises(ValueError, match="allreduce must return an array of shape"):
        numbabn.batch_norm_backward(x, ctx, allreduce=lambda s: s[0])
