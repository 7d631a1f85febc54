"""BNMLPClassifier / BNMLPRegressor: scikit-learn's estimator checks, partial_fit,
model selection, dtypes, stopping rules, recorded metrics, pickling and errors."""

import pickle
import warnings
from copy import deepcopy
from math import ceil

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.base import clone
from sklearn.datasets import load_digits, make_blobs, make_regression
from sklearn.exceptions import ConvergenceWarning, DataConversionWarning
from sklearn.model_selection import GridSearchCV, train_test_split
from sklearn.pipeline import make_pipeline

from numbabn.sklearn import BatchNormTransformer, BNMLPClassifier, BNMLPRegressor

from .helpers import estimator_checks

# Short training budgets are the point of these tests; the warning is tested once, explicitly.
pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


FAST = dict(hidden_layer_sizes=(16,), max_iter=50, learning_rate_init=0.01)


def _expected_failed_checks(estimator):
    # Weight k counts a sample k times in the loss and the penalty, but batch norm's
    # batch statistics are unweighted (as in Keras and PyTorch), so a batch-norm network
    # fitted on repeated samples normalises differently. Without batch norm the check
    # passes: its data fit in one full batch (batch_size "auto"), where weights and
    # repetitions give the same steps.
    failed = {}
    if estimator.batch_norm:
        failed["check_sample_weight_equivalence_on_dense_data"] = (
            "batch norm's batch statistics are unweighted: repeated samples change them"
        )
    if getattr(estimator, "loss", None) == "poisson":
        # this check draws negative targets whatever the positive_only tag says (scikit-learn
        # 1.9), and loss="poisson" refuses y < 0 with its own message (tested in
        # test_sklearn_mlp_poisson.py)
        failed["check_regressor_multioutput"] = "draws y < 0, which loss='poisson' refuses"
    if not estimator.early_stopping:
        return failed
    reason = (
        "partial_fit raises for early_stopping=True, as scikit-learn's MLPs do "
        "(MLPClassifier(early_stopping=True) fails these checks too)"
    )
    checks = ("check_fit_score_takes_y", "check_n_features_in_after_fitting", "check_estimators_partial_fit_n_features")
    return {**failed, **dict.fromkeys(checks, reason)}


@estimator_checks(
    [
        BNMLPClassifier(**FAST),
        BNMLPRegressor(**FAST),
        BNMLPClassifier(
            hidden_layer_sizes=(16, 8),
            activation="tanh",
            solver="sgd",
            learning_rate_init=0.05,
            max_iter=50,
            early_stopping=True,
            validation_fraction=0.2,
        ),
        BNMLPRegressor(
            hidden_layer_sizes=(16,),
            activation="logistic",
            batch_norm=False,
            max_iter=50,
            learning_rate_init=0.01,
            record_metrics=("grad_norm",),
            record_every=5,
        ),
        BNMLPClassifier(hidden_layer_sizes=(16,), solver="lbfgs", max_iter=50),
        BNMLPRegressor(hidden_layer_sizes=(16,), solver="lbfgs", batch_norm=False, max_iter=50),
        BNMLPRegressor(hidden_layer_sizes=(16,), loss="poisson", max_iter=100, learning_rate_init=0.05),
    ],
    _expected_failed_checks,
)
def test_sklearn_estimator_checks(estimator, check):
    check(estimator)


@pytest.fixture(scope="module")
def digits():
    X, y = load_digits(return_X_y=True)
    X = X / 16.0
    return train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)


