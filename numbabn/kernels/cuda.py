"""CUDA batch-norm kernels (``numba.cuda``) on the canonical layouts.

Imported lazily (only by :mod:`numbabn.backends.cuda`), because
importing ``numba.cuda`` initialises the CUDA bindings.

Layouts. Every kernel sees ``x`` as a C-contiguous device array of shape
``(N, C, L)``: the ``ncl`` layout as it is, and the channels-last ``mc`` layout
``(M, C)`` viewed as ``(M, C, 1)`` (a free reshape). Channel ``c`` holds the
``m = N*L`` values ``x[:, c, :]``, numbered ``j = n*L + l``. One kernel body per
algorithm serves both layouts; only the thread mapping differs (see :func:`plan`).
float32 and float64 inputs; every per-element computation is done in float64 and
rounded once on store, so float32 outputs are within float32 rounding of the
float64 reference.

Work decomposition (chosen on the host from the shape alone, see :func:`plan`):
a block holds ``G`` channel groups of ``W`` threads ("lanes"); each group works on
one channel, and a channel's ``m`` values are cut into ``S`` consecutive *splits*
of ``span`` values, one block each. Many small channels -> several channels per
block (``G > 1``, ``S = 1``); few huge channels -> one channel over several blocks
(``S > 1``). A thread always handles values of exactly one channel.

Statistics are deterministic (no float atomics, fixed orders throughout):

1. thread: Welford over its values (lane, lane + W, ...) of the split, float64;
2. block: tree merge of the lanes' (count, mean, M2) in shared memory with Chan
   et al.'s formula (lane i absorbs lane i + s for s = ..., 2, 1);
3. grid: lane 0 stores the split's (mean, M2) in ``(C, S)`` partial arrays, and a
   second small kernel (one thread per channel) merges the S partials in split order.

The backward reduces plain float64 sums (sum g, sum g*(x - mean)) the same way.
The tree needs only ``syncthreads`` and dynamic shared memory, so the CUDA
simulator runs it (no warp shuffles, grid sync or launch bounds).

Formulas (per channel, ``g`` = upstream gradient times the ReLU mask if fused)::

    mean = (1/m) sum x ;  var = (1/m) sum (x - mean)^2 ;  invstd = 1/sqrt(var + eps)
    y    = a*(x - mean) + beta,  a = gamma*invstd              (then max(y, 0) if relu)
    running_mean <- (1-momentum)*running_mean + momentum*mean
    running_var  <- (1-momentum)*running_var  + momentum*var*m/(m-1)
    dbeta = sum g ;  dgamma = sum g*xhat,  xhat = (x - mean)*invstd
    dx   = A*g + B*x + D:  A = gamma*invstd, B = -A*invstd*dgamma/m,
                           D = -A*dbeta/m - B*mean                 (training)
                           A = gamma*invstd, B = D = 0             (eval)

Residual fusion (``y = act(a*(x - mean) + beta + r)``): the apply and gradient kernels take the
residual ``res`` (and the backward its gradient output ``dres``) as a device array
of x's shape, or an empty array of x's dtype without one (the host wrappers take
``None`` and pass :func:`_absent`). A kernel argument cannot be ``None``: the
simulator accepts it, but a real GPU's launch refuses it (``NotImplementedError:
(none, None)``). So the residual is a branch on ``res.size``, the same for every
thread of a launch, and one compiled kernel serves both cases (no extra
specialisation to compile). With ReLU, ``dres = g`` (the masked gradient).

Memory traffic: training forward 3S, eval forward 2S, backward 5S (S = bytes of x).
"""

import math
from dataclasses import dataclass

import numpy as np
from numba import cuda, float64

# Launch tuning. Read on the host only and derived from the shape alone, so the
# reduction tree -- and therefore every result bit -- is the same on any GPU.
TARGET_BLOCKS = 1024  # ~8 resident blocks of 256 threads on each of an H100's 132 SMs
MIN_PER_THREAD = 8  # values a thread reduces before its partial is merged
WARP = 32
MAX_THREADS = 1024  # CUDA's limit on threads per block


