"""Public functional batch norm: the one dispatcher in front of the two backends.

Data flows one way: checks (once, for both backends) -> canonical layout (by the
backend) -> backend operations (moments, forward, gradient sums, gradient apply;
see :mod:`numbabn.backends`) -> result.

Formulas (per channel c over its m values; biased variance normalises)::

    mean   = (1/m) sum x_i
    var    = (1/m) sum (x_i - mean)^2
    invstd = 1 / sqrt(var + eps)
    y_i    = gamma * (x_i - mean) * invstd + beta        (then max(y, 0) if relu)
    y_i    = act(gamma * (x_i - mean) * invstd + beta + r_i)   (with residual=r)

Eval mode uses the running statistics: ``a = gamma*invstd_running``,
``y = a*(x - running_mean) + beta``. (Folding this into one FMA ``a*x + b`` would save
an operation; the kernels subtract first, which costs nothing in a memory-bound loop
and keeps float64 outputs accurate when ``|mean| >> std``.)

Running statistics (PyTorch's convention), updated in place in training mode::

    running_mean <- (1 - momentum)*running_mean + momentum*mean
    running_var  <- (1 - momentum)*running_var  + momentum*var*m/(m - 1)   (unbiased)

``momentum=None`` is the cumulative average (momentum_t = 1/num_batches_tracked,
Ioffe & Szegedy's Algorithm 2). Keras' ``momentum=0.99`` is our ``momentum=0.01``.

Backward (Santurkar et al. 2018, Fact C.1), with g = dy (times the ReLU mask; with a
residual, the residual's gradient is g too)::

    dbeta  = sum g_i
    dgamma = sum g_i * xhat_i
    dx_i   = gamma*invstd/m * (m*g_i - dbeta - xhat_i*dgamma)      (training)
    dx_i   = gamma*invstd_running * g_i                            (eval)

NaN and Inf propagate: a NaN in a channel makes that channel's statistics and
outputs NaN (nothing is silently dropped). Float32 inputs give float32 outputs
(statistics accumulate in float64 internally); float16 is computed in float32
(float32 gamma, beta and running statistics; float16 output), as PyTorch's CPU
batch norm does: the CPU kernels read and write the 16-bit data directly (no
float32 copy; ``numbabn.kernels.storage``), and the result is exactly the
float32 computation on the same values, rounded to float16 (ties to even).
Big-endian input is converted to the native byte order (the output is native);
masked arrays with masked values are refused.

Empty batches (PyTorch's semantics): an input without values (N = 0, or a
zero-length spatial axis) gives an empty output and, in the backward, an empty
``dx`` and zero ``dgamma``/``dbeta``; the running statistics are left as they were
(the counter still counts the call, as ``torch.nn.BatchNorm`` modules do). No
kernel runs for it. Exactly one value per channel in training is an error, as in
PyTorch.
"""

from collections.abc import Callable
from types import ModuleType

import numpy as np
from numpy.typing import NDArray

from . import _bn_checks as B
from . import _fast_args
from ._checks import check_activation, check_bool, check_eps, check_momentum, describe
from ._context import BatchNormContext
from ._layout import compute_dtype, is_device_array
from ._typing import AnyArray
from .backends import cpu as _cpu_backend
from .backends import get as _get_backend
from .stats import Moments

__all__ = [
    "BatchNormContext",
    "batch_norm_backward",
    "batch_norm_forward",
    "cuda_available",
    "cuda_compiler_problem",
    "moments",
]

_BACKENDS = ("cpu", "cuda")


def _dispatch(fn: str, x: AnyArray, backend: str | None) -> tuple[ModuleType, bool]:
    """(backend module, whether ``x`` is a host array): asks "device array?" once."""
    if type(x) is np.ndarray:
        if backend is None or backend == "cpu":
            return _cpu_backend, True
        host = True
    else:
        host = not is_device_array(x)
    if backend is None:
        backend = "cpu" if host else "cuda"
    elif backend not in _BACKENDS:
        raise ValueError(f"{fn}: backend must be None, 'cpu' or 'cuda', got {backend!r}")
    if backend == "cpu":
        return _cpu_backend, host
    _check_cuda_usable(fn)
    return _get_backend("cuda"), host


_cuda_usable: list[bool] = []


