"""The functional API's fast acceptance of common host calls (numbabn._fast_args)
must be invisible: every call gives the same result, the same error and the same
state changes with it as without it, and it must actually take the common calls."""

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numbabn
from numbabn import _fast_args

C = 5


def _param(kind, dtype, value):
    """A per-channel argument of one kind other than the plain array the fast path takes."""
    if kind == "none":
        return None
    if kind == "other_dtype":
        return np.full(C, value, np.float64 if dtype == np.float32 else np.float32)
    if kind == "readonly":
        a = np.full(C, value, dtype)
        a.flags.writeable = False
        return a
    if kind == "strided":
        return np.full(2 * C, value, dtype)[::2]
    if kind == "slice":  # contiguous, but a view (base is not None)
        return np.full(C + 1, value, dtype)[1:]
    if kind == "wrong_length":
        return np.full(C + 1, value, dtype)
    if kind == "list":
        return [value] * C
    if kind == "bigendian":
        return np.full(C, value, np.dtype(dtype).newbyteorder(">"))
    raise AssertionError(kind)


_VALUES = {"gamma": 1.5, "beta": 0.25, "running_mean": 0.5, "running_var": 2.0}
_PARAM_KINDS = ["none", "other_dtype", "readonly", "strided", "slice", "wrong_length", "list", "bigendian"]
_COUNTERS = {
    "negative": lambda: np.array([-1], np.int64),
    "int32": lambda: np.array([3], np.int32),
    "2d": lambda: np.array([[3]], np.int64),
    "list": lambda: [3],
    "readonly": lambda: np.frombuffer(np.array([3], np.int64).tobytes(), np.int64),
}


def _set(name, value):
    """A change: keyword ``name`` becomes ``value`` (a callable is called with the dtype)."""

    def change(x, axis, kw, dtype):
        kw[name] = value(dtype) if callable(value) else value
        return x, axis

    change.__name__ = f"{name}={value!r}"[:60]
    return change


def _x(label, fn):
    def change(x, axis, kw, dtype):
        return fn(x), axis

    change.__name__ = f"x:{label}"
    return change


def _axis(value):
    def change(x, axis, kw, dtype):
        return x, value(x.ndim) if callable(value) else value

    change.__name__ = f"axis:{value!r}"[:40]
    return change


def _stats(kind):
    def change(x, axis, kw, dtype):
        if kind == "same":
            kw["running_var"] = kw["running_mean"]
        else:
            buf = np.ones(2 * C + 1, dtype)
            kw["running_mean"], kw["running_var"] = (
                (buf[1:], buf[:-1]) if kind == "overlapping" else (buf[:C], buf[C:-1])
            )
        return x, axis

    change.__name__ = f"stats:{kind}"
    return change


def _readonly_counter(dtype):
    return np.frombuffer(np.array([3], np.int64).tobytes(), np.int64)


# Every argument pushed just past (or just inside) what the fast path takes.
CHANGES = [
    _x("float16", lambda x: x.astype(np.float16)),
    _x("bigendian", lambda x: x.astype(x.dtype.newbyteorder(">"))),
    _x("int32", lambda x: x.astype(np.int32)),
    _x("fortran", np.asfortranarray),
    _x("strided", lambda x: np.repeat(x, 2, axis=0)[::2]),
    _x("one_value_per_channel", lambda x: x[:1] if x.ndim == 2 else x[:1, :, :1]),
    _x("empty", lambda x: x[:0]),
    _set("as_list", True),  # x as nested lists, made last (see _call)
    _axis(lambda nd: 1 - nd),
    _axis(np.int64(1)),
    _axis(True),
    _axis(1.0),
    _axis(lambda nd: nd),
    *[
        _set(name, lambda dt, kind=kind, v=v: _param(kind, dt, v))
        for name, v in _VALUES.items()
        for kind in _PARAM_KINDS
    ],
    _stats("same"),
    _stats("overlapping"),
    _stats("apart"),
    _set("running_mean", None),
    *[_set("num_batches_tracked", lambda dt, k=k: _COUNTERS[k]()) for k in _COUNTERS],
    _set("num_batches_tracked", _readonly_counter),
    _set("num_batches_tracked", None),
    *[_set("training", v) for v in (np.bool_(True), np.bool_(False), 1, 0, None)],
    *[_set("momentum", v) for v in (None, 0.0, 1.0, 1.5, -0.1, np.float32(0.1), 1, float("nan"))],
    *[_set("eps", v) for v in (1e-3, 0.0, -1.0, float("inf"), float("nan"), np.float64(1e-5), 1, np.float32(1e-5))],
    *[_set("activation", v) for v in ("tanh", 0, np.str_("relu"), "RELU")],
    *[
        _set("out", kind)  # made by _run
        for kind in (
            "fresh",
            "x",
            "x_view",
            "holds_gamma",
            "holds_running_mean",
            "other_dtype",
            "wrong_shape",
            "readonly",
            "fortran",
        )
    ],
    *[_set("dx_out", kind) for kind in ("fresh", "dy", "x", "other_dtype", "readonly")],
]


