"""The common case of a host call, accepted in a few attribute reads.

Most calls of the functional API on the CPU repeat one pattern: NumPy arrays of
the compute dtype, C-contiguous, per-channel parameters that fit, the input shape
seen before, default options. On a small input (a (64, 100) batch) the full checks
-- one small function per rule, each ready with its message -- cost more than the
kernels, where PyTorch runs its checks in C++. The functions here recognise exactly
that case and return what the full checks would have returned, or None: then the
full checks run, and raise where something is wrong. They never raise and never
change anything; what they accept is a subset of what the full checks accept, with
the same resulting values (``tests/test_fast_args.py`` compares both on generated
calls).

Identity tests (``x.dtype is float32``) are deliberate: an array in native byte
order of a builtin dtype carries NumPy's dtype singleton; anything else (big-endian
data, subclasses, a dtype object made elsewhere) simply takes the full path.
"""

from math import inf
from typing import Any

import numpy as np

from . import _buffers
from ._context import BatchNormContext
from ._layout import _LAYOUTS, C_ALIGNED, WRITEABLE, Canonical, empty_param, may_share, param_as_is

_F32 = np.dtype(np.float32)
_F64 = np.dtype(np.float64)
_I64 = np.dtype(np.int64)
_I64_MAX = int(np.iinfo(np.int64).max)
_new = tuple.__new__
_C_ALIGNED_WRITEABLE = C_ALIGNED | WRITEABLE


def canonical_input(x: Any, axis: Any) -> Canonical | None:
    """``canonical_host(x, axis)`` for a C-contiguous, aligned float32/float64 NumPy
    array whose (shape, axis) was seen before; None otherwise."""
    if type(x) is not np.ndarray or type(axis) is not int:
        return None
    dt = x.dtype
    if dt is not _F32 and dt is not _F64:
        return None
    shape = x.shape
    known = _LAYOUTS.get((shape, axis))
    if known is None or x.flags.num & C_ALIGNED != C_ALIGNED:
        return None
    ax, layout, cshape, C, m = known
    # tuple.__new__ skips the NamedTuple's generated __new__ (0.3 us of a 10 us call);
    # a 2-D channels-last input is its own canonical view (a reshape costs 0.15 us)
    return _new(Canonical, (x if cshape == shape else x.reshape(cshape), layout, shape, ax, dt, C, m))


def forward_args(
    x: Any,
    gamma: Any,
    beta: Any,
    running_mean: Any,
    running_var: Any,
    num_batches_tracked: Any,
    training: Any,
    momentum: Any,
    eps: Any,
    axis: Any,
    activation: Any,
    out: Any,
) -> tuple[Any, ...] | None:
    """The checked arguments of a host ``batch_norm_forward`` without ``moments`` or
    ``residual``: (cx, gamma, beta, running_mean, running_var, num_batches_tracked,
    relu, y), with absent parameters as the shared empty arrays, exactly as the full
    checks return them, and ``y`` the buffer the kernels write (``out`` in the
    canonical shape, or a new array); or None.

    Accepted: ``training`` a bool; ``activation`` None or "relu"; ``eps`` a finite
    float > 0; ``momentum`` None or a float in [0, 1]; gamma/beta None or arrays of
    x's dtype and shape (C,); running statistics both None (training only) or both
    such arrays, writeable in training, sharing no memory (with each other, nor in
    training with x, gamma or beta); the counter None or a
    writeable one-element int64 array >= 0 (sharing no memory with the other arrays
    when it is incremented); in training more than one value per
    channel, and a counter for ``momentum=None``; ``out`` None or a writeable,
    C-contiguous array of x's shape and dtype sharing no memory with x or the
    per-channel arrays.
    """
    if training is not True and training is not False:
        return None
    if activation is None:
        relu = False
    elif type(activation) is str and activation == "relu":
        relu = True
    else:
        return None
    if type(eps) is not float or not 0.0 < eps < inf:
        return None
    if momentum is not None and (type(momentum) is not float or not 0.0 <= momentum <= 1.0):
        return None
    cx = canonical_input(x, axis)
    if cx is None:
        return None
    dt = cx.dtype
    shape = (cx.channels,)
    if gamma is None:
        gamma = empty_param(dt)
    elif not param_as_is(gamma, dt, shape, False):
        return None
    if beta is None:
        beta = empty_param(dt)
    elif not param_as_is(beta, dt, shape, False):
        return None
    if running_mean is None and running_var is None:
        if not training:
            return None
        running_mean = running_var = empty_param(dt)
    elif (
        not param_as_is(running_mean, dt, shape, training)
        or not param_as_is(running_var, dt, shape, training)
        or may_share(running_mean, (running_var,))
    ):
        return None
    nbt = num_batches_tracked
    if nbt is not None:
        if type(nbt) is not np.ndarray or nbt.dtype is not _I64 or nbt.size != 1 or not nbt.flags.num & WRITEABLE:
            return None
        if not 0 <= nbt.item() < _I64_MAX:  # the full checks' errors (a count at the maximum would wrap)
            return None
    if training and running_mean.size and _written_overlap(running_mean, running_var, nbt, x, gamma, beta):
        return None
    if training:
        if cx.count == 1:
            return None
        if momentum is None and nbt is None and running_mean.size:
            return None
    if out is None:
        y = _buffers.empty(cx.array.shape, dt, x.nbytes)
    else:
        apart = (x, gamma, beta, running_mean, running_var)
        y = _output(out, x, dt, cx.array.shape, apart if nbt is None or not training else (*apart, nbt))
        if y is None:
            return None
    return cx, gamma, beta, running_mean, running_var, nbt, relu, y


