"""BatchNormTransformer's ``sample_weight``: weighted statistics against the float64
reference and against repeated samples, exact partial_fit merges of weighted
batches, StandardScaler parity, pipelines, Dask input with NumPy or Dask weights, and
refused weights that change nothing. (scikit-learn's own sample-weight checks run in
test_sklearn_transformer.py.)"""

import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.linear_model import LogisticRegression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from numbabn.sklearn import BatchNormTransformer


def _data(rng, n=200, c=5, dtype=np.float64):
    """|mean| ~ 1e3 with unit-scale spread: a one-pass E[x^2] - E[x]^2 would cancel."""
    return (1e3 + rng.normal(0.0, 1.0, (n, c)) * rng.uniform(0.5, 3.0, c)).astype(dtype)


def _reference(X, w):
    """Weighted mean and biased variance in float64 (two passes)."""
    X = X.astype(np.float64)
    mean = np.average(X, axis=0, weights=w)
    return mean, np.average((X - mean) ** 2, axis=0, weights=w)


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weighted_statistics_match_the_float64_reference(rng, dtype):
    X = _data(rng, dtype=dtype)
    w = rng.uniform(0.0, 4.0, X.shape[0])
    w[::7] = 0.0
    t = BatchNormTransformer().fit(X, sample_weight=w)
    mean, var = _reference(X, w)
    assert_allclose(t.mean_, mean, rtol=1e-14)
    assert_allclose(t.var_, var, rtol=1e-11)
    assert t.n_samples_seen_ == pytest.approx(w.sum(), rel=1e-15) and isinstance(t.n_samples_seen_, float)
    Y = t.transform(X)
    assert Y.dtype == dtype
    tol = 1e-4 if dtype == np.float32 else 1e-10
    assert_allclose(Y, (X - mean) / np.sqrt(var + t.eps), rtol=tol, atol=tol)


@pytest.mark.parametrize("momentum", [None, 0.3])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_integer_weights_equal_repeated_samples(rng, momentum, dtype):
    X = _data(rng, n=60, dtype=dtype)
    k = rng.integers(0, 4, X.shape[0])  # 0 leaves a sample out
    weighted = BatchNormTransformer(momentum=momentum).fit(X, sample_weight=k)
    repeated = BatchNormTransformer(momentum=momentum).fit(np.repeat(X, k, axis=0))
    assert weighted.n_samples_seen_ == repeated.n_samples_seen_ == k.sum()
    assert_allclose(weighted.mean_, repeated.mean_, rtol=1e-14)
    assert_allclose(weighted.var_, repeated.var_, rtol=1e-9)


def test_weighted_partial_fits_equal_one_weighted_fit(rng):
    X = _data(rng, n=301)
    w = rng.uniform(0.0, 2.0, X.shape[0])
    inc = BatchNormTransformer()
    for a, b in [(0, 1), (1, 40), (40, 41), (41, 300), (300, 301)]:
        inc.partial_fit(X[a:b], sample_weight=w[a:b])
    full = BatchNormTransformer().fit(X, sample_weight=w)
    assert inc.n_samples_seen_ == pytest.approx(full.n_samples_seen_, rel=1e-14)
    assert_allclose(inc.mean_, full.mean_, rtol=1e-14)
    assert_allclose(inc.var_, full.var_, rtol=1e-10)


def test_unweighted_and_weighted_batches_mix(rng):
    """An unweighted batch counts 1 per sample; n_samples_seen_ turns float as in StandardScaler."""
    X1, X2 = _data(rng, n=50), _data(rng, n=30)
    w2 = rng.uniform(0.5, 2.0, 30)
    t = BatchNormTransformer().partial_fit(X1)
    assert t.n_samples_seen_ == 50 and isinstance(t.n_samples_seen_, int)
    t.partial_fit(X2, sample_weight=w2)
    w = np.concatenate([np.ones(50), w2])
    mean, var = _reference(np.vstack([X1, X2]), w)
    assert_allclose(t.mean_, mean, rtol=1e-14)
    assert_allclose(t.var_, var, rtol=1e-10)
    s = StandardScaler().partial_fit(X1).partial_fit(X2, sample_weight=w2)
    assert t.n_samples_seen_ == pytest.approx(s.n_samples_seen_, rel=1e-14)
    assert_allclose(t.mean_, s.mean_, rtol=1e-13)
    assert_allclose(t.var_, s.var_, rtol=1e-9)


