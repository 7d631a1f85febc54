"""The benchmark harness shared by ``numbabn bench`` and the pytest-benchmark suite.

Method (DESIGN.md §7): one warm-up call per case (its time is reported separately as
``first_s``: JIT compile, or loading Numba's on-disk cache), then the median of
``repeat`` timed calls. For each case the bytes moved follow DESIGN.md §3 (S = bytes of
x): training forward 3S, eval forward 2S, backward 5S. GB/s is bytes/time; ``pct_copy``
compares it with the machine's copy bandwidth measured in the same run (the faster of
NumPy's ``copyto`` and a copy on the kernels' thread pool, 2 bytes moved per byte copied).
PyTorch (``torch.nn.functional.batch_norm`` for forward/eval, ATen's
``native_batch_norm_backward`` for backward, i.e. exactly the kernels autograd calls)
and the NumPy float64 reference are timed in the same run on the same data; both
sides allocate their outputs. PyTorch gets the same thread count as Numba.
The CUDA backend has its own entry point, :func:`run_cuda` (device-resident data,
CUDA-event timing, the device's copy bandwidth), returning the same :class:`Report`.

This module lives inside the package (not only in ``bench/``) so that ``numbabn bench``
works from a regular, non-editable install.
"""
from dataclasses import asdict, dataclass, field
import statistics
import time

import numpy as np

OPS = ("forward", "eval", "backward")
TRAFFIC = {"forward": 3, "eval": 2, "backward": 5}   # multiples of S, DESIGN.md §3


@dataclass(frozen=True)
class Case:
    """One benchmark input: ``shape`` with channel axis ``axis``."""

    name: str
    shape: tuple
    axis: int = 1

    @property
    def layout(self):
        if len(self.shape) == 2:
            return "nc"
        return "nhwc" if self.axis in (-1, len(self.shape) - 1) else "nchw"

    @property
    def channels(self):
        return self.shape[self.axis]


SUITES = {
    "default": (
        Case("resnet-conv1", (64, 64, 56, 56)),
        Case("resnet-stage3", (128, 256, 14, 14)),
        Case("resnet-nhwc", (64, 56, 56, 64), -1),
        Case("mlp-wide", (4096, 1024)),
        Case("tiny", (64, 100)),
    ),
    "resnet": (
        Case("resnet-conv1", (64, 64, 56, 56)),
        Case("resnet-stage2", (64, 128, 28, 28)),
        Case("resnet-stage3", (128, 256, 14, 14)),
        Case("resnet-stage4", (128, 512, 7, 7)),
        Case("resnet-nhwc", (64, 56, 56, 64), -1),
    ),
    "mlp": (
        Case("mlp-wide", (4096, 1024)),
        Case("mlp-tall", (65536, 64)),
        Case("mlp-small", (256, 512)),
    ),
    "tiny": (
        Case("tiny", (64, 100)),
        Case("tiny-conv", (8, 16, 8, 8)),
    ),
}


def parse_shape(text):
    """'64x64x56x56' -> (64, 64, 56, 56); ValueError with the offending text."""
    try:
        shape = tuple(int(p) for p in text.lower().split("x"))
    except ValueError:
        raise ValueError(f"shape must look like 64x64x56x56, got {text!r}") from None
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape needs >= 2 positive sizes, got {text!r}")
    return shape


@dataclass
class Row:
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

    def to_dict(self):
        return {"meta": self.meta, "rows": [asdict(r) for r in self.rows]}


def _median_time(fn, repeat, sync=None):
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        if sync is not None:
            sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _first_call(fn, sync=None):
    t0 = time.perf_counter()
    fn()
    if sync is not None:
        sync()
    return time.perf_counter() - t0


