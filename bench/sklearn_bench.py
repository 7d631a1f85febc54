"""scikit-learn benchmarks: BatchNormTransformer vs StandardScaler, and BNMLPClassifier
vs MLPClassifier on digits. A thin script over :mod:`numbabn.bench.sklearn_estimators`, which
``numbabn bench sklearn`` uses too.

    python bench/sklearn_bench.py [--parts transformer mlp] [--samples N] [--features C]
                                  [--repeat R] [--epochs E] [--seeds 0 1 2] [--threads T]
                                  [--json PATH]
"""

import argparse
import json

from numbabn.bench.sklearn_estimators import PARTS, format_table, run_sklearn_bench


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--samples", type=int, default=1_000_000, help="transformer: rows of X")
    parser.add_argument("--features", type=int, default=64, help="transformer: columns of X")
    parser.add_argument("--dtypes", nargs="+", choices=["float32", "float64"], default=["float32", "float64"])
    parser.add_argument("--repeat", type=int, default=5, help="transformer: timed calls (median)")
    parser.add_argument("--epochs", type=int, default=50, help="mlp: epochs of partial_fit per run")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="mlp: random_state of each run")
    parser.add_argument("--threads", type=int, help="cap Numba and BLAS threads (both sides)")
    parser.add_argument("--json", help="also write the rows to this JSON file")
    args = parser.parse_args(argv)
    rows = run_sklearn_bench(
        args.parts,
        n_samples=args.samples,
        n_features=args.features,
        dtypes=args.dtypes,
        repeat=args.repeat,
        epochs=args.epochs,
        seeds=tuple(args.seeds),
        threads=args.threads,
    )
    print(format_table(rows))
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(rows, fh, indent=2)
    return rows


if __name__ == "__main__":
    main()
