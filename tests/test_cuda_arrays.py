"""CUDA device-array semantics: where results live (NumPy input with
backend="cuda", device ``out``, host or device running statistics), host/device
mixing and device-array errors, SyncBatchNorm on device arrays, the import and
availability checks.

Without a GPU these run on Numba's CUDA simulator (tests/conftest.py). The numbers
themselves are checked for both backends in test_numerics.py.
"""

import subprocess
import sys

import numpy as np
import pytest
from numba import cuda

import numbabn
from numbabn.kernels import reference as R

from .helpers import TOL, make_inputs, param_dtype
from .test_errors import BAD_FORWARD
from .test_numerics import CPU_TOL

SIMULATOR = bool(cuda.config.ENABLE_CUDASIM)


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else a


def assert_device(*arrays):
    for a in arrays:
        assert numbabn._layout.is_device_array(a), type(a)


def test_numpy_input_with_cuda_backend_returns_numpy(rng):
    x, g, b = make_inputs(rng, (5, 3, 4), 1, np.float32)
    y, ctx = numbabn.batch_norm_forward(x, g, b, backend="cuda")
    assert isinstance(y, np.ndarray) and ctx.backend == "cuda"
    np.testing.assert_allclose(y, R.forward(x, g, b)[0], **TOL[np.float32])
    dy = rng.standard_normal(x.shape).astype(np.float32)
    out = np.empty_like(x)
    dx, dg, db = numbabn.batch_norm_backward(dy, ctx, out=out)
    assert dx is out and isinstance(dg, np.ndarray) and isinstance(db, np.ndarray)
    np.testing.assert_allclose(dx, R.backward(dy, x, g, b)[0], **TOL[np.float32])
    m = numbabn.moments(x, backend="cuda")
    np.testing.assert_allclose(m.m2, R.moments(x)[2], rtol=1e-12)


def test_float32_running_stats_host_arrays(rng):
    x, g, b = make_inputs(rng, (8, 2, 3), 1, np.float32)
    rm, rv = np.zeros(2, np.float32), np.ones(2, np.float32)
    cpu_rm, cpu_rv = rm.copy(), rv.copy()
    numbabn.batch_norm_forward(cuda.to_device(x), g, b, running_mean=rm, running_var=rv)
    numbabn.batch_norm_forward(x, g, b, running_mean=cpu_rm, running_var=cpu_rv)
    assert rm.dtype == np.float32
    np.testing.assert_allclose(rm, cpu_rm, rtol=1e-6)
    np.testing.assert_allclose(rv, cpu_rv, rtol=1e-6)


