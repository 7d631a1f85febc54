"""The BN-MLPs' optimizer settings that mirror scikit-learn's MLPs: ``learning_rate``
schedules ("constant", "invscaling", "adaptive") with ``power_t``,
``nesterovs_momentum``, Adam's ``beta_1``/``beta_2``/``epsilon`` and ``shuffle``.

Without batch norm and on full batches taken in order, the network is scikit-learn's
MLPRegressor step for step, with the same settings, once both start from the same
weights: the trajectories are compared against ``MLPRegressor`` itself.
"""

import pickle
import warnings

import numpy as np
import pytest
from numpy.testing import assert_allclose, assert_array_equal
from sklearn.exceptions import ConvergenceWarning
from sklearn.neural_network import MLPRegressor

from numbabn.layers import Linear, MSELoss, Sequential
from numbabn.optim import SGD
from numbabn.sklearn import BNMLPClassifier, BNMLPRegressor
from numbabn.train import Trainer

from .helpers import load_sklearn_mlp_weights

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


def _problem(n=48, d=4):
    rng = np.random.default_rng(3)
    X = rng.normal(size=(n, d))
    y = np.tanh(X @ rng.normal(size=d)) + 0.1 * rng.normal(size=n)
    return X, y


def _same_start(ours, theirs, X, y):
    """Fit both for one epoch to build their networks, then give ours scikit-learn's
    weights and restart both counts: the next warm-started fits start equal."""
    ours.set_params(max_iter=1).fit(X, y)
    theirs.set_params(max_iter=1).fit(X, y)
    load_sklearn_mlp_weights(ours, theirs)
    for est in (ours, theirs):
        est.t_, est._no_improvement_count = 0, 0
        est.set_params(warm_start=True)


def _pair(epochs, lr, **settings):
    common = dict(hidden_layer_sizes=(6,), activation="relu", solver="sgd", alpha=0.0, shuffle=False, **settings)
    ours = BNMLPRegressor(batch_norm=False, learning_rate_init=lr, batch_size=48, **common)
    theirs = MLPRegressor(learning_rate_init=lr, batch_size=48, random_state=0, **common)
    X, y = _problem()
    _same_start(ours, theirs, X, y)
    ours.set_params(max_iter=epochs).fit(X, y)
    theirs.set_params(max_iter=epochs).fit(X, y)
    return ours, theirs, X


@pytest.mark.parametrize(
    "settings",
    [
        dict(learning_rate="constant", momentum=0.9, nesterovs_momentum=True),
        dict(learning_rate="constant", momentum=0.9, nesterovs_momentum=False),
        dict(learning_rate="invscaling", power_t=0.5, momentum=0.0),
        dict(learning_rate="invscaling", power_t=0.25, momentum=0.0),
    ],
)
def test_sgd_steps_as_scikit_learns_mlp(settings):
    ours, theirs, X = _pair(6, 0.02, **settings)
    assert ours.n_iter_ == theirs.n_iter_ == 6
    assert ours.t_ == theirs.t_ == 6 * X.shape[0]
    assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-10, atol=1e-12)
    if settings["learning_rate"] == "invscaling":
        assert ours._optimizer.lr == pytest.approx(theirs._optimizer.learning_rate, rel=1e-14)


@pytest.mark.parametrize("outputs", [1, 3])
def test_the_same_settings_give_scikit_learns_steps_losses_and_stopping(outputs):
    """The squared loss is scikit-learn's for any number of outputs: the same
    learning_rate_init and alpha take the same steps, loss_curve_ holds scikit-learn's
    values (which divide by the number of outputs) and the tol rule stops at the same
    epoch. (numbabn's MSE took twice the steps for one target, 2/3 of them for three.)"""
    X, y = _problem()
    Y = y if outputs == 1 else np.c_[y, 2 * y, np.sin(3 * y)]
    common = dict(hidden_layer_sizes=(6,), solver="sgd", alpha=1e-3, shuffle=False, momentum=0.9, tol=1e-3)
    ours = BNMLPRegressor(batch_norm=False, learning_rate_init=0.01, batch_size=16, **common)
    theirs = MLPRegressor(learning_rate_init=0.01, batch_size=16, random_state=0, **common)
    _same_start(ours, theirs, X, Y)
    ours.set_params(max_iter=200).fit(X, Y)
    theirs.set_params(max_iter=200).fit(X, Y)
    assert ours.n_iter_ == theirs.n_iter_ < 200
    assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-10, atol=1e-12)
    # scikit-learn's loss_curve_ adds the penalty, numbabn's leaves it out (module docstring)
    penalty = [0.5 * 1e-3 * sum(float(np.sum(w * w)) for w in theirs.coefs_) / 16]
    assert ours.loss_curve_[-1] == pytest.approx(theirs.loss_curve_[-1] - penalty[0], rel=1e-2)