def test_classifier_learns_digits(digits):
    X_tr, X_te, y_tr, y_te = digits
    clf = BNMLPClassifier(hidden_layer_sizes=(64,), max_iter=15, learning_rate_init=0.01, random_state=0)
    clf.fit(X_tr, y_tr)
    assert clf.score(X_te, y_te) > 0.95
    assert clf.n_iter_ == len(clf.loss_curve_) == 15
    assert clf.loss_curve_[-1] < clf.loss_curve_[0] / 5
    assert clf.best_loss_ == min(clf.loss_curve_)
    proba = clf.predict_proba(X_te)
    assert proba.shape == (len(X_te), 10)
    assert_allclose(proba.sum(axis=1), 1.0)
    assert_array_equal(clf.predict(X_te), clf.classes_[proba.argmax(axis=1)])
    # history_: one entry per Trainer step, ceil(n / batch_size) steps per epoch (the
    # last of n mod 200 samples), the epoch's loss weighted by the batch sizes
    sizes = [200] * (len(X_tr) // 200) + [len(X_tr) % 200]
    steps_per_epoch = len(sizes)
    assert clf.history_.step == list(range(15 * steps_per_epoch))
    assert len(clf.history_.accuracy) == 15 * steps_per_epoch
    assert_allclose(clf.loss_curve_[0], np.dot(clf.history_.loss[:steps_per_epoch], sizes) / len(X_tr))


def test_partial_fit_classifier(digits):
    X_tr, X_te, y_tr, y_te = digits
    clf = BNMLPClassifier(hidden_layer_sizes=(32,), learning_rate_init=0.01, random_state=0)
    with pytest.raises(ValueError, match="classes must be given on the first call"):
        clf.partial_fit(X_tr, y_tr)
    half = len(X_tr) // 2
    clf.partial_fit(X_tr[:half], y_tr[:half], classes=np.arange(10))
    assert clf.n_iter_ == 1
    for _ in range(6):
        clf.partial_fit(X_tr, y_tr)
    # as scikit-learn's MLPs: n_iter_ is this call's epochs, the loss curve carries on
    assert clf.n_iter_ == 1 and len(clf.loss_curve_) == 7
    assert clf.loss_curve_[-1] < clf.loss_curve_[0]
    assert clf.score(X_te, y_te) > 0.9
    # Plain values in the message, not [np.int64(0), ...].
    with pytest.raises(
        ValueError, match=r"classes=\[0, 1, .*, 10\] differs from the classes of the first call \[0, 1,"
    ):
        clf.partial_fit(X_tr, y_tr, classes=np.arange(11))
    with pytest.raises(ValueError, match=r"labels \[42\] that are not in classes_"):
        clf.partial_fit(X_tr[:10], np.full(10, 42))
    with pytest.raises(ValueError, match="X has 3 features"):
        clf.partial_fit(X_tr[:, :3], y_tr)


def test_partial_fit_classes_may_be_absent_from_first_batch():
    X, y = make_blobs(n_samples=120, centers=3, random_state=0)
    clf = BNMLPClassifier(hidden_layer_sizes=(8,), random_state=0)
    clf.partial_fit(X[y != 2], y[y != 2], classes=[0, 1, 2])
    assert_array_equal(clf.classes_, [0, 1, 2])
    assert clf.predict_proba(X).shape == (120, 3)


def test_partial_fit_regressor_continues_fit():
    X, y = make_regression(n_samples=200, n_features=5, noise=1.0, random_state=0)
    y = (y - y.mean()) / y.std()
    reg = BNMLPRegressor(hidden_layer_sizes=(32,), max_iter=5, learning_rate_init=0.01, random_state=0)
    reg.fit(X, y)
    before = reg.score(X, y)
    for _ in range(30):
        reg.partial_fit(X, y)
    assert reg.n_iter_ == 1 and len(reg.loss_curve_) == 35
    assert reg.score(X, y) > max(before, 0.9)


def test_regressor_multi_output_and_float32():
    X, y = make_regression(n_samples=150, n_features=4, n_targets=3, random_state=0)
    y = (y - y.mean(0)) / y.std(0)
    X32, y32 = X.astype(np.float32), y.astype(np.float32)
    reg = BNMLPRegressor(**FAST, random_state=0)
    reg.fit(X32, y32)
    pred = reg.predict(X32)
    assert pred.shape == (150, 3) and pred.dtype == np.float32
    assert reg.n_outputs_ == 3
    assert reg.score(X32, y32) > 0.8
    assert reg.history_.accuracy is None


def test_float32_classifier_trains_in_float32():
    X, y = make_blobs(n_samples=100, random_state=0)
    clf32 = BNMLPClassifier(**FAST, random_state=0).fit(X.astype(np.float32), y)
    clf64 = BNMLPClassifier(**FAST, random_state=0).fit(X, y)
    assert clf32.predict_proba(X).dtype == np.float32
    assert clf64.predict_proba(X).dtype == np.float64
    # Same initial draw, same batches: the float32 run follows the float64 one closely.
    assert_allclose(clf32.loss_curve_[:5], clf64.loss_curve_[:5], rtol=1e-3)


def test_stopping_rules(digits):
    X_tr, _, y_tr, _ = digits
    clf = BNMLPClassifier(hidden_layer_sizes=(32,), max_iter=500, tol=1e-2, n_iter_no_change=2, random_state=0)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ConvergenceWarning)  # stopped by tol, not by max_iter
        clf.fit(X_tr, y_tr)
    assert clf.n_iter_ < 500
    with pytest.warns(ConvergenceWarning, match=r"Maximum iterations \(2\) reached"):
        BNMLPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0).fit(X_tr, y_tr)


def test_early_stopping_restores_best_validation_state(digits):
    X_tr, _, y_tr, _ = digits
    clf = BNMLPClassifier(
        hidden_layer_sizes=(32,),
        max_iter=40,
        early_stopping=True,
        n_iter_no_change=3,
        validation_fraction=0.2,
        random_state=0,
    )
    clf.fit(X_tr, y_tr)
    assert len(clf.validation_scores_) == clf.n_iter_
    assert clf.best_validation_score_ == max(clf.validation_scores_)
    assert clf.best_validation_score_ > 0.9
    if clf.n_iter_ < 40:  # stopped: the last n_iter_no_change + 1 scores did not beat the best by tol
        assert max(clf.validation_scores_[-4:]) < clf.best_validation_score_ + clf.tol


def test_record_metrics_reach_history(digits):
    X_tr, _, y_tr, _ = digits
    clf = BNMLPClassifier(
        hidden_layer_sizes=(16, 16), max_iter=2, record_metrics=["grad_norm", "ics"], record_every=3, random_state=0
    )
    clf.fit(X_tr, y_tr)
    steps = clf.history_.step
    for name in ("grad_norm", "ics"):
        rec_steps, values = clf.history_.metric(name)
        assert rec_steps == [s for s in steps if s % 3 == 0]
        assert len(values) == len(rec_steps)
    grad_norms = clf.history_.metric("grad_norm")[1][0]
    assert set(grad_norms) == {name for name, _ in clf._model.named_parameters()}
    with pytest.raises(ValueError, match="unknown metric 'nope'"):
        BNMLPClassifier(record_metrics=["nope"]).fit(X_tr, y_tr)
    with pytest.raises(ValueError, match="sequence of names"):
        BNMLPClassifier(record_metrics="ics").fit(X_tr, y_tr)


