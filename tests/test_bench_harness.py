"""The benchmark harness (numbabn.bench): what a report holds and how it is written.

Timings are never asserted (noise on a shared machine); the derived columns are
checked against the timings they come from.
"""

import csv
import io
import json
import subprocess
import sys
import time

import numpy as np
import pytest

import numbabn
from numbabn.bench import harness, report
from numbabn.bench.cases import OPS, SUITES, TRAFFIC, Case

META_KEYS = {
    "numbabn",
    "backend",
    "threads",
    "copy_gbps",
    "dtype",
    "repeat",
    "numba",
    "numpy",
    "torch",
    "threading_layer",
}


@pytest.fixture(scope="module")
def cpu_report():
    cases = [Case("ncl", (6, 3, 5)), Case("nlc", (6, 5, 3), -1), Case("nc", (16, 4))]
    return cases, harness.run(cases, repeat=2, compare=("numpy",), threads=1)


def test_cpu_report_rows_and_derived_columns(cpu_report):
    cases, rep = cpu_report
    assert [(r.case, r.op) for r in rep.rows] == [(c.name, op) for c in cases for op in OPS]
    assert [r.layout for r in rep.rows[::3]] == ["nchw", "nhwc", "nc"]
    assert set(rep.meta) == META_KEYS
    assert rep.meta["backend"] == "cpu" and rep.meta["threads"] == 1 and rep.meta["copy_gbps"] > 0
    assert rep.meta["numbabn"] == numbabn.__version__  # which numbabn was timed
    for r, case in zip(rep.rows, [c for c in cases for _ in OPS], strict=True):
        S = int(np.prod(case.shape)) * 4
        assert r.backend == "cpu" and r.dtype == "float32" and r.shape == case.shape
        assert r.gbps == pytest.approx(TRAFFIC[r.op] * S / (r.ms / 1e3) / 1e9)
        assert r.pct_copy == pytest.approx(100 * r.gbps / rep.meta["copy_gbps"])
        assert r.vs_numpy == pytest.approx(r.numpy_ms / r.ms) and r.torch_ms is None and r.vs_torch is None
        assert r.first_s > 0


def test_first_calls_of_every_op_come_before_any_timing(monkeypatch):
    """A cold training forward has a helper process compile the backward's kernels
    (numbabn._compile_ahead); the backward's first call waits for it. Timings taken
    before every op's first call would share the cores with that helper."""
    events = []
    real_per_call = harness.per_call

    def first_call(fn, sync=None):
        events.append("first")
        return harness.wall_time(fn, 1)

    def per_call(fn, repeat, *args, **kwargs):
        events.append("time")
        return real_per_call(fn, 1, *args, **kwargs)

    monkeypatch.setattr(harness, "copy_bandwidth", lambda *args, **kwargs: 1.0)
    monkeypatch.setattr(harness, "first_call", first_call)
    monkeypatch.setattr(harness, "per_call", per_call)
    rep = harness.run([Case("a", (6, 3, 5)), Case("b", (16, 4))], repeat=1, compare=(), threads=1)
    assert events == (["first"] * len(OPS) + ["time"] * len(OPS)) * 2
    assert all(r.first_s > 0 for r in rep.rows)


@pytest.mark.parametrize("ops", [("backward",), ("eval", "backward"), ("forward", "eval", "backward")])
def test_the_setup_calls_compile_time_goes_to_the_first_op_timed(monkeypatch, ops):
    # It went to the forward row only: with --op leaving out forward, "first s" and
    # the footer said 0.00 s although the setup call compiled (or loaded) the kernels.
    real_ops = harness.numbabn_ops

    def slow_setup(*args, **kwargs):
        time.sleep(0.05)  # the setup call's compile
        return real_ops(*args, **kwargs)

    monkeypatch.setattr(harness, "copy_bandwidth", lambda *args, **kwargs: 1.0)
    monkeypatch.setattr(harness, "numbabn_ops", slow_setup)
    monkeypatch.setattr(harness, "first_call", lambda fn, sync=None: 0.0)
    rows = harness.run([Case("a", (6, 3, 5))], ops=ops, repeat=1, compare=(), threads=1).rows
    assert [r.op for r in rows] == list(ops)
    assert rows[0].first_s >= 0.05 and all(r.first_s == 0.0 for r in rows[1:])


