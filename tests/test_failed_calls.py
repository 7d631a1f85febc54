"""The rule across the public surface: a call that raises leaves every object it
touched exactly as it was -- parameters, buffers, caches, gradients, generators,
optimizer state, fitted attributes, files.

Each test takes a fingerprint of the objects, makes a call fail, and compares.
(The functional kernels' own checks are in test_errors.py, the optimizers' in
test_optim.py, synchronized BN over real MPI ranks in test_distributed_mpi.py.)
"""

import json
import os
import pickle
import subprocess
import sys
import warnings

import numpy as np
import pytest
from click.testing import CliRunner
from sklearn.exceptions import NotFittedError

import numbabn
from numbabn.layers import BatchNorm1d, Linear, ReLU, Sequential, SoftmaxCrossEntropy
from numbabn.optim import SGD, Adam
from numbabn.registry import available_layers, layer_class
from numbabn.train import Trainer

pytestmark = pytest.mark.filterwarnings("ignore::sklearn.exceptions.ConvergenceWarning")


# ---------------------------------------------------------------- fingerprints
def _all_layers(layer):
    yield layer
    for child in layer.children():
        yield from _all_layers(child)


def fingerprint(layer):
    """Everything observable about a layer tree: attributes (by identity), parameter
    and buffer values, gradients (identity and values), generator states."""
    out = []
    for lay in _all_layers(layer):
        attrs = dict(vars(lay))
        rngs = {k: v.bit_generator.state for k, v in attrs.items() if isinstance(v, np.random.Generator)}
        out.append((lay, attrs, rngs))
    state = layer.state_dict()
    grads = [(p, p.grad, None if p.grad is None else p.grad.copy()) for p in layer.parameters()]
    return out, state, grads


CACHES = {"_x", "_ctx", "_saved", "_out_dtype", "_cache", "_in"}  # the layers' _transient names


def assert_unchanged(layer, before, caches_dropped=False):
    """Nothing observable changed (``caches_dropped``: but the forward caches, now None)."""
    layers, state, grads = before
    after_layers, after_state, after_grads = fingerprint(layer)
    for (lay, attrs, rngs), (lay2, attrs2, rngs2) in zip(layers, after_layers, strict=True):
        assert lay is lay2
        assert attrs.keys() == attrs2.keys(), type(lay).__name__
        for k in attrs:
            if caches_dropped and k in CACHES:
                assert attrs2[k] is None, f"{type(lay).__name__}.{k} kept"
                continue
            assert attrs[k] is attrs2[k], f"{type(lay).__name__}.{k} was rebound"
        assert rngs == rngs2, f"{type(lay).__name__}: a generator advanced"
    assert state.keys() == after_state.keys()
    for k in state:
        np.testing.assert_array_equal(state[k], after_state[k], err_msg=k)
    for (p, g, copy), (p2, g2, _) in zip(grads, after_grads, strict=True):
        assert p is p2 and g is g2, f"{p!r}: grad rebound"
        if g is not None:
            np.testing.assert_array_equal(g, copy)


# ---------------------------------------------------------------- every registered layer
NAMES = list(available_layers())


def _trained_example(name):
    """The contract example after one forward/backward: caches and grads are set."""
    layer, x = layer_class(name)._contract_example(np.random.default_rng(0), np.float64)
    layer.backward(np.ones_like(layer.forward(x)))
    return layer, x


@pytest.mark.parametrize("name", NAMES)
def test_layer_calls_that_raise_change_nothing(name):
    layer, x = _trained_example(name)
    raised = 0
    for bad in [x.astype(np.float32), x[:, :1], x[None, None], np.ones(3), x.astype(np.int64)]:
        layer, _ = _trained_example(name)
        before = fingerprint(layer)
        try:
            layer.forward(bad)  # activations, for one, take any shape and float dtype
        except (TypeError, ValueError):
            raised += 1
            assert_unchanged(layer, before)
    assert raised >= (1 if layer.dtype is None else 2), "the example layer accepted almost anything"
    before = fingerprint(layer)
    with pytest.raises((TypeError, ValueError)):
        layer.backward(np.ones(3))
    assert_unchanged(layer, before)
    with pytest.raises(TypeError):
        layer.train("yes")
    assert_unchanged(layer, before)
    if layer.state_dict():
        bad_state = layer.state_dict()
        last = list(bad_state)[-1]
        bad_state = {k: np.array(v + 1) for k, v in bad_state.items()}
        bad_state[last] = np.zeros((7, 7))  # every other entry is fine, and different
        with pytest.raises((TypeError, ValueError)):
            layer.load_state_dict(bad_state)
        assert_unchanged(layer, before)


