"""Non-temporal ("streaming") stores for outputs larger than the cache.

An ordinary store first reads the output's cache line from memory (write-allocate),
so an element-wise pass over data that does not fit the cache moves three bytes for
every two it needs: eval reads x, reads y, writes y. Non-temporal stores write whole
lines without reading them, as glibc's ``memcpy`` does above a size tied to the
cache. Numba has no such store, so :func:`_nt_copy` is an LLVM intrinsic: vector
stores with ``!nontemporal`` metadata, 32 bytes at a time to 32-byte-aligned
addresses.

How a kernel uses it, per contiguous stretch of its output (a block of the NCL
grid, a group of channels-last runs; the element arithmetic stays in one loop,
written once)::

    tmp = scratch(window(y), y, stream)         # once per call; empty if not streaming
    p = base = 0
    for each run i..i1 of the output (in memory order):
        while i < i1:
            out, m, p, base = target(yf, i, i1, tmp, p, base, stream)   # buffer, or yf[i:i1]
            for j in range(m):
                out[j] = ...element i + j...
            i += m
    if stream:
        flush(yf, tmp, p, base)                 # the rest, then a fence

Consecutive runs gather in the buffer (:data:`WINDOW_BYTES`, 4 KiB: it stays in L1)
and leave it as one contiguous write when it is full or the next run does not
continue it (:func:`reserve`); a run is split where the buffer fills (the
channels-last kernels pass groups of whole runs that fill it exactly). Only the two
ends of each write are partial cache lines: streaming each 196-value row of a
128x256x14x14 input on its own made its eval 1.8x slower, as neighbouring rows
shared lines. The buffer's size matters: a throwaway ``y = 1.5*x + 0.5`` loop over
51 MB of float32, two threads, computing into the buffer and streaming it out, ran
at 43-51 GB/s with buffers of 512-1024 values, 28-36 with 4096 and 26-38 with
16384 (the size of the blocks, which the kernels used before), where the plain
streamed copy ran at 46-52 GB/s and ordinary stores at 31-39 (AVX-512 VM, 32 MiB
L3; docs/performance.md). Whether streaming pays at all depends on the machine:
:mod:`numbabn._stores` decides per output by timing both. Writing straight into the
output in short aligned segments measured 3x slower: every segment's array views
cost Numba's reference counting, and Numba's negative-index handling of a loop not
starting at 0 stopped LLVM from vectorising.
"""

import platform

import numpy as np
from llvmlite import ir
from numba import njit, types
from numba.core import cgutils
from numba.extending import intrinsic

_X86 = platform.machine().lower() in ("x86_64", "amd64", "i386", "i686")
VECTOR_BYTES = 32
# The buffer's size: small enough to stay in L1 between the element loop that fills it
# and the streamed write that empties it (see the module docstring).
WINDOW_BYTES = 4096


@intrinsic
def _nt_copy(typingctx, dst, src, start, stop):  # type: ignore[no-untyped-def]
    """``dst[start:stop] = src[start:stop]``: non-temporal 32-byte stores for whole
    vectors, ordinary stores for the last ``(stop - start) % w`` elements (``w`` = 32
    bytes of the dtype). ``dst`` at element ``start`` must be 32-byte aligned."""
    if not (isinstance(dst, types.Array) and isinstance(src, types.Array) and dst.dtype == src.dtype):
        return None
    sig = types.void(dst, src, start, stop)

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        dty, sty, aty, bty = signature.args
        d = context.make_array(dty)(context, builder, args[0])
        s = context.make_array(sty)(context, builder, args[1])
        intp = context.get_value_type(types.intp)
        lo = context.cast(builder, args[2], aty, types.intp)
        hi = context.cast(builder, args[3], bty, types.intp)
        elt = context.get_value_type(dty.dtype)
        width = VECTOR_BYTES // context.get_abi_sizeof(elt)
        vec = ir.VectorType(elt, width)
        count = builder.sub(hi, lo)
        full = builder.add(lo, builder.mul(builder.sdiv(count, ir.Constant(intp, width)), ir.Constant(intp, width)))
        nontemporal = builder.module.add_metadata([ir.Constant(ir.IntType(32), 1)])
        with cgutils.for_range_slice(builder, lo, full, ir.Constant(intp, width), intp) as (k, _):
            v = builder.load(builder.bitcast(builder.gep(s.data, [k]), vec.as_pointer()), align=1)
            store = builder.store(v, builder.bitcast(builder.gep(d.data, [k]), vec.as_pointer()), align=VECTOR_BYTES)
            store.set_metadata("nontemporal", nontemporal)
        with cgutils.for_range_slice(builder, full, hi, ir.Constant(intp, 1), intp) as (k, _):
            builder.store(builder.load(builder.gep(s.data, [k])), builder.gep(d.data, [k]))
        return context.get_dummy_value()

    return sig, codegen


