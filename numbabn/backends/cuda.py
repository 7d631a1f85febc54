"""The CUDA backend: placement, GPU array checks, kernel launches of ``numbabn.kernels.cuda``.

Imported only when the CUDA backend is used (it imports ``numba.cuda``). Operations
as listed in :mod:`numbabn.backends`; this module decides where arrays live:

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
  Either way the kernels update device copies, which ``commit_running`` writes
  back only after ``y`` has been delivered, so a failure after the statistics
  kernel (the normalising launch, the copy back) leaves them as they were.
* ``moments=`` and ``allreduce=`` (synchronized BN): the packed per-channel
  partials -- (2, C) float64 [mean, M2] into the forward, [sum g, sum g*(x - mean)]
  out of and back into the backward -- are C values per field, so they travel
  between device and host (one small copy each way) and the caller's combination
  runs on the host, in the same format as on the CPU backend.

Validation follows the CPU path's rules and messages (``numbabn._layout``,
``numbabn._bn_checks``); all of it happens before any kernel runs, so bad input
modifies nothing.
"""

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numba import cuda
from numpy.typing import NDArray

from .. import config
from .._checks import describe
from .._layout import (
    BFLOAT16,
    Canonical,
    canonical_host,
    check_float_dtype,
    check_out,
    check_param,
    compute_dtype,
    is_device_array,
    layout_of,
)
from .._typing import AnyArray
from ..kernels import cuda as K

if TYPE_CHECKING:
    from .._context import BatchNormContext

NAME = "cuda"


def _ncl(a: AnyArray, layout: str) -> AnyArray:
    """The kernels' (N, C, L) view: channels-last (M, C) becomes (M, C, 1)."""
    return a if layout == "ncl" else a.reshape(a.shape[0], a.shape[1], 1)


# ------------------------------------------------------------------ GPU arrays


def as_device(x: AnyArray) -> AnyArray:
    """A numba device array viewing the GPU array ``x`` (zero copy)."""
    if getattr(x, "__cuda_ndarray__", False):
        return x
    if not hasattr(cuda, "as_cuda_array"):  # Numba's CUDA simulator cannot wrap another library's GPU memory
        raise TypeError(
            f"{type(x).__name__} exposes __cuda_array_interface__, but Numba's CUDA simulator "
            "(NUMBA_ENABLE_CUDASIM=1) can only take its own device arrays (numba.cuda.to_device)"
        )
    return cuda.as_cuda_array(x)


def _device_view(fn: str, name: str, x: AnyArray) -> AnyArray:
    """:func:`as_device` for argument ``name``: a GPU array that cannot be viewed (a
    torch CUDA tensor that requires grad, or any object that
    :func:`~numbabn._layout.is_device_array` takes for a GPU array although its
    interface raises) is a TypeError naming it."""
    if not getattr(x, "__cuda_ndarray__", False):
        try:
            _ = x.__cuda_array_interface__
        except Exception as e:
            # The torch hint only where it can apply (torch tensors have is_cuda).
            hint = "; a torch tensor that requires grad needs .detach()" if getattr(x, "is_cuda", None) else ""
            raise TypeError(
                f"{fn}: {name} is a GPU array that cannot be read through __cuda_array_interface__ "
                f"({type(e).__name__}: {e}){hint}"
            ) from None
    return as_device(x)


def _device_readonly(x: AnyArray) -> bool:
    iface = getattr(x, "__cuda_array_interface__", None)
    return bool(iface and iface["data"][1])


def device_overlap(a: AnyArray, b: AnyArray) -> bool:
    """Whether two C-contiguous device arrays share bytes (by address range)."""

    def extent(d: AnyArray) -> tuple[int, int]:
        # The simulator's device arrays wrap NumPy arrays and have only the host interface.
        iface = getattr(d, "__cuda_array_interface__", None) or d.__array_interface__
        start = iface["data"][0]
        return start, start + d.nbytes

    (a0, a1), (b0, b1) = extent(a), extent(b)
    return a0 < b1 and b0 < a1


