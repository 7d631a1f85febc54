"""Parallel CPU batch-norm kernels (Numba ``parallel=True``) on the canonical layouts.

Layouts (see ``numbabn._validation.canonicalize``):

* ``ncl`` -- ``x`` of shape ``(N, C, L)``, C-contiguous; channel ``c`` holds the
  ``m = N*L`` values ``x[:, c, :]``.
* ``mc``  -- ``x`` of shape ``(M, C)``, C-contiguous (channels last); ``m = M``.

Work is split into *fixed* chunks of about ``chunk`` elements that do not depend on
the thread count. Each chunk writes its own partial statistics; partials are merged
per channel in chunk order. Results are therefore bit-identical for any number of
threads (no ``acc[c] += ...`` races inside ``prange``).

Statistics are exact two-pass per chunk (chunk mean, then sum of squared deviations
from it, both in float64) merged with Chan et al.'s formula, so they stay accurate
when ``|mean| >> std``. All per-element arithmetic is done in float64 and rounded
once when stored, so float32 outputs are within float32 rounding of the float64
reference. Outputs have the input dtype.

Formulas (per channel, ``g`` = upstream gradient, times the ReLU mask if fused)::

    mean = (1/m) sum x ;  var = (1/m) sum (x - mean)^2 ;  invstd = 1/sqrt(var + eps)
    y    = a*x + b,  a = gamma*invstd,  b = beta - mean*a      (then max(y, 0) if relu)
    dbeta = sum g ;  dgamma = sum g*xhat,  xhat = (x - mean)*invstd
    dx   = gamma*invstd/m * (m*g - dbeta - xhat*dgamma)        (training)
    dx   = gamma*invstd*g                                      (eval)

Memory traffic: training forward 3S, eval forward 2S, backward 5S (S = bytes of x).
"""
import numpy as np
from numba import njit, prange

# Reassociation lets LLVM vectorise the float64 sums; it changes nothing between
# runs or thread counts (the chunking is fixed). 'contract' is left out on purpose:
# the ReLU mask is recomputed as a*x + b in the backward reduction and must round
# exactly as it did in the forward.
_REDUCE = {"reassoc"}
_OPTS = dict(cache=True, nogil=True)


@njit(inline="always")
def _n_chunks(m, chunk):
    return (m + chunk - 1) // chunk


