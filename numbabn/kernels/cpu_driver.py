"""Drivers of the CPU kernels: pick the specialisation, allocate partials, schedule.

Each kernel is compiled for exactly one signature per storage dtype and layout
(``ncl`` = 3-D, ``mc`` = 2-D; ``tiles``, 3-D inputs with short rows, has its own two
reductions and shares the rest with ``ncl``), with read-only input arrays, so read-only, writeable
and freshly copied inputs all share it (:mod:`numbabn._jit`). Eval with float64
running statistics on float32 input adds one small coefficient kernel.
Callers (:mod:`numbabn.backends.cpu`) pass canonical arrays: C-contiguous, aligned,
native byte order, float32/float64, or the 16-bit storage of float16/bfloat16 data
(:data:`numbabn._layout.STORAGE`), computed in float32: coefficients,
parameters, running statistics and parameter gradients are then float32. The
per-channel kernels (coefficients) depend on the compute dtype only, so a 16-bit
input shares them with float32.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numba import from_dtype, types
from numpy.typing import NDArray

from .. import _compile_ahead, _stores, _threads, config
from .._jit import require_compiler
from .._layout import BFLOAT16, STORAGE, compute_dtype
from . import cpu

_F64 = types.float64
_I64 = types.int64
_BOOL = types.boolean
_NONE = types.none


def _arr(dtype: Any, ndim: int, readonly: bool = False) -> Any:
    return types.Array(from_dtype(np.dtype(dtype)), ndim, "C", readonly=readonly)


# A cold training forward (its statistics kernel missing from the disk cache) has a
# helper process compile the backward's kernels meanwhile (numbabn._compile_ahead).
_AHEAD = {"stats": ("grad_sums", "grad_coef", "grad_apply"), "apply_res": ("grad_sums_res", "grad_apply_res")}
_ELEMENTWISE = {"grad_apply", "grad_apply_res"}  # of the layout an input's element-wise passes use


class _Specs:
    """The compiled kernels of one (storage dtype, layout), specialised on first use."""

    def __init__(self, dtype: Any, layout: str) -> None:
        require_compiler()  # before cpu._fold.py_func: with NUMBA_DISABLE_JIT it is a plain function
        self.key = np.dtype(dtype).char
        nd = 2 if layout == "mc" else 3
        cdt = compute_dtype(dtype)  # float32 for the 16-bit storage integers
        X, Y = _arr(dtype, nd, True), _arr(dtype, nd)
        P, W = _arr(cdt, 1, True), _arr(cdt, 1)
        CO, CW = _arr(cdt, 2, True), _arr(cdt, 2)
        f1, f2, f3 = _arr(np.float64, 1), _arr(np.float64, 2), _arr(np.float64, 3)
        f1r, f3r = _arr(np.float64, 1, True), _arr(np.float64, 3, True)
        # "tiles": (N, C, L) inputs with short rows, whose reductions walk tiles of
        # samples x channels (cpu.stats_tiles), their element-wise passes NCL blocks
        suffix = "_" + layout
        each = "_ncl" if layout == "tiles" else suffix
        self.layout = layout
        self.grid = {"ncl": cpu.ncl_blocks, "mc": cpu.mc_blocks, "tiles": cpu.tile_blocks}[layout]
        self.dtype = dtype
        # Layouts whose element-wise kernels (grad_apply...) this layout's inputs have
        # used (see _Walk): what a cold forward hands the compile helper.
        self.element_layouts: set[str] = set()
        # Coefficients repeat F times per row for the channels-last kernels' runs of F rows.
        self.fold = cpu._fold.py_func if layout == "mc" else (lambda C: 1)
        self._sigs = {
            "stats": (getattr(cpu, "stats" + suffix), (X, _I64, f1, f3, _I64, _I64)),
            "coef": (cpu.coefficients, (f1r, f3r, P, P, W, W, _F64, _F64, _BOOL, f2, f1, f1, CW)),
            "apply": (getattr(cpu, "apply" + each), (X, _NONE, CO, _BOOL, _I64, _BOOL, Y, _I64, _I64)),
            "grad_sums": (getattr(cpu, "grad_sums" + suffix), (X, X, _NONE, CO, _BOOL, _I64, f3, _I64, _I64)),
            "grad_coef": (cpu.grad_coefficients, (f3r, _F64, _F64, f1r, P, _BOOL, CW, W, W)),
            "grad_apply": (
                getattr(cpu, "grad_apply" + each),
                (X, X, _NONE, CO, CO, _BOOL, _I64, _BOOL, Y, _NONE, _I64, _I64),
            ),
            # Residual fusion: the same kernel bodies with the residual (and its
            # gradient) as arrays instead of None; compiled only when first used.
            "apply_res": (getattr(cpu, "apply" + each), (X, X, CO, _BOOL, _I64, _BOOL, Y, _I64, _I64)),
            "grad_sums_res": (getattr(cpu, "grad_sums" + suffix), (X, X, X, CO, _BOOL, _I64, f3, _I64, _I64)),
            "grad_apply_res": (
                getattr(cpu, "grad_apply" + each),
                (X, X, X, CO, CO, _BOOL, _I64, _BOOL, Y, Y, _I64, _I64),
            ),
        }
        self.compute = cdt  # of coefficients, parameters and running statistics

    def __getattr__(self, name: str) -> Any:
        # First use of a kernel of this (dtype, layout): compile or load it, then
        # keep the dispatcher as a plain attribute (no lookup on later calls).
        try:
            kern, sig = self._sigs[name]
        except KeyError:
            raise AttributeError(name) from None
        ahead = self._ahead(name)
        on_miss = (lambda: _compile_ahead.start(self.key, ahead)) if ahead else None
        _compile_ahead.wait(self.key, self.layout, name)
        disp = kern.specialize(sig, on_miss)
        setattr(self, name, disp)
        return disp

    def _ahead(self, name: str) -> list[tuple[str, str]]:
        """[(layout, kernel name)] not yet loaded that a cache miss of kernel ``name``
        hands the compile helper: the backward's reductions of this layout, and its
        element-wise kernels of the layouts this layout's inputs walk them in."""
        return [
            (layout, n)
            for layout in sorted({self.layout} | self.element_layouts)
            for n in _AHEAD.get(name, ())
            if (layout in self.element_layouts if n in _ELEMENTWISE else layout == self.layout)
            and n not in (self if layout == self.layout else specs(self.dtype, layout)).__dict__
        ]

    def coef_with(self, stats_dtype: Any) -> Any:
        """:func:`cpu.coefficients` for running statistics of another dtype (float64
        statistics of float32 input, in eval)."""
        if stats_dtype is self.compute or np.dtype(stats_dtype) == self.compute:
            return self.coef
        name = "coef_" + np.dtype(stats_dtype).char
        disp = self.__dict__.get(name)
        if disp is None:
            kern, sig = self._sigs["coef"]
            R = _arr(stats_dtype, 1)
            disp = kern.specialize(sig[:4] + (R, R) + sig[6:])  # running_mean, running_var
            setattr(self, name, disp)
        return disp

    def kernel(self, name: str) -> Any:
        """The kernel (not yet specialised) behind ``name``: "tiles" and "ncl" share all
        but their reductions."""
        return self._sigs[name][0]

    def all_names(self, residual: bool = False) -> list[str]:
        """The kernel names, the fused-residual variants only if ``residual``."""
        return [n for n in self._sigs if residual or not n.endswith("_res")]