@pytest.mark.parametrize("name", [n for n in NAMES if n != "sequential"])
def test_load_state_dict_into_a_read_only_array_writes_nothing(name):
    layer, _ = _trained_example(name)
    state = layer.state_dict()
    if not state:
        pytest.skip("no state")
    new = {k: np.array(v + 1) for k, v in state.items()}
    targets = dict(layer._named_state())
    last = list(targets)[-1]
    targets[last].setflags(write=False)  # e.g. loaded with joblib mmap_mode="r"
    before = fingerprint(layer)
    with pytest.raises(ValueError, match="read-only"):
        layer.load_state_dict(new)
    assert_unchanged(layer, before)
    targets[last].setflags(write=True)
    layer.load_state_dict(new)  # writeable again: it loads
    for k, v in layer.state_dict().items():
        np.testing.assert_array_equal(v, new[k])


def _mlp(rng):
    return Sequential(
        Linear(4, 6, rng=rng, dtype=np.float64),
        BatchNorm1d(6, dtype=np.float64),
        ReLU(),
        Linear(6, 3, rng=rng, dtype=np.float64),
    )


def test_sequential_is_all_or_nothing():
    """A layer deep in the chain raises: the layers before it (BatchNorm's running
    statistics, every cache) or after it (gradients) are put back."""
    rng = np.random.default_rng(0)
    model = _mlp(rng)
    x = rng.standard_normal((8, 4))
    model.backward(np.ones_like(model.forward(x)))
    model.layers[3].in_features = 5  # the last Linear now rejects its input
    before = fingerprint(model)
    with pytest.raises(ValueError, match="expected input of shape"):
        model.forward(x + 10)
    assert_unchanged(model, before, caches_dropped=True)  # let go once the first layer ran
    with pytest.raises(RuntimeError, match="backward called before forward"):
        model.backward(np.ones((8, 3)))
    model.layers[3].in_features = 6
    model.forward(x)
    model.layers[0]._x = None  # the first layer fails in backward
    before = fingerprint(model)
    with pytest.raises(RuntimeError, match="backward called before forward"):
        model.backward(np.ones((8, 3)))
    assert_unchanged(model, before)


def test_a_sequential_forward_lets_the_last_forwards_caches_go():
    """Each layer's previous cache is gone by the time the last layer runs (kept for
    a possible failure, they made a forward hold two steps' activations at once)."""
    import gc
    import weakref

    rng = np.random.default_rng(0)
    model = _mlp(rng)
    x = rng.standard_normal((8, 4))
    model.backward(np.ones_like(model.forward(x * 1.0)))  # layer 0 caches an input nobody else holds
    old = [weakref.ref(model.layers[i]._x) for i in (0, 3)] + [weakref.ref(model.layers[1]._ctx)]
    seen = []
    last = model.layers[3]
    original = last.forward

    def spy(v):
        gc.collect()
        seen.append([r() is None for r in old[1:]])  # layer 0 kept its new input, not the old one
        return original(v)

    last.forward = spy
    model.forward(x + 1)
    assert seen == [[True, True]]
    assert old[0]() is None


@pytest.mark.parametrize("exact_resume", [False, True])
def test_trainer_checkpoints_keep_no_forward_caches(exact_resume):
    """During fit, no earlier forward's batch-norm context outlives the next forward:
    the call's first checkpoint held the caches from before the call to its end, and
    with exact_resume each step's checkpoint held the previous step's."""
    import gc
    import weakref

    rng = np.random.default_rng(0)
    model = _mlp(rng)
    X, y = rng.standard_normal((64, 4)), rng.integers(0, 3, 64)
    trainer = Trainer(
        model,
        SoftmaxCrossEntropy(),
        SGD(model.parameters(), lr=0.1),
        batch_size=16,
        seed=0,
        verbose=0,
        exact_resume=exact_resume,
    )
    trainer.fit(X, y, steps=1)
    bn, last = model.layers[1], model.layers[3]
    previous, alive = [weakref.ref(bn._ctx)], []
    original = last.forward

    def spy(v):
        gc.collect()
        alive.append(previous[0]() is not None)
        out = original(v)
        previous[0] = weakref.ref(bn._ctx)
        return out

    last.forward = spy
    trainer.fit(X, y, steps=4)
    assert alive == [False] * 4


