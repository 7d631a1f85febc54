"""CPU kernels through the public functional API vs the float64 reference."""
import numpy as np
import pytest

import numbabn
from numbabn import config
from numbabn.kernels import reference as R

from .helpers import CASES, TOL, central_diff, make_inputs, param_dtype

DTYPES = [np.float32, np.float64, np.float16]


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("relu", [False, True])
@pytest.mark.parametrize("affine", [True, False])
def test_train_forward_backward_vs_reference(rng, shape, axis, dtype, relu, affine):
    x, gamma, beta = make_inputs(rng, shape, axis, dtype)
    if not affine:
        gamma = beta = None
    act = "relu" if relu else None
    y, ctx = numbabn.batch_norm_forward(x, gamma, beta, axis=axis, activation=act)
    y_ref, mean, var = R.forward(x, gamma, beta, axis=axis, relu=relu)
    assert y.dtype == dtype and y.shape == shape
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    np.testing.assert_allclose(ctx.mean, mean, rtol=1e-12, atol=1e-12)

    dy = rng.standard_normal(shape).astype(dtype)
    dx, dgamma, dbeta = numbabn.batch_norm_backward(dy, ctx)
    dx_ref, dg_ref, db_ref = R.backward(dy, x, gamma, beta, axis=axis, relu=relu)
    assert dx.dtype == dtype and dx.shape == shape
    np.testing.assert_allclose(dx, dx_ref, **TOL[dtype])
    if affine:
        assert dgamma.dtype == param_dtype(dtype) and dbeta.dtype == param_dtype(dtype)
        np.testing.assert_allclose(dgamma, dg_ref, **TOL[dtype])
        np.testing.assert_allclose(dbeta, db_ref, **TOL[dtype])
    else:
        assert dgamma is None and dbeta is None


@pytest.mark.parametrize("shape,axis", CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [False, True])
def test_eval_forward_backward_vs_reference(rng, shape, axis, dtype, relu):
    x, gamma, beta = make_inputs(rng, shape, axis, dtype)
    C = shape[axis]
    rm = rng.standard_normal(C).astype(dtype)
    rv = rng.uniform(0.5, 2.0, C).astype(dtype)
    rm0, rv0 = rm.copy(), rv.copy()
    act = "relu" if relu else None
    y, ctx = numbabn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv,
                                        training=False, axis=axis, activation=act)
    y_ref, _, _ = R.forward(x, gamma, beta, mean=rm, var=rv, axis=axis, relu=relu)
    np.testing.assert_allclose(y, y_ref, **TOL[dtype])
    np.testing.assert_array_equal(rm, rm0)     # eval never touches running stats
    np.testing.assert_array_equal(rv, rv0)
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dg, db = numbabn.batch_norm_backward(dy, ctx)
    dx_ref, dg_ref, db_ref = R.backward(dy, x, gamma, beta, mean=rm, var=rv, axis=axis,
                                        relu=relu, training=False)
    np.testing.assert_allclose(dx, dx_ref, **TOL[dtype])
    np.testing.assert_allclose(dg, dg_ref, **TOL[dtype])
    np.testing.assert_allclose(db, db_ref, **TOL[dtype])


