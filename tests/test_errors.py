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
    kw = dict(
        x=X.copy(),
        gamma=np.ones(3, np.float32),
        beta=np.zeros(3, np.float32),
        running_mean=rm,
        running_var=rv,
        num_batches_tracked=nbt,
    )
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


def test_readonly_counter_only_where_it_is_written():
    """num_batches_tracked is incremented only in training with running statistics;
    eval reads nothing of it, so a read-only one (e.g. from a memory-mapped state
    dict) is accepted there, as read-only running statistics are."""
    rm, rv, _ = _state()
    nbt = np.array([5], np.int64)
    nbt.setflags(write=False)
    y, _ = numbabn.batch_norm_forward(X, running_mean=rm, running_var=rv, num_batches_tracked=nbt, training=False)
    np.testing.assert_array_equal(y, numbabn.batch_norm_forward(X, running_mean=rm, running_var=rv, training=False)[0])
    numbabn.batch_norm_forward(X, num_batches_tracked=nbt)  # training without running statistics: not counted
    assert int(nbt[0]) == 5
    with pytest.raises(ValueError, match="num_batches_tracked is updated in place but is read-only"):
        numbabn.batch_norm_forward(X, running_mean=rm, running_var=rv, num_batches_tracked=nbt)
    np.testing.assert_array_equal(rm, _state()[0])


def test_running_stats_must_be_numpy():
    with pytest.raises(TypeError, match="running_mean is updated in place and must be a NumPy array"):
        numbabn.batch_norm_forward(X, running_mean=[0.0] * 3, running_var=np.ones(3, np.float32))


@pytest.mark.parametrize(
    "dy,exc,fragment",
    [
        (np.ones((4, 3, 6), np.float32), ValueError, "dy must have the forward input's shape"),
        (np.ones((4, 3, 5), np.float64), TypeError, "dy must have the forward input's dtype float32"),
        (np.ones((4, 3, 5), np.int32), TypeError, "floating dtype"),
    ],
)
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


# ---------------------------------------------------------------- issue 12: inputs accepted that should
# not be, or refused badly


def test_big_endian_input_is_converted_everywhere():
    """A big-endian float array is valid data: every entry point converts it alike."""
    x = np.random.default_rng(1).standard_normal((6, 3, 4))
    big = x.astype(">f8")
    g, b = np.linspace(0.5, 1.5, 3), np.linspace(-1, 1, 3)
    y, ctx = numbabn.batch_norm_forward(x, g, b)
    y_big, ctx_big = numbabn.batch_norm_forward(big, g.astype(">f8"), b.astype(">f8"))
    np.testing.assert_array_equal(y_big, y)
    assert y_big.dtype == np.float64 and y_big.dtype.isnative
    dy = np.ones_like(x)
    for a, c in zip(
        numbabn.batch_norm_backward(dy.astype(">f8"), ctx_big), numbabn.batch_norm_backward(dy, ctx), strict=True
    ):
        np.testing.assert_array_equal(a, c)
    m, m_big = numbabn.moments(x), numbabn.moments(big)
    np.testing.assert_array_equal(m_big.mean, m.mean)
    np.testing.assert_array_equal(m_big.m2, m.m2)
    # read-only running statistics (eval) convert; in-place ones (training) are refused clearly
    rm, rv = np.zeros(3, ">f8"), np.ones(3, ">f8")
    y_eval, _ = numbabn.batch_norm_forward(big, running_mean=rm, running_var=rv, training=False)
    np.testing.assert_allclose(y_eval, x / np.sqrt(1 + 1e-5), rtol=1e-12)
    with pytest.raises(TypeError, match="running_mean is updated in place and must be in native byte order"):
        numbabn.batch_norm_forward(big, running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(rm, 0)
    from numbabn.layers import BatchNorm1d

    layer = BatchNorm1d(3, dtype=np.float64)
    np.testing.assert_array_equal(layer.forward(big), numbabn.batch_norm_forward(x)[0])
    assert layer.backward(dy.astype(">f8")).dtype == np.float64
    assert layer.load_state_dict({k: v.astype(v.dtype.newbyteorder(">")) for k, v in layer.state_dict().items()}) == (
        [],
        [],
    )


def test_masked_arrays_with_masked_values_are_refused():
    x = np.ma.masked_array(X, mask=np.zeros(X.shape, bool))
    y, _ = numbabn.batch_norm_forward(x)  # nothing masked: the data
    np.testing.assert_array_equal(y, numbabn.batch_norm_forward(X)[0])
    x[0, 0, 0] = np.ma.masked
    rm, rv, nbt = _state()
    with pytest.raises(ValueError, match="x is a masked array with 1 masked value"):
        numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, num_batches_tracked=nbt)
    assert int(nbt) == 5 and np.array_equal(rm, _state()[0])
    gamma = np.ma.masked_array(np.ones(3, np.float32), mask=[0, 1, 0])
    with pytest.raises(ValueError, match="gamma is a masked array"):
        numbabn.batch_norm_forward(X, gamma)
    with pytest.raises(ValueError, match="masked"):
        numbabn.moments(x)
    # An output whose mask would hide what the call writes, refused before any work.
    out = np.ma.masked_array(np.zeros_like(X), mask=np.zeros(X.shape, bool))
    out[1, 2, 0] = np.ma.masked
    with pytest.raises(ValueError, match="out is a masked array with 1 masked value"):
        numbabn.batch_norm_forward(X, running_mean=rm, running_var=rv, num_batches_tracked=nbt, out=out)
    assert int(nbt) == 5 and not out.data.any()
    y, ctx = numbabn.batch_norm_forward(X)
    with pytest.raises(ValueError, match="out is a masked array"):
        numbabn.batch_norm_backward(np.ones_like(X), ctx, out=out)
    assert not out.data.any()


