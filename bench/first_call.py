"""Cold (JIT compile) and warm (Numba on-disk cache) first-call times, each in a
new process, with a private NUMBA_CACHE_DIR so the cold run really compiles.

    python bench/first_call.py
"""
import json
import os
import subprocess
import sys
import tempfile

CHILD = r"""
import json, time
t0 = time.perf_counter()
import numpy as np, numbabn
t_import = time.perf_counter() - t0
rows = {}
for name, shape, axis in [("ncl", (8, 4, 6, 6), 1), ("mc", (32, 8), 1)]:
    for dt in (np.float32, np.float64):
        x = np.random.default_rng(0).standard_normal(shape).astype(dt)
        g = np.ones(shape[axis], dt)
        rm, rv = np.zeros(shape[axis], dt), np.ones(shape[axis], dt)
        t = time.perf_counter()
        y, ctx = numbabn.batch_norm_forward(x, g, g, running_mean=rm, running_var=rv, axis=axis)
        t_fwd = time.perf_counter() - t
        t = time.perf_counter()
        numbabn.batch_norm_backward(y, ctx)
        t_bwd = time.perf_counter() - t
        t = time.perf_counter()
        numbabn.batch_norm_forward(x, g, g, running_mean=rm, running_var=rv, training=False, axis=axis)
        t_eval = time.perf_counter() - t
        rows[f"{name}-{np.dtype(dt).name}"] = {"forward": t_fwd, "backward": t_bwd, "eval": t_eval}
print(json.dumps({"import_s": t_import, "first_call_s": rows}))
"""


def main():
    with tempfile.TemporaryDirectory() as cache:
        env = dict(os.environ, NUMBA_CACHE_DIR=cache)
        runs = {}
        for label in ("cold", "warm"):
            out = subprocess.run([sys.executable, "-c", CHILD], env=env, capture_output=True, text=True, check=True)
            runs[label] = json.loads(out.stdout.strip().splitlines()[-1])
    print(f"{'variant':>12} {'op':>9} {'cold s':>8} {'warm s':>8}")
    for key in runs["cold"]["first_call_s"]:
        for op in ("forward", "backward", "eval"):
            c = runs["cold"]["first_call_s"][key][op]
            w = runs["warm"]["first_call_s"][key][op]
            print(f"{key:>12} {op:>9} {c:8.3f} {w:8.3f}")
    total = {k: sum(sum(v.values()) for v in r["first_call_s"].values()) for k, r in runs.items()}
    print(f"total: cold {total['cold']:.1f} s, warm {total['warm']:.2f} s; "
          f"import numbabn {runs['warm']['import_s'] * 1e3:.0f} ms")


if __name__ == "__main__":
    main()