@pytest.mark.parametrize("shape,axis", [((3, 2, 4), 1), ((5, 3), 1), ((2, 3, 2, 2), -1)])
@pytest.mark.parametrize("training", [True, False])
def test_backward_matches_finite_differences(rng, shape, axis, training):
    x, gamma, beta = make_inputs(rng, shape, axis, np.float64)
    C = shape[axis]
    rm, rv = rng.standard_normal(C), rng.uniform(0.5, 2, C)
    w = rng.standard_normal(shape)     # loss = sum(w * y)
    kw = dict(axis=axis, training=training)
    if not training:
        kw.update(running_mean=rm, running_var=rv)

    def loss(x_=None, g_=None, b_=None):
        y, _ = numbabn.batch_norm_forward(x if x_ is None else x_, gamma if g_ is None else g_,
                                          beta if b_ is None else b_, **kw)
        return float((w * y).sum())

    _, ctx = numbabn.batch_norm_forward(x, gamma, beta, **kw)
    dx, dg, db = numbabn.batch_norm_backward(w, ctx)
    np.testing.assert_allclose(dx, central_diff(lambda v: loss(x_=v), x.copy()), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dg, central_diff(lambda v: loss(g_=v), gamma.copy()), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(db, central_diff(lambda v: loss(b_=v), beta.copy()), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("momentum", [0.1, 0.5, None])
@pytest.mark.parametrize("shape,axis", [((6, 3, 4), 1), ((8, 5), 1), ((3, 2, 2, 4), -1)])
def test_running_stats_over_steps(rng, momentum, shape, axis):
    C = shape[axis]
    rm, rv = np.zeros(C), np.ones(C)
    nbt = np.zeros((), np.int64)
    ref_m, ref_v = rm.copy(), rv.copy()
    for step in range(1, 5):
        x, _, _ = make_inputs(rng, shape, axis, np.float64, loc=step)
        numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, num_batches_tracked=nbt,
                                   momentum=momentum, axis=axis)
        count, mean, m2 = R.moments(x, axis)
        mom = momentum if momentum is not None else 1.0 / step
        ref_m, ref_v = R.update_running(ref_m, ref_v, mean, m2 / count, count, mom)
        assert int(nbt) == step
    np.testing.assert_allclose(rm, ref_m, rtol=1e-12)
    np.testing.assert_allclose(rv, ref_v, rtol=1e-12)
    if momentum is None:
        # Cumulative average == plain mean of the batch means (Ioffe & Szegedy, Alg. 2).
        assert np.all(np.isfinite(rm))


@pytest.mark.parametrize("loc", [1e4, 1e5, 1e6])
@pytest.mark.parametrize("shape,axis", [((16, 3, 50), 1), ((200, 4), 1), ((10, 5, 4, 3), -1)])
def test_large_mean_float32_within_rounding(rng, loc, shape, axis):
    """|mean| >> std: a naive E[x^2]-E[x]^2 in float32 would give garbage."""
    x, gamma, beta = make_inputs(rng, shape, axis, np.float32, loc=loc, scale=1.0)
    y, ctx = numbabn.batch_norm_forward(x, gamma, beta, axis=axis)
    y_ref, mean, var = R.forward(x, gamma, beta, axis=axis)   # float64 of the same float32 input
    # Within a few float32 ulps of the output (|y| = O(1..5)).
    np.testing.assert_allclose(y, y_ref, rtol=0, atol=4 * np.finfo(np.float32).eps * np.abs(y_ref).max())
    np.testing.assert_allclose(ctx.mean, mean, rtol=1e-14)
    np.testing.assert_allclose(1 / ctx.invstd**2 - 1e-5, var, rtol=1e-9)
    dy = rng.standard_normal(shape).astype(np.float32)
    dx, dg, db = numbabn.batch_norm_backward(dy, ctx)
    dx_ref, dg_ref, _ = R.backward(dy, x, gamma, beta, axis=axis)
    np.testing.assert_allclose(dx, dx_ref, rtol=1e-4, atol=1e-4)
    np.testing.assert_allclose(dg, dg_ref, rtol=1e-4, atol=1e-3)


def test_constant_channel_and_two_values(rng):
    x = np.ones((4, 2, 3), np.float32) * 7
    x[:, 1] = rng.standard_normal((4, 3))
    y, ctx = numbabn.batch_norm_forward(x)
    np.testing.assert_array_equal(y[:, 0], 0)            # var 0 -> x - mean = 0 exactly
    dx, _, _ = numbabn.batch_norm_backward(np.ones_like(x), ctx)
    assert np.all(np.isfinite(dx))
    x2 = np.array([[1.0, -3.0], [2.0, 5.0]])              # m = 2
    y2, _ = numbabn.batch_norm_forward(x2)
    np.testing.assert_allclose(y2, R.forward(x2)[0], rtol=1e-12)


def test_huge_c_tiny_m(rng):
    x = rng.standard_normal((2, 50_000)).astype(np.float32)
    y, ctx = numbabn.batch_norm_forward(x)
    np.testing.assert_allclose(y, R.forward(x)[0], atol=1e-3)   # m=2: y = +-1/sqrt(1+eps/var)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    dx, _, _ = numbabn.batch_norm_backward(dy, ctx)
    np.testing.assert_allclose(dx, R.backward(dy, x)[0], rtol=1e-3, atol=1e-2)


def test_multi_chunk_paths(rng, monkeypatch):
    """Small chunks force many chunks per channel, partial rows and ragged tails
    (channels-last blocks hold >= 256 rows, so those cases have > 256 rows)."""
    monkeypatch.setattr(config, "CHUNK", 7)
    for shape, axis in [((5, 3, 11), 1), ((600, 4), 1), ((40, 10, 3), -1), ((3, 2, 40), 1)]:
        x, g, b = make_inputs(rng, shape, axis, np.float64, loc=100.0)
        y, ctx = numbabn.batch_norm_forward(x, g, b, axis=axis, activation="relu")
        np.testing.assert_allclose(y, R.forward(x, g, b, axis=axis, relu=True)[0], rtol=1e-10, atol=1e-10)
        dy = rng.standard_normal(shape)
        dx, dg, db = numbabn.batch_norm_backward(dy, ctx)
        rdx, rdg, rdb = R.backward(dy, x, g, b, axis=axis, relu=True)
        np.testing.assert_allclose(dx, rdx, rtol=1e-9, atol=1e-10)
        np.testing.assert_allclose(dg, rdg, rtol=1e-9, atol=1e-10)
        m = numbabn.moments(x, axis=axis)
        count, mean, m2 = R.moments(x, axis)
        assert m.count == count
        np.testing.assert_allclose(m.mean, mean, rtol=1e-13)
        np.testing.assert_allclose(m.m2, m2, rtol=1e-11)


@pytest.mark.parametrize("shape,axis", [((8, 16, 300), 1), ((3000, 24), 1)])
def test_bit_identical_across_thread_counts(rng, shape, axis, monkeypatch):
    monkeypatch.setattr(config, "CHUNK", 512)   # many chunks, so threads really split the work
    x, g, b = make_inputs(rng, shape, axis, np.float32, loc=3.0)
    dy = rng.standard_normal(shape).astype(np.float32)
    monkeypatch.setattr(config, "SERIAL_MAX", 0)  # every size goes through the thread pool
    results = []
    for threads in (1, 2, 3, 7):   # more threads than CPUs is allowed (only oversubscribes)
        with numbabn.limit_threads(threads):
            y, ctx = numbabn.batch_norm_forward(x, g, b, axis=axis)
            results.append((y, ctx.mean, ctx.invstd) + numbabn.batch_norm_backward(dy, ctx))
    for other in results[1:]:
        for a, b_ in zip(results[0], other):
            assert np.array_equal(a, b_)


def test_layouts_agree_and_zero_copy(rng):
    x = rng.standard_normal((4, 5, 3, 3)).astype(np.float32)
    g = rng.standard_normal(5).astype(np.float32)
    y1, ctx1 = numbabn.batch_norm_forward(x, g)
    assert np.shares_memory(ctx1.x, x)                       # canonical view, no copy
    xl = np.ascontiguousarray(x.transpose(0, 2, 3, 1))       # NHWC copy
    y2, ctx2 = numbabn.batch_norm_forward(xl, g, axis=-1)
    assert ctx2.layout == "mc" and ctx1.layout == "ncl"
    np.testing.assert_allclose(y2.transpose(0, 3, 1, 2), y1, rtol=1e-6, atol=1e-6)
    # a non-contiguous NHWC view of the NCHW array gives the same numbers
    y3, _ = numbabn.batch_norm_forward(x.transpose(0, 2, 3, 1), g, axis=-1)
    np.testing.assert_allclose(y3, y2, rtol=1e-6, atol=1e-6)


def test_readonly_noncontiguous_and_out(rng):
    base = rng.standard_normal((6, 8, 10))
    x = base[:, ::2, 1::2]                                   # strided view
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


def test_float16_out(rng):
    x = rng.standard_normal((4, 3, 5)).astype(np.float16)
    out = np.empty_like(x)
    y, ctx = numbabn.batch_norm_forward(x, out=out)
    assert y is out and y.dtype == np.float16
    np.testing.assert_allclose(y, R.forward(x)[0], atol=3e-3)


def test_nan_propagates_only_in_its_channel():
    x = np.ones((4, 3, 2))
    x[:, 0] = np.arange(8).reshape(4, 2)
    x[:, 2] = np.arange(8).reshape(4, 2) * 2
    x[1, 0, 1] = np.nan
    y, ctx = numbabn.batch_norm_forward(x)
    assert np.all(np.isnan(y[:, 0]))
    assert np.all(np.isfinite(y[:, 1:]))
    assert np.isnan(ctx.mean[0]) and np.isfinite(ctx.mean[2])


def test_moments_merge_equals_concatenation(rng):
    a = rng.standard_normal((7, 3, 5)) + 1e3
    b = rng.standard_normal((4, 3, 5)) * 3 - 1e3
    m = numbabn.merge_moments(numbabn.moments(a), numbabn.moments(b))
    count, mean, m2 = R.moments(np.concatenate([a, b]), 1)
    assert m.count == count
    np.testing.assert_allclose(m.mean, mean, rtol=1e-13)
    np.testing.assert_allclose(m.m2, m2, rtol=1e-12)
    np.testing.assert_allclose(m.var(), m2 / count, rtol=1e-12)
    empty = numbabn.moments(np.empty((0, 3, 5)))
    assert empty.count == 0
    assert numbabn.merge_moments(empty, m) is m
    packed = numbabn.Moments.from_array(m.to_array())
    assert packed.count == m.count and np.array_equal(packed.mean, m.mean)


@pytest.mark.parametrize("shape,axis", [((9, 3, 4), 1), ((10, 5), 1), ((6, 2, 3, 4), -1)])
def test_sharded_batch_with_merged_moments_equals_whole_batch(rng, shape, axis):
    """What synchronized BN does: shards normalise with the merged moments and
    all-reduce the backward sums; the result equals BN over the whole batch."""
    x, g, b = make_inputs(rng, shape, axis, np.float64, loc=50.0)
    dy = rng.standard_normal(shape)
    C = shape[axis]
    shards = [slice(0, 4), slice(4, 4), slice(4, None)]        # includes an empty shard
    merged = numbabn.Moments.empty(C)
    for s in shards:
        merged = numbabn.merge_moments(merged, numbabn.moments(x[s], axis=axis))
    rm, rv = np.zeros(C), np.ones(C)
    y_full, ctx_full = numbabn.batch_norm_forward(x, g, b, running_mean=rm, running_var=rv, axis=axis)
    dx_full, dg_full, db_full = numbabn.batch_norm_backward(dy, ctx_full)

    ctxs, ys = [], []
    for s in shards:
        rm_s, rv_s = np.zeros(C), np.ones(C)
        y, ctx = numbabn.batch_norm_forward(x[s], g, b, running_mean=rm_s, running_var=rv_s, axis=axis,
                                            moments=merged)
        np.testing.assert_allclose(rm_s, rm, rtol=1e-12)
        np.testing.assert_allclose(rv_s, rv, rtol=1e-12)
        ys.append(y)
        ctxs.append(ctx)
    np.testing.assert_allclose(np.concatenate(ys), y_full, rtol=1e-12, atol=1e-12)
    # Pass 1 collects each shard's local sums; pass 2 hands every shard their total
    # (what an MPI Allreduce does when the ranks run concurrently).
    parts = []
    for s, ctx in zip(shards, ctxs):
        numbabn.batch_norm_backward(dy[s], ctx, allreduce=lambda v: parts.append(v.copy()) or v)
    assert len(parts) == 3 and np.all(parts[1] == 0)            # the empty shard adds nothing
    grads = [numbabn.batch_norm_backward(dy[s], ctx, allreduce=lambda v: sum(parts))
             for s, ctx in zip(shards, ctxs)]
    np.testing.assert_allclose(np.concatenate([gr[0] for gr in grads]), dx_full, rtol=1e-10, atol=1e-12)
    for dx, dg, db in grads:
        np.testing.assert_allclose(dg, dg_full, rtol=1e-10)
        np.testing.assert_allclose(db, db_full, rtol=1e-10)


def test_moments_and_allreduce_errors():
    x = np.ones((4, 3))
    with pytest.raises(TypeError, match="moments must be a numbabn.Moments"):
        numbabn.batch_norm_forward(x, moments=(1, 2))
    with pytest.raises(ValueError, match="moments must have 3 channels"):
        numbabn.batch_norm_forward(x, moments=numbabn.Moments.empty(2))
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):   # one value in all
        numbabn.batch_norm_forward(np.ones((0, 3)), moments=numbabn.Moments(1, np.zeros(3), np.zeros(3)))
    with pytest.raises(ValueError, match="needs training=True"):
        numbabn.batch_norm_forward(x, running_mean=np.zeros(3), running_var=np.ones(3), training=False,
                                   moments=numbabn.moments(x))
    _, ctx = numbabn.batch_norm_forward(x + np.arange(4)[:, None])
    with pytest.raises(TypeError, match="allreduce must be a callable"):
        numbabn.batch_norm_backward(x, ctx, allreduce=3)
    with pytest.raises(ValueError, match="allreduce must return an array of shape"):
        numbabn.batch_norm_backward(x, ctx, allreduce=lambda s: s[0])


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
    for a, b_ in zip(*results):
        assert np.array_equal(a, b_)
