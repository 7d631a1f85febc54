"""The one place that checks and canonicalises inputs, so that bad input gets a
clear error (which argument, what was expected, what came) before any kernel runs
or any state changes, and kernels only ever see canonical, well-typed arrays.

Canonical layouts: an input with channel axis ``axis`` is viewed as
``(N, C, L)`` ("ncl") when the channel axis is not last and ``L > 1``, or as
``(M, C)`` ("mc") otherwise (channels-last, or a plain (N, C) matrix). The view is
zero-copy for C-contiguous input; other inputs are copied once into that layout.
float16 is computed in float32.

Host arrays are taken as they come with two exceptions, handled alike for every
array argument (:func:`host_array`): non-native byte order (big-endian data read
from a file) is converted to the native order, since it is a valid float array
the kernels cannot read; a masked array with masked values is refused (batch norm
has no notion of a missing value, and silently using the data under the mask
would be wrong), one without any is used as its data.

The CUDA backend uses :func:`canonical_device` and :func:`check_device_param`: the
same rules and messages, with GPU arrays viewed on the device (numba.cuda is
imported only there).
"""
from math import isfinite, prod
import numbers
from typing import NamedTuple

import numpy as np

_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


_FLOAT32 = np.dtype(np.float32)


_FLOAT64 = np.dtype(np.float64)


def compute_dtype(dtype):
    """The native dtype the kernels compute in: float16 -> float32; float32/float64
    of either byte order -> native float32/float64."""
    return _FLOAT64 if np.dtype(dtype).char == "d" else _FLOAT32


def empty_param(dtype):
    """The shared zero-length array that kernels read as 'parameter absent'."""
    return _EMPTY[np.dtype(dtype)]


class Canonical(NamedTuple):
    """An input viewed in its canonical layout (see module docstring).

    A NamedTuple rather than a dataclass: one is built on every call, and the
    per-call Python overhead decides the speed on tiny inputs.
    """

    array: object        # (N, C, L) or (M, C), C-contiguous, compute dtype
    layout: str          # "ncl" or "mc"
    shape: tuple         # the caller's shape
    axis: int            # normalised channel axis
    dtype: np.dtype      # the caller's dtype
    channels: int
    count: int           # values per channel (m = N*L or M)


