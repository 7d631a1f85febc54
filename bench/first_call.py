"""Cold and warm first calls, and where the compile time goes (per kernel).

    python bench/first_call.py            # each step in a fresh process, empty cache
    python bench/first_call.py --table    # also the per-kernel compile table
    python bench/first_call.py --alternate 5   # helper on/off, 5 alternating cold runs

Every measurement runs in a new Python process with its own empty
``NUMBA_CACHE_DIR`` (cold) or the one the cold run filled (warm). Cold runs twice:
as users get it (a training forward's cache miss hands the backward's kernels to a
helper process, ``numbabn._compile_ahead``) and with ``NUMBABN_COMPILE_AHEAD=0``
(every kernel compiled by the timed process). CPU seconds are the timed process's
own (not the helper's). Per-kernel times come from Numba's event API
(``numba.core.event``, "numba:compile" events of the kernel dispatchers; nested
helper compiles are included in their caller's time), in a process without helper.

It measures the numbabn its child processes import: the one in the current directory
when there is one (``python -c`` puts it first on ``sys.path``), else the installed
one. To compare two source trees, run it from each tree's directory in turn.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile

_STEPS = r"""
import json, sys, time
import numpy as np
out = {}

def timed(label, fn):
    t, c = time.perf_counter(), time.process_time()
    fn()
    out[label] = (time.perf_counter() - t, time.process_time() - c)

timed("import numbabn", lambda: __import__("numbabn"))
import numbabn
timed("import numba (part of the first call)", lambda: __import__("numba.core.event"))
from numba.core import event as ev
rec = ev.RecordingListener()
ev.register("numba:compile", rec)
rng = np.random.default_rng(0)

def bn(shape, dtype, axis=1, training=True):
    x = rng.standard_normal(shape).astype(dtype)
    C = shape[axis]
    p = np.ones(C, dtype), np.zeros(C, dtype)
    rs = np.zeros(C, dtype), np.ones(C, dtype)
    return x, p, rs

x, p, rs = bn((8, 16, 10, 10), np.float32)
state = {}
timed("first forward float32 NCHW",
      lambda: state.update(r=numbabn.batch_norm_forward(x, *p, running_mean=rs[0], running_var=rs[1])))
timed("first backward float32 NCHW", lambda: numbabn.batch_norm_backward(x, state["r"][1]))
timed("then eval float32 NCHW",
      lambda: numbabn.batch_norm_forward(x, *p, running_mean=rs[0], running_var=rs[1], training=False))
if "--all" in sys.argv or "--variants" in sys.argv:
    x64, p64, rs64 = bn((8, 16, 10, 10), np.float64)
    timed("then forward+backward float64 NCHW",
          lambda: numbabn.batch_norm_backward(x64, numbabn.batch_norm_forward(x64, *p64)[1]))
    xm, pm, rsm = bn((64, 16), np.float32)
    timed("then forward+backward float32 (N, C)",
          lambda: numbabn.batch_norm_backward(xm, numbabn.batch_norm_forward(xm, *pm)[1]))
    xs, ps, rss = bn((8, 16, 4, 4), np.float32)
    timed("then forward+backward float32 4x4 maps",
          lambda: numbabn.batch_norm_backward(xs, numbabn.batch_norm_forward(xs, *ps)[1]))
if "--all" in sys.argv:
    ro = x.copy(); ro.flags.writeable = False
    timed("then read-only/Fortran/strided float32 NCHW",
          lambda: [numbabn.batch_norm_forward(v, *p) for v in (ro, np.asfortranarray(x), x[:, :, ::2])])
    from numbabn.kernels import cpu_driver
    timed("then every remaining variant (warmup)", lambda: [f() for _, f in cpu_driver.warmup_plan()])
    timed("then the fused-residual variants (warmup --residual)",
          lambda: [f() for _, f in cpu_driver.warmup_plan(residual=True)])
kernels = {}
for e in rec.buffer:
    _, event = e
    if event.is_start:
        continue
    disp = event.data["dispatcher"]
    name = disp.py_func.__name__
    kernels.setdefault(name, []).append(event.data.get("args"))