def _check_device_out(fn: str, name: str, out: AnyArray, shape: tuple[int, ...], dtype: Any) -> AnyArray:
    """:func:`~numbabn._layout.check_out` for a GPU output; returns the numba device view of it."""
    if not is_device_array(out):
        raise TypeError(f"{fn}: {name} must be a GPU array like the input, got {describe(out)}")
    d = _device_view(fn, name, out)
    if tuple(d.shape) != tuple(shape):
        raise ValueError(f"{fn}: {name} must have shape {tuple(shape)}, got {tuple(d.shape)}")
    if d.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have dtype {dtype}, got {d.dtype}")
    if not d.is_c_contiguous() or _device_readonly(out):
        raise ValueError(f"{fn}: {name} must be a writeable C-contiguous array")
    return d


def canonical(fn: str, name: str, x: AnyArray, axis: int) -> Canonical:
    """Check an input of the CUDA backend and view it in its canonical layout on the device.

    GPU arrays (see :func:`~numbabn._layout.is_device_array`) are viewed without
    copying and must be C-contiguous; anything else goes through
    :func:`~numbabn._layout.canonical_host` and is copied to the device once.
    float16 is converted to a float32 device copy.
    """
    if not is_device_array(x):
        cx = canonical_host(fn, name, x, axis)
        arr = cx.array
        if cx.dtype == BFLOAT16:
            raise TypeError(f"{fn}: bfloat16 {name} runs on the CPU backend only")
        if arr.dtype != cx.dtype:  # float16's 16-bit storage view (the CPU kernels' format)
            arr = arr.view(cx.dtype).astype(compute_dtype(cx.dtype))
        return cx._replace(array=cuda.to_device(arr))
    d = _device_view(fn, name, x)
    check_float_dtype(fn, name, d.dtype)
    if not d.dtype.isnative:
        # The host path converts big-endian data; on the device that takes a kernel
        # reading it, and Numba cannot type a non-native dtype for one (the launch
        # fails with "Unsupported array dtype"; the simulator ran and returned a
        # big-endian y). Refused here, before anything is launched or changed.
        raise TypeError(
            f"{fn}: {name} is a GPU array in non-native byte order (dtype {d.dtype.str}), which the "
            f"kernels cannot read; convert it on the host first (.astype({d.dtype.name!r}))"
        )
    axis, layout, cshape, C, m = layout_of(fn, name, tuple(d.shape), axis)
    if not d.is_c_contiguous():
        raise ValueError(
            f"{fn}: {name} is a non-contiguous GPU array (strides {tuple(d.strides)}); "
            "make it C-contiguous first (e.g. cupy.ascontiguousarray, tensor.contiguous())"
        )
    arr = d.reshape(cshape)
    dt = compute_dtype(d.dtype)
    if dt != d.dtype and d.size == 0:
        arr = cuda.device_array(cshape, dt)
    elif dt != d.dtype:
        converted = cuda.device_array(cshape, dt)
        K.cast(arr, converted, config.CUDA_THREADS)
        arr = converted
    return Canonical(arr, layout, tuple(d.shape), axis, np.dtype(d.dtype), C, m)


def param(fn: str, name: str, value: AnyArray | None, channels: int, dtype: Any, *, inplace: bool = False) -> AnyArray:
    """:func:`~numbabn._layout.check_param` for the CUDA backend; returns a device array.

    GPU arrays are used in place (they must be C-contiguous); host arrays are
    checked by :func:`~numbabn._layout.check_param` and copied to the device
    (:func:`forward` copies in-place parameters back). None gives an empty device array.
    """
    if not is_device_array(value):
        return cuda.to_device(check_param(fn, name, value, channels, dtype, inplace=inplace))
    d = _device_view(fn, name, value)
    if tuple(d.shape) != (channels,):
        raise ValueError(
            f"{fn}: {name} must have shape ({channels},) (one value per channel), got shape {tuple(d.shape)}"
        )
    if d.dtype != dtype:
        raise TypeError(f"{fn}: {name} must have dtype {dtype} to match the input, got {d.dtype}")
    if not d.is_c_contiguous():  # what came, as for x: the strides
        raise ValueError(f"{fn}: {name} must be a C-contiguous GPU array, got strides {tuple(d.strides)}")
    if inplace and _device_readonly(value):
        raise ValueError(f"{fn}: {name} is updated in place but is read-only")
    return d