@njit(inline="always")
def _mc_rows(C, chunk):
    return max(1, chunk // C)


# ------------------------------------------------- per-segment inner loops
# Each works on 1-D contiguous views so LLVM sees simple unit-stride loops and
# vectorises them (3-D indexing with computed bounds stays scalar).


@njit(fastmath=_REDUCE, **_OPTS)
def _seg_sum(xs):
    s = 0.0
    for j in range(xs.size):
        s += xs[j]
    return s


@njit(fastmath=_REDUCE, **_OPTS)
def _seg_ssq(xs, mu):
    q = 0.0
    for j in range(xs.size):
        d = xs[j] - mu
        q += d * d
    return q


@njit(**_OPTS)
def _seg_apply(xs, a, b, relu, ys):
    for j in range(xs.size):
        v = xs[j] * a + b
        ys[j] = max(v, 0.0) if relu else v


@njit(fastmath=_REDUCE, **_OPTS)
def _seg_grad_sums(gs, xs, mu, a, b, relu):
    s0 = 0.0
    s1 = 0.0
    for j in range(xs.size):
        xv = xs[j]
        g = gs[j] * 1.0
        if relu and not (xv * a + b > 0.0):
            g = 0.0
        s0 += g
        s1 += g * (xv - mu)
    return s0, s1


@njit(**_OPTS)
def _seg_grad_apply(gs, xs, a, b, relu, A, B, D, dxs):
    for j in range(xs.size):
        xv = xs[j]
        g = gs[j] * 1.0
        if relu and not (xv * a + b > 0.0):
            g = 0.0
        dxs[j] = A * g + B * xv + D


@njit(**_OPTS)
def _row_add(xr, acc):
    for c in range(xr.size):
        acc[c] += xr[c]


@njit(**_OPTS)
def _row_ssq(xr, mu, q):
    for c in range(xr.size):
        d = xr[c] - mu[c]
        q[c] += d * d


@njit(**_OPTS)
def _row_apply(xr, a, b, relu, yr):
    for c in range(xr.size):
        v = xr[c] * a[c] + b[c]
        yr[c] = max(v, 0.0) if relu else v


@njit(**_OPTS)
def _row_grad_sums(gr, xr, mu, a, b, relu, s0, s1):
    for c in range(xr.size):
        xv = xr[c]
        g = gr[c] * 1.0
        if relu and not (xv * a[c] + b[c] > 0.0):
            g = 0.0
        s0[c] += g
        s1[c] += g * (xv - mu[c])


@njit(**_OPTS)
def _row_grad_apply(gr, xr, a, b, relu, A, B, D, dxr):
    for c in range(xr.size):
        xv = xr[c]
        g = gr[c] * 1.0
        if relu and not (xv * a[c] + b[c] > 0.0):
            g = 0.0
        dxr[c] = A[c] * g + B[c] * xv + D[c]


@njit(inline="always")
def _ncl_task(t, K, m, chunk):
    """Task t of C*K -> (channel, first flat index, stop) of its chunk."""
    c = t // K
    start = (t - c * K) * chunk
    return c, start, min(start + chunk, m)


# ---------------------------------------------------------------- statistics


@njit(parallel=True, **_OPTS)
def _ncl_partials(x, chunk):
    """Per (channel, chunk) mean and M2 of an (N, C, L) array; chunks span rows."""
    N, C, L = x.shape
    m = N * L
    K = _n_chunks(m, chunk)
    pmean = np.empty((C, K))
    pm2 = np.empty((C, K))
    for t in prange(C * K):
        c, start, stop = _ncl_task(t, K, m, chunk)
        s = 0.0
        for n in range(start // L, (stop - 1) // L + 1):
            s += _seg_sum(x[n, c, max(start - n * L, 0):min(stop - n * L, L)])
        mu = s / (stop - start)
        q = 0.0
        for n in range(start // L, (stop - 1) // L + 1):
            q += _seg_ssq(x[n, c, max(start - n * L, 0):min(stop - n * L, L)], mu)
        pmean[c, t - c * K] = mu
        pm2[c, t - c * K] = q
    return pmean, pm2


@njit(parallel=True, **_OPTS)
def _mc_partials(x, chunk):
    """Per (row-chunk, channel) mean and M2 of an (M, C) array, shape (K, C)."""
    M, C = x.shape
    rows = _mc_rows(C, chunk)
    K = _n_chunks(M, rows)
    pmean = np.zeros((K, C))
    pm2 = np.zeros((K, C))
    for k in prange(K):
        r0 = k * rows
        r1 = min(r0 + rows, M)
        mu = pmean[k]
        for i in range(r0, r1):
            _row_add(x[i], mu)
        mu *= 1.0 / (r1 - r0)
        for i in range(r0, r1):
            _row_ssq(x[i], mu, pm2[k])
    return pmean, pm2


@njit(parallel=True, **_OPTS)
def _chan_merge(pmean, pm2, count_first, count_last):
    """Merge per-chunk (mean, M2) along axis 1 in chunk order (Chan et al.).

    ``pmean``/``pm2`` have shape (C, K); every chunk holds ``count_first`` values
    except the last, which holds ``count_last``.
    """
    C, K = pmean.shape
    mean = np.empty(C)
    m2 = np.empty(C)
    for c in prange(C):
        na = float(count_first) if K > 1 else float(count_last)
        ma = pmean[c, 0]
        qa = pm2[c, 0]
        for k in range(1, K):
            nb = float(count_first) if k < K - 1 else float(count_last)
            n = na + nb
            d = pmean[c, k] - ma
            ma += d * (nb / n)
            qa += pm2[c, k] + d * d * (na * nb / n)
            na = n
        mean[c] = ma
        m2[c] = qa
    return mean, m2


@njit(**_OPTS)
def moments_ncl(x, chunk):
    """(mean, M2) per channel of an (N, C, L) array, float64, shape (C,) each."""
    N, C, L = x.shape
    m = N * L
    pmean, pm2 = _ncl_partials(x, chunk)
    K = pmean.shape[1]
    return _chan_merge(pmean, pm2, chunk, m - (K - 1) * chunk)


@njit(**_OPTS)
def moments_mc(x, chunk):
    """(mean, M2) per channel of an (M, C) array, float64, shape (C,) each."""
    M, C = x.shape
    rows = _mc_rows(C, chunk)
    pmean, pm2 = _mc_partials(x, chunk)
    K = pmean.shape[0]
    return _chan_merge(pmean.T, pm2.T, rows, M - (K - 1) * rows)


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
def _affine(mean, invstd, gamma, beta):
    """Per-channel (a, b) with y = a*x + b; empty gamma/beta mean 1 and 0."""
    a = invstd.copy()
    if gamma.size > 0:
        a *= gamma
    b = -mean * a
    if beta.size > 0:
        b += beta
    return a, b


@njit(parallel=True, **_OPTS)
def _ncl_apply(x, a, b, relu, chunk, y):
    N, C, L = x.shape
    m = N * L
    K = _n_chunks(m, chunk)
    for t in prange(C * K):
        c, start, stop = _ncl_task(t, K, m, chunk)
        for n in range(start // L, (stop - 1) // L + 1):
            lo = max(start - n * L, 0)
            hi = min(stop - n * L, L)
            _seg_apply(x[n, c, lo:hi], a[c], b[c], relu, y[n, c, lo:hi])


@njit(parallel=True, **_OPTS)
def _mc_apply(x, a, b, relu, chunk, y):
    M, C = x.shape
    rows = _mc_rows(C, chunk)
    for k in prange(_n_chunks(M, rows)):
        for i in range(k * rows, min(k * rows + rows, M)):
            _row_apply(x[i], a, b, relu, y[i])


@njit(**_OPTS)
def forward_ncl(x, gamma, beta, running_mean, running_var, momentum, eps,
                training, relu, chunk, y):
    """Batch-norm forward of (N, C, L) ``x`` into ``y``; returns (mean, invstd) used.

    Training: batch statistics (running stats updated in place when non-empty).
    Eval: running statistics, folded into one multiply-add per element.
    """
    N, C, L = x.shape
    if training:
        mean, m2 = moments_ncl(x, chunk)
        invstd = _train_stats(mean, m2, N * L, running_mean, running_var, momentum, eps)
    else:
        mean, invstd = _eval_stats(running_mean, running_var, eps)
    a, b = _affine(mean, invstd, gamma, beta)
    _ncl_apply(x, a, b, relu, chunk, y)
    return mean, invstd


@njit(**_OPTS)
def forward_mc(x, gamma, beta, running_mean, running_var, momentum, eps,
               training, relu, chunk, y):
    """Batch-norm forward of (M, C) ``x`` into ``y``; see :func:`forward_ncl`."""
    M, C = x.shape
    if training:
        mean, m2 = moments_mc(x, chunk)
        invstd = _train_stats(mean, m2, M, running_mean, running_var, momentum, eps)
    else:
        mean, invstd = _eval_stats(running_mean, running_var, eps)
    a, b = _affine(mean, invstd, gamma, beta)
    _mc_apply(x, a, b, relu, chunk, y)
    return mean, invstd


# ---------------------------------------------------------------- backward


@njit(parallel=True, **_OPTS)
def _ncl_grad_partials(dy, x, mean, a, b, relu, chunk):
    """Per (channel, chunk) sums of g and g*(x - mean), shape (C, K)."""
    N, C, L = x.shape
    m = N * L
    K = _n_chunks(m, chunk)
    sg = np.empty((C, K))
    sgx = np.empty((C, K))
    for t in prange(C * K):
        c, start, stop = _ncl_task(t, K, m, chunk)
        s0 = 0.0
        s1 = 0.0
        for n in range(start // L, (stop - 1) // L + 1):
            lo = max(start - n * L, 0)
            hi = min(stop - n * L, L)
            p0, p1 = _seg_grad_sums(dy[n, c, lo:hi], x[n, c, lo:hi], mean[c], a[c], b[c], relu)
            s0 += p0
            s1 += p1
        sg[c, t - c * K] = s0
        sgx[c, t - c * K] = s1
    return sg, sgx


@njit(parallel=True, **_OPTS)
def _mc_grad_partials(dy, x, mean, a, b, relu, chunk):
    """Per (row-chunk, channel) sums of g and g*(x - mean), shape (K, C)."""
    M, C = x.shape
    rows = _mc_rows(C, chunk)
    K = _n_chunks(M, rows)
    sg = np.zeros((K, C))
    sgx = np.zeros((K, C))
    for k in prange(K):
        for i in range(k * rows, min(k * rows + rows, M)):
            _row_grad_sums(dy[i], x[i], mean, a, b, relu, sg[k], sgx[k])
    return sg, sgx


@njit(**_OPTS)
def _grad_coeffs(sg, sgx, m, mean, invstd, gamma, training):
    """Sum the partials (shape (C, K)) in chunk order and build dx = A*g + B*x + D.

    Training: A = gamma*invstd, B = -A*invstd*dgamma/m, D = -A*dbeta/m - B*mean,
    which is gamma*invstd/m * (m*g - dbeta - xhat*dgamma). Eval: B = D = 0.
    """
    C, K = sg.shape
    dbeta = np.zeros(C)
    s1 = np.zeros(C)
    for c in range(C):
        for k in range(K):
            dbeta[c] += sg[c, k]
            s1[c] += sgx[c, k]
    dgamma = s1 * invstd
    A = invstd.copy()
    if gamma.size > 0:
        A *= gamma
    if training:
        B = -A * invstd * dgamma / m
        D = -A * dbeta / m - B * mean
    else:
        B = np.zeros(C)
        D = np.zeros(C)
    return dgamma, dbeta, A, B, D


@njit(parallel=True, **_OPTS)
def _ncl_grad_apply(dy, x, a, b, A, B, D, relu, chunk, dx):
    N, C, L = x.shape
    m = N * L
    K = _n_chunks(m, chunk)
    for t in prange(C * K):
        c, start, stop = _ncl_task(t, K, m, chunk)
        for n in range(start // L, (stop - 1) // L + 1):
            lo = max(start - n * L, 0)
            hi = min(stop - n * L, L)
            _seg_grad_apply(dy[n, c, lo:hi], x[n, c, lo:hi], a[c], b[c], relu,
                            A[c], B[c], D[c], dx[n, c, lo:hi])


@njit(parallel=True, **_OPTS)
def _mc_grad_apply(dy, x, a, b, A, B, D, relu, chunk, dx):
    M, C = x.shape
    rows = _mc_rows(C, chunk)
    for k in prange(_n_chunks(M, rows)):
        for i in range(k * rows, min(k * rows + rows, M)):
            _row_grad_apply(dy[i], x[i], a, b, relu, A, B, D, dx[i])


@njit(**_OPTS)
def backward_ncl(dy, x, mean, invstd, gamma, beta, training, relu, chunk, dx):
    """Batch-norm backward of (N, C, L) arrays into ``dx``; returns (dgamma, dbeta).

    One reduction pass (sum g, sum g*xhat) and one apply pass: 5S of traffic.
    ``mean``/``invstd`` are what the forward used (batch or running statistics).
    """
    N, C, L = x.shape
    a, b = _affine(mean, invstd, gamma, beta)
    sg, sgx = _ncl_grad_partials(dy, x, mean, a, b, relu, chunk)
    dgamma, dbeta, A, B, D = _grad_coeffs(sg, sgx, N * L, mean, invstd, gamma, training)
    _ncl_grad_apply(dy, x, a, b, A, B, D, relu, chunk, dx)
    return dgamma, dbeta


@njit(**_OPTS)
def backward_mc(dy, x, mean, invstd, gamma, beta, training, relu, chunk, dx):
    """Batch-norm backward of (M, C) arrays into ``dx``; see :func:`backward_ncl`."""
    M, C = x.shape
    a, b = _affine(mean, invstd, gamma, beta)
    sg, sgx = _mc_grad_partials(dy, x, mean, a, b, relu, chunk)
    dgamma, dbeta, A, B, D = _grad_coeffs(sg.T, sgx.T, M, mean, invstd, gamma, training)
    _mc_grad_apply(dy, x, a, b, A, B, D, relu, chunk, dx)
    return dgamma, dbeta
