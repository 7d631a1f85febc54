"""The CPU kernels' passes timed alone, without the functional API around them.

    python bench/kernels_alone.py 4096x1024 200704x64 64x64x3136
    PYTHONPATH=/tmp/numbabn-old python -P bench/kernels_alone.py 4096x1024   # another tree

For each float32 input (2-D: channels last, (M, C); 3-D: (N, C, L)) it prints the
minimum and median microseconds of 25 calls of the statistics pass (forward), the
gradient sums and the dx pass (backward; no ReLU, no residual), each on the calling
thread alone ("1t", every block in one kernel call) and through numbabn's scheduler
on its default thread count ("par"). The A/B of two source trees is done as
``bench/alternate.py`` does it: alternate fresh processes of each (``-P`` keeps the
current directory from shadowing ``PYTHONPATH``), several rounds, and compare the
spread; on a shared VM one run of each says little.
"""

import sys
import timeit
from collections.abc import Callable
from typing import Any

import numpy as np

from numbabn import _threads, config
from numbabn.kernels import cpu_driver as D


def _time(fn: Callable[[], Any], calls: int = 25) -> str:
    fn()
    t = sorted(timeit.repeat(fn, number=1, repeat=calls))
    return f"{t[0] * 1e6:.0f}/{t[calls // 2] * 1e6:.0f}"


def passes(shape: tuple[int, ...]) -> str:
    """One line: min/median us of the statistics, gradient-sum and dx passes."""
    layout = "mc" if len(shape) == 2 else "ncl"
    rng = np.random.default_rng(0)
    x = rng.standard_normal(shape, dtype=np.float32) * 2 + 1
    dy = rng.standard_normal(shape, dtype=np.float32)
    C, chunk = shape[1], config.CHUNK
    one, zero, none = np.ones(C, np.float32), np.zeros(C, np.float32), np.empty(0, np.float32)
    _, invstd, coef = D.forward(
        x, layout, one, zero, none, none, 0.1, 1e-5, True, False, None, 0, np.empty_like(x), chunk
    )
    k, blocks, rows, _, el = D.plan(x, layout, chunk)
    cnt, part = np.empty(rows), np.empty((3, rows, C))
    sums = np.empty((2, rows, C))
    gcoef, dg, db = np.empty((3, coef.shape[1]), np.float32), np.empty(C, np.float32), np.empty(C, np.float32)
    k.grad_sums(dy, x, None, coef, False, chunk, sums, 0, blocks)
    k.grad_coef(sums, 2.0, float(x.size // C), invstd, one, True, gcoef, dg, db)
    dx = np.empty_like(x)
    # the dx pass walks the input as the driver does (short NCL rows: channels-last view)
    edy, ex, edx = el.views(dy, x, dx)
    dx_args = (edy, ex, None, el.coefficients(coef), el.coefficients(gcoef), False, chunk, False, edx, None)
    cells = {
        "stats": ((x, chunk, cnt, part), k.stats, blocks),
        "grad sums": ((dy, x, None, coef, False, chunk, sums), k.grad_sums, blocks),
        "dx": (dx_args, el.specs.grad_apply, el.blocks),
    }
    out = []
    for name, (args, kern, n) in cells.items():
        alone = _time(lambda kern=kern, args=args, n=n: kern(*args, 0, n))
        par = _time(lambda kern=kern, args=args, n=n: _threads.parallel_for(kern, n, x.size, *args))
        out.append(f"{name} 1t {alone} par {par}")
    return f"{'x'.join(map(str, shape))}: " + "  ".join(out)


def main() -> None:
    shapes = sys.argv[1:] or ["4096x1024"]
    for s in shapes:
        dims = s.split("x")
        if len(dims) not in (2, 3) or not all(d.isdigit() and int(d) > 0 for d in dims):
            sys.exit(f"kernels_alone.py: a shape is MxC (channels last) or NxCxL, positive integers; got {s!r}")
    print(f"us per call, min/median of 25; par = {_threads.get_num_threads()} threads")
    for s in shapes:
        print(passes(tuple(int(v) for v in s.split("x"))), flush=True)


if __name__ == "__main__":
    main()