def check_apart(fn: str, a: AnyArray, b: AnyArray, message: str) -> None:
    """Raise ``message`` when arrays ``a`` and ``b`` (host or device; None skipped) share memory."""
    if a is None or b is None:
        return
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray):
        overlap = b.size > 0 and np.may_share_memory(a, b)
    elif is_device_array(a) and is_device_array(b):
        da, db = as_device(a), as_device(b)
        overlap = da.size > 0 and db.size > 0 and device_overlap(da, db)
    else:
        overlap = False
    if overlap:
        raise ValueError(f"{fn}: {message}")


def output(
    fn: str,
    out: AnyArray | None,
    cx: Canonical,
    host: bool,
    inputs: Sequence[Any],
    overlap_msg: str,
    name: str = "out",
) -> AnyArray:
    """Check ``out`` (called ``name`` in the errors) and return the compute-dtype
    device buffer (canonical shape) the kernels write: ``out`` itself when it is a device array of that dtype."""
    dt = compute_dtype(cx.dtype)
    if out is not None:
        if host:
            check_out(fn, name, out, cx.shape, cx.dtype)
            overlaps = any(np.may_share_memory(out, a) for a in inputs if isinstance(a, np.ndarray))
        else:
            d = _check_device_out(fn, name, out, cx.shape, cx.dtype)
            overlaps = any(device_overlap(d, as_device(a)) for a in inputs if is_device_array(a))
        if overlaps:
            raise ValueError(f"{fn}: {overlap_msg}")
        if not host and cx.dtype == dt:
            return d.reshape(cx.array.shape)
    return cuda.device_array(cx.array.shape, dt)


def deliver(buf: AnyArray, shape: tuple[int, ...], dtype: Any, out: AnyArray | None, host: bool) -> AnyArray:
    """The device result ``buf`` as the caller's kind of array, in ``out`` if given."""
    if host:
        res = buf.copy_to_host().reshape(shape)
        if out is None:
            return res.astype(dtype, copy=False)
        out[...] = res
        return out
    if buf.dtype != dtype and buf.size == 0:
        return cuda.device_array(shape, dtype) if out is None else out
    if buf.dtype != dtype:  # float16: convert on the device
        target = cuda.device_array(shape, dtype) if out is None else as_device(out)
        K.cast(buf, target, config.CUDA_THREADS)
        return target if out is None else out
    return buf.reshape(shape) if out is None else out


# ------------------------------------------------------------------ operations


def moments(cx: Canonical) -> NDArray[np.float64]:
    """(2, C) float64 [mean, M2] (NumPy) of the canonical device input (at least one
    value per channel): Welford per thread, Chan merges per block and across blocks."""
    mean, m2 = K.moments(_ncl(cx.array, cx.layout), config.CUDA_THREADS)
    return np.stack([mean.copy_to_host(), m2.copy_to_host()])


def zero_stats(C: int, dtype: Any) -> tuple[Any, Any, Any]:
    """(mean, invstd, coef) of a batch without values: zeros (zero gradients follow)."""
    zeros = cuda.to_device(np.zeros(C))
    return zeros, zeros, None


def forward(
    cx: Canonical,
    gamma: AnyArray,
    beta: AnyArray,
    running_mean: AnyArray,
    running_var: AnyArray,
    momentum: float,
    eps: float,
    training: bool,
    relu: bool,
    stats: Any,
    count: int,
    y: AnyArray,
    given_running: Any,
    residual: AnyArray | None = None,
) -> tuple[Any, Any, Any]:
    """Normalise ``cx`` into the device buffer ``y`` -> (mean, invstd, pending), the
    first two float64 device arrays. ``stats``: host (2, C) [mean, M2] of ``count``
    values to use instead of the batch's (copied to the device).

    The running-statistics update is only staged: the kernels update device copies
    (for NumPy ``given_running``, the copies :func:`param` made; for GPU ones, fresh
    copies), and ``pending`` holds them for ``commit_running``, which the
    dispatcher calls once ``y`` has been delivered. The statistics kernel runs before
    the normalising launch, and the delivery copies back or converts on the device:
    either can fail, and a call that raises must leave the caller's statistics as
    they were. ``pending`` is None when nothing is updated.
    """
    pending = None
    if training and running_mean.size:
        staged = []
        for given, dev in zip(given_running, (running_mean, running_var), strict=True):
            if is_device_array(given):  # the caller's own memory: update a copy
                work = cuda.device_array(dev.shape, dev.dtype)
                work.copy_to_device(dev)
            else:  # already param()'s device copy of the NumPy array
                work = dev
            staged.append((given, dev, work))
        pending = tuple(staged)
        running_mean, running_var = staged[0][2], staged[1][2]
    mean, invstd = K.forward(
        _ncl(cx.array, cx.layout),
        gamma,
        beta,
        running_mean,
        running_var,
        momentum,
        eps,
        training,
        relu,
        config.CUDA_THREADS,
        _ncl(y, cx.layout),
        stats,
        count,
        None if residual is None else _ncl(residual, cx.layout),
    )
    return mean, invstd, pending


