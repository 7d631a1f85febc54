"""How the CPU kernels read and write data arrays: float32/float64 as they are,
float16 and bfloat16 as 16-bit patterns converted exactly to and from float32.

Numba has no float16 (or bfloat16) type on the CPU, so a 16-bit input reaches the
kernels as an integer view of its bytes (:data:`STORAGE`: float16 as ``int16``,
bfloat16 as ``uint16``), and the kernels compute in float32, as PyTorch's CPU
kernels do. :func:`load` and :func:`store` are the only places that know::

    load(arr, i)      arr[i] as the compute type (float16/bfloat16 -> float32)
    store(arr, i, v)  arr[i] = v, rounded to arr's format (round to nearest even)

float16: LLVM's ``fpext``/``fptrunc`` between ``half`` and ``float``, which x86-64 CPUs
with F16C (all since 2012) and ARMv8 run as vector instructions: exact in both
directions, subnormals, infinities and NaN included. bfloat16 is the upper half of
a float32: decoding is a shift; encoding rounds to nearest even on the bits and
keeps a NaN a (quiet) NaN, as PyTorch's conversion does. ``tests/test_storage.py``
checks every one of the 65536 patterns against NumPy and PyTorch, and the rounding
of float32 values around every boundary.

Reading 16 bits instead of a float32 copy halves the traffic of a pass and saves the
conversion passes around the kernels (measured in the README, "Use it from PyTorch").
"""

import numpy as np
from llvmlite import ir
from numba import types
from numba.extending import intrinsic, overload

#: Integer dtype the kernels see for each 16-bit float format.
STORAGE = {"float16": np.dtype(np.int16), "bfloat16": np.dtype(np.uint16)}


@intrinsic
def _half_bits_to_float(typingctx, bits):  # type: ignore[no-untyped-def]
    """int16 pattern of a float16 -> float32 (exact)."""
    if bits != types.int16:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.fpext(builder.bitcast(args[0], ir.HalfType()), ir.FloatType())

    return types.float32(types.int16), codegen


@intrinsic
def _float_to_half_bits(typingctx, value):  # type: ignore[no-untyped-def]
    """float32 -> int16 pattern of the nearest float16 (ties to even)."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), ir.IntType(16))

    return types.int16(types.float32), codegen


@intrinsic
def _bits_to_float(typingctx, bits):  # type: ignore[no-untyped-def]
    """The float32 whose bit pattern is the low 32 bits of integer ``bits``."""
    if not isinstance(bits, types.Integer):
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        v = args[0]
        if v.type.width > 32:
            v = builder.trunc(v, ir.IntType(32))
        elif v.type.width < 32:
            v = builder.zext(v, ir.IntType(32))
        return builder.bitcast(v, ir.FloatType())

    return types.float32(bits), codegen


@intrinsic
def _float_to_bits(typingctx, value):  # type: ignore[no-untyped-def]
    """The bit pattern of float32 ``value`` as a (non-negative) int64."""
    if value != types.float32:
        return None

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        return builder.zext(builder.bitcast(args[0], ir.IntType(32)), ir.IntType(64))

    return types.int64(types.float32), codegen


def load(arr, i):  # type: ignore[no-untyped-def]
    """``arr[i]`` in the compute type (only inside jitted code)."""
    raise NotImplementedError("numbabn.kernels.storage.load is for jitted code")


def store(arr, i, value):  # type: ignore[no-untyped-def]
    """``arr[i] = value`` in arr's format (only inside jitted code)."""
    raise NotImplementedError("numbabn.kernels.storage.store is for jitted code")


def _dtype(arr):  # type: ignore[no-untyped-def]
    # A residual row reaches the helpers as Optional(array) when Numba could not prune
    # its None branch; indexing unwraps it, so only the element type matters here.
    return (arr.type if isinstance(arr, types.Optional) else arr).dtype


@overload(load, jit_options={"error_model": "numpy"})
def _load(arr, i):  # type: ignore[no-untyped-def]
    dt = _dtype(arr)
    if dt == types.int16:
        return lambda arr, i: _half_bits_to_float(arr[i])
    if dt == types.uint16:
        return lambda arr, i: _bits_to_float(arr[i] << 16)
    return lambda arr, i: arr[i]


@overload(store, jit_options={"error_model": "numpy"})
def _store(arr, i, value):  # type: ignore[no-untyped-def]
    dt = _dtype(arr)
    if dt == types.int16:

        def store_half(arr, i, value):  # type: ignore[no-untyped-def]
            arr[i] = _float_to_half_bits(np.float32(value))

        return store_half
    if dt == types.uint16:

        def store_bfloat16(arr, i, value):  # type: ignore[no-untyped-def]
            b = _float_to_bits(np.float32(value))
            rounded = (b + 0x7FFF + ((b >> 16) & 1)) >> 16  # to nearest, ties to even
            quiet_nan = (b >> 16) | 0x40  # truncating a NaN could leave an infinity
            arr[i] = np.uint16(quiet_nan if (b & 0x7FFFFFFF) > 0x7F800000 else rounded)

        return store_bfloat16

    def store_as_is(arr, i, value):  # type: ignore[no-untyped-def]
        arr[i] = value

    return store_as_is
