"""CPU batch-norm kernels: serial, GIL-free Numba block kernels and their drivers.

Layouts (see ``numbabn._layout.canonical_host``):

* ``ncl`` -- ``x`` of shape ``(N, C, L)``, C-contiguous; channel ``c`` holds the
  ``m = N*L`` values ``x[:, c, :]``.
* ``mc``  -- ``x`` of shape ``(M, C)``, C-contiguous (channels last); ``m = M``.

Each pass is one kernel per layout that walks the blocks ``t0 <= t < t1`` of a fixed
grid (about ``chunk`` values a block; the geometry never depends on the thread
count). The two reductions of ``ncl`` rows shorter than :data:`_SHORT_L` values have
kernels of their own (:func:`stats_tiles`, :func:`grad_sums_tiles`), over tiles of
samples x channels (:func:`_ncl_tile`, one partial row per row of tiles).
:func:`numbabn._threads.parallel_for` hands pieces of blocks to threads. Reductions
write one partial per (block row, channel), merged in block order, so results are
bit-identical for any number of threads. The arithmetic on one element
lives in the shared element helpers (:func:`_normalise`, :func:`_masked`); the
kernels are loops around them.

Residual fusion (``y = act(gamma*xhat + beta + r)``): the kernels take the residual
``res`` (and, in the backward, its gradient output ``dres``) as an array of x's shape
or ``None``. Numba prunes ``if res is None`` branches at compile time for a
None-typed argument, so the default signature (``None``) keeps the plain machine
code, and the residual path is one more signature of the same bodies, compiled on
first use. With ReLU the backward stores ``dres = g`` (dy times the mask, recomputed
with the residual exactly as the forward rounded it); without ReLU ``dres = dy``
needs no kernel.

Statistics (one pass): per block and channel, with ``d = x - s`` (``s`` the block's
first value of that channel, kept exactly in float64; 0 if that is not finite), sums
of ``d`` and ``d*d`` in float64; ``M2 = sum d*d - (sum d)**2/n``. Since
``(s - mean)**2 <= n*var``, the cancellation costs at most a factor ``n`` (~1.6e4) of
float64 rounding. Blocks are merged with Chan et al.'s formula on means *relative to
the first block's shift* (exact differences of input values), so the merge adds no
rounding proportional to ``|mean|`` either: a column of 1 +- 1e-5 among many others
keeps float64 accuracy. A channel holding infinities gets PyTorch's statistics: mean
+-inf (NaN if both signs or a NaN), M2 NaN.

Element-wise passes run in the compute dtype -- the input's own (float32 vectorises
twice as wide), float32 for float16/bfloat16 data, which the kernels read and write as
16 bits (:mod:`numbabn.kernels.storage`: ``decode``/``encode``) -- on a mean split in
two, ``mean = hi + lo``, and on *halved* values::

    u = x*0.5 - hi' ;  d = u - lo'   hi' + lo' = mean/2   (d = (x - mean)/2)
    y = u*a' + b'                    a' = 2*gamma*invstd, b' = beta - a'*lo'  (then max(y, 0) if relu)

``u`` and ``y`` are fused multiply-adds (:mod:`numbabn.kernels.fused`: one rounding,
and the same instruction in every kernel, so the backward's recomputed ReLU mask is
the forward's; ``x*0.5`` is exact outside the subnormal range, so ``u`` is what the
separate operations give).
With a plain multiply and add instead (the helpers carry no fast-math flags, see
``_helper`` below), the gradient sums took 8-15 % longer in cache (one thread, min of
31, twice: 64x64x196 with ReLU 389-390 against 341-342 us, without 222-224 against
203; NCL 32x256x49 280-282 against 251-252) and no less time from memory.
``x*0.5 - hi'`` is exact when ``|mean| >> std`` (Sterbenz), so float32 stays within a
few ulps of the float64 reference however large ``|mean|/std``; ``b'`` (rounded once,
from float64) keeps ``y`` at three coefficients a value instead of four, which the
normalise pass on cache-resident data is bound by (4096x1024 eval, two threads,
alternating processes: median 0.78-1.41 ms against 1.29-1.78; largest error unchanged,
under one float32 epsilon of the output's scale for |mean|/std up to 3e7); halving is exact
(outside the subnormal range) and keeps ``x - mean`` finite for any finite float32
``x`` and ``mean``, so an exactly representable output never overflows on the way.

Formulas (per channel, ``g`` = upstream gradient times the ReLU mask if fused)::

    mean = (1/m) sum x ;  var = (1/m) sum (x - mean)^2 ;  invstd = 1/sqrt(var + eps)
    y    = gamma*invstd*(x - mean) + beta
    dbeta = sum g ;  dgamma = sum g*xhat,  xhat = (x - mean)*invstd
    dx   = gamma*invstd/m * (m*g - dbeta - xhat*dgamma)        (training)
    dx   = gamma*invstd*g                                      (eval)

Memory traffic: training forward 3S, eval forward 2S, backward 5S (S = bytes of x).
Outputs of at least ``config.STREAM_MIN`` bytes (the last-level cache) are written
with non-temporal stores (``stream`` argument, :mod:`numbabn.kernels.stream`), which
skip the read of each output line that an ordinary store makes first.
"""

import numpy as np
from numba import njit

from .._jit import kernel
from . import stream as S
from .fused import fma
from .prefetch import AHEAD_BYTES, SHORT_RUN_BYTES, prefetch
from .storage import decode, encode

# Reassociation lets LLVM vectorise the float64 sums, contraction fuse each product
# into its sum (s += d*d, s += g*d: one rounding instead of two, an FMA instruction
# where the CPU has one; the ReLU backward's gradient sums took 5-10 % less time on
# two threads, 128x256x14x14 and 4096x1024); neither changes anything between runs
# or thread counts (the blocks are fixed). The element helpers carry no fast-math
# flags (flags are per function; inlining keeps them): the ReLU mask is recomputed in
# the backward and must round exactly as in the forward, and (x*0.5 - hi) - lo must
# never become x*0.5 - (hi + lo).
_REDUCE = {"reassoc", "contract"}

# Rows of the (4, F*C) forward coefficients (F = 1 but for short channels-last rows,
# :func:`_fold`) and the (3, F*C) gradient coefficients.
HI, LO, A, B = 0, 1, 2, 3  # d = (x/2 - HI) - LO ;  y = A*d + B
GA, GB, GD = 0, 1, 2  # dx = GA*g + GB*d + GD
# Rows of the (3, K, C) statistics partials and the (2, K, C) gradient partials.
SHIFT, SUM, SQ = 0, 1, 2
SG, SGD = 0, 1


