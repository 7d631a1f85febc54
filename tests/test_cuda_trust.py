"""The CUDA path keeps the project's promise that a call that raises changes nothing,
and that errors name the argument: the caller's host input as a backward ``out``,
running statistics when a step after their update fails, and GPU-array-like objects
whose ``__cuda_array_interface__`` raises.

Without a GPU these run on Numba's CUDA simulator (tests/conftest.py).
"""

import numpy as np
import pytest
from numba import cuda

import numbabn
from numbabn._layout import is_device_array
from numbabn.backends import cuda as cuda_backend
from numbabn.kernels import cuda as K

from .test_cuda_arrays import _GPUArrayLikeRaising


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


# ------------------------------------------------- backward out= and the host input


@pytest.mark.parametrize("residual", [False, True])
def test_backward_out_may_not_be_the_host_input_of_a_cuda_forward(rng, residual):
    """NumPy x with backend="cuda": the context holds the device copy, yet ``out=x``
    (or ``residual_out=residual``) in the backward is refused as on the CPU backend,
    and the caller's arrays keep their values."""
    x = rng.standard_normal((6, 3, 4)).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32) if residual else None
    dy = rng.standard_normal(x.shape).astype(np.float32)
    x0, r0 = x.copy(), None if r is None else r.copy()
    for be in ("cpu", "cuda"):
        _, ctx = numbabn.batch_norm_forward(x, residual=r, backend=be)
        with pytest.raises(ValueError, match="out must not overlap dy, the forward input"):
            numbabn.batch_norm_backward(dy, ctx, out=x)
        if residual:
            with pytest.raises(ValueError, match="out must not overlap dy, the forward input or residual"):
                numbabn.batch_norm_backward(dy, ctx, out=r)
            with pytest.raises(ValueError, match="residual_out must not overlap dy, out, the forward input"):
                numbabn.batch_norm_backward(dy, ctx, residual_out=x)
            np.testing.assert_array_equal(r, r0)
        np.testing.assert_array_equal(x, x0)


@pytest.mark.parametrize("on_device", [False, True])
def test_backward_out_may_not_overlap_the_callers_gamma_after_a_cuda_forward(rng, on_device):
    """The CUDA context holds a device copy of a host gamma (or the caller's device
    gamma itself): an ``out`` sharing the caller's gamma is refused, as on the CPU."""
    x = rng.standard_normal((6, 3)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    buf = np.zeros(21, np.float32)
    buf[:3] = [0.5, 1.5, -2.0]
    if on_device:
        dbuf = cuda.to_device(buf)
        gamma, aliasing, dy_ = dbuf[:3], dbuf[:18].reshape(6, 3), cuda.to_device(dy)
    else:
        gamma, aliasing, dy_ = buf[:3], buf[:18].reshape(6, 3), dy
    _, ctx = numbabn.batch_norm_forward(x, gamma, None, backend="cuda")
    with pytest.raises(ValueError, match="out must not overlap dy, the forward input or gamma"):
        numbabn.batch_norm_backward(dy_, ctx, out=aliasing)
    host = dbuf.copy_to_host() if on_device else buf
    np.testing.assert_array_equal(host[:3], [0.5, 1.5, -2.0])


def test_backward_out_may_not_be_a_float16_device_input():
    """float16 device x is converted to a float32 copy for the kernels: ``out=x`` in
    the backward still overlaps the caller's x and is refused."""
    xh = np.random.default_rng(1).standard_normal((6, 3)).astype(np.float16)
    x = cuda.to_device(xh)
    _, ctx = numbabn.batch_norm_forward(x)
    with pytest.raises(ValueError, match="out must not overlap dy, the forward input"):
        numbabn.batch_norm_backward(cuda.to_device(np.ones_like(xh)), ctx, out=x)
    np.testing.assert_array_equal(x.copy_to_host(), xh)


def test_context_keeps_the_host_input_by_reference(rng):
    x = rng.standard_normal((6, 3)).astype(np.float32)
    _, ctx = numbabn.batch_norm_forward(x, backend="cuda")
    assert any(a is x for a in ctx.sources)  # a reference, no copy


# ------------------------------------------------- running statistics after a failure


class _Boom(RuntimeError):
    pass


def _failing_launch(*args, **kwargs):
    raise _Boom("launch failed")


class _FailingKernel:
    """A kernel whose launch fails (``kernel[grid, block](...)`` raises)."""

    def __getitem__(self, config):
        return _failing_launch


@pytest.mark.parametrize("step", ["apply", "deliver"], ids=["apply_fails", "deliver_fails"])
@pytest.mark.parametrize("where", ["device", "host"], ids=["stats_device", "stats_host"])
@pytest.mark.parametrize("x_on", ["device", "host"], ids=["x_device", "x_host"])
def test_running_stats_untouched_when_a_later_step_fails(rng, monkeypatch, step, where, x_on):
    """The normalising launch (after the statistics kernel) or the delivery of ``y``
    fails: the running statistics (GPU or NumPy arrays, ``given_running``), the
    counter and ``out`` keep their values; the same call then updates them as before."""
    xh = rng.standard_normal((8, 3, 5)).astype(np.float32)
    x = cuda.to_device(xh) if x_on == "device" else xh
    rm0, rv0 = np.arange(3, dtype=np.float32), np.full(3, 2.0, np.float32)
    rm, rv = (cuda.to_device(rm0), cuda.to_device(rv0)) if where == "device" else (rm0.copy(), rv0.copy())
    nbt = np.array(4, np.int64)
    out = cuda.to_device(np.full(xh.shape, 7, np.float32)) if x_on == "device" else np.full(xh.shape, 7, np.float32)
    if step == "apply":
        monkeypatch.setattr(K, "_apply_kernel", _FailingKernel())
    else:
        monkeypatch.setattr(cuda_backend, "deliver", _failing_launch)
    with pytest.raises(_Boom):
        numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, num_batches_tracked=nbt, out=out, backend="cuda")
    np.testing.assert_array_equal(host(rm), rm0)
    np.testing.assert_array_equal(host(rv), rv0)
    assert int(nbt) == 4
    if step == "apply" or x_on == "host":
        # (A device float32 out is the kernels' own buffer, written by the normalising
        # pass; its real delivery only returns it and cannot fail.)
        np.testing.assert_array_equal(host(out), 7)
    monkeypatch.undo()
    # and the same call, not failing, updates them as before
    numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, num_batches_tracked=nbt, backend="cuda")
    ref_m, ref_v = rm0.copy(), rv0.copy()
    numbabn.batch_norm_forward(xh, running_mean=ref_m, running_var=ref_v)
    np.testing.assert_allclose(host(rm), ref_m, rtol=1e-6)
    np.testing.assert_allclose(host(rv), ref_v, rtol=1e-6)
    assert int(nbt) == 5


