"""Residual fusion ``act(BN(x) + r)`` (issue 15, item 5): kernels against the float64
reference (forward, backward, the residual's gradient), both backends, both layouts,
training and eval; thread-count independence; failed calls change nothing; and the
compile-time contract (no new specialisation for calls without a residual)."""

import numpy as np
import pytest
from numba import cuda

import numbabn
from numbabn import config
from numbabn.kernels import reference as R

TOL = {
    np.float64: dict(rtol=1e-10, atol=1e-10),
    np.float32: dict(rtol=2e-5, atol=2e-5),
    np.float16: dict(rtol=2e-2, atol=2e-2),
}
# (263, 1024): the channels-last gradient sums' long runs, four at a time and the rest.
CPU_CASES = [((6, 4, 5, 7), 1), ((50, 6), 1), ((3, 4, 5, 6), -1), ((7, 5, 9), 1), ((263, 1024), 1)]


def _inputs(rng, shape, axis, dtype):
    C = shape[axis]
    x = (rng.standard_normal(shape) * 2 + 1).astype(dtype)
    r = rng.standard_normal(shape).astype(dtype)
    dy = rng.standard_normal(shape).astype(dtype)
    pdt = np.float32 if dtype == np.float16 else dtype
    return x, r, dy, (1 + 0.3 * rng.standard_normal(C)).astype(pdt), rng.standard_normal(C).astype(pdt)