_SPECS: dict[Any, Any] = {}
_NO_CNT, _NO_PART, _NO_STATS = np.empty(0), np.empty((3, 0, 0)), np.empty((2, 0))
_EMPTY = {"f": np.empty(0, np.float32), "d": np.empty(0, np.float64)}


def specs(dtype: Any, layout: str) -> "_Specs":
    """The :class:`_Specs` of ``dtype`` (a native float32/float64 np.dtype, or a 16-bit
    storage dtype) and ``layout``."""
    s = _SPECS.get((dtype.char, layout))
    if s is None:
        s = _SPECS.setdefault((np.dtype(dtype).char, layout), _Specs(dtype, layout))
    return s


_PLANS: dict[Any, Any] = {}


def plan(x: NDArray[Any], layout: str, chunk: int) -> tuple["_Specs", int, int, Any, Any]:
    """(kernels, blocks, partial rows, normalise walk, dx walk) for canonical ``x``: its
    :class:`_Specs`, the block grid of its shape, and how the two element-wise passes
    walk it (:class:`_Walk`); (N, C, L) inputs with rows shorter than ``cpu._SHORT_L``
    get the "tiles" kernels (their own reductions, the NCL element-wise ones). Memoised
    in one lookup (few shapes recur; on a small input the driver's Python time is what
    a call costs); the layout is x's ndim. An input without values has no blocks (and
    an (N, C, 0) one no grid)."""
    if not x.size:
        return specs(x.dtype, layout), 0, 0, None, None
    key = (x.shape, x.dtype.char, chunk)
    p = _PLANS.get(key)
    if p is None:
        k = specs(x.dtype, "tiles" if layout == "ncl" and x.shape[2] < cpu._SHORT_L else layout)
        grid = k.grid(x.shape, chunk)
        p = (k, *grid, _Walk(k, x, chunk, SHORT_ROW), _Walk(k, x, chunk, SHORT_ROW_DX, dx=True))
        if len(_PLANS) < 4096:
            _PLANS[key] = p
    return p