def test_recorded_ics_replays_the_steps_weight_decay(digits):
    """The estimator's loss sets the weight decay alpha / (batch size) right before each
    step; ICS replayed the update with the value found when it began (0 at step 0, the
    previous batch's on the leftover batch), or with another metric's leftover
    ("grad_norm" first). Now every order records the same, and the fit is unchanged
    (the replay's value itself: test_train_metrics.py)."""
    X_tr, _, y_tr, _ = digits
    X_tr, y_tr = X_tr[:300], y_tr[:300]  # 4 batches of 64 and a leftover of 44
    fits = {}
    for metrics in ((), ("ics",), ("grad_norm", "ics")):
        clf = BNMLPClassifier(
            hidden_layer_sizes=(20, 20),
            alpha=50.0,
            batch_size=64,
            max_iter=1,
            random_state=0,
            solver="sgd",
            momentum=0.0,
            learning_rate_init=0.1,
            record_metrics=list(metrics),
            record_every=1,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            fits[metrics] = clf.fit(X_tr, y_tr)
    assert fits[("ics",)].history_.metric("ics") == fits[("grad_norm", "ics")].history_.metric("ics")
    for clf in fits.values():
        assert all(np.array_equal(a, b) for a, b in zip(clf.coefs_, fits[()].coefs_, strict=True))


def test_batch_norm_false_has_no_batchnorm_layers():
    from numbabn.layers import BatchNorm1d, Linear

    X, y = make_blobs(n_samples=60, random_state=0)
    with_bn = BNMLPClassifier(**FAST, random_state=0).fit(X, y)
    without = BNMLPClassifier(**FAST, batch_norm=False, random_state=0).fit(X, y)
    assert [type(layer) for layer in with_bn._model] == [Linear, BatchNorm1d, Linear]
    assert with_bn._model[0].bias is None
    assert not any(isinstance(layer, BatchNorm1d) for layer in without._model)
    assert without._model[0].bias is not None


def test_pickle_round_trip_keeps_predictions_and_training_state():
    X, y = make_blobs(n_samples=80, random_state=1)
    clf = BNMLPClassifier(**FAST, random_state=0).fit(X, y)
    copy = pickle.loads(pickle.dumps(clf))
    assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))
    clf.partial_fit(X, y)
    copy.partial_fit(X, y)  # same generator, optimizer and running-statistics state
    assert_array_equal(copy.predict_proba(X), clf.predict_proba(X))


def test_clone_grid_search_pipeline(digits):
    X_tr, X_te, y_tr, y_te = digits
    pipe = make_pipeline(BatchNormTransformer(), BNMLPClassifier(hidden_layer_sizes=(16,), max_iter=5, random_state=0))
    grid = GridSearchCV(
        pipe, {"bnmlpclassifier__learning_rate_init": [1e-3, 1e-2], "bnmlpclassifier__solver": ["adam", "sgd"]}, cv=2
    )
    grid.fit(X_tr, y_tr)
    assert grid.score(X_te, y_te) > 0.8
    fitted = grid.best_estimator_[-1]
    fresh = clone(fitted)
    assert fresh.get_params() == fitted.get_params()
    assert not hasattr(fresh, "classes_")


@pytest.mark.parametrize(
    "params, match",
    [
        (dict(hidden_layer_sizes=(10, 0)), "hidden_layer_sizes must be a positive int"),
        (dict(hidden_layer_sizes="wide"), "hidden_layer_sizes must be a positive int"),
        (dict(activation="gelu"), "activation must be one of"),
        (dict(solver="newton"), "solver must be one of"),
        (dict(learning_rate_init=0), "learning_rate_init must be 'auto' or a number > 0, got 0"),
        (dict(alpha=-1e-4), "alpha must be a number >= 0"),
        (dict(alpha=float("nan")), "alpha must be a number >= 0"),
        (dict(momentum=1.5), r"momentum must be a number in \[0, 1\]"),
        (dict(batch_size=1), "batch_size must be 'auto' or an int > 1"),
        (dict(max_iter=0), "max_iter must be an int > 0"),
        (dict(validation_fraction=1.0), r"validation_fraction must be a number in \(0, 1\)"),
        (dict(batch_norm="yes"), "batch_norm must be a bool"),
        (dict(verbose=-1), "verbose must be a bool or an int >= 0, got -1"),
        (dict(verbose=1.5), "verbose must be a bool or an int >= 0, got 1.5"),
        (dict(verbose="yes"), "verbose must be a bool or an int >= 0, got 'yes'"),
        (dict(record_every=0), "record_every must be an int > 0"),
        (dict(random_state=-1), "random_state must be None, an int in"),
        (dict(random_state=2**32), "random_state must be None, an int in"),
        (dict(random_state=1.5), "random_state must be None, an int in"),
        (dict(random_state=np.random.default_rng(0)), "random_state must be None, an int in.*got Generator"),
    ],
)
def test_bad_parameters_raise_clear_errors(params, match):
    X, y = make_blobs(n_samples=20, random_state=0)
    for est in (BNMLPClassifier(**params), BNMLPRegressor(**params)):
        with pytest.raises(ValueError, match=match):
            est.fit(X, y.astype(float))


def test_one_sample_with_batch_norm_is_refused():
    with pytest.raises(ValueError, match="at least 2 samples"):
        BNMLPRegressor().fit([[1.0, 2.0]], [1.0])