def _call(dtype, shape, training, activation, changes, seed=0):
    """A call the fast path takes, then ``changes`` applied to it."""
    x = (np.random.default_rng(seed).standard_normal(shape) * 2 + 1).astype(dtype)
    axis = 1
    kw = dict(
        **{name: np.full(C, value, dtype) for name, value in _VALUES.items()},
        num_batches_tracked=np.array([3], np.int64),
        training=training,
        momentum=0.1,
        eps=1e-5,
        activation=activation,
    )
    for change in changes:
        x, axis = change(x, axis, kw, np.dtype(dtype))
    if kw.pop("as_list", False):
        x = x.tolist()
    return x, axis, kw


def _copy(value):
    if isinstance(value, np.ndarray):
        c = value.copy()
        c.flags.writeable = value.flags.writeable
        return c
    return list(value) if isinstance(value, list) else value


def _out(kind, x, kw):
    """The forward's ``out`` of one kind (made here: some share memory with x or gamma)."""
    dt = np.asarray(x).dtype if np.asarray(x).dtype.kind == "f" else np.float64
    shape = np.shape(x)
    if kind == "fresh":
        return np.empty(shape, dt)
    if kind == "x":
        return x
    if kind == "x_view":
        return np.asarray(x).reshape(-1).reshape(shape)
    if kind in ("holds_gamma", "holds_running_mean"):
        out = np.empty(shape, dt)
        name = "gamma" if kind == "holds_gamma" else "running_mean"
        kw[name] = out.reshape(-1)[:C]
        kw[name][...] = _VALUES[name]
        return out
    if kind == "other_dtype":
        return np.empty(shape, np.float32 if dt == np.float64 else np.float64)
    if kind == "wrong_shape":
        return np.empty((*shape, 1), dt)
    if kind == "readonly":
        out = np.empty(shape, dt)
        out.flags.writeable = False
        return out
    if kind == "fortran":
        return np.asfortranarray(np.empty(shape, dt))
    raise AssertionError(kind)


def _dx_out(kind, dy, x):
    """The backward's ``out`` of one kind."""
    if kind == "fresh":
        return np.empty_like(dy)
    if kind == "dy":
        return dy
    if kind == "x":
        return x
    if kind == "other_dtype":
        return np.empty(dy.shape, np.float32 if dy.dtype == np.float64 else np.float64)
    if kind == "readonly":
        out = np.empty_like(dy)
        out.flags.writeable = False
        return out
    raise AssertionError(kind)


def _run(fast, x, axis, kw):
    """(outcome, state after) of one forward (and backward on success)."""
    kw = {k: _copy(v) for k, v in kw.items()}
    dx_kind = kw.pop("dx_out", None)
    if "out" in kw:
        kw["out"] = _out(kw["out"], x, kw)
    with pytest.MonkeyPatch.context() as m:
        if not fast:
            m.setattr(_fast_args, "forward_args", lambda *a: None)
            m.setattr(_fast_args, "backward_args", lambda *a: None)
        try:
            y, ctx = numbabn.batch_norm_forward(x, axis=axis, **kw)
            dy = np.ones_like(y)
            out = None if dx_kind is None else _dx_out(dx_kind, dy, ctx.x)
            outcome = (y, *numbabn.batch_norm_backward(dy, ctx, out=out))
        except Exception as exc:
            outcome = (type(exc), str(exc))
    state = [kw[k] for k in ("running_mean", "running_var", "num_batches_tracked")]
    return outcome, state