#: (N, C, L) inputs with rows of fewer values than this run their normalise pass as
#: channels-last (N, C*L) arrays, with each channel's coefficients repeated L times
#: (:class:`_Walk`): one vectorised loop over a sample's C*L values instead of C loops
#: of L values, which on rows this short run mostly in the scalar remainder of the
#: vectorised loop. float32, two threads, the pass alone (ms, NCL kernel / channels-last
#: view): 64x512x16 0.37 / 0.19, 128x512x16 0.59 / 0.25, 128x512x36 0.69 / 0.42-0.53,
#: 128x256x49 0.42-0.50 / 0.26, 128x512x49 0.70-0.74 / 0.61, but 64x256x64 0.36 / 0.32
#: and 64x128x100 0.23 / 0.24.
SHORT_ROW = 64
#: The same for the dx pass, which reads seven coefficient rows to normalise's three:
#: 128x512x16 0.70 / 0.33 ms, 64x2048x16 1.21 / 0.70, 128x512x36 0.88-0.90 / 0.78, but
#: 128x256x49 0.46-0.52 / 0.44, 128x512x49 0.97-0.99 / 0.98 and 64x256x64 0.42 / 0.53:
#: too little to pay for repeating the coefficients (tens of us).
SHORT_ROW_DX = 32
#: ... both as long as the repeated coefficients stay cache-sized (C*L values a row; at
#: C*L = 100352, 32x2048x49, normalise was no faster and dx 1.3x slower).
SHORT_ROW_MAX_ENTRIES = 1 << 15


