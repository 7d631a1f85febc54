"""BatchNormTransformer: scikit-learn's estimator checks, composition with the
model-selection tools, pandas, dtypes, exact partial_fit, EMA parity with the
BatchNorm1d layer, StandardScaler parity, in-place transforms and clear errors."""

import numpy as np
import pytest
import scipy.sparse as sp
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GridSearchCV, cross_val_score
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from numbabn.sklearn import BatchNormTransformer
from numbabn.sklearn import transformer as transformer_module

from .helpers import estimator_checks


def _expected_failed_checks(estimator):
    if not estimator.copy:
        return {
            "check_methods_sample_order_invariance": "copy=False transforms X in place by design, so the "
            "check's second transform of the same array sees already-normalised data (StandardScaler(copy=False) too)"
        }
    return {}


@estimator_checks(
    [
        BatchNormTransformer(),
        BatchNormTransformer(momentum=0.1),
        BatchNormTransformer(momentum=1.0, gamma=2.0, beta=-1.0, copy=False),
    ],
    _expected_failed_checks,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


def _hard(rng, n, c=4, dtype=np.float64):
    """|mean| ~ 1e4 with std ~ 1: E[x^2] - E[x]^2 would cancel catastrophically."""
    return (1e4 + rng.normal(0.0, 1.0, (n, c)) * rng.uniform(0.5, 2.0, c)).astype(dtype)


# ------------------------------------------------------------------ statistics


def test_partial_fit_equals_fit_on_concatenation(rng):
    X = _hard(rng, 1001, c=6)
    sizes = [1, 2, 100, 17, 500, 381]
    bounds = np.cumsum([0] + sizes)
    inc = BatchNormTransformer()
    for a, b in zip(bounds[:-1], bounds[1:], strict=True):
        inc.partial_fit(X[a:b])
    full = BatchNormTransformer().fit(X)
    assert inc.n_samples_seen_ == full.n_samples_seen_ == 1001
    assert_allclose(inc.mean_, full.mean_, rtol=1e-14)
    assert_allclose(inc.var_, full.var_, rtol=1e-10)
    # Both match the float64 two-pass statistics of the whole data.
    assert_allclose(full.mean_, X.mean(axis=0), rtol=1e-14)
    assert_allclose(full.var_, ((X - X.mean(axis=0)) ** 2).mean(axis=0), rtol=1e-10)
    assert_allclose(inc.transform(X), full.transform(X), rtol=0, atol=1e-8)


def test_fit_forgets_previous_statistics(rng):
    X1, X2 = rng.normal(size=(50, 3)), rng.normal(5.0, 2.0, size=(40, 3))
    t = BatchNormTransformer().fit(X1).fit(X2)
    assert t.n_samples_seen_ == 40
    assert_allclose(t.mean_, X2.mean(axis=0))


@pytest.mark.parametrize("momentum", [0.1, 0.5, 1.0])
def test_ema_matches_batchnorm1d_running_statistics(rng, momentum):
    from numbabn.layers import BatchNorm1d

    batches = [_hard(rng, n, c=5) for n in (2, 64, 33, 128, 7)]
    layer = BatchNorm1d(5, momentum=momentum, dtype=np.float64).train()
    t = BatchNormTransformer(momentum=momentum)
    for xb in batches:
        layer.forward(xb)
        t.partial_fit(xb)
    assert_allclose(t.mean_, layer.running_mean, rtol=1e-13)
    assert_allclose(t.var_, layer.running_var, rtol=1e-11)
    assert t.n_samples_seen_ == sum(len(b) for b in batches)
    # transform then equals the layer in eval mode (same statistics, same eps).
    layer.eval()
    assert_allclose(t.transform(batches[0]), layer.forward(batches[0]), rtol=1e-10, atol=1e-12)


def test_ema_formula_from_defaults(rng):
    X = rng.normal(3.0, 2.0, size=(20, 2))
    t = BatchNormTransformer(momentum=0.25).fit(X)
    assert_allclose(t.mean_, 0.75 * 0.0 + 0.25 * X.mean(axis=0))
    assert_allclose(t.var_, 0.75 * 1.0 + 0.25 * X.var(axis=0, ddof=1))


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_standard_scaler(rng, dtype):
    X = _hard(rng, 500, c=5, dtype=dtype)
    ours = BatchNormTransformer(eps=1e-300 if dtype == np.float64 else 1e-30).fit_transform(X)
    ref = StandardScaler().fit_transform(X.astype(np.float64))
    # float32: the data itself is only known to ~1e-3 at |x| ~ 1e4 (std ~ 1).
    assert_allclose(ours, ref, rtol=0, atol=1e-9 if dtype == np.float64 else 2e-3)


def test_gamma_beta_per_feature(rng):
    X = rng.normal(2.0, 3.0, size=(200, 3))
    gamma, beta = np.array([1.0, 2.0, -0.5]), np.array([0.0, 1.0, 10.0])
    t = BatchNormTransformer(gamma=gamma, beta=beta, eps=1e-3).fit(X)
    expected = gamma * (X - X.mean(0)) / np.sqrt(X.var(0) + 1e-3) + beta
    assert_allclose(t.transform(X), expected, rtol=1e-12)
    assert_allclose(t.inverse_transform(t.transform(X)), X, rtol=1e-12, atol=1e-12)


def test_constant_feature_maps_to_beta(rng):
    X = np.column_stack([np.full(10, 7.0), rng.normal(size=10)])
    Y = BatchNormTransformer(beta=0.5).fit_transform(X)
    assert_array_equal(Y[:, 0], 0.5)


# ------------------------------------------------------------------ dtypes and copies


@pytest.mark.parametrize("momentum", [None, 0.1])
def test_float32_in_float32_out(rng, momentum):
    X = _hard(rng, 300, dtype=np.float32)
    t = BatchNormTransformer(momentum=momentum).fit(X)
    assert t.mean_.dtype == np.float64 and t.var_.dtype == np.float64
    Y = t.transform(X)
    assert Y.dtype == np.float32
    ref = (X.astype(np.float64) - t.mean_) / np.sqrt(t.var_ + t.eps)
    # mean_ is rounded to float32 for the kernel: ~5e-4 at 1e4, relative to std ~1.
    assert_allclose(Y, ref, rtol=0, atol=2e-3)
    back = t.inverse_transform(Y)
    assert back.dtype == np.float32
    assert_allclose(back, X, rtol=1e-6)


def test_integer_input_becomes_float64():
    X = np.arange(12).reshape(6, 2)
    assert BatchNormTransformer().fit_transform(X).dtype == np.float64


def test_copy_true_never_modifies_input(rng):
    X = rng.normal(size=(50, 3))
    X0 = X.copy()
    t = BatchNormTransformer(copy=True).fit(X)
    Y = t.transform(X)
    t.inverse_transform(Y)
    assert_array_equal(X, X0)


@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_copy_false_transforms_in_place_over_several_blocks(rng, dtype, monkeypatch):
    monkeypatch.setattr(transformer_module, "_INPLACE_VALUES", 30)  # 10 rows per kernel call
    X = rng.normal(1.0, 2.0, size=(95, 3)).astype(dtype)
    t = BatchNormTransformer(copy=False, gamma=1.5, beta=-2.0).fit(X)
    expected = BatchNormTransformer(gamma=1.5, beta=-2.0).fit(X).transform(X)
    Y = t.transform(X)
    assert Y is X
    assert_array_equal(Y, expected)
    back = t.inverse_transform(Y)
    assert back is X


def test_copy_false_with_read_only_input_returns_new_array(rng):
    X = rng.normal(size=(20, 2))
    X.flags.writeable = False
    t = BatchNormTransformer(copy=False).fit(X)
    Y = t.transform(X)
    assert Y is not X
    assert_allclose(t.inverse_transform(Y), X, rtol=1e-12, atol=1e-12)


# ------------------------------------------------------------------ composition


def test_pipeline_grid_search_cross_val_score_clone(rng):
    n = 300
    X = rng.normal(size=(n, 4)) * [1.0, 10.0, 100.0, 1e3] + [0.0, 1e3, -50.0, 1e4]
    y = (X[:, 0] + (X[:, 1] - 1e3) / 10.0 > 0).astype(int)
    pipe = make_pipeline(BatchNormTransformer(), LogisticRegression())
    scores = cross_val_score(pipe, X, y, cv=3)
    assert scores.shape == (3,) and scores.mean() > 0.9
    grid = GridSearchCV(
        pipe, {"batchnormtransformer__momentum": [None, 0.5], "batchnormtransformer__eps": [1e-5, 1e-1]}, cv=3
    ).fit(X, y)
    assert set(grid.best_params_) == {"batchnormtransformer__momentum", "batchnormtransformer__eps"}
    assert grid.score(X, y) > 0.9
    fitted = BatchNormTransformer(momentum=0.3, gamma=2.0).fit(X)
    copy = clone(fitted)
    assert copy.get_params() == fitted.get_params()
    assert not hasattr(copy, "mean_")


def test_pandas_in_and_out(rng):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(rng.normal(size=(40, 3)), columns=["a", "b", "c"])
    t = BatchNormTransformer().set_output(transform="pandas").fit(df)
    assert list(t.feature_names_in_) == ["a", "b", "c"]
    assert list(t.get_feature_names_out()) == ["a", "b", "c"]
    out = t.transform(df)
    assert isinstance(out, pd.DataFrame)
    assert list(out.columns) == ["a", "b", "c"]
    assert_array_equal(out.index, df.index)
    assert_allclose(out.to_numpy(), BatchNormTransformer().fit_transform(df.to_numpy()))
    with pytest.raises(ValueError, match="feature names should match"):
        t.transform(df.rename(columns={"a": "z"}))


def test_feature_names_without_pandas(rng):
    t = BatchNormTransformer().fit(rng.normal(size=(5, 2)))
    assert list(t.get_feature_names_out()) == ["x0", "x1"]


# ------------------------------------------------------------------ errors


@pytest.mark.parametrize("bad", [np.nan, np.inf, -np.inf])
def test_non_finite_input_rejected_with_sklearn_message(rng, bad):
    X = rng.normal(size=(10, 2))
    X[3, 1] = bad
    with pytest.raises(ValueError, match="Input X contains (NaN|infinity)"):
        BatchNormTransformer().fit(X)
    t = BatchNormTransformer().fit(rng.normal(size=(10, 2)))
    with pytest.raises(ValueError, match="Input X contains (NaN|infinity)"):
        t.transform(X)


def test_sparse_input_rejected(rng):
    with pytest.raises(TypeError, match="dense data is required"):
        BatchNormTransformer().fit(sp.csr_matrix(rng.normal(size=(5, 2))))


@pytest.mark.parametrize(
    "kwargs, exc, match",
    [
        (dict(eps=0.0), ValueError, "eps must be a finite number > 0"),
        (dict(eps=float("nan")), ValueError, "eps must be a finite number > 0"),
        (dict(eps="1e-5"), ValueError, "eps must be a finite number > 0"),
        (dict(momentum=0.0), ValueError, r"momentum must be None .* \(0, 1\]"),
        (dict(momentum=1.5), ValueError, r"momentum must be None .* \(0, 1\]"),
        (dict(momentum=True), ValueError, r"momentum must be None"),
        (dict(gamma=[1.0, 2.0]), ValueError, r"gamma must be a scalar or have shape \(3,\)"),
        (dict(beta=np.ones((3, 1))), ValueError, r"beta must be a scalar or have shape \(3,\)"),
        (dict(gamma="big"), TypeError, "gamma must be a number or an array of n_features=3"),
        (dict(beta=[0.0, np.nan, 1.0]), ValueError, "beta must be finite"),
        (dict(copy="no"), TypeError, "copy must be a bool, got str 'no'"),
        (dict(copy=1), TypeError, "copy must be a bool, got int 1"),
    ],
)
def test_bad_parameters_raise_clear_errors(rng, kwargs, exc, match):
    with pytest.raises(exc, match=match):
        BatchNormTransformer(**kwargs).fit(rng.normal(size=(10, 3)))


def test_copy_argument_of_transform_must_be_bool(rng):
    X = rng.normal(size=(10, 3))
    t = BatchNormTransformer(copy=np.bool_(False)).fit(X)
    for method in (t.transform, t.inverse_transform):
        with pytest.raises(TypeError, match="copy must be a bool, got str 'yes'"):
            method(X, copy="yes")


@pytest.mark.parametrize("first, then", [(None, 0.5), (0.5, None)])
def test_partial_fit_refuses_to_switch_statistics_mode(rng, first, then):
    """Exact summary and moving average are different statistics: mixing them used to
    give a mean_ of neither, with n_samples_seen_ counting samples it did not cover."""
    X = rng.normal(size=(40, 2))
    t = BatchNormTransformer(momentum=first).fit(X)
    state = {k: np.copy(v) for k, v in vars(t).items() if k.endswith("_")}
    with pytest.raises(
        ValueError,
        match=r"momentum is .*, but the statistics partial_fit would continue are "
        r".*partial_fit cannot mix the two\. Set momentum back, or call fit",
    ):
        t.set_params(momentum=then).partial_fit(X + 100.0)
    for k, v in state.items():
        assert_array_equal(getattr(t, k), v, err_msg=k)
    t.fit(X + 100.0)  # fit starts new statistics in the new mode
    assert t.n_samples_seen_ == 40
    assert_allclose(t.mean_, (X + 100.0).mean(0) if then is None else 0.5 * (X + 100.0).mean(0))


def test_float_momentum_may_change_between_partial_fits(rng):
    X1, X2 = rng.normal(size=(30, 2)), rng.normal(3.0, 2.0, size=(20, 2))
    t = BatchNormTransformer(momentum=0.5).fit(X1)
    t.set_params(momentum=0.25).partial_fit(X2)
    assert t.n_samples_seen_ == 50
    assert_allclose(t.mean_, 0.75 * (0.5 * X1.mean(0)) + 0.25 * X2.mean(0))
    assert_allclose(t.var_, 0.75 * (0.5 + 0.5 * X1.var(0, ddof=1)) + 0.25 * X2.var(0, ddof=1))


def test_ema_needs_two_samples_per_batch(rng):
    t = BatchNormTransformer(momentum=0.1).fit(rng.normal(size=(10, 2)))
    before = t.mean_.copy()
    with pytest.raises(ValueError, match="at least 2 samples per batch"):
        t.partial_fit(rng.normal(size=(1, 2)))
    assert_array_equal(t.mean_, before)


@pytest.mark.filterwarnings("ignore:X does not have valid feature names")
@pytest.mark.parametrize("momentum", [None, 0.1])
def test_rejected_partial_fit_leaves_state_untouched(rng, momentum):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame(rng.normal(size=(30, 2)), columns=["a", "b"])
    t = BatchNormTransformer(momentum=momentum).fit(df)
    state = {k: np.copy(v) for k, v in vars(t).items() if k.endswith("_")}
    bad_nan = df.copy()
    bad_nan.iloc[0, 0] = np.nan
    sparse = sp.csr_matrix(np.ones((4, 2)))
    # A new fit may change the width; partial_fit may not.
    attempts = [
        (t.partial_fit, bad_nan),
        (t.partial_fit, df.assign(c=1.0)),
        (t.partial_fit, sparse),
        (t.fit, bad_nan),
        (t.fit, sparse),
        (t.fit, bad_nan.assign(c=1.0)),
    ]
    for method, bad in attempts:
        with pytest.raises((ValueError, TypeError)):
            method(bad)
        for k, v in state.items():
            assert_array_equal(getattr(t, k), v, err_msg=k)
    t.set_params(gamma=[1.0, 2.0, 3.0])
    with pytest.raises(ValueError, match="gamma"):
        t.partial_fit(df)
    with pytest.raises(ValueError, match="gamma"):
        t.fit(df)
    for k, v in state.items():
        assert_array_equal(getattr(t, k), v, err_msg=k)


def test_first_partial_fit_rejected_leaves_estimator_unfitted(rng):
    pd = pytest.importorskip("pandas")
    df = pd.DataFrame([[1.0, np.nan], [2.0, 3.0]], columns=["a", "b"])
    t = BatchNormTransformer()
    with pytest.raises(ValueError, match="NaN"):
        t.partial_fit(df)
    assert not [k for k in vars(t) if k.endswith("_")]


def test_wrong_feature_count_and_unfitted(rng):
    from sklearn.exceptions import NotFittedError

    with pytest.raises(NotFittedError):
        BatchNormTransformer().transform(np.ones((2, 2)))
    t = BatchNormTransformer().fit(rng.normal(size=(10, 3)))
    with pytest.raises(ValueError, match="X has 2 features, but BatchNormTransformer is expecting 3"):
        t.transform(np.ones((4, 2)))
    with pytest.raises(ValueError, match="X has 2 features, but BatchNormTransformer is expecting 3"):
        t.inverse_transform(np.ones((4, 2)))


def test_inverse_transform_needs_nonzero_gamma(rng):
    t = BatchNormTransformer(gamma=[1.0, 0.0]).fit(rng.normal(size=(10, 2)))
    with pytest.raises(ValueError, match=r"gamma != 0 .* features \[1\]"):
        t.inverse_transform(np.ones((3, 2)))