def test_out_overlapping_parameters_or_running_stats_is_refused():
    for target in ("running_mean", "running_var", "gamma"):
        rm, rv, nbt = _state()
        out = np.zeros((4, 3, 5), np.float32)
        args = dict(gamma=np.ones(3, np.float32), running_mean=rm, running_var=rv)
        args[target] = out[0, :, 0].copy()
        view = out.reshape(-1)[:3]  # contiguous (3,) view into out
        view[...] = args[target]
        args[target] = view
        before = view.copy()
        with pytest.raises(ValueError, match="out must not overlap gamma, beta, the running statistics or num"):
            numbabn.batch_norm_forward(X, args.pop("gamma"), num_batches_tracked=nbt, out=out, **args)
        np.testing.assert_array_equal(view, before)
        assert int(nbt) == 5
    rm, _, _ = _state()
    with pytest.raises(ValueError, match="running_mean and running_var must not overlap"):
        numbabn.batch_norm_forward(X, running_mean=rm, running_var=rm)
    np.testing.assert_array_equal(rm, _state()[0])


@pytest.mark.parametrize("stat", ["running_mean", "running_var"])
@pytest.mark.parametrize("read", ["gamma", "beta", "x", "residual"])
@pytest.mark.parametrize("view", [False, True])
def test_running_stats_overlapping_what_training_reads_are_refused(stat, read, view):
    """Training updates the running statistics before the normalise pass reads x,
    gamma, beta and the residual: an overlap would normalise with changed values.
    ``view``: the shared memory reached through views (NumPy's address check) rather
    than one object passed twice (the identity check)."""
    x = X.copy()
    arrays = dict(
        gamma=np.full(3, 2.0, np.float32),
        beta=np.full(3, 0.5, np.float32),
        running_mean=np.zeros(3, np.float32),
        running_var=np.ones(3, np.float32),
        residual=np.ones_like(x),
        x=x,
    )
    shared = arrays[read]
    if read in ("x", "residual"):  # three values of the input, a view either way
        shared = shared.reshape(-1)[1:4] if view else shared.reshape(-1)[:3]
    elif view:
        shared = shared[:]
    arrays[stat] = shared
    before = {k: v.copy() for k, v in arrays.items()}
    nbt = np.array([5], np.int64)
    kw = dict(arrays, num_batches_tracked=nbt)
    if read != "residual":
        kw.pop("residual")  # the fast path (no residual) must refuse it too
    with pytest.raises(ValueError, match="running_mean and running_var must not overlap x, gamma, beta or residual"):
        numbabn.batch_norm_forward(kw.pop("x"), kw.pop("gamma"), kw.pop("beta"), **kw)
    for k, v in arrays.items():
        np.testing.assert_array_equal(v, before[k])
    assert int(nbt[0]) == 5
    # eval only reads them: sharing is harmless and accepted
    kw = dict(arrays)
    numbabn.batch_norm_forward(kw.pop("x"), kw.pop("gamma"), kw.pop("beta"), training=False, **kw)