class _Walk:
    """How one element-wise pass walks canonical ``x`` of one shape: with x's own
    kernels and element blocks, or, for short (N, C, L) rows (fewer than ``short``
    values, :data:`SHORT_ROW`), with the channels-last kernels of the same dtype on the
    (N, C*L) view and every coefficient repeated L times (:meth:`coefficients`). The
    results are the same bits either way: the same element helpers on the same
    coefficient values. ``dx``: the backward's pass, whose kernel the compile helper
    builds ahead (:meth:`_Specs._ahead`) in the layout this walk uses."""

    def __init__(self, own: "_Specs", x: NDArray[Any], chunk: int, short: int, dx: bool = False) -> None:
        k = own
        self.repeat = 0
        self.shape = x.shape
        if k.layout != "mc" and x.shape[2] < short and x.shape[1] * x.shape[2] <= SHORT_ROW_MAX_ENTRIES:
            self.repeat = x.shape[2]
            self.shape = (x.shape[0], x.shape[1] * x.shape[2])
            k = specs(x.dtype, "mc")
        if dx and k.layout not in own.element_layouts:
            own.element_layouts.add(k.layout)
            if "grad_apply" not in k.__dict__:
                # Rows of the other length after the first ones in a cold training run
                # (a ResNet's 4x4 maps after its 32x32 ones, or a sequence model's rows
                # growing): the statistics kernel's miss, which sent the backward's
                # kernels to the helper, has passed; a running helper takes this one.
                _compile_ahead.start(own.key, [(k.layout, "grad_apply")], spawn=False)
        self.layout = k.layout
        self.specs = k
        # The element-wise passes keep no partials: channels-last ones take finer blocks.
        self.blocks = (
            cpu.mc_apply_blocks(self.shape, chunk) if k.layout == "mc" else cpu.ncl_blocks(self.shape, chunk)[0]
        )

    def views(self, *arrays: NDArray[Any] | None) -> tuple[NDArray[Any] | None, ...]:
        """Canonical arrays (x's shape; None passes) as the kernels walk them."""
        if not self.repeat:
            return arrays
        return tuple(None if a is None else a.reshape(self.shape) for a in arrays)

    def coefficients(self, coef: NDArray[Any]) -> NDArray[Any]:
        """Per-channel coefficient rows (k, C) as the kernels read them."""
        return np.repeat(coef, self.repeat, axis=1) if self.repeat else coef


def _block_stats(k: Any, x: NDArray[Any], blocks: int, rows: int, chunk: int) -> tuple[Any, Any]:
    """The statistics pass: per-block (cnt (K,), part (3, K, C)) of canonical ``x``."""
    cnt = np.empty(rows)
    part = np.empty((3, rows, x.shape[1]))
    _threads.parallel_for(k.stats, blocks, x.size, x, chunk, cnt, part)
    return cnt, part


def _one_block(stats: Any, count: int) -> tuple[Any, Any]:
    """Given (2, C) [mean, M2] of ``count`` values as the partials of one block."""
    part = np.zeros((3, 1, stats.shape[1]))
    part[cpu.SHIFT, 0] = stats[0]
    part[cpu.SQ, 0] = stats[1]
    return np.array([float(count)]), part


def batch_moments(x: NDArray[Any], layout: str, chunk: int) -> NDArray[np.float64]:
    """(2, C) float64 [mean, M2] of canonical ``x`` (the training forward's merge,
    without its normalisation)."""
    k, blocks, rows, _, _ = plan(x, layout, chunk)
    C = x.shape[1]
    stats = np.empty((2, C))
    empty = _EMPTY[k.compute.char]
    k.coef(
        *_block_stats(k, x, blocks, rows, chunk),
        empty,
        empty,
        empty,
        empty,
        0.0,
        1.0,
        True,
        stats,
        np.empty(C),
        np.empty(C),
        np.empty((4, C), k.compute),
    )
    return stats