@pytest.mark.parametrize("opt_cls", [SGD, Adam])
def test_trainer_fit_that_fails_midway_changes_nothing(opt_cls):
    """A label out of range in the 3rd batch: the 2 steps already taken are undone --
    parameters, buffers, gradients, optimizer state, batch order, step count."""
    rng = np.random.default_rng(1)
    model = _mlp(rng)
    opt = opt_cls(model.parameters(), lr=0.05)
    X, y = rng.standard_normal((40, 4)), rng.integers(0, 3, 40)
    trainer = Trainer(model, SoftmaxCrossEntropy(), opt, batch_size=8, seed=0, verbose=0)
    trainer.fit(X, y, steps=3)
    before, opt_before = fingerprint(model), opt.state_dict()
    rng_state, steps = trainer.rng.bit_generator.state, trainer.steps_done
    order = np.random.default_rng(0)
    order.bit_generator.state = rng_state
    third = order.permutation(40)[16:24]
    bad = y.copy()
    bad[third[0]] = 7
    with pytest.raises(ValueError, match="labels must lie in"):
        trainer.fit(X, bad, steps=4)
    assert_unchanged(model, before, caches_dropped=True)  # checkpoints hold no caches (Trainer._checkpoint)
    assert trainer.rng.bit_generator.state == rng_state and trainer.steps_done == steps
    after = opt.state_dict()
    assert after["hyperparameters"] == opt_before["hyperparameters"]
    for s, s0 in zip(after["state"], opt_before["state"], strict=True):
        assert s.keys() == s0.keys() and all(np.array_equal(s[k], s0[k]) for k in s)
    # ... and the run then continues exactly as if the failed call never happened.
    twin_model = _mlp(np.random.default_rng(1))
    twin_opt = opt_cls(twin_model.parameters(), lr=0.05)
    twin = Trainer(twin_model, SoftmaxCrossEntropy(), twin_opt, batch_size=8, seed=0, verbose=0)
    twin.fit(X, y, steps=3)
    trainer.fit(X, y, steps=2)
    twin.fit(X, y, steps=2)
    for (k, a), b in zip(model.state_dict().items(), twin_model.state_dict().values(), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=k)


def test_functional_backward_with_a_bad_out_writes_nothing():
    x = np.random.default_rng(0).standard_normal((6, 3))
    _, ctx = numbabn.batch_norm_forward(x)
    out = np.full((6, 3), 7.0)
    with pytest.raises(ValueError, match="must not overlap"):
        numbabn.batch_norm_backward(out, ctx, out=out)
    np.testing.assert_array_equal(out, 7.0)