# ------------------------------------------------- __cuda_array_interface__ that raises


def test_gpu_array_like_whose_interface_raises_is_a_gpu_array():
    assert is_device_array(_GPUArrayLikeRaising())


def test_gpu_array_like_whose_interface_raises_with_backend_cpu():
    with pytest.raises(
        TypeError, match=r"x is a GPU array \(_GPUArrayLikeRaising\) but this call runs on the CPU backend"
    ):
        numbabn.batch_norm_forward(_GPUArrayLikeRaising(), backend="cpu")


class _HostArrayLikeRaising:
    """A host array of a library whose GPU interface raises (JAX's CPU arrays), in
    each of NumPy's host protocols: it stays on the host path."""

    def __init__(self, a, protocol):
        self.a = a
        if protocol == "__array_interface__":
            self.__array_interface__ = a.__array_interface__
        elif protocol == "__array_struct__":
            self.__array_struct__ = a.__array_struct__

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("not a GPU array")


class _HostArrayLikeRaisingArray(_HostArrayLikeRaising):
    def __array__(self, dtype=None, copy=None):
        return self.a


@pytest.mark.parametrize("protocol", ["__array__", "__array_interface__", "__array_struct__"])
def test_host_array_like_whose_interface_raises_stays_on_the_host(rng, protocol):
    x = rng.standard_normal((6, 3)).astype(np.float32)
    cls = _HostArrayLikeRaisingArray if protocol == "__array__" else _HostArrayLikeRaising
    t = cls(x, protocol)
    assert not is_device_array(t)
    y, ctx = numbabn.batch_norm_forward(t)
    assert ctx.backend == "cpu" and isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, numbabn.batch_norm_forward(x)[0])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_eval_with_a_running_variance_at_or_below_minus_eps_gives_what_the_cpu_gives(dtype):
    """A running variance + eps of 0 or below (a corrupted checkpoint): the CPU gives
    inf and NaN, as a GPU's sqrt and division do; the simulator's Python math raised a
    math domain error or ZeroDivisionError naming a thread instead."""
    x = np.ones((4, 3), dtype)
    rm = np.zeros(3, dtype)
    rv = np.array([1.0, -1.0, -1e-5], dtype)
    eps = float(np.float32(1e-5)) if dtype == np.float32 else 1e-5
    cpu, _ = numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False, eps=eps)
    gpu, _ = numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False, eps=eps, backend="cuda")
    np.testing.assert_array_equal(gpu, cpu)  # NaN where NaN
    assert np.isnan(cpu[:, 1]).all() and not np.isfinite(cpu[:, 2]).any()
