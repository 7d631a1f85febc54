"""Kernel benchmarks with pytest-benchmark, on the same cases and callables as ``numbabn bench``.

One test per (case, op) for numbabn and for PyTorch (skipped without it); groups per
op. The timed callables come from :mod:`numbabn.bench.harness` itself, so both tools
time exactly the same calls (numbabn's functional API; ``F.batch_norm`` and ATen's
``native_batch_norm_backward`` for PyTorch). Each callable runs once before timing,
so JIT compilation and cache loads are excluded. ``extra_info`` records the bytes
moved (``numbabn.bench.cases.TRAFFIC``) and the GB/s at the median time.

    pytest bench/ --benchmark-only
"""

import numpy as np
import pytest

import numbabn
from numbabn.bench import harness
from numbabn.bench.cases import OPS, TRAFFIC


@pytest.fixture(scope="module")
def data(case, dtype):
    """x, dy, gamma, beta, running mean, running var: the harness's inputs for ``case``."""
    return harness.inputs(case, dtype, np.random.default_rng(0))


def _time(benchmark, fn, case, op, x):
    fn()  # warm-up: compile / cache load stays out of the timing
    moved = TRAFFIC[op] * x.nbytes
    benchmark.group = op
    benchmark.extra_info.update(
        case=case.name, shape="x".join(map(str, case.shape)), layout=case.layout, dtype=x.dtype.name, bytes_moved=moved
    )
    benchmark(fn)
    if benchmark.stats is not None:  # None under --benchmark-disable (one plain call)
        benchmark.extra_info["gbps"] = moved / benchmark.stats.stats.median / 1e9


@pytest.mark.parametrize("op", OPS)
def test_numbabn(benchmark, case, op, data):
    x, dy, gamma, beta, rm, rv = data
    ops = harness.numbabn_ops(case, x, gamma, beta, dy, rm, rv)
    _time(benchmark, ops[op], case, op, x)


@pytest.mark.parametrize("op", OPS)
def test_torch(benchmark, case, op, data):
    pytest.importorskip("torch", reason="PyTorch is not installed (pip install torch)")
    x, dy, gamma, beta, _, _ = data
    # Same thread count as numbabn's kernels, as in numbabn bench.
    ops = harness.torch_ops(case, x, gamma, beta, dy, numbabn.get_num_threads())
    _time(benchmark, ops[op], case, op, x)