def test_a_regressor_fitted_with_the_mean_squared_error_keeps_it():
    """Networks fitted before the squared loss became scikit-learn's (their ``_arch``
    has no "squared_loss") continue with the mean squared error they were fitted with:
    switching would halve their steps at the same learning rate and mix two units in
    loss_curve_ (an epoch at half the loss counted as an improvement)."""
    from numbabn.layers import HalfSquaredError
    from numbabn.sklearn._weighted import WeightedHalfSquaredError, WeightedMSELoss

    X, Y = _problem()
    new = BNMLPRegressor(hidden_layer_sizes=(4,), solver="sgd", batch_norm=False, max_iter=2, random_state=0)
    new.fit(X, Y)
    old = pickle.loads(pickle.dumps(new))
    del old._arch["squared_loss"]  # as pickled before 2026-12-05
    assert new._loss_class() is HalfSquaredError and old._loss_class() is MSELoss
    assert type(new._trainer(48, []).loss) is WeightedHalfSquaredError
    assert type(old._trainer(48, []).loss) is WeightedMSELoss
    two = BNMLPRegressor(hidden_layer_sizes=(4,), max_iter=1).fit(X, np.c_[Y, Y])
    assert two._reported_loss(3.0) == 1.5 and new._reported_loss(3.0) == old._reported_loss(3.0) == 3.0
    del two._arch["squared_loss"]
    assert two._reported_loss(3.0) == 3.0  # the MSE is reported as it is
    # the same state, one epoch each: the old network steps twice as far for one target
    # (its MSE's gradient is 2/K times the half squared error's) and reports the MSE
    before = new.predict(X)
    new.partial_fit(X, Y)
    old.partial_fit(X, Y)
    step_new, step_old = new.predict(X) - before, old.predict(X) - before
    assert np.abs(step_old).max() > 0 and not np.allclose(step_old, step_new, rtol=0.1)
    assert old.loss_curve_[-1] == pytest.approx(2 * new.loss_curve_[-1], rel=0.05)


def test_auto_learning_rate():
    """0.01 (batch norm takes larger steps), but scikit-learn's 0.001 for the regressor's
    SGD, which at 0.01 diverged on scikit-learn's own multi-output check."""
    X, y = _problem()
    kw = dict(hidden_layer_sizes=(4,), max_iter=1)
    lrs = [
        BNMLPRegressor(solver="sgd", **kw).fit(X, y)._optimizer.lr,
        BNMLPRegressor(solver="adam", **kw).fit(X, y)._optimizer.lr,
        BNMLPClassifier(solver="sgd", **kw).fit(X, y > 0)._optimizer.lr,
        BNMLPRegressor(solver="sgd", learning_rate_init=0.05, **kw).fit(X, y)._optimizer.lr,
    ]
    assert lrs == [0.001, 0.01, 0.01, 0.05]
    with pytest.raises(ValueError, match="learning_rate_init must be 'auto' or a number > 0, got 'fast'"):
        BNMLPRegressor(learning_rate_init="fast", **kw).fit(X, y)