def commit_running(pending: Any) -> None:
    """Publish a running-statistics update staged by :func:`forward` (None: nothing).

    The steps that can fail come first: NumPy statistics are copied from the device
    into new host arrays (a synchronising copy, so an error of the kernels surfaces
    here), then GPU statistics receive their device copies and NumPy ones their
    values (plain assignments of checked arrays)."""
    if pending is None:
        return
    fetched = [(given, work.copy_to_host()) for given, _, work in pending if not is_device_array(given)]
    for given, dev, work in pending:
        if is_device_array(given):
            dev.copy_to_device(work)
    for given, values in fetched:
        given[...] = values


def grad_sums(cdy: Canonical, ctx: "BatchNormContext") -> Any:
    """Device partials (psg, psgx), (C, S) float64, of sum g and sum g*(x - mean)."""
    return K.grad_sums(
        _ncl(cdy.array, ctx.layout),
        _ncl(ctx.x, ctx.layout),
        ctx.mean,
        ctx.invstd,
        ctx.gamma,
        ctx.beta,
        ctx.relu,
        config.CUDA_THREADS,
        None if ctx.residual is None else _ncl(ctx.residual, ctx.layout),
    )


def pack_grad_sums(partials: Any) -> NDArray[np.float64]:
    """Device partials -> host (2, C) float64 [sum g, sum g*(x - mean)], summed in split order."""
    return np.stack([p.copy_to_host().sum(axis=1) for p in partials])


def unpack_grad_sums(sums: NDArray[np.float64]) -> Any:
    """Host (2, C) float64 sums (e.g. over all ranks) -> device partials of one split."""
    return tuple(cuda.to_device(np.ascontiguousarray(s.reshape(-1, 1))) for s in sums)


def copy(src: AnyArray, dst: AnyArray) -> None:
    """dst[...] = src (canonical device buffers of one shape and dtype)."""
    dst.copy_to_device(src)


def grad_apply(
    cdy: Canonical, ctx: "BatchNormContext", partials: Any, dx: AnyArray, host: bool, dres: AnyArray | None = None
) -> tuple[Any, Any]:
    """dx into the device buffer ``dx`` -> (dgamma, dbeta) of the compute dtype:
    NumPy arrays when ``host`` (dy came from the host), device arrays otherwise."""
    C = ctx.mean.shape[0]
    dt = compute_dtype(ctx.dtype)
    if ctx.count == 0:  # no values anywhere: zero parameter gradients, no kernel
        zeros = np.zeros(C, dt)
        return (zeros, zeros.copy()) if host else (cuda.to_device(zeros), cuda.to_device(zeros))
    dgamma = cuda.device_array(C, dt)
    dbeta = cuda.device_array(C, dt)
    psg, psgx = partials
    K.grad_apply(
        _ncl(cdy.array, ctx.layout),
        _ncl(ctx.x, ctx.layout),
        ctx.mean,
        ctx.invstd,
        ctx.gamma,
        ctx.beta,
        ctx.training,
        ctx.relu,
        config.CUDA_THREADS,
        psg,
        psgx,
        ctx.count,
        _ncl(dx, ctx.layout),
        dgamma,
        dbeta,
        None if ctx.residual is None else _ncl(ctx.residual, ctx.layout),
        None if dres is None else _ncl(dres, ctx.layout),
    )
    if host:
        return dgamma.copy_to_host(), dbeta.copy_to_host()
    return dgamma, dbeta