def copy_bandwidth(nbytes=256 << 20, repeat=5):
    """Host copy bandwidth in GB/s (2*bytes/time): the best of NumPy's copy and a copy
    on the kernels' own threads (serial nogil blocks through the same scheduler), so
    the reference uses the cores the way the kernels do."""
    from numba import njit

    from ._threads import parallel_for

    block = 1 << 16

    @njit(nogil=True)
    def copy_blocks(src, dst, t0, t1):
        for i in range(t0 * block, min(t1 * block, src.size)):
            dst[i] = src[i]

    src = np.ones(nbytes // 8)
    dst = np.empty_like(src)
    blocks = -(-src.size // block)

    def threaded():
        parallel_for(copy_blocks, blocks, src.size, src, dst)

    threaded()
    best = min(_median_time(lambda: np.copyto(dst, src), repeat), _median_time(threaded, repeat))
    return 2 * src.nbytes / best / 1e9


def _torch_ops(case, x, gamma, beta, dy, threads, device="cpu"):
    import torch

    torch.set_num_threads(threads)
    F = torch.nn.functional
    ax = case.axis % len(case.shape)
    dev = lambda a: torch.from_numpy(a).to(device)  # noqa: E731  (.to() keeps channels-last strides)
    if ax != 1:   # torch's channel axis is 1: channels-last memory, channels-first view
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
            tdy, tx, tg, rm, rv, save_mean, save_invstd, True, 1e-5, [True, True, True]),
    }


def _numpy_ops(case, x, gamma, beta, dy, rm, rv):
    from .kernels import reference as R

    return {
        "forward": lambda: R.forward(x, gamma, beta, axis=case.axis),
        "eval": lambda: R.forward(x, gamma, beta, mean=rm, var=rv, axis=case.axis),
        "backward": lambda: R.backward(dy, x, gamma, beta, axis=case.axis),
    }


def _numbabn_ops(case, x, gamma, beta, dy, rm, rv, backend):
    import numbabn

    kw = dict(axis=case.axis, backend=backend)
    _, ctx = numbabn.batch_norm_forward(x, gamma, beta, running_mean=rm.copy(), running_var=rv.copy(), **kw)
    return {
        "forward": lambda: numbabn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv, **kw),
        "eval": lambda: numbabn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv,
                                                   training=False, **kw),
        "backward": lambda: numbabn.batch_norm_backward(dy, ctx),
    }


def _inputs(case, dt, rng):
    """Host arrays for one case: x, dy, gamma, beta, running mean and variance."""
    x = (rng.standard_normal(case.shape, dtype=np.float32) * 2 + 1).astype(dt)
    dy = rng.standard_normal(case.shape, dtype=np.float32).astype(dt)
    C = case.channels
    gamma = rng.uniform(0.5, 1.5, C).astype(dt)
    beta = rng.standard_normal(C).astype(dt)
    return x, dy, gamma, beta, np.zeros(C, dt), np.ones(C, dt)


def _compare(row, others, op, repeat, torch_time=_median_time):
    """Time the NumPy reference and PyTorch on ``op`` (after one untimed call each)
    and fill ``row``'s comparison columns. ``torch_time(fn, repeat)`` -> seconds."""
    if "numpy" in others:
        f = others["numpy"][op]
        f()
        row.numpy_ms = _median_time(f, max(1, min(repeat, 3))) * 1e3
        row.vs_numpy = row.numpy_ms / row.ms
    if "torch" in others:
        f = others["torch"][op]
        f()
        row.torch_ms = torch_time(f, repeat) * 1e3
        row.vs_torch = row.torch_ms / row.ms