def test_batch_size_one_allowed_without_batch_norm():
    """Batches of one sample are refused only where batch statistics need two; without
    batch norm they are plain SGD, as MLPRegressor(batch_size=1) allows."""
    X, y = make_regression(n_samples=30, n_features=3, random_state=0)
    est = BNMLPRegressor(hidden_layer_sizes=(8,), batch_norm=False, batch_size=1, max_iter=2, random_state=0)
    assert est.fit(X, y).n_iter_ == 2
    assert len(est.history_.step) == 2 * 30  # 30 batches of one sample per epoch
    with pytest.raises(ValueError, match=r"batch_size must be 'auto' or an int > 1 \(batch norm"):
        BNMLPRegressor(batch_size=1).fit(X, y)


def test_partial_fit_sample_rules_follow_the_fitted_network():
    """partial_fit continues the fitted network whatever set_params(batch_norm=...) says
    now: its one-sample rules follow that network, not the changed parameter."""
    X, y = make_regression(n_samples=30, n_features=3, random_state=0)
    plain = BNMLPRegressor(hidden_layer_sizes=(8,), batch_norm=False, max_iter=2, random_state=0).fit(X, y)
    plain.set_params(batch_norm=True).partial_fit(X[:1], y[:1])  # no batch norm in that network
    assert plain.n_iter_ == 1 and len(plain.loss_curve_) == 3
    bn = BNMLPRegressor(hidden_layer_sizes=(8,), max_iter=2, random_state=0).fit(X, y)
    bn.set_params(batch_norm=False)
    with pytest.raises(
        ValueError, match=r"BNMLPRegressor with batch_norm=True needs at least 2 samples.*fitted network"
    ):
        bn.partial_fit(X[:1], y[:1])
    with pytest.raises(ValueError, match=r"batch_size must be 'auto' or an int > 1 \(batch norm.*fitted network"):
        bn.set_params(batch_size=1).partial_fit(X, y)
    assert bn.n_iter_ == 2


def test_predict_proba_under_numpy_errors_raised():
    """Far-apart logits underflow to probability 0 by design; under
    np.seterr(all="raise") predict_proba used to raise FloatingPointError."""
    X, y = make_blobs(n_samples=60, centers=3, random_state=0)
    clf = BNMLPClassifier(**FAST, random_state=0).fit(X, y)
    with np.errstate(all="raise"):
        proba = clf.predict_proba(X * 1e4)  # eval-mode BN keeps the scale: logits thousands apart
    assert (proba == 0).any()
    assert_allclose(proba.sum(axis=1), 1.0)


def _fitted_state(est):
    """Fitted attributes and network parameters, copied, to compare before/after a failing call."""
    state = {k: deepcopy(v) for k, v in vars(est).items() if k.endswith("_") and k != "history_"}
    if hasattr(est, "_model"):
        state["_model"] = {k: v.copy() for k, v in est._model.state_dict().items()}
    return state


def _assert_same_state(est, state):
    assert set(state) == set(_fitted_state(est))
    for k, v in state.items():
        now = est._model.state_dict() if k == "_model" else getattr(est, k)
        if isinstance(v, dict):
            for name in v:
                assert_array_equal(now[name], v[name], err_msg=f"{k}.{name}")
        else:
            assert_array_equal(now, v, err_msg=k)


@pytest.mark.parametrize("Est", [BNMLPClassifier, BNMLPRegressor])
def test_early_stopping_validation_set_too_small(Est):
    """scikit-learn's check and message: fewer than 2 validation samples give no usable
    score (R^2 NaN), and the untrained network used to be returned."""
    X, y = make_blobs(n_samples=40, centers=2, random_state=0)
    est = Est(hidden_layer_sizes=(8,), early_stopping=True, max_iter=5, random_state=0)
    with pytest.raises(
        ValueError,
        match=r"validation_fraction=0.1 of 10 samples holds out 1 for validation; .*"
        r"The validation set is too small. Increase 'validation_fraction' or the size of your dataset.",
    ):
        est.fit(X[:10], y[:10])
    assert not [k for k in vars(est) if k.endswith("_")]  # still unfitted
    est.fit(X, y)  # 4 validation samples: fine
    state = _fitted_state(est)
    with pytest.raises(ValueError, match="The validation set is too small"):
        est.fit(X[:10], y[:10])
    _assert_same_state(est, state)


def test_early_stopping_stratifies_only_binary_targets_as_scikit_learn():
    """scikit-learn stratifies the validation split only where its network has one
    output: a multiclass y with a class of one sample, or with more classes than
    validation samples, fits (it used to raise from train_test_split)."""
    from sklearn.neural_network import MLPClassifier

    rng = np.random.default_rng(0)
    X = rng.standard_normal((60, 4))
    singleton = np.r_[np.zeros(30, int), np.ones(29, int), [2]]
    many = np.arange(60) % 20  # 20 classes, 6 validation samples
    for y in (singleton, many):
        MLPClassifier(hidden_layer_sizes=(8,), early_stopping=True, max_iter=3).fit(X, y)  # the reference fits
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", ConvergenceWarning)
            clf = BNMLPClassifier(hidden_layer_sizes=(8,), early_stopping=True, max_iter=3, random_state=0)
            assert clf.fit(X, y).n_iter_ >= 1


