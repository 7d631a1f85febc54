"""Software prefetch for the channels-last statistics.

Numba has no prefetch instruction, so :func:`prefetch` is an LLVM intrinsic
(``llvm.prefetch``: a hint, never a fault, dropped on targets without one) that
requests the cache lines of a stretch of a 1-D array. It emits its loop itself: the
same loop written in Numba took 0.1-0.2 s more to compile per kernel signature.

Why it is needed: the channels-last statistics of float32 and 16-bit data walk two
consecutive runs of a block at once (one load-add-store of the float64 accumulators
per two values, see ``stats_mc`` in :mod:`numbabn.kernels.cpu`). That halves the
accumulators' stores, which bound the loop in cache, but reading ``x[i + j]`` and
``x[i + FC + j]`` interleaved ran slower from memory on this VM (AMD EPYC, Zen 1):
1.23-1.34 G values/s on one thread against 1.45 for one run at a time. Prefetching
the next pair's lines (2 KB ahead) gave 1.88-2.02 (throwaway kernels, float32,
(200704, 64), min of 10).
"""

from llvmlite import ir
from numba import types
from numba.core import cgutils
from numba.extending import intrinsic

# How far ahead of the values being summed their cache lines are requested.
AHEAD_BYTES = 2048
LINE_BYTES = 64
# Only pairs of runs shorter than a page are prefetched: with runs of 4 KB and more
# (C >= 1024 in float32) the paired loop kept its speed from memory without help,
# and the prefetches cost 10-20 % there.
SHORT_RUN_BYTES = 4096


@intrinsic
def prefetch(typingctx, arr, start, stop):  # type: ignore[no-untyped-def]
    """Hint that ``arr[start:stop]`` (a contiguous 1-D array; the range is clipped to
    it) will be read soon: each of its cache lines is requested into all cache
    levels."""
    if not (isinstance(arr, types.Array) and isinstance(start, types.Integer) and isinstance(stop, types.Integer)):
        return None
    sig = types.void(arr, start, stop)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        aty, sty, ety = signature.args
        a = context.make_array(aty)(context, builder, args[0])
        intp = context.get_value_type(types.intp)
        n = builder.extract_value(a.shape, 0)
        lo = context.cast(builder, args[1], sty, types.intp)
        hi = context.cast(builder, args[2], ety, types.intp)
        hi = builder.select(builder.icmp_signed("<", hi, n), hi, n)
        step = ir.Constant(intp, max(1, LINE_BYTES // context.get_abi_sizeof(context.get_value_type(aty.dtype))))
        i8p = ir.IntType(8).as_pointer()
        i32 = ir.IntType(32)
        fn = builder.module.declare_intrinsic(
            "llvm.prefetch", fnty=ir.FunctionType(ir.VoidType(), [i8p, i32, i32, i32])
        )
        with cgutils.for_range_slice(builder, lo, hi, step, intp) as (k, _):
            # (address, read = 0, locality = 3: keep in all levels, data cache = 1)
            p = builder.bitcast(builder.gep(a.data, [k]), i8p)
            builder.call(fn, [p, ir.Constant(i32, 0), ir.Constant(i32, 3), ir.Constant(i32, 1)])
        return context.get_dummy_value()

    return sig, codegen