def _same(a, b):
    if isinstance(a, np.ndarray) or isinstance(b, np.ndarray):
        assert isinstance(a, np.ndarray) and isinstance(b, np.ndarray)
        assert a.dtype == b.dtype and a.shape == b.shape
        np.testing.assert_array_equal(a, b)
    else:
        assert a == b


def _check_invisible(x, axis, kw):
    slow = _run(False, x, axis, kw)  # also teaches the layout cache this shape
    fast = _run(True, x, axis, kw)
    assert type(slow[0]) is type(fast[0]) and len(slow[0]) == len(fast[0])
    for a, b in zip(slow[0], fast[0], strict=True):
        _same(a, b)
    for a, b in zip(slow[1], fast[1], strict=True):
        _same(a, b)


@pytest.mark.parametrize("change", [None, *CHANGES], ids=lambda c: "none" if c is None else c.__name__)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("dtype, shape", [(np.float32, (4, C, 3)), (np.float64, (8, C))])
def test_fast_path_is_invisible(change, training, dtype, shape):
    """Every single change, both modes: the same outcome with and without the fast path."""
    _check_invisible(*_call(dtype, shape, training, "relu", [] if change is None else [change]))


@settings(max_examples=150, deadline=None)
@given(
    st.sampled_from([np.float32, np.float64]),
    st.sampled_from([(8, C), (4, C, 3), (2, C, 2, 2)]),
    st.booleans(),
    st.sampled_from([None, "relu"]),
    st.lists(st.sampled_from(CHANGES), min_size=2, max_size=3),
    st.integers(0, 2**20),
)
def test_fast_path_is_invisible_for_combined_changes(dtype, shape, training, activation, changes, seed):
    _check_invisible(*_call(dtype, shape, training, activation, changes, seed))


def test_common_calls_take_the_fast_path(monkeypatch):
    """A layer-style call (float32 NCHW, affine, running statistics, counter) and its
    backward, with or without ``out=``, are accepted; so is eval."""
    taken = []
    real_forward, real_backward = _fast_args.forward_args, _fast_args.backward_args
    monkeypatch.setattr(_fast_args, "forward_args", lambda *a: taken.append(real_forward(*a) is not None) or None)
    x = np.random.default_rng(0).standard_normal((4, 3, 2, 2)).astype(np.float32)
    g, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    rm, rv, nbt = np.zeros(3, np.float32), np.ones(3, np.float32), np.zeros(1, np.int64)
    for training in (True, True, False):
        numbabn.batch_norm_forward(
            x, g, b, running_mean=rm, running_var=rv, num_batches_tracked=nbt, training=training, activation="relu"
        )
    assert taken[1:] == [True, True]  # the first call of a shape teaches the layout cache
    monkeypatch.setattr(_fast_args, "forward_args", real_forward)
    _, ctx = numbabn.batch_norm_forward(x, g, b)
    assert _fast_args.backward_args(np.ones_like(x), ctx, None) is not None
    assert _fast_args.backward_args(np.ones_like(x), ctx, np.empty_like(x)) is not None
    assert real_backward(np.ones_like(x, dtype=np.float64), ctx, None) is None


@pytest.mark.parametrize("training", [True, False])
def test_fast_and_full_paths_update_state_alike(monkeypatch, training):
    """Several steps through each path: same outputs, running statistics, counter."""
    rng = np.random.default_rng(1)
    xs = [rng.standard_normal((16, C)).astype(np.float32) for _ in range(3)]
    results = []
    for fast in (False, True):
        rm, rv, nbt = np.zeros(C, np.float32), np.ones(C, np.float32), np.zeros(1, np.int64)
        outs = []
        with monkeypatch.context() as m:
            if not fast:
                m.setattr(_fast_args, "forward_args", lambda *a: None)
            for x in xs:
                y, _ = numbabn.batch_norm_forward(
                    x, running_mean=rm, running_var=rv, num_batches_tracked=nbt, momentum=None, training=training
                )
                outs.append(y)
        results.append((outs, rm, rv, nbt))
    for a, b in zip(results[0][0], results[1][0], strict=True):
        np.testing.assert_array_equal(a, b)
    for a, b in zip(results[0][1:], results[1][1:], strict=True):
        np.testing.assert_array_equal(a, b)