out["compiles"] = {k: len(v) for k, v in kernels.items()}
print(json.dumps(out))
"""

_TIMED_EVENTS = r"""
import json, time, numpy as np
from numba.core import event as ev
starts, rows = {}, []
class L(ev.Listener):
    def on_start(self, event):
        starts[id(event.data["dispatcher"]), str(event.data["args"])] = time.perf_counter()
    def on_end(self, event):
        d = event.data["dispatcher"]
        t = time.perf_counter() - starts.pop((id(d), str(event.data["args"])))
        rows.append((d.py_func.__name__, str(event.data["args"])[:60], t))
ev.register("numba:compile", L())
from numbabn.kernels import cpu_driver
t = time.perf_counter()
for label, f in cpu_driver.warmup_plan():
    f()
rows.append(("TOTAL (every entry point)", "", time.perf_counter() - t))
print(json.dumps(rows))
"""


def _run(code, cache, *args, ahead="1"):
    env = {**os.environ, "NUMBA_CACHE_DIR": cache, "NUMBABN_QUIET": "1", "NUMBABN_COMPILE_AHEAD": ahead}
    # Python's bytecode cache on, as after `pip install`: with PYTHONDONTWRITEBYTECODE
    # set, every process compiles numbabn's modules from source (30 ms of a warm first call).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, env=env, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--table", action="store_true", help="per-kernel compile times (another cold process)")
    ap.add_argument("--alternate", type=int, metavar="N", help="only N cold runs, compile helper on and off in turn")
    args = ap.parse_args()
    if args.alternate:
        return _alternate(args.alternate)
    with tempfile.TemporaryDirectory() as cache:
        cold = _run(_STEPS, cache, "--all")
        warm = _run(_STEPS, cache)
    with tempfile.TemporaryDirectory() as cache:
        alone = _run(_STEPS, cache, "--all", ahead="0")
    print(f"{'step (wall s / CPU s of this process)':<46}{'cold':>14}{'no helper':>14}{'warm':>14}")
    for k, (v, cpu) in ((k, v) for k, v in cold.items() if k != "compiles"):
        a, w = alone.get(k), warm.get(k)
        print(
            f"{k:<46}{v:7.2f}/{cpu:5.2f} "
            + f"{a[0]:7.2f}/{a[1]:5.2f} "
            + (f"{w[0]:7.2f}/{w[1]:5.2f}" if w is not None else "")
        )
    print("specialisations compiled by the timed process (cold, per kernel):", cold["compiles"])
    print("                                      (no helper, per kernel):", alone["compiles"])
    if args.table:
        with tempfile.TemporaryDirectory() as cache:
            rows = _run(_TIMED_EVENTS, cache, ahead="0")
        print(f"\n{'kernel (incl. nested helpers)':<32}{'signature':<62}{'s':>6}")
        for name, sig, t in sorted(rows, key=lambda r: -r[2]):
            print(f"{name:<32}{sig:<62}{t:6.2f}")


def _alternate(n):
    runs = {"1": [], "0": []}
    for _ in range(n):
        for ahead in runs:
            with tempfile.TemporaryDirectory() as cache:
                runs[ahead].append(_run(_STEPS, cache, "--variants", ahead=ahead))
    steps = [k for k in runs["1"][0] if k != "compiles"]
    first = steps[1:4]  # Numba's import, first forward, first backward
    print(f"{n} alternating cold runs, wall s: median [min-max]")
    print(f"{'step':<46}{'helper':>20}{'no helper':>20}")

    def cell(values):
        return f"{sorted(values)[len(values) // 2]:.2f} [{min(values):.2f}-{max(values):.2f}]"

    for k in [*steps, "import + first forward + backward"]:
        cells = [cell([sum(r[s][0] for s in first) if k not in r else r[k][0] for r in runs[ahead]]) for ahead in runs]
        print(f"{k:<46}{cells[0]:>20}{cells[1]:>20}")


if __name__ == "__main__":
    main()