@pytest.mark.parametrize("shape,axis", [((0, 3), 1), ((0, 3, 4), 1), ((4, 3, 0), 1), ((2, 0, 3), -1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float16])
def test_empty_batch_numpy_input_with_cuda_backend(shape, axis, dtype):
    """NumPy input with backend="cuda" and no values per channel: NumPy results,
    zero dgamma/dbeta, running statistics kept, the training call counted."""
    pdt = param_dtype(dtype)
    rm, rv, nbt = np.full(3, 0.5, pdt), np.full(3, 2.0, pdt), np.zeros((), np.int64)
    x = np.empty(shape, dtype)
    for training in (True, False):
        y, ctx = numbabn.batch_norm_forward(
            x,
            np.ones(3, pdt),
            np.zeros(3, pdt),
            running_mean=rm,
            running_var=rv,
            num_batches_tracked=nbt,
            training=training,
            axis=axis,
            backend="cuda",
        )
        assert ctx.backend == "cuda"
        dx, dg, db = numbabn.batch_norm_backward(x, ctx)
        for a in (y, dx, dg, db):
            assert isinstance(a, np.ndarray), type(a)
        assert y.shape == dx.shape == shape and y.dtype == dx.dtype == dtype
        assert np.all(dg == 0) and np.all(db == 0) and dg.dtype == pdt
    assert int(nbt) == 1 and np.all(rm == 0.5) and np.all(rv == 2.0)


def test_float16_numpy_input_with_cuda_backend_matches_the_cpu(rng):
    """float16 NumPy input, backend="cuda": converted to float32 on the host for the
    device (the CPU kernels' 16-bit view must not reach the CUDA kernels), float16
    results like the CPU backend's; a bfloat16 view is refused with a clear error."""
    x = (rng.standard_normal((6, 3, 5)) * 2 + 1).astype(np.float16)
    dy = rng.standard_normal(x.shape).astype(np.float16)
    g, b = np.ones(3, np.float32), np.zeros(3, np.float32)
    results = {}
    for be in ("cpu", "cuda"):
        y, ctx = numbabn.batch_norm_forward(x, g, b, activation="relu", backend=be)
        dx, dg, db = numbabn.batch_norm_backward(dy, ctx)
        results[be] = [host(a) for a in (y, dx, dg, db)]
    for a, c in zip(results["cuda"], results["cpu"], strict=True):
        assert a.dtype == c.dtype
        np.testing.assert_allclose(a.astype(np.float32), c.astype(np.float32), rtol=2e-3, atol=2e-3)
    from numbabn._layout import BFLOAT16

    with pytest.raises(TypeError, match="bfloat16 x runs on the CPU backend only"):
        numbabn.batch_norm_forward(np.zeros((4, 3), np.uint16).view(BFLOAT16), backend="cuda")


def test_eval_with_float64_statistics_numpy_input_with_cuda_backend():
    """Eval mode with float64 running statistics for float32 NumPy input on the CUDA
    backend: the CPU backend's result (device input: test_numerics.py)."""
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((6, 3, 5)) + 1e6).astype(np.float32)
    rm, rv = x.astype(np.float64).mean(axis=(0, 2)), np.full(3, 0.8)
    expected, _ = numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False)
    y, _ = numbabn.batch_norm_forward(x, running_mean=rm, running_var=rv, training=False, backend="cuda")
    assert isinstance(y, np.ndarray)
    np.testing.assert_allclose(y, expected, rtol=0, atol=2e-6)
    ref = (x.astype(np.float64) - rm[None, :, None]) / np.sqrt(0.8 + 1e-5)
    assert np.abs(y - ref).max() < 2e-6


def test_out_overlapping_running_stats_on_the_device(rng):
    x = cuda.to_device(rng.standard_normal((4, 3)).astype(np.float32))
    buf = cuda.device_array((4, 3), np.float32)
    rm = buf.reshape(12)[:3]
    with pytest.raises(
        ValueError, match="out must not overlap gamma, beta, the running statistics or num_batches_tracked"
    ):
        numbabn.batch_norm_forward(x, running_mean=rm, running_var=cuda.to_device(np.ones(3, np.float32)), out=buf)
    rv = cuda.to_device(np.ones(3, np.float32))
    with pytest.raises(ValueError, match="running_mean and running_var must not overlap"):
        numbabn.batch_norm_forward(x, running_mean=rv, running_var=rv)


# ---------------------------------------------------------------- errors


def _device_kwargs(kw):
    """The same call with every NumPy array argument on the device."""
    return {
        k: cuda.to_device(v) if isinstance(v, np.ndarray) and v.ndim and k != "num_batches_tracked" else v
        for k, v in kw.items()
    }


# Host out= arrays with device input are a different error (see test_device_errors).
ERROR_CASES = [case + (False,) for case in BAD_FORWARD] + [
    case + (True,) for case in BAD_FORWARD if "out" not in case[0]
]


@pytest.mark.parametrize("override,exc,fragment,on_device", ERROR_CASES)
def test_forward_errors_match_cpu_and_leave_state_untouched(override, exc, fragment, on_device):
    """Every CPU validation error, with backend='cuda' (NumPy input) or device input."""
    X = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
    rm, rv, nbt = np.arange(3, dtype=np.float32), np.full(3, 2, np.float32), np.array(5, np.int64)
    kw = dict(
        x=X,
        gamma=np.ones(3, np.float32),
        beta=np.zeros(3, np.float32),
        running_mean=rm,
        running_var=rv,
        num_batches_tracked=nbt,
        backend="cuda",
    )
    kw.update(override)
    if on_device:
        kw = _device_kwargs(kw)
    x = kw.pop("x")
    with pytest.raises(exc, match=fragment.replace("(", r"\(").replace(")", r"\)")):
        numbabn.batch_norm_forward(x, kw.pop("gamma"), kw.pop("beta"), **kw)
    if on_device and kw.get("running_mean") is not None and override.get("running_mean") is None:
        np.testing.assert_array_equal(host(kw["running_mean"]), np.arange(3))
    np.testing.assert_array_equal(rm, np.arange(3))
    np.testing.assert_array_equal(rv, 2)
    assert int(nbt) == 5


