"""Audit of the CPU path as demanding NumPy/PyTorch users call it: values NumPy and
PyTorch hand out (NumPy string scalars, torch tensors, ``np.load`` archives) are
taken like their plain Python/NumPy counterparts, and calls that cannot be served
raise an error naming the argument (never NumPy's or Python's bare one), changing
nothing."""

import copy

import numpy as np
import pytest

import numbabn
from numbabn.layers import BatchNorm1d, BatchNorm2d, MSELoss, Parameter
from numbabn.optim import SGD, Adam

X = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)


# ---------------------------------------------------------------- activation as a NumPy string
def test_activation_as_a_numpy_string_is_taken_like_a_python_one():
    """``np.str_`` is a ``str`` (what indexing a NumPy string array or a loaded config
    gives): it selects the fused ReLU as "relu" does, in the functional API and in the
    layers, whose repr and state stay those of "relu"."""
    relu = np.array(["relu", "none"])[0]
    assert type(relu) is np.str_
    want, _ = numbabn.batch_norm_forward(X, activation="relu")
    got, ctx = numbabn.batch_norm_forward(X, activation=relu)
    np.testing.assert_array_equal(got, want)
    assert ctx.relu
    layer = BatchNorm2d(3, activation=relu)
    assert repr(layer) == repr(BatchNorm2d(3, activation="relu"))
    np.testing.assert_array_equal(layer.forward(X[..., None]), want[..., None])
    with pytest.raises(ValueError, match="activation must be None or 'relu', got np.str_\\('tanh'\\)"):
        numbabn.batch_norm_forward(X, activation=np.str_("tanh"))


# ---------------------------------------------------------------- eval statistics from torch
def test_eval_running_statistics_as_torch_tensors_are_read_like_numpy_ones():
    """Eval mode only reads the running statistics, and takes array-likes for them as
    it does for gamma (a torch tensor included); their dtype was asked of NumPy as it
    came, and ``np.dtype(torch.float32)`` raised NumPy's bare "Cannot interpret
    'torch.float32' as a data type". float64 ones are taken for float32 input as
    float64 NumPy arrays are."""
    torch = pytest.importorskip("torch")
    rm = np.linspace(-1, 1, 3).astype(np.float32)
    rv = np.linspace(0.5, 2, 3).astype(np.float32)
    want, _ = numbabn.batch_norm_forward(X, running_mean=rm, running_var=rv, training=False)
    got, _ = numbabn.batch_norm_forward(
        X, running_mean=torch.from_numpy(rm), running_var=torch.from_numpy(rv), training=False
    )
    np.testing.assert_array_equal(got, want)
    wide = dict(running_mean=rm.astype(np.float64), running_var=rv.astype(np.float64))
    want64, _ = numbabn.batch_norm_forward(X, **wide, training=False)
    got64, _ = numbabn.batch_norm_forward(X, **{k: torch.from_numpy(v) for k, v in wide.items()}, training=False)
    np.testing.assert_array_equal(got64, want64)
    with pytest.raises(TypeError, match="running_mean and running_var must have one dtype"):
        numbabn.batch_norm_forward(
            X, running_mean=torch.from_numpy(wide["running_mean"]), running_var=torch.from_numpy(rv), training=False
        )


# ---------------------------------------------------------------- optimizer state set by hand
@pytest.mark.parametrize(
    "entry, fragment",
    [
        (lambda s: {**s, "step": -1}, r"'step' must be an int >= 0, got -1"),
        (lambda s: {**s, "step": "3"}, r"'step' must be an int >= 0, got '3'"),
        (lambda s: {k: v for k, v in s.items() if k != "step"}, "must be a dict, empty or hold exactly the keys"),
        (lambda s: {**s, "exp_avg_sqr": s["exp_avg_sq"]}, "must be a dict, empty or hold exactly the keys"),
    ],
)
def test_adam_step_with_a_broken_state_entry_names_it_and_changes_nothing(entry, fragment):
    """``opt.state`` is public (inspected, copied, restored): a step over an entry that
    was set by hand and lost its form raised Python's bare ZeroDivisionError (step -1:
    1 - beta1**0), TypeError or KeyError. It is checked with the rest, before any
    parameter is written."""
    params = [Parameter("a", np.ones(3)), Parameter("b", np.full(2, 2.0))]
    opt = Adam(params, lr=0.1)
    for p in params:
        p.grad = np.ones_like(p.value)
    opt.step()
    opt.state[1] = entry(opt.state[1])
    values = [p.value.copy() for p in params]
    state = copy.deepcopy(opt.state)
    with pytest.raises(ValueError, match=fragment):
        opt.step()
    for p, v in zip(params, values, strict=True):
        np.testing.assert_array_equal(p.value, v)
    assert opt.state[0]["step"] == state[0]["step"] == 1
    np.testing.assert_array_equal(opt.state[0]["exp_avg"], state[0]["exp_avg"])


def test_sgd_step_with_an_unknown_state_key_names_it():
    p = Parameter("w", np.ones(3))
    opt = SGD([p], lr=0.1, momentum=0.9)
    p.grad = np.ones(3)
    opt.step()
    opt.state[0] = {"momentum": opt.state[0]["momentum_buffer"]}  # a typo'd restore
    before = p.value.copy()
    with pytest.raises(ValueError, match="must be a dict, empty or hold exactly the keys"):
        opt.step()
    np.testing.assert_array_equal(p.value, before)


# ---------------------------------------------------------------- MSELoss targets
@pytest.mark.parametrize(
    "target",
    [np.array([[None, 1.0]] * 3), [[1.0, None]] * 3, np.array([["a", "b"]] * 3), np.full((3, 2), 1 + 2j)],
    ids=["object-None", "list-None", "strings", "complex"],
)
def test_mse_target_that_is_not_real_numbers_is_refused_naming_it(target):
    """A ``None`` in an object target became NaN in ``astype`` (a NaN loss, silently);
    strings raised NumPy's bare "could not convert string to float"; complex ones were
    cast with a ComplexWarning. Targets must be real numbers (or bools), like the
    other losses' targets."""
    pred = np.zeros((3, 2), np.float32)
    with pytest.raises(ValueError, match=r"MSELoss\(\): target must be real numbers of the prediction's shape"):
        MSELoss()(pred, target)


def test_mse_takes_integer_and_boolean_targets():
    pred = np.zeros((3, 2), np.float32)
    loss, grad = MSELoss()(pred, np.ones((3, 2), bool))
    assert loss == 1.0 and grad.dtype == np.float32
    assert MSELoss()(pred, np.full((3, 2), 2))[0] == 4.0


# ---------------------------------------------------------------- state dicts from np.load
def test_load_state_dict_takes_an_npz_archive(tmp_path):
    """``np.savez(path, **layer.state_dict())`` and ``np.load(path)`` give a Mapping of
    arrays (NumPy's NpzFile), which the signature (``Mapping[str, Any]``) and PyTorch
    (any Mapping) take; it was refused for not being a dict."""
    src = BatchNorm1d(3)
    src.forward(X)
    np.savez(tmp_path / "bn.npz", **src.state_dict())
    dst = BatchNorm1d(3)
    with np.load(tmp_path / "bn.npz") as archive:
        assert dst.load_state_dict(archive) == ([], [])
    for key, value in src.state_dict().items():
        np.testing.assert_array_equal(dst.state_dict()[key], value)
    with pytest.raises(TypeError, match="state must be a mapping of NumPy arrays, got list"):
        dst.load_state_dict([("running_mean", np.zeros(3))])