@pytest.mark.parametrize("fast", [True, False], ids=["fast-path", "full-checks"])
@pytest.mark.parametrize("residual", [False, True])
def test_backward_out_may_not_overlap_gamma(fast, residual):
    """The context keeps a C-contiguous gamma by reference and every backward on it
    reads gamma again: an ``out`` (or ``residual_out``) carved from the same buffer as
    gamma is refused, as in the forward, and gamma and a later backward are intact.
    ``allreduce=`` (identity) takes the full checks instead of the fast path."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((6, 3)).astype(np.float32)
    dy = rng.standard_normal((6, 3)).astype(np.float32)
    buf = np.empty(3 + 18, np.float32)  # gamma, then one (6, 3) output, in one buffer
    gamma = buf[:3]
    gamma[:] = [0.5, 1.5, -2.0]
    r = rng.standard_normal((6, 3)).astype(np.float32) if residual else None
    _, ctx = numbabn.batch_norm_forward(x, gamma, None, residual=r)
    first = numbabn.batch_norm_backward(dy, ctx)
    kwargs = {} if fast else {"allreduce": lambda s: s}
    aliasing = buf[:18].reshape(6, 3)  # starts at gamma
    with pytest.raises(ValueError, match="out must not overlap dy, the forward input.* or gamma"):
        numbabn.batch_norm_backward(dy, ctx, out=aliasing, **kwargs)
    if residual:
        with pytest.raises(ValueError, match="residual_out must not overlap .* or gamma"):
            numbabn.batch_norm_backward(dy, ctx, residual_out=aliasing, **kwargs)
    np.testing.assert_array_equal(gamma, [0.5, 1.5, -2.0])
    # the rest of the buffer (apart from gamma) is a fine output
    apart = buf[3:].reshape(6, 3)
    again = numbabn.batch_norm_backward(dy, ctx, out=apart, **kwargs)
    assert again[0] is apart
    for a, b in zip(first, again, strict=True):
        np.testing.assert_array_equal(a, b)


def test_context_repr_is_short():
    x = np.random.default_rng(0).standard_normal((64, 16, 8, 8)).astype(np.float32)
    _, ctx = numbabn.batch_norm_forward(x, np.ones(16, np.float32), None)
    text = repr(ctx)
    assert "\n" not in text and len(text) < 300, text
    assert "shape=(64, 16, 8, 8)" in text and "dtype=float32" in text and "channels=16" in text


def test_cuda_backend_without_a_gpu_is_a_one_line_error():
    if numbabn.cuda_available():
        pytest.skip("a real GPU is present")
    code = (
        "import numpy as np, numbabn\n"
        "for call in (lambda: numbabn.batch_norm_forward(np.ones((4, 3)), backend='cuda'),\n"
        "             lambda: numbabn.moments(np.ones((4, 3)), backend='cuda')):\n"
        "    try:\n        call()\n    except Exception as exc:\n"
        "        print(type(exc).__name__, '|', str(exc).replace(chr(10), '<NEWLINE>'))\n"
    )
    env = {**os.environ, "NUMBA_ENABLE_CUDASIM": "0"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, check=True).stdout
    lines = out.strip().splitlines()
    assert len(lines) == 2, out
    for line, fn in zip(lines, ("batch_norm_forward", "moments"), strict=True):
        assert line.startswith(f"RuntimeError | {fn}: backend='cuda' needs a CUDA GPU"), line
        assert "<NEWLINE>" not in line and "backend='cpu'" in line


# ---------------------------------------------------------------- estimators
def _fitted_bytes(est):
    return pickle.dumps(est)


@pytest.fixture(scope="module")
def blobs():
    from sklearn.datasets import make_blobs

    X, y = make_blobs(n_samples=120, centers=3, n_features=5, random_state=0)
    return X, y


def test_failed_classifier_refit_keeps_the_trained_model(blobs):
    """early_stopping on two classes, one of them with one member: the stratified split
    (binary targets only, as scikit-learn's) fails after the labels were read -- the
    trained model, classes_, n_iter_, score all stay."""
    from numbabn.sklearn import BNMLPClassifier

    X, y = blobs
    clf = BNMLPClassifier(hidden_layer_sizes=(16,), max_iter=30, random_state=0, early_stopping=True).fit(X, y)
    before, score, n_iter, pred = _fitted_bytes(clf), clf.score(X, y), clf.n_iter_, clf.predict(X)
    y_bad = np.zeros_like(y)
    y_bad[0] = 9  # two classes, class 9 with one member
    with pytest.raises(ValueError, match="least populated class"):
        clf.fit(X, y_bad)
    assert _fitted_bytes(clf) == before
    assert clf.score(X, y) == score and clf.n_iter_ == n_iter and 9 not in clf.classes_
    np.testing.assert_array_equal(clf.predict(X), pred)
    with pytest.raises(ValueError):
        clf.fit(X[:, :3], y_bad)  # a different feature count, and a bad y
    assert clf.n_features_in_ == 5 and _fitted_bytes(clf) == before
    np.testing.assert_array_equal(clf.predict(X), pred)
    with pytest.raises(ValueError, match="partial_fit does not support early_stopping=True"):
        clf.partial_fit(X, y)  # as scikit-learn's MLPClassifier
    clf.set_params(early_stopping=False)  # then partial_fit's own checks
    with pytest.raises(ValueError, match="labels"):
        clf.partial_fit(X, np.full(len(y), 42))
    with pytest.raises(ValueError):
        clf.partial_fit(X[:, :2], y)
    assert _fitted_bytes(clf.set_params(early_stopping=True)) == before


@pytest.mark.parametrize("call", ["fit", "partial_fit"])
def test_sgd_interrupted_midway_keeps_the_trained_model(blobs, monkeypatch, call):
    """Ctrl-C in the loss of an epoch's third step: the estimator trains a working copy
    (its trainer saves no per-step state), and the fitted model is as it was."""
    from numbabn.layers import SoftmaxCrossEntropy
    from numbabn.sklearn import BNMLPClassifier

    X, y = blobs
    clf = BNMLPClassifier(hidden_layer_sizes=(8,), batch_size=20, max_iter=3, warm_start=True, random_state=0)
    clf.fit(X, y)
    before, pred = _fitted_bytes(clf), clf.predict_proba(X)
    real, calls = SoftmaxCrossEntropy.forward, []

    def interrupted(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return real(self, *args, **kwargs)

    monkeypatch.setattr(SoftmaxCrossEntropy, "forward", interrupted)
    with pytest.raises(KeyboardInterrupt):
        getattr(clf, call)(X, y)
    assert _fitted_bytes(clf) == before
    np.testing.assert_array_equal(clf.predict_proba(X), pred)


@pytest.mark.parametrize("warm_start", [False, True])
def test_lbfgs_interrupted_midway_keeps_the_trained_model(blobs, monkeypatch, warm_start):
    """Ctrl-C inside scipy's L-BFGS-B, after the network's parameters and batch-norm
    momentum were already changed by the search: the estimator is as it was."""
    import scipy.optimize

    from numbabn.sklearn import BNMLPClassifier

    X, y = blobs
    clf = BNMLPClassifier(hidden_layer_sizes=(8,), solver="lbfgs", max_iter=5, random_state=0).fit(X, y)
    before, pred = _fitted_bytes(clf), clf.predict_proba(X)
    real = scipy.optimize.minimize

    def interrupted(fun, x0, **kw):
        calls = []

        def fun_then_interrupt(theta):
            calls.append(1)
            if len(calls) == 3:
                raise KeyboardInterrupt
            return fun(theta)

        return real(fun_then_interrupt, x0, **kw)

    monkeypatch.setattr(scipy.optimize, "minimize", interrupted)
    with pytest.raises(KeyboardInterrupt):
        clf.set_params(warm_start=warm_start).fit(X, y)
    clf.set_params(warm_start=False)
    assert _fitted_bytes(clf) == before
    np.testing.assert_array_equal(clf.predict_proba(X), pred)
    assert clf._model.layers[1].momentum == 0.1


def test_failed_regressor_refit_keeps_the_trained_model(blobs):
    from numbabn.sklearn import BNMLPRegressor

    X, _ = blobs
    y = X @ np.arange(5.0)
    reg = BNMLPRegressor(hidden_layer_sizes=(8,), max_iter=10, random_state=0).fit(X, y)
    before, pred = _fitted_bytes(reg), reg.predict(X)
    strings = np.array(["a"] * len(y))
    for X_bad, y_bad in [(X[:, :2], strings), (X, strings), (X[:, :3], y[:-1])]:
        with pytest.raises(ValueError):
            reg.fit(X_bad, y_bad)
        assert _fitted_bytes(reg) == before and reg.n_features_in_ == 5
        np.testing.assert_array_equal(reg.predict(X), pred)
    with pytest.raises(ValueError):
        reg.partial_fit(X, np.c_[y, y])  # 2 targets where the model has 1
    assert _fitted_bytes(reg) == before


@pytest.mark.parametrize("call", ["fit", "partial_fit"])
def test_failed_first_fit_leaves_the_estimator_unfitted(blobs, call):
    from numbabn.sklearn import BNMLPClassifier, BNMLPRegressor

    X, y = blobs
    cases = [
        (
            BNMLPClassifier(),
            lambda e: (
                getattr(e, call)(X, y, **({"classes": [0]} if call == "partial_fit" else {}))
                if call == "partial_fit"
                else e.set_params(early_stopping=True).fit(X, np.r_[np.zeros(len(y) - 1, int), 9])
            ),
        ),
        (BNMLPRegressor(), lambda e: getattr(e, call)(X, np.array(["a"] * len(y)))),
    ]
    for est, fail in cases:
        with pytest.raises(ValueError):
            fail(est)
        assert not [k for k in vars(est) if k.endswith("_") or k.startswith("_")], vars(est).keys()
        with pytest.raises(NotFittedError):
            est.predict(X)


def test_bn_mlp_regressor_passes_check_regressors_train_at_50_epochs():
    """The default learning rate (1e-2: batch norm takes larger steps) learns
    scikit-learn's check data in the budget MLPRegressor needs 20 epochs for."""
    from sklearn.utils.estimator_checks import check_regressors_train

    from numbabn.sklearn import BNMLPRegressor

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        check_regressors_train("BNMLPRegressor", BNMLPRegressor(max_iter=50))


def test_transformer_calls_that_raise_change_nothing():
    from numbabn.sklearn import BatchNormTransformer

    rng = np.random.default_rng(0)
    X = rng.standard_normal((50, 4))
    for momentum in (None, 0.1):
        t = BatchNormTransformer(momentum=momentum).fit(X)
        before = pickle.dumps(t)
        X_nan = X[:, :3].copy()
        X_nan[0, 0] = np.nan
        bad_calls = [
            lambda t=t, X_nan=X_nan: t.fit(X_nan),
            lambda t=t: t.partial_fit(X[:, :2]),
            lambda t=t: t.partial_fit(np.full((5, 4), np.nan)),
            lambda t=t: t.transform(X[:, :1]),
            lambda t=t: t.set_params(eps=-1.0).partial_fit(X),
        ]
        for call in bad_calls:
            with pytest.raises(ValueError):
                call()
            t.set_params(eps=1e-5)
            assert pickle.dumps(t) == before


@pytest.mark.parametrize("mean", [1e5, 1e6, 3e7])
def test_transformer_float32_transform_is_as_accurate_as_training_mode(mean):
    """float64 mean_/var_ reach the eval kernel unrounded: float32 output within a few
    float32 ulps of the float64 result (it was off by up to 7.5e-3 at |mean| 3e7)."""
    from numbabn.sklearn import BatchNormTransformer

    X = (np.random.default_rng(0).standard_normal((2000, 3)) + mean).astype(np.float32)
    t = BatchNormTransformer().fit(X)
    ref = (X.astype(np.float64) - t.mean_) / np.sqrt(t.var_ + 1e-5)
    y = t.transform(X)
    assert y.dtype == np.float32
    train_err = np.abs(numbabn.batch_norm_forward(X)[0] - ref).max()
    assert np.abs(y - ref).max() <= max(1e-6, 2 * train_err)


def test_eval_accepts_float64_statistics_for_float32_input_training_does_not():
    x = np.random.default_rng(0).standard_normal((6, 3)).astype(np.float32)
    rm, rv = np.array([1e6, 0.0, 2.0]), np.ones(3)
    y, _ = numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False)
    assert y.dtype == np.float32
    np.testing.assert_allclose(y, (x.astype(np.float64) - rm) / np.sqrt(1 + 1e-5), rtol=1e-6)
    with pytest.raises(TypeError, match="running_mean must have dtype float32"):
        numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, training=True)
    np.testing.assert_array_equal(rm, [1e6, 0.0, 2.0])