# Small helpers are plain @njit functions: Numba compiles each once per signature in a
# process and every kernel links that one copy, which LLVM then inlines (the kernels'
# vectorised loops stay: their optimised IR holds the same vector operations, but for the
# once-per-block _fold_sums and _tile, now calls; forward + backward on one thread,
# six alternating rounds, was as fast or faster). Numba's own inline="always" re-types the helper at each
# call site: every entry point cold took 23.4 and 20.1 s of compile events that way,
# 21.3 and 18.3 s this way (bench/first_call.py --table, alternating, busy 2-vCPU VM).
# Only the helpers that take a possibly-None residual stay inline="always" (_at,
# _store, _flat, _run): as calls, the residual backward's dx loop lost its
# vectorisation (vector operations in its optimised IR: 126 -> 18).
# Numba compiles builtin min/max as separate overloads per argument type (about 0.1 s
# each on a cold start); these two replace them.
# Every helper states fastmath=False: a jitted function that does not set it inherits
# the flags of the function whose compile first needs it (Numba's CPU target,
# ``inherit_if_not_set("fastmath")``), and keeps them for the process. A process
# whose first compile was a reduction (reassociation and contraction) then gave every
# later kernel the contracted _normalise: the same apply_ncl compiled to different
# machine code, and the bits of y differed, depending on which kernel a process (or the
# compile helper) compiled first (10477 of 60000 outputs, float32 (3, 4, 5000)); the
# backward's recomputed ReLU mask need not match the forward's then.
_helper = njit(error_model="numpy", fastmath=False)


@_helper
def _min(a, b):
    return b if b < a else a


@_helper
def _max(a, b):
    return b if b > a else a


@_helper
def _shift(v):
    """A block's shift: its first value, or 0 where that is infinite or NaN (with an
    infinite shift, d = x - shift of the block's finite values is infinite and the
    block's mean inf - inf = NaN, where PyTorch's mean of data holding +inf is +inf)."""
    return np.float64(v) if abs(v) < np.inf else 0.0


# ------------------------------------------------------------------ element helpers


@njit(error_model="numpy", inline="always")
def _at(arr, i):
    """``decode(arr[i])``, or None for an absent (None) residual: pruned at compile time."""
    if arr is None:
        return None
    return decode(arr[i])


@njit(error_model="numpy", inline="always")
def _store(arr, i, v):
    """``arr[i] = encode(v, arr)`` unless ``arr`` is None (no residual gradient to store)."""
    if arr is not None:
        arr[i] = encode(v, arr)


@njit(error_model="numpy", inline="always")
def _flat(arr):
    """The C-contiguous ``arr`` as one row of values, or None for an absent residual.

    The kernels flatten their arrays once per call and take every row of both
    layouts as a slice of them (:func:`_run`): slicing the 3-D or 2-D array per row
    (``x[n, c, l0:l1]``, ``x[i]``, with their per-axis wraparound and bounds code)
    made the normalise pass 1.2-1.3x slower on 14x14 maps and on 64-channel rows
    (one thread: 64x256x196, 128x256x196; (100352, 64)), and a reshape per row cost
    the residual kernels 1.3-10x (4x4 maps worst)."""
    if arr is None:
        return None
    return arr.reshape(arr.size)


@njit(error_model="numpy", inline="always")
def _run(arr, flat, i0, i1):
    """``flat[i0:i1]``, a row of ``arr`` (``flat`` is :func:`_flat` of it), or None for
    an absent residual. The None test is on ``arr`` itself: Numba prunes it at
    compile time for a None argument, but not a test on ``flat``, one inlined call
    further from the argument."""
    if arr is None:
        return None
    return flat[i0:i1]


@_helper
def _normalise(v, half, hi, lo, a, b, relu, zero, r):
    """(d, y) of one element: d = (x - mean)/2 in the compute dtype from the halved split mean
    (hi, lo), y = a*(x/2 - hi) + b with b = beta - a*lo, one fused multiply-add (+ r,
    the residual, unless None), then ReLU if fused (NaN passes through). y reads three coefficients, not
    four: the forward on L3-resident data is bound by loads (see the module docstring)."""
    u = fma(v, half, -hi)
    d = u - lo
    y = fma(u, a, b)
    if r is not None:
        y = y + r
    if relu and y < zero:
        y = zero
    return d, y


@_helper
def _masked(v, g, half, hi, lo, a, b, relu, zero, r):
    """(d, g times the forward's ReLU mask), y recomputed exactly as the forward did. The
    mask is PyTorch's (its ReLU backward zeroes the gradient where the output is <= 0):
    it passes the gradient of a NaN output."""
    d, y = _normalise(v, half, hi, lo, a, b, relu, zero, r)
    if relu and y <= zero:
        return d, zero
    return d, g


@_helper
def _dx(g, d, ga, gb, gd, zero):
    """dx = ga*g + gb*d + gd, without the gb*d term where gb is exactly 0 (eval mode):
    dx then does not depend on x, as in PyTorch, and an infinite or NaN x gives a
    finite dx instead of 0*inf."""
    t = gb * d if gb != zero else zero
    return ga * g + t + gd


@_helper
def _gd(xs, gs, j, half, hi, lo, a, b, relu, zero):
    """(g, d) of entry j of the runs ``xs``, ``gs`` (x, dy; no residual) as float64, for
    the four-run loop of the backward's sums (their products fuse there). The loops
    that take a residual call :func:`_masked` themselves: through a residual argument
    of this helper, its gradient sums ran 2-3x slower ((4096, 1024), one thread)."""
    d, g = _masked(decode(xs[j]), decode(gs[j]), half, hi, lo, a, b, relu, zero, None)
    return np.float64(g), np.float64(d)