@pytest.mark.parametrize("target", ["x", "gamma", "running_mean", "running_var", "out"])
def test_a_counter_overlapping_another_array_is_refused(target):
    """num_batches_tracked is incremented in place: an int64 view into another
    argument's memory put its +1 into the float bits of x, a running statistic or
    ``out`` (silently, on both paths)."""
    x = np.random.default_rng(0).standard_normal((4, 2, 8)).astype(np.float64)
    arrays = dict(
        x=x,
        gamma=np.full(2, 2.0),
        running_mean=np.zeros(2),
        running_var=np.ones(2),
        out=np.zeros_like(x),
    )
    nbt = arrays[target].reshape(-1)[:1].view(np.int64)  # float64 memory seen as the counter
    nbt[...] = 0
    before = {k: v.copy() for k, v in arrays.items()}
    kw = dict(arrays, num_batches_tracked=nbt)
    fragment = "out must not overlap .*num_batches_tracked" if target == "out" else "num_batches_tracked must not"
    with pytest.raises(ValueError, match=fragment):
        numbabn.batch_norm_forward(kw.pop("x"), kw.pop("gamma"), **kw)
    for k, v in arrays.items():
        np.testing.assert_array_equal(v, before[k])
    # eval never writes the counter: accepted
    kw = dict(arrays, num_batches_tracked=nbt)
    numbabn.batch_norm_forward(kw.pop("x"), kw.pop("gamma"), training=False, **kw)


def test_activation_as_an_array_is_refused_naming_it():
    for value in (np.array(["relu"]), np.array(["relu", "relu"])):
        with pytest.raises(ValueError, match="activation must be None or 'relu', got array"):
            numbabn.batch_norm_forward(X, activation=value)


@pytest.mark.parametrize(
    "counter, exc, fragment",
    [
        (np.array(3, np.uint8), TypeError, "one-element int64"),
        (np.array([3], np.int32), TypeError, "one-element int64"),
        (np.array(-1, np.int64), ValueError, "must be >= 0, got -1"),
        (np.array(-3, np.int64), ValueError, "must be >= 0, got -3"),
    ],
)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_num_batches_tracked_dtype_and_value(counter, exc, fragment, momentum):
    rm, rv, _ = _state()
    with pytest.raises(exc, match=fragment):
        numbabn.batch_norm_forward(X, running_mean=rm, running_var=rv, num_batches_tracked=counter, momentum=momentum)
    np.testing.assert_array_equal(rm, _state()[0])
    np.testing.assert_array_equal(rv, _state()[1])


def test_layer_counter_value_checked_in_forward_and_load_state_dict():
    from numbabn.layers import BatchNorm1d

    layer = BatchNorm1d(3, momentum=None)
    layer.num_batches_tracked[...] = -1
    with pytest.raises(ValueError, match="num_batches_tracked counts batches and must be >= 0"):
        layer.forward(X[:, :, 0])
    layer.num_batches_tracked[...] = 0
    state = layer.state_dict()
    bad = {**state, "running_mean": state["running_mean"] + 1, "num_batches_tracked": np.array(-2, np.int64)}
    with pytest.raises(ValueError, match="'num_batches_tracked' counts batches and must be >= 0, got -2"):
        layer.load_state_dict(bad)
    np.testing.assert_array_equal(layer.running_mean, 0)


def test_moments_validation():
    m = numbabn.moments(X)
    Moments = numbabn.Moments
    bad = [
        (Moments(-1, m.mean, m.m2), ValueError, "count must be >= 0, got -1"),
        (Moments(20.0, m.mean, m.m2), TypeError, "count must be an int"),
        (Moments(True, m.mean, m.m2), TypeError, "count must be an int"),
        (Moments(20, m.mean, -m.m2 - 1), ValueError, r"m2 \(sum of squared deviations\) must be >= 0"),
        (Moments(20, m.mean.astype(complex), m.m2), TypeError, "mean must be a 1-D real floating"),
        (Moments(20, list(m.mean), m.m2), TypeError, "mean must be a 1-D real floating"),
        (Moments(20, m.mean, m.m2[:2]), ValueError, "differ in shape"),
    ]
    for moments, exc, fragment in bad:
        with pytest.raises(exc, match=fragment):
            numbabn.merge_moments(m, moments)
        with pytest.raises(exc, match=fragment):
            numbabn.merge_moments(moments, m)
        rm, rv, nbt = _state()
        with pytest.raises(exc, match=fragment):
            numbabn.batch_norm_forward(X, running_mean=rm, running_var=rv, num_batches_tracked=nbt, moments=moments)
        assert int(nbt) == 5 and np.array_equal(rm, _state()[0])
    with pytest.raises(ValueError, match="at least x's own values, got count 3"):
        numbabn.batch_norm_forward(X, moments=Moments(3, m.mean, m.m2))
    assert numbabn.merge_moments(m, numbabn.Moments.empty(3)) is m
    assert np.all(numbabn.moments(np.full((7, 2), 0.1) + np.array([0.0, 1e-17])).m2 >= 0)