# ---------------------------------------------------------------- synchronized BN, in process
class _PeerComm:
    """Two ranks; the other rank's rows come from ``peer(own_row) -> row``."""

    def __init__(self, peer):
        self.peer = peer

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def Allgather(self, send, recv):
        recv[0] = send
        recv[1] = self.peer(send.copy())


@pytest.mark.parametrize(
    "field, value, fragment",
    [
        (4, 400.0, "channels: rank 0: 4 channels; rank 1: 400 channels"),
        (5, 4.0, "dtype: rank 0: float64; rank 1: float32"),
        (6, 0.0, "mode: rank 0: batch statistics; rank 1: running statistics"),
        (7, 1.0, "the input was rejected on rank(s) [1]"),
        (0, 3.5, "sent no synchronized-batch-norm header"),
    ],
)
def test_sync_batch_norm_disagreeing_peer(field, value, fragment):
    from numbabn.distributed import SyncBatchNorm1d, SyncError

    bad = []

    def peer(row):
        if bad and row.size == 8:
            row[field] = value
        return row

    layer = SyncBatchNorm1d(4, dtype=np.float64, comm=_PeerComm(peer))
    x = np.random.default_rng(0).standard_normal((5, 4))
    layer.backward(layer.forward(x))
    y = layer.forward(x)
    bad.append(True)  # from now on the peer disagrees
    before = fingerprint(layer)
    with pytest.raises(SyncError) as info:
        layer.backward(np.ones_like(y))
    assert fragment in str(info.value)
    assert_unchanged(layer, before)
    with pytest.raises(SyncError) as info:
        layer.forward(x)
    assert fragment in str(info.value)
    assert_unchanged(layer, before)