def describe(value):
    """Short description of what came, for error messages."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"[:120]


def check_float_dtype(fn, name, dtype):
    if np.dtype(dtype).char not in "efd":
        raise TypeError(
            f"{fn}: {name} must have a floating dtype (float16, float32 or float64), got {dtype}")


_LAYOUTS = {}   # (shape, axis) -> layout_of's answer: most programs call with few shapes


def layout_of(fn, name, shape, axis):
    """Normalise ``axis`` and return (axis, layout, canonical shape, C, m)."""
    if type(axis) is int:
        known = _LAYOUTS.get((shape, axis))
        if known is not None:
            return known
    result = _layout_of(fn, name, shape, axis)
    if type(axis) is int and len(_LAYOUTS) < 4096:
        _LAYOUTS[(tuple(shape), axis)] = result
    return result


def _layout_of(fn, name, shape, axis):
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"{fn}: {name} must have at least 2 dimensions (batch, channels, ...), got shape {tuple(shape)}")
    if type(axis) is not int and (isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral)):
        raise TypeError(f"{fn}: axis must be an int, got {describe(axis)}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{fn}: axis={axis} is out of range for {name} with {ndim} dimensions")
    axis = int(axis) % ndim
    C = int(shape[axis])
    if C == 0:
        raise ValueError(f"{fn}: {name} has no channels (shape {tuple(shape)}, axis={axis})")
    N = prod(shape[:axis]) if axis != 1 else shape[0]
    L = prod(shape[axis + 1:]) if axis != ndim - 1 else 1
    if L == 1 or axis == ndim - 1:
        M = N * L
        return axis, "mc", (M, C), C, M
    return axis, "ncl", (N, C, L), C, N * L


def is_device_array(x):
    """True for a GPU array: one exposing ``__cuda_array_interface__`` (numba device
    arrays, CuPy, PyTorch CUDA tensors) or a numba device array (those of the CUDA
    simulator have no such interface)."""
    if isinstance(x, np.ndarray):
        return False
    return hasattr(x, "__cuda_array_interface__") or bool(getattr(x, "__cuda_ndarray__", False))


def host_array(fn, name, x):
    """``x`` as a NumPy array in native byte order (see the module docstring):
    converted from array-likes and from big-endian data; masked arrays with masked
    values refused. Plain native arrays come back as they are (no copy)."""
    if type(x) is not np.ndarray:
        if isinstance(x, np.ma.MaskedArray):
            if np.ma.is_masked(x):
                raise ValueError(
                    f"{fn}: {name} is a masked array with {int(np.ma.count_masked(x))} masked value(s); "
                    "batch norm has no notion of a missing value: fill them (x.filled(value)) or drop "
                    "those samples first")
            x = x.data
        else:
            try:
                x = np.asarray(x)
            except Exception as exc:
                raise TypeError(f"{fn}: {name} must be an array, got {describe(x)}") from exc
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return x


def canonical_host(fn, name, x, axis):
    """Check a host (NumPy) input and view it in its canonical layout."""
    if type(x) is not np.ndarray or not x.dtype.isnative:
        if is_device_array(x):
            raise TypeError(
                f"{fn}: {name} is a GPU array ({type(x).__name__}) but backend='cpu' was requested")
        x = host_array(fn, name, x)
    dtype = x.dtype
    if dtype.char not in "fd":
        check_float_dtype(fn, name, dtype)
    axis, layout, cshape, C, m = layout_of(fn, name, x.shape, axis)
    flags = x.flags
    if flags.c_contiguous and flags.aligned and dtype.char != "e":
        arr = x.reshape(cshape)
    else:
        arr = np.ascontiguousarray(x, dtype=compute_dtype(x.dtype)).reshape(cshape)
    return Canonical(arr, layout, x.shape, axis, x.dtype, C, m)


def check_param(fn, name, value, channels, dtype, *, inplace=False):
    """A per-channel 1-D parameter of ``dtype`` and length ``channels``.

    ``inplace`` parameters (running statistics) are updated by the kernels, so they
    must be writeable C-contiguous NumPy arrays; others are copied if needed.
    Returns the array, or the shared empty array when ``value`` is None.
    """
    if value is None:
        return empty_param(dtype)
    if type(value) is np.ndarray and value.dtype is dtype and value.shape == (channels,):
        flags = value.flags           # the common case, checked in one go
        if flags.c_contiguous and flags.aligned and (flags.writeable or not inplace):
            return value
    if type(value) is not np.ndarray or not value.dtype.isnative:
        if inplace:
            if not isinstance(value, np.ndarray) or isinstance(value, np.ma.MaskedArray):
                raise TypeError(
                    f"{fn}: {name} is updated in place and must be a NumPy array, got {describe(value)}")
            if not value.dtype.isnative:
                raise TypeError(
                    f"{fn}: {name} is updated in place and must be in native byte order, got "
                    f"dtype {value.dtype.str} (convert it with .astype({value.dtype.name!r}))")
        else:
            value = host_array(fn, name, value)
    if value.shape != (channels,):
        raise ValueError(
            f"{fn}: {name} must have shape ({channels},) (one value per channel), got shape {value.shape}")
    if value.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have dtype {dtype} to match the input, got {value.dtype}")
    flags = value.flags
    if not flags.aligned:
        if inplace:
            raise ValueError(f"{fn}: {name} is updated in place and must be an aligned array")
        value = value.copy()
    if inplace:
        if not flags.writeable:
            raise ValueError(f"{fn}: {name} is updated in place but is read-only")
        if not flags.c_contiguous:
            raise ValueError(f"{fn}: {name} is updated in place and must be contiguous")
        return value
    if not flags.c_contiguous:
        value = value.copy()   # the kernels take contiguous parameters (read-only ones too)
    return value


def check_forward_params(fn, cx, gamma, beta, running_mean, running_var, num_batches_tracked,
                         training, check=None):
    """The per-channel arguments of a forward pass, checked against the input ``cx``
    with ``check`` (:func:`check_param`, or :func:`check_device_param` on the GPU).
    Running statistics are updated in place only in training mode; in eval mode
    they are only read, so read-only ones are fine there, and float64 ones are
    accepted for float32 input too.
    Returns (gamma, beta, running_mean, running_var, num_batches_tracked)."""
    check = check or check_param
    dt = compute_dtype(cx.dtype)
    return (check(fn, "gamma", gamma, cx.channels, dt),
            check(fn, "beta", beta, cx.channels, dt),
            check(fn, "running_mean", running_mean, cx.channels,
                  dt if training else _stats_dtype(running_mean, dt), inplace=training),
            check(fn, "running_var", running_var, cx.channels,
                  dt if training else _stats_dtype(running_var, dt), inplace=training),
            check_counter(fn, num_batches_tracked))


_FLOAT64 = np.dtype(np.float64)


def _stats_dtype(value, dt):
    """The dtype running statistics must have: the compute dtype, except that eval mode
    (where they are only read, and the kernels turn them into float64 coefficients)
    also takes float64 statistics for float32 input -- e.g. a float64 ``mean_`` with
    ``|mean| >> std``, which rounding to float32 first would spoil."""
    return _FLOAT64 if getattr(value, "dtype", None) == _FLOAT64 else dt


_INT64 = np.dtype(np.int64)


def check_counter(fn, value, *, inplace=True):
    """num_batches_tracked: None or a one-element int64 array holding a count >= 0
    (writeable when ``inplace``). int64 as in PyTorch: a narrower counter would wrap
    (uint8: 255 -> 0, and the cumulative average would restart from one batch)."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or value.size != 1 or value.dtype != _INT64:
        raise TypeError(
            f"{fn}: num_batches_tracked must be a one-element int64 NumPy array "
            f"(updated in place), got {describe(value)}")
    if value.item() < 0:
        raise ValueError(f"{fn}: num_batches_tracked counts batches and must be >= 0, got {value.item()}")
    if inplace and not value.flags.writeable:
        raise ValueError(f"{fn}: num_batches_tracked is updated in place but is read-only")
    return value


