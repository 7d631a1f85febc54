"""The BN-MLPs' ``solver="lbfgs"``: its objective against central finite differences
(with batch norm), its trajectory against scikit-learn's MLPClassifier from the same
weights (without), the running statistics it leaves, and scikit-learn's rules
(no partial_fit, early_stopping ignored, ConvergenceWarning, max_fun)."""

import pickle
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.datasets import load_digits
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPClassifier

from numbabn.layers import BatchNorm1d, Linear, SoftmaxCrossEntropy
from numbabn.sklearn import BNMLPClassifier, BNMLPRegressor
from numbabn.sklearn._lbfgs import objective

from .helpers import central_diff, load_sklearn_mlp_weights

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    return X[:300] / 16.0, y[:300]


def _small(n=30, d=5, classes=3, seed=0):
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, d))
    y = np.argmax(X[:, :classes] + 0.3 * rng.normal(size=(n, classes)), axis=1)
    return X, y


@pytest.mark.parametrize("weighted", [False, True])
def test_objective_gradient_matches_central_differences(weighted):
    """Batch norm in training mode over the whole set, the weighted loss and the penalty."""
    X, y = _small()
    est = BNMLPClassifier(hidden_layer_sizes=(4,), solver="lbfgs", max_iter=1, random_state=0).fit(X, y)
    w = np.random.default_rng(1).uniform(0.0, 2.0, len(X)) if weighted else None
    model = est._model
    model.train()
    theta0, f = objective(model, SoftmaxCrossEntropy(), X, y, w, alpha=0.3)
    theta0 = theta0 + np.random.default_rng(2).normal(0.0, 0.1, theta0.size)  # off the solution
    value, grad = f(theta0)
    numeric = central_diff(lambda theta: f(theta)[0], theta0.copy())
    assert_allclose(grad, numeric, rtol=1e-5, atol=1e-8)
    # The value: the (weighted) mean cross-entropy plus alpha/(2S) * sum ||W||^2.
    f(theta0)
    out = model.forward(X)
    z = out - out.max(1, keepdims=True)
    per = np.log(np.exp(z).sum(1)) - z[np.arange(len(y)), y]
    S = len(X) if w is None else w.sum()
    data = per.mean() if w is None else w @ per / S
    squares = sum(float((layer.weight.value**2).sum()) for layer in model.layers if isinstance(layer, Linear))
    assert value == pytest.approx(data + 0.3 / (2 * S) * squares, rel=1e-12)


@pytest.mark.parametrize("multilabel", [False, True])
def test_without_batch_norm_it_follows_scikit_learns_lbfgs(multilabel):
    """Same objective (the mean cross-entropy of 3 classes, or the binary cross-entropy
    summed over 3 labels; alpha/(2n) ||W||^2), same start: scipy takes the same iterations."""
    X, y = _small(n=60)
    if multilabel:
        y = (X[:, :3] + 0.5 * np.random.default_rng(5).normal(size=(60, 3)) > 0).astype(int)
    kw = dict(hidden_layer_sizes=(5,), solver="lbfgs", alpha=1e-2, tol=1e-10)
    ours = BNMLPClassifier(batch_norm=False, max_iter=1, random_state=0, **kw).fit(X, y)
    theirs = MLPClassifier(max_iter=1, random_state=0, **kw).fit(X, y)
    load_sklearn_mlp_weights(ours, theirs)
    ours.set_params(warm_start=True, max_iter=12).fit(X, y)
    theirs.set_params(warm_start=True, max_iter=12).fit(X, y)
    assert ours.n_iter_ == theirs.n_iter_ == 12
    assert ours.loss_ == pytest.approx(theirs.loss_, rel=1e-9)
    assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), rtol=1e-7, atol=1e-10)
    assert_array_equal(ours.predict(X), theirs.predict(X))
    assert_array_equal(ours.classes_, theirs.classes_)
    assert (ours.out_activation_ == "logistic") == multilabel == (theirs.out_activation_ == "logistic")


def test_running_statistics_are_those_of_the_training_set_at_the_solution(digits):
    X, y = digits
    est = BNMLPClassifier(hidden_layer_sizes=(32,), solver="lbfgs", max_iter=30, random_state=0).fit(X, y)
    first, norm = est._model.layers[0], est._model.layers[1]
    assert isinstance(first, Linear) and isinstance(norm, BatchNorm1d)
    z = X @ first.weight.value.T.astype(np.float64)
    assert_allclose(norm.running_mean, z.mean(0), rtol=1e-10, atol=1e-12)
    assert_allclose(norm.running_var, z.var(0, ddof=1), rtol=1e-9, atol=1e-12)
    assert norm.momentum == 0.1  # restored after the search
    assert est.score(X, y) > 0.95


