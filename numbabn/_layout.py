"""Canonical layouts of array inputs (host views), and the checks of array arguments.

Bad input gets a clear error (which argument, what was expected, what came) before
any kernel runs or any state changes, and kernels only ever see canonical,
well-typed arrays. Scalar checks are in :mod:`numbabn._checks`, the rules of a
batch-norm call in :mod:`numbabn._bn_checks`, GPU arrays in
:mod:`numbabn.backends.cuda`.

Canonical layouts: an input with channel axis ``axis`` is viewed as
``(N, C, L)`` ("ncl") when the channel axis is not last and ``L > 1``, or as
``(M, C)`` ("mc") otherwise (channels-last, or a plain (N, C) matrix). The view is
zero-copy for C-contiguous input; other inputs are copied once into that layout.
float16 (and bfloat16, which only numbabn.torch hands over: :data:`BFLOAT16`) keeps
its 16 bits: the canonical array is the integer view the CPU kernels read
(:data:`STORAGE`), computed in float32 (:mod:`numbabn.kernels.storage`).

Host arrays are taken as they come with two exceptions, handled alike for every
array argument (:func:`host_array`): non-native byte order (big-endian data read
from a file) is converted to the native order, since it is a valid float array
the kernels cannot read; a masked array with masked values is refused (batch norm
has no notion of a missing value, and silently using the data under the mask
would be wrong), one without any is used as its data.
"""

from collections.abc import Iterable
from math import prod
from typing import Any, NamedTuple

import numpy as np
from numpy.typing import DTypeLike, NDArray

from ._checks import describe, is_int

_EMPTY: dict[np.dtype[Any], NDArray[Any]] = {
    np.dtype(np.float32): np.empty(0, np.float32),
    np.dtype(np.float64): np.empty(0, np.float64),
}
_FLOAT32 = np.dtype(np.float32)
_FLOAT64 = np.dtype(np.float64)

#: bfloat16 data as numbabn.torch passes it (NumPy has no bfloat16 dtype): the 16-bit
#: patterns under a one-field structured dtype, which no ordinary array carries, so
#: it cannot be mistaken for integer data. Internal: the public API takes float16,
#: float32 and float64.
BFLOAT16 = np.dtype([("bfloat16", np.uint16)])
#: The integer view the CPU kernels read and write for each 16-bit float dtype.
STORAGE = {np.dtype(np.float16): np.dtype(np.int16), BFLOAT16: np.dtype(np.uint16)}


def storage_view(a: NDArray[Any]) -> NDArray[Any]:
    """``a`` as the kernels read and write it: float16/bfloat16 as their 16-bit
    integer view (no copy), anything else as it is."""
    st = STORAGE.get(a.dtype)
    return a if st is None else a.view(st)


def compute_dtype(dtype: DTypeLike) -> np.dtype[Any]:
    """The native dtype the kernels compute in: float16 and bfloat16 (and their
    storage integers, :data:`STORAGE`) -> float32; float32/float64 of either byte
    order -> native float32/float64."""
    return _FLOAT64 if np.dtype(dtype).char == "d" else _FLOAT32


def empty_param(dtype: DTypeLike) -> NDArray[Any]:
    """The shared zero-length array that kernels read as 'parameter absent'."""
    return _EMPTY[np.dtype(dtype)]


class Canonical(NamedTuple):
    """An input viewed in its canonical layout (see module docstring).

    A NamedTuple rather than a dataclass: one is built on every call, and the
    per-call Python overhead decides the speed on tiny inputs.
    """

    array: Any  # (N, C, L) or (M, C), C-contiguous, float32/float64 or 16-bit storage
    layout: str  # "ncl" or "mc"
    shape: tuple  # the caller's shape
    axis: int  # normalised channel axis
    dtype: np.dtype  # the caller's dtype
    channels: int
    count: int  # type: ignore[assignment]  # values per channel (m = N*L or M); shadows tuple.count on purpose


def check_float_dtype(fn: str, name: str, dtype: DTypeLike) -> None:
    if np.dtype(dtype).char not in "efd":
        raise TypeError(f"{fn}: {name} must have a floating dtype (float16, float32 or float64), got {dtype}")


_LAYOUTS: dict[tuple[Any, ...], Any] = {}  # (shape, axis) -> layout_of's answer: most programs call with few shapes


def layout_of(fn: str, name: str, shape: tuple[int, ...], axis: int) -> tuple[Any, ...]:
    """Normalise ``axis`` and return (axis, layout, canonical shape, C, m)."""
    if type(axis) is int:
        known = _LAYOUTS.get((shape, axis))
        if known is not None:
            return known
    result = _layout_of(fn, name, shape, axis)
    if type(axis) is int and len(_LAYOUTS) < 4096:
        _LAYOUTS[(tuple(shape), axis)] = result
    return result