def test_timed_calls_compute_batch_norm():
    """The callables the harness times (and bench/ reuses) do what their op says."""
    from numbabn.kernels import reference as R

    case = Case("c", (8, 3, 4))
    x, dy, gamma, beta, rm, rv = harness.inputs(case, "float64", np.random.default_rng(1))
    ours = harness.numbabn_ops(case, x, gamma, beta, dy, rm, rv)
    ref = harness.numpy_ops(case, x, gamma, beta, dy, rm, rv)
    np.testing.assert_allclose(ours["forward"]()[0], ref["forward"]()[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(ours["eval"]()[0], ref["eval"]()[0], rtol=1e-10, atol=1e-12)
    for a, b in zip(ours["backward"](), ref["backward"](), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-9, atol=1e-12)
    np.testing.assert_allclose(ref["forward"]()[0], R.forward(x, gamma, beta, axis=1)[0])


def test_run_rejects_bad_backends():
    with pytest.raises(ValueError, match="backend must be 'cpu' or 'cuda', got 'tpu'"):
        harness.run(SUITES["tiny"], backend="tpu")
    with pytest.raises(ValueError, match="does not apply to backend='cuda'"):
        harness.run(SUITES["tiny"], backend="cuda", threads=2)


def test_text_table_aligns_right_under_a_rule():
    assert report.text_table(["a", "long"], [["xyz", "1"], ["1", "22"]]).splitlines() == [
        "  a  long",
        "---  ----",
        "xyz     1",
        "  1    22",
    ]
    assert report.text_table(["a"], [["xyz"]], rule=False) == "  a\nxyz"


def test_report_writers(cpu_report):
    _, rep = cpu_report
    text = report.format_table(rep).splitlines()
    assert text[0].startswith("numbabn cpu bench: float32, 1 thread (python threads), copy bandwidth ")
    assert ", torch not compared, median of 2" in text[0]  # compare=("numpy",): not "n/a", torch may be installed
    assert text[1].split() == [
        "op",
        "case",
        "shape",
        "layout",
        "ms",
        "GB/s",
        "%copy",
        "first",
        "s",
        "numpy",
        "ms",
        "x",
        "numpy",
        "torch",
        "ms",
        "x",
        "torch",
    ]
    assert len(text) == 3 + len(rep.rows) and text[3].split()[:4] == ["forward", "ncl", "6x3x5", "nchw"]
    assert text[3].split()[-2:] == ["-", "-"]  # no torch comparison
    assert report.footer(rep).startswith("first calls (JIT compile or Numba cache load; not in the timings): ")
    assert len(report.footer(rep).splitlines()) == 1  # no torch times: no note on PyTorch's allocation
    f = io.StringIO()
    report.write_json(rep, f)
    assert json.loads(f.getvalue()) == json.loads(json.dumps(rep.to_dict()))
    f = io.StringIO()
    report.write_csv(rep, f)
    rows = list(csv.DictReader(io.StringIO(f.getvalue())))
    assert [r["shape"] for r in rows[::3]] == ["6x3x5", "6x5x3", "16x4"]
    assert float(rows[0]["ms"]) == rep.rows[0].ms and rows[0]["torch_ms"] == ""


def test_harness_does_not_import_numba_cuda():
    code = (
        "import sys; import numbabn.bench.harness, numbabn.bench.report, numbabn.cli.bench; "
        "assert not any(m.startswith('numba.cuda') for m in sys.modules)"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


# --- the CUDA strategy, on the simulator --------------------------------------------------


def test_device_copy_bandwidth():
    from numba import cuda

    from numbabn.bench.cuda import device_copy_bandwidth

    if cuda.config.ENABLE_CUDASIM:
        assert numbabn.cuda_available() is False
        with pytest.raises(RuntimeError, match="simulator"):
            device_copy_bandwidth(1 << 20)
    else:
        assert device_copy_bandwidth(1 << 24, repeats=3) > 0


def test_cuda_run_refuses_the_simulator():
    from numba import cuda

    if not cuda.config.ENABLE_CUDASIM:
        pytest.skip("the CUDA simulator is not active (a real GPU is present)")
    with pytest.raises(RuntimeError, match="simulator"):
        harness.run(SUITES["tiny"], backend="cuda", compare=())


def test_cuda_run_bookkeeping_on_the_simulator(monkeypatch):
    """The CUDA strategy's data flow (device inputs, preallocated outputs, NumPy comparison,
    report), checked without a GPU by letting it past its simulator refusal: the
    simulator's event timings are fake, so only the structure of the report is asserted."""
    from numba import cuda

    import numbabn.bench.cuda as bench_cuda

    if not cuda.config.ENABLE_CUDASIM:
        pytest.skip("a real GPU is present: test_cli.test_bench_cuda_on_gpu runs it for real")
    monkeypatch.setattr(cuda.config, "ENABLE_CUDASIM", False)
    # the simulator's numba.cuda has no kernel compiler to load
    monkeypatch.setattr("numbabn.functional.cuda_compiler_problem", lambda: None)
    monkeypatch.setattr(bench_cuda, "device_copy_bandwidth", lambda nbytes: 1.0)
    monkeypatch.setattr(type(cuda.get_current_device()), "name", "simulated GPU", raising=False)
    cases = [Case("ncl", (4, 3, 5)), Case("nlc", (4, 5, 3), -1)]
    rep = harness.run(cases, ops=("forward", "backward"), backend="cuda", repeat=1, compare=("numpy",))
    assert [(r.case, r.op, r.layout, r.backend) for r in rep.rows] == [
        ("ncl", "forward", "nchw", "cuda"),
        ("ncl", "backward", "nchw", "cuda"),
        ("nlc", "forward", "nhwc", "cuda"),
        ("nlc", "backward", "nhwc", "cuda"),
    ]
    assert all(r.numpy_ms > 0 and r.torch_ms is None for r in rep.rows)
    assert set(rep.meta) == META_KEYS | {"device", "numba_cuda"}
    assert rep.meta["device"] == "simulated GPU" and rep.meta["backend"] == "cuda" and rep.meta["copy_gbps"] == 1.0
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    if not torch.cuda.is_available():
        with pytest.raises(RuntimeError, match="PyTorch that sees the GPU"):
            harness.run(cases, backend="cuda", compare=("torch",))


def test_interleaved_alternates_samples_and_sizes_them():
    """Rounds time every function in turn (so a drift of the machine hits all alike);
    a fast function's sample is several calls (at least min_sample_s), a slow one's one
    call; the result is the median seconds per call."""
    seen = []
    per_call = {"fast": 2e-5, "slow": 3e-3}
    fns = {name: (lambda n=name: n) for name in per_call}
    # the machine's speed per sample: calibration samples first, then 4 rounds
    drift = iter([1.0, 1.0, 1.0, 1.0, 1.3, 1.3, 1.1, 1.1, 1.2, 1.2])

    def sample(fn, calls):
        name = fn()
        seen.append((name, calls))
        return per_call[name] * next(drift)

    medians = harness.interleaved(fns, 4, sample, min_sample_s=1e-3)
    assert seen[:2] == [("fast", 1), ("slow", 1)]  # calibration: one call each
    assert seen[2:] == [("fast", 50), ("slow", 1)] * 4
    assert medians["fast"] == pytest.approx(2e-5 * 1.15) and medians["slow"] == pytest.approx(3e-3 * 1.15)


def test_interleaved_without_a_minimum_sample_times_single_calls():
    """CUDA events time one call exactly (and the simulator's are fake, possibly 0):
    no calibration call, one call per sample."""
    seen = []

    def sample(fn, calls):
        seen.append(calls)
        return 0.0

    assert harness.interleaved({"a": lambda: None}, 3, sample, min_sample_s=0.0) == {"a": 0.0}
    assert seen == [1, 1, 1]


@pytest.mark.parametrize("repeat", [0, -1, 2.0, True])
def test_interleaved_rejects_a_bad_repeat(repeat):
    calls = []
    with pytest.raises(ValueError, match=f"interleaved: repeat must be a positive int, got {repeat!r}"):
        harness.interleaved({"a": lambda: calls.append(1)}, repeat, lambda fn, n: fn() or 1.0)
    assert calls == []  # nothing ran


def test_footer_says_what_the_large_torch_ratios_measure(cpu_report, monkeypatch):
    """PyTorch timed on outputs of 32 MiB and more: its fresh pages against numbabn's
    reused buffers make most of the ratio, and the footer says so, unless glibc was
    told to reuse such blocks for PyTorch too."""
    import dataclasses

    _, rep = cpu_report
    monkeypatch.delenv("MALLOC_MMAP_THRESHOLD_", raising=False)
    big = dataclasses.replace(rep.rows[0], shape=(64, 64, 56, 56), torch_ms=20.0, vs_torch=5.0)
    small = dataclasses.replace(rep.rows[0], torch_ms=0.01, vs_torch=1.0)
    assert len(report.footer(dataclasses.replace(rep, rows=[small])).splitlines()) == 1
    note = report.footer(dataclasses.replace(rep, rows=[small, big])).splitlines()
    assert len(note) == 2 and note[1].startswith("1 case(s) of 32 MiB and more: PyTorch's outputs come as fresh pages")
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", "1073741824")
    assert len(report.footer(dataclasses.replace(rep, rows=[small, big])).splitlines()) == 1