def test_learns_digits_as_well_as_scikit_learns_lbfgs():
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    tr, te = np.arange(len(X)) % 4 != 0, np.arange(len(X)) % 4 == 0
    ours = BNMLPClassifier(hidden_layer_sizes=(64,), solver="lbfgs", random_state=0).fit(X[tr], y[tr])
    theirs = MLPClassifier(hidden_layer_sizes=(64,), solver="lbfgs", random_state=0).fit(X[tr], y[tr])
    assert ours.score(X[te], y[te]) >= theirs.score(X[te], y[te]) - 0.02


def test_scikit_learns_rules_for_lbfgs(digits):
    X, y = digits
    est = BNMLPClassifier(hidden_layer_sizes=(8,), solver="lbfgs", early_stopping=True, max_iter=3, random_state=0)
    assert not hasattr(est, "partial_fit")
    with pytest.raises(AttributeError, match="has no attribute 'partial_fit'") as exc:
        est.partial_fit(X, y)
    assert "only available for stochastic optimizers. lbfgs is not stochastic" in str(exc.value.__cause__)
    with pytest.warns(ConvergenceWarning, match="lbfgs failed to converge"):
        est.fit(X, y)
    assert est.n_iter_ == 3 and est.t_ == 0
    for absent in ("loss_curve_", "best_loss_", "validation_scores_", "best_validation_score_"):
        assert not hasattr(est, absent)  # early_stopping ignored; no epochs, as scikit-learn's
    with pytest.warns(ConvergenceWarning):
        few = BNMLPRegressor(hidden_layer_sizes=(8,), solver="lbfgs", max_fun=4, random_state=0).fit(X, y * 1.0)
    assert few.n_iter_ <= 4
    # The network holds scipy's solution, whose objective loss_ is (not a trial point's).
    model = few._model
    model.train()
    theta, f = objective(model, few._loss_class()(), X, y[:, None] * 1.0, None, few.alpha)
    assert f(theta)[0] == pytest.approx(few.loss_, rel=1e-12)
    with pytest.raises(ValueError, match="max_fun must be an int > 0"):
        BNMLPRegressor(solver="lbfgs", max_fun=0).fit(X, y * 1.0)
    with pytest.raises(ValueError, match="record_metrics are recorded by the mini-batch Trainer"):
        BNMLPRegressor(solver="lbfgs", record_metrics=["grad_norm"]).fit(X, y * 1.0)


def test_a_stochastic_solver_continues_an_lbfgs_network(digits):
    X, y = digits
    est = BNMLPClassifier(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=5, random_state=0).fit(X, y)
    before = est.predict_proba(X)
    est.set_params(solver="adam")
    est.partial_fit(X, y)  # scikit-learn too starts the stochastic optimizer here
    assert len(est.loss_curve_) == 1 and est._arch["solver"] == "adam"
    assert np.abs(est.predict_proba(X) - before).max() > 0
    warm = BNMLPClassifier(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=5, random_state=0).fit(X, y)
    warm.set_params(solver="sgd", warm_start=True, max_iter=2).fit(X, y)
    assert warm.n_iter_ == 2 and len(warm.loss_curve_) == 2


def test_integer_weights_equal_repeated_samples_without_batch_norm():
    X, y = _small(n=40)
    k = np.random.default_rng(4).integers(0, 3, len(X))
    kw = dict(hidden_layer_sizes=(4,), solver="lbfgs", batch_norm=False, max_iter=15, tol=1e-12, random_state=0)
    a = BNMLPClassifier(**kw).fit(X, y, sample_weight=k)
    b = BNMLPClassifier(**kw).fit(np.repeat(X, k, axis=0), np.repeat(y, k))
    assert a.n_iter_ == b.n_iter_
    assert_allclose(a.predict_proba(X), b.predict_proba(X), rtol=1e-6, atol=1e-9)


def test_pickle_round_trip_and_a_refused_fit_changes_nothing(digits):
    X, y = digits
    est = BNMLPClassifier(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=5, random_state=0).fit(X, y)
    again = pickle.loads(pickle.dumps(est))
    assert_array_equal(again.predict_proba(X), est.predict_proba(X))
    before = pickle.dumps(est)
    with pytest.raises(ValueError, match="sample_weight must be >= 0"):
        est.fit(X, y, sample_weight=-np.ones(len(X)))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing half-done to warn about either
        assert pickle.dumps(est) == before