def forward(
    x: NDArray[Any],
    layout: str,
    gamma: NDArray[Any],
    beta: NDArray[Any],
    running_mean: NDArray[Any],
    running_var: NDArray[Any],
    momentum: float,
    eps: float,
    training: bool,
    relu: bool,
    stats: Any,
    count: int,
    y: NDArray[Any],
    chunk: int,
    residual: NDArray[Any] | None = None,
) -> tuple[Any, Any, Any]:
    """Normalise canonical ``x`` into ``y`` (adding canonical ``residual`` before the
    ReLU when given); returns (mean, invstd, coef).

    Training: the batch statistics, or ``stats`` ((2, C) [mean, M2] of ``count``
    values, e.g. merged over ranks) when given; running statistics updated in
    place when non-empty. Eval: the running statistics."""
    k, blocks, rows, el, _ = plan(x, layout, chunk)
    C = x.shape[1]
    # Two allocations: unpacking one (2, C) array into its rows costs 3x as much (1.5 us).
    mean, invstd = np.empty(C), np.empty(C)
    coef = np.empty((4, C * k.fold(C)), k.compute)
    if training:
        partials = _block_stats(k, x, blocks, rows, chunk) if stats is None else _one_block(stats, count)
        k.coef(
            *partials, gamma, beta, running_mean, running_var, momentum, eps, True, np.empty((2, C)), mean, invstd, coef
        )
    else:
        # Eval only reads the running statistics; the kernel's signature takes them
        # writeable (training updates them), so read-only ones are copied (C values).
        if not running_mean.flags.writeable:
            running_mean = running_mean.copy()
        if not running_var.flags.writeable:
            running_var = running_var.copy()
        k.coef_with(running_mean.dtype)(
            _NO_CNT, _NO_PART, gamma, beta, running_mean, running_var, 0.0, eps, False, _NO_STATS, mean, invstd, coef
        )
    if x.size:
        name = "apply" if residual is None else "apply_res"
        apply = getattr(el.specs, name)
        ex, er, ey = el.views(x, residual, y)
        args = (ex, er, el.coefficients(coef), relu, chunk)
        if y.nbytes < config.STREAM_MIN:  # cache-sized: ordinary stores, nothing to time (small calls)
            _threads.parallel_for(apply, el.blocks, x.size, *args, False, ey)
        else:
            # Timed per kernel: the residual's extra input stream can tip the choice.
            _stores.run(
                (name, k.key, el.layout),
                y.nbytes,
                lambda stream: _threads.parallel_for(apply, el.blocks, x.size, *args, stream, ey),
            )
    return mean, invstd, coef


def grad_sums(
    dy: NDArray[Any],
    x: NDArray[Any],
    layout: str,
    coef: Any,
    relu: bool,
    chunk: int,
    residual: NDArray[Any] | None = None,
) -> tuple[Any, float]:
    """The backward's reduction pass -> partials ``(part, scale)``: ``part`` (2, K, C)
    float64 per-block sums [sum g, sum g*(x - mean)/scale] (g = dy times the ReLU
    mask, which a ``residual`` enters); zeros for an input without values."""
    C = x.shape[1]
    if not x.size:
        return np.zeros((2, 1, C)), 1.0
    k, blocks, rows, _, _ = plan(x, layout, chunk)
    part = np.empty((2, rows, C))
    # Without ReLU the residual does not enter the gradient sums: the plain kernel.
    res = residual if relu else None
    sums = k.grad_sums if res is None else k.grad_sums_res
    _threads.parallel_for(sums, blocks, x.size, dy, x, res, coef, relu, chunk, part)
    return part, 2.0  # the kernel stores sum g*(x - mean)/2


def pack_grad_sums(partials: Any) -> NDArray[np.float64]:
    """Partials -> (2, C) float64 [sum g, sum g*(x - mean)], summed in block order."""
    part, scale = partials
    sums = part.sum(axis=1)
    sums[1] *= scale
    return sums


def unpack_grad_sums(sums: NDArray[np.float64]) -> tuple[Any, float]:
    """(2, C) float64 sums (e.g. over all ranks) -> partials of one block."""
    return sums.reshape(2, 1, sums.shape[1]), 1.0