def test_moments_from_array_validation():
    m = numbabn.moments(X)
    back = numbabn.Moments.from_array(m.to_array())
    assert back.count == m.count and np.array_equal(back.mean, m.mean) and np.array_equal(back.m2, m.m2)
    for packed, fragment in [
        ([], r"odd length, got shape \(0,\)"),
        ([3.0, 1.0], r"odd length, got shape \(2,\)"),
        (np.ones((3, 3)), r"1-D array .* got shape \(3, 3\)"),
        ([np.nan, 0.0, 1.0], "count \\(entry 0\\) must be a whole number >= 0, got nan"),
        ([2.6, 0.0, 1.0], "whole number >= 0, got 2.6"),
        ([-1.0, 0.0, 1.0], "whole number >= 0, got -1.0"),
    ]:
        with pytest.raises(ValueError, match=fragment):
            numbabn.Moments.from_array(packed)
    for packed in ("abc", np.array([3, 1j, 2]), np.array([True, False, True]), [None, 1.0, 2.0]):
        with pytest.raises(TypeError, match=r"Moments.from_array: expected real numbers \[count"):
            numbabn.Moments.from_array(packed)
    assert numbabn.Moments.from_array(np.array([4, 1, 2], np.int32)).count == 4


def test_moments_compare_and_hash_by_identity():
    """Field-wise ``==`` of NumPy arrays is no bool: a Moments is equal only to
    itself, hashable, and usable in sets and ``in`` tests whatever its C."""
    a, b = numbabn.moments(X), numbabn.moments(X)
    assert a == a and a != b and a in [b, a] and b not in [a]
    assert len({a, b, a}) == 2 and hash(a) != hash(b)


