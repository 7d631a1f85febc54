"""The one place that checks and canonicalises inputs, so that bad input gets a
clear error (which argument, what was expected, what came) before any kernel runs
or any state changes, and kernels only ever see canonical, well-typed arrays.

Canonical layouts: an input with channel axis ``axis`` is viewed as
``(N, C, L)`` ("ncl") when the channel axis is not last and ``L > 1``, or as
``(M, C)`` ("mc") otherwise (channels-last, or a plain (N, C) matrix). The view is
zero-copy for C-contiguous input; other inputs are copied once into that layout.
float16 is computed in float32.
"""
from dataclasses import dataclass
from math import prod
import numbers

import numpy as np

FLOAT_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))
_EMPTY = {np.dtype(np.float32): np.empty(0, np.float32), np.dtype(np.float64): np.empty(0, np.float64)}


def compute_dtype(dtype):
    """float16 -> float32; float32/float64 unchanged."""
    return np.dtype(np.float32) if dtype == np.float16 else np.dtype(dtype)


def empty_param(dtype):
    """The shared zero-length array that kernels read as 'parameter absent'."""
    return _EMPTY[np.dtype(dtype)]


@dataclass(frozen=True)
class Canonical:
    """An input viewed in its canonical layout (see module docstring)."""

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
    if np.dtype(dtype) not in FLOAT_DTYPES:
        raise TypeError(
            f"{fn}: {name} must have a floating dtype (float16, float32 or float64), got {dtype}")


def layout_of(fn, name, shape, axis):
    """Normalise ``axis`` and return (axis, layout, canonical shape, C, m)."""
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"{fn}: {name} must have at least 2 dimensions (batch, channels, ...), got shape {tuple(shape)}")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, numbers.Integral):
        raise TypeError(f"{fn}: axis must be an int, got {describe(axis)}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{fn}: axis={axis} is out of range for {name} with {ndim} dimensions")
    axis = int(axis) % ndim
    C = int(shape[axis])
    if C == 0:
        raise ValueError(f"{fn}: {name} has no channels (shape {tuple(shape)}, axis={axis})")
    N = prod(shape[:axis])
    L = prod(shape[axis + 1:])
    if L == 1 or axis == ndim - 1:
        M = N * L
        return axis, "mc", (M, C), C, M
    return axis, "ncl", (N, C, L), C, N * L


def canonical_host(fn, name, x, axis):
    """Check a host (NumPy) input and view it in its canonical layout."""
    if hasattr(x, "__cuda_array_interface__") and not isinstance(x, np.ndarray):
        raise TypeError(
            f"{fn}: {name} is a GPU array ({type(x).__name__}) but backend='cpu' was requested")
    if not isinstance(x, np.ndarray):
        try:
            x = np.asarray(x)
        except Exception as exc:
            raise TypeError(f"{fn}: {name} must be an array, got {describe(x)}") from exc
    check_float_dtype(fn, name, x.dtype)
    axis, layout, cshape, C, m = layout_of(fn, name, x.shape, axis)
    arr = np.ascontiguousarray(x, dtype=compute_dtype(x.dtype)).reshape(cshape)
    return Canonical(arr, layout, tuple(x.shape), axis, np.dtype(x.dtype), C, m)


def check_param(fn, name, value, channels, dtype, *, inplace=False):
    """A per-channel 1-D parameter of ``dtype`` and length ``channels``.

    ``inplace`` parameters (running statistics) are updated by the kernels, so they
    must be writeable C-contiguous NumPy arrays; others are copied if needed.
    Returns the array, or the shared empty array when ``value`` is None.
    """
    if value is None:
        return empty_param(dtype)
    if not isinstance(value, np.ndarray):
        if inplace:
            raise TypeError(
                f"{fn}: {name} is updated in place and must be a NumPy array, got {describe(value)}")
        value = np.asarray(value)
    if value.shape != (channels,):
        raise ValueError(
            f"{fn}: {name} must have shape ({channels},) (one value per channel), got shape {value.shape}")
    if value.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have dtype {dtype} to match the input, got {value.dtype}")
    if inplace:
        if not value.flags.writeable:
            raise ValueError(f"{fn}: {name} is updated in place but is read-only")
        if not value.flags.c_contiguous:
            raise ValueError(f"{fn}: {name} is updated in place and must be contiguous")
        return value
    if not (value.flags.c_contiguous and value.flags.writeable):
        value = value.copy()   # read-only or strided copies avoid extra kernel specialisations
    return value


def check_counter(fn, value):
    """num_batches_tracked: None or a writeable integer array with one element."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or value.size != 1 or value.dtype.kind not in "iu":
        raise TypeError(
            f"{fn}: num_batches_tracked must be a one-element integer NumPy array "
            f"(updated in place), got {describe(value)}")
    if not value.flags.writeable:
        raise ValueError(f"{fn}: num_batches_tracked is updated in place but is read-only")
    return value


def check_eps(fn, eps):
    if isinstance(eps, (bool, np.bool_)) or not isinstance(eps, numbers.Real) or not eps > 0 \
            or not np.isfinite(eps):
        raise ValueError(f"{fn}: eps must be a finite number > 0, got {eps!r}")
    return float(eps)


def check_momentum(fn, momentum):
    if momentum is None:
        return None
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