def grad_apply(
    dy: NDArray[Any],
    x: NDArray[Any],
    layout: str,
    coef: Any,
    invstd: Any,
    gamma: Any,
    training: bool,
    relu: bool,
    count: int,
    partials: Any,
    dx: NDArray[Any],
    chunk: int,
    residual: NDArray[Any] | None = None,
    dres: NDArray[Any] | None = None,
) -> tuple[Any, Any]:
    """dx into ``dx`` from the partials of :func:`grad_sums` (or combined ones, with
    ``count`` the number of values they summarise); returns (dgamma, dbeta) in the compute dtype.
    With ReLU and a ``residual``, also its gradient (dy times the mask) into ``dres``."""
    k, _, _, _, el = plan(x, layout, chunk)
    C = x.shape[1]
    part, scale = partials
    gcoef = np.empty((3, C * k.fold(C)), k.compute)
    dgamma = np.empty(C, k.compute)
    dbeta = np.empty(C, k.compute)
    k.grad_coef(part, scale, float(count), invstd, gamma, training, gcoef, dgamma, dbeta)
    if x.size:
        res = residual if relu else None
        name = "grad_apply" if res is None else "grad_apply_res"
        fn = getattr(el.specs, name)
        edy, ex, er, edx, edr = el.views(dy, x, res, dx, None if res is None else dres)
        args = (edy, ex, er, el.coefficients(coef), el.coefficients(gcoef), relu, chunk)
        out = (edx, edr)
        if dx.nbytes < config.STREAM_MIN:  # as in forward
            _threads.parallel_for(fn, el.blocks, x.size, *args, False, *out)
        else:
            _stores.run(
                (name, k.key, el.layout),
                dx.nbytes,
                lambda stream: _threads.parallel_for(fn, el.blocks, x.size, *args, stream, *out),
            )
    return dgamma, dbeta


def warmup_plan(
    dtypes: Sequence[str] = ("float32", "float64"), layouts: Sequence[str] = ("ncl", "mc"), residual: bool = False
) -> list[tuple[str, Callable[..., Any]]]:
    """[(label, compile callable)] for every kernel specialisation of ``dtypes`` (names:
    float32, float64, float16, bfloat16) x ``layouts``, eval with float64 running
    statistics included: what ``numbabn warmup`` runs, one step of its progress bar
    each (a 16-bit dtype's per-channel kernels are float32's). The fused-residual
    variants (``residual=``, used by numbabn.torch's fused ResNet blocks) only when
    ``residual``: 3 more per dtype and layout (4 for ncl: its short rows' gradient
    sums over tiles; 6 for ncl without mc, whose element-wise kernels ncl's short rows
    use and which ncl then brings), about as many as all the others. The
    backward's kernels come last, so that the compile helper
    (:mod:`numbabn._compile_ahead`) compiles them while the forward's compile here."""
    # The backward's kernels go to `later`: the helper compiles them while the rest compile here.
    dtypes, layouts = tuple(dict.fromkeys(dtypes)), tuple(dict.fromkeys(layouts))  # each once (a repeated option)
    plan: list[tuple[str, Callable[..., Any]]] = []
    later: list[tuple[str, Callable[..., Any]]] = []
    backward = {n for names in _AHEAD.values() for n in names}
    for dt in dtypes:
        for layout in layouts:
            dtype = BFLOAT16 if dt == "bfloat16" else np.dtype(dt)
            k = specs(STORAGE.get(dtype, dtype), layout)
            k.element_layouts.add(layout)  # every kernel of each layout: the helper takes its backward's
            names = [(k, name) for name in k.all_names(residual)]
            if layout == "ncl":  # and the reductions of its short rows (the rest are ncl's)
                t = specs(STORAGE.get(dtype, dtype), "tiles")
                own = [n for n in t.all_names(residual) if t.kernel(n) is not k.kernel(n)]
                names += [(t, name) for name in own]
                if "mc" not in layouts:
                    # ... whose element-wise passes run as channels-last rows (_Walk:
                    # a ResNet's 7x7 maps), compiled here unless mc's own turn comes
                    m = specs(STORAGE.get(dtype, dtype), "mc")
                    k.element_layouts.add("mc")
                    element = ("apply", "grad_apply") + (("apply_res", "grad_apply_res") if residual else ())
                    names += [(m, name) for name in element]
            for kk, name in names:
                label = f"{name} {dt} {kk.layout}"
                (later if name in backward else plan).append((label, lambda k=kk, name=name: getattr(k, name)))
            if k.compute != np.float64:
                plan.append((f"coef {dt}/float64 statistics {layout}", lambda k=k: k.coef_with(np.float64)))
    return plan + later
