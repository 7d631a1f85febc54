"""The timing harness shared by ``numbabn bench`` and the pytest-benchmark suite.

Method: one warm-up call per case and op (its time is reported
separately as ``first_s``: JIT compile, or loading Numba's on-disk cache), then
the median per call of ``repeat`` samples of numbabn, then of PyTorch (each sample
is enough back-to-back calls to last ``MIN_SAMPLE_S``, one call on large inputs:
single calls of ~20 us carry the jitter of one scheduler tick). The two libraries
are timed one after the other, not interleaved (see :func:`run`), so on a noisy
machine run the benchmark twice and compare ratios. For each case the bytes moved
follow the passes over memory (S = bytes of x, ``numbabn.bench.cases.TRAFFIC``): training
forward 3S, eval forward 2S, backward 5S. GB/s is bytes/time; ``pct_copy`` compares it with the copy
bandwidth of the backend's memory measured in the same run. PyTorch
(``torch.nn.functional.batch_norm`` for forward/eval, ATen's
``native_batch_norm_backward`` for backward, i.e. exactly the kernels autograd calls)
and the NumPy float64 reference are timed in the same run on the same data.

What differs between backends is a strategy object (:class:`CPUBackend` here,
:class:`numbabn.bench.cuda.CUDABackend` for device arrays): where the data lives, how a
call is timed, which copy bandwidth is the reference. :func:`run` is the same loop for
both.

CPU: host arrays; both sides allocate their outputs, unequally: numbabn's of 32 MiB
and more reuse the memory of the previous call's dropped output
(``numbabn._buffers``, as they do in any loop; ``NUMBABN_BUFFER_CACHE_MB=0`` times
fresh pages), while PyTorch's come as fresh pages from glibc unless it is told to
reuse them (``MALLOC_MMAP_THRESHOLD_``/``MALLOC_TRIM_THRESHOLD_``; README, "What the
large ratios measure"); wall-clock timing; the copy reference is the faster of
NumPy's ``copyto`` and a copy on the kernels' thread pool (2 bytes moved per byte
copied); PyTorch gets the same thread count as numbabn. The NumPy baseline is the
float64 reference (``numbabn.kernels.reference``), written for accuracy, not speed,
and timed over at most 3 samples.
"""

import math
import statistics
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .cases import OPS, TRAFFIC, Case


@dataclass
class Row:
    """One (case, op): numbabn's median ``ms``, ``gbps`` and ``pct_copy`` of the copy
    bandwidth, the first call's seconds, and the comparisons' median ms with their
    ratios ``vs_numpy = numpy_ms / ms`` and ``vs_torch = torch_ms / ms`` (> 1: numbabn
    is faster)."""

    op: str
    case: str
    shape: tuple
    layout: str
    dtype: str
    backend: str
    ms: float
    gbps: float
    pct_copy: float
    first_s: float
    numpy_ms: float | None = None
    torch_ms: float | None = None
    vs_numpy: float | None = None
    vs_torch: float | None = None


@dataclass
class Report:
    rows: list = field(default_factory=list)
    meta: dict = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return {"meta": self.meta, "rows": [asdict(r) for r in self.rows]}


def wall_time(fn: Callable[[], Any], calls: int) -> float:
    """Wall-clock seconds per call of ``calls`` back-to-back calls of ``fn``."""
    t0 = time.perf_counter()
    for _ in range(calls):
        fn()
    return (time.perf_counter() - t0) / calls


# A sample of a fast call is this long (several calls): single calls of ~20 us are
# timed with the jitter of one scheduler tick, and the calibration costs one call.
MIN_SAMPLE_S = 1e-3
Sampler = Callable[[Callable[[], Any], int], float]  # (fn, calls) -> seconds per call


def interleaved(
    fns: dict[str, Callable[[], Any]],
    repeat: int,
    sample: Sampler = wall_time,
    min_sample_s: float = MIN_SAMPLE_S,
) -> dict[str, float]:
    """Median seconds per call of each of ``fns`` over ``repeat`` rounds, each round
    timing one sample of every function in turn, so that a drift of the machine's
    speed hits all of them alike. ``sample(fn, calls)`` times ``calls`` back-to-back
    calls and returns seconds per call; ``calls`` is fixed per function from one timed
    call so that a sample lasts at least ``min_sample_s`` (at most 10 000 calls; one
    call, and no calibration, for ``min_sample_s=0``).
    Interleave only what runs on the same threads: between samples of two libraries
    with their own thread pools, the other's threads still spin or its memory is still
    being returned (see :func:`run`)."""
    if isinstance(repeat, bool) or not isinstance(repeat, int) or repeat < 1:
        raise ValueError(f"interleaved: repeat must be a positive int, got {repeat!r}")
    calls = {
        name: max(1, min(10_000, math.ceil(min_sample_s / max(sample(fn, 1), 1e-9)))) if min_sample_s > 0 else 1
        for name, fn in fns.items()
    }
    times: dict[str, list[float]] = {name: [] for name in fns}
    for _ in range(repeat):
        for name, fn in fns.items():
            times[name].append(sample(fn, calls[name]))
    return {name: statistics.median(t) for name, t in times.items()}


