"""``BNMLPRegressor(loss="poisson")``: :class:`numbabn.layers.PoissonDeviance` against
the float64 reference and central differences; SGD steps against scikit-learn's
``MLPRegressor(loss="poisson")`` from the same weights; the exp output; the rules
around y >= 0 and a loss changed after fitting; estimators pickled before ``loss``."""

import inspect
import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose
from sklearn.base import clone
from sklearn.metrics import mean_poisson_deviance
from sklearn.model_selection import GridSearchCV
from sklearn.neural_network import MLPRegressor

from numbabn.layers import PoissonDeviance
from numbabn.sklearn import BNMLPRegressor

from .helpers import central_diff, sgd_settings
from .test_sklearn_mlp_solver_settings import _same_start

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _reference(z, y, w=None):
    """sum over outputs of y log y - y - y z + exp(z) (0 log 0 = 0); (weighted) mean over samples, float64."""
    z, y = z.astype(np.float64), y.astype(np.float64)
    ylogy = np.where(y > 0, y * np.log(np.where(y > 0, y, 1.0)), 0.0)
    per = (ylogy - y - y * z + np.exp(z)).sum(axis=1)
    return per.mean() if w is None else w @ per / w.sum()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_poisson_deviance_matches_the_reference_and_finite_differences(dtype, weighted):
    rng = np.random.default_rng(0)
    z = rng.normal(size=(7, 3)).astype(dtype)
    y = rng.poisson(2.0, size=(7, 3))  # zeros included
    w = rng.uniform(0.0, 2.0, 7) if weighted else None
    loss, grad = PoissonDeviance()(z, y, w)
    assert grad.dtype == dtype and grad.shape == z.shape
    tol = 1e-6 if dtype == np.float32 else 1e-13
    assert loss == pytest.approx(_reference(z, y, w), rel=tol)
    if dtype == np.float64:
        assert_allclose(grad, central_diff(lambda zz: _reference(zz, y, w), z.copy()), rtol=1e-6, atol=1e-10)


def test_poisson_deviance_is_zero_at_the_mean_and_refuses_bad_counts():
    y = np.array([[0.0, 1.0, 5.0]])
    loss, grad = PoissonDeviance()(np.log(np.array([[1e-300, 1.0, 5.0]])), y)
    assert loss == pytest.approx(1e-300, abs=1e-15) and np.abs(grad).max() < 1e-12
    for bad in ([[0.0, -1.0, 2.0]], [[0.0, np.nan, 2.0]]):
        with pytest.raises(ValueError, match="targets must be finite and >= 0"):
            PoissonDeviance()(np.zeros((1, 3)), np.array(bad))
    with pytest.raises(ValueError, match="shape"):
        PoissonDeviance()(np.zeros((2, 3)), np.zeros((2, 2)))


def _counts(n=48, seed=3):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    return X, rng.poisson(np.exp(0.5 * X @ rng.normal(size=4)))


@pytest.mark.skipif(
    "loss" not in inspect.signature(MLPRegressor).parameters,
    reason="scikit-learn's MLPRegressor has loss='poisson' from 1.7 (pyproject allows 1.6)",
)
@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_steps_as_scikit_learns_poisson_mlp(nesterov):
    """Without batch norm, from scikit-learn's weights: the same half deviance (its
    loss_curve_ too, penalty 0) and the same steps, epoch after epoch."""
    X, y = _counts()
    common = sgd_settings(learning_rate_init=0.02, nesterovs_momentum=nesterov, loss="poisson")
    ours = BNMLPRegressor(batch_norm=False, **common)
    theirs = MLPRegressor(random_state=0, **common)
    _same_start(ours, theirs, X, y)
    ours.set_params(max_iter=6).fit(X, y)
    theirs.set_params(max_iter=6).fit(X, y)
    assert ours.out_activation_ == theirs.out_activation_ == "exp"
    assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-10)
    assert_allclose(ours.loss_curve_[-6:], theirs.loss_curve_[-6:], rtol=1e-10)


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_batch_norm_network_learns_counts(solver):
    X, y = _counts(n=600, seed=5)
    est = BNMLPRegressor(hidden_layer_sizes=(32,), loss="poisson", solver=solver, max_iter=60, random_state=0)
    est.fit(X[:450], y[:450])
    pred = est.predict(X[450:])
    assert pred.shape == (150,) and (pred > 0).all()
    assert_allclose(pred, np.exp(est._forward(X[450:])).ravel(), rtol=1e-12)
    baseline = mean_poisson_deviance(y[450:], np.full(150, y[:450].mean()))
    assert mean_poisson_deviance(y[450:], pred) < 0.6 * baseline
    assert est.score(X[450:], y[450:]) > 0.3  # R^2 of the means, as MLPRegressor's score


