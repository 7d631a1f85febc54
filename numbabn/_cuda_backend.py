"""The CUDA branch of :mod:`numbabn.functional`: placement, validation, results.

Imported only when the CUDA backend is used (it imports ``numba.cuda``). The
kernels are in :mod:`numbabn.kernels.cuda`; this module decides where arrays live:

* ``x`` on the GPU (anything with ``__cuda_array_interface__``: numba device
  arrays, CuPy, PyTorch CUDA tensors) is used in place, without copying; ``y``,
  ``dx``, ``dgamma`` and ``dbeta`` come back as numba device arrays (or in the
  caller's ``out``, which must then be a GPU array too).
* ``x`` on the host with ``backend="cuda"``: copied to the device and the results
  copied back, as NumPy arrays (``out`` must then be a NumPy array).
* ``gamma``/``beta`` may be host or device arrays either way (host ones are copied).
* ``running_mean``/``running_var``: GPU arrays are updated in place on the device;
  NumPy arrays are copied to the device, updated there, and copied back into the
  same arrays once the kernels have run. ``num_batches_tracked`` is a host counter.

Validation follows the CPU path's rules and messages (:mod:`numbabn._validation`);
all of it happens before any kernel runs, so bad input modifies nothing.
"""
import numpy as np
from numba import cuda

from . import _validation as V
from . import config
from .functional import BatchNormContext
from .kernels import cuda as K
from .stats import Moments


def _ncl(a, layout):
    """The kernels' (N, C, L) view: channels-last (M, C) becomes (M, C, 1)."""
    return a if layout == "ncl" else a.reshape(a.shape[0], a.shape[1], 1)


def _output_buffer(fn, out, cx, host, inputs, overlap_msg):
    """Check ``out`` and return the compute-dtype device buffer (canonical shape)
    the kernels write: ``out`` itself when it is a device array of that dtype."""
    dt = V.compute_dtype(cx.dtype)
    if out is not None:
        if host:
            V.check_out(fn, "out", out, cx.shape, cx.dtype)
            overlaps = any(np.may_share_memory(out, a) for a in inputs if isinstance(a, np.ndarray))
        else:
            d = V.check_device_out(fn, "out", out, cx.shape, cx.dtype)
            overlaps = any(V.device_overlap(d, V.as_device(a)) for a in inputs if V.is_device_array(a))
        if overlaps:
            raise ValueError(f"{fn}: {overlap_msg}")
        if not host and cx.dtype == dt:
            return d.reshape(cx.array.shape)
    return cuda.device_array(cx.array.shape, dt)


def _deliver(buf, shape, dtype, out, host):
    """The device result ``buf`` as the caller's kind of array, in ``out`` if given."""
    if host:
        res = buf.copy_to_host().reshape(shape)
        if out is None:
            return res.astype(dtype, copy=False)
        out[...] = res
        return out
    if buf.dtype != dtype and buf.size == 0:
        return cuda.device_array(shape, dtype) if out is None else out
    if buf.dtype != dtype:   # float16: convert on the device
        target = cuda.device_array(shape, dtype) if out is None else V.as_device(out)
        K.cast(buf, target, config.CUDA_THREADS)
        return target if out is None else out
    return buf.reshape(shape) if out is None else out


def _check_apart(fn, a, b, message):
    """Raise ``message`` when arrays ``a`` and ``b`` (host or device; None skipped) share memory."""
    if a is None or b is None:
        return
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        overlap = b.size > 0 and np.may_share_memory(a, b)
    elif V.is_device_array(a) and V.is_device_array(b):
        da, db = V.as_device(a), V.as_device(b)
        overlap = da.size > 0 and db.size > 0 and V.device_overlap(da, db)
    else:
        overlap = False
    if overlap:
        raise ValueError(f"{fn}: {message}")