def run(cases, ops=OPS, dtype="float32", backend="cpu", repeat=10, compare=("numpy", "torch"),
        threads=None, progress=None):
    """Time every (case, op) and return a :class:`Report`.

    ``progress`` is called with a short label before each case (for progress bars).
    """
    import numba

    from . import _threads

    if backend != "cpu":
        raise ValueError("this harness times the CPU backend; use backend='cuda' through run_cuda")
    if threads is not None:
        _threads.set_num_threads(threads)
    threads = _threads.get_num_threads()
    dt = np.dtype(dtype)
    rng = np.random.default_rng(0)
    rows = []
    biggest = max(int(np.prod(c.shape)) * dt.itemsize for c in cases)
    copy_gbps = copy_bandwidth(max(biggest, 64 << 20))
    torch_version = None
    if "torch" in compare:
        import torch
        torch_version = torch.__version__
    for case in cases:
        if progress is not None:
            progress(case.name)
        x, dy, gamma, beta, rm, rv = _inputs(case, dt, rng)
        t0 = time.perf_counter()
        ours = _numbabn_ops(case, x, gamma, beta, dy, rm, rv, backend)
        setup_s = time.perf_counter() - t0   # includes compile/cache load of forward
        others = {}
        if "numpy" in compare:
            others["numpy"] = _numpy_ops(case, x, gamma, beta, dy, rm, rv)
        if "torch" in compare:
            others["torch"] = _torch_ops(case, x, gamma, beta, dy, threads)
        S = x.nbytes
        for op in ops:
            first = _first_call(ours[op]) + (setup_s if op == "forward" else 0.0)
            sec = _median_time(ours[op], repeat)
            row = Row(op, case.name, case.shape, case.layout, dt.name, backend, sec * 1e3,
                      TRAFFIC[op] * S / sec / 1e9, 100 * TRAFFIC[op] * S / sec / 1e9 / copy_gbps, first)
            _compare(row, others, op, repeat)
            rows.append(row)
    meta = {"backend": backend, "threads": threads, "copy_gbps": copy_gbps, "dtype": dt.name,
            "repeat": repeat, "numba": numba.__version__, "numpy": np.__version__,
            "torch": torch_version, "threading_layer": "python threads"}
    return Report(rows, meta)


def format_table(report):
    """An aligned plain-text table of a :class:`Report`."""
    head = ["op", "case", "shape", "layout", "ms", "GB/s", "%copy", "first s", "numpy ms", "x numpy",
            "torch ms", "x torch"]

    def f(v, fmt):
        return "-" if v is None else format(v, fmt)

    lines = []
    for r in report.rows:
        lines.append([r.op, r.case, "x".join(map(str, r.shape)), r.layout, f(r.ms, ".3f"), f(r.gbps, ".1f"),
                      f(r.pct_copy, ".0f"), f(r.first_s, ".2f"), f(r.numpy_ms, ".2f"), f(r.vs_numpy, ".1f"),
                      f(r.torch_ms, ".3f"), f(r.vs_torch, ".2f")])
    widths = [max(len(str(c)) for c in col) for col in zip(head, *lines)]
    fmt_row = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    m = report.meta
    where = (f"{m['device']}, {m['threads']} threads/block, device" if m["backend"] == "cuda"
             else f"{m['threads']} threads ({m['threading_layer']}),")
    title = (f"numbabn {m['backend']} bench: {m['dtype']}, {where} "
             f"copy bandwidth {m['copy_gbps']:.1f} GB/s, torch {m['torch'] or 'n/a'}, median of {m['repeat']}")
    return "\n".join([title, fmt_row(head), fmt_row(["-" * w for w in widths])] + [fmt_row(r) for r in lines])


def _event_time(fn, repeat):
    """Median seconds of ``fn`` between two CUDA events on the default stream.

    Waiting for the stop event synchronises with the device, so the time covers every
    kernel the call launched; the GPU is idle when the start event is recorded, so
    host-side launch overhead inside the call counts too.
    """
    from numba import cuda

    start, stop = cuda.event(), cuda.event()
    times = []
    for _ in range(repeat):
        start.record()
        fn()
        stop.record()
        stop.synchronize()
        times.append(start.elapsed_time(stop) / 1e3)   # milliseconds
    return statistics.median(times)


def _numbabn_cuda_ops(case, x, gamma, beta, dy, rm, rv, y, dx):
    """Like :func:`_numbabn_ops` on device arrays, writing into the preallocated
    device outputs ``y``/``dx`` (Numba allocates with cudaMalloc, PyTorch from its
    cache: allocating per call would time the allocator, not the kernels)."""
    import numbabn

    kw = dict(axis=case.axis, backend="cuda")
    _, ctx = numbabn.batch_norm_forward(x, gamma, beta, **kw)
    return {
        "forward": lambda: numbabn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv,
                                                      out=y, **kw),
        "eval": lambda: numbabn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv,
                                                   training=False, out=y, **kw),
        "backward": lambda: numbabn.batch_norm_backward(dy, ctx, out=dx),
    }