def test_matches_standard_scaler_with_weights(rng):
    X = _data(rng)
    w = rng.uniform(0.0, 3.0, X.shape[0])
    t = BatchNormTransformer(eps=1e-300).fit(X, sample_weight=w)
    s = StandardScaler().fit(X, sample_weight=w)
    assert_allclose(t.mean_, s.mean_, rtol=1e-13)
    assert_allclose(t.var_, s.var_, rtol=1e-9)
    assert_allclose(t.transform(X), s.transform(X), rtol=1e-8, atol=1e-8)


def test_a_scalar_weight_scales_the_count_only(rng):
    X = _data(rng)
    t = BatchNormTransformer().fit(X, sample_weight=2.5)
    u = BatchNormTransformer().fit(X)
    assert t.n_samples_seen_ == 2.5 * X.shape[0]
    assert_allclose(t.mean_, u.mean_, rtol=1e-14)
    assert_allclose(t.var_, u.var_, rtol=1e-11)


def test_momentum_step_uses_the_weighted_unbiased_variance(rng):
    X = _data(rng, n=20)
    w = rng.uniform(0.1, 1.0, 20)
    t = BatchNormTransformer(momentum=0.25).fit(X, sample_weight=w)
    W = w.sum()
    mean, var = _reference(X, w)
    assert_allclose(t.mean_, 0.75 * 0.0 + 0.25 * mean, rtol=1e-14)
    assert_allclose(t.var_, 0.75 * 1.0 + 0.25 * var * W / (W - 1.0), rtol=1e-11)


@pytest.mark.parametrize(
    "kwargs, bad, match",
    [
        ({}, "neg", "sample_weight must be >= 0"),
        ({}, "nan", "sample_weight must be finite"),
        ({}, "short", r"sample_weight.shape == \(9,\), expected \(10,\)"),
        ({}, "zeros", "sample_weight is all zero"),
        ({"momentum": 0.1}, "small", "weights summing to more than 1"),
    ],
)
def test_refused_weights_name_the_argument_and_change_nothing(rng, kwargs, bad, match):
    X = _data(rng, n=10)
    w = {
        "neg": np.r_[-1.0, np.ones(9)],
        "nan": np.r_[np.nan, np.ones(9)],
        "short": np.ones(9),
        "zeros": np.zeros(10),
        "small": np.full(10, 0.09),
    }[bad]
    fresh = BatchNormTransformer(**kwargs)
    before = pickle.dumps(fresh)
    with pytest.raises(ValueError, match=match):
        fresh.fit(X, sample_weight=w)
    assert pickle.dumps(fresh) == before  # no n_features_in_ left behind either
    fitted = BatchNormTransformer(**kwargs).fit(_data(rng, n=30), sample_weight=np.ones(30))
    before = pickle.dumps(fitted)
    with pytest.raises(ValueError, match=match):
        fitted.partial_fit(X, sample_weight=w)
    with pytest.raises(ValueError, match=match):
        fitted.fit(X, sample_weight=w)
    assert pickle.dumps(fitted) == before


def test_pipeline_routes_the_weights_to_the_transformer(rng):
    X = _data(rng)
    y = (X[:, 0] > np.median(X[:, 0])).astype(int)
    w = rng.uniform(0.0, 2.0, X.shape[0])
    pipe = make_pipeline(BatchNormTransformer(), LogisticRegression())
    pipe.fit(X, y, batchnormtransformer__sample_weight=w)
    mean, _ = _reference(X, w)
    assert_allclose(pipe[0].mean_, mean, rtol=1e-14)