def test_device_errors():
    x = cuda.to_device(np.ones((4, 3, 5), np.float32))
    rm = cuda.to_device(np.arange(3, dtype=np.float32))
    rv = cuda.to_device(np.ones(3, np.float32))
    with pytest.raises(TypeError, match="gamma must have dtype float32"):
        numbabn.batch_norm_forward(x, cuda.to_device(np.ones(3)), running_mean=rm, running_var=rv)
    with pytest.raises(ValueError, match=r"beta must have shape \(3,\)"):
        numbabn.batch_norm_forward(x, None, cuda.to_device(np.ones(4, np.float32)), running_mean=rm, running_var=rv)
    np.testing.assert_array_equal(host(rm), np.arange(3))
    with pytest.raises(TypeError, match="x is a GPU array .* but this call runs on the CPU backend"):
        numbabn.batch_norm_forward(x, backend="cpu")
    with pytest.raises(TypeError, match="x is a GPU array"):
        numbabn.moments(x, backend="cpu")
    # host x with GPU parameters: refused like a GPU x, not silently copied to the host
    xh, gd = np.ones((4, 3, 5), np.float32), cuda.to_device(np.ones(3, np.float32))
    for kw, name in [(dict(gamma=gd), "gamma"), (dict(beta=gd), "beta")]:
        with pytest.raises(TypeError, match=f"{name} is a GPU array .* but x is a host array"):
            numbabn.batch_norm_forward(xh, **kw)
    with pytest.raises(TypeError, match="running_mean is a GPU array .* but x is a host array"):
        numbabn.batch_norm_forward(xh, running_mean=gd, running_var=np.ones(3, np.float32), training=False)
    with pytest.raises(ValueError, match="non-contiguous GPU array"):
        numbabn.batch_norm_forward(cuda.to_device(np.ones((4, 6, 5), np.float32))[:, ::2])
    with pytest.raises(TypeError, match="out must be a GPU array"):
        numbabn.batch_norm_forward(x, out=np.empty((4, 3, 5), np.float32))
    with pytest.raises(ValueError, match="out must not overlap x"):
        numbabn.batch_norm_forward(x, out=x)
    with pytest.raises(TypeError, match="out must have dtype float32"):
        numbabn.batch_norm_forward(x, out=cuda.device_array((4, 3, 5)))
    _, ctx = numbabn.batch_norm_forward(x)
    with pytest.raises(ValueError, match="dy must have the forward input's shape"):
        numbabn.batch_norm_backward(cuda.to_device(np.ones((4, 3, 6), np.float32)), ctx)
    with pytest.raises(TypeError, match="dy must have the forward input's dtype float32"):
        numbabn.batch_norm_backward(cuda.to_device(np.ones((4, 3, 5))), ctx)
    with pytest.raises(ValueError, match="out must not overlap dy, the forward input"):
        numbabn.batch_norm_backward(x, ctx, out=x)


class _UnreadableGPUArray:
    """What a torch CUDA tensor that requires grad is to numbabn: its
    ``__cuda_array_interface__`` raises RuntimeError, not AttributeError."""

    shape, dtype = (4, 3), np.dtype(np.float32)
    is_cuda = True

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("Can't get __cuda_array_interface__ on Variable that requires grad")


class _HostArrayRaisingOnTheGPUInterface:
    """A host array of a library whose ``__cuda_array_interface__`` raises
    RuntimeError rather than AttributeError (JAX's CPU arrays)."""

    def __init__(self, a):
        self.a = a

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("not a GPU array")

    def __array__(self, dtype=None, copy=None):
        return self.a