def run_cuda(cases, ops=OPS, dtype="float32", repeat=10, compare=("numpy", "torch"), progress=None):
    """Time the CUDA backend; the GPU counterpart of :func:`run`, returning the same :class:`Report`.

    Inputs, parameters and running statistics are device arrays and the outputs are
    preallocated on the device, so no host<->device copy is timed. Each call is timed
    with CUDA events (:func:`_event_time`), median of ``repeat``; the first call per
    op (kernel compilation) is reported as ``first_s``. ``pct_copy`` compares with the
    device-to-device copy bandwidth measured in the same run. ``compare``: "torch"
    times ``F.batch_norm`` / ``native_batch_norm_backward`` on CUDA tensors of the same
    data (PyTorch must see the GPU); "numpy" times the float64 reference on the host.

    Raises RuntimeError under the CUDA simulator (its timings mean nothing) and when
    no GPU is usable.
    """
    from importlib.metadata import version

    from numba import cuda

    from . import config
    from .kernels import cuda as K

    if cuda.config.ENABLE_CUDASIM:
        raise RuntimeError("run_cuda: refusing to time the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
    if not cuda.is_available():
        raise RuntimeError("run_cuda: no CUDA GPU is available")
    torch_version = None
    if "torch" in compare:
        import torch

        if not torch.cuda.is_available():
            raise RuntimeError(f"run_cuda: compare='torch' needs a PyTorch that sees the GPU (torch {torch.__version__})")
        torch_version = torch.__version__
    dt = np.dtype(dtype)
    rng = np.random.default_rng(0)
    biggest = max(int(np.prod(c.shape)) * dt.itemsize for c in cases)
    copy_gbps = K.device_copy_bandwidth(max(biggest, 64 << 20))
    rows = []
    for case in cases:
        if progress is not None:
            progress(case.name)
        hx, hdy, hgamma, hbeta, hrm, hrv = _inputs(case, dt, rng)
        x, dy, gamma, beta, rm, rv = (cuda.to_device(a) for a in (hx, hdy, hgamma, hbeta, hrm, hrv))
        t0 = time.perf_counter()
        ours = _numbabn_cuda_ops(case, x, gamma, beta, dy, rm, rv, cuda.device_array_like(x),
                                 cuda.device_array_like(x))
        cuda.synchronize()
        setup_s = time.perf_counter() - t0   # includes compiling the forward kernels
        others = {}
        if "numpy" in compare:
            others["numpy"] = _numpy_ops(case, hx, hgamma, hbeta, hdy, hrm, hrv)
        if "torch" in compare:
            others["torch"] = _torch_ops(case, hx, hgamma, hbeta, hdy, torch.get_num_threads(), device="cuda")
        S = x.nbytes
        for op in ops:
            first = _first_call(ours[op], cuda.synchronize) + (setup_s if op == "forward" else 0.0)
            sec = _event_time(ours[op], repeat)
            row = Row(op, case.name, case.shape, case.layout, dt.name, "cuda", sec * 1e3,
                      TRAFFIC[op] * S / sec / 1e9, 100 * TRAFFIC[op] * S / sec / 1e9 / copy_gbps, first)
            _compare(row, others, op, repeat, torch_time=_event_time)
            rows.append(row)
    meta = {"backend": "cuda", "device": cuda.get_current_device().name, "threads": config.CUDA_THREADS,
            "copy_gbps": copy_gbps, "dtype": dt.name, "repeat": repeat, "numba": version("numba"),
            "numba_cuda": version("numba-cuda"), "numpy": np.__version__, "torch": torch_version,
            "threading_layer": None}
    return Report(rows, meta)