@pytest.mark.parametrize("dask_weights", [False, True])
def test_dask_input_takes_weights_along_its_row_chunks(rng, dask_weights):
    da = pytest.importorskip("dask.array")
    Xn = _data(rng, n=40)
    w = rng.uniform(0.0, 2.0, 40)
    X = da.from_array(Xn, chunks=(7, 2))  # row and column chunks that do not divide evenly
    weights = da.from_array(w, chunks=11) if dask_weights else w
    t = BatchNormTransformer().fit(X, sample_weight=weights)
    ref = BatchNormTransformer().fit(Xn, sample_weight=w)
    assert t.n_samples_seen_ == pytest.approx(ref.n_samples_seen_, rel=1e-14)
    assert_allclose(t.mean_, ref.mean_, rtol=1e-14)
    assert_allclose(t.var_, ref.var_, rtol=1e-10)
    t.partial_fit(X, sample_weight=weights)  # the same data again: same statistics, twice the weight
    assert t.n_samples_seen_ == pytest.approx(2 * ref.n_samples_seen_, rel=1e-14)
    assert_allclose(t.mean_, ref.mean_, rtol=1e-13)
    assert_allclose(t.var_, ref.var_, rtol=1e-10)


def test_dask_weights_refused_when_computed_change_nothing(rng):
    da = pytest.importorskip("dask.array")
    X = da.from_array(_data(rng, n=40), chunks=(10, 5))
    bad = np.ones(40)
    bad[25] = -1.0
    nan = np.ones(40)
    nan[[5, 7]] = [np.nan, -2.0]
    for weights, match in [
        (da.from_array(bad, chunks=10), "sample_weight must be finite and >= 0, got -1.0 in a chunk of 10"),
        (da.from_array(nan, chunks=10), "sample_weight must be finite and >= 0, got nan in a chunk of 10"),
        (da.zeros(40, chunks=10), "sample_weight is all zero"),
        (da.ones(39, chunks=10), r"sample_weight.shape == \(39,\), expected \(40,\)"),
        (bad, "sample_weight must be >= 0"),
    ]:
        t = BatchNormTransformer()
        with pytest.raises(ValueError, match=match):
            t.fit(X, sample_weight=weights)
        assert not hasattr(t, "n_features_in_") and not hasattr(t, "mean_")
        fitted = BatchNormTransformer().fit(X)
        before = pickle.dumps(fitted)
        with pytest.raises(ValueError, match=match):
            fitted.partial_fit(X, sample_weight=weights)
        assert pickle.dumps(fitted) == before
    unknown = X[X[:, 0] > 1000.0]  # boolean indexing: unknown row chunk sizes
    with pytest.raises(ValueError, match="compute_chunk_sizes"):
        BatchNormTransformer().fit(unknown, sample_weight=np.ones(5))


def test_a_transformer_pickled_before_sample_weight_continues(rng):
    """Its exact summary was a Moments; partial_fit merges into it as before."""
    from numbabn.stats import Moments

    X1, X2 = _data(rng, n=30), _data(rng, n=20)
    old = BatchNormTransformer().fit(X1)
    n, mean, m2 = old._moments
    old._moments = Moments(n, mean, m2)  # the fitted state as earlier versions kept it
    old = pickle.loads(pickle.dumps(old))
    old.partial_fit(X2, sample_weight=np.full(20, 2.0))
    ref = BatchNormTransformer().fit(np.vstack([X1, X2]), sample_weight=np.r_[np.ones(30), np.full(20, 2.0)])
    assert old.n_samples_seen_ == ref.n_samples_seen_ == 70.0
    assert_allclose(old.mean_, ref.mean_, rtol=1e-14)
    assert_allclose(old.var_, ref.var_, rtol=1e-10)