def test_a_host_array_whose_gpu_interface_raises_stays_on_the_host(rng):
    x = rng.standard_normal((6, 3)).astype(np.float32)
    y, ctx = numbabn.batch_norm_forward(_HostArrayRaisingOnTheGPUInterface(x))
    assert ctx.backend == "cpu" and isinstance(y, np.ndarray)
    np.testing.assert_array_equal(y, numbabn.batch_norm_forward(x)[0])


class _GPUArrayLikeRaising:
    """A GPU-array-like object whose ``__cuda_array_interface__`` raises RuntimeError,
    with no ``is_cuda`` and no host protocol (``__array__``, ``__array_interface__``):
    it cannot be host data."""

    shape, dtype = (4, 3), np.dtype(np.float32)

    @property
    def __cuda_array_interface__(self):
        raise RuntimeError("the stream is gone")


@pytest.mark.parametrize(
    "array,error",
    [
        (_UnreadableGPUArray, r"RuntimeError.*detach\(\)$"),
        (_GPUArrayLikeRaising, r"RuntimeError: the stream is gone\)$"),  # no torch hint without is_cuda
    ],
)
@pytest.mark.parametrize(
    "call,name",
    [
        (lambda t: numbabn.batch_norm_forward(t), "x"),
        (lambda t: numbabn.batch_norm_forward(t, backend="cuda"), "x"),
        (lambda t: numbabn.moments(t), "x"),
        (lambda t: numbabn.batch_norm_forward(cuda.to_device(np.ones((4, 3), np.float32)), t), "gamma"),
        (lambda t: numbabn.batch_norm_forward(cuda.to_device(np.ones((4, 3), np.float32)), out=t), "out"),
    ],
)
def test_unreadable_gpu_array_is_an_error_naming_the_argument(call, name, array, error):
    with pytest.raises(TypeError, match=f"{name} is a GPU array that cannot be read .*{error}"):
        call(array())


# ---------------------------------------------------------------- environment