def test_every_sample_trains_each_epoch_in_a_last_smaller_batch():
    """scikit-learn's gen_batches: 399 samples at batch_size 200 are batches of 200 and
    199 (numbabn skipped the 199, so a partial_fit of 399 trained on 200); the epoch's
    loss weighs each batch by its size, as scikit-learn's loss_."""
    X, y = make_regression(399, 3, random_state=0)
    for batch_norm in (True, False):
        est = BNMLPRegressor(hidden_layer_sizes=(8,), batch_norm=batch_norm, batch_size=200, random_state=0)
        est.partial_fit(X, y / 100)
        assert est.t_ == 399 and len(est.history_.step) == 2
        assert est.loss_ == pytest.approx(np.dot(est.history_.loss, [200, 199]) / 399, rel=1e-12)
    X, y = make_regression(401, 3, random_state=0)  # one sample left: it joins the last batch
    est = BNMLPRegressor(hidden_layer_sizes=(8,), batch_size=200, random_state=0).partial_fit(X, y / 100)
    assert est.t_ == 401 and len(est.history_.step) == 2
    assert est.loss_ == pytest.approx(np.dot(est.history_.loss, [200, 201]) / 401, rel=1e-12)


def test_regressor_refuses_a_text_target_naming_it():
    X = np.random.default_rng(0).standard_normal((20, 3))
    for loss in ("squared_error", "poisson"):
        reg = BNMLPRegressor(hidden_layer_sizes=(4,), max_iter=1, loss=loss)
        with pytest.raises(ValueError, match="BNMLPRegressor: y must hold numbers .* got dtype <U1"):
            reg.fit(X, np.array(list("12345678901234567890")))
        assert not [k for k in vars(reg) if k.endswith("_")]


def test_early_stopping_training_split_too_small():
    X, y = make_regression(n_samples=3, n_features=2, random_state=0)
    est = BNMLPRegressor(hidden_layer_sizes=(4,), early_stopping=True, validation_fraction=0.6, max_iter=2)
    with pytest.raises(
        ValueError,
        match=r"validation_fraction=0.6 of 3 samples holds out 2 for validation and "
        r"leaves 1 to train on; batch_norm=True needs 2 \(batch statistics\)",
    ):
        est.fit(X, y)
    assert not [k for k in vars(est) if k.endswith("_")]
    est.set_params(batch_norm=False).fit(X, y)  # one training sample is enough without batch norm
    with pytest.raises(ValueError, match="holds out 3 for validation and leaves 0 to train on; training needs 1"):
        est.set_params(validation_fraction=0.9).fit(X, y)


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflows are the point
def test_early_stopping_never_selects_a_non_finite_validation_score():
    """A NaN score (network output not finite; an R^2 that overflowed) is never the best:
    with no finite score in any epoch, fit raises instead of returning the initial
    network (regressor) or a diverged one scored by argmax of NaN (classifier)."""
    X, y = make_blobs(n_samples=200, centers=3, random_state=0)
    clf = BNMLPClassifier(early_stopping=True, solver="sgd", learning_rate_init=1e200, max_iter=5, random_state=0)
    with pytest.raises(ValueError, match=r"no epoch with a finite validation score .*\[nan, nan, nan, nan, nan\]"):
        clf.fit(X, y)
    assert not hasattr(clf, "classes_")
    Xr, yr = make_regression(n_samples=100, n_features=5, random_state=0)
    reg = BNMLPRegressor(early_stopping=True, max_iter=5, random_state=0)
    with pytest.raises(ValueError, match="no epoch with a finite validation score"):
        reg.fit(Xr, yr * 1e200)  # finite predictions, but the R^2 sums overflow: NaN
    # Diverging after some finite epochs: the NaN epochs are recorded, never restored.
    clf.set_params(learning_rate_init=1e30, max_iter=20).fit(X, y)
    scores = np.array(clf.validation_scores_)
    assert np.isnan(scores).any() and clf.best_validation_score_ == np.nanmax(scores)
    assert np.isfinite(clf.predict_proba(X)).all()


def test_constant_validation_targets_score_like_sklearn():
    """r2_score of constant targets is 0 (or 1), not NaN: training stops as MLPRegressor's."""
    X, _ = make_regression(n_samples=100, n_features=5, random_state=0)
    reg = BNMLPRegressor(early_stopping=True, max_iter=30, random_state=0).fit(X, np.ones(100))
    assert reg.validation_scores_ == [0.0] * reg.n_iter_
    assert reg.n_iter_ == reg.n_iter_no_change + 2


@pytest.mark.parametrize("verbose", [0, 1, 2, np.int64(3), True, np.bool_(False)])
def test_verbose_accepts_bool_or_non_negative_int(verbose, capsys):
    X, y = make_blobs(n_samples=40, random_state=0)
    BNMLPClassifier(hidden_layer_sizes=(4,), max_iter=2, verbose=verbose, random_state=0).fit(X, y)
    printed = capsys.readouterr().out
    assert ("Iteration 2, loss = " in printed) == bool(verbose)


@pytest.mark.parametrize("Est", [BNMLPClassifier, BNMLPRegressor])
def test_partial_fit_refuses_early_stopping(Est):
    X, y = make_blobs(n_samples=60, centers=2, random_state=0)
    kw = dict(classes=[0, 1]) if Est is BNMLPClassifier else {}
    est = Est(hidden_layer_sizes=(8,), early_stopping=True, random_state=0)
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping=True"):
        est.partial_fit(X, y, **kw)
    assert not [k for k in vars(est) if k.endswith("_")]  # the first call set nothing
    est.set_params(early_stopping=False).partial_fit(X, y, **kw)
    state = _fitted_state(est)
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping=True"):
        est.set_params(early_stopping=True).partial_fit(X, y)
    _assert_same_state(est, state)


