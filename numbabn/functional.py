"""Public functional batch norm: the only place that dispatches to kernels.

Data flows one way: validation -> canonical layout -> kernel -> result.

Formulas (per channel c over its m values; biased variance normalises)::

    mean   = (1/m) sum x_i
    var    = (1/m) sum (x_i - mean)^2
    invstd = 1 / sqrt(var + eps)
    y_i    = gamma * (x_i - mean) * invstd + beta        (then max(y, 0) if relu)

Eval mode uses the running statistics: ``a = gamma*invstd_running``,
``y = a*(x - running_mean) + beta``. (DESIGN.md suggests folding this into one FMA
``a*x + b``; the kernels subtract first, which costs nothing in a memory-bound loop
and keeps float64 outputs accurate when ``|mean| >> std``.)

Running statistics (PyTorch's convention), updated in place in training mode::

    running_mean <- (1 - momentum)*running_mean + momentum*mean
    running_var  <- (1 - momentum)*running_var  + momentum*var*m/(m - 1)   (unbiased)

``momentum=None`` is the cumulative average (momentum_t = 1/num_batches_tracked,
Ioffe & Szegedy's Algorithm 2). Keras' ``momentum=0.99`` is our ``momentum=0.01``.

Backward (Santurkar et al. 2018, Fact C.1), with g = dy (times the ReLU mask)::

    dbeta  = sum g_i
    dgamma = sum g_i * xhat_i
    dx_i   = gamma*invstd/m * (m*g_i - dbeta - xhat_i*dgamma)      (training)
    dx_i   = gamma*invstd_running * g_i                            (eval)

NaN and Inf propagate: a NaN in a channel makes that channel's statistics and
outputs NaN (nothing is silently dropped). Float32 inputs give float32 outputs
(statistics accumulate in float64 internally); float16 is computed in float32
(float32 gamma, beta and running statistics; float16 output), as PyTorch's CPU
batch norm does. Big-endian input is converted to the native byte order (the
output is native); masked arrays with masked values are refused.

Empty batches (PyTorch's semantics): an input without values (N = 0, or a
zero-length spatial axis) gives an empty output and, in the backward, an empty
``dx`` and zero ``dgamma``/``dbeta``; the running statistics are left as they were
(the counter still counts the call, as ``torch.nn.BatchNorm`` modules do). No
kernel runs for it. Exactly one value per channel in training is an error, as in
PyTorch.
"""
from dataclasses import dataclass

import numpy as np

from . import _validation as V
from . import config
from .kernels import cpu_driver
from .stats import Moments

_BACKENDS = ("cpu", "cuda")


@dataclass(eq=False)
class BatchNormContext:
    """What :func:`batch_norm_backward` needs from the forward pass.

    ``x`` is the canonical (compute-dtype) view of the input, kept by reference: do
    not modify the input in place between forward and backward. ``mean``/``invstd``
    (float64, shape (C,)) are the statistics the forward used: batch statistics in
    training mode, running statistics in eval mode.
    """

    backend: str
    layout: str
    shape: tuple
    axis: int
    dtype: np.dtype
    x: object
    mean: object
    invstd: object
    gamma: object
    beta: object
    has_gamma: bool
    has_beta: bool
    training: bool
    relu: bool
    count: int
    coef: object = None   # CPU: the forward's (4, C) element coefficients (kernels.cpu)

    def __repr__(self):
        # The arrays (the saved input above all) are left out: a repr is one short line.
        return (f"BatchNormContext(backend={self.backend!r}, layout={self.layout!r}, shape={tuple(self.shape)}, "
                f"axis={self.axis}, dtype={np.dtype(self.dtype).name}, channels={self.mean.shape[0]}, "
                f"count={self.count}, training={self.training}, relu={self.relu}, "
                f"gamma={'given' if self.has_gamma else 'None'}, beta={'given' if self.has_beta else 'None'})")


def _choose_backend(fn, x, backend):
    if backend is None and type(x) is np.ndarray:
        return "cpu"
    if backend is None:
        backend = "cuda" if V.is_device_array(x) else "cpu"
    elif backend not in _BACKENDS:
        raise ValueError(f"{fn}: backend must be None, 'cpu' or 'cuda', got {backend!r}")
    if backend == "cuda":
        _check_cuda_usable(fn)
    return backend


_cuda_usable = []


def _check_cuda_usable(fn):
    """numbabn's one-line error when the CUDA backend cannot run here (instead of
    Numba's multi-line ``CudaSupportError`` from the first device allocation). The
    CUDA simulator (``NUMBA_ENABLE_CUDASIM=1``) counts as usable."""
    try:
        from numba import cuda
    except ImportError as exc:        # numba-cuda missing or broken
        raise RuntimeError(f"{fn}: backend='cuda' needs numba-cuda, which cannot be imported "
                           f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}); "
                           "use backend='cpu'") from None
    if _cuda_usable or cuda.config.ENABLE_CUDASIM:
        return
    if cuda.is_available():
        _cuda_usable.append(True)     # a GPU does not go away: ask the driver once
        return
    reason = ""
    try:
        from numba.cuda.cudadrv.driver import driver
        text = str(getattr(driver, "initialization_error", None) or "").strip()
        reason = f" ({text.splitlines()[0].rstrip('.')})" if text else ""
    except Exception:                 # the driver module moved: no reason, still one line
        pass
    raise RuntimeError(f"{fn}: backend='cuda' needs a CUDA GPU, and none is usable here{reason}; use "
                       "backend='cpu', or set NUMBA_ENABLE_CUDASIM=1 to run the CUDA code on Numba's simulator") from None


