"""Benchmarks of the scikit-learn estimators against scikit-learn's own, same run.

Used by ``numbabn bench sklearn`` and ``bench/sklearn_bench.py``.

``transformer``: ``BatchNormTransformer().fit(X).transform(X)`` against
``StandardScaler().fit(X).transform(X)`` on the same ``X`` (default (1_000_000, 64),
float32 and float64). One warm-up call per side first (Numba's JIT compile or cache
load is reported as ``first_s``), then the median of ``repeat`` calls. ``gbps`` counts
the minimum traffic of fit + transform, 3S (S = bytes of X: read for the statistics,
read + write to normalise), over the numbabn time.

``mlp``: ``BNMLPClassifier`` against ``MLPClassifier`` on scikit-learn's digits
(pixels / 16, stratified 75/25 split), the same hidden sizes (default (100, 100, 100)),
solver (Adam, each at its default learning rate: 1e-2 with batch norm, scikit-learn's
1e-3 without), batch size (200) and budget: ``epochs`` calls of
``partial_fit`` (one epoch each) per seed. After every epoch the test accuracy is
measured (not timed); reported per seed: final test accuracy, best test accuracy,
training wall time (partial_fit calls only) and the first epoch whose test accuracy
reaches ``target`` (None if never). Both keep their default L2 penalty alpha=1e-4;
both cut an epoch into the same batches (the n mod 200 samples left over form the last
batch, 7 steps per epoch here).

``threads`` (None: the libraries' defaults) caps numbabn's kernel threads and, through
threadpoolctl, the BLAS threads of both sides: for the small matrices of the MLP part,
thread hand-offs dominate on a busy machine.
"""

import statistics
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import numpy as np

from .cases import SKLEARN_PARTS as PARTS
from .report import text_table


def _timed(fn: Callable[..., Any], repeat: int) -> tuple[float, float, Any]:
    """(first call seconds, median of ``repeat`` further calls in seconds, last result)."""
    t0 = time.perf_counter()
    out = fn()
    first = time.perf_counter() - t0
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        out = fn()
        times.append(time.perf_counter() - t0)
    return first, statistics.median(times), out


def bench_transformer(
    n_samples: int = 1_000_000,
    n_features: int = 64,
    dtypes: Sequence[str] = ("float32", "float64"),
    repeat: int = 5,
    seed: int = 0,
) -> list[dict[str, Any]]:
    """Rows comparing fit+transform of BatchNormTransformer and StandardScaler."""
    from sklearn.preprocessing import StandardScaler

    from ..sklearn.transformer import BatchNormTransformer

    rows = []
    rng = np.random.default_rng(seed)
    for dtype in dtypes:
        X = (rng.standard_normal((n_samples, n_features)) * 3.0 + 100.0).astype(dtype)
        first, ours_s, ours = _timed(lambda X=X: BatchNormTransformer(eps=1e-30).fit(X).transform(X), repeat)
        _, ref_s, ref = _timed(lambda X=X: StandardScaler().fit(X).transform(X), repeat)
        rows.append(
            dict(
                bench="transformer",
                case=f"{n_samples}x{n_features}",
                dtype=np.dtype(dtype).name,
                numbabn_ms=ours_s * 1e3,
                sklearn_ms=ref_s * 1e3,
                speedup=ref_s / ours_s,
                gbps=3 * X.nbytes / ours_s / 1e9,
                first_s=first,
                out_dtype=ours.dtype.name,
                max_abs_diff=float(np.max(np.abs(ours.astype(np.float64) - ref))),
            )
        )
        del ours, ref
    return rows


