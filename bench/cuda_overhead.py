"""Where the time of a CUDA batch-norm call goes, on a real GPU.

    python bench/cuda_overhead.py              # needs a CUDA GPU; PyTorch with CUDA for (2)
    python bench/cuda_overhead.py --simulator  # the same steps on Numba's simulator (a dry run)

The first real GPU run (an H200, numbabn bench --backend cuda) measured 0.5 to 1.7 ms
per call for every case, from (64, 100) to (64, 64, 56, 56): the time of a call does
not grow with its data, so it is spent on the host, launching. This script splits it:

1. per case and op, the wall time per call of back-to-back calls (synchronised once
   after the loop) and the host time alone (the loop without the final synchronise);
2. the GPU time of each kernel per call, from PyTorch's profiler (CUPTI records every
   kernel of the process, Numba's included);
3. the host cost of the pieces: one launch of an empty kernel taking 1 array, 7 arrays
   or 7 arrays and 6 scalars, one ``cuda.device_array``, one ``cuda.to_device`` of C
   values;
4. cProfile of the (64, 100) forward and backward: numbabn's own functions against
   Numba's and cuda-core's.

It prints everything on stdout (warnings off); nothing is written.
"""

import argparse
import cProfile
import io
import os
import pstats
import time
import warnings

import numpy as np

CASES = [("tiny", (64, 100), 1), ("mlp-wide", (4096, 1024), 1), ("resnet-conv1", (64, 64, 56, 56), 1)]
DRY_CASES = [("tiny", (8, 4), 1), ("small", (4, 3, 5), 1)]


def _ops(cuda, shape, axis, rng):
    """{op: callable} on device arrays with preallocated outputs (as numbabn bench)."""
    import numbabn

    C = shape[axis]
    dev = cuda.to_device
    x, dy = (dev(rng.standard_normal(shape).astype(np.float32)) for _ in range(2))
    g, b = dev(np.ones(C, np.float32)), dev(np.zeros(C, np.float32))
    rm, rv = dev(np.zeros(C, np.float32)), dev(np.ones(C, np.float32))
    y, dx = cuda.device_array_like(x), cuda.device_array_like(x)
    kw = dict(running_mean=rm, running_var=rv, axis=axis, out=y)
    _, ctx = numbabn.batch_norm_forward(x, g, b, **kw)
    return {
        "forward": lambda: numbabn.batch_norm_forward(x, g, b, **kw),
        "eval": lambda: numbabn.batch_norm_forward(x, g, b, training=False, **kw),
        "backward": lambda: numbabn.batch_norm_backward(dy, ctx, out=dx),
    }


def _per_call_us(cuda, fn, n):
    """(wall, host) microseconds per call of n back-to-back calls after one warm-up."""
    fn()
    cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(n):
        fn()
    t1 = time.perf_counter()
    cuda.synchronize()
    t2 = time.perf_counter()
    return (t2 - t0) / n * 1e6, (t1 - t0) / n * 1e6


def _gpu_kernels(cuda, fn, n):
    """[(kernel, GPU microseconds per call)] from PyTorch's profiler, or None without it."""
    try:
        import torch
        from torch.profiler import ProfilerActivity, profile
    except ImportError:
        return None
    if not torch.cuda.is_available():
        return None
    fn()
    cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(n):
            fn()
        cuda.synchronize()
    rows = [(e.key, e.self_device_time_total / n) for e in prof.key_averages() if e.self_device_time_total > 0]
    return sorted(rows, key=lambda r: -r[1])


def _pieces(cuda, n):
    """Host microseconds per call of launches, an allocation and a small host-to-device copy."""

    @cuda.jit
    def one(a):
        pass

    @cuda.jit
    def seven(a, b, c, d, e, f, g):
        pass

    @cuda.jit
    def thirteen(a, b, c, d, e, f, g, h, i, j, k, l, m):  # noqa: E741
        pass

    arr3 = cuda.device_array((2, 3, 4))
    vec = cuda.device_array(64)
    calls = {
        "launch, 1 array": lambda: one[1, 32](arr3),
        "launch, 7 arrays": lambda: seven[1, 32](arr3, arr3, vec, vec, vec, vec, arr3),
        "launch, 7 arrays + 6 scalars": lambda: thirteen[1, 32](
            arr3, arr3, vec, vec, vec, vec, True, 1, 2, False, 3, 4, arr3
        ),
        "cuda.device_array(64)": lambda: cuda.device_array(64),
        "cuda.to_device(64 float64)": lambda: cuda.to_device(np.ones(64)),
    }
    return {name: _per_call_us(cuda, fn, n)[1] for name, fn in calls.items()}


def _profile(fn, n):
    """cProfile of n calls: the 15 functions with the most own time, as text."""
    pr = cProfile.Profile()
    pr.enable()
    for _ in range(n):
        fn()
    pr.disable()
    out = io.StringIO()
    pstats.Stats(pr, stream=out).sort_stats("tottime").print_stats(15)
    return out.getvalue()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--simulator", action="store_true", help="dry run on Numba's CUDA simulator (tiny inputs)")
    parser.add_argument("--calls", type=int, default=200, help="calls per measurement [200]")
    args = parser.parse_args()
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1" if args.simulator else "0"
    from numba import cuda
    from numba.core.errors import NumbaPerformanceWarning

    warnings.simplefilter("ignore", NumbaPerformanceWarning)
    import numbabn

    if not args.simulator and not numbabn.cuda_available():
        raise SystemExit("cuda_overhead: no usable CUDA GPU (numbabn info says why); --simulator for a dry run")
    n = 3 if args.simulator else args.calls
    rng = np.random.default_rng(0)
    cases = DRY_CASES if args.simulator else CASES
    all_ops = {name: _ops(cuda, shape, axis, rng) for name, shape, axis in cases}

    print(f"(1) microseconds per call, {n} back-to-back calls: wall (synchronised after the loop) / host alone")
    for name, ops in all_ops.items():
        times = {op: _per_call_us(cuda, f, n) for op, f in ops.items()}
        print(f"  {name:14s}", "   ".join(f"{op} {w:8.1f} / {h:8.1f}" for op, (w, h) in times.items()))

    print("(2) GPU time per call by kernel, microseconds (PyTorch profiler)")
    for name, ops in all_ops.items():
        for op, fn in ops.items():
            rows = None if args.simulator else _gpu_kernels(cuda, fn, min(n, 50))
            if rows is None:
                print(f"  {name} {op}: no PyTorch with CUDA (or the simulator): skipped")
                continue
            total = sum(t for _, t in rows)
            print(f"  {name} {op}: {total:.1f} us in all")
            for key, t in rows[:6]:
                print(f"      {t:8.1f}  {key[:90]}")

    print("(3) host microseconds per call of the pieces")
    for name, us in _pieces(cuda, n).items():
        print(f"  {name:32s} {us:8.1f}")

    first = next(iter(all_ops.values()))
    for op in ("forward", "backward"):
        print(f"(4) cProfile, {next(iter(all_ops))} {op}, {n} calls")
        print(_profile(first[op], n))


if __name__ == "__main__":
    main()