def _cuda():
    """The CUDA glue, imported on first use: it imports numba.cuda."""
    from . import _cuda_backend
    return _cuda_backend


def cuda_available():
    """True when a real CUDA GPU is usable (False without one, and under the
    CUDA simulator, where the CUDA backend still runs, slowly)."""
    try:
        from numba import cuda
    except ImportError:
        return False
    return not cuda.config.ENABLE_CUDASIM and cuda.is_available()


def batch_norm_forward(x, gamma=None, beta=None, *, running_mean=None, running_var=None,
                       num_batches_tracked=None, training=True, momentum=0.1, eps=1e-5,
                       axis=1, activation=None, out=None, backend=None, moments=None):
    """Batch-norm forward pass. Returns ``(y, ctx)``.

    Parameters
    ----------
    x : array, ndim >= 2, float16/32/64
        Channel axis ``axis`` (1 for NC, NCL, NCHW; -1 for channels-last).
    gamma, beta : (C,) arrays of the compute dtype (float32 for float16 input), or
        None for 1 and 0 (their gradients are then None).
    running_mean, running_var : (C,) NumPy arrays, updated in place when
        ``training``; read (required) when not ``training``. Both or neither.
    num_batches_tracked : one-element int64 array holding a count >= 0,
        incremented in place in training mode when running statistics are tracked
        (also for an empty batch); required for ``momentum=None`` (cumulative average).
    training : batch statistics (True) or running statistics (False).
    momentum : float in [0, 1] or None, see the module docstring.
    eps : float > 0 added to the variance.
    activation : None or "relu" (fused, no extra pass over memory).
    out : optional preallocated output, same shape and dtype as ``x``, C-contiguous,
        not overlapping ``x``, gamma, beta or the running statistics.
    backend : None (from the input type), "cpu" or "cuda".
    moments : optional :class:`~numbabn.stats.Moments` to normalise with instead of
        the batch's own statistics (training mode, CPU backend). This is how
        synchronized BN works: each rank computes ``moments(x)``, the ranks merge
        them exactly (Chan), and every rank normalises with the merged moments;
        the running statistics then see the global count. ``x`` may then hold no
        rows at all (an empty local batch). ``moments.count`` must be an int at
        least x's own count, ``m2`` >= 0; a count of 0 is an empty global batch.

    CUDA backend (see :mod:`numbabn._cuda_backend`): GPU input (anything with
    ``__cuda_array_interface__``) is used without copying and ``y`` is a numba device
    array (or ``out``, a GPU array); NumPy input with ``backend="cuda"`` is copied
    to the device and back. Running statistics may be GPU arrays (updated in place
    on the device) or NumPy arrays (copied back in place after the kernels ran).

    On any error nothing is modified (running statistics, counter, ``out``).
    """
    fn = "batch_norm_forward"
    backend = _choose_backend(fn, x, backend)
    training = V.check_bool(fn, "training", training)
    eps = V.check_eps(fn, eps)
    momentum = V.check_momentum(fn, momentum)
    relu = V.check_activation(fn, activation)
    if (running_mean is None) != (running_var is None):
        raise ValueError(f"{fn}: running_mean and running_var must be given together (got only one)")
    if not training and running_mean is None:
        raise ValueError(f"{fn}: training=False uses running statistics, but running_mean/running_var are None")
    if moments is not None and backend == "cuda":
        raise NotImplementedError(f"{fn}: moments= (synchronized statistics) is only supported on the CPU backend")
    if backend == "cuda":
        return _cuda().forward(fn, x, gamma, beta, running_mean, running_var, num_batches_tracked,
                               training=training, momentum=momentum, eps=eps, axis=axis,
                               relu=relu, out=out)

    cx = V.canonical_host(fn, "x", x, axis)
    dt = V.compute_dtype(cx.dtype)
    g, b, rm, rv, nbt = V.check_forward_params(fn, cx, gamma, beta, running_mean, running_var,
                                               num_batches_tracked, training)
    tracking = training and running_mean is not None
    if tracking:
        V.check_running_stats_apart(fn, running_mean, running_var)
    stats, count = V.check_moments(fn, moments, cx, training)
    V.check_training_batch(fn, count, cx.shape, training, tracking, momentum, nbt)
    if out is not None:
        V.check_out(fn, "out", out, cx.shape, cx.dtype)
        if np.may_share_memory(out, x):
            raise ValueError(f"{fn}: out must not overlap x (the backward pass reads x)")
        V.check_no_overlap(fn, out, (gamma, beta, running_mean, running_var),
                           "gamma, beta or the running statistics (the forward reads or updates them)")

    factor = V.resolve_momentum(tracking, momentum, nbt)
    if out is not None and cx.dtype == dt:
        y = out
    else:
        y = np.empty(cx.shape, dt)
    if training and count == 0:
        # An empty batch and no statistics from elsewhere: nothing to normalise, the
        # running statistics stay (the call is still counted, as in PyTorch), and the
        # zero statistics give zero parameter gradients.
        C = cx.channels
        mean, invstd, coef = np.zeros(C), np.zeros(C), np.zeros((4, C), dt)
    else:
        # Not tracking in training means running_mean is None: the empty arrays the
        # parameter check returns tell the kernel not to update anything. An input
        # without values (a SyncBN rank with no rows) runs no pass over data, but the
        # same coefficient kernel as the other ranks: the same running statistics.
        mean, invstd, coef = cpu_driver.forward(cx.array, cx.layout, g, b, rm, rv, factor, eps, training,
                                                relu, stats, count, y.reshape(cx.array.shape), config.CHUNK)
    if tracking and nbt is not None:
        nbt += 1
    if cx.dtype != dt:
        if out is None:
            y = y.astype(cx.dtype)
        else:
            out[...] = y
            y = out
    ctx = BatchNormContext("cpu", cx.layout, cx.shape, cx.axis, cx.dtype, cx.array, mean, invstd,
                           g, b, gamma is not None, beta is not None, training, relu, count, coef)
    return y, ctx