def bench_mlp_digits(
    epochs: int = 50,
    seeds: Sequence[int] = (0, 1, 2),
    hidden: tuple[int, ...] = (100, 100, 100),
    target: float = 0.95,
    dtype: str = "float32",
) -> list[dict[str, Any]]:
    """Rows comparing BNMLPClassifier and MLPClassifier on digits (module docstring)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split
    from sklearn.neural_network import MLPClassifier

    from ..sklearn.mlp import BNMLPClassifier

    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(dtype)
    X_tr, X_te, y_tr, y_te = train_test_split(X, y, test_size=0.25, random_state=0, stratify=y)
    classes = np.unique(y)
    makers = {
        "BNMLPClassifier": lambda s: BNMLPClassifier(hidden_layer_sizes=hidden, random_state=s),
        "MLPClassifier": lambda s: MLPClassifier(hidden_layer_sizes=hidden, random_state=s),
    }
    rows = []
    for seed in seeds:
        for name, make in makers.items():
            clf, train_s, accuracy = make(seed), 0.0, []
            for _ in range(epochs):
                t0 = time.perf_counter()
                clf.partial_fit(X_tr, y_tr, classes=classes)
                train_s += time.perf_counter() - t0
                accuracy.append(clf.score(X_te, y_te))
            reached = [e + 1 for e, a in enumerate(accuracy) if a >= target]
            rows.append(
                dict(
                    bench="mlp",
                    estimator=name,
                    seed=seed,
                    hidden="x".join(map(str, hidden)),
                    dtype=np.dtype(dtype).name,
                    epochs=epochs,
                    test_accuracy=accuracy[-1],
                    best_accuracy=max(accuracy),
                    train_s=train_s,
                    target=target,
                    epochs_to_target=reached[0] if reached else None,
                )
            )
    return rows


@contextmanager
def _thread_limit(threads: int | None) -> Iterator[None]:
    """numbabn's kernel threads and BLAS limited to ``threads`` inside the block (no limit for None)."""
    if threads is None:
        yield
        return
    from threadpoolctl import threadpool_limits

    from .._threads import limit_threads

    with limit_threads(threads), threadpool_limits(limits=threads):
        yield


def run_sklearn_bench(
    parts: Sequence[str] = PARTS,
    *,
    n_samples: int = 1_000_000,
    n_features: int = 64,
    dtypes: Sequence[str] = ("float32", "float64"),
    repeat: int = 5,
    seed: int = 0,
    epochs: int = 50,
    seeds: Sequence[int] = (0, 1, 2),
    hidden: tuple[int, ...] = (100, 100, 100),
    target: float = 0.95,
    threads: int | None = None,
) -> list[dict[str, Any]]:
    """Run the chosen ``parts`` (see ``numbabn.bench.cases.SKLEARN_PARTS``); returns a list of row dicts.

    ``n_samples``, ``n_features``, ``dtypes``, ``repeat``, ``seed``: the transformer
    part; ``epochs``, ``seeds``, ``hidden``, ``target``: the MLP part; ``threads``:
    both (module docstring). Every row records ``threads``, the int numbabn's kernels used.
    """
    unknown = [p for p in parts if p not in PARTS]
    if unknown:
        raise ValueError(f"run_sklearn_bench: unknown parts {unknown}; choose from {PARTS}")
    from .._threads import get_num_threads

    rows = []
    with _thread_limit(threads):
        used = get_num_threads()  # numbabn's kernels' threads: ``threads``, or numbabn's default
        if "transformer" in parts:
            rows += bench_transformer(n_samples, n_features, dtypes, repeat, seed)
        if "mlp" in parts:
            rows += bench_mlp_digits(epochs, seeds, hidden, target)
    for row in rows:
        row["threads"] = used
    return rows


_COLUMNS = {
    "transformer": [
        ("case", "{}"),
        ("dtype", "{}"),
        ("threads", "{}"),
        ("numbabn_ms", "{:.1f}"),
        ("sklearn_ms", "{:.1f}"),
        ("speedup", "{:.2f}x"),
        ("gbps", "{:.2f}"),
        ("first_s", "{:.2f}"),
        ("max_abs_diff", "{:.1e}"),
    ],
    "mlp": [
        ("estimator", "{}"),
        ("seed", "{}"),
        ("hidden", "{}"),
        ("threads", "{}"),
        ("epochs", "{}"),
        ("test_accuracy", "{:.4f}"),
        ("best_accuracy", "{:.4f}"),
        ("train_s", "{:.2f}"),
        ("epochs_to_target", "{}"),
    ],
}
_TITLES = {
    "transformer": "BatchNormTransformer vs StandardScaler, fit + transform (median ms)",
    "mlp": "BNMLPClassifier vs MLPClassifier on digits, same budget (epochs of partial_fit)",
}


def format_table(rows: Sequence[dict[str, Any]]) -> str:
    """Plain-text tables, one per bench kind, in the order the rows came."""
    blocks = []
    for kind in dict.fromkeys(r["bench"] for r in rows):
        cols = _COLUMNS[kind]
        body = [
            ["-" if r[name] is None else fmt.format(r[name]) for name, fmt in cols] for r in rows if r["bench"] == kind
        ]
        blocks.append(_TITLES[kind] + "\n" + text_table([name for name, _ in cols], body, rule=False))
    return "\n\n".join(blocks)