def _cdiv(a, b):
    return -(-a // b)


def _pow2_ceil(v):
    return 1 << max(0, int(v) - 1).bit_length()


@dataclass(frozen=True)
class Plan:
    """Launch configuration of the element-wise and reduction kernels.

    ``G`` channels per block, ``W`` lanes per channel (``threads = G*W``);
    ``cfast``: thread ids run over channels first (the channels-last layout, where
    adjacent channels are adjacent in memory) instead of lanes first; ``S`` splits
    per channel of ``span`` values each (the last may be shorter); ``blocks`` in all.
    """

    G: int
    W: int
    cfast: bool
    S: int
    span: int
    blocks: int
    threads: int


def plan(C, m, L, threads):
    """Choose the :class:`Plan` for ``C`` channels of ``m`` values, rows of ``L``.

    ``threads`` is the block size cap (``numbabn.config.CUDA_THREADS``). Lanes per
    channel grow with ``m`` (MIN_PER_THREAD values each) up to a full block, and
    the rest of the block takes further channels (channels-last: a row of up to
    ``threads`` channels, or a warp-wide tile). Then each channel is split into
    ``S`` blocks so that about TARGET_BLOCKS blocks run, as long as every thread
    keeps at least MIN_PER_THREAD values. Depends on the shape only.
    """
    if not 1 <= threads <= MAX_THREADS:
        raise ValueError(f"CUDA threads per block must be in [1, {MAX_THREADS}], got {threads}")
    if L == 1:
        # Channels-last: consecutive threads take consecutive channels of one row
        # (coalesced); when C does not fit, a warp-wide tile of channels.
        G = C if C <= threads else min(threads, WARP)
        W = max(1, min(threads // G, _cdiv(m, MIN_PER_THREAD)))
    else:
        # (N, C, L): consecutive threads take consecutive values of a row.
        W = min(threads, _pow2_ceil(max(1, _cdiv(m, MIN_PER_THREAD))))
        G = max(1, min(C, threads // W))
    tiles = _cdiv(C, G)
    S = max(1, min(_cdiv(TARGET_BLOCKS, tiles), _cdiv(m, W * MIN_PER_THREAD)))
    span = _cdiv(m, S)
    if span:
        S = _cdiv(m, span)  # no empty split
    return Plan(G, W, L == 1, S, span, tiles * S, G * W)


# ---------------------------------------------------------------- device helpers


@cuda.jit(device=True)
def _coords(G, W, cfast, S):
    """(channel, split, lane) of this thread; the channel may be >= C in the last tile."""
    t = cuda.threadIdx.x
    if cfast:
        g = t % G
        lane = t // G
    else:
        lane = t % W
        g = t // W
    tile = cuda.blockIdx.x // S
    return tile * G + g, cuda.blockIdx.x - tile * S, lane


@cuda.jit(device=True)
def _thread_range(c, C, split, lane, m, L, W, span):
    """This thread's values j = start+lane, start+lane+W, ... < stop of its split.

    Returns the first (n, l), the (n, l) step for j += W, and how many values.
    Stepping (n, l) incrementally avoids a 64-bit division per element.
    """
    start = split * span
    stop = min(start + span, m)
    j = start + lane
    count = 0
    if c < C and j < stop:
        count = (stop - j + W - 1) // W
    n = j // L
    dn = W // L
    return n, j - n * L, dn, W - dn * L, count


@cuda.jit(device=True)
def _advance(n, l, dn, dl, L):
    l += dl
    n += dn
    if l >= L:
        l -= L
        n += 1
    return n, l


@cuda.jit(device=True)
def _chan(na, ma, qa, nb, mb, qb):
    """Merge (count, mean, M2) b into a (Chan et al.); an empty b changes nothing.
    Where one mean is infinite or NaN (data holding infinities), the weighted mean
    keeps +-inf (inf + (finite - inf) would be NaN) and M2 is NaN, as PyTorch's."""
    if nb == 0.0:
        return na, ma, qa
    n = na + nb
    d = mb - ma
    f = nb / n
    if abs(d) < math.inf:
        return n, ma + d * f, qa + qb + d * d * na * f
    return n, ma * (na / n) + mb * f, math.nan


@cuda.jit(device=True)
def _block_reduce(sh, t, lane, W, step, chan):
    """Tree-reduce the W lanes of each channel group in dynamic shared memory.

    ``sh`` holds one record per thread in fields of ``blockDim`` slots each:
    (count, mean, M2) merged with Chan's formula when ``chan``, else two sums.
    Lane ``i`` of a group lives at slot ``t + (i - lane)*step``. Afterwards lane 0
    holds the group's result. Every thread of the block must call this (it syncs).
    """
    T = cuda.blockDim.x
    cuda.syncthreads()
    s = 1
    while s < W:
        s *= 2
    s //= 2
    while s > 0:
        if lane < s and lane + s < W:
            o = t + s * step
            if chan:
                n, mu, q = _chan(sh[t], sh[T + t], sh[2 * T + t], sh[o], sh[T + o], sh[2 * T + o])
                sh[t] = n
                sh[T + t] = mu
                sh[2 * T + t] = q
            else:
                sh[t] += sh[o]
                sh[T + t] += sh[T + o]
        cuda.syncthreads()
        s //= 2


@cuda.jit(device=True)
def _merged(pmean, pm2, c, span, m):
    """Merge channel c's split partials in split order -> (mean, M2)."""
    n = 0.0
    mu = 0.0
    q = 0.0
    for k in range(pmean.shape[1]):
        n, mu, q = _chan(n, mu, q, float64(min(span, m - k * span)), pmean[c, k], pm2[c, k])
    return mu, q


@cuda.jit(device=True)
def _affine(c, mean, invstd, gamma, beta):
    """(a, m, b) with y = a*(x - m) + b; empty gamma/beta mean 1 and 0.

    The mean is subtracted first, as the CPU kernels do: ``a*x + (b - a*m)`` cancels
    when |mean| >> std (float64 eval with mean 1e8: 2.6e-8 off, against 1e-16).
    """
    a = invstd[c]
    if gamma.size > 0:
        a *= float64(gamma[c])
    b = float64(beta[c]) if beta.size > 0 else 0.0
    return a, mean[c], b


@cuda.jit(device=True)
def _pre(xv, a, m, b, res, n, c, l):
    """a*(x - m) + b (+ res[n, c, l] unless ``res`` is empty): the value the fused
    ReLU sees. The explicit fma fixes the rounding, so the backward's recomputed
    ReLU mask matches the forward's bit for bit in any kernel."""
    v = cuda.fma(xv - m, a, b)
    if res.size > 0:
        v += float64(res[n, c, l])
    return v


@cuda.jit(device=True)
def _masked_grad(gv, xv, a, m, b, relu, res, n, c, l):
    """The upstream gradient in float64, zero where the fused ReLU's output is <= 0
    (PyTorch's mask: a NaN output passes the gradient)."""
    if relu and _pre(xv, a, m, b, res, n, c, l) <= 0.0:
        return 0.0
    return float64(gv)


# ---------------------------------------------------------------- kernels


@cuda.jit
def _stats_kernel(x, G, W, cfast, S, span, pmean, pm2):
    """Partial (mean, M2) per (channel, split) of (N, C, L) ``x`` into (C, S) arrays.

    Dynamic shared memory: 3 float64 per thread.
    """
    N, C, L = x.shape
    c, split, lane = _coords(G, W, cfast, S)
    n, l, dn, dl, count = _thread_range(c, C, split, lane, N * L, L, W, span)
    k = 0.0
    mu = 0.0
    q = 0.0
    for _ in range(count):
        v = float64(x[n, c, l])
        k += 1.0
        d = v - mu
        if abs(d) < math.inf:
            mu += d / k
            q += d * (v - mu)
        else:  # an infinity or NaN: as in _chan
            mu = mu * ((k - 1.0) / k) + v / k
            q = math.nan
        n, l = _advance(n, l, dn, dl, L)
    t = cuda.threadIdx.x
    T = cuda.blockDim.x
    sh = cuda.shared.array(0, float64)
    sh[t] = k
    sh[T + t] = mu
    sh[2 * T + t] = q
    _block_reduce(sh, t, lane, W, G if cfast else 1, True)
    if lane == 0 and c < C:
        pmean[c, split] = sh[T + t]
        pm2[c, split] = sh[2 * T + t]


@cuda.jit
def _moments_kernel(pmean, pm2, span, m, mean, m2):
    """(mean, M2) per channel from the split partials; one thread per channel."""
    c = cuda.grid(1)
    if c < mean.size:
        mu, q = _merged(pmean, pm2, c, span, m)
        mean[c] = mu
        m2[c] = q


@cuda.jit
def _forward_stats_kernel(pmean, pm2, span, m, training, running_mean, running_var, momentum, eps, mean, invstd):
    """Per channel (one thread each): the (mean, invstd) the forward normalises with.

    Training: batch statistics merged from the partials, and the running statistics
    updated in place when non-empty (momentum already resolved on the host).
    Eval: the running statistics (partials unused).
    """
    c = cuda.grid(1)
    if c >= mean.size:
        return
    if training:
        mu, q = _merged(pmean, pm2, c, span, m)
        var = q / m
        if running_mean.size > 0:
            keep = 1.0 - momentum
            running_mean[c] = keep * float64(running_mean[c]) + momentum * mu
            running_var[c] = keep * float64(running_var[c]) + momentum * var * (m / (m - 1.0))
    else:
        mu = float64(running_mean[c])
        var = float64(running_var[c])
    mean[c] = mu
    # Spelled out for a running variance + eps <= 0 (a corrupted checkpoint): NaN or inf
    # as on the CPU and on a GPU, where Numba's CUDA simulator raised Python's math
    # domain error or ZeroDivisionError.
    v = var + eps
    invstd[c] = 1.0 / math.sqrt(v) if v > 0.0 else (math.inf if v == 0.0 else math.nan)


@cuda.jit
def _apply_kernel(x, res, mean, invstd, gamma, beta, relu, G, W, cfast, S, span, y):
    """y = a*(x - mean) + beta (+ res) per channel (then ReLU if relu: y < 0 -> 0, NaN
    passes); same layout as ``x``."""
    N, C, L = x.shape
    c, split, lane = _coords(G, W, cfast, S)
    n, l, dn, dl, count = _thread_range(c, C, split, lane, N * L, L, W, span)
    if count == 0:
        return
    a, m, b = _affine(c, mean, invstd, gamma, beta)
    for _ in range(count):
        v = _pre(float64(x[n, c, l]), a, m, b, res, n, c, l)
        # not max(v, 0.0): compiled for a GPU it is fmax, which turns NaN into 0;
        # PyTorch's ReLU (and the CPU kernels) pass NaN and keep -0.0
        y[n, c, l] = 0.0 if relu and v < 0.0 else v
        n, l = _advance(n, l, dn, dl, L)


@cuda.jit
def _grad_sums_kernel(dy, x, res, mean, invstd, gamma, beta, relu, G, W, cfast, S, span, psg, psgx):
    """Partial sums of g and g*(x - mean) per (channel, split) into (C, S) arrays.

    Dynamic shared memory: 2 float64 per thread.
    """
    N, C, L = x.shape
    c, split, lane = _coords(G, W, cfast, S)
    n, l, dn, dl, count = _thread_range(c, C, split, lane, N * L, L, W, span)
    s0 = 0.0
    s1 = 0.0
    if count > 0:
        a, mu, b = _affine(c, mean, invstd, gamma, beta)
        for _ in range(count):
            xv = float64(x[n, c, l])
            g = _masked_grad(dy[n, c, l], xv, a, mu, b, relu, res, n, c, l)
            s0 += g
            s1 += g * (xv - mu)
            n, l = _advance(n, l, dn, dl, L)
    t = cuda.threadIdx.x
    T = cuda.blockDim.x
    sh = cuda.shared.array(0, float64)
    sh[t] = s0
    sh[T + t] = s1
    _block_reduce(sh, t, lane, W, G if cfast else 1, False)
    if lane == 0 and c < C:
        psg[c, split] = sh[t]
        psgx[c, split] = sh[T + t]


@cuda.jit
def _grad_coeffs_kernel(psg, psgx, m, mean, invstd, gamma, training, dgamma, dbeta, A, B, D):
    """Per channel (one thread each): sum the partials in split order, then
    dgamma = invstd*sum g*(x - mean), dbeta = sum g and the coefficients of
    dx = A*g + B*x + D (see the module docstring)."""
    c = cuda.grid(1)
    if c >= mean.size:
        return
    sg = 0.0
    sgx = 0.0
    for k in range(psg.shape[1]):
        sg += psg[c, k]
        sgx += psgx[c, k]
    s = invstd[c]
    dg = sgx * s
    a = s
    if gamma.size > 0:
        a *= float64(gamma[c])
    b = 0.0
    d = 0.0
    if training:
        b = -a * s * dg / m
        d = -a * sg / m - b * mean[c]
    dgamma[c] = dg
    dbeta[c] = sg
    A[c] = a
    B[c] = b
    D[c] = d


@cuda.jit
def _grad_apply_kernel(dy, x, res, mean, invstd, gamma, beta, relu, A, B, D, G, W, cfast, S, span, dx, dres):
    """dx = A*g + B*x + D per channel (and dres = g unless ``dres`` is empty); same layout as ``x``."""
    N, C, L = x.shape
    c, split, lane = _coords(G, W, cfast, S)
    n, l, dn, dl, count = _thread_range(c, C, split, lane, N * L, L, W, span)
    if count == 0:
        return
    a, m, b = _affine(c, mean, invstd, gamma, beta)
    ac = A[c]
    bc = B[c]
    dc = D[c]
    for _ in range(count):
        xv = float64(x[n, c, l])
        g = _masked_grad(dy[n, c, l], xv, a, m, b, relu, res, n, c, l)
        # without the x term where B is exactly 0 (eval): dx does not depend on x, as
        # in PyTorch, and an infinite or NaN x gives a finite dx instead of 0*inf
        dx[n, c, l] = ac * g + (bc * xv if bc != 0.0 else 0.0) + dc
        if dres.size > 0:
            dres[n, c, l] = g
        n, l = _advance(n, l, dn, dl, L)


@cuda.jit
def _cast_kernel(src, dst):
    """dst[i] = src[i] over 1-D arrays, converting the dtype (float16 <-> float32)."""
    for i in range(cuda.grid(1), src.size, cuda.gridsize(1)):
        dst[i] = src[i]


# ---------------------------------------------------------------- host wrappers


def _absent(a, like):
    """``a``, or for ``None`` an empty device array of ``like``'s dtype and rank: the
    kernels' "no residual" (a launch cannot take ``None``; see the module docstring)."""
    return cuda.device_array((0,) * like.ndim, like.dtype) if a is None else a


def _geometry(p):
    """The plan's (G, W, cfast, S, span), in the order the data-pass kernels take them."""
    return p.G, p.W, p.cfast, p.S, p.span


def _per_channel(C, threads):
    """Launch configuration for the one-thread-per-channel kernels."""
    t = min(C, threads)
    return _cdiv(C, t), t


def _partials(C, p):
    return cuda.device_array((C, p.S)), cuda.device_array((C, p.S))


def _plan_for(x, threads):
    N, C, L = x.shape
    return plan(C, N * L, L, threads)


def _stats(x, p):
    """Split partials (pmean, pm2), shape (C, S), of (N, C, L) ``x`` under plan ``p``."""
    pmean, pm2 = _partials(x.shape[1], p)
    _stats_kernel[p.blocks, p.threads, 0, 3 * 8 * p.threads](x, *_geometry(p), pmean, pm2)
    return pmean, pm2


def moments(x, threads):
    """(mean, M2) per channel of the (N, C, L) device array ``x`` (m = N*L >= 1);
    float64 device arrays of shape (C,)."""
    N, C, L = x.shape
    p = _plan_for(x, threads)
    pmean, pm2 = _stats(x, p)
    mean = cuda.device_array(C)
    m2 = cuda.device_array(C)
    _moments_kernel[_per_channel(C, threads)](pmean, pm2, p.span, N * L, mean, m2)
    return mean, m2


def forward(
    x, gamma, beta, running_mean, running_var, momentum, eps, training, relu, threads, y, stats=None, count=0, res=None
):
    """Batch-norm forward of the (N, C, L) device array ``x`` into ``y``.

    ``gamma``/``beta``: (C,) device arrays of x's dtype, or empty for 1/0.
    Training: batch statistics, or ``stats`` when given (host (2, C) float64
    [mean, M2] of ``count`` values, e.g. merged over ranks; copied to the device as
    the partials of one split); ``running_mean``/``running_var`` ((C,) device
    arrays, or empty) are updated in place with factor ``momentum``. Eval: the
    running statistics. Returns the (mean, invstd) used, float64 device arrays.
    Launches: stats + per-channel merge + apply in training, per-channel + apply in
    eval; no data pass over an ``x`` without values.
    """
    N, C, L = x.shape
    m = N * L
    p = _plan_for(x, threads)
    span = p.span
    if stats is not None:
        pmean = cuda.to_device(np.ascontiguousarray(stats[0].reshape(C, 1)))
        pm2 = cuda.to_device(np.ascontiguousarray(stats[1].reshape(C, 1)))
        span = m = count
    elif training:
        pmean, pm2 = _stats(x, p)
    else:
        pmean = pm2 = cuda.device_array((0, 0))
    mean = cuda.device_array(C)
    invstd = cuda.device_array(C)
    _forward_stats_kernel[_per_channel(C, threads)](
        pmean, pm2, span, m, training, running_mean, running_var, momentum, eps, mean, invstd
    )
    if x.size:
        _apply_kernel[p.blocks, p.threads](x, _absent(res, x), mean, invstd, gamma, beta, relu, *_geometry(p), y)
    return mean, invstd


def grad_sums(dy, x, mean, invstd, gamma, beta, relu, threads, res=None):
    """The backward's reduction pass over (N, C, L) device arrays -> (psg, psgx):
    (C, S) float64 device partials of sum g and sum g*(x - mean) per split
    (``res``: the fused residual, used only for the ReLU mask)."""
    C = x.shape[1]
    if not x.size:
        return cuda.to_device(np.zeros((C, 1))), cuda.to_device(np.zeros((C, 1)))
    p = _plan_for(x, threads)
    psg, psgx = _partials(C, p)
    r = _absent(res if relu else None, x)
    _grad_sums_kernel[p.blocks, p.threads, 0, 2 * 8 * p.threads](
        dy, x, r, mean, invstd, gamma, beta, relu, *_geometry(p), psg, psgx
    )
    return psg, psgx


def grad_apply(
    dy, x, mean, invstd, gamma, beta, training, relu, threads, psg, psgx, m, dx, dgamma, dbeta, res=None, dres=None
):
    """dx, dgamma, dbeta from the partials of :func:`grad_sums` (or combined ones,
    (C, 1), with ``m`` >= 1 the number of values they summarise). One per-channel
    launch and one apply pass over (x, dy): with the sums pass, 5S of traffic.
    With ReLU and a residual ``res``, its gradient (the masked dy) into ``dres``."""
    C = x.shape[1]
    A = cuda.device_array(C)
    B = cuda.device_array(C)
    D = cuda.device_array(C)
    _grad_coeffs_kernel[_per_channel(C, threads)](psg, psgx, m, mean, invstd, gamma, training, dgamma, dbeta, A, B, D)
    if x.size:
        p = _plan_for(x, threads)
        r = _absent(res if relu else None, x)
        dr = _absent(dres if relu and res is not None else None, x)
        _grad_apply_kernel[p.blocks, p.threads](
            dy, x, r, mean, invstd, gamma, beta, relu, A, B, D, *_geometry(p), dx, dr
        )


def cast(src, dst, threads):
    """Copy the device array ``src`` into ``dst`` of the same size, converting dtype."""
    src = src.reshape(src.size)
    if src.size:
        blocks = min(_cdiv(src.size, threads * MIN_PER_THREAD), TARGET_BLOCKS)
        _cast_kernel[blocks, threads](src, dst.reshape(dst.size))
