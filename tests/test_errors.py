"""Bad input gets a clear error naming the argument, and changes nothing."""
import numpy as np
import pytest

import numbabn


def _state():
    rm = np.arange(3, dtype=np.float32)
    rv = np.ones(3, np.float32) * 2
    nbt = np.array(5, np.int64)
    return rm, rv, nbt


X = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)

BAD_FORWARD = [
    # (kwargs override, exception, message fragment)
    (dict(x=np.ones(3, np.float32)), ValueError, "at least 2 dimensions"),
    (dict(axis=3), ValueError, "axis=3 is out of range"),
    (dict(axis=1.0), TypeError, "axis must be an int"),
    (dict(x=np.ones((4, 3), np.int64)), TypeError, "floating dtype"),
    (dict(x=np.ones((4, 3), np.complex64)), TypeError, "floating dtype"),
    (dict(gamma=np.ones(4, np.float32)), ValueError, "gamma must have shape (3,)"),
    (dict(beta=np.ones(3, np.float64)), TypeError, "beta must have dtype float32"),
    (dict(running_mean=np.zeros(2, np.float32)), ValueError, "running_mean must have shape (3,)"),
    (dict(running_var=np.ones(3, np.float64)), TypeError, "running_var must have dtype float32"),
    (dict(running_var=None), ValueError, "must be given together"),
    (dict(running_mean=None, running_var=None, training=False), ValueError, "training=False uses running"),
    (dict(x=np.ones((1, 3), np.float32)), ValueError, "Expected more than 1 value per channel"),
    (dict(x=np.ones((1, 3, 1), np.float32)), ValueError, "Expected more than 1 value per channel"),
    (dict(eps=0.0), ValueError, "eps must be"),
    (dict(eps=-1e-5), ValueError, "eps must be"),
    (dict(eps=float("nan")), ValueError, "eps must be"),
    (dict(momentum=1.5), ValueError, "momentum must be"),
    (dict(momentum=-0.1), ValueError, "momentum must be"),
    (dict(momentum=True), ValueError, "momentum must be"),
    (dict(momentum=None, num_batches_tracked=None), ValueError, "needs num_batches_tracked"),
    (dict(num_batches_tracked=np.zeros(1, np.float32)), TypeError, "num_batches_tracked"),
    (dict(activation="tanh"), ValueError, "activation must be None or 'relu'"),
    (dict(training="yes"), TypeError, "training must be a bool"),
    (dict(out=np.empty((4, 3, 6), np.float32)), ValueError, "out must have shape"),
    (dict(out=np.empty((4, 3, 5), np.float64)), TypeError, "out must have dtype float32"),
    (dict(out=np.empty((4, 5, 3), np.float32).transpose(0, 2, 1)), ValueError, "C-contiguous"),
    (dict(backend="tpu"), ValueError, "backend must be"),
    (dict(x=np.ones((4, 0, 2), np.float32)), ValueError, "no channels"),
]


@pytest.mark.parametrize("override,exc,fragment", BAD_FORWARD)
def test_forward_errors_leave_state_untouched(override, exc, fragment):
    rm, rv, nbt = _state()
    kw = dict(x=X.copy(), gamma=np.ones(3, np.float32), beta=np.zeros(3, np.float32),
              running_mean=rm, running_var=rv, num_batches_tracked=nbt)
    kw.update(override)
    out = kw.get("out")
    out_before = None if out is None else out.copy()
    x = kw.pop("x")
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        numbabn.batch_norm_forward(x, kw.pop("gamma"), kw.pop("beta"), **kw)
    rm0, rv0, nbt0 = _state()
    np.testing.assert_array_equal(rm, rm0)
    np.testing.assert_array_equal(rv, rv0)
    assert int(nbt) == int(nbt0)
    if out_before is not None:
        np.testing.assert_array_equal(out, out_before)


def test_out_overlapping_x_rejected():
    x = X.copy()
    before = x.copy()
    with pytest.raises(ValueError, match="out must not overlap x"):
        numbabn.batch_norm_forward(x, out=x)
    np.testing.assert_array_equal(x, before)


def test_readonly_running_stats_rejected():
    rm, rv, _ = _state()
    rv.setflags(write=False)
    with pytest.raises(ValueError, match="running_var is updated in place but is read-only"):
        numbabn.batch_norm_forward(X, running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, _state()[0])


def test_running_stats_must_be_numpy():
    with pytest.raises(TypeError, match="running_mean is updated in place and must be a NumPy array"):
        numbabn.batch_norm_forward(X, running_mean=[0.0] * 3, running_var=np.ones(3, np.float32))


@pytest.mark.parametrize("dy,exc,fragment", [
    (np.ones((4, 3, 6), np.float32), ValueError, "dy must have the forward input's shape"),
    (np.ones((4, 3, 5), np.float64), TypeError, "dy must have the forward input's dtype float32"),
    (np.ones((4, 3, 5), np.int32), TypeError, "floating dtype"),
])
def test_backward_errors(dy, exc, fragment):
    _, ctx = numbabn.batch_norm_forward(X)
    with pytest.raises(exc, match=fragment):
        numbabn.batch_norm_backward(dy, ctx)


def test_backward_needs_a_context():
    with pytest.raises(TypeError, match="ctx must be the context"):
        numbabn.batch_norm_backward(X, {"mean": 0})


def test_merge_moments_errors():
    a = numbabn.moments(X)
    with pytest.raises(ValueError, match="channel counts differ"):
        numbabn.merge_moments(a, numbabn.moments(np.ones((3, 4))))
    with pytest.raises(TypeError, match="expects two Moments"):
        numbabn.merge_moments(a, (1, 2, 3))


def test_no_numba_typing_errors_leak_for_odd_python_inputs():
    # lists work (converted), objects don't, and the message is ours
    y, _ = numbabn.batch_norm_forward([[1.0, 2.0], [3.0, 5.0]])
    assert y.dtype == np.float64
    with pytest.raises(TypeError, match="floating dtype"):
        numbabn.batch_norm_forward([["a", "b"], ["c", "d"]])


def test_readonly_running_stats_are_fine_in_eval_mode():
    rm, rv, _ = _state()
    rm.setflags(write=False)
    rv.setflags(write=False)
    y, _ = numbabn.batch_norm_forward(X, running_mean=rm, running_var=rv, training=False)
    np.testing.assert_allclose(y, (X - rm[None, :, None]) / np.sqrt(rv[None, :, None] + 1e-5), rtol=1e-5)