def _output(out: Any, like: Any, dt: np.dtype[Any], cshape: tuple[int, ...], apart: tuple[Any, ...]) -> Any:
    """``out`` viewed in the canonical shape when it is a writeable C-contiguous array
    of ``like``'s shape and of dtype ``dt``, sharing no memory with the arrays in
    ``apart``; else None."""
    if type(out) is not np.ndarray or out.dtype is not dt or out.shape != like.shape:
        return None
    flags = out.flags.num
    if flags & _C_ALIGNED_WRITEABLE != _C_ALIGNED_WRITEABLE or may_share(out, apart):
        return None
    return out if out.shape == cshape else out.reshape(cshape)


def _written_overlap(rm: Any, rv: Any, nbt: Any, x: Any, gamma: Any, beta: Any) -> bool:
    """Whether the running statistics ``rm``/``rv``, updated in place before the
    normalise pass reads ``x``, ``gamma`` and ``beta``, may share memory with those,
    or the counter ``nbt`` (None, or incremented in place) with any of them."""
    # Arrays that own their memory (base None: the common case, checked first in a
    # few attribute reads) overlap only if they are the same object; x (ndim >= 2)
    # never is a running statistic, nor the int64 counter a float array.
    if (
        rm.base is None
        and rv.base is None
        and x.base is None
        and gamma.base is None
        and beta.base is None
        and (nbt is None or nbt.base is None)
    ):
        return rm is gamma or rm is beta or rv is gamma or rv is beta
    read = (x, gamma, beta)
    return may_share(rm, read) or may_share(rv, read) or (nbt is not None and may_share(nbt, (x, gamma, beta, rm, rv)))


def backward_args(dy: Any, ctx: Any, out: Any) -> tuple[Canonical, Any] | None:
    """(canonical ``dy``, the buffer dx is written to) of a host ``batch_norm_backward``
    of a CPU forward without a residual, when ``dy`` is like the forward's input
    (shape, dtype, C-contiguous) and ``out`` is None or a writeable C-contiguous array
    of that shape and dtype sharing no memory with ``dy``, the forward's input or
    gamma; None otherwise."""
    if type(ctx) is not BatchNormContext or ctx.backend != "cpu" or ctx.residual is not None:
        return None
    cdy = canonical_input(dy, ctx.axis)
    if cdy is None or cdy.shape != ctx.shape or cdy.dtype is not ctx.dtype:
        return None
    cshape = ctx.x.shape
    if out is None:
        return cdy, _buffers.empty(cshape, ctx.x.dtype, dy.nbytes)
    dx = _output(out, dy, ctx.dtype, cshape, (dy, ctx.x, ctx.gamma))
    return None if dx is None else (cdy, dx)
