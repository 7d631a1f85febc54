"""``sample_weight``: the weighted losses, the Trainer passing batch weights, and the
BN-MLPs' fit / partial_fit with scikit-learn's semantics (weighted batch loss, L2
penalty per unit of weight)."""

import pickle

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.datasets import make_blobs, make_regression
from sklearn.pipeline import make_pipeline
from sklearn.preprocessing import StandardScaler

from numbabn.layers import Linear, MSELoss, SoftmaxCrossEntropy
from numbabn.optim import SGD
from numbabn.sklearn import BNMLPClassifier, BNMLPRegressor
from numbabn.train import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _ce_reference(z, t, w):
    """Weighted softmax cross-entropy in float64, per sample and averaged."""
    z = z.astype(np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    per = lse - z[np.arange(len(t)), t]
    return np.dot(w, per) / w.sum()


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_weighted_cross_entropy_matches_the_float64_reference_and_finite_differences(dtype):
    rng = np.random.default_rng(0)
    z = rng.standard_normal((7, 4)).astype(dtype)
    t = rng.integers(0, 4, 7)
    w = rng.uniform(0, 3, 7)
    w[2] = 0.0
    loss, grad = SoftmaxCrossEntropy()(z, t, w)
    assert grad.dtype == dtype and grad.shape == z.shape
    tol = 1e-6 if dtype == np.float32 else 1e-13
    assert loss == pytest.approx(_ce_reference(z, t, w), rel=tol)
    z64, h = z.astype(np.float64), 1e-6
    fd = np.zeros_like(z64)
    for i in np.ndindex(z.shape):
        e = np.zeros_like(z64)
        e[i] = h
        fd[i] = (_ce_reference(z64 + e, t, w) - _ce_reference(z64 - e, t, w)) / (2 * h)
    assert_allclose(grad, fd, rtol=1e-5 if dtype == np.float32 else 1e-7, atol=1e-7)
    assert_array_equal(grad[2], 0)  # a sample of weight 0 gets no gradient


def test_weighted_mse_is_the_weighted_mean_of_per_sample_mean_squared_errors():
    rng = np.random.default_rng(1)
    pred, target = rng.standard_normal((6, 3)), rng.standard_normal((6, 3))
    w = rng.uniform(0.1, 2, 6)
    loss, grad = MSELoss()(pred, target, w)
    per = ((pred - target) ** 2).mean(1)
    assert loss == pytest.approx(np.dot(w, per) / w.sum(), rel=1e-14)
    assert_allclose(grad, 2 * (pred - target) * w[:, None] / (3 * w.sum()), rtol=1e-14)


@pytest.mark.parametrize("loss_fn", [SoftmaxCrossEntropy(), MSELoss()], ids=["ce", "mse"])
def test_unit_weights_give_the_unweighted_loss_and_weights_summing_to_zero_weigh_nothing(loss_fn):
    rng = np.random.default_rng(2)
    pred = rng.standard_normal((5, 3))
    target = rng.integers(0, 3, 5) if isinstance(loss_fn, SoftmaxCrossEntropy) else rng.standard_normal((5, 3))
    plain = loss_fn(pred, target)
    ones = loss_fn(pred, target, np.ones(5))
    assert ones[0] == pytest.approx(plain[0], rel=1e-15)
    assert_allclose(ones[1], plain[1], rtol=1e-15)
    loss, grad = loss_fn(pred, target, np.zeros(5))
    assert np.isnan(loss)
    assert_array_equal(grad, 0)


@pytest.mark.parametrize(
    "bad", [np.ones(4), np.ones((5, 1)), -np.ones(5), np.full(5, np.nan), np.array(["a"] * 5)], ids=str
)
def test_losses_refuse_bad_weights_naming_them(bad):
    with pytest.raises(ValueError, match="sample_weight"):
        SoftmaxCrossEntropy()(np.zeros((5, 2)), np.zeros(5, int), bad)


def test_trainer_passes_each_batch_its_weights_and_refuses_bad_ones_before_any_step():
    rng = np.random.default_rng(3)
    X, y = rng.standard_normal((12, 3)), rng.standard_normal((12, 2))
    w = rng.uniform(0, 2, 12)
    seen = []

    def loss(out, target, sample_weight=None):
        seen.append((target.copy(), sample_weight))
        return MSELoss()(out, target, sample_weight)

    model = Linear(3, 2, rng=np.random.default_rng(0), dtype=np.float64)
    trainer = Trainer(model, loss, SGD(model.parameters(), lr=0.1), batch_size=4, seed=0, verbose=0)
    trainer.fit(X, y, epochs=1, sample_weight=w)
    assert len(seen) == 3
    for target, weights in seen:  # the weights travel with their samples
        rows = [np.flatnonzero((y == r).all(1))[0] for r in target]
        assert_array_equal(weights, w[rows])
    before = pickle.dumps((model.state_dict(), trainer.steps_done))
    with pytest.raises(ValueError, match="sample_weight"):
        trainer.fit(X, y, epochs=1, sample_weight=-w)
    assert pickle.dumps((model.state_dict(), trainer.steps_done)) == before


def _repeat(X, y, w):
    return np.repeat(X, w, axis=0), np.repeat(y, w, axis=0)


@pytest.mark.parametrize("cls", [BNMLPClassifier, BNMLPRegressor])
def test_integer_weights_without_batch_norm_fit_as_repeated_samples(cls):
    """One full batch, plain SGD, no batch norm: weight k must be k copies of the
    sample in the loss *and* in the penalty (alpha over the batch's weight sum), and
    weight 0 the sample removed, exactly as scikit-learn defines it."""
    rng = np.random.default_rng(4)
    if cls is BNMLPClassifier:
        X, y = make_blobs(30, 4, centers=3, random_state=0)
    else:
        X, y = make_regression(30, 4, n_targets=2, random_state=0)
        y = y / 100
    w = rng.integers(0, 4, len(X))
    w[:3] = (0, 1, 3)  # each class of weight present
    common = dict(
        hidden_layer_sizes=(8,),
        batch_norm=False,
        solver="sgd",
        momentum=0.0,
        alpha=0.5,
        batch_size=200,
        max_iter=5,
        random_state=0,
        learning_rate_init=0.05,
    )
    weighted = cls(**common).fit(X, y, sample_weight=w)
    Xr, yr = _repeat(X, y, w)
    repeated = cls(**common).fit(Xr, yr)
    out = "predict_proba" if cls is BNMLPClassifier else "predict"
    assert_allclose(getattr(weighted, out)(X), getattr(repeated, out)(X), rtol=1e-10, atol=1e-12)
    # and the weights do matter: the unweighted fit differs
    plain = cls(**common).fit(X, y)
    assert not np.allclose(getattr(plain, out)(X), getattr(weighted, out)(X), rtol=1e-6)


def test_uniform_weights_scale_the_penalty_down_as_more_copies_would():
    """With batch norm, weights c everywhere keep the weighted mean loss and divide the
    penalty's gradient by c: weight 2 with alpha equals no weights with alpha/2."""
    X, y = make_blobs(64, 5, centers=3, random_state=1)
    common = dict(hidden_layer_sizes=(16,), solver="sgd", batch_size=16, max_iter=4, random_state=0)
    doubled = BNMLPClassifier(alpha=0.2, **common).fit(X, y, sample_weight=2.0)
    halved = BNMLPClassifier(alpha=0.1, **common).fit(X, y)
    assert_allclose(doubled.predict_proba(X), halved.predict_proba(X), rtol=1e-9, atol=1e-12)
    assert_allclose(doubled.loss_curve_, halved.loss_curve_, rtol=1e-9)
    other = BNMLPClassifier(alpha=0.2, **common).fit(X, y)
    assert not np.allclose(other.predict_proba(X), doubled.predict_proba(X), rtol=1e-6)


def test_weights_tilt_the_fit_towards_the_heavy_samples():
    """A user's reason for weights: one class weighted 10x is predicted more often."""
    X, y = make_blobs(300, 2, centers=[[0, 0], [1.0, 1.0]], cluster_std=1.0, random_state=0)
    common = dict(hidden_layer_sizes=(16,), max_iter=30, random_state=0)
    plain = BNMLPClassifier(**common).fit(X, y)
    heavy = BNMLPClassifier(**common).fit(X, y, sample_weight=np.where(y == 1, 10.0, 1.0))
    assert (heavy.predict(X) == 1).sum() > (plain.predict(X) == 1).sum() + 20


@pytest.mark.parametrize(
    "bad, match",
    [
        (np.ones(5), r"sample_weight.shape == \(5,\), expected \(40,\)"),
        (-np.ones(40), ">= 0"),
        (np.full(40, np.inf), "finite"),
        (np.r_[np.ones(39), np.nan], r"must be finite, got nan at index 39"),
        (np.zeros(40), "all zero"),
        ("heavy", r"sample_weight.shape == \(\), expected"),
        ([[1.0], [1.0, 2.0]], "a number or 40 numbers"),
    ],
    ids=["shape", "negative", "inf", "one nan", "zeros", "text", "ragged"],
)
def test_bad_weights_raise_naming_them_and_change_nothing(bad, match):
    X, y = make_blobs(40, 3, centers=2, random_state=0)
    clf = BNMLPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0).fit(X, y)
    before = pickle.dumps(clf)
    for call in (lambda: clf.fit(X, y, sample_weight=bad), lambda: clf.partial_fit(X, y, sample_weight=bad)):
        with pytest.raises(ValueError, match=match):
            call()
        assert pickle.dumps(clf) == before