def batch_norm_backward(dy, ctx, *, out=None, allreduce=None):
    """Batch-norm backward pass. Returns ``(dx, dgamma, dbeta)``.

    ``dy`` has the shape and dtype of the forward input; ``ctx`` is what
    :func:`batch_norm_forward` returned. Dispatches on ``ctx.backend``. ``dgamma``
    and ``dbeta`` are None where the forward had no gamma/beta. ``out`` optionally
    receives dx (same rules as the forward's ``out``). After a CUDA forward, GPU ``dy``
    gives device arrays and NumPy ``dy`` gives NumPy arrays.

    ``allreduce`` (CPU backend): a callable that receives this process's (2, C)
    float64 sums ``[sum g, sum g*(x - mean)]`` and returns the sums over all ranks
    (e.g. an MPI Allreduce), for synchronized BN after a forward with ``moments=``.
    """
    fn = "batch_norm_backward"
    if not isinstance(ctx, BatchNormContext):
        raise TypeError(f"{fn}: ctx must be the context returned by batch_norm_forward, got {V.describe(ctx)}")
    if allreduce is not None and not callable(allreduce):
        raise TypeError(f"{fn}: allreduce must be a callable or None, got {V.describe(allreduce)}")
    if allreduce is not None and ctx.backend == "cuda":
        raise NotImplementedError(f"{fn}: allreduce= is only supported on the CPU backend")
    if ctx.backend == "cuda":
        return _cuda().backward(fn, dy, ctx, out)
    cdy = V.canonical_host(fn, "dy", dy, ctx.axis)
    V.check_like_forward(fn, cdy, ctx)
    dt = V.compute_dtype(ctx.dtype)
    if out is not None:
        V.check_out(fn, "out", out, ctx.shape, ctx.dtype)
        if np.may_share_memory(out, ctx.x) or np.may_share_memory(out, dy):
            raise ValueError(f"{fn}: out must not overlap dy or the forward input")
    dx = out if out is not None and ctx.dtype == dt else np.empty(ctx.shape, dt)
    combine = None
    if allreduce is not None:
        def combine(sums):
            return V.check_sums(fn, allreduce(sums), sums.shape)
    dgamma, dbeta = cpu_driver.backward(cdy.array, ctx.x, ctx.layout, ctx.coef, ctx.invstd, ctx.gamma,
                                        ctx.training, ctx.relu, ctx.count, combine,
                                        dx.reshape(ctx.x.shape), config.CHUNK)
    if ctx.dtype != dt:
        if out is None:
            dx = dx.astype(ctx.dtype)
        else:
            out[...] = dx
            dx = out
    return dx, dgamma if ctx.has_gamma else None, dbeta if ctx.has_beta else None


def moments(x, axis=1, *, backend=None):
    """Per-channel :class:`~numbabn.moments.Moments` (count, mean, m2) of ``x``.

    Exact two-pass statistics per chunk merged with Chan et al., float64. An input
    with no values per channel gives ``Moments.empty(C)``. On the CUDA backend:
    Welford per thread, Chan merges per block and across blocks; NumPy results.
    ``m2`` is clipped at 0 (a sum of squares; rounding must not make it negative,
    which :func:`~numbabn.merge_moments` and ``moments=`` refuse).
    """
    fn = "moments"
    backend = _choose_backend(fn, x, backend)
    if backend == "cuda":
        m = _cuda().moments(fn, x, axis)
    else:
        cx = V.canonical_host(fn, "x", x, axis)
        if cx.count == 0:
            return Moments.empty(cx.channels)
        mean, m2 = cpu_driver.batch_moments(cx.array, cx.layout, config.CHUNK)
        m = Moments(cx.count, mean, m2)
    np.maximum(m.m2, 0.0, out=m.m2)
    return m