@intrinsic
def fence(typingctx):  # type: ignore[no-untyped-def]
    """Non-temporal stores are weakly ordered: a kernel that streamed makes them
    visible before its caller (or another thread) reads the output. ``sfence`` on
    x86 (LLVM lowers a ``seq_cst`` fence there to a locked instruction, whose
    ordering of non-temporal stores the manuals leave to the vendor), a full fence
    elsewhere."""
    sig = types.void()

    def codegen(context, builder, signature, args):  # type: ignore[no-untyped-def]
        if _X86:
            sfence = builder.module.declare_intrinsic("llvm.x86.sse.sfence", fnty=ir.FunctionType(ir.VoidType(), []))
            builder.call(sfence, [])
        else:
            builder.fence("seq_cst")
        return context.get_dummy_value()

    return sig, codegen


# The buffer helpers below stay inline="always" (unlike the small helpers of
# numbabn.kernels.cpu): as plain functions each kernel's (dtype, layout, stream) types
# made them separate specialisations that compiled slower than inlining them (target
# 1.9 s and reserve 1.0 s of compile events over every entry point; apply_ncl went from
# 2.5 to 4.7 s).
@njit(error_model="numpy", inline="always")
def scratch(n, like, stream):
    """The write-combining buffer of a streaming kernel: ``n`` elements of ``like``'s
    dtype (none when not streaming)."""
    return np.empty(n if stream else 0, like.dtype)


@njit(error_model="numpy", inline="always")
def reserve(flat, tmp, p, base, i, m):
    """Room in ``tmp`` for the row ``flat[i:i+m]`` -> (p, base): the buffer holds
    ``flat[base:base+p]``; it is written out first when the row does not continue
    it or does not fit."""
    if p > 0 and (i != base + p or p + m > tmp.size):
        write(flat[base : base + p], tmp)
        p = 0
    return p, (i if p == 0 else base)


@njit(error_model="numpy", inline="always")
def window(like):
    """Elements of ``like``'s dtype in :data:`WINDOW_BYTES`: the buffer's capacity."""
    return WINDOW_BYTES // like.itemsize


@njit(error_model="numpy", inline="always")
def target(flat, i, i1, tmp, p, base, stream):
    """Where a kernel computes the start of the run ``flat[i:i1]`` of its output ->
    (array, m, p, base): the run's first ``m`` values go to ``array[:m]``. Not
    streaming: the run itself, ``m = i1 - i``. Streaming: the next ``m`` elements of
    the buffer, as many of the run as fit (see :func:`reserve`); the kernel asks again
    for the rest."""
    if stream:
        p, base = reserve(flat, tmp, p, base, i, 1)
        m = tmp.size - p
        if i1 - i < m:
            m = i1 - i
        return tmp[p : p + m], m, p + m, base
    return flat[i:i1], i1 - i, p, base


@njit(error_model="numpy", inline="always")
def flush(flat, tmp, p, base):
    """Write out what the buffer holds, then fence: once, before the kernel returns."""
    if p > 0:
        write(flat[base : base + p], tmp)
    fence()


# A called function, not inlined like the helpers above: it runs once per buffer
# flush (thousands of values), so the call costs nothing, while inlining its two
# call sites (reserve, flush) cost every element-wise kernel ~0.3 s of its cold
# compile. Compiled once per output dtype and shared by all of them: every entry
# point cold 29.2 -> 27.7 s, the fused-residual variants 25.9 -> 21.4 s (one
# process, bench/first_call.py --table).
@njit(error_model="numpy", fastmath=False)  # not the caller's (see cpu._helper)
def write(out, tmp):
    """``out[:] = tmp[:out.size]``: ordinary stores up to ``out``'s first 32-byte
    boundary, non-temporal ones from there."""
    n = out.size
    addr = out.ctypes.data
    # An array whose address is not a multiple of its itemsize (np.frombuffer at an
    # odd offset) never reaches a 32-byte boundary: ordinary stores throughout.
    lead = (-addr) % VECTOR_BYTES // out.itemsize if addr % out.itemsize == 0 else n
    h = lead if lead < n else n
    for j in range(h):
        out[j] = tmp[j]
    _nt_copy(out, tmp, h, n)