def cuda_compiler_problem() -> str | None:
    """Why numba-cuda cannot compile GPU kernels here, in one line; None when it can.

    numba-cuda loads its kernel compiler (``numba.cuda.cudaimpl`` and the NumPy
    support it registers) at the first compile, so a numba-cuda that does not work
    with the installed NumPy fails only then, deep inside the first call. numba-cuda
    0.30.4 (the newest so far) fails so under NumPy 2.5, which removed
    ``numpy.row_stack``: the ``cuda12``/``cuda13`` extras require NumPy < 2.5.
    Only meaningful with a real GPU (the simulator does not compile).
    """
    from importlib import import_module
    from importlib.metadata import PackageNotFoundError, version

    try:
        import_module("numba.cuda.cudaimpl")
    except Exception as exc:  # any failure here is one the first compile would hit
        try:
            nc = f"numba-cuda {version('numba-cuda')}"
        except PackageNotFoundError:
            nc = "numba.cuda"
        first = str(exc).splitlines()[0] if str(exc) else ""
        hint = "; install numpy<2.5" if not hasattr(np, "row_stack") else ""
        return f"{nc} fails to load its compiler with NumPy {np.__version__} ({type(exc).__name__}: {first}){hint}"
    return None


def _check_cuda_usable(fn: str) -> None:
    """numbabn's one-line error when the CUDA backend cannot run here (instead of
    Numba's multi-line ``CudaSupportError`` from the first device allocation). The
    CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) counts as usable."""
    try:
        from numba import cuda
    except ImportError as exc:  # numba-cuda missing or broken
        raise RuntimeError(
            f"{fn}: backend='cuda' needs numba-cuda, which cannot be imported "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
            "use backend='cpu'"
        ) from None
    if _cuda_usable or cuda.config.ENABLE_CUDASIM:  # type: ignore[attr-defined]  # set from the environment at import
        return
    if cuda.is_available():
        problem = cuda_compiler_problem()
        if problem:
            raise RuntimeError(f"{fn}: backend='cuda' cannot compile its kernels here: {problem}; use backend='cpu'")
        _cuda_usable.append(True)  # a GPU does not go away: ask the driver once
        return
    reason = ""
    try:
        from numba.cuda.cudadrv.driver import driver

        text = str(getattr(driver, "initialization_error", None) or "").strip()
        reason = f" ({text.splitlines()[0].rstrip('.')})" if text else ""
    except Exception:  # the driver module moved: no reason, still one line
        pass
    raise RuntimeError(
        f"{fn}: backend='cuda' needs a CUDA GPU, and none is usable here{reason}; use "
        "backend='cpu', or set NUMBA_ENABLE_CUDASIM=1 to run the CUDA code on Numba's "
        "simulator"
    ) from None


def cuda_available() -> bool:
    """True when a real CUDA GPU is usable: False without one, when numba-cuda
    cannot compile kernels here (:func:`cuda_compiler_problem`), and under the CUDA
    simulator, where the CUDA backend still runs, slowly."""
    try:
        from numba import cuda
    except ImportError:
        return False
    if cuda.config.ENABLE_CUDASIM or not cuda.is_available():  # type: ignore[attr-defined]  # (see above)
        return False
    return cuda_compiler_problem() is None