def test_weighted_early_stopping_and_several_outputs():
    X, y = _counts(n=200, seed=6)
    Y = np.column_stack([y, y[::-1]])
    w = np.random.default_rng(0).uniform(0.5, 2.0, 200)
    est = BNMLPRegressor(hidden_layer_sizes=(8,), loss="poisson", early_stopping=True, max_iter=5, random_state=0)
    est.fit(X, Y, sample_weight=w)
    assert est.n_outputs_ == 2 and est.predict(X).shape == (200, 2) and (est.predict(X) > 0).all()
    assert len(est.validation_scores_) == est.n_iter_ and np.isfinite(est.validation_scores_).all()


def test_negative_y_and_a_changed_loss_raise_and_change_nothing():
    X, y = _counts()
    with pytest.raises(ValueError, match=r"loss='poisson' needs y >= 0 .*min\(y\) = -1"):
        BNMLPRegressor(loss="poisson").fit(X, np.where(y > 0, y, -1))
    with pytest.raises(ValueError, match="loss must be 'squared_error' or 'poisson', got 'gamma'"):
        BNMLPRegressor(loss="gamma").fit(X, y)
    est = BNMLPRegressor(hidden_layer_sizes=(4,), loss="poisson", max_iter=2, random_state=0).fit(X, y)
    before = pickle.dumps(est)
    with pytest.raises(ValueError, match="needs y >= 0"):
        est.partial_fit(X, -y - 1.0)
    est.set_params(loss="squared_error")
    with pytest.raises(ValueError, match="fitted with loss='poisson'"):
        est.partial_fit(X, y)
    with pytest.raises(ValueError, match="fitted with loss='poisson'"):
        est.set_params(warm_start=True).fit(X, y)
    est.set_params(loss="poisson", warm_start=False)
    assert pickle.dumps(est) == before
    fresh = clone(est).set_params(loss="squared_error").fit(X, y)  # a new fit takes the new loss
    assert fresh.out_activation_ == "identity"


def test_grid_search_over_the_loss():
    X, y = _counts(n=120)
    grid = GridSearchCV(
        BNMLPRegressor(hidden_layer_sizes=(8,), max_iter=5, random_state=0),
        {"loss": ["squared_error", "poisson"]},
        cv=2,
    ).fit(X, y)
    assert set(grid.cv_results_["param_loss"]) == {"squared_error", "poisson"}
    assert np.isfinite(grid.cv_results_["mean_test_score"]).all()


def test_estimator_pickled_before_loss_existed():
    """Its __dict__ has neither ``loss`` nor ``_poisson``: squared error, as it was."""
    X, y = _counts()
    est = BNMLPRegressor(hidden_layer_sizes=(4,), max_iter=2, random_state=0).fit(X, y)
    old = pickle.loads(pickle.dumps(est))
    del old.__dict__["loss"], old.__dict__["_poisson"]
    assert old.get_params()["loss"] == "squared_error" and old.out_activation_ == "identity"
    assert_allclose(old.predict(X), est.predict(X))
    old.partial_fit(X, y)
    assert np.isfinite(old.predict(X)).all()