# ------------------------------------------------------------------ block grids
# Every block of the (N, C, L) grid is one contiguous run of x: G neighbouring
# channels of one sample (C*L/chunk blocks of about equal size), or R whole samples
# when C*L <= chunk. Blocks of R samples x G channels (R runs of >= 4096 values, C*L
# apart) ran the four passes 1.2-2.4x slower single-threaded (128x256x196,
# 64x64x1024): prefetchers follow few streams, and power-of-two distances alias in
# the caches.
# Channels-last blocks keep at least this many rows: the per-block partials are
# (K, C) float64, and with ~chunk/C rows they would grow to 1/8 of the input.
_MC_MIN_ROWS = 256
# The channels-last reductions (statistics, gradient sums) walk F = _FOLD // C rows
# at a time as one run of F*C values, accumulating per entry of the run (channel
# j % C) and folding per channel at the end of a block: per row, the loop set-up and
# the accumulators' load-add-store chain cost as much as the row itself at C = 64.
# One thread, min of 15, (200704, 64): stats 4.6-6.0 -> 3.0-3.5 ms; (65536, 32):
# stats 0.91-0.99 -> 0.30-0.50 ms, gradient sums 0.90-1.02 -> 0.52-0.60 ms (runs of
# 512 values were slower, of 2048 twice as slow: the per-block tiling and folding).
# The statistics take two runs per pass over the accumulators, prefetching short
# ones (stats_mc, numbabn.kernels.prefetch): two threads, median of 25, (200704, 64)
# 5.2-5.4 -> 4.3-4.7 ms, (25088, 256) 2.5-2.6 -> 2.1-2.4, (4096, 1024) 1.6-1.75 ->
# 1.5-1.8; float16 data, (64, 56, 56, 64) forward 10.1-10.6 -> 9.3-9.8 ms. float64
# data keeps one run at a time (see stats_mc). The kernel compiles in 2.0 s instead
# of 1.6 (float32) and 1.4 instead of 1.0 (float64, whose paired loop is compiled but
# never runs). Four runs per pass, without prefetching, were 1.5x faster in
# cache but slower from memory (runs of 256 values) or no faster on two threads
# (runs of 1024), and took 1-2 us more on a (64, 100) batch, on the AVX2 VM; on the
# AVX-512 one runs of 1024 and more go four at a time (see stats_mc). The gradient sums take
# one run at a time: paired and prefetched the same way (four interleaved streams:
# x and dy of two runs) they ran slower on two threads, (200704, 64) 13.4-16.5
# against 8.8-9.9 ms (medians of 20, three rounds; with ReLU no clear change).
# The element-wise passes gained nothing from runs while they wrote rows straight
# into the output; since they stream large outputs through a buffer (see
# :mod:`numbabn.kernels.stream`) they walk the same runs: with rows of C = 64 values,
# the per-row buffer bookkeeping made them 1.5-2x slower on two threads. They take
# the buffer once per group of runs (:func:`_group`, about chunk values), as the
# NCL ones take it once per block.
_FOLD = 256
# Runs of at least this many values are long: the backward's gradient sums walk four
# at a time (see grad_sums_mc).
_LONG_RUN = 1024