def test_best_loss_is_none_with_early_stopping():
    """scikit-learn's convention; a later partial_fit (early_stopping=False) tracks its own epochs."""
    X, y = make_blobs(n_samples=100, random_state=0)
    clf = BNMLPClassifier(hidden_layer_sizes=(8,), max_iter=5, early_stopping=True, random_state=0).fit(X, y)
    assert clf.best_loss_ is None
    clf.set_params(early_stopping=False).partial_fit(X, y)
    assert clf.best_loss_ == clf.loss_curve_[-1]
    clf.partial_fit(X, y)
    assert clf.best_loss_ == min(clf.loss_curve_[-2:])
    assert BNMLPClassifier(hidden_layer_sizes=(8,), max_iter=3).fit(X, y).best_loss_ is not None


def test_float32_network_refuses_float64_values_beyond_float32():
    """Cast to the float32 network they would become inf and give NaN probabilities."""
    X, y = make_blobs(n_samples=60, centers=2, random_state=0)
    clf = BNMLPClassifier(**FAST, random_state=0).fit(X.astype(np.float32), y)
    state = _fitted_state(clf)
    huge = X[:3] * 1e40
    for call in (clf.predict_proba, clf.predict, lambda X: clf.partial_fit(X, y[:3])):
        with pytest.raises(
            ValueError,
            match=r"X has values up to \d.\d+e\+40 in magnitude, beyond the float32 "
            r"range \(\+-3.4e\+38\) of the fitted network",
        ):
            call(huge)
    _assert_same_state(clf, state)
    assert np.isfinite(clf.predict_proba(X * 1e3)).all()  # float64 input in range: rounded to float32
    Xr, yr = make_regression(n_samples=60, n_features=3, random_state=0)
    reg = BNMLPRegressor(**FAST)
    with pytest.raises(ValueError, match="y has values up to .* beyond the float32 range"):
        reg.fit(Xr.astype(np.float32), yr * 1e40)
    assert not hasattr(reg, "n_outputs_")


def test_float32_input_to_a_float64_network_warns_nothing():
    """The range check compared a float32 maximum with the float64 one, which NumPy 2
    casts to float32: "overflow encountered in cast" at every predict of float32 X
    (an error under ``python -W error``)."""
    X, y = make_blobs(n_samples=60, centers=2, random_state=0)
    clf = BNMLPClassifier(**FAST, random_state=0).fit(X, y)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_allclose(clf.predict_proba(X.astype(np.float32)), clf.predict_proba(X), rtol=1e-5)


def test_regressor_column_y_warns_like_sklearn():
    X, y = make_regression(n_samples=60, n_features=3, random_state=0)
    reg = BNMLPRegressor(**FAST, random_state=0)
    for call in (reg.fit, reg.partial_fit):
        with pytest.warns(DataConversionWarning, match="column-vector y was passed when a 1d array was expected"):
            call(X, y[:, None])
    assert reg.n_outputs_ == 1 and reg.predict(X).shape == (60,)
    with warnings.catch_warnings():
        warnings.simplefilter("error", DataConversionWarning)
        reg.fit(X, y)
        reg.fit(X, np.column_stack([y, y]))  # several targets: no warning


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # the overflows are the point
@pytest.mark.parametrize("Est", [BNMLPClassifier, BNMLPRegressor])
def test_diverged_training_raises_like_sklearn_and_keeps_state(Est):
    """MLPClassifier/MLPRegressor raise "Solver produced non-finite parameter weights"
    when training diverges; returning the NaN network would predict NaN (and the
    classifier classes_[0] everywhere, argmax of NaN) without a word."""
    X, y = make_blobs(n_samples=60, centers=2, random_state=0)
    y = y if Est is BNMLPClassifier else y.astype(float)
    est = Est(hidden_layer_sizes=(8,), max_iter=3, random_state=0)
    with pytest.raises(ValueError, match="Solver produced non-finite parameter weights"):
        est.fit(X * 1e200, y)  # the batch variance overflows
    assert not hasattr(est, "n_iter_")
    est.fit(X, y)

    def fitted_state():
        return pickle.dumps({k: v for k, v in est.__getstate__().items() if k.endswith("_") or k.startswith("_")})

    before = fitted_state()
    kwargs = dict(classes=np.unique(y)) if Est is BNMLPClassifier else {}
    with pytest.raises(ValueError, match="Solver produced non-finite parameter weights"):
        est.partial_fit(X * 1e200, y, **kwargs)
    assert fitted_state() == before
    est.set_params(solver="sgd", learning_rate_init=1e300)
    with pytest.raises(ValueError, match="Solver produced non-finite parameter weights"):
        est.fit(X, y)  # the steps overflow
    assert fitted_state() == before


@pytest.mark.parametrize("batch_norm", [True, False])
def test_alpha_is_scikit_learns_l2_penalty_on_the_weights(batch_norm):
    # One SGD step (one batch of all N samples, no momentum) from the same network W0
    # (one step without alpha, so that the biases are no longer zero): with alpha the
    # weight matrices move by a further -lr*alpha*W0/N (scikit-learn's gradient
    # alpha*W/N), every other parameter as without alpha; alpha is read at each call.
    X, y = make_blobs(n_samples=40, n_features=5, random_state=0)
    N, lr, alpha = len(X), 0.1, 0.5

    def second_step(lr_factor, alpha):
        est = BNMLPClassifier(
            hidden_layer_sizes=(8, 6),
            solver="sgd",
            momentum=0.0,
            learning_rate_init=lr,
            alpha=0.0,
            batch_size=N,
            batch_norm=batch_norm,
            random_state=0,
        )
        est.partial_fit(X, y, classes=np.unique(y))
        est._optimizer.lr = lr_factor * lr
        return est.set_params(alpha=alpha).partial_fit(X, y)._model.state_dict()

    plain, double, penalised = second_step(1, 0.0), second_step(2, 0.0), second_step(1, alpha)
    weights = [k for k in plain if k.endswith("weight") and plain[k].ndim == 2]
    assert len(weights) == 3
    for key in plain:
        if key in weights:
            w0 = 2 * plain[key] - double[key]  # W0 - lr*g and W0 - 2*lr*g give W0
            assert_allclose(penalised[key], plain[key] - lr * alpha / N * w0, rtol=1e-12, atol=1e-14)
            assert not np.allclose(penalised[key], plain[key])
        else:  # biases, gamma/beta, running statistics: no penalty
            assert_array_equal(penalised[key], plain[key])