def _layout_of(fn: str, name: str, shape: tuple[int, ...], axis: int) -> tuple[Any, ...]:
    ndim = len(shape)
    if ndim < 2:
        raise ValueError(
            f"{fn}: {name} must have at least 2 dimensions (batch, channels, ...), got shape {tuple(shape)}"
        )
    if type(axis) is not int and not is_int(axis):
        raise TypeError(f"{fn}: axis must be an int, got {describe(axis)}")
    if not -ndim <= axis < ndim:
        raise ValueError(f"{fn}: axis={axis} is out of range for {name} with {ndim} dimensions")
    axis = int(axis) % ndim
    C = int(shape[axis])
    if C == 0:
        raise ValueError(f"{fn}: {name} has no channels (shape {tuple(shape)}, axis={axis})")
    N = prod(shape[:axis]) if axis != 1 else shape[0]
    L = prod(shape[axis + 1 :]) if axis != ndim - 1 else 1
    if L == 1 or axis == ndim - 1:
        M = N * L
        return axis, "mc", (M, C), C, M
    return axis, "ncl", (N, C, L), C, N * L


_HOST_PROTOCOLS = ("__array__", "__array_interface__", "__array_struct__")


def is_device_array(x: Any) -> bool:
    """True for a GPU array: one exposing ``__cuda_array_interface__`` (numba device
    arrays, CuPy, PyTorch CUDA tensors) or a numba device array (those of the CUDA
    simulator have no such interface).

    An object whose ``__cuda_array_interface__`` raises something other than
    AttributeError is a GPU array when it says so (``is_cuda`` is True: a torch CUDA
    tensor that requires grad) or when it cannot be host data, offering none of
    NumPy's host protocols (``__array__``, ``__array_interface__``,
    ``__array_struct__``); it then reaches the CUDA backend's checks, whose TypeError
    names the argument and quotes the interface's error. One with a host protocol
    and no ``is_cuda`` (JAX's CPU arrays) or ``is_cuda`` False stays on the host path.
    """
    if isinstance(x, np.ndarray):
        return False
    try:
        _ = x.__cuda_array_interface__
    except AttributeError:
        return bool(getattr(x, "__cuda_ndarray__", False))
    except Exception:
        # An array that cannot export itself as it is. Deciding by is_cuda alone sent
        # a GPU-array-like object without it to NumPy's conversion, whose error
        # ("floating dtype, got object") says nothing of the real problem; only an
        # object NumPy can read (or one that says is_cuda False) is host data.
        is_cuda = getattr(x, "is_cuda", None)
        if is_cuda is not None:
            return is_cuda is True
        return not any(hasattr(x, p) for p in _HOST_PROTOCOLS)
    return True


def host_array(fn: str, name: str, x: Any) -> NDArray[Any]:
    """``x`` as a NumPy array in native byte order (see the module docstring):
    converted from array-likes and from big-endian data; masked arrays with masked
    values refused. Plain native arrays come back as they are (no copy)."""
    if type(x) is not np.ndarray:
        if isinstance(x, np.ma.MaskedArray):
            if np.ma.is_masked(x):
                raise ValueError(
                    f"{fn}: {name} is a masked array with {int(np.ma.count_masked(x))} masked value(s); "
                    "batch norm has no notion of a missing value: fill them (x.filled(value)) or drop "
                    "those samples first"
                )
            x = x.data
        else:
            try:
                x = np.asarray(x)
            except Exception as exc:
                raise TypeError(f"{fn}: {name} must be an array, got {describe(x)}") from exc
    if not x.dtype.isnative:
        x = x.astype(x.dtype.newbyteorder("="))
    return x


def canonical_host(fn: str, name: str, x: Any, axis: int) -> Canonical:
    """Check a host (NumPy) input and view it in its canonical layout."""
    if type(x) is not np.ndarray or not x.dtype.isnative:
        if is_device_array(x):
            raise TypeError(
                f"{fn}: {name} is a GPU array ({type(x).__name__}) but this call runs on the CPU backend "
                "(backend='cpu' was given, or the forward ran on host arrays)"
            )
        x = host_array(fn, name, x)
    dtype = x.dtype
    if dtype.char not in "fd" and dtype != BFLOAT16:
        check_float_dtype(fn, name, dtype)
    axis, layout, cshape, C, m = layout_of(fn, name, x.shape, axis)
    flags = x.flags
    if flags.c_contiguous and flags.aligned:
        arr = x.reshape(cshape)
    else:
        arr = np.ascontiguousarray(x).reshape(cshape)
    return Canonical(storage_view(arr), layout, x.shape, axis, x.dtype, C, m)


