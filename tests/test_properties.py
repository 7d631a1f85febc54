"""Property tests over random shapes, axes and dtypes (hypothesis)."""

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

import numbabn
from numbabn.kernels import reference as R

from .helpers import TOL


@st.composite
def problems(draw):
    ndim = draw(st.integers(2, 4))
    shape = tuple(draw(st.lists(st.integers(1, 6), min_size=ndim, max_size=ndim)))
    axis = draw(st.integers(-ndim, ndim - 1))
    if np.prod(shape) // shape[axis] < 2:  # training needs m >= 2
        shape = (shape[0] + 1,) + shape[1:] if axis % ndim != 0 else shape[:1] + (shape[1] + 1,) + shape[2:]
    dtype = draw(st.sampled_from([np.float32, np.float64]))
    seed = draw(st.integers(0, 2**31 - 1))
    loc = draw(st.sampled_from([0.0, 10.0, -1e3]))
    relu = draw(st.booleans())
    return shape, axis, dtype, seed, loc, relu


@settings(max_examples=60, deadline=None)
@given(problems())
def test_forward_backward_match_reference(problem):
    shape, axis, dtype, seed, loc, relu = problem
    rng = np.random.default_rng(seed)
    C = shape[axis]
    x = (rng.standard_normal(shape) + loc).astype(dtype)
    g = rng.uniform(0.5, 2, C).astype(dtype)
    b = rng.standard_normal(C).astype(dtype)
    act = "relu" if relu else None
    y, ctx = numbabn.batch_norm_forward(x, g, b, axis=axis, activation=act)
    np.testing.assert_allclose(y, R.forward(x, g, b, axis=axis, relu=relu)[0], **TOL[dtype])
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dg, db = numbabn.batch_norm_backward(dy, ctx)
    rdx, rdg, rdb = R.backward(dy, x, g, b, axis=axis, relu=relu)
    # dx = gamma*invstd/m * (m*g - dbeta - xhat*dgamma) is a difference of terms of
    # size gamma*invstd*|g|; with m = 2 it cancels almost exactly (dx ~ eps/var), so
    # rounding is relative to those terms, not to dx itself.
    invstd = 1.0 / np.sqrt(R.forward(x, axis=axis)[2] + 1e-5)
    scale = max(1.0, float(np.abs(dy).max() * np.max(np.abs(g) * invstd)))
    np.testing.assert_allclose(dx, rdx, rtol=TOL[dtype]["rtol"], atol=TOL[dtype]["atol"] * scale)
    np.testing.assert_allclose(db, rdb, **TOL[dtype])
    # normalised output: per channel mean 0 and var ~1 before the affine (no relu)
    if not relu:
        xhat = (np.moveaxis(y.astype(np.float64), axis, -1) - b) / g
        assert np.allclose(xhat.reshape(-1, C).mean(0), 0, atol=1e-3)


@settings(max_examples=40, deadline=None)
@given(st.integers(1, 40), st.integers(1, 40), st.integers(1, 5), st.integers(0, 2**31 - 1))
def test_merge_is_exact_and_associative(n1, n2, C, seed):
    rng = np.random.default_rng(seed)
    a = rng.standard_normal((n1, C)) * 5 + 1e4
    b = rng.standard_normal((n2, C)) - 1e4
    c = rng.standard_normal((3, C))
    ma, mb, mc = (numbabn.moments(v) for v in (a, b, c))
    left = numbabn.merge_moments(numbabn.merge_moments(ma, mb), mc)
    right = numbabn.merge_moments(ma, numbabn.merge_moments(mb, mc))
    count, mean, m2 = R.moments(np.concatenate([a, b, c]), 1)
    for m in (left, right):
        assert m.count == count
        np.testing.assert_allclose(m.mean, mean, rtol=1e-12, atol=1e-9)
        np.testing.assert_allclose(m.m2, m2, rtol=1e-10)