@pytest.mark.parametrize("n, batch_size", [(50, 16), (49, 16)])
def test_unequal_batches_step_as_scikit_learns_mlp(n, batch_size):
    """50 samples in batches of 16: scikit-learn trains 16, 16, 16 and a last batch of
    2 (49: of 1), with the penalty alpha*W over each batch's own size; numbabn skipped
    the leftover (and its t_ counted 48 an epoch). (With batch norm a single leftover
    sample joins the batch before instead: it cannot be normalised alone.)"""
    common = dict(hidden_layer_sizes=(6,), activation="relu", solver="sgd", shuffle=False, momentum=0.9)
    ours = BNMLPRegressor(batch_norm=False, learning_rate_init=0.04, batch_size=batch_size, alpha=1e-3, **common)
    theirs = MLPRegressor(learning_rate_init=0.04, batch_size=batch_size, alpha=1e-3, random_state=0, **common)
    X, y = _problem(n=n)
    _same_start(ours, theirs, X, y)
    ours.set_params(max_iter=5).fit(X, y)
    theirs.set_params(max_iter=5).fit(X, y)
    assert ours.t_ == theirs.t_ == 5 * n
    assert_allclose(ours.predict(X), theirs.predict(X), rtol=1e-10, atol=1e-12)


def test_nesterov_changes_the_trajectory():
    """The flag reaches the optimizer: without it the same start ends elsewhere."""
    a, _, X = _pair(6, 0.02, momentum=0.9, nesterovs_momentum=True)
    b, _, _ = _pair(6, 0.02, momentum=0.9, nesterovs_momentum=False)
    assert a._optimizer.nesterov and not b._optimizer.nesterov
    assert np.abs(a.predict(X) - b.predict(X)).max() > 1e-6


def test_adaptive_divides_by_five_and_stops_where_scikit_learn_does():
    """tol so large that no epoch counts as an improvement: the rate is divided by 5
    every n_iter_no_change + 1 epochs until it is <= 1e-6, then training stops."""
    X, y = _problem()
    kw = dict(hidden_layer_sizes=(6,), solver="sgd", learning_rate="adaptive", tol=1e9, n_iter_no_change=1)
    ours = BNMLPRegressor(batch_norm=False, learning_rate_init=0.01, max_iter=100, **kw).fit(X, y)
    theirs = MLPRegressor(learning_rate_init=0.01, max_iter=100, random_state=0, **kw).fit(X, y)
    assert ours.n_iter_ == theirs.n_iter_ < 100
    assert ours._optimizer.lr == pytest.approx(theirs._optimizer.learning_rate, rel=1e-12)
    assert ours._optimizer.lr <= 1e-6


def test_adam_ignores_the_schedule_and_takes_its_betas_and_epsilon():
    X, y = _problem()
    kw = dict(hidden_layer_sizes=(6,), max_iter=5, random_state=0, tol=1e9, n_iter_no_change=1)
    est = BNMLPRegressor(learning_rate="adaptive", beta_1=0.5, beta_2=0.9, epsilon=1e-3, **kw).fit(X, y)
    assert est._optimizer.betas == (0.5, 0.9) and est._optimizer.eps == 1e-3
    assert est._optimizer.lr == est._learning_rate_init()  # not divided
    default = BNMLPRegressor(**kw).fit(X, y)
    assert est.n_iter_ == default.n_iter_ == 3  # stops as without a schedule (epoch 1 improves on inf)
    assert np.abs(est.predict(X) - default.predict(X)).max() > 1e-6


def test_invscaling_carries_across_partial_fit_and_pickles():
    X, y = _problem()
    est = BNMLPRegressor(hidden_layer_sizes=(6,), solver="sgd", learning_rate="invscaling", batch_size=16, power_t=0.5)
    for _ in range(3):
        est.partial_fit(X, y)
    assert est.t_ == 3 * X.shape[0]
    assert est._optimizer.lr == pytest.approx(0.001 / (est.t_ + 1) ** 0.5, rel=1e-14)
    again = pickle.loads(pickle.dumps(est))
    assert again._optimizer.lr == est._optimizer.lr
    est.partial_fit(X, y)
    again.partial_fit(X, y)
    assert_array_equal(est.predict(X), again.predict(X))
    assert est._optimizer.lr == pytest.approx(0.001 / (4 * X.shape[0] + 1) ** 0.5, rel=1e-14)


def test_adaptive_in_partial_fit_divides_as_scikit_learn():
    X, y = _problem()
    kw = dict(hidden_layer_sizes=(6,), solver="sgd", learning_rate="adaptive", tol=1e9, n_iter_no_change=1)
    ours = BNMLPRegressor(batch_norm=False, learning_rate_init=0.01, **kw)
    theirs = MLPRegressor(learning_rate_init=0.01, random_state=0, **kw)
    for _ in range(7):
        ours.partial_fit(X, y)
        theirs.partial_fit(X, y)
        assert ours._optimizer.lr == pytest.approx(theirs._optimizer.learning_rate, rel=1e-12)
    assert ours._optimizer.lr < 0.01 / 5**2