# NumPy's flag bits (``ndarray.flags.num``; NPY_ARRAY_C_CONTIGUOUS, _ALIGNED and
# _WRITEABLE of its C API): one attribute read instead of a flags object's three
# (60-70 ns of a 10 us call per array on the fast path).
C_ALIGNED = 0x0001 | 0x0100
WRITEABLE = 0x0400


def may_share(a: Any, others: tuple[Any, ...]) -> bool:
    """Whether array ``a`` may share memory with a non-empty array of ``others``."""
    # Arrays whose memory NumPy allocated for different owners (each its own, base
    # None, or the base array a view points to) cannot overlap: only the others need
    # NumPy's bounds check (0.9 us each on a slow VM, five of them on a forward).
    # Inlined: this runs on every small call (the functional API's fast path).
    base = a.base
    mine = a if base is None else base if type(base) is np.ndarray and base.base is None else None
    for other in others:
        if not other.size:
            continue
        if other is not a and mine is not None:
            base = other.base
            theirs = other if base is None else base if type(base) is np.ndarray and base.base is None else None
            if theirs is not None and theirs is not mine:
                continue
        if np.may_share_memory(a, other):
            return True
    return False


def param_as_is(value: Any, dtype: Any, shape: tuple[int], inplace: bool) -> bool:
    """Whether ``value`` is a per-channel array the kernels take as it is: a NumPy
    array of exactly ``dtype`` (the same dtype object) and ``shape``, C-contiguous,
    aligned, and writeable if updated in place (``inplace``)."""
    need = C_ALIGNED | WRITEABLE if inplace else C_ALIGNED
    return (
        type(value) is np.ndarray and value.dtype is dtype and value.shape == shape and value.flags.num & need == need
    )


def check_param(
    fn: str, name: str, value: Any, channels: int, dtype: DTypeLike, *, inplace: bool = False
) -> NDArray[Any]:
    """A per-channel 1-D parameter of ``dtype`` and length ``channels``.

    ``inplace`` parameters (running statistics) are updated by the kernels, so they
    must be writeable C-contiguous NumPy arrays; others are copied if needed.
    Returns the array, or the shared empty array when ``value`` is None.
    """
    if value is None:
        return empty_param(dtype)
    if param_as_is(value, dtype, (channels,), inplace):  # the common case, checked in one go
        return value
    if type(value) is not np.ndarray or not value.dtype.isnative:
        if inplace:
            if not isinstance(value, np.ndarray) or isinstance(value, np.ma.MaskedArray):
                raise TypeError(f"{fn}: {name} is updated in place and must be a NumPy array, got {describe(value)}")
            if not value.dtype.isnative:
                raise TypeError(
                    f"{fn}: {name} is updated in place and must be in native byte order, got "
                    f"dtype {value.dtype.str} (convert it with .astype({value.dtype.name!r}))"
                )
        else:
            if is_device_array(value):  # copying it to the host would hide a misplaced array
                raise TypeError(
                    f"{fn}: {name} is a GPU array ({type(value).__name__}) but x is a host array "
                    f"(backend='cpu'): pass {name} as a NumPy array, or x on the GPU"
                )
            value = host_array(fn, name, value)
    if value.shape != (channels,):
        raise ValueError(f"{fn}: {name} must have shape ({channels},) (one value per channel), got shape {value.shape}")
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
        value = value.copy()  # the kernels take contiguous parameters (read-only ones too)
    return value


def check_out(fn: str, name: str, out: Any, shape: tuple[int, ...], dtype: DTypeLike) -> NDArray[Any]:
    """A caller-provided output: writeable, C-contiguous, exactly ``shape``/``dtype``,
    without masked values."""
    if not isinstance(out, np.ndarray):
        raise TypeError(f"{fn}: {name} must be a NumPy array, got {describe(out)}")
    if out.shape != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {out.shape}")
    if out.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have dtype {dtype}, got {out.dtype}")
    if not out.flags.c_contiguous or not out.flags.writeable:
        raise ValueError(f"{fn}: {name} must be a writeable C-contiguous array")
    if isinstance(out, np.ma.MaskedArray) and np.ma.is_masked(out):
        # Its mask would hide values the call writes, as masked inputs would hide
        # values from the statistics.
        raise ValueError(
            f"{fn}: {name} is a masked array with {int(np.ma.count_masked(out))} masked value(s); "
            "pass an array without masked values (e.g. out.data)"
        )
    return out


def check_no_overlap(fn: str, out: Any, others: Iterable[Any], what: str) -> None:
    """``out`` must share no memory with any array in ``others`` (None skipped):
    the kernels read those while they write ``out``, or update them in place."""
    for other in others:
        if isinstance(other, np.ndarray) and other.size and np.may_share_memory(out, other):
            raise ValueError(f"{fn}: out must not overlap {what}")