def batch_norm_forward(
    x: AnyArray,
    gamma: AnyArray | None = None,
    beta: AnyArray | None = None,
    *,
    running_mean: AnyArray | None = None,
    running_var: AnyArray | None = None,
    num_batches_tracked: NDArray[np.int64] | None = None,
    training: bool = True,
    momentum: float | None = 0.1,
    eps: float = 1e-5,
    axis: int = 1,
    activation: str | None = None,
    out: AnyArray | None = None,
    backend: str | None = None,
    moments: Moments | None = None,
    residual: AnyArray | None = None,
) -> tuple[AnyArray, BatchNormContext]:
    """Batch-norm forward pass. Returns ``(y, ctx)``.

    Parameters
    ----------
    x : array, ndim >= 2, float16/32/64
        Channel axis ``axis`` (1 for NC, NCL, NCHW; -1 for channels-last).
    gamma, beta : (C,) arrays of the compute dtype (float32 for float16 input), or
        None for 1 and 0 (their gradients are then None). The backward reads gamma
        through the context: do not modify it in between (a C-contiguous gamma is kept
        by reference, any other is copied).
    running_mean, running_var : (C,) NumPy arrays, updated in place when
        ``training`` (then sharing no memory with each other, x, gamma, beta or
        residual); read (required) when not ``training``. Both or neither.
    num_batches_tracked : one-element int64 array holding a count >= 0,
        incremented in place in training mode when running statistics are tracked
        (also for an empty batch); required for ``momentum=None`` (cumulative average).
    training : batch statistics (True) or running statistics (False).
    momentum : float in [0, 1] or None, see the module docstring.
    eps : float > 0 added to the variance.
    activation : None or "relu" (fused, no extra pass over memory).
    residual : optional array added before the activation (a ResNet block's
        ``relu(bn(x) + identity)`` in one pass): same shape and dtype as ``x``
        (float16 computed in float32 like ``x``), same backend (a GPU array when
        ``x`` is one; with host ``x`` and ``backend="cuda"``, which copies ``x`` to
        the device, a host or a GPU array); any strides (copied
        to the canonical layout like ``x`` when needed). Kept by reference for the
        backward (do not modify it in between); ``out`` must not overlap it.
        :func:`batch_norm_backward` then also returns its gradient.
    out : optional preallocated output, same shape and dtype as ``x``, C-contiguous,
        writeable, without masked values, not overlapping ``x``, gamma, beta or the
        running statistics.
    backend : None (from the input type), "cpu" or "cuda".
    moments : optional :class:`~numbabn.stats.Moments` to normalise with instead of
        the batch's own statistics (training mode, either backend). This is how
        synchronized BN works: each rank computes ``moments(x)``, the ranks merge
        them exactly (Chan), and every rank normalises with the merged moments;
        the running statistics then see the global count. ``x`` may then hold no
        rows at all (an empty local batch). ``moments.count`` must be an int at
        least x's own count, ``m2`` >= 0; a count of 0 is an empty global batch.

    Notes
    -----
    CUDA backend (see :mod:`numbabn.backends.cuda`): GPU input (anything with
    ``__cuda_array_interface__``) is used without copying and ``y`` is a numba device
    array (or ``out``, a GPU array); NumPy input with ``backend="cuda"`` is copied
    to the device and back. Running statistics may be GPU arrays (updated in place
    on the device) or NumPy arrays (copied back in place after the kernels ran).

    On any error nothing is modified (running statistics, counter, ``out``). The
    exception is an interrupt: a KeyboardInterrupt (or another signal handler's
    exception) that arrives while the kernels run is raised once no thread is inside
    one, and may leave ``out`` partly written and the running statistics updated
    without the counter (they are updated before the normalising pass, the counter
    after it). torch.nn's layers have the same window the other way round: they count
    before their op. Reload the state from a checkpoint after an interrupted step.
    """
    fn = "batch_norm_forward"
    be: ModuleType  # either backend (the CUDA one has commit_running)
    fast = (
        _fast_args.forward_args(
            x,
            gamma,
            beta,
            running_mean,
            running_var,
            num_batches_tracked,
            training,
            momentum,
            eps,
            axis,
            activation,
            out,
        )
        if moments is None and residual is None and (backend is None or backend == "cpu")
        else None
    )
    if fast is not None:  # the common host case, accepted as the checks below would
        cx, g, b, rm, rv, nbt, relu, y = fast
        be, host, cres, stats, count = _cpu_backend, True, None, None, cx.count
        tracking = training and running_mean is not None
    else:
        be, host = _dispatch(fn, x, backend)
        training = check_bool(fn, "training", training)
        eps = check_eps(fn, eps)
        momentum = check_momentum(fn, momentum)
        relu = check_activation(fn, activation)
        if (running_mean is None) != (running_var is None):
            raise ValueError(f"{fn}: running_mean and running_var must be given together (got only one)")
        if not training and running_mean is None:
            raise ValueError(f"{fn}: training=False uses running statistics, but running_mean/running_var are None")
        cx = be.canonical(fn, "x", x, axis)
        cres = None
        if residual is not None:
            if not host and not is_device_array(residual):
                raise TypeError(f"{fn}: residual must be a GPU array like x, got {describe(residual)}")
            cres = B.check_residual(fn, be.canonical(fn, "residual", residual, cx.axis), cx)
        g, b, rm, rv, nbt = B.check_forward_params(
            fn, cx, gamma, beta, running_mean, running_var, num_batches_tracked, training, be.param
        )
        tracking = training and running_mean is not None
        if tracking:
            be.check_apart(
                fn,
                running_mean,
                running_var,
                "running_mean and running_var must not overlap (both are updated in place)",
            )
            for stat in (running_mean, running_var):
                for read in (x, gamma, beta, residual):
                    be.check_apart(
                        fn,
                        stat,
                        read,
                        "running_mean and running_var must not overlap x, gamma, beta or residual "
                        "(they are updated in place before those are read)",
                    )
            if num_batches_tracked is not None:
                for other in (x, gamma, beta, residual, running_mean, running_var):
                    be.check_apart(
                        fn,
                        num_batches_tracked,
                        other,
                        "num_batches_tracked must not overlap x, gamma, beta, residual or the running "
                        "statistics (it is incremented in place)",
                    )
        stats, count = B.check_moments(fn, moments, cx, training)
        B.check_training_batch(fn, count, cx.shape, training, tracking, momentum, nbt, moments is not None)
        y = be.output(
            fn,
            out,
            cx,
            host,
            (x,) if residual is None else (x, residual),
            "out must not overlap x (the backward pass reads x)"
            if residual is None
            else "out must not overlap x or residual (the backward pass reads them)",
        )
        if out is not None:
            for other in (gamma, beta, running_mean, running_var, num_batches_tracked if tracking else None):
                be.check_apart(
                    fn,
                    out,
                    other,
                    "out must not overlap gamma, beta, the running statistics or num_batches_tracked (the "
                    "forward reads or updates them)",
                )

    factor = B.resolve_momentum(tracking, momentum, nbt)
    if training and count == 0:
        # An empty batch and no statistics from elsewhere: nothing to normalise, the
        # running statistics stay (the call is still counted, as in PyTorch), and the
        # zero statistics give zero parameter gradients.
        mean, invstd, coef = be.zero_stats(cx.channels, compute_dtype(cx.dtype))
    else:
        # Not tracking in training means running_mean is None: the empty arrays the
        # parameter check returns tell the kernels not to update anything. An input
        # without values (a SyncBN rank with no rows) runs no pass over data, but the
        # same per-channel kernel as the other ranks: the same running statistics.
        mean, invstd, coef = be.forward(
            cx,
            g,
            b,
            rm,
            rv,
            factor,
            eps,
            training,
            relu,
            stats,
            count,
            y,
            (running_mean, running_var),
            **({} if cres is None else {"residual": cres.array}),
        )
    # Delivered before any state changes: on the CUDA backend the delivery copies back
    # or converts, which can fail, and its running-statistics update is only staged by
    # its forward (coef: the staged update), published here. CPU delivery cannot fail.
    result = be.deliver(y, cx.shape, cx.dtype, out, host)
    if be is not _cpu_backend:
        be.commit_running(coef)
        coef = None
    if tracking and nbt is not None:
        nbt += 1
    ctx = BatchNormContext(
        be.NAME,
        cx.layout,
        cx.shape,
        cx.axis,
        cx.dtype,
        cx.array,
        mean,
        invstd,
        g,
        b,
        gamma is not None,
        beta is not None,
        training,
        relu,
        count,
        coef,
        None if cres is None else cres.array,
        # CUDA: the caller's arrays, which cx.array, cres.array and g may be device
        # copies of, for the backward's out-overlap check (references; the CPU's are
        # views, and its g is gamma or a copy of it).
        () if be is _cpu_backend else (x, gamma) if residual is None else (x, gamma, residual),
    )
    return result, ctx