def test_importing_numbabn_does_not_import_numba_cuda():
    code = (
        "import sys, numbabn, numbabn.functional; numbabn.batch_norm_forward; "
        "assert not any(m.startswith('numba.cuda') for m in sys.modules), 'numba.cuda imported'"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.skipif(not SIMULATOR, reason="the simulator's own limit")
def test_foreign_cuda_array_interface_on_the_simulator_is_a_clear_type_error(rng):
    """The simulator cannot wrap another library's GPU memory (no cuda.as_cuda_array):
    a TypeError that says so, not an AttributeError from inside numbabn."""

    class Foreign:  # what CuPy / PyTorch expose (the simulator's arrays have no interface to copy)
        __cuda_array_interface__ = {"shape": (5, 3), "typestr": "<f4", "data": (0, False), "version": 3}

    x = Foreign()
    with pytest.raises(TypeError, match="Numba's CUDA simulator .* can only take its own device arrays"):
        numbabn.batch_norm_forward(x)


def test_host_forward_then_gpu_dy_names_the_forward_not_a_backend_argument(rng):
    x = rng.standard_normal((5, 3)).astype(np.float32)
    _, ctx = numbabn.batch_norm_forward(x)  # no backend= given: the host arrays chose the CPU
    with pytest.raises(TypeError, match=r"dy is a GPU array .* the forward ran on host arrays"):
        numbabn.batch_norm_backward(cuda.to_device(x), ctx)


def test_layers_that_compute_on_the_host_refuse_gpu_input(rng):
    """Only the batch-norm layers take GPU arrays; the others copied them to the host
    behind the user's back (np.asarray), and the rest of the model ran there."""
    from numbabn.layers import BatchNorm1d, Linear, ReLU, Sequential

    x = cuda.to_device(rng.standard_normal((6, 4)).astype(np.float32))
    for layer in (Linear(4, 3, dtype=np.float32), ReLU(), Sequential(Linear(4, 3, dtype=np.float32), BatchNorm1d(3))):
        with pytest.raises(TypeError, match="input is a GPU array .* this layer computes on the host"):
            layer.forward(x)
    assert type(BatchNorm1d(4).forward(x)) is type(x)  # stays on the device


@pytest.mark.skipif(SIMULATOR, reason="foreign __cuda_array_interface__ objects need a real GPU")
def test_cuda_array_interface_zero_copy(rng):
    class Foreign:  # what CuPy / PyTorch expose
        def __init__(self, d):
            self.__cuda_array_interface__ = d.__cuda_array_interface__

    x = rng.standard_normal((5, 3, 4)).astype(np.float32)
    d_out = cuda.device_array(x.shape, np.float32)
    y, _ = numbabn.batch_norm_forward(Foreign(cuda.to_device(x)), out=Foreign(d_out))
    np.testing.assert_allclose(d_out.copy_to_host(), R.forward(x)[0], **TOL[np.float32])


@pytest.mark.parametrize("ranks", [2, 3])
@pytest.mark.parametrize("kind,shape", [("1d", (4, 3, 2)), ("2d", (2, 3, 2, 3))])
def test_sync_batch_norm_takes_device_arrays(rng, ranks, kind, shape):
    """SyncBatchNorm1d/2d on device input, ``ranks`` ranks holding identical batches
    (a mirror communicator): the CPU layer on the concatenated copies."""
    from numbabn.distributed import SyncBatchNorm1d, SyncBatchNorm2d

    from .test_distributed_mpi import MirrorComm

    cls, ref_cls = (
        (SyncBatchNorm1d, numbabn.layers.BatchNorm1d) if kind == "1d" else (SyncBatchNorm2d, numbabn.layers.BatchNorm2d)
    )
    x = (rng.standard_normal(shape) + 2).astype(np.float32)
    dy = rng.standard_normal(shape).astype(np.float32)
    sync = cls(3, activation="relu", comm=MirrorComm(ranks))._randomize_state(rng)
    ref = ref_cls(3, activation="relu")
    ref.load_state_dict(sync.state_dict())
    y = sync.forward(cuda.to_device(x))
    dx = sync.backward(cuda.to_device(dy))
    assert_device(y, dx)
    n = len(x)
    np.testing.assert_allclose(host(y), ref.forward(np.concatenate([x] * ranks))[:n], **CPU_TOL[np.float32])
    np.testing.assert_allclose(host(dx), ref.backward(np.concatenate([dy] * ranks))[:n], **CPU_TOL[np.float32])
    assert isinstance(sync.weight.grad, np.ndarray)
    np.testing.assert_allclose(sync.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(sync.bias.grad, ref.bias.grad, rtol=1e-5, atol=1e-5)
    for key, value in ref.state_dict().items():
        np.testing.assert_allclose(sync.state_dict()[key], value, rtol=1e-5, err_msg=key)


@pytest.mark.parametrize("cls,shape", [("BatchNorm2d", (3, 2, 5, 4)), ("BatchNorm3d", (2, 2, 3, 2, 4))])
def test_channels_last_layers_take_device_arrays(rng, cls, shape):
    """A channels-last layer on device input: the same outputs, gradients and
    running statistics as on the host."""
    import numbabn.layers

    layer_cls = getattr(numbabn.layers, cls)
    dev, ref = layer_cls(4, channels_last=True)._randomize_state(rng), layer_cls(4, channels_last=True)
    ref.load_state_dict(dev.state_dict())
    x, dy = rng.standard_normal(shape).astype(np.float32), rng.standard_normal(shape).astype(np.float32)
    y, dx = dev.forward(cuda.to_device(x)), dev.backward(cuda.to_device(dy))
    assert_device(y, dx)
    np.testing.assert_allclose(host(y), ref.forward(x), **CPU_TOL[np.float32])
    np.testing.assert_allclose(host(dx), ref.backward(dy), **CPU_TOL[np.float32])
    np.testing.assert_allclose(dev.weight.grad, ref.weight.grad, rtol=1e-5, atol=1e-5)
    for key, value in ref.state_dict().items():
        np.testing.assert_allclose(dev.state_dict()[key], value, rtol=1e-5, err_msg=key)