def check_eps(fn, eps):
    if type(eps) is float and eps > 0 and isfinite(eps):
        return eps
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real) or not eps > 0 \
            or not isfinite(eps):
        raise ValueError(f"{fn}: eps must be a finite number > 0, got {eps!r}")
    return float(eps)


def check_momentum(fn, momentum):
    if momentum is None:
        return None
    if type(momentum) is float and 0.0 <= momentum <= 1.0:
        return momentum
    if isinstance(momentum, (bool, np.bool_)) or not isinstance(momentum, numbers.Real) \
            or not 0.0 <= momentum <= 1.0:
        raise ValueError(f"{fn}: momentum must be None or a number in [0, 1], got {momentum!r}")
    return float(momentum)


def check_activation(fn, activation):
    if activation is None:
        return False
    if activation == "relu":
        return True
    raise ValueError(f"{fn}: activation must be None or 'relu', got {activation!r}")


def check_bool(fn, name, value):
    if value is True or value is False:
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a bool, got {describe(value)}")
    return bool(value)


def check_out(fn, name, out, shape, dtype):
    """A caller-provided output: writeable, C-contiguous, exactly ``shape``/``dtype``."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a NumPy array, got {describe(out)}")
    if out.shape != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have dtype {dtype}, got {out.dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{fn}: {name} must be a writeable C-contiguous array")
    return out


def check_no_overlap(fn, out, others, what):
    """``out`` must share no memory with any array in ``others`` (None skipped):
    the kernels read those while they write ``out``, or update them in place."""
    for other in others:
        if isinstance(other, np.ndarray) and other.size and np.may_share_memory(out, other):
            raise ValueError(f"{fn}: out must not overlap {what}")


def check_running_stats_apart(fn, running_mean, running_var):
    """running_mean and running_var are updated in place: not the same memory."""
    # Two arrays that own their memory (base None: the layers' buffers) overlap only if
    # they are the same object; only views need the (slower) address check.
    if running_mean is running_var or (
            (running_mean.base is not None or running_var.base is not None)
            and np.may_share_memory(running_mean, running_var)):
        raise ValueError(f"{fn}: running_mean and running_var must not overlap (both are updated in place)")


def check_moments(fn, moments, cx, training):
    """Given moments for the forward -> ((2, C) float64 stats, count); none given ->
    (None, the batch's count)."""
    if moments is None:
        return None, cx.count
    from .stats import Moments
    if not isinstance(moments, Moments):
        raise TypeError(f"{fn}: moments must be a numbabn.Moments or None, got {describe(moments)}")
    if not training:
        raise ValueError(f"{fn}: moments= replaces the batch statistics and needs training=True")
    check_moments_value(fn, "moments", moments)
    if moments.mean.shape != (cx.channels,) or moments.m2.shape != (cx.channels,):
        raise ValueError(
            f"{fn}: moments must have {cx.channels} channels like x, got mean of shape {moments.mean.shape}")
    if moments.count < cx.count:
        raise ValueError(
            f"{fn}: moments must summarise at least x's own values, got count {moments.count} for x "
            f"with {cx.count} value(s) per channel")
    return np.ascontiguousarray(np.stack([moments.mean, moments.m2]), dtype=np.float64), int(moments.count)


def check_moments_value(fn, name, m):
    """A :class:`~numbabn.stats.Moments` a caller built: an integer count >= 0, and
    mean and m2 real floating 1-D arrays of one shape with m2 >= 0 (NaN passes:
    it is what a NaN in the data gives)."""
    count = m.count
    if isinstance(count, (bool, np.bool_)) or not isinstance(count, numbers.Integral):
        raise TypeError(f"{fn}: {name}.count must be an int (values per channel), got {describe(count)}")
    if count < 0:
        raise ValueError(f"{fn}: {name}.count must be >= 0, got {count}")
    for field in ("mean", "m2"):
        a = getattr(m, field)
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f" or a.ndim != 1:
            raise TypeError(f"{fn}: {name}.{field} must be a 1-D real floating NumPy array, got {describe(a)}")
    if m.mean.shape != m.m2.shape:
        raise ValueError(f"{fn}: {name}.mean and {name}.m2 differ in shape ({m.mean.shape} vs {m.m2.shape})")
    if np.any(m.m2 < 0):
        raise ValueError(f"{fn}: {name}.m2 (sum of squared deviations) must be >= 0, got {float(m.m2.min())!r}")


def check_sums(fn, sums, shape):
    """What an ``allreduce`` callable returned: a float64 array of ``shape``."""
    if not isinstance(sums, np.ndarray):
        raise TypeError(f"{fn}: allreduce must return the summed {shape} array (a NumPy array), "
                        f"got {describe(sums)}")
    if sums.dtype.kind not in "fiu":
        raise TypeError(f"{fn}: allreduce must return a real array, got dtype {sums.dtype}")
    sums = np.ascontiguousarray(sums, dtype=np.float64)
    if sums.shape != shape:
        raise ValueError(f"{fn}: allreduce must return an array of shape {shape}, got {sums.shape}")
    return sums


def check_training_batch(fn, count, shape, training, tracking, momentum, nbt):
    """Rules that depend on the batch: not exactly one value per channel to train
    (none is an empty batch, as in PyTorch), and a counter for the cumulative
    average (``momentum=None``)."""
    if training and count == 1:
        raise ValueError(
            f"{fn}: Expected more than 1 value per channel when training, got input of shape {shape}")
    if tracking and momentum is None and nbt is None:
        raise ValueError(f"{fn}: momentum=None (cumulative average) needs num_batches_tracked")


def resolve_momentum(tracking, momentum, nbt):
    """The running-statistics factor of this step: ``momentum``, or
    1/num_batches_tracked after this step for the cumulative average; 0 when not tracking."""
    if not tracking:
        return 0.0
    return momentum if momentum is not None else 1.0 / (nbt.item() + 1)


def check_like_forward(fn, cdy, ctx):
    """dy (canonical) must have the forward input's shape and dtype."""
    if cdy.shape != ctx.shape:
        raise ValueError(f"{fn}: dy must have the forward input's shape {ctx.shape}, got {cdy.shape}")
    if cdy.dtype != ctx.dtype:
        raise TypeError(f"{fn}: dy must have the forward input's dtype {ctx.dtype}, got {cdy.dtype}")


# ------------------------------------------------------------------ GPU arrays
# numba.cuda is imported inside these functions: importing numbabn must not
# initialise the CUDA bindings.


def as_device(x):
    """A numba device array viewing the GPU array ``x`` (zero copy)."""
    if getattr(x, "__cuda_ndarray__", False):
        return x
    from numba import cuda
    return cuda.as_cuda_array(x)


def _device_readonly(x):
    iface = getattr(x, "__cuda_array_interface__", None)
    return bool(iface and iface["data"][1])


def device_overlap(a, b):
    """Whether two C-contiguous device arrays share bytes (by address range)."""
    def extent(d):
        # The simulator's device arrays wrap NumPy arrays and have only the host interface.
        iface = getattr(d, "__cuda_array_interface__", None) or d.__array_interface__
        start = iface["data"][0]
        return start, start + d.nbytes

    (a0, a1), (b0, b1) = extent(a), extent(b)
    return a0 < b1 and b0 < a1


def canonical_device(fn, name, x, axis):
    """Check an input of the CUDA backend and view it in its canonical layout on the device.

    GPU arrays (see :func:`is_device_array`) are viewed without copying and must be
    C-contiguous; anything else goes through :func:`canonical_host` and is copied to
    the device once. float16 is converted to a float32 device copy.
    """
    from numba import cuda
    if not is_device_array(x):
        cx = canonical_host(fn, name, x, axis)
        return cx._replace(array=cuda.to_device(cx.array))
    d = as_device(x)
    check_float_dtype(fn, name, d.dtype)
    axis, layout, cshape, C, m = layout_of(fn, name, tuple(d.shape), axis)
    if not d.is_c_contiguous():
        raise ValueError(
            f"{fn}: {name} is a non-contiguous GPU array (strides {tuple(d.strides)}); "
            "make it C-contiguous first (e.g. cupy.ascontiguousarray, tensor.contiguous())")
    arr = d.reshape(cshape)
    dt = compute_dtype(d.dtype)
    if dt != d.dtype and d.size == 0:
        arr = cuda.device_array(cshape, dt)
    elif dt != d.dtype:
        from . import config
        from .kernels import cuda as cuda_kernels
        converted = cuda.device_array(cshape, dt)
        cuda_kernels.cast(arr, converted, config.CUDA_THREADS)
        arr = converted
    return Canonical(arr, layout, tuple(d.shape), axis, np.dtype(d.dtype), C, m)


def check_device_param(fn, name, value, channels, dtype, *, inplace=False):
    """:func:`check_param` for the CUDA backend; returns a device array.

    GPU arrays are used in place (they must be C-contiguous); host arrays are
    checked by :func:`check_param` and copied to the device (the caller copies
    in-place parameters back). None gives an empty device array.
    """
    from numba import cuda
    if not is_device_array(value):
        return cuda.to_device(check_param(fn, name, value, channels, dtype, inplace=inplace))
    d = as_device(value)
    if tuple(d.shape) != (channels,):
        raise ValueError(
            f"{fn}: {name} must have shape ({channels},) (one value per channel), got shape {tuple(d.shape)}")
    if d.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have dtype {dtype} to match the input, got {d.dtype}")
    if not d.is_c_contiguous():
        raise ValueError(f"{fn}: {name} must be a contiguous GPU array")
    if inplace and _device_readonly(value):
        raise ValueError(f"{fn}: {name} is updated in place but is read-only")
    return d


def check_device_out(fn, name, out, shape, dtype):
    """:func:`check_out` for a GPU output; returns the numba device view of it."""
    if not is_device_array(out):
        raise TypeError(f"{fn}: {name} must be a GPU array like the input, got {describe(out)}")
    d = as_device(out)
    if tuple(d.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(d.shape)}")
    if d.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have dtype {dtype}, got {d.dtype}")
    if not d.is_c_contiguous() or _device_readonly(out):
        raise ValueError(f"{fn}: {name} must be a writeable C-contiguous array")
    return d