@_helper
def _ncl_block(t, shape, chunk):
    """Block t of the (N, C, L) grid -> (kn, n0, n1, c0, c1, l0, l1).

    Blocks hold R rows x G channels x W columns, rows cut in P pieces when L > chunk,
    R = 1 unless G = C (so a block is contiguous); they are numbered block-row-major:
    KN block rows along N (times pieces), KC blocks along C. kn is the block's row in
    the (KN, C) partials. A block holds fewer than 2*chunk values (G*L < chunk + L):
    the element-wise kernels buffer one whole block (tests/test_runtime.py checks it)."""
    N, C, L = shape
    if L >= chunk:
        P = (L + chunk - 1) // chunk
        R, G, W = 1, 1, (L + P - 1) // P
    else:
        P = 1
        S = _max(1, (C * L + chunk - 1) // chunk)  # blocks per sample, about equal
        G = (C + S - 1) // S
        R, W = _max(1, chunk // (G * L)), L
    KC = (C + G - 1) // G
    kn = t // KC
    kc = t - kn * KC
    nb = kn // P
    p = kn - nb * P
    return kn, nb * R, _min(nb * R + R, N), kc * G, _min(kc * G + G, C), p * W, _min(p * W + W, L)


def ncl_blocks(shape, chunk):
    """(blocks, partial rows) of the (N, C, L) grid of :func:`_ncl_block`, in Python for
    the driver (a jitted call per shape would cost a compile); tests/test_runtime.py
    checks that the two agree block for block."""
    N, C, L = shape
    if L >= chunk:
        P = -(-L // chunk)
        return N * P * C, N * P
    S = max(1, -(-C * L // chunk))
    G = -(-C // S)
    R = max(1, chunk // (G * L))
    KN = -(-N // R)
    return KN * -(-C // G), KN


# The reductions sum rows of fewer than _SHORT_L values by tiles (:func:`_ncl_tile`):
# R samples x G channels, G*L about _TILE values, R*G*L about a chunk. A sample's G*L
# values of a tile are one run, summed per entry into accumulators that stay in L1
# (as the channels-last runs are, :data:`_FOLD`) and folded per channel once per
# tile. A row at a time, a row of 16 values is too short for the vectorised loop,
# which runs it in its scalar remainder. The kernels alone, float32, one thread, min
# of 31, two alternating rounds (us, rows / tiles; statistics, then gradient sums
# with ReLU): 64x512x16 236-241 / 103-104, 360 / 246-256; 128x256x25 389-394 /
# 171-176, 530-531 / 419-432; 64x256x36 236-237 / 120, 470-621 / 274-275; 64x256x48
# 239-288 / 150-153, 380-469 / 363-366; 1024x512x16 (32 MB) 4330-4396 / 3415-3591,
# 6308-6529 / 5581-5806; 8x2048x16 145-147 / 95-96, 189-193 / 207-208. But rows of
# 49 values (7x7 maps) with few samples lost: 8x2048x49 243-247 / 313-314, 510-511
# / 649-674 (32x256x49: 117-124 / 103-104, 252 / 226-227).
_SHORT_L = 49
_TILE = 256


@_helper
def _tile_width(C, L):
    """Channels G per tile: about :data:`_TILE` values of rows of L, at least one
    channel, at most C (plain Python too: ``tile_blocks`` uses ``.py_func``, so no
    jitted helper is called here)."""
    G = _TILE // L
    if G < 1:
        G = 1
    return C if G > C else G


@_helper
def _ncl_tile(t, shape, chunk):
    """Tile t of the short-row reduction grid -> (kn, n0, n1, c0, c1): samples n0..n1,
    channels c0..c1, whole rows; kn is the tile's row in the (KN, C) partials. Tiles
    are numbered row-major: KN rows along N, KC tiles along C."""
    N, C, L = shape
    G = _tile_width(C, L)
    R = _max(1, chunk // (G * L))
    KC = (C + G - 1) // G
    kn = t // KC
    kc = t - kn * KC
    return kn, kn * R, _min(kn * R + R, N), kc * G, _min(kc * G + G, C)


def tile_blocks(shape, chunk):
    """(tiles, partial rows) of the short-row (N, C, L) grid of :func:`_ncl_tile`, in
    Python for the driver (tests/test_runtime.py checks that the two agree)."""
    N, C, L = shape
    G = _tile_width.py_func(C, L)
    R = max(1, chunk // (G * L))
    KN = -(-N // R)
    return KN * -(-C // G), KN


@_helper
def _ncl_span(shape, n0, n1, c0, c1, l0, l1):
    """The block (n0..n1, c0..c1, l0..l1) of :func:`_ncl_block` as one stretch of the
    flat array -> (b0, b1, w): values b0..b1, rows of w values, channels c0..c1 in
    turn (a block is contiguous, see there)."""
    C, L = shape[1], shape[2]
    return (n0 * C + c0) * L + l0, ((n1 - 1) * C + c1 - 1) * L + l1, l1 - l0


@_helper
def _mc_rows(shape, chunk):
    return _max(_MC_MIN_ROWS, chunk // shape[1])


@_helper
def _mc_apply_rows(shape, chunk):
    """Rows per block of the channels-last element-wise kernels: about a chunk of
    values. They keep no per-block partials, so the reductions' floor of
    :data:`_MC_MIN_ROWS` rows does not apply; without it a batch of fewer rows still
    splits into pieces for the threads (the short NCL rows of the driver's
    ``flat_rows`` view are one long row per sample)."""
    return _max(1, chunk // shape[1])


@_helper
def _fold(C):
    """Rows F per run of the channels-last kernels (plain Python too: the driver sizes
    the (4, F*C) coefficients with ``_fold.py_func``)."""
    F = _FOLD // C if C > 0 else 1
    return F if F > 1 else 1


# The element-wise passes (normalise, dx) walk shorter runs than the reductions: about
# _APPLY_RUN values, whole rows (F' = 32 // C rows, at most the coefficients' F). On a
# 51 MB channels-last input, one thread, min of 9 (a throwaway copy of the normalise
# loop): runs of 64 values (C = 64) took 4.75 ms against 5.35-5.95 for 128-512, C = 16
# 3.8 ms for runs of 16-32 against 4.4-6.2 for 64-512, C = 8 3.7-3.8 for 16-32 against
# 4.5-5.6 for 64-256; the same loop over the tiled (4, 256) coefficients in runs of 64
# took 3.6 ms against 5.4 in runs of 256, so it is the run, not the coefficients' layout.
# The kernels themselves, one thread, ordinary stores, alternating processes of the
# code before and after (min of 25 per round, four rounds; AVX-512 VM, 32 MiB L3):
# normalise (200704, 64) 3.58-3.98 ms against 3.83-6.09, (401408, 32) 3.46-4.31
# against 4.71-5.15, (802816, 16) 3.38-3.94 against 4.91-5.36; dx 5.45-6.10 against
# 5.70-7.31 at C = 64, no change at C = 100 (runs of 100 against 200).
_APPLY_RUN = 32


@_helper
def _apply_run(C, FC):
    """Values per run of the channels-last element-wise kernels: whole rows of C values,
    about :data:`_APPLY_RUN` of them, within the coefficients' F*C = ``FC``."""
    return C * _max(1, _min(FC // C, _APPLY_RUN // C))


@_helper
def _group(n, FC):
    """Values per output group of the channels-last element-wise kernels: whole runs
    of FC values, about ``n`` of them (at least one run): one buffer when streaming
    (:func:`numbabn.kernels.stream.window`), about a chunk otherwise. Groups of one
    buffer's size with ordinary stores made the (4096, 1024) eval slower (alternating
    processes, four rounds, us min: 730-1150 against 525-840 in chunk-sized groups)."""
    return FC * _max(1, n // FC)


@_helper
def _fold_sums(a, b, C, out_a, out_b):
    """out_a[c], out_b[c] = the sums of a run's per-entry sums ``a``, ``b`` over the
    entries j of channel c (j % C == c), in order."""
    for c in range(C):
        sa = 0.0
        sb = 0.0
        for j in range(c, a.size, C):
            sa += a[j]
            sb += b[j]
        out_a[c] = sa
        out_b[c] = sb


@_helper
def _fold_tile(a, b, L, c0, out_a, out_b):
    """out_a[c0 + g], out_b[c0 + g] = the sums of a tile's per-entry sums ``a``, ``b``
    over the entries of channel g (g*L <= j < (g+1)*L), in order."""
    for g in range(a.size // L):
        sa = 0.0
        sb = 0.0
        for j in range(g * L, g * L + L):
            sa += a[j]
            sb += b[j]
        out_a[c0 + g] = sa
        out_b[c0 + g] = sb


@_helper
def _spread(src, c0, c1, L, dst):
    """dst[g*L + l] = src[c0 + g]: a tile's per-entry copy of per-channel values."""
    for g in range(c1 - c0):
        v = src[c0 + g]
        for j in range(g * L, g * L + L):
            dst[j] = v


def mc_blocks(shape, chunk):
    """(blocks, partial rows) of the (M, C) grid: blocks of R rows of all channels."""
    M, C = shape
    R = max(_MC_MIN_ROWS, chunk // C)
    K = -(-M // R)
    return K, K


def mc_apply_blocks(shape, chunk):
    """Blocks of the (M, C) element-wise kernels (:func:`_mc_apply_rows` rows each)."""
    M, C = shape
    return -(-M // max(1, chunk // C))


# ------------------------------------------------------------------ statistics


@kernel(fastmath=_REDUCE)
def stats_ncl(x, chunk, cnt, part, t0, t1):
    """Per block of (N, C, L) ``x``: ``cnt[kn]`` values per channel, and per channel
    ``part[SHIFT]`` (first value, 0 if not finite), ``part[SUM]`` = sum d, ``part[SQ]`` = M2 about the
    block mean, with d = x - shift (float64)."""
    C, L = x.shape[1], x.shape[2]
    xf = x.reshape(x.size)
    for t in range(t0, t1):
        kn, n0, n1, c0, c1, l0, l1 = _ncl_block(t, x.shape, chunk)
        sh, s, q = part[SHIFT, kn], part[SUM, kn], part[SQ, kn]
        for c in range(c0, c1):
            sh[c] = _shift(decode(xf[(n0 * C + c) * L + l0]))
            s[c] = 0.0
            q[c] = 0.0
        for n in range(n0, n1):
            for c in range(c0, c1):
                i = (n * C + c) * L + l0
                row = xf[i : i + l1 - l0]
                shc = sh[c]
                s1 = 0.0
                s2 = 0.0
                for j in range(row.size):
                    d = decode(row[j]) - shc
                    s1 += d
                    s2 += d * d
                s[c] += s1
                q[c] += s2
        n = float((n1 - n0) * (l1 - l0))
        for c in range(c0, c1):
            q[c] = _max(q[c] - s[c] * s[c] / n, 0.0)
        cnt[kn] = n


@kernel(fastmath=_REDUCE)
def stats_mc(x, chunk, cnt, part, t0, t1):
    """Per block of rows of (M, C) ``x``; see :func:`stats_ncl`. Sums run per entry of
    the F-row runs (all about the block's first row) and are folded per channel."""
    R = _mc_rows(x.shape, chunk)
    M, C = x.shape
    FC = _fold(C) * C
    xf = x.reshape(x.size)
    # Always through the scratch rows, also for F = 1: summing straight into the
    # partials there (as grad_sums_mc does) was no faster, and copying the shift back
    # with a slice assignment took the first compile from 1.3 s to 3.7-4.2 s.
    acc = np.empty((3, FC))
    ahead = AHEAD_BYTES // xf.itemsize
    short = FC * xf.itemsize < SHORT_RUN_BYTES
    # float64 data: one run at a time (it reads 2x the bytes per value summed, and its
    # single-run loop was bound by memory: (200704, 64) on two threads 6.5-7.4 ms,
    # paired 7.8-9.7 with or without prefetching).
    paired = xf.itemsize < 8
    for k in range(t0, t1):
        r0 = k * R
        r1 = _min(r0 + R, M)
        sf, sj, qj = acc[SHIFT], acc[SUM], acc[SQ]
        for j in range(FC):
            sj[j] = 0.0
            qj[j] = 0.0
        for c in range(C):
            sf[c] = _shift(decode(x[r0, c]))
        for j in range(C, FC):
            sf[j] = sf[j - C]
        # Several runs per pass over the accumulators: their load-add-store bounds the
        # loop in cache, pairs halve it. Long runs (>= SHORT_RUN_BYTES: float32 C >=
        # 1024) go four at a time: with C = 1024 the accumulators fill the 32 KiB L1
        # and two more runs a pass halve that traffic again (kernel alone, alternating
        # processes, three rounds, min us: (4096, 1024) one thread 1036-1140 against
        # 1603-2209, two 635-1109 against 1060-1187; (8192, 2048) one thread
        # 4213-5059 against 6631-6909; AVX-512 VM, 32 MiB L3). Short runs stay in
        # pairs: four of them, prefetched alike, were slower ((65536, 64) one thread
        # 719-1072 against 650-865 us, (25088, 256) 1001-1181 against 916-958). Pairs
        # of short runs are prefetched (the interleaved reads ran slower from memory
        # without; see .prefetch). The last run or two of a block (the last may be
        # partial) are summed one at a time: pairing it with a run of shift values
        # (d = 0) instead compiles no faster and took (200704, 64) from 4.3-4.7 to
        # 5.0-5.3 ms on two threads.
        i, end = r0 * C, r1 * C
        while paired and not short and i + 4 * FC <= end:
            a, b = xf[i : i + FC], xf[i + FC : i + 2 * FC]
            e, f = xf[i + 2 * FC : i + 3 * FC], xf[i + 3 * FC : i + 4 * FC]
            for j in range(FC):
                s = sf[j]
                d0 = decode(a[j]) - s
                d1 = decode(b[j]) - s
                d2 = decode(e[j]) - s
                d3 = decode(f[j]) - s
                sj[j] += (d0 + d1) + (d2 + d3)
                qj[j] += (d0 * d0 + d1 * d1) + (d2 * d2 + d3 * d3)
            i += 4 * FC
        while paired and i + 2 * FC <= end:
            if short:
                prefetch(xf, i + ahead, i + ahead + 2 * FC)
            a, b = xf[i : i + FC], xf[i + FC : i + 2 * FC]
            for j in range(FC):
                d0 = decode(a[j]) - sf[j]
                d1 = decode(b[j]) - sf[j]
                sj[j] += d0 + d1
                qj[j] += d0 * d0 + d1 * d1
            i += 2 * FC
        for i0 in range(i, end, FC):
            run = xf[i0 : _min(i0 + FC, end)]
            for j in range(run.size):
                d = decode(run[j]) - sf[j]
                sj[j] += d
                qj[j] += d * d
        sh, s, q = part[SHIFT, k], part[SUM, k], part[SQ, k]
        _fold_sums(sj, qj, C, s, q)
        n = float(r1 - r0)
        for c in range(C):
            sh[c] = sf[c]
            q[c] = _max(q[c] - s[c] * s[c] / n, 0.0)
        cnt[k] = n


@kernel(fastmath=_REDUCE)
def stats_tiles(x, chunk, cnt, part, t0, t1):
    """:func:`stats_ncl` for rows shorter than :data:`_SHORT_L`, over the tiles
    t0..t1 of :func:`_ncl_tile` (a tile's shift is each channel's first value in it):
    per entry of a sample's run of G*L values, two samples a pass over the
    accumulators (as in :func:`stats_mc`), folded per channel once per tile."""
    C, L = x.shape[1], x.shape[2]
    xf = x.reshape(x.size)
    acc = np.empty((3, _tile_width(C, L) * L))
    for t in range(t0, t1):
        kn, n0, n1, c0, c1 = _ncl_tile(t, x.shape, chunk)
        E = (c1 - c0) * L
        sf, sj, qj = acc[SHIFT, :E], acc[SUM, :E], acc[SQ, :E]
        ts, tq = part[SUM, kn], part[SQ, kn]
        for c in range(c0, c1):
            part[SHIFT, kn, c] = _shift(decode(xf[(n0 * C + c) * L]))
        _spread(part[SHIFT, kn], c0, c1, L, sf)
        for j in range(E):
            sj[j] = 0.0
            qj[j] = 0.0
        # two samples a pass over the accumulators, as in stats_mc
        k = n0
        while k + 2 <= n1:
            i = (k * C + c0) * L
            ra, rb = xf[i : i + E], xf[i + C * L : i + C * L + E]
            for j in range(E):
                d0 = decode(ra[j]) - sf[j]
                d1 = decode(rb[j]) - sf[j]
                sj[j] += d0 + d1
                qj[j] += d0 * d0 + d1 * d1
            k += 2
        if k < n1:
            i = (k * C + c0) * L
            ra = xf[i : i + E]
            for j in range(E):
                d = decode(ra[j]) - sf[j]
                sj[j] += d
                qj[j] += d * d
        _fold_tile(sj, qj, L, c0, ts, tq)
        m = float((n1 - n0) * L)
        for c in range(c0, c1):
            tq[c] = _max(tq[c] - ts[c] * ts[c] / m, 0.0)
        cnt[kn] = m


# ------------------------------------------------------------------ coefficients


@_helper
def _tile(coef, C):
    """Repeat the first C columns of (K, F*C) ``coef`` along its rows: entry j of a
    channels-last run of F rows belongs to channel j % C."""
    for j in range(C, coef.shape[1]):
        for r in range(coef.shape[0]):
            coef[r, j] = coef[r, j - C]


@_helper
def _weighted_mean(cnt, part, c, count, stats):
    """Channel c's merged (mean - shift_0, M2) of data holding an infinity or NaN, for
    which the Chan merge's mean is not finite: the count-weighted mean of the block
    means keeps +-inf where Chan's difference makes inf + (finite - inf) = NaN at a
    finite block after an infinite one (PyTorch: running_mean +-inf, var NaN)."""
    ref = part[SHIFT, 0, c]
    mu = 0.0
    for k in range(cnt.size):
        mu += (cnt[k] / count) * ((part[SHIFT, k, c] - ref) + part[SUM, k, c] / cnt[k])
    stats[0, c] = mu
    stats[1, c] = np.nan


@kernel()
def coefficients(cnt, part, gamma, beta, running_mean, running_var, momentum, eps, training, stats, mean, invstd, coef):
    """Fills ``mean``, ``invstd`` (float64) and ``coef`` (4, F*C) in the compute dtype: the halved
    split mean (HI + LO = mean/2), A = 2*gamma*invstd, B = beta - A*LO (empty gamma/beta
    mean 1 and 0), repeated F times along a row (F = 1 but for short channels-last
    rows, :func:`_fold`).

    Training: first merges the block partials (``cnt`` (K,), ``part`` (3, K, C), see
    :func:`stats_ncl`) with Chan et al.'s formula, in block order, into ``stats`` =
    (2, C) float64 [mean, M2] of m = sum(cnt) values per channel. Block means enter the
    merge relative to block 0's shift (``shift_k - shift_0`` is an exact difference of
    input values), so their differences carry no rounding of order ``|mean|``. Given
    moments arrive as one block: shift = mean, sum = 0, M2. The running statistics,
    when non-empty, are then updated in place::

        running_mean <- (1-momentum)*running_mean + momentum*mean
        running_var  <- (1-momentum)*running_var  + momentum*var*m/(m-1)

    Eval: from the running statistics (read only); ``cnt``/``part`` are ignored.
    """
    C = mean.size
    count = 0.0
    if training:
        ref = part[SHIFT, 0]
        na = cnt[0]
        for c in range(C):
            stats[0, c] = part[SUM, 0, c] / na
            stats[1, c] = part[SQ, 0, c]
        for k in range(1, cnt.size):
            nb = cnt[k]
            n = na + nb
            wb = nb / n
            wab = na * nb / n
            for c in range(C):
                d = ((part[SHIFT, k, c] - ref[c]) + part[SUM, k, c] / nb) - stats[0, c]
                stats[0, c] += d * wb
                stats[1, c] += part[SQ, k, c] + d * d * wab
            na = n
        count = na
        for c in range(C):
            if not abs(stats[0, c]) < np.inf:
                _weighted_mean(cnt, part, c, count, stats)
            stats[0, c] += ref[c]
    t = coef.dtype.type
    keep = 1.0 - momentum
    unbiased = count / (count - 1.0)
    for c in range(C):
        if training:
            mean[c] = stats[0, c]
            var = stats[1, c] / count
            if running_mean.size > 0:
                running_mean[c] = keep * running_mean[c] + momentum * mean[c]
                running_var[c] = keep * running_var[c] + momentum * var * unbiased
        else:
            mean[c] = running_mean[c]
            var = np.float64(running_var[c])
        invstd[c] = 1.0 / np.sqrt(var + eps)
        half = 0.5 * mean[c]
        hi = t(half)
        lo = t(half - hi)
        a = t(2.0 * invstd[c] * gamma[c]) if gamma.size > 0 else t(2.0 * invstd[c])
        b = np.float64(beta[c]) if beta.size > 0 else 0.0
        coef[HI, c] = hi
        coef[LO, c] = lo
        coef[A, c] = a
        # lo*a in float64 from the rounded lo and a, so that a*(x/2 - hi) + B is a*d + beta
        # up to B's one rounding; skipped when lo is 0 (always for float64 data), which
        # also keeps an infinite a (gamma of 1e38) from making B a NaN (inf*0)
        coef[B, c] = t(b - np.float64(lo) * np.float64(a)) if lo != 0 else t(b)
    _tile(coef, C)


# ------------------------------------------------------------------ forward apply


@kernel()
def apply_ncl(x, res, coef, relu, chunk, stream, y, t0, t1):
    """y = normalise(x) (+ res) over the blocks t0..t1 of (N, C, L) arrays, written
    with non-temporal stores if ``stream`` (:mod:`numbabn.kernels.stream`)."""
    half = coef.dtype.type(0.5)
    zero = coef.dtype.type(0)
    xf, yf, rf = x.reshape(x.size), y.reshape(y.size), _flat(res)
    tmp = S.scratch(S.window(y), y, stream)
    p = base = 0
    for t in range(t0, t1):
        kn, n0, n1, c0, c1, l0, l1 = _ncl_block(t, x.shape, chunk)
        b0, b1, w = _ncl_span(x.shape, n0, n1, c0, c1, l0, l1)
        # rows of w values (row end e), channels c0..c1 in turn; a row is split where
        # the buffer fills (no division per row: it cost short rows, 196 values, ~1/4)
        i, e, c = b0, b0 + w, c0
        while i < b1:
            out, m, p, base = S.target(yf, i, e, tmp, p, base, stream)
            row, rrow = xf[i : i + m], _run(res, rf, i, i + m)
            hi, lo, a, b = coef[HI, c], coef[LO, c], coef[A, c], coef[B, c]
            for j in range(m):
                out[j] = encode(_normalise(decode(row[j]), half, hi, lo, a, b, relu, zero, _at(rrow, j))[1], out)
            i += m
            if i == e:
                e += w
                c = c0 if c + 1 == c1 else c + 1
    if stream:
        S.flush(yf, tmp, p, base)


@kernel()
def apply_mc(x, res, coef, relu, chunk, stream, y, t0, t1):
    """y = normalise(x) (+ res) over the row blocks t0..t1 of (M, C) arrays; see
    :func:`apply_ncl`."""
    R = _mc_apply_rows(x.shape, chunk)
    half = coef.dtype.type(0.5)
    zero = coef.dtype.type(0)
    C = x.shape[1]
    hi, lo, a, b = coef[HI], coef[LO], coef[A], coef[B]
    xf, yf, rf = x.reshape(x.size), y.reshape(y.size), _flat(res)
    FC = _apply_run(C, coef.shape[1])
    end = _min(t1 * R, x.shape[0]) * C
    step = _group(S.window(y) if stream else chunk, FC)  # see _group
    tmp = S.scratch(step, y, stream)
    p = base = 0
    for i in range(t0 * R * C, end, step):
        i1 = _min(i + step, end)
        grp = xf[i:i1]
        out, _, p, base = S.target(yf, i, i1, tmp, p, base, stream)
        rgrp = _run(res, rf, i, i1)
        for o in range(0, i1 - i, FC):
            o1 = _min(o + FC, i1 - i)
            run, orun, rrun = grp[o:o1], out[o:o1], _run(res, rgrp, o, o1)
            for j in range(run.size):
                orun[j] = encode(
                    _normalise(decode(run[j]), half, hi[j], lo[j], a[j], b[j], relu, zero, _at(rrun, j))[1], orun
                )
    if stream:
        S.flush(yf, tmp, p, base)


# ------------------------------------------------------------------ backward


@kernel(fastmath=_REDUCE)
def grad_sums_ncl(dy, x, res, coef, relu, chunk, part, t0, t1):
    """Per block row and channel: part[SG] = sum g, part[SGD] = sum g*d (float64),
    g = dy masked by the forward's ReLU, d = (x - mean)/2."""
    half = coef.dtype.type(0.5)
    zero = coef.dtype.type(0)
    C, L = x.shape[1], x.shape[2]
    xf, gf, rf = x.reshape(x.size), dy.reshape(dy.size), _flat(res)
    for t in range(t0, t1):
        kn, n0, n1, c0, c1, l0, l1 = _ncl_block(t, x.shape, chunk)
        sg, sgd = part[SG, kn], part[SGD, kn]
        for c in range(c0, c1):
            sg[c] = 0.0
            sgd[c] = 0.0
        for n in range(n0, n1):
            for c in range(c0, c1):
                i = (n * C + c) * L + l0
                i1 = i + l1 - l0
                row = xf[i:i1]
                grow = gf[i:i1]
                rrow = _run(res, rf, i, i1)
                hi, lo, a, b = coef[HI, c], coef[LO, c], coef[A, c], coef[B, c]
                p0 = 0.0
                p1 = 0.0
                for j in range(row.size):
                    d, g = _masked(decode(row[j]), decode(grow[j]), half, hi, lo, a, b, relu, zero, _at(rrow, j))
                    p0 += g
                    p1 += np.float64(g) * np.float64(d)
                sg[c] += p0
                sgd[c] += p1


@kernel(fastmath=_REDUCE)
def grad_sums_mc(dy, x, res, coef, relu, chunk, part, t0, t1):
    """Per row block of (M, C) arrays, in runs of F rows folded per channel; see
    :func:`grad_sums_ncl`."""
    R = _mc_rows(x.shape, chunk)
    M, C = x.shape
    FC = coef.shape[1]
    half = coef.dtype.type(0.5)
    zero = coef.dtype.type(0)
    hi, lo, a, b = coef[HI], coef[LO], coef[A], coef[B]
    xf, gf, rf = x.reshape(x.size), dy.reshape(dy.size), _flat(res)
    acc = np.empty((2, FC if FC > C else 0))
    long = FC >= _LONG_RUN and xf.itemsize >= 4
    for k in range(t0, t1):
        r1 = _min(k * R + R, M)
        # One row per run (F = 1): the sums go straight into the partials.
        sgj, sgdj = (acc[SG], acc[SGD]) if FC > C else (part[SG, k], part[SGD, k])
        for j in range(FC):
            sgj[j] = 0.0
            sgdj[j] = 0.0
        # Long runs four at a time: at C = 1024 the float64 sums and the coefficients
        # fill the 32 KiB L1 (the kernel alone, one thread, alternating processes,
        # min us: (4096, 1024) 2124-2254 against 2800-3532, (1024, 1024) 231-346
        # against 394-501, (8192, 2048) 8075-10820 against 11861-13059; float64
        # (2048, 1024) 1226-1491 against 2124-2161). Pairs gained less ((8192,
        # 2048) 8935-9769 us, (4096, 1024) no change); float64 (4096, 512) ran
        # slower in fours (1992-2234 against 1244-1938), float16 (4096, 1024)
        # through the API no faster.
        i, end = k * R * C, r1 * C
        # With a residual (this branch is pruned for that signature) the runs go one at
        # a time: four at a time through _gd, the residual sums took 10.1-10.3 ms
        # against 3.5-4.5 ((4096, 1024), one thread, three rounds).
        if res is None:
            while long and i + 4 * FC <= end:
                i1, i2, i3 = i + FC, i + 2 * FC, i + 3 * FC
                x0, x1, x2, x3 = xf[i:i1], xf[i1:i2], xf[i2:i3], xf[i3 : i3 + FC]
                y0, y1, y2, y3 = gf[i:i1], gf[i1:i2], gf[i2:i3], gf[i3 : i3 + FC]
                for j in range(FC):
                    # the coefficients as four scalars: passed to _gd as one tuple
                    # with *, they kept the loop from vectorising (3x slower)
                    hj, lj, aj, bj = hi[j], lo[j], a[j], b[j]
                    g0, d0 = _gd(x0, y0, j, half, hj, lj, aj, bj, relu, zero)
                    g1, d1 = _gd(x1, y1, j, half, hj, lj, aj, bj, relu, zero)
                    g2, d2 = _gd(x2, y2, j, half, hj, lj, aj, bj, relu, zero)
                    g3, d3 = _gd(x3, y3, j, half, hj, lj, aj, bj, relu, zero)
                    sgj[j] += (g0 + g1) + (g2 + g3)
                    sgdj[j] += (g0 * d0 + g1 * d1) + (g2 * d2 + g3 * d3)
                i += 4 * FC
        for i0 in range(i, end, FC):
            i1 = _min(i0 + FC, end)
            run, grun, rrun = xf[i0:i1], gf[i0:i1], _run(res, rf, i0, i1)
            for j in range(run.size):
                d, g = _masked(
                    decode(run[j]), decode(grun[j]), half, hi[j], lo[j], a[j], b[j], relu, zero, _at(rrun, j)
                )
                sgj[j] += g
                sgdj[j] += np.float64(g) * np.float64(d)
        if FC > C:
            _fold_sums(sgj, sgdj, C, part[SG, k], part[SGD, k])


@kernel(fastmath=_REDUCE)
def grad_sums_tiles(dy, x, res, coef, relu, chunk, part, t0, t1):
    """:func:`grad_sums_ncl` for rows shorter than :data:`_SHORT_L`, over the tiles of
    :func:`_ncl_tile` as in :func:`stats_tiles`, with the coefficients spread to one
    per entry."""
    half = coef.dtype.type(0.5)
    zero = coef.dtype.type(0)
    C, L = x.shape[1], x.shape[2]
    xf, gf, rf = x.reshape(x.size), dy.reshape(dy.size), _flat(res)
    E0 = _tile_width(C, L) * L
    acc = np.empty((2, E0))
    cf = np.empty((4, E0), coef.dtype)
    for t in range(t0, t1):
        kn, n0, n1, c0, c1 = _ncl_tile(t, x.shape, chunk)
        E = (c1 - c0) * L
        sgj, sgdj = acc[SG, :E], acc[SGD, :E]
        th, tl, ta, tb = cf[HI, :E], cf[LO, :E], cf[A, :E], cf[B, :E]
        _spread(coef[HI], c0, c1, L, th)
        _spread(coef[LO], c0, c1, L, tl)
        _spread(coef[A], c0, c1, L, ta)
        _spread(coef[B], c0, c1, L, tb)
        for j in range(E):
            sgj[j] = 0.0
            sgdj[j] = 0.0
        k = n0
        # two samples a pass, as in stats_tiles (the residual's signature takes one)
        while res is None and k + 2 <= n1:
            i = (k * C + c0) * L
            i2 = i + C * L
            x0, x1, y0, y1 = xf[i : i + E], xf[i2 : i2 + E], gf[i : i + E], gf[i2 : i2 + E]
            for j in range(E):
                hj, lj, aj, bj = th[j], tl[j], ta[j], tb[j]
                g0, d0 = _gd(x0, y0, j, half, hj, lj, aj, bj, relu, zero)
                g1, d1 = _gd(x1, y1, j, half, hj, lj, aj, bj, relu, zero)
                sgj[j] += g0 + g1
                sgdj[j] += g0 * d0 + g1 * d1
            k += 2
        for n in range(k, n1):
            i = (n * C + c0) * L
            run, grun, rrun = xf[i : i + E], gf[i : i + E], _run(res, rf, i, i + E)
            for j in range(E):
                d, g = _masked(
                    decode(run[j]), decode(grun[j]), half, th[j], tl[j], ta[j], tb[j], relu, zero, _at(rrun, j)
                )
                sgj[j] += g
                sgdj[j] += np.float64(g) * np.float64(d)
        _fold_tile(sgj, sgdj, L, c0, part[SG, kn], part[SGD, kn])


@kernel()
def grad_coefficients(part, scale, count, invstd, gamma, training, gcoef, dgamma, dbeta):
    """From the (2, K, C) float64 partials [sum g, sum g*d], summed over blocks in block
    order with the second row times ``scale`` (2 for the kernels' partials, whose d is
    (x - mean)/2; 1 for sums over all ranks, passed as one block) into
    S = [sum g, sum g*(x - mean)]: dgamma = invstd*S[1], dbeta = S[0] (in the compute dtype),
    and gcoef (3, F*C) (repeated F times along a row, as in :func:`coefficients`) of
    dx = GA*g + GB*d + GD with d = (x - mean)/2::

        GA = gamma*invstd,  GB = -2*GA*invstd*dgamma/m,  GD = -GA*dbeta/m   (training)
        GB = GD = 0                                                        (eval)
    """
    t = gcoef.dtype.type
    K = part.shape[1]
    for c in range(invstd.size):
        db = 0.0
        sgd = 0.0
        for k in range(K):
            db += part[SG, k, c]
            sgd += part[SGD, k, c]
        dg = sgd * scale * invstd[c]
        ga = invstd[c] * gamma[c] if gamma.size > 0 else invstd[c]
        gcoef[GA, c] = t(ga)
        gcoef[GB, c] = t(-2.0 * ga * invstd[c] * dg / count) if training else t(0)
        gcoef[GD, c] = t(-ga * db / count) if training else t(0)
        dgamma[c] = t(dg)
        dbeta[c] = t(db)
    _tile(gcoef, invstd.size)


@kernel()
def grad_apply_ncl(dy, x, res, coef, gcoef, relu, chunk, stream, dx, dres, t0, t1):
    """dx (and dres = g unless None) over the blocks t0..t1 of (N, C, L) arrays, dx
    written with non-temporal stores if ``stream``."""
    half = coef.dtype.type(0.5)
    zero = coef.dtype.type(0)
    xf, gf, of = x.reshape(x.size), dy.reshape(dy.size), dx.reshape(dx.size)
    rf, df = _flat(res), _flat(dres)
    tmp = S.scratch(S.window(dx), dx, stream)
    p = base = 0
    for t in range(t0, t1):
        kn, n0, n1, c0, c1, l0, l1 = _ncl_block(t, x.shape, chunk)
        b0, b1, w = _ncl_span(x.shape, n0, n1, c0, c1, l0, l1)
        i, e, c = b0, b0 + w, c0
        while i < b1:  # as in apply_ncl
            out, m, p, base = S.target(of, i, e, tmp, p, base, stream)
            row, grow = xf[i : i + m], gf[i : i + m]
            rrow, rout = _run(res, rf, i, i + m), _run(dres, df, i, i + m)
            hi, lo, a, b = coef[HI, c], coef[LO, c], coef[A, c], coef[B, c]
            ga, gb, gd = gcoef[GA, c], gcoef[GB, c], gcoef[GD, c]
            for j in range(m):
                d, g = _masked(decode(row[j]), decode(grow[j]), half, hi, lo, a, b, relu, zero, _at(rrow, j))
                out[j] = encode(_dx(g, d, ga, gb, gd, zero), out)
                _store(rout, j, g)
            i += m
            if i == e:
                e += w
                c = c0 if c + 1 == c1 else c + 1
    if stream:
        S.flush(of, tmp, p, base)


@kernel()
def grad_apply_mc(dy, x, res, coef, gcoef, relu, chunk, stream, dx, dres, t0, t1):
    """dx (and dres = g unless None) over the row blocks t0..t1 of (M, C) arrays; see
    :func:`grad_apply_ncl`."""
    R = _mc_apply_rows(x.shape, chunk)
    half = coef.dtype.type(0.5)
    zero = coef.dtype.type(0)
    C = x.shape[1]
    hi, lo, a, b = coef[HI], coef[LO], coef[A], coef[B]
    ga, gb, gd = gcoef[GA], gcoef[GB], gcoef[GD]
    xf, gf, of = x.reshape(x.size), dy.reshape(dy.size), dx.reshape(dx.size)
    rf, df = _flat(res), _flat(dres)
    FC = _apply_run(C, coef.shape[1])
    end = _min(t1 * R, x.shape[0]) * C
    step = _group(S.window(dx) if stream else chunk, FC)
    tmp = S.scratch(step, dx, stream)
    p = base = 0
    for i in range(t0 * R * C, end, step):
        i1 = _min(i + step, end)
        grp, ggrp = xf[i:i1], gf[i:i1]
        out, _, p, base = S.target(of, i, i1, tmp, p, base, stream)
        rgrp, dgrp = _run(res, rf, i, i1), _run(dres, df, i, i1)
        for o in range(0, i1 - i, FC):
            o1 = _min(o + FC, i1 - i)
            run, grun, orun = grp[o:o1], ggrp[o:o1], out[o:o1]
            rrun, rout = _run(res, rgrp, o, o1), _run(dres, dgrp, o, o1)
            for j in range(run.size):
                d, g = _masked(
                    decode(run[j]), decode(grun[j]), half, hi[j], lo[j], a[j], b[j], relu, zero, _at(rrun, j)
                )
                orun[j] = encode(_dx(g, d, ga[j], gb[j], gd[j], zero), orun)
                _store(rout, j, g)
    if stream:
        S.flush(of, tmp, p, base)