def test_alpha_in_a_grid_search(digits):
    X_tr, X_te, y_tr, y_te = digits
    grid = GridSearchCV(
        BNMLPClassifier(hidden_layer_sizes=(16,), max_iter=5, random_state=0), {"alpha": [0.0, 1.0]}, cv=2
    )
    grid.fit(X_tr, y_tr)
    assert grid.best_params_["alpha"] in (0.0, 1.0) and grid.score(X_te, y_te) > 0.8


def _weights(est):
    return {k: v.copy() for k, v in est._model.state_dict().items() if k.endswith("weight") and v.ndim == 2}


@pytest.mark.parametrize("Est", [BNMLPClassifier, BNMLPRegressor])
def test_warm_start_fit_continues_the_fitted_network(Est):
    X, y = make_blobs(n_samples=120, n_features=4, random_state=0)
    y = y if Est is BNMLPClassifier else y.astype(float)
    est = Est(hidden_layer_sizes=(8,), max_iter=5, warm_start=True, random_state=0).fit(X, y)
    first = _weights(est)
    # a second fit with a vanishing learning rate starts from where the first ended ...
    est.set_params(learning_rate_init=1e-20, max_iter=3).fit(X, y)
    for key, w in _weights(est).items():
        assert_allclose(w, first[key], rtol=1e-12)
    assert est.n_iter_ == 3 and len(est.loss_curve_) == 8  # this call's epochs; the curve carries on
    assert est._optimizer.lr == 1e-20  # a fresh optimizer with the current settings
    # ... where a cold fit starts from a new initialisation
    cold = clone(est).set_params(warm_start=False).fit(X, y)
    assert any(not np.allclose(w, first[k]) for k, w in _weights(cold).items())
    assert cold.n_iter_ == 3 and len(cold.loss_curve_) == 3


def test_warm_start_early_stopping_scores_carry_on():
    X, y = make_blobs(n_samples=200, n_features=4, random_state=0)
    est = BNMLPClassifier(hidden_layer_sizes=(8,), max_iter=4, early_stopping=True, warm_start=True, random_state=0)
    est.fit(X, y)
    n1, best = len(est.validation_scores_), est.best_validation_score_
    est.fit(X, y)
    assert len(est.validation_scores_) == n1 + est.n_iter_
    assert est.best_validation_score_ >= best


@pytest.mark.parametrize(
    "change, match",
    [
        (dict(hidden_layer_sizes=(9,)), r"fitted network, which has hidden_layer_sizes=\(8,\), but hidden_layer"),
        (dict(activation="tanh"), "which has activation='relu', but activation is now 'tanh'"),
        (dict(batch_norm=False), "which has batch_norm=True, but batch_norm is now False"),
        ("classes", r"warm_start can only be used where `y` has the same classes as in the previous call to fit"),
        ("features", "X has 3 features, but BNMLPClassifier is expecting 4 features"),
    ],
)
def test_a_warm_start_that_cannot_continue_raises_and_changes_nothing(change, match):
    X, y = make_blobs(n_samples=120, n_features=4, centers=3, random_state=0)
    est = BNMLPClassifier(hidden_layer_sizes=(8,), max_iter=3, warm_start=True, random_state=0).fit(X, y)
    before = pickle.dumps(est)
    X2, y2 = X, y
    if change == "classes":
        y2 = np.where(y == 2, 1, y)  # one class fewer
    elif change == "features":
        X2 = X[:, :3]
    else:
        est.set_params(**change)
        before = pickle.dumps(est)
    with pytest.raises(ValueError, match=match):
        est.fit(X2, y2)
    assert pickle.dumps(est) == before


@pytest.mark.parametrize("ours, theirs", [(BNMLPClassifier, "MLPClassifier"), (BNMLPRegressor, "MLPRegressor")])
def test_n_iter_and_loss_curve_count_as_in_scikit_learn(ours, theirs):
    """n_iter_ is the epochs of the last call (1 after partial_fit), loss_curve_ grows
    across partial_fit calls and restarts with fit: step by step as scikit-learn's."""
    import sklearn.neural_network as nn

    X, y = make_blobs(40, 3, centers=2, random_state=0)
    common = dict(hidden_layer_sizes=(4,), max_iter=5, n_iter_no_change=100, random_state=0)
    pair = (ours(**common), getattr(nn, theirs)(**common))
    first = {"classes": [0, 1]} if ours is BNMLPClassifier else {}
    calls = [("partial_fit", first), ("partial_fit", {}), ("fit", {}), ("partial_fit", {})]
    for method, kwargs in calls:
        for est in pair:
            getattr(est, method)(X, y, **kwargs)
        assert pair[0].n_iter_ == pair[1].n_iter_, method
        assert len(pair[0].loss_curve_) == len(pair[1].loss_curve_), method