def forward(fn, x, gamma, beta, running_mean, running_var, num_batches_tracked, *,
            training, momentum, eps, axis, relu, out):
    """:func:`numbabn.functional.batch_norm_forward` on the GPU (scalars already checked)."""
    host = not V.is_device_array(x)
    cx = V.canonical_device(fn, "x", x, axis)
    g, b, rm, rv, nbt = V.check_forward_params(fn, cx, gamma, beta, running_mean, running_var,
                                               num_batches_tracked, training, V.check_device_param)
    tracking = training and running_mean is not None
    if tracking:
        _check_apart(fn, running_mean, running_var,
                     "running_mean and running_var must not overlap (both are updated in place)")
    V.check_training_batch(fn, cx.count, cx.shape, training, tracking, momentum, nbt)
    y = _output_buffer(fn, out, cx, host, (x,), "out must not overlap x (the backward pass reads x)")
    if out is not None:
        for other in (gamma, beta, running_mean, running_var):
            _check_apart(fn, out, other, "out must not overlap gamma, beta or the running statistics "
                                         "(the forward reads or updates them)")

    factor = V.resolve_momentum(tracking, momentum, nbt)
    if cx.array.size == 0:
        # Nothing to normalise (see functional's module docstring): no kernel, the
        # running statistics stay, the counter counts the call.
        if tracking and nbt is not None:
            nbt += 1
        zeros = cuda.to_device(np.zeros(cx.channels))
        ctx = BatchNormContext("cuda", cx.layout, cx.shape, cx.axis, cx.dtype, cx.array, zeros, zeros,
                               g, b, gamma is not None, beta is not None, training, relu, cx.count)
        return _deliver(y, cx.shape, cx.dtype, out, host), ctx
    mean, invstd = K.forward(_ncl(cx.array, cx.layout), g, b, rm, rv, factor, eps, training, relu,
                             config.CUDA_THREADS, _ncl(y, cx.layout))
    if tracking:
        for given, updated in ((running_mean, rm), (running_var, rv)):
            if not V.is_device_array(given):
                updated.copy_to_host(given)
        if nbt is not None:
            nbt += 1
    ctx = BatchNormContext("cuda", cx.layout, cx.shape, cx.axis, cx.dtype, cx.array, mean, invstd,
                           g, b, gamma is not None, beta is not None, training, relu, cx.count)
    return _deliver(y, cx.shape, cx.dtype, out, host), ctx


def backward(fn, dy, ctx, out):
    """:func:`numbabn.functional.batch_norm_backward` for a CUDA forward context."""
    host = not V.is_device_array(dy)
    cdy = V.canonical_device(fn, "dy", dy, ctx.axis)
    V.check_like_forward(fn, cdy, ctx)
    dx = _output_buffer(fn, out, cdy, host, (dy, ctx.x), "out must not overlap dy or the forward input")
    dt = V.compute_dtype(ctx.dtype)
    C = ctx.mean.shape[0]
    if ctx.x.size == 0:     # empty forward input: empty dx, zero parameter gradients, no kernel
        zeros = np.zeros(C, dt)
        dgamma, dbeta = (zeros, zeros.copy()) if host else (cuda.to_device(zeros), cuda.to_device(zeros))
        return (_deliver(dx, ctx.shape, ctx.dtype, out, host),
                dgamma if ctx.has_gamma else None, dbeta if ctx.has_beta else None)
    dgamma = cuda.device_array(C, dt)
    dbeta = cuda.device_array(C, dt)
    K.backward(_ncl(cdy.array, ctx.layout), _ncl(ctx.x, ctx.layout), ctx.mean, ctx.invstd,
               ctx.gamma, ctx.beta, ctx.training, ctx.relu, config.CUDA_THREADS,
               _ncl(dx, ctx.layout), dgamma, dbeta)
    if host:
        dgamma = dgamma.copy_to_host()
        dbeta = dbeta.copy_to_host()
    return (_deliver(dx, ctx.shape, ctx.dtype, out, host),
            dgamma if ctx.has_gamma else None,
            dbeta if ctx.has_beta else None)


def moments(fn, x, axis):
    """:func:`numbabn.functional.moments` on the GPU; the result holds NumPy arrays
    (a :class:`~numbabn.stats.Moments` is a host summary, C values per field)."""
    cx = V.canonical_device(fn, "x", x, axis)
    if cx.count == 0:
        return Moments.empty(cx.channels)
    mean, m2 = K.moments(_ncl(cx.array, cx.layout), config.CUDA_THREADS)
    return Moments(cx.count, mean.copy_to_host(), m2.copy_to_host())
