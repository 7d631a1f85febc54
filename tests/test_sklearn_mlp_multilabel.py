"""Multilabel classification: :class:`numbabn.layers.SigmoidBinaryCrossEntropy` against
the float64 reference and central differences, and ``BNMLPClassifier`` on a
multilabel indicator y (its lbfgs iterations against scikit-learn's MLPClassifier are
in test_sklearn_mlp_lbfgs.py) and the rules around it."""

import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal

from numbabn.layers import SigmoidBinaryCrossEntropy
from numbabn.sklearn import BNMLPClassifier

from .helpers import central_diff

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _reference(z, t, w=None):
    """sum over labels of -[t log s + (1-t) log(1-s)], s = sigmoid(z); (weighted) mean over samples, float64."""
    z = z.astype(np.float64)
    per = (np.logaddexp(0.0, z) - t * z).sum(axis=1)
    return per.mean() if w is None else w @ per / w.sum()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("weighted", [False, True])
def test_binary_cross_entropy_matches_the_reference_and_finite_differences(dtype, weighted):
    rng = np.random.default_rng(0)
    z = (3 * rng.standard_normal((6, 4))).astype(dtype)
    t = rng.integers(0, 2, (6, 4))
    w = rng.uniform(0.0, 2.0, 6) if weighted else None
    loss, grad = SigmoidBinaryCrossEntropy()(z, t, w)
    assert grad.dtype == dtype and grad.shape == z.shape
    tol = 1e-6 if dtype == np.float32 else 1e-13
    assert loss == pytest.approx(_reference(z, t, w), rel=tol)
    if dtype == np.float64:
        numeric = central_diff(lambda zz: _reference(zz, t, w), z.copy())
        assert_allclose(grad, numeric, rtol=1e-6, atol=1e-10)


def test_binary_cross_entropy_is_exact_for_extreme_logits():
    z = np.array([[1000.0, -1000.0, 40.0]])
    t = np.array([[0, 1, 1]])
    loss, grad = SigmoidBinaryCrossEntropy()(z, t)
    assert loss == pytest.approx(2000.0 + np.log1p(np.exp(-40.0)), rel=1e-15)
    assert_allclose(grad, [[1.0, -1.0, -np.exp(-40.0) / (1 + np.exp(-40.0))]], rtol=1e-12)
    with pytest.raises(ValueError, match="targets must be 0s and 1s"):
        SigmoidBinaryCrossEntropy()(z, np.array([[0, 2, 1]]))


def _data(n=80, labels=3, seed=0):
    """Labels that are noisy linear threshold functions of 6 features (scikit-learn's
    make_multilabel_classification takes seconds for a few hundred samples)."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 6))
    Y = (X @ rng.normal(size=(6, labels)) + 0.5 * rng.normal(size=(n, labels)) > 0).astype(int)
    return X, Y


@pytest.mark.parametrize("solver", ["adam", "lbfgs"])
def test_batch_norm_network_learns_multilabel_targets(solver):
    X, Y = _data(n=400, labels=4, seed=1)
    est = BNMLPClassifier(hidden_layer_sizes=(32,), solver=solver, max_iter=100, random_state=0).fit(X[:300], Y[:300])
    P = est.predict_proba(X[300:])
    assert P.shape == (100, 4) and ((P >= 0) & (P <= 1)).all()
    pred = est.predict(X[300:])
    assert pred.shape == (100, 4) and pred.dtype.kind == "i"
    assert_array_equal(pred, (P > 0.5).astype(int))
    assert_allclose(np.exp(est.predict_log_proba(X[300:])), P, rtol=1e-12)
    per_label = (pred == Y[300:]).mean()
    majority = np.maximum(Y[300:].mean(0), 1 - Y[300:].mean(0)).mean()
    assert per_label > majority + 0.1
    assert est.score(X[300:], Y[300:]) == pytest.approx((pred == Y[300:]).all(axis=1).mean())


def test_early_stopping_and_partial_fit_with_multilabel_y():
    X, Y = _data(n=120)
    est = BNMLPClassifier(hidden_layer_sizes=(8,), early_stopping=True, max_iter=5, random_state=0).fit(X, Y)
    assert len(est.validation_scores_) == est.n_iter_
    inc = BNMLPClassifier(hidden_layer_sizes=(8,), random_state=0)
    inc.partial_fit(X, Y, classes=[0, 1, 2])
    inc.partial_fit(X, Y)
    assert_array_equal(inc.classes_, [0, 1, 2])
    with pytest.raises(ValueError, match="multilabel y of 3 labels has classes"):
        BNMLPClassifier().partial_fit(X, Y, classes=[0, 1])


def test_the_kind_of_y_cannot_change_and_other_2d_y_is_refused():
    X, Y = _data()
    est = BNMLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0).fit(X, Y)
    before = pickle.dumps(est)
    with pytest.raises(ValueError, match="fitted on multilabel indicators"):
        est.partial_fit(X, Y[:, 0])
    with pytest.raises(ValueError, match="y has 2 labels, but the network was fitted on 3"):
        est.partial_fit(X, Y[:, :2])
    with pytest.raises(ValueError, match="fitted on multilabel indicators"):
        est.set_params(warm_start=True).fit(X, Y[:, 0])
    est.set_params(warm_start=False)
    assert pickle.dumps(est) == before
    single = BNMLPClassifier(hidden_layer_sizes=(8,), max_iter=3, random_state=0).fit(X, Y[:, 0])
    with pytest.raises(ValueError, match="fitted on single labels"):
        single.partial_fit(X, Y)
    for bad in (Y * 2, Y + np.arange(len(Y))[:, None] % 2):  # 0/2 (sklearn calls it multilabel), 0/1/2
        with pytest.raises(ValueError, match="a 2-D y must be a multilabel indicator"):
            BNMLPClassifier().fit(X, bad)
    assert single.fit(X, Y).out_activation_ == "logistic"  # a new fit takes any kind


def test_integer_weights_equal_repeated_samples_without_batch_norm():
    X, Y = _data(n=50)
    k = np.random.default_rng(4).integers(0, 3, len(X))
    kw = dict(hidden_layer_sizes=(4,), solver="lbfgs", batch_norm=False, max_iter=15, tol=1e-12, random_state=0)
    a = BNMLPClassifier(**kw).fit(X, Y, sample_weight=k)
    b = BNMLPClassifier(**kw).fit(np.repeat(X, k, axis=0), np.repeat(Y, k, axis=0))
    assert_allclose(a.predict_proba(X), b.predict_proba(X), rtol=1e-6, atol=1e-9)


def test_n_outputs_counts_the_network_outputs():
    X, Y = _data(n=40)
    assert BNMLPClassifier(hidden_layer_sizes=(4,), max_iter=1).fit(X, Y).n_outputs_ == 3
    assert BNMLPClassifier(hidden_layer_sizes=(4,), max_iter=1).fit(X, Y[:, 0]).n_outputs_ == 1
