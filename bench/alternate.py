"""Two versions of numbabn timed in alternating processes: an A/B on a noisy machine.

    git worktree add /tmp/numbabn-old HEAD~1        # the version to compare with
    python bench/alternate.py /tmp/numbabn-old . --shape 4096x1024 --rounds 4

Each round runs one fresh process per source tree (``PYTHONPATH`` set to it, so
``import numbabn`` takes that tree's package; the kernels compile or load from that
tree's cache first, untimed) and prints min and median microseconds per call of the
training forward, eval forward and backward on one float32 input (the calls and
inputs of ``numbabn bench``, ``numbabn.bench.harness``). A shared VM's speed
drifts by up to 1.5x for seconds at a time: alternating processes puts both versions
in every phase, and the minimum and the spread of medians over the rounds say more
than one run of each.
"""

import argparse
import os
import subprocess
import sys

_TIMED = r"""
import sys, timeit
import numpy as np
from numbabn.bench.cases import Case
from numbabn.bench.harness import inputs, numbabn_ops

case = Case("ab", tuple(int(s) for s in sys.argv[1].split("x")), int(sys.argv[2]))
x, dy, gamma, beta, rm, rv = inputs(case, "float32", np.random.default_rng(0))
# the benchmark's own timed calls (outputs preallocated, as numbabn bench times them)
ops = numbabn_ops(case, x, gamma, beta, dy, rm, rv, y=np.empty_like(x), dx=np.empty_like(x))
cells = []
for name, fn in ops.items():
    fn()
    calls = max(1, int(2e-3 / timeit.timeit(fn, number=1)))  # samples of >= 2 ms
    t = sorted(timeit.repeat(fn, number=calls, repeat=40))
    cells.append(f"{name} {t[0] / calls * 1e6:.1f}/{t[20] / calls * 1e6:.1f}")
print("  ".join(cells))
"""


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("old", help="source tree of version A (holds numbabn/)")
    p.add_argument("new", help="source tree of version B")
    p.add_argument("--shape", default="4096x1024", help="input shape, e.g. 128x256x14x14")
    p.add_argument("--axis", type=int, default=1, help="channel axis (-1: channels last)")
    p.add_argument("--rounds", type=int, default=4)
    args = p.parse_args()
    trees = {"A": os.path.abspath(args.old), "B": os.path.abspath(args.new)}
    for tree in trees.values():
        if not os.path.isdir(os.path.join(tree, "numbabn")):
            p.error(f"{tree} holds no numbabn/ package")
    print(f"{args.shape}, axis {args.axis}: us per call, min/median of 40 samples; A = {trees['A']}, B = {trees['B']}")
    for r in range(args.rounds):
        for label, tree in trees.items():
            env = dict(os.environ, PYTHONPATH=tree, NUMBABN_QUIET="1")
            # -P: no current directory on sys.path to shadow PYTHONPATH's package
            out = subprocess.run(
                [sys.executable, "-P", "-c", _TIMED, args.shape, str(args.axis)],
                env=env,
                capture_output=True,
                text=True,
                check=True,
            )
            print(f"round {r + 1} {label}: {out.stdout.strip()}", flush=True)


if __name__ == "__main__":
    main()