def _check(rng, shape, axis, dtype, relu, training, backend=None, to=lambda a: a, back=lambda a: a):
    x, r, dy, g, b = _inputs(rng, shape, axis, dtype)
    C = shape[axis]
    pdt = g.dtype
    rm, rv = rng.standard_normal(C).astype(pdt), (1 + rng.random(C)).astype(pdt)
    rm0, rv0 = rm.copy(), rv.copy()
    act = "relu" if relu else None
    y, ctx = numbabn.batch_norm_forward(
        to(x),
        g,
        b,
        running_mean=rm,
        running_var=rv,
        training=training,
        axis=axis,
        activation=act,
        residual=to(r),
        backend=backend,
    )
    stats = {} if training else dict(mean=rm0, var=rv0)
    ey, mean, var = R.forward(x, g, b, axis=axis, relu=relu, residual=r, **stats)
    tol = TOL[dtype]
    assert back(y).dtype == dtype
    np.testing.assert_allclose(back(y), ey, **tol)
    if training:
        erm, erv = R.update_running(rm0, rv0, mean, var, x.size // C, 0.1)
        np.testing.assert_allclose(rm, erm, **TOL[np.dtype(pdt).type])
        np.testing.assert_allclose(rv, erv, **TOL[np.dtype(pdt).type])
    grads = numbabn.batch_norm_backward(to(dy), ctx)
    assert len(grads) == 4
    ref = R.backward(dy, x, g, b, axis=axis, relu=relu, training=training, residual=r, **stats)
    scale = [1.0, np.abs(ref[1]).max() + 1, np.abs(ref[2]).max() + 1, 1.0]
    for got, want, s in zip(grads, ref, scale, strict=True):
        got = back(got)
        np.testing.assert_allclose(got / s, want / s, **tol)
    dr = back(grads[3])
    assert dr.dtype == dtype and dr.shape == shape
    # the residual's gradient is exactly dy times the forward's mask (or dy)
    mask = ~(back(y) <= 0) if relu else np.ones(shape, bool)
    np.testing.assert_array_equal(dr, np.where(mask, dy, 0).astype(dtype))
    return y, grads


@pytest.mark.parametrize("shape,axis", CPU_CASES)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_cpu_against_reference(rng, shape, axis, dtype, relu, training):
    _check(rng, shape, axis, dtype, relu, training)


def test_float16_is_computed_in_float32(rng):
    _check(rng, (4, 3, 5), 1, np.float16, True, True)


@pytest.mark.parametrize("shape,axis", [((3, 2, 5), 1), ((6, 3), 1), ((2, 3, 2, 3), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("relu,training", [(True, True), (False, True), (True, False)])
def test_cuda_against_reference(rng, shape, axis, dtype, relu, training):
    """CUDA backend (Numba's simulator without a GPU): device input and residual."""
    host = lambda a: a.copy_to_host() if hasattr(a, "copy_to_host") else a  # noqa: E731
    _check(rng, shape, axis, dtype, relu, training, to=cuda.to_device, back=host)
    _check(rng, shape, axis, dtype, relu, training, backend="cuda")  # NumPy in, NumPy out


def test_cuda_residual_must_live_with_x(rng):
    x, r, *_ = _inputs(rng, (4, 3), 1, np.float32)
    with pytest.raises(TypeError, match="residual must be a GPU array like x"):
        numbabn.batch_norm_forward(cuda.to_device(x), residual=r)


def test_strided_and_foreign_layout_residual(rng):
    """A residual in another memory layout is copied to x's canonical layout."""
    x, r, dy, g, b = _inputs(rng, (4, 3, 5, 6), 1, np.float32)
    rf = np.asfortranarray(r)
    y, ctx = numbabn.batch_norm_forward(x, g, b, activation="relu", residual=rf)
    y2, ctx2 = numbabn.batch_norm_forward(x, g, b, activation="relu", residual=r)
    np.testing.assert_array_equal(y, y2)
    for a, b_ in zip(numbabn.batch_norm_backward(dy, ctx), numbabn.batch_norm_backward(dy, ctx2), strict=True):
        np.testing.assert_array_equal(a, b_)


def test_out_arguments(rng):
    x, r, dy, g, b = _inputs(rng, (4, 3, 5), 1, np.float32)
    y0, ctx0 = numbabn.batch_norm_forward(x, g, b, activation="relu", residual=r)
    out = np.empty_like(x)
    y, ctx = numbabn.batch_norm_forward(x, g, b, activation="relu", residual=r, out=out)
    assert y is out and np.array_equal(y, y0)
    dx_out, dr_out = np.empty_like(x), np.empty_like(x)
    dx, dg, db, dr = numbabn.batch_norm_backward(dy, ctx, out=dx_out, residual_out=dr_out)
    assert dx is dx_out and dr is dr_out
    for a, b_ in zip((dx, dg, db, dr), numbabn.batch_norm_backward(dy, ctx0), strict=True):
        np.testing.assert_array_equal(a, b_)
    with pytest.raises(ValueError, match="out must not overlap x or residual"):
        numbabn.batch_norm_forward(x, g, b, residual=r, out=r)
    with pytest.raises(ValueError, match="residual_out must not overlap"):
        numbabn.batch_norm_backward(dy, ctx, out=dx_out, residual_out=dx_out)
    _, plain = numbabn.batch_norm_forward(x, g, b)
    with pytest.raises(ValueError, match="forward had none"):
        numbabn.batch_norm_backward(dy, plain, residual_out=dr_out)
    assert len(numbabn.batch_norm_backward(dy, plain)) == 3  # existing calls unchanged


@pytest.mark.parametrize(
    "bad,error,expected",
    [
        (np.empty((4, 3, 5), np.float64), TypeError, "residual_out must have dtype float32"),
        (np.empty((4, 3, 6), np.float32), ValueError, "residual_out must have shape"),
        (np.empty((4, 3, 10), np.float32)[..., ::2], ValueError, "residual_out must be a writeable C-contiguous"),
        ([0.0], TypeError, "residual_out must be"),
    ],
)
def test_residual_out_errors_name_it(rng, bad, error, expected):
    x, r, dy, g, b = _inputs(rng, (4, 3, 5), 1, np.float32)
    _, ctx = numbabn.batch_norm_forward(x, g, b, activation="relu", residual=r)
    dx_out = np.full_like(x, 7.0)
    with pytest.raises(error, match=expected):
        numbabn.batch_norm_backward(dy, ctx, out=dx_out, residual_out=bad)
    assert (dx_out == 7.0).all()  # nothing written


@pytest.mark.parametrize("shape,axis", [((16, 8, 700), 1), ((3000, 24), 1)])
def test_one_and_two_threads_are_bit_identical(rng, monkeypatch, shape, axis):
    monkeypatch.setattr(config, "SERIAL_MAX", 0)
    x, r, dy, g, b = _inputs(rng, shape, axis, np.float32)
    results = []
    for threads in (1, 2):
        with numbabn.limit_threads(threads):
            y, ctx = numbabn.batch_norm_forward(x, g, b, axis=axis, activation="relu", residual=r)
            results.append((y, *numbabn.batch_norm_backward(dy, ctx)))
    for a, b_ in zip(*results, strict=True):
        np.testing.assert_array_equal(a, b_)


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        ("shape", ValueError, r"residual must have the shape of x \(4, 3, 5\), got \(4, 3, 4\)"),
        ("dtype", TypeError, r"residual must have the dtype of x \(float32\), got float64"),
        ("ndim", ValueError, r"residual must have at least 2 dimensions"),
        ("int", TypeError, r"residual must have a floating dtype"),
    ],
)
def test_failed_call_changes_nothing(rng, bad, exc, match):
    x, r, *_ = _inputs(rng, (4, 3, 5), 1, np.float32)
    residual = {"shape": r[..., :4], "dtype": r.astype(np.float64), "ndim": r.ravel(), "int": r.astype(np.int32)}[bad]
    rm, rv, nbt = np.zeros(3, np.float32), np.ones(3, np.float32), np.zeros(1, np.int64)
    out = np.full_like(x, 7.0)
    with pytest.raises(exc, match=match):
        numbabn.batch_norm_forward(
            x, running_mean=rm, running_var=rv, num_batches_tracked=nbt, residual=residual, activation="relu", out=out
        )
    assert np.all(rm == 0) and np.all(rv == 1) and nbt[0] == 0 and np.all(out == 7.0)


_SPECS_CHILD = r"""
import json, numpy as np, numbabn
from numba import types
from numbabn import _jit
def specs():
    return {(k.name, str(sig)) for k in _jit.kernels() for sig in k._specs}
def residual_specs():
    # the residual argument: index 1 of apply_*, index 2 of grad_sums_*/grad_apply_*
    return sorted(k.name for k in _jit.kernels() for sig in k._specs
                  if k.name.startswith(("apply_", "grad_"))
                  and k.name != "grad_coefficients" and sig[1 if k.name.startswith("apply_") else 2] != types.none)
rng = np.random.default_rng(0)
out = {}
for shape in ((5, 3, 80), (40, 3)):  # NCL rows of 80 values: the NCL kernels throughout
    x, r, dy = (rng.standard_normal(shape).astype(np.float32) for _ in range(3))
    for act in (None, "relu"):
        y, ctx = numbabn.batch_norm_forward(x, activation=act)
        numbabn.batch_norm_backward(dy, ctx)
out["plain"] = len(specs())
out["plain_residual"] = residual_specs()
x, r, dy = (rng.standard_normal((5, 3, 80)).astype(np.float32) for _ in range(3))
_, ctx = numbabn.batch_norm_forward(x, residual=r)
numbabn.batch_norm_backward(dy, ctx)
out["no_relu"] = residual_specs()
_, ctx = numbabn.batch_norm_forward(x, residual=r, activation="relu")
numbabn.batch_norm_backward(dy, ctx)
out["relu"] = residual_specs()
before = specs()
_, ctx = numbabn.batch_norm_forward(x, activation="relu")
numbabn.batch_norm_backward(dy, ctx)
out["plain_again_new"] = len(specs() - before)
# short NCL rows run their element-wise passes on the channels-last kernels, their
# reductions on the tile kernels
xs, dys = (rng.standard_normal((5, 3, 4)).astype(np.float32) for _ in range(2))
for act in (None, "relu"):
    _, ctx = numbabn.batch_norm_forward(xs, activation=act)
    numbabn.batch_norm_backward(dys, ctx)
out["short_rows_new"] = sorted(name for name, _ in specs() - before)
print(json.dumps(out))
"""


def test_specialisations():
    """Calls without a residual get no residual specialisation (their signatures carry
    None where the residual goes) and as many as before this feature (2 layouts x
    (stats, apply, grad_sums, grad_apply) + the shared coefficients and grad_coefficients
    = 10);
    the residual adds one specialisation per element kernel it needs, on first use:
    apply without ReLU (the backward then reuses the plain kernels), plus grad_sums
    and grad_apply with ReLU. Short NCL rows (the driver's channels-last view of their
    element-wise passes) add only their two reductions over tiles. In a fresh process (its kernels may load from the
    disk cache: a specialisation counts either way)."""
    import json
    import os
    import subprocess
    import sys

    env = {**os.environ, "NUMBABN_QUIET": "1"}
    res = subprocess.run([sys.executable, "-c", _SPECS_CHILD], capture_output=True, text=True, env=env, timeout=600)
    assert res.returncode == 0, res.stderr
    out = json.loads(res.stdout.strip().splitlines()[-1])
    assert out["plain"] == 10
    assert out["plain_residual"] == []
    assert out["no_relu"] == ["apply_ncl"]
    assert out["relu"] == ["apply_ncl", "grad_apply_ncl", "grad_sums_ncl"]
    assert out["plain_again_new"] == 0
    assert out["short_rows_new"] == ["grad_sums_tiles", "stats_tiles"]