def test_sync_batch_norm_local_error_still_takes_part():
    """This rank's input is rejected: it sends the header with the error flag, and
    raises the common SyncError with its own error chained."""
    from numbabn.distributed import SyncBatchNorm1d, SyncError

    sent = []
    layer = SyncBatchNorm1d(4, dtype=np.float64, comm=_PeerComm(lambda r: sent.append(r.copy()) or r))
    before = fingerprint(layer)
    with pytest.raises(SyncError, match=r"rejected on rank\(s\) \[0, 1\]") as info:
        layer.forward(np.ones((5, 3)))
    assert isinstance(info.value.__cause__, ValueError) and "expected input of shape" in str(info.value.__cause__)
    assert len(sent) == 1 and sent[0][7] == 1.0
    assert_unchanged(layer, before)


# ---------------------------------------------------------------- the command line
def _invoke(*args):
    from numbabn.cli import main

    return CliRunner().invoke(main, list(args))


def test_bench_failing_write_leaves_the_old_file(tmp_path, monkeypatch):
    """The JSON cannot be written at the end (disk full): one line, exit 2, and the
    previous report is still there, byte for byte."""
    from numbabn.bench import report

    target = tmp_path / "report.json"
    target.write_text('{"old": true}\n')

    def full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(report.json, "dump", full)
    result = _invoke("-q", "bench", "--suite", "tiny", "--repeat", "1", "--compare", "none", "--json", str(target))
    assert result.exit_code == 2, result.output
    assert result.output.strip().splitlines()[-1] == (
        f"Error: cannot write the JSON report to '{target}': No space left on device"
    )
    assert target.read_text() == '{"old": true}\n'
    assert sorted(os.listdir(tmp_path)) == ["report.json"]  # no temporary file left