def batch_norm_backward(
    dy: AnyArray,
    ctx: BatchNormContext,
    *,
    out: AnyArray | None = None,
    allreduce: Callable[[NDArray[np.float64]], NDArray[np.float64]] | None = None,
    residual_out: AnyArray | None = None,
) -> tuple[AnyArray, ...]:
    """Batch-norm backward pass. Returns ``(dx, dgamma, dbeta)``, or
    ``(dx, dgamma, dbeta, dresidual)`` when the forward had a ``residual``.

    ``dy`` has the shape and dtype of the forward input; ``ctx`` is what
    :func:`batch_norm_forward` returned. Dispatches on ``ctx.backend``. ``dgamma``
    and ``dbeta`` are None where the forward had no gamma/beta. ``out`` optionally
    receives dx (C-contiguous, writeable, not overlapping ``dy``, the forward's input
    or residual, or gamma, which the context keeps). After a CUDA forward, GPU ``dy``
    gives device arrays and NumPy ``dy`` gives NumPy arrays.

    ``dresidual`` (residual forward only) is ``dy`` times the ReLU mask (with
    ``activation="relu"``, written by the same pass that computes dx), or a copy of
    ``dy`` without activation; ``residual_out`` optionally receives it (same rules
    as ``out``, not overlapping ``out``).

    ``allreduce`` (either backend): a callable that receives this process's (2, C)
    float64 sums ``[sum g, sum g*(x - mean)]`` and returns the sums over all ranks
    (e.g. an MPI Allreduce), for synchronized BN after a forward with ``moments=``.
    On the CUDA backend these sums (2*C values) are copied from the device for the
    call and the result copied back: the combination always runs on the host.
    """
    fn = "batch_norm_backward"
    fast = (
        _fast_args.backward_args(dy, ctx, out)
        if residual_out is None and (allreduce is None or callable(allreduce))
        else None
    )
    if fast is not None:  # the common host case, accepted as the checks below would
        cdy, dx = fast
        be, host, residual, dres = _cpu_backend, True, False, None
    else:
        if not isinstance(ctx, BatchNormContext):
            raise TypeError(f"{fn}: ctx must be the context returned by batch_norm_forward, got {describe(ctx)}")
        if allreduce is not None and not callable(allreduce):
            raise TypeError(f"{fn}: allreduce must be a callable or None, got {describe(allreduce)}")
        if ctx.backend == "cpu":
            be, host = _cpu_backend, True
        else:
            be, host = _get_backend(ctx.backend), not is_device_array(dy)
        cdy = be.canonical(fn, "dy", dy, ctx.axis)
        B.check_like_forward(fn, cdy, ctx)
        residual = ctx.residual is not None
        if residual_out is not None and not residual:
            raise ValueError(f"{fn}: residual_out is for the gradient of a residual, but the forward had none")
        # gamma too: the context keeps the caller's (a C-contiguous one by reference),
        # and a later backward on this context reads it again.
        inputs = ((dy, ctx.x) if not residual else (dy, ctx.x, ctx.residual)) + (ctx.gamma,) + ctx.sources
        dx = be.output(
            fn,
            out,
            cdy,
            host,
            inputs,
            "out must not overlap dy, the forward input or gamma"
            if not residual
            else "out must not overlap dy, the forward input or residual, or gamma",
        )
        dres = None
        if residual:
            dres = be.output(
                fn,
                residual_out,
                cdy,
                host,
                inputs + ((out,) if out is not None else ()),
                "residual_out must not overlap dy, out, the forward input or residual, or gamma",
                "residual_out",
            )
    partials = be.grad_sums(cdy, ctx)
    if allreduce is not None:
        sums = be.pack_grad_sums(partials)
        partials = be.unpack_grad_sums(B.check_sums(fn, allreduce(sums), sums.shape))
    if not residual:
        dgamma, dbeta = be.grad_apply(cdy, ctx, partials, dx, host)
        return (
            be.deliver(dx, ctx.shape, ctx.dtype, out, host),
            dgamma if ctx.has_gamma else None,
            dbeta if ctx.has_beta else None,
        )
    dgamma, dbeta = be.grad_apply(cdy, ctx, partials, dx, host, dres)
    if not ctx.relu:  # no mask: the residual's gradient is dy itself
        be.copy(cdy.array, dres)
    return (
        be.deliver(dx, ctx.shape, ctx.dtype, out, host),
        dgamma if ctx.has_gamma else None,
        dbeta if ctx.has_beta else None,
        be.deliver(dres, ctx.shape, ctx.dtype, residual_out, host),
    )


def moments(x: AnyArray, axis: int = 1, *, backend: str | None = None) -> Moments:
    """Per-channel :class:`~numbabn.stats.Moments` (count, mean, m2) of ``x``.

    One pass per chunk over values shifted by the chunk's first value (float64 sums
    of ``d`` and ``d*d``, whose cancellation costs at most a factor of the chunk's
    count in float64 rounding: see numbabn/kernels/cpu.py), chunks merged with
    Chan et al., float64. ``axis`` names the channel axis; ``backend`` as for
    :func:`batch_norm_forward`. An input
    with no values per channel gives ``Moments.empty(C)``. On the CUDA backend:
    Welford per thread, Chan merges per block and across blocks; NumPy results.
    ``m2`` is clipped at 0 (a sum of squares; rounding must not make it negative,
    which :func:`~numbabn.merge_moments` and ``moments=`` refuse).
    """
    fn = "moments"
    be, _ = _dispatch(fn, x, backend)
    cx = be.canonical(fn, "x", x, axis)
    if cx.count == 0:
        return Moments.empty(cx.channels)
    mean, m2 = be.moments(cx)
    np.maximum(m2, 0.0, out=m2)
    return Moments(cx.count, mean, m2)
