"""numbabn.torch vs PyTorch's native batch norm, run twice (the machine is noisy).

Runs ``numbabn bench torch`` (:mod:`numbabn.bench.torch_modules`: BN forward+backward
through autograd on the default shapes, and a ResNet-18 32x32 batch-64 SGD training
step with native BN, numbabn BN and numbabn BN + fused ReLU) ``--runs`` times in
fresh processes with the same thread count for PyTorch and numbabn, and writes each
run's JSON under ``results/`` (git-ignored).

    python bench/torch_bench.py [--runs 2] [--threads 2] [--part bn|step]
"""

import argparse
import subprocess
import sys
from pathlib import Path

from numbabn.bench.cases import TORCH_PARTS


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--part", action="append", choices=TORCH_PARTS)
    parser.add_argument("--out", default="results")
    args = parser.parse_args()
    Path(args.out).mkdir(exist_ok=True)
    parts = [a for p in (args.part or []) for a in ("--part", p)]
    for run in range(1, args.runs + 1):
        print(f"== run {run} of {args.runs}", flush=True)
        subprocess.run(
            [
                sys.executable,
                "-m",
                "numbabn",
                "bench",
                "torch",
                "--threads",
                str(args.threads),
                *parts,
                "--json",
                str(Path(args.out) / f"torch_bench_run{run}.json"),
            ],
            check=True,
        )


if __name__ == "__main__":
    main()