def test_shuffle_false_takes_every_sample_in_order_every_epoch():
    X = np.arange(11, dtype=np.float64)[:, None] * np.ones((1, 2))
    y = np.zeros((11, 1))
    seen = []

    class Recording(Sequential):
        def forward(self, x):
            seen.append(x[:, 0].astype(int).tolist())
            return super().forward(x)

    model = Recording(Linear(2, 1, rng=0, dtype=np.float64))
    trainer = Trainer(model, MSELoss(), SGD(model.parameters(), lr=0.0), batch_size=4, seed=0, shuffle=False, verbose=0)
    trainer.fit(X, y, epochs=2)
    order = [[0, 1, 2, 3], [4, 5, 6, 7, 8, 9, 10]]
    assert seen == order + order
    with pytest.raises(TypeError, match="shuffle must be a bool"):
        Trainer(model, MSELoss(), SGD(model.parameters(), lr=0.1), batch_size=4, seed=0, shuffle="no")


def test_shuffle_false_fits_do_not_depend_on_the_batch_order_seed():
    """Without shuffling only the initial weights use the generator: the same start
    (random_state) gives the same fit, and every sample is counted in t_ (with
    shuffling too: the 50 mod 16 left over are a batch of their own, as in scikit-learn)."""
    X, y = _problem(n=50)
    kw = dict(hidden_layer_sizes=(6,), batch_size=16, max_iter=4, shuffle=False)
    a = BNMLPRegressor(random_state=1, **kw).fit(X, y)
    assert a.t_ == 4 * 50
    ours_shuffled = BNMLPRegressor(random_state=1, **{**kw, "shuffle": True}).fit(X, y)
    assert ours_shuffled.t_ == 4 * 50
    assert np.abs(a.predict(X) - ours_shuffled.predict(X)).max() > 1e-6


@pytest.mark.parametrize(
    "param, value, match",
    [
        ("learning_rate", "optimal", "learning_rate must be one of"),
        ("power_t", -0.5, "power_t must be a number >= 0"),
        ("nesterovs_momentum", 1, "nesterovs_momentum must be a bool"),
        ("shuffle", "yes", "shuffle must be a bool"),
        ("beta_1", 1.0, r"beta_1 must be a number in \[0, 1\)"),
        ("beta_2", -0.1, r"beta_2 must be a number in \[0, 1\)"),
        ("epsilon", 0.0, "epsilon must be a number > 0"),
    ],
)
def test_bad_settings_are_named_and_change_nothing(param, value, match):
    X, y = _problem()
    labels = (y > 0).astype(int)
    est = BNMLPClassifier(hidden_layer_sizes=(4,), max_iter=2).fit(X, labels)
    before = pickle.dumps(est)
    est.set_params(**{param: value})
    with pytest.raises(ValueError, match=match):
        est.fit(X, labels)
    with pytest.raises(ValueError, match=match):
        est.partial_fit(X, labels)
    est.set_params(**{param: BNMLPClassifier().get_params()[param]})
    assert pickle.dumps(est) == before


def test_an_estimator_pickled_before_these_settings_still_loads():
    """Its fitted architecture lacks the new keys: it keeps the behaviour it was
    fitted with (no Nesterov step, Adam's defaults, a constant rate)."""
    X, y = _problem()
    est = BNMLPRegressor(hidden_layer_sizes=(4,), solver="sgd", max_iter=2).fit(X, y)
    state = est.__getstate__()
    state["_arch"] = {k: v for k, v in state["_arch"].items() if k not in ("nesterov", "betas", "epsilon")}
    state["_arch"] = {k: v for k, v in state["_arch"].items() if k not in ("schedule", "power_t")}
    state["_optimizer"]["hyperparameters"]["nesterov"] = False
    old = object.__new__(BNMLPRegressor)
    old.__setstate__(state)
    assert not old._optimizer.nesterov
    assert_allclose(old.predict(X), est.predict(X), rtol=0, atol=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", ConvergenceWarning)
        old.partial_fit(X, y)
    assert old._optimizer.lr == est._learning_rate_init()
