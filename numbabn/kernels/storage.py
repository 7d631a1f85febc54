"""How the CPU kernels read and write data arrays: float32/float64 as they are,
float16 and bfloat16 as 16-bit patterns converted exactly to and from float32.

Numba has no float16 (or bfloat16) type on the CPU, so a 16-bit input reaches the
kernels as an integer view of its bytes (:data:`numbabn._layout.STORAGE`: float16
as ``int16``, bfloat16 as ``uint16``), and the kernels compute in float32, as
PyTorch's CPU kernels do. Two intrinsics are the only places that know::

    decode(arr[i])          an element as the compute type (16-bit -> float32)
    arr[i] = encode(v, arr) v rounded to arr's format (round to nearest even)

float16: LLVM's ``fpext``/``fptrunc`` between ``half`` and ``float``, which x86-64 CPUs
with F16C (all since 2012) and ARMv8 run as vector instructions: exact in both
directions, subnormals, infinities and NaN included. bfloat16 is the upper half of
a float32: decoding is a shift; encoding rounds to nearest even on the bits and
keeps a NaN a (quiet) NaN, as PyTorch's conversion does. ``tests/test_storage.py``
checks every one of the 65536 patterns against NumPy and PyTorch, and the rounding
of float32 values around every boundary.

They are Numba intrinsics: a few LLVM instructions emitted where they are called,
so float32/float64 kernels compile to exactly what plain indexing gives, at no
extra compile time (helper functions, even inlined ones, cost a cold start about
0.1-0.3 s: measured).
"""

from llvmlite import ir
from numba import types
from numba.extending import intrinsic

_F32, _I16, _I32 = ir.FloatType(), ir.IntType(16), ir.IntType(32)


def _element(arr):  # type: ignore[no-untyped-def]
    # A residual row may be typed Optional(array) (a helper returning it or None);
    # only its element type matters here.
    return (arr.type if isinstance(arr, types.Optional) else arr).dtype


@intrinsic
def decode(typingctx, value):  # type: ignore[no-untyped-def]
    """An element read from a data array -> the compute type: int16 (float16 bits)
    and uint16 (bfloat16 bits) -> float32; float32/float64 unchanged."""
    if value == types.int16:

        def half(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.fpext(builder.bitcast(args[0], ir.HalfType()), _F32)

        return types.float32(value), half
    if value == types.uint16:

        def bfloat16(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(builder.shl(builder.zext(args[0], _I32), ir.Constant(_I32, 16)), _F32)

        return types.float32(value), bfloat16
    if isinstance(value, types.Float):
        return value(value), lambda context, builder, signature, args: args[0]
    return None


@intrinsic
def encode(typingctx, value, arr):  # type: ignore[no-untyped-def]
    """A computed ``value`` -> the element type of data array ``arr`` (its storage
    integer for float16/bfloat16, rounded to nearest even; a plain cast else)."""
    if not isinstance(value, types.Float):
        return None
    dt = _element(arr)
    if dt == types.int16:

        def half(context, builder, signature, args):  # type: ignore[no-untyped-def]
            return builder.bitcast(builder.fptrunc(args[0], ir.HalfType()), _I16)

        return types.int16(value, arr), half
    if dt == types.uint16 and value == types.float32:

        def bfloat16(context, builder, signature, args):  # type: ignore[no-untyped-def]
            v = args[0]
            bits = builder.bitcast(v, _I32)
            upper = builder.lshr(bits, ir.Constant(_I32, 16))
            odd = builder.and_(upper, ir.Constant(_I32, 1))
            # To nearest, ties to even: add just under half an ulp, plus the low bit.
            carried = builder.add(builder.add(bits, ir.Constant(_I32, 0x7FFF)), odd)
            rounded = builder.lshr(carried, ir.Constant(_I32, 16))
            # A NaN stays a quiet NaN (rounding its bits could carry it into infinity).
            quiet = builder.or_(upper, ir.Constant(_I32, 0x40))
            is_nan = builder.fcmp_unordered("uno", v, v)
            return builder.trunc(builder.select(is_nan, quiet, rounded), _I16)

        return types.uint16(value, arr), bfloat16
    if isinstance(dt, types.Float):
        return dt(value, arr), lambda context, builder, signature, args: context.cast(
            builder, args[0], signature.args[0], dt
        )
    return None