def test_failing_experiment_leaves_out_as_it_was(tmp_path, monkeypatch):
    import types

    import numbabn.cli.experiment as experiment_cli

    def broken(*, steps=None, seeds=None, lr=None, full=False, out=None, progress=True):
        """Writes a file, then fails."""
        (out / "partial.json").write_text("{}")
        raise ValueError("experiment broke")

    calls = []

    def fine(*, steps=None, seeds=None, lr=None, full=False, out=None, progress=True):
        """Records how it was called."""
        calls.append(progress)
        (out / "fine.json").write_text("{}")
        return {"json": str(out / "fine.json")}

    module = types.ModuleType("fake_failing_experiments")
    module.EXPERIMENTS = {"broken": broken, "fine": fine}
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(experiment_cli, "EXPERIMENTS_MODULE", module.__name__)
    new, existing = tmp_path / "new", tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("keep")
    for out in (new, existing):
        result = _invoke("experiment", "broken", "--out", str(out))
        assert isinstance(result.exception, ValueError)
    assert not new.exists() and sorted(os.listdir(existing)) == ["keep.txt"]
    assert sorted(os.listdir(tmp_path)) == ["existing"]
    result = _invoke("-q", "experiment", "fine", "--out", str(new), "--json")
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"json": str(new / "fine.json")} and (new / "fine.json").exists()
    assert calls == [False]  # -q: no progress bars
    _invoke("experiment", "fine")
    assert calls == [False, True]


@pytest.fixture
def broken_gpu_compiler(monkeypatch):
    """A "real GPU" whose numba-cuda cannot load its compiler, as numba-cuda 0.30.4
    under NumPy 2.5 (where numpy.row_stack is gone)."""
    from numba import cuda

    import numbabn.functional as F

    monkeypatch.setattr(cuda.config, "ENABLE_CUDASIM", False)
    monkeypatch.setattr(cuda, "is_available", lambda: True)
    monkeypatch.setattr(F, "_cuda_usable", [])
    monkeypatch.setitem(sys.modules, "numba.cuda.cudaimpl", None)  # its import now fails
    monkeypatch.delattr(np, "row_stack", raising=False)


def test_cuda_backend_whose_compiler_cannot_load_is_a_one_line_error(broken_gpu_compiler):
    from numbabn.cli import main

    assert numbabn.cuda_available() is False
    x = np.ones((4, 3))
    with pytest.raises(RuntimeError) as err:
        numbabn.batch_norm_forward(x, backend="cuda")
    text = str(err.value)
    assert "\n" not in text and text.startswith("batch_norm_forward: backend='cuda' cannot compile its kernels here")
    assert "numba-cuda" in text and "cudaimpl halted" in text and "install numpy<2.5" in text
    assert "backend='cpu'" in text
    result = CliRunner().invoke(main, ["info"])
    assert result.exit_code == 0
    assert "unusable (a GPU is present, but numba-cuda" in result.output