@pytest.mark.parametrize("count_type", [np.int32, np.int64, int])
def test_merge_moments_with_numpy_integer_counts(count_type):
    """Counts of any integer type merge as Python ints: np.int32 counts of 50 000 made
    na*nb wrap (m2 off by a third, silently), as np.int64 counts of 3.5e9 did."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((100_000, 2))
    a, b = numbabn.moments(x[:50_000]), numbabn.moments(x[50_000:] + 1)
    want = numbabn.merge_moments(a, b)
    got = numbabn.merge_moments(
        numbabn.Moments(count_type(a.count), a.mean, a.m2), numbabn.Moments(count_type(b.count), b.mean, b.m2)
    )
    assert got.count == 100_000
    np.testing.assert_allclose(got.m2, want.m2, rtol=1e-15)
    big = numbabn.Moments(np.int64(3_500_000_000), a.mean, a.m2 * 70_000)
    other = numbabn.Moments(np.int64(3_500_000_000), b.mean, b.m2 * 70_000)
    d = b.mean - a.mean
    want_m2 = big.m2 + other.m2 + d * d * (3.5e9 * 3.5e9 / 7e9)
    np.testing.assert_allclose(numbabn.merge_moments(big, other).m2, want_m2, rtol=1e-12)


def test_allreduce_returning_none_or_garbage():
    _, ctx = numbabn.batch_norm_forward(X)
    with pytest.raises(TypeError, match=r"allreduce must return the summed \(2, 3\) array .*got NoneType None"):
        numbabn.batch_norm_backward(X, ctx, allreduce=lambda sums: None)
    with pytest.raises(TypeError, match="allreduce must return a real array"):
        numbabn.batch_norm_backward(X, ctx, allreduce=lambda sums: sums.astype(complex))
    with pytest.raises(ValueError, match=r"allreduce must return an array of shape \(2, 3\), got \(3,\)"):
        numbabn.batch_norm_backward(X, ctx, allreduce=lambda sums: sums[0])
    hidden = lambda sums: np.ma.masked_array(sums, mask=np.eye(2, 3, dtype=bool))  # noqa: E731
    with pytest.raises(ValueError, match="allreduce returned a masked array with masked values"):
        numbabn.batch_norm_backward(X, ctx, allreduce=hidden)


def test_merge_moments_computes_in_float64_and_refuses_masked_fields():
    """Summaries built in float16/float32 (from torch tensors, say) merge in float64:
    float16 gave m2 = inf for two chunks of 1000 values with means 0 and 100."""
    a = numbabn.Moments(1000, np.zeros(1, np.float16), np.full(1, 1000, np.float16))
    b = numbabn.Moments(1000, np.full(1, 100, np.float16), np.full(1, 1000, np.float16))
    m = numbabn.merge_moments(a, b)
    assert m.mean.dtype == m.m2.dtype == np.float64
    np.testing.assert_allclose(m.m2, [2000 + 100**2 * 1000 * 1000 / 2000], rtol=1e-15)
    masked = numbabn.Moments(2, np.ma.masked_array([1.0, 5.0], mask=[0, 1]), np.ones(2))
    with pytest.raises(ValueError, match="a.mean is a masked array"):
        numbabn.merge_moments(masked, masked)
    with pytest.raises(ValueError, match="moments.mean is a masked array"):
        numbabn.batch_norm_forward(
            X, moments=numbabn.Moments(15, np.ma.masked_array(np.zeros(3), mask=[1, 0, 0]), np.ones(3))
        )


def test_moments_var_with_an_unsigned_count_below_ddof_is_nan():
    assert np.isnan(numbabn.Moments(np.uint64(1), np.zeros(2), np.ones(2)).var(ddof=2)).all()


def test_layer_backward_wrong_dtype_is_a_type_error_like_the_functional_api():
    from numbabn.layers import BatchNorm1d

    layer = BatchNorm1d(3)
    y = layer.forward(X)
    with pytest.raises(TypeError, match="dy of the output's dtype float32"):
        layer.backward(y.astype(np.float64))
    with pytest.raises(TypeError, match="dy must have the forward input's dtype float32"):
        numbabn.batch_norm_backward(y.astype(np.float64), layer._ctx)
    with pytest.raises(ValueError, match="shape"):
        layer.backward(y[:2])
    with pytest.raises(TypeError, match="as a NumPy array"):
        layer.backward(y.tolist())


def test_layer_constructor_arguments():
    from numbabn_plugins.lp_batch_norm import LpBatchNorm

    from numbabn.layers import BatchNorm1d, BatchNorm3d, Linear

    for cls, args in [(BatchNorm1d, (3,)), (BatchNorm3d, (3,)), (Linear, (2, 3))]:
        with pytest.raises(TypeError, match="dtype must be float32 or float64, got None"):
            cls(*args, dtype=None)
        with pytest.raises(TypeError, match="dtype must be float32 or float64"):
            cls(*args, dtype="complex-ish")
    for p in (True, False, np.bool_(True), 3, "2", 0.5):
        with pytest.raises(ValueError, match="p must be 1, 2 or numpy.inf"):
            LpBatchNorm(3, p=p)
    assert LpBatchNorm(3, p=2.0).p == 2 and LpBatchNorm(3, p=np.float64(np.inf)).p == np.inf


def test_float16_input_refused_by_float64_layers_and_float64_by_float32():
    from numbabn.layers import BatchNorm1d

    with pytest.raises(TypeError, match="float16 input is taken by float32 normalisation layers"):
        BatchNorm1d(3, dtype=np.float64).forward(X[:, :, 0].astype(np.float16))
    with pytest.raises(TypeError, match="must have the layer's dtype float32, got float64"):
        BatchNorm1d(3).forward(X[:, :, 0].astype(np.float64))


def test_an_int_too_large_for_a_float_is_a_value_error_naming_the_argument():
    """10**400 is a Real that math.isfinite cannot take: a bare OverflowError ("int too
    large to convert to float") named no argument, across the package."""
    from numbabn.layers import BatchNorm1d, Linear
    from numbabn.optim import SGD
    from numbabn.sklearn import BatchNormTransformer

    huge = 10**400
    x = np.random.default_rng(0).standard_normal((8, 3))
    calls = [
        (lambda: numbabn.batch_norm_forward(x, eps=huge), "eps"),
        (lambda: BatchNorm1d(3, momentum=huge), "momentum"),
        (lambda: SGD(Linear(3, 2).parameters(), lr=huge), "lr"),
        (lambda: BatchNormTransformer(gamma=huge).fit(x), "gamma"),
        (lambda: BatchNormTransformer().fit(x, sample_weight=huge), "sample_weight"),
    ]
    for call, name in calls:
        with pytest.raises(ValueError, match=name):
            call()


def test_a_counter_at_the_int64_maximum_is_refused_where_it_would_count():
    """num_batches_tracked = 2**63 - 1 wrapped to -2**63 after a training call (the next
    call then refused it); refused before anything changes, while eval still runs."""
    x = np.random.default_rng(0).standard_normal((8, 3))
    rm, rv = np.zeros(3), np.ones(3)
    nbt = np.array([np.iinfo(np.int64).max])
    with pytest.raises(ValueError, match="num_batches_tracked is at the int64 maximum"):
        numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, num_batches_tracked=nbt)
    assert nbt[0] == np.iinfo(np.int64).max and not rm.any() and (rv == 1).all()
    numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, num_batches_tracked=nbt, training=False)
    numbabn.batch_norm_forward(x, num_batches_tracked=nbt)  # training without running statistics: no count