def test_a_boolean_mask_weighs_as_zeros_and_ones():
    """scikit-learn's estimators take a boolean sample_weight as 0/1 weights."""
    X, y = make_blobs(40, 3, centers=2, random_state=0)
    mask = np.arange(40) % 3 > 0
    fits = [
        BNMLPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0).fit(X, y, sample_weight=w)
        for w in (mask, mask.astype(np.float64))
    ]
    assert_array_equal(fits[0].predict_proba(X), fits[1].predict_proba(X))


def test_partial_fit_and_pipelines_take_weights():
    X, y = make_regression(50, 3, random_state=0)
    w = np.random.default_rng(5).uniform(0.5, 2, 50)
    reg = BNMLPRegressor(hidden_layer_sizes=(8,), random_state=0)
    reg.partial_fit(X, y / 100, w)  # third positional argument, as in scikit-learn
    assert reg.n_iter_ == 1 and np.isfinite(reg.loss_curve_).all()
    Xc, yc = make_blobs(50, 3, centers=2, random_state=0)
    clf = BNMLPClassifier(hidden_layer_sizes=(8,), random_state=0)
    clf.partial_fit(Xc, yc, classes=[0, 1], sample_weight=w)
    assert clf.n_iter_ == 1
    pipe = make_pipeline(StandardScaler(), BNMLPClassifier(hidden_layer_sizes=(8,), max_iter=30, random_state=0))
    pipe.fit(Xc, yc, bnmlpclassifier__sample_weight=w)
    assert pipe.score(Xc, yc, sample_weight=w) > 0.8


def test_early_stopping_scores_the_validation_split_with_its_weights():
    """Class 1 weighted ~0: the network learns to answer class 0, and the weighted
    validation accuracy (class 0's samples alone) is ~1 where the unweighted one is
    ~1/2. Weight on one sample only leaves one side of the split without weight: it
    raises before training."""
    X, y = make_blobs(200, 2, centers=[[0, 0], [0.5, 0.5]], random_state=0)
    common = dict(hidden_layer_sizes=(8,), max_iter=5, batch_size=16, early_stopping=True, random_state=0)
    w = np.where(y == 0, 1.0, 1e-9)
    clf = BNMLPClassifier(**common).fit(X, y, sample_weight=w)
    assert min(clf.validation_scores_[1:]) > 0.95
    assert max(BNMLPClassifier(**common).fit(X, y).validation_scores_) < 0.9
    one = np.zeros(200)
    one[7] = 1.0
    with pytest.raises(ValueError, match="samples all have sample_weight 0"):
        BNMLPClassifier(**common).fit(X, y, sample_weight=one)