def per_call(
    fn: Callable[[], Any], repeat: int, sample: Sampler = wall_time, min_sample_s: float = MIN_SAMPLE_S
) -> float:
    """Median seconds per call of ``fn`` over ``repeat`` samples (see :func:`interleaved`)."""
    return interleaved({"fn": fn}, repeat, sample, min_sample_s)["fn"]


def first_call(fn: Callable[[], Any], sync: Callable[[], Any] | None = None) -> float:
    """Seconds of one call of ``fn`` (and ``sync``): the JIT compile or cache load."""
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def copy_bandwidth(nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """Host copy bandwidth in GB/s (2*bytes/time): the best of NumPy's copy and a copy
    on the kernels' own threads (serial nogil blocks through the same scheduler) with
    the non-temporal stores the kernels use for large outputs
    (``numbabn.kernels.stream``), so the reference uses the cores and the stores the
    way the kernels do."""
    from numba import njit

    from .._jit import require_compiler
    from .._threads import parallel_for
    from ..kernels.stream import fence, write

    require_compiler()  # the copy below is built on the kernels' intrinsics
    block = 1 << 16

    @njit(nogil=True)
    def copy_blocks(src: Any, dst: Any, t0: int, t1: int) -> None:
        lo, hi = t0 * block, min(t1 * block, src.size)
        write(dst[lo:hi], src[lo:hi])
        # (fence is a Numba intrinsic: Numba supplies its typing context when compiling.)
        fence()  # type: ignore[call-arg]

    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    blocks = -(-src.size // block)

    def threaded() -> None:
        parallel_for(copy_blocks, blocks, src.size, src, dst)

    threaded()
    best = min(
        per_call(lambda: np.copyto(dst, src), repeat, min_sample_s=0), per_call(threaded, repeat, min_sample_s=0)
    )
    return 2 * src.nbytes / best / 1e9


def inputs(case: Case, dtype: Any, rng: np.random.Generator) -> tuple[NDArray[Any], ...]:
    """Host arrays for one case: x, dy, gamma, beta, running mean and variance."""
    dt = np.dtype(dtype)
    x = (rng.standard_normal(case.shape, dtype=np.float32) * 2 + 1).astype(dt)
    dy = rng.standard_normal(case.shape, dtype=np.float32).astype(dt)
    C = case.channels
    gamma = rng.uniform(0.5, 1.5, C).astype(dt)
    beta = rng.standard_normal(C).astype(dt)
    return x, dy, gamma, beta, np.zeros(C, dt), np.ones(C, dt)


def numbabn_ops(
    case: Case,
    x: Any,
    gamma: Any,
    beta: Any,
    dy: Any,
    rm: Any,
    rv: Any,
    backend: str = "cpu",
    y: Any = None,
    dx: Any = None,
) -> dict[str, Callable[[], Any]]:
    """{op: callable} timing numbabn's functional API on ``x`` (host or device arrays).

    ``y``/``dx``: preallocated outputs (``out=``); the CUDA backend passes device
    arrays, since Numba allocates with cudaMalloc and PyTorch from its cache:
    allocating per call would time the allocator, not the kernels.
    """
    import numbabn

    kw = dict(axis=case.axis, backend=backend)
    # The setup call (it compiles or loads the forward kernels) updates copies of the
    # host running statistics, so every timed call starts from the same ones; device
    # arrays have no .copy(), and the CUDA setup call runs without them.
    stats = dict(running_mean=rm.copy(), running_var=rv.copy()) if isinstance(rm, np.ndarray) else {}
    _, ctx = numbabn.batch_norm_forward(x, gamma, beta, **stats, **kw)
    return {
        "forward": lambda: numbabn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv, out=y, **kw),
        "eval": lambda: numbabn.batch_norm_forward(
            x, gamma, beta, running_mean=rm, running_var=rv, training=False, out=y, **kw
        ),
        "backward": lambda: numbabn.batch_norm_backward(dy, ctx, out=dx),
    }


def numpy_ops(case: Case, x: Any, gamma: Any, beta: Any, dy: Any, rm: Any, rv: Any) -> dict[str, Callable[[], Any]]:
    """{op: callable} timing the float64 NumPy reference on host arrays."""
    from ..kernels import reference as R

    return {
        "forward": lambda: R.forward(x, gamma, beta, axis=case.axis),
        "eval": lambda: R.forward(x, gamma, beta, mean=rm, var=rv, axis=case.axis),
        "backward": lambda: R.backward(dy, x, gamma, beta, axis=case.axis),
    }


def torch_ops(
    case: Case, x: Any, gamma: Any, beta: Any, dy: Any, threads: int, device: str = "cpu"
) -> dict[str, Callable[[], Any]]:
    """{op: callable} timing PyTorch's batch norm on tensors of the host arrays' data
    on ``device``, with ``threads`` CPU threads."""
    import torch

    torch.set_num_threads(threads)
    F = torch.nn.functional
    ax = case.axis % len(case.shape)
    dev = lambda a: torch.from_numpy(a).to(device)  # noqa: E731  (.to() keeps channels-last strides)
    if ax != 1:  # torch's channel axis is 1: channels-last memory, channels-first view
        to = lambda a: dev(np.moveaxis(a, ax, 1))  # noqa: E731
    else:
        to = dev
    tx, tdy = to(x), to(dy)
    tg, tb = dev(gamma), dev(beta)
    C = case.channels
    rm, rv = torch.zeros(C, dtype=tg.dtype, device=device), torch.ones(C, dtype=tg.dtype, device=device)
    _, save_mean, save_invstd, *_ = torch.ops.aten.native_batch_norm(tx, tg, tb, rm, rv, True, 0.1, 1e-5)
    return {
        "forward": lambda: F.batch_norm(tx, rm, rv, tg, tb, training=True, momentum=0.1, eps=1e-5),
        "eval": lambda: F.batch_norm(tx, rm, rv, tg, tb, training=False, eps=1e-5),
        "backward": lambda: torch.ops.aten.native_batch_norm_backward(
            tdy, tx, tg, rm, rv, save_mean, save_invstd, True, 1e-5, [True, True, True]
        ),
    }


class CPUBackend:
    """Strategy for host arrays: the kernels' thread pool, wall-clock timing."""

    name = "cpu"
    sync = None
    torch_device = "cpu"
    threading_layer = "python threads"

    def __init__(self, threads: int | None = None) -> None:
        from .. import _threads

        if threads is not None:
            _threads.set_num_threads(threads)
        self.threads = self.torch_threads = _threads.get_num_threads()

    def where(self) -> dict[str, Any]:
        return {}

    def versions(self) -> dict[str, str]:
        import numba

        return {"numba": numba.__version__}

    def copy_bandwidth(self, nbytes: int) -> float:
        return copy_bandwidth(nbytes)

    def ops(self, case: Case, x: Any, dy: Any, gamma: Any, beta: Any, rm: Any, rv: Any) -> dict[str, Callable[[], Any]]:
        """{op: callable} on the host arrays of :func:`inputs`."""
        return numbabn_ops(case, x, gamma, beta, dy, rm, rv)

    sample = staticmethod(wall_time)
    min_sample_s = MIN_SAMPLE_S


def _backend(name: str, compare: Sequence[str], threads: int | None) -> Any:
    if name == "cpu":
        return CPUBackend(threads)
    if name == "cuda":
        if threads is not None:
            raise ValueError("threads sets CPU threads; it does not apply to backend='cuda'")
        from .cuda import CUDABackend  # imports numba.cuda: only when asked for

        return CUDABackend(compare)
    raise ValueError(f"backend must be 'cpu' or 'cuda', got {name!r}")


def _compare(row: Row, others: dict[str, Any], op: str, repeat: int, side: Any) -> None:
    """Time the NumPy reference (at most 3 calls: it is slow) and PyTorch (like
    numbabn: :func:`per_call` with ``side``'s sampler) on ``op``, after one untimed
    call each, and fill ``row``'s comparison columns."""
    if "numpy" in others:
        f = others["numpy"][op]
        f()
        row.numpy_ms = per_call(f, max(1, min(repeat, 3)), min_sample_s=0) * 1e3
        row.vs_numpy = row.numpy_ms / row.ms
    if "torch" in others:
        f = others["torch"][op]
        f()
        row.torch_ms = per_call(f, repeat, side.sample, side.min_sample_s) * 1e3
        row.vs_torch = row.torch_ms / row.ms


def run(
    cases: Iterable[Case],
    ops: Sequence[str] = OPS,
    dtype: str = "float32",
    backend: str = "cpu",
    repeat: int = 10,
    compare: Sequence[str] = ("numpy", "torch"),
    threads: int | None = None,
    progress: Callable[..., Any] | None = None,
) -> Report:
    """Time every (case, op) of numbabn on ``backend`` ('cpu' or 'cuda'), with the
    ``compare`` libraries on the same data, and return a :class:`Report`.

    ``threads``: CPU threads for numbabn's kernels and PyTorch (CPU only; None keeps
    numbabn's: ``NUMBABN_NUM_THREADS``, else the CPUs this process may use).
    ``progress`` is called with a short label before each case (for progress bars).
    On 'cuda' (see :mod:`numbabn.bench.cuda`) raises RuntimeError under the CUDA
    simulator (its timings mean nothing) and when no GPU is usable.
    """
    side = _backend(backend, compare, threads)
    dt = np.dtype(dtype)
    rng = np.random.default_rng(0)
    biggest = max(int(np.prod(c.shape)) * dt.itemsize for c in cases)
    copy_gbps = side.copy_bandwidth(max(biggest, 64 << 20))
    torch_version = None
    if "torch" in compare:
        import torch

        torch_version = torch.__version__
    rows = []
    for case in cases:
        if progress is not None:
            progress(case.name)
        host = inputs(case, dt, rng)
        t0 = time.perf_counter()
        ours = side.ops(case, *host)
        # The setup call is a training forward: its compile/cache load (which the
        # backward also needs, its context coming from it) goes to the first op timed.
        setup_s = time.perf_counter() - t0
        x, dy, gamma, beta, rm, rv = host
        others = {}
        if "numpy" in compare:
            others["numpy"] = numpy_ops(case, x, gamma, beta, dy, rm, rv)
        if "torch" in compare:
            others["torch"] = torch_ops(case, x, gamma, beta, dy, side.torch_threads, device=side.torch_device)
        S = x.nbytes
        # Every op's first call before any timing: a cold training forward has a helper
        # process compile the backward's kernels (numbabn._compile_ahead) while the
        # caller goes on; the backward's first call waits for it. Timed before that, the
        # first case's forward and eval share the cores with the helper (64x64x56x56,
        # empty cache, 2 CPUs: the ten forwards right after the first ran 1.15-1.2x
        # slower than ten after the backward's first call, three runs).
        firsts = {op: first_call(ours[op], side.sync) + (setup_s if i == 0 else 0.0) for i, op in enumerate(ops)}
        for op in ops:
            # One library after the other, not interleaved: right after a PyTorch call
            # its OpenMP workers spin for 4-10 ms on the cores numbabn's threads need,
            # and alternating 51 MB allocations of both changes how fast the kernel
            # hands out fresh pages (measured: 64x64x56x56 forward 13.7-17.7 ms alone,
            # 26-28 ms interleaved with PyTorch, with or without a 20 ms pause). Small
            # inputs, which numbabn runs on the calling thread alone, are no exception:
            # PyTorch runs even a 64x100 batch norm on its OpenMP team, and interleaved
            # with it numbabn's eval took 14-17 us a call against 10 us alone (forward
            # 19-24 against 13-14 us; three runs, 2-vCPU VM).
            sec = per_call(ours[op], repeat, side.sample, side.min_sample_s)
            gbps = TRAFFIC[op] * S / sec / 1e9
            row = Row(
                op,
                case.name,
                case.shape,
                case.layout,
                dt.name,
                side.name,
                sec * 1e3,
                gbps,
                100 * gbps / copy_gbps,
                firsts[op],
            )
            _compare(row, others, op, repeat, side)
            rows.append(row)
    from .. import __version__

    meta = {
        "numbabn": __version__,
        "backend": side.name,
        **side.where(),
        "threads": side.threads,
        "copy_gbps": copy_gbps,
        "dtype": dt.name,
        "repeat": repeat,
        **side.versions(),
        "numpy": np.__version__,
        "torch": torch_version,
        "threading_layer": side.threading_layer,
    }
    return Report(rows, meta)
