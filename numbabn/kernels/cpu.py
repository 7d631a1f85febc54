"""Parallel CPU batch-norm kernels (Numba ``parallel=True``) on the canonical layouts.

Layouts (see ``numbabn._validation.canonical_host``):

* ``ncl`` -- ``x`` of shape ``(N, C, L)``, C-contiguous; channel ``c`` holds the
  ``m = N*L`` values ``x[:, c, :]``.
* ``mc``  -- ``x`` of shape ``(M, C)``, C-contiguous (channels last); ``m = M``.

Work is split into *fixed* chunks of about ``chunk`` elements that do not depend on
the thread count. Each chunk writes its own partial statistics; partials are merged
per channel in chunk order. Results are therefore bit-identical for any number of
threads (no ``acc[c] += ...`` races inside ``prange``).

Statistics take one pass per chunk: with ``d = x - x0`` (``x0`` the chunk's first
value) it sums ``d`` and ``d*d`` in float64, then ``M2 = sum(d*d) - sum(d)**2/n``.
Because ``(x0 - mean)**2 <= n*var`` for any sample ``x0`` of the chunk, the
cancellation costs at most a factor ``n`` (the chunk size, ~1.6e4) in float64
rounding: relative error <~ n * 2**-53 ~ 2e-12, however large ``|mean|/std`` is.
Chunks are then merged exactly with Chan et al.'s formula.

Element-wise passes run in the input's own dtype (float32 math vectorises twice
as wide as float64) on a mean split in two
(``mean = hi + lo``): ``x - hi`` is exact when ``|mean| >> std`` (Sterbenz), so
float32 outputs stay within a few float32 ulps of the float64 reference however
large ``|mean|/std`` is, and float64 outputs keep full accuracy. Reductions
accumulate in float64. Outputs have the input dtype.

Formulas (per channel, ``g`` = upstream gradient, times the ReLU mask if fused)::

    mean = (1/m) sum x ;  var = (1/m) sum (x - mean)^2 ;  invstd = 1/sqrt(var + eps)
    y    = a*(x - mean) + beta,  a = gamma*invstd             (then max(y, 0) if relu)
    dbeta = sum g ;  dgamma = sum g*xhat,  xhat = (x - mean)*invstd
    dx   = gamma*invstd/m * (m*g - dbeta - xhat*dgamma)        (training)
    dx   = gamma*invstd*g                                      (eval)

Memory traffic: training forward 3S, eval forward 2S, backward 5S (S = bytes of x).
"""
import numpy as np
from numba import njit, prange

# Reassociation lets LLVM vectorise the float64 sums; it changes nothing between
# runs or thread counts (the chunking is fixed). 'contract' is left out on purpose:
# the ReLU mask is recomputed as a*(x - mean) + b in the backward and must round
# exactly as it did in the forward (see also _center).
_REDUCE = {"reassoc"}
_OPTS = dict(cache=True, nogil=True)


# ------------------------------------------------------------------ chunking
# A chunk is a block of one channel (ncl) or of all channels (mc) holding about
# `chunk` values. Its geometry depends only on the shape and `chunk`, never on the
# thread count. Per-block helpers take the whole array plus the block bounds and
# loop over unit-stride rows, which LLVM vectorises; one call per block keeps the
# call overhead negligible even for short rows.


# Short rows (small L) are grouped over G neighbouring channels so that every block
# reads runs of >= _RUN contiguous values: hardware prefetchers need long runs, and
# channel-by-channel blocks would jump C*L values between rows of L.
_RUN = 4096