@pytest.mark.parametrize("ours, theirs", [(BNMLPClassifier, "MLPClassifier"), (BNMLPRegressor, "MLPRegressor")])
@pytest.mark.parametrize("early_stopping", [False, True])
def test_fitted_attributes_are_scikit_learns(ours, theirs, early_stopping):
    """Code written against scikit-learn's MLPs reads the same fitted attributes:
    loss_ (the last epoch's loss), t_, n_layers_, out_activation_, and
    validation_scores_ / best_validation_score_ (None without early stopping)."""
    import sklearn.neural_network as nn

    X, y = make_blobs(60, 3, centers=3, random_state=0)
    common = dict(hidden_layer_sizes=(4, 5), max_iter=3, batch_size=20, early_stopping=early_stopping, random_state=0)
    est, ref = ours(**common).fit(X, y), getattr(nn, theirs)(**common).fit(X, y)
    expected = {k for k in vars(ref) if k.endswith("_") and not k.startswith("_")} - {"coefs_", "intercepts_"}
    if ours is BNMLPClassifier:
        expected -= {"n_outputs_"}  # scikit-learn's classifier counts its output units
    assert expected <= set(vars(est))
    assert est.loss_ == est.loss_curve_[-1]
    assert est.n_layers_ == ref.n_layers_ == 4
    assert est.out_activation_ == ref.out_activation_  # softmax for 3 classes, identity for regression
    n_train = len(X) - (ceil(0.1 * len(X)) if early_stopping else 0)
    assert est.t_ == ref.t_ == 3 * n_train  # every sample, the last batch of 14 or 20 included
    for name in ("validation_scores_", "best_validation_score_"):
        assert (getattr(est, name) is None) == (getattr(ref, name) is None) == (not early_stopping)


def test_coefs_and_intercepts_in_scikit_learns_layout():
    """Without batch norm the network is scikit-learn's: its predictions are those of
    coefs_ and intercepts_ (relu hidden layers, identity output); both are views."""
    rng = np.random.default_rng(0)
    X, y = rng.normal(size=(60, 5)), rng.normal(size=60)
    est = BNMLPRegressor(hidden_layer_sizes=(7, 3), batch_norm=False, max_iter=5).fit(X, y)
    assert [c.shape for c in est.coefs_] == [(5, 7), (7, 3), (3, 1)]
    assert [b.shape for b in est.intercepts_] == [(7,), (3,), (1,)]
    h = X
    for W, b in zip(est.coefs_[:-1], est.intercepts_[:-1], strict=True):
        h = np.maximum(h @ W + b, 0.0)
    assert_allclose((h @ est.coefs_[-1] + est.intercepts_[-1]).ravel(), est.predict(X), rtol=1e-12)
    before = est.predict(X)
    est.coefs_[0][0, 0] += 1.0  # a view: the network changes, as with scikit-learn's arrays
    assert not np.array_equal(est.predict(X), before)
    again = pickle.loads(pickle.dumps(est))
    assert_array_equal(again.coefs_[0], est.coefs_[0])

    bn = BNMLPClassifier(hidden_layer_sizes=(6,), max_iter=3).fit(X, (y > 0).astype(int))
    assert [c.shape for c in bn.coefs_] == [(5, 6), (6, 1)]  # two classes: one logistic output
    assert not hasattr(bn, "intercepts_")
    with pytest.raises(AttributeError, match="no intercepts_ with batch norm"):
        _ = bn.intercepts_
    assert not hasattr(BNMLPClassifier(), "coefs_")


def test_predict_log_proba_is_log_softmax():
    rng = np.random.default_rng(1)
    X, y = rng.normal(size=(50, 4)), rng.integers(0, 3, 50)
    est = BNMLPClassifier(hidden_layer_sizes=(8,), max_iter=5).fit(X, y)
    assert_allclose(np.exp(est.predict_log_proba(X)), est.predict_proba(X), rtol=1e-12)
    # Logits 2000 apart: the smaller probability underflows, its log stays finite and exact.
    out = est._model.layers[-1]
    out.weight.value[...] = 0.0
    out.bias.value[...] = [0.0, -2000.0, 1.0]
    log_p = est.predict_log_proba(X[:2])
    assert est.predict_proba(X[:2])[0, 1] == 0.0
    expected = np.array([0.0, -2000.0, 1.0]) - np.log1p(np.exp(-1.0)) - 1.0
    assert_allclose(log_p, np.tile(expected, (2, 1)), rtol=1e-12)


@pytest.mark.parametrize(
    "call",
    [
        lambda X, y: BNMLPClassifier(hidden_layer_sizes=(8,), max_iter=2, random_state=0).fit(X, y),
        lambda X, y: BNMLPClassifier(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=2, random_state=0).fit(X, y),
        lambda X, y: BNMLPRegressor(hidden_layer_sizes=(8,), max_iter=2, random_state=0).fit(X, y * 1.0),
    ],
    ids=["sgd", "lbfgs", "regressor"],
)
def test_convergence_warnings_point_at_the_callers_line(digits, call):
    """As a warning should: at the line that called fit (here, this file), not inside
    numbabn (its working copy's ``_fit``), so ``-W`` filters by module and the report
    name the user's code."""
    X_tr, _, y_tr, _ = digits
    with pytest.warns(ConvergenceWarning) as record:
        call(X_tr, y_tr)
    assert [w.filename for w in record] == [__file__], [(w.filename, w.lineno) for w in record]
