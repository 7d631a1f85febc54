"""Two classes: BNMLPClassifier's network has one logistic output, the probability of
``classes_[1]``, trained with the binary cross-entropy, as scikit-learn's MLPClassifier
(n_outputs_ 1, out_activation_ "logistic", coefs_[-1] of one column). Its SGD steps
against MLPClassifier's, its probabilities, and estimators pickled with the two softmax
outputs that binary networks had before."""

import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from scipy.special import expit, softmax
from sklearn.metrics import accuracy_score
from sklearn.neural_network import MLPClassifier

from numbabn.sklearn import BNMLPClassifier

from .helpers import sgd_settings
from .test_sklearn_mlp_solver_settings import _same_start

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _binary(n=60, seed=0):
    """Two string labels, a noisy linear threshold of 4 features."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(n, 4))
    y = np.where(X @ rng.normal(size=4) + 0.3 * rng.normal(size=n) > 0, "yes", "no")
    return X, y


def test_one_logistic_output_as_scikit_learn():
    X, y = _binary()
    ours = BNMLPClassifier(hidden_layer_sizes=(6,), max_iter=5, random_state=0).fit(X, y)
    theirs = MLPClassifier(hidden_layer_sizes=(6,), max_iter=5, random_state=0).fit(X, y)
    assert ours.n_outputs_ == theirs.n_outputs_ == 1
    assert ours.out_activation_ == theirs.out_activation_ == "logistic"
    assert [c.shape for c in ours.coefs_] == [c.shape for c in theirs.coefs_]
    assert_array_equal(ours.classes_, theirs.classes_)
    z = ours._logits(X)[:, 0]
    P = ours.predict_proba(X)
    assert P.shape == (60, 2)
    assert_allclose(P, np.column_stack([expit(-z), expit(z)]), rtol=1e-12)
    assert_allclose(P.sum(axis=1), 1.0, rtol=1e-12)
    assert_array_equal(ours.predict(X), ours.classes_[(z > 0).astype(int)])
    assert_allclose(np.exp(ours.predict_log_proba(X)), P, rtol=1e-12)
    assert ours.score(X, y) == accuracy_score(y, ours.predict(X))


def test_extreme_logits_give_exact_probabilities_and_finite_logs():
    X, y = _binary()
    est = BNMLPClassifier(hidden_layer_sizes=(6,), max_iter=2, random_state=0).fit(X, y)
    out = est._model.layers[-1]
    out.weight.value[...] = 0.0
    out.bias.value[...] = [800.0]
    assert_array_equal(est.predict_proba(X[:2]), [[0.0, 1.0], [0.0, 1.0]])
    assert_allclose(est.predict_log_proba(X[:2]), [[-800.0, 0.0], [-800.0, 0.0]], rtol=1e-15)
    out.bias.value[...] = [-30.0]
    assert_allclose(est.predict_proba(X[:1])[0, 1], expit(-30.0), rtol=1e-12)  # not 1 - (1 - tiny)
    assert_array_equal(est.predict(X[:2]), ["no", "no"])


@pytest.mark.parametrize("nesterov", [True, False])
def test_sgd_steps_as_scikit_learns_binary_mlp(nesterov):
    """Without batch norm, from scikit-learn's weights: the same log-loss (no factor,
    unlike the regressor's squared loss) and the same steps, epoch after epoch."""
    X, y = _binary(n=48)
    common = sgd_settings(learning_rate_init=0.1, nesterovs_momentum=nesterov)
    ours = BNMLPClassifier(batch_norm=False, **common)
    theirs = MLPClassifier(random_state=0, **common)
    _same_start(ours, theirs, X, y)
    ours.set_params(max_iter=6).fit(X, y)
    theirs.set_params(max_iter=6).fit(X, y)
    assert_allclose(ours.predict_proba(X), theirs.predict_proba(X), rtol=1e-10, atol=1e-12)
    assert_allclose(ours.loss_curve_[-6:], theirs.loss_curve_[-6:], rtol=1e-10)


def test_batch_norm_network_learns_two_classes_and_records_accuracy():
    X, y = _binary(n=400, seed=1)
    est = BNMLPClassifier(hidden_layer_sizes=(16,), max_iter=40, random_state=0).fit(X[:300], y[:300])
    assert est.score(X[300:], y[300:]) > 0.85
    acc = est.history_.accuracy
    assert acc is not None and len(acc) == len(est.history_.loss) and 0.0 <= min(acc) <= max(acc) <= 1.0
    assert np.mean(acc[-5:]) > 0.85


def test_partial_fit_and_early_stopping_with_two_classes():
    X, y = _binary(n=200, seed=2)
    est = BNMLPClassifier(hidden_layer_sizes=(8,), random_state=0)
    est.partial_fit(X[:100], y[:100], classes=["no", "yes"])
    est.partial_fit(X[100:], y[100:])
    assert est.n_outputs_ == 1 and est.coefs_[-1].shape == (8, 1)
    with pytest.raises(ValueError, match="differs from the classes of the first call"):
        est.partial_fit(X, y, classes=["no", "yes", "maybe"])
    stop = BNMLPClassifier(hidden_layer_sizes=(8,), early_stopping=True, max_iter=30, random_state=0).fit(X, y)
    scores = stop.validation_scores_
    assert stop.n_outputs_ == 1 and all(0.0 <= s <= 1.0 for s in scores)
    assert stop.best_validation_score_ == max(scores) > 0.7


def test_estimator_pickled_with_two_softmax_outputs_keeps_them(monkeypatch):
    """A binary network fitted before this change has two softmax outputs and no
    ``_binary`` attribute: it predicts and continues with them; a new fit uses one."""
    X, y = _binary()
    encode = BNMLPClassifier._encode_targets

    def as_before(self, *args, **kwargs):
        targets = encode(self, *args, **kwargs)
        self.__dict__.pop("_binary", None)
        return targets

    with monkeypatch.context() as m:
        m.setattr(BNMLPClassifier, "_encode_targets", as_before)
        blob = pickle.dumps(BNMLPClassifier(hidden_layer_sizes=(6,), max_iter=3, random_state=0).fit(X, y))
    est = pickle.loads(blob)
    assert "_binary" not in est.__dict__
    assert est.n_outputs_ == 2 and est.out_activation_ == "softmax" and est.coefs_[-1].shape == (6, 2)
    assert_allclose(est.predict_proba(X), softmax(est._logits(X), axis=1), rtol=1e-12)
    est.partial_fit(X, y)
    est.set_params(warm_start=True, max_iter=2).fit(X, y)
    assert est.coefs_[-1].shape == (6, 2) and est.history_.accuracy is not None
    fresh = pickle.loads(blob).set_params(warm_start=False).fit(X, y)
    assert fresh.n_outputs_ == 1 and fresh.out_activation_ == "logistic"