@njit(**_OPTS)
def _ncl_grid(N, C, L, chunk):
    """Blocks of R rows x G channels x W columns (rows cut in P pieces when L > chunk).

    Returns (R, G, W, P, KN, KC): KN blocks along N (times pieces), KC along C.
    """
    if L >= chunk:
        P = (L + chunk - 1) // chunk
        return 1, 1, (L + P - 1) // P, P, N * P, C
    G = min(C, (_RUN + L - 1) // L)
    R = max(1, chunk // (G * L))
    return R, G, L, 1, (N + R - 1) // R, (C + G - 1) // G


@njit(inline="always")
def _ncl_block(t, shape, grid):
    """Block t (row-block-major) of the grid -> (kn, n0, n1, c0, c1, l0, l1)."""
    N, C, L = shape
    R, G, W, P, KN, KC = grid
    kn = t // KC
    kc = t - kn * KC
    nb = kn // P
    p = kn - nb * P
    return kn, nb * R, min(nb * R + R, N), kc * G, min(kc * G + G, C), p * W, min(p * W + W, L)


# Wide channels-last inputs keep at least this many rows per block: the per-block
# partials are (K, C) float64, and with ~chunk/C rows (16 for C=1024) they grow to
# 1/8 of the input's bytes, freshly faulted in on every call (3-5x slower).
_MC_MIN_ROWS = 256


@njit(**_OPTS)
def _mc_grid(M, C, chunk):
    """Blocks of R rows of all C channels."""
    R = max(_MC_MIN_ROWS, chunk // C)
    return R, (M + R - 1) // R


# ------------------------------------------------------------------ blocks


@njit(fastmath=_REDUCE, **_OPTS)
def _ncl_blk_sums(x, n0, n1, c0, c1, l0, l1, shift, s, q):
    """Per channel c0..c1 of the block: s += sum d, q += sum d*d, d = x - shift[c]."""
    for n in range(n0, n1):
        for c in range(c0, c1):
            row = x[n, c, l0:l1]
            sh = shift[c]
            s1 = 0.0
            s2 = 0.0
            for j in range(row.size):
                d = row[j] - sh
                s1 += d
                s2 += d * d
            s[c] += s1
            q[c] += s2


@njit(**_OPTS)
def _mc_blk_sums(x, r0, r1, shift, s, q):
    for i in range(r0, r1):
        row = x[i]
        for c in range(row.size):
            d = row[c] - shift[c]
            s[c] += d
            q[c] += d * d


@njit(**_OPTS)
def _center(xv, hi, lo):
    """x - mean in x's dtype, with mean = hi + lo split in two so that float32 keeps
    ~float32 accuracy even when |mean| >> std (x - hi is exact there, Sterbenz).
    It carries no fast-math flags: the grad-sum kernels reassociate, and
    (x - hi) - lo must never become x - (hi + lo)."""
    return (xv - hi) - lo


@njit(**_OPTS)
def _ncl_blk_apply(x, t, grid, coef, relu, y):
    kn, n0, n1, c0, c1, l0, l1 = _ncl_block(t, x.shape, grid)
    z = x.dtype.type(0)
    for n in range(n0, n1):
        for c in range(c0, c1):
            row = x[n, c, l0:l1]
            out = y[n, c, l0:l1]
            hi = coef[0, c]
            lo = coef[1, c]
            ac = coef[2, c]
            bc = coef[3, c]
            for j in range(row.size):
                v = _center(row[j], hi, lo) * ac + bc
                if relu and v < z:
                    v = z
                out[j] = v


@njit(**_OPTS)
def _mc_blk_apply(x, k, R, coef, relu, y):
    z = x.dtype.type(0)
    hi, lo, a, b = coef[0], coef[1], coef[2], coef[3]
    for i in range(k * R, min(k * R + R, x.shape[0])):
        row = x[i]
        out = y[i]
        for c in range(row.size):
            v = _center(row[c], hi[c], lo[c]) * a[c] + b[c]
            if relu and v < z:
                v = z
            out[c] = v


@njit(fastmath=_REDUCE, **_OPTS)
def _ncl_blk_grad_sums(dy, x, t, grid, coef, relu, sg, sgx):
    """Per channel of block t: sg[kn, c] += sum g, sgx[kn, c] += sum g*(x - mean) in
    float64, g masked by the forward's ReLU (recomputed exactly as the forward did)."""
    kn, n0, n1, c0, c1, l0, l1 = _ncl_block(t, x.shape, grid)
    s0 = sg[kn]
    s1 = sgx[kn]
    z = x.dtype.type(0)
    for n in range(n0, n1):
        for c in range(c0, c1):
            row = x[n, c, l0:l1]
            grow = dy[n, c, l0:l1]
            hi = coef[0, c]
            lo = coef[1, c]
            ac = coef[2, c]
            bc = coef[3, c]
            p0 = 0.0
            p1 = 0.0
            for j in range(row.size):
                d = _center(row[j], hi, lo)
                g = grow[j]
                if relu and not (d * ac + bc > z):
                    g = z
                p0 += g
                p1 += g * d
            s0[c] += p0
            s1[c] += p1


@njit(**_OPTS)
def _mc_blk_grad_sums(dy, x, k, R, coef, relu, sg, sgx):
    s0 = sg[k]
    s1 = sgx[k]
    z = x.dtype.type(0)
    hi, lo, a, b = coef[0], coef[1], coef[2], coef[3]
    for i in range(k * R, min(k * R + R, x.shape[0])):
        row = x[i]
        grow = dy[i]
        for c in range(row.size):
            d = _center(row[c], hi[c], lo[c])
            g = grow[c]
            if relu and not (d * a[c] + b[c] > z):
                g = z
            s0[c] += g
            s1[c] += g * d


@njit(**_OPTS)
def _ncl_blk_grad_apply(dy, x, t, grid, coef, relu, gcoef, dx):
    kn, n0, n1, c0, c1, l0, l1 = _ncl_block(t, x.shape, grid)
    z = x.dtype.type(0)
    for n in range(n0, n1):
        for c in range(c0, c1):
            row = x[n, c, l0:l1]
            grow = dy[n, c, l0:l1]
            out = dx[n, c, l0:l1]
            hi = coef[0, c]
            lo = coef[1, c]
            ac = coef[2, c]
            bc = coef[3, c]
            A = gcoef[0, c]
            B = gcoef[1, c]
            D = gcoef[2, c]
            for j in range(row.size):
                d = _center(row[j], hi, lo)
                g = grow[j]
                if relu and not (d * ac + bc > z):
                    g = z
                out[j] = A * g + B * d + D


@njit(**_OPTS)
def _mc_blk_grad_apply(dy, x, k, R, coef, relu, gcoef, dx):
    z = x.dtype.type(0)
    hi, lo, a, b = coef[0], coef[1], coef[2], coef[3]
    A, B, D = gcoef[0], gcoef[1], gcoef[2]
    for i in range(k * R, min(k * R + R, x.shape[0])):
        row = x[i]
        grow = dy[i]
        out = dx[i]
        for c in range(row.size):
            d = _center(row[c], hi[c], lo[c])
            g = grow[c]
            if relu and not (d * a[c] + b[c] > z):
                g = z
            out[c] = A[c] * g + B[c] * d + D[c]


# ---------------------------------------------------------------- statistics


@njit(**_OPTS)
def _ncl_blk_moments(x, t, grid, cnt, pmean, pm2):
    """Block t's count, and per channel its mean and M2 (shifted single pass)."""
    kn, n0, n1, c0, c1, l0, l1 = _ncl_block(t, x.shape, grid)
    n = float((n1 - n0) * (l1 - l0))
    shift = x[n0, :, l0].astype(np.float64)
    s = pmean[kn]
    q = pm2[kn]
    _ncl_blk_sums(x, n0, n1, c0, c1, l0, l1, shift, s, q)
    for c in range(c0, c1):
        q[c] = max(q[c] - s[c] * s[c] / n, 0.0)
        s[c] = shift[c] + s[c] / n
    cnt[kn] = n


@njit(parallel=True, **_OPTS)
def _ncl_partials(x, chunk):
    """Per-block (count, mean, M2); arrays of shape (KN,) and (KN, C)."""
    N, C, L = x.shape
    grid = _ncl_grid(N, C, L, chunk)
    T = grid[4] * grid[5]
    cnt = np.empty(grid[4])
    pmean = np.zeros((grid[4], C))
    pm2 = np.zeros((grid[4], C))
    if T == 1:    # one block: skip the parallel launch (~1 us, most of a tiny call)
        _ncl_blk_moments(x, 0, grid, cnt, pmean, pm2)
    else:
        for t in prange(T):
            _ncl_blk_moments(x, t, grid, cnt, pmean, pm2)
    return cnt, pmean, pm2


@njit(**_OPTS)
def _mc_blk_moments(x, k, R, cnt, pmean, pm2):
    """Block k's count, and per channel its mean and M2 (shifted single pass)."""
    r0 = k * R
    r1 = min(r0 + R, x.shape[0])
    n = float(r1 - r0)
    shift = x[r0].astype(np.float64)
    s = pmean[k]
    q = pm2[k]
    _mc_blk_sums(x, r0, r1, shift, s, q)
    for c in range(x.shape[1]):
        q[c] = max(q[c] - s[c] * s[c] / n, 0.0)
        s[c] = shift[c] + s[c] / n
    cnt[k] = n


@njit(parallel=True, **_OPTS)
def _mc_partials(x, chunk):
    """Per-block (count, mean, M2); arrays of shape (K,) and (K, C)."""
    M, C = x.shape
    R, K = _mc_grid(M, C, chunk)
    cnt = np.empty(K)
    pmean = np.zeros((K, C))
    pm2 = np.zeros((K, C))
    if K == 1:
        _mc_blk_moments(x, 0, R, cnt, pmean, pm2)
    else:
        for k in prange(K):
            _mc_blk_moments(x, k, R, cnt, pmean, pm2)
    return cnt, pmean, pm2


@njit(**_OPTS)
def _chan_merge(cnt, pmean, pm2):
    """Merge per-block (count, mean, M2) over axis 0 in block order (Chan et al.).

    Walks blocks in the outer loop so every inner loop is unit-stride over channels.
    """
    K, C = pmean.shape
    mean = pmean[0].copy()
    m2 = pm2[0].copy()
    na = cnt[0]
    for k in range(1, K):
        nb = cnt[k]
        n = na + nb
        wb = nb / n
        wab = na * nb / n
        for c in range(C):
            d = pmean[k, c] - mean[c]
            mean[c] += d * wb
            m2[c] += pm2[k, c] + d * d * wab
        na = n
    return mean, m2


@njit(**_OPTS)
def moments_ncl(x, chunk):
    """(mean, M2) per channel of an (N, C, L) array, float64, shape (C,) each."""
    return _chan_merge(*_ncl_partials(x, chunk))


@njit(**_OPTS)
def moments_mc(x, chunk):
    """(mean, M2) per channel of an (M, C) array, float64, shape (C,) each."""
    return _chan_merge(*_mc_partials(x, chunk))


# ---------------------------------------------------------------- forward


@njit(**_OPTS)
def _train_stats(mean, m2, m, running_mean, running_var, momentum, eps):
    """invstd from the batch moments; updates running stats in place when given.

    running_mean <- (1-momentum)*running_mean + momentum*mean
    running_var  <- (1-momentum)*running_var  + momentum*var*m/(m-1)
    """
    var = m2 / m
    if running_mean.size > 0:
        keep = 1.0 - momentum
        unbiased = m / (m - 1.0)
        for c in range(mean.size):
            running_mean[c] = keep * running_mean[c] + momentum * mean[c]
            running_var[c] = keep * running_var[c] + momentum * var[c] * unbiased
    return 1.0 / np.sqrt(var + eps)


@njit(**_OPTS)
def _eval_stats(running_mean, running_var, eps):
    mean = running_mean.astype(np.float64)
    invstd = 1.0 / np.sqrt(running_var.astype(np.float64) + eps)
    return mean, invstd


@njit(**_OPTS)
def _affine(x, mean, invstd, gamma, beta):
    """(4, C) coefficients in x's dtype: hi, lo (mean = hi + lo), a = gamma*invstd
    and b = beta, for y = ((x - hi) - lo)*a + b. Empty gamma/beta mean 1 and 0.

    Element-wise passes then run in x's own dtype (twice the SIMD width of float64
    for float32), and the split mean keeps them within a few float32 ulps of the
    float64 reference even when |mean| >> std.
    """
    t = x.dtype.type
    coef = np.empty((4, mean.size), x.dtype)
    for c in range(mean.size):
        hi = t(mean[c])
        coef[0, c] = hi
        coef[1, c] = t(mean[c] - hi)
        coef[2, c] = t(invstd[c] * gamma[c]) if gamma.size > 0 else t(invstd[c])
        coef[3, c] = beta[c] if beta.size > 0 else t(0)
    return coef


@njit(parallel=True, **_OPTS)
def _ncl_apply(x, coef, relu, chunk, y):
    N, C, L = x.shape
    grid = _ncl_grid(N, C, L, chunk)
    T = grid[4] * grid[5]
    if T == 1:
        _ncl_blk_apply(x, 0, grid, coef, relu, y)
    else:
        for t in prange(T):
            _ncl_blk_apply(x, t, grid, coef, relu, y)


@njit(parallel=True, **_OPTS)
def _mc_apply(x, coef, relu, chunk, y):
    M, C = x.shape
    R, K = _mc_grid(M, C, chunk)
    if K == 1:
        _mc_blk_apply(x, 0, R, coef, relu, y)
    else:
        for k in prange(K):
            _mc_blk_apply(x, k, R, coef, relu, y)


@njit(**_OPTS)
def _pack(mean, m2):
    stats = np.empty((2, mean.size))
    stats[0] = mean
    stats[1] = m2
    return stats


@njit(**_OPTS)
def _forward_stats(stats, count, running_mean, running_var, momentum, eps, training):
    """(mean, invstd): from ``stats`` = (mean, M2) of ``count`` values in training,
    from the running statistics in eval."""
    if not training:
        return _eval_stats(running_mean, running_var, eps)
    mean = stats[0].copy()
    return mean, _train_stats(mean, stats[1], count, running_mean, running_var, momentum, eps)


@njit(**_OPTS)
def forward_ncl(x, gamma, beta, running_mean, running_var, momentum, eps,
                training, relu, chunk, stats, count, y):
    """Batch-norm forward of (N, C, L) ``x`` into ``y``; returns (mean, invstd) used.

    Training: the batch's statistics, or when ``stats`` is non-empty the given
    (2, C) (mean, M2) of ``count`` values (e.g. merged over MPI ranks); running
    statistics updated in place when non-empty.
    Eval: the running statistics (one subtract and one multiply-add per element).
    """
    N, C, L = x.shape
    if training and stats.size == 0:
        stats, count = _pack(*moments_ncl(x, chunk)), N * L
    mean, invstd = _forward_stats(stats, count, running_mean, running_var, momentum, eps, training)
    _ncl_apply(x, _affine(x, mean, invstd, gamma, beta), relu, chunk, y)
    return mean, invstd


@njit(**_OPTS)
def forward_mc(x, gamma, beta, running_mean, running_var, momentum, eps,
               training, relu, chunk, stats, count, y):
    """Batch-norm forward of (M, C) ``x`` into ``y``; see :func:`forward_ncl`."""
    M, C = x.shape
    if training and stats.size == 0:
        stats, count = _pack(*moments_mc(x, chunk)), M
    mean, invstd = _forward_stats(stats, count, running_mean, running_var, momentum, eps, training)
    _mc_apply(x, _affine(x, mean, invstd, gamma, beta), relu, chunk, y)
    return mean, invstd


# ---------------------------------------------------------------- backward


@njit(parallel=True, **_OPTS)
def _ncl_grad_partials(dy, x, coef, relu, chunk):
    """Per-block sums of g and g*(x - mean), shape (KN, C)."""
    N, C, L = x.shape
    grid = _ncl_grid(N, C, L, chunk)
    T = grid[4] * grid[5]
    sg = np.zeros((grid[4], C))
    sgx = np.zeros((grid[4], C))
    if T == 1:
        _ncl_blk_grad_sums(dy, x, 0, grid, coef, relu, sg, sgx)
    else:
        for t in prange(T):
            _ncl_blk_grad_sums(dy, x, t, grid, coef, relu, sg, sgx)
    return sg, sgx


@njit(parallel=True, **_OPTS)
def _mc_grad_partials(dy, x, coef, relu, chunk):
    """Per-block sums of g and g*(x - mean), shape (K, C)."""
    M, C = x.shape
    R, K = _mc_grid(M, C, chunk)
    sg = np.zeros((K, C))
    sgx = np.zeros((K, C))
    if K == 1:
        _mc_blk_grad_sums(dy, x, 0, R, coef, relu, sg, sgx)
    else:
        for k in prange(K):
            _mc_blk_grad_sums(dy, x, k, R, coef, relu, sg, sgx)
    return sg, sgx


@njit(**_OPTS)
def _sum_blocks(sg, sgx):
    """Sum per-block partials (K, C) in block order -> (2, C): [sum g, sum g*(x-mean)]."""
    K, C = sg.shape
    sums = np.zeros((2, C))
    for k in range(K):
        for c in range(C):
            sums[0, c] += sg[k, c]
            sums[1, c] += sgx[k, c]
    return sums


@njit(**_OPTS)
def _grad_coeffs(x, sums, m, invstd, gamma, training):
    """dgamma, dbeta (float64) and the (3, C) coefficients, in x's dtype, of
    dx = A*g + B*(x - mean) + D.

    Training: A = gamma*invstd, B = -A*invstd*dgamma/m, D = -A*dbeta/m, which is
    gamma*invstd/m * (m*g - dbeta - xhat*dgamma). Eval: B = D = 0.
    """
    dbeta = sums[0].copy()
    dgamma = sums[1] * invstd
    A = invstd.copy()
    if gamma.size > 0:
        A *= gamma
    gcoef = np.zeros((3, invstd.size), x.dtype)
    gcoef[0] = A
    if training:
        gcoef[1] = -A * invstd * dgamma / m
        gcoef[2] = -A * dbeta / m
    return dgamma, dbeta, gcoef


@njit(parallel=True, **_OPTS)
def _ncl_grad_apply(dy, x, coef, gcoef, relu, chunk, dx):
    N, C, L = x.shape
    grid = _ncl_grid(N, C, L, chunk)
    T = grid[4] * grid[5]
    if T == 1:
        _ncl_blk_grad_apply(dy, x, 0, grid, coef, relu, gcoef, dx)
    else:
        for t in prange(T):
            _ncl_blk_grad_apply(dy, x, t, grid, coef, relu, gcoef, dx)


@njit(parallel=True, **_OPTS)
def _mc_grad_apply(dy, x, coef, gcoef, relu, chunk, dx):
    M, C = x.shape
    R, K = _mc_grid(M, C, chunk)
    if K == 1:
        _mc_blk_grad_apply(dy, x, 0, R, coef, relu, gcoef, dx)
    else:
        for k in prange(K):
            _mc_blk_grad_apply(dy, x, k, R, coef, relu, gcoef, dx)


@njit(**_OPTS)
def grad_sums_ncl(dy, x, mean, invstd, gamma, beta, relu, chunk):
    """Backward reduction pass over (N, C, L) arrays: (2, C) float64 sums
    [sum g, sum g*(x - mean)] (g masked by the forward's ReLU). 2S of traffic."""
    return _sum_blocks(*_ncl_grad_partials(dy, x, _affine(x, mean, invstd, gamma, beta), relu, chunk))


@njit(**_OPTS)
def grad_sums_mc(dy, x, mean, invstd, gamma, beta, relu, chunk):
    """Backward reduction pass over (M, C) arrays; see :func:`grad_sums_ncl`."""
    return _sum_blocks(*_mc_grad_partials(dy, x, _affine(x, mean, invstd, gamma, beta), relu, chunk))


@njit(**_OPTS)
def grad_apply_ncl(dy, x, mean, invstd, gamma, beta, training, relu, chunk, sums, m, dx):
    """Backward apply pass over (N, C, L) arrays into ``dx``; returns (dgamma, dbeta)
    in x's dtype.

    ``sums`` come from :func:`grad_sums_ncl` (possibly all-reduced over ranks, then
    ``m`` is the global count). 3S of traffic; with the reduction, 5S.
    """
    dgamma, dbeta, gcoef = _grad_coeffs(x, sums, m, invstd, gamma, training)
    _ncl_grad_apply(dy, x, _affine(x, mean, invstd, gamma, beta), gcoef, relu, chunk, dx)
    return dgamma.astype(x.dtype), dbeta.astype(x.dtype)


@njit(**_OPTS)
def grad_apply_mc(dy, x, mean, invstd, gamma, beta, training, relu, chunk, sums, m, dx):
    """Backward apply pass over (M, C) arrays; see :func:`grad_apply_ncl`."""
    dgamma, dbeta, gcoef = _grad_coeffs(x, sums, m, invstd, gamma, training)
    _mc_grad_apply(dy, x, _affine(x, mean, invstd, gamma, beta), gcoef, relu, chunk, dx)
    return dgamma.astype(x.dtype), dbeta.astype(x.dtype)
