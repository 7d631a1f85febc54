"""The ``numbabn`` command line: every command, the JSON/CSV/plot outputs and the error paths.

Benchmarks run on tiny shapes with ``--repeat 2`` to stay fast; the timings themselves
are never asserted (they are noise on a shared machine), only what the report holds.
"""

import csv
import errno
import importlib
import json
import os
import stat
import subprocess
import sys
import tempfile
import types
import warnings
from pathlib import Path

import click
import numpy as np
import pytest
from click.testing import CliRunner

import numbabn
import numbabn.cli.bench as bench_cli
import numbabn.cli.experiment as experiment_cli
from numbabn import _compile_ahead
from numbabn.bench.cases import SUITES, Case
from numbabn.cli import main

ROOT = Path(__file__).resolve().parents[1]
ROW_KEYS = {
    "op",
    "case",
    "shape",
    "layout",
    "dtype",
    "backend",
    "ms",
    "gbps",
    "pct_copy",
    "first_s",
    "numpy_ms",
    "torch_ms",
    "vs_numpy",
    "vs_torch",
}


def invoke(*args):
    result = CliRunner().invoke(main, list(args))
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception  # show the real traceback, not just exit code 1
    return result


def error_line(result):
    """The single 'Error: ...' line of a failed command (click's usage lines aside)."""
    lines = [line for line in result.output.splitlines() if line.startswith("Error:")]
    assert len(lines) == 1, result.output
    return lines[0]


# --- the group -------------------------------------------------------------------------


def test_version():
    result = invoke("--version")
    assert result.exit_code == 0
    assert result.output.strip() == f"numbabn, version {numbabn.__version__}"


def test_help_lists_every_command():
    result = invoke("--help")
    assert result.exit_code == 0
    for name in ("info", "bench", "layers", "experiment"):
        assert f"  {name} " in result.output


def test_help_does_not_import_numba():
    """Loading the CLI and rendering help must stay cheap: no NumPy, Numba, PyTorch,
    scikit-learn or matplotlib (the bench choices come from numbabn.bench.cases)."""
    heavy = ("numpy", "numba", "torch", "sklearn", "matplotlib")
    code = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "import numbabn.cli\n"
        "for args in (['--help'], ['bench', '--help'], ['bench', 'sklearn', '--help'], ['bench', 'torch', '--help'],\n"
        "             ['info', '--help'], ['layers', '--help']):\n"
        "    assert CliRunner().invoke(numbabn.cli.main, args).exit_code == 0, args\n"
        f"print(json.dumps({{m: m in sys.modules for m in {heavy!r}}}))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert json.loads(out.stdout) == dict.fromkeys(heavy, False)


def test_verbose_and_quiet_exclude_each_other():
    result = invoke("-v", "-q", "info")
    assert result.exit_code == 2
    assert "exclude each other" in error_line(result)


def test_quiet_silences_the_compile_note_for_every_command(tmp_path):
    """The note of a cold kernel compile is silenced by -q as by NUMBABN_QUIET=1 (it was
    only by `numbabn warmup`). One empty kernel cache: float32's kernels compile quietly,
    then float64's, not quietly, print the note."""
    env = {k: v for k, v in os.environ.items() if k != "NUMBABN_QUIET"}
    env.update(NUMBA_CACHE_DIR=str(tmp_path), NUMBABN_COMPILE_AHEAD="0")  # no helper process: cheaper
    args = [sys.executable, "-m", "numbabn"]
    bench = ["bench", "--shape", "8x4", "--repeat", "1", "--compare", "none", "--op", "forward"]
    quiet = subprocess.run([*args, "-q", *bench], capture_output=True, text=True, env=env, check=True)
    assert quiet.stderr == "" and "forward" in quiet.stdout
    loud = subprocess.run([*args, *bench, "--dtype", "float64"], capture_output=True, text=True, env=env, check=True)
    assert loud.stderr.startswith("numbabn: compiling CPU kernels not yet in the cache"), loud.stderr


def test_entry_points_in_subprocesses():
    """The installed console script, ``python -m numbabn`` and the checkout's cli.py."""
    script = Path(sys.executable).with_name("numbabn")
    assert script.exists(), "console script missing: install the package (pip install -e .)"
    for cmd in ([str(script)], [sys.executable, "-m", "numbabn"], [sys.executable, str(ROOT / "cli.py")]):
        out = subprocess.run(cmd + ["--version"], capture_output=True, text=True, check=True, cwd=ROOT)
        assert out.stdout.strip().endswith(f"version {numbabn.__version__}"), cmd
    out = subprocess.run([str(script), "info", "--json"], capture_output=True, text=True, check=True)
    data = json.loads(out.stdout)
    assert data["versions"]["numbabn"] == numbabn.__version__
    assert data["cuda"]["status"] in ("gpu", "simulator", "none")


# --- info ------------------------------------------------------------------------------


def test_info_json():
    import numba

    data = json.loads(invoke("info", "--json").output)
    assert data["versions"]["numba"] == numba.__version__
    assert data["versions"]["click"] is not None
    assert data["threading"]["threads"] == numbabn.get_num_threads()
    assert data["threading"]["available_cpus"] == numbabn.available_cpus()
    expected = "simulator" if numba.config.ENABLE_CUDASIM else ("gpu" if numbabn.cuda_available() else "none")
    assert data["cuda"]["status"] == expected
    if expected == "gpu":
        assert data["cuda"]["memory_total_bytes"] > 0 and data["cuda"]["device"]
    cache = data["kernel_cache"]
    assert Path(cache["dir"]).is_absolute() and cache["kernels"] >= 10 and cache["entries"] >= 0
    assert cache["read_only_dirs"] == []
    assert cache["compile_helper"] is _compile_ahead.enabled()
    assert data["layers"]["batch_norm1d"] == "builtin"
    assert data["output_buffers"]["limit_mib"] == numbabn.config.BUFFER_CACHE_MB
    assert data["output_buffers"]["min_bytes"] == 32 << 20
    assert data["output_buffers"]["stream_min_bytes"] == numbabn.config.STREAM_MIN
    assert data["output_buffers"]["stream_timed"] == numbabn.config.STREAM_AUTO
    assert data["torch_native_below"] == numbabn.config.TORCH_NATIVE_BELOW
    assert data["torch_native_eval_below"] == numbabn.config.TORCH_NATIVE_EVAL_BELOW
    assert data["torch_cuda_kernels"] is numbabn.config.TORCH_CUDA_KERNELS is False


@pytest.mark.parametrize("below", [1 << 20, 0])
def test_info_says_which_torch_inputs_run_the_kernels(monkeypatch, below):
    monkeypatch.setattr(numbabn.config, "TORCH_NATIVE_BELOW", below)
    line = next(x for x in invoke("info").output.splitlines() if x.startswith("numbabn.torch"))
    assert (
        "fewer than 1048576 values (channels-last: 8388608, 2097152 with a fused ReLU/residual) run PyTorch's" in line
    ) is bool(below)
    assert ("every CPU input runs numbabn's kernels" in line) is not bool(below)


@pytest.mark.parametrize("eval_below", [1 << 23, 0])
def test_info_says_which_torch_inference_runs_the_kernels(monkeypatch, eval_below):
    monkeypatch.setattr(numbabn.config, "TORCH_NATIVE_BELOW", 1 << 20)
    monkeypatch.setattr(numbabn.config, "TORCH_NATIVE_EVAL_BELOW", eval_below)
    lines = invoke("info").output.splitlines()
    line = lines[next(i for i, x in enumerate(lines) if x.startswith("numbabn.torch")) + 1]
    assert ("inference (no graph, no fused ReLU/residual) of fewer than 8388608 values" in line) is bool(eval_below)
    assert ("plain CPU inference: as above" in line) is not bool(eval_below)


@pytest.mark.parametrize("kernels", [False, True])
def test_info_says_where_cuda_tensors_run(monkeypatch, kernels):
    monkeypatch.setattr(numbabn.config, "TORCH_CUDA_KERNELS", kernels)
    lines = invoke("info").output.splitlines()
    line = lines[next(i for i, x in enumerate(lines) if x.startswith("numbabn.torch")) + 2]
    assert ("CUDA tensors run numbabn's CUDA kernels" in line) is kernels
    assert ("CUDA tensors run PyTorch's batch norm" in line) is not kernels


@pytest.mark.parametrize("limit", [256, 0])
def test_info_says_whether_outputs_are_reused(monkeypatch, limit):
    monkeypatch.setattr(numbabn.config, "BUFFER_CACHE_MB", limit)
    line = next(x for x in invoke("info").output.splitlines() if x.startswith("output buffers"))
    assert ("up to 256 MiB kept" in line) is bool(limit) and ("newly allocated" in line) is not bool(limit)


@pytest.mark.parametrize("ahead", [True, False])
def test_info_says_where_kernels_compile(monkeypatch, ahead):
    monkeypatch.setattr(numbabn.config, "COMPILE_AHEAD", ahead)
    monkeypatch.setattr(_compile_ahead._threads, "get_num_threads", lambda: 2)
    for name in _compile_ahead._LOCAL_RANKS:  # as a lone process, also when run under a launcher
        monkeypatch.delenv(name, raising=False)
    line = next(x for x in invoke("info").output.splitlines() if x.startswith("compiling"))
    assert ("helper process" in line) is ahead and ("calling process only" in line) is not ahead


def test_info_text_verbose():
    result = invoke("-v", "info")
    assert result.exit_code == 0
    for label in ("numba ", "threading", "CUDA", "kernel cache", "layers"):
        assert label in result.output
    assert "batch_norm2d (builtin)" in result.output  # -v: one line per layer


def test_info_without_registry(monkeypatch):
    monkeypatch.setitem(sys.modules, "numbabn.registry", None)  # import now fails as if absent
    assert json.loads(invoke("info", "--json").output)["layers"] is None
    assert "registry not installed" in invoke("info").output


# --- layers ----------------------------------------------------------------------------


def test_layers():
    from numbabn import registry

    rows = json.loads(invoke("layers", "--json").output)
    assert {r["name"]: r["origin"] for r in rows} == registry.available_layers()
    bn = next(r for r in rows if r["name"] == "batch_norm1d")
    assert bn["origin"] == "builtin" and bn["class"].endswith(".BatchNorm1d")
    text = invoke("layers").output.splitlines()
    assert text[0].split() == ["name", "origin"] and len(text) == len(rows) + 2
    assert invoke("-v", "layers").output.splitlines()[0].split() == ["name", "origin", "class"]


# --- bench -----------------------------------------------------------------------------


def test_bench_json_to_stdout_csv_and_plot(tmp_path):
    csv_path, png = tmp_path / "b.csv", tmp_path / "b.png"
    result = invoke(
        "-q",
        "bench",
        "--suite",
        "tiny",
        "--repeat",
        "2",
        "--compare",
        "none",
        "--json",
        "-",
        "--csv",
        str(csv_path),
        "--plot",
        str(png),
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)  # stdout holds the JSON and nothing else
    assert "numbabn cpu bench" in result.stderr and "first calls" in result.stderr
    assert "plot written" not in result.stderr  # -q
    rows = report["rows"]
    assert [(r["case"], r["op"]) for r in rows] == [
        (c.name, op) for c in SUITES["tiny"] for op in ("forward", "eval", "backward")
    ]
    for r in rows:
        assert set(r) == ROW_KEYS
        assert r["ms"] > 0 and r["gbps"] > 0 and r["first_s"] >= 0
        assert r["numpy_ms"] is None and r["torch_ms"] is None and r["backend"] == "cpu"
    assert report["meta"]["repeat"] == 2 and report["meta"]["copy_gbps"] > 0
    with open(csv_path, newline="") as f:
        table = list(csv.DictReader(f))
    assert [(t["case"], t["op"], t["shape"]) for t in table] == [
        (r["case"], r["op"], "x".join(map(str, r["shape"]))) for r in rows
    ]
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_shapes_layout_ops_and_default_compare(monkeypatch):
    monkeypatch.setattr(bench_cli, "torch_import_error", lambda: "PyTorch is not installed")  # default = what is there
    result = invoke(
        "-v",
        "bench",
        "--shape",
        "8x6x5x4",
        "--shape",
        "32x10",
        "--layout",
        "nhwc",
        "--op",
        "backward,eval",
        "--repeat",
        "2",
        "--json",
        "-",
    )
    assert result.exit_code == 0, result.output
    assert "timing 2 cases x 2 ops" in result.stderr  # -v
    rows = json.loads(result.stdout)["rows"]
    assert [(r["case"], r["op"], r["layout"]) for r in rows] == [
        ("8x6x5x4", "eval", "nhwc"),
        ("8x6x5x4", "backward", "nhwc"),
        ("32x10", "eval", "nc"),
        ("32x10", "backward", "nc"),
    ]
    assert all(r["numpy_ms"] > 0 and r["vs_numpy"] > 0 and r["torch_ms"] is None for r in rows)


def test_bench_compare_torch():
    torch = pytest.importorskip("torch", reason="PyTorch is not installed")
    result = invoke(
        "bench",
        "--shape",
        "16x8x3",
        "--layout",
        "nhwc",
        "--op",
        "forward",
        "--repeat",
        "2",
        "--compare",
        "torch",
        "--csv",
        "-",
    )
    assert result.exit_code == 0, result.output
    (row,) = list(csv.DictReader(result.stdout.splitlines()))
    assert float(row["torch_ms"]) > 0 and row["numpy_ms"] == ""
    assert f"torch {torch.__version__}" in result.stderr


def test_bench_help_lists_the_suites():
    help_text = " ".join(invoke("bench", "--help").output.split())
    assert all(name in help_text for name in SUITES)
    assert "no metadata: versions, threads and the copy bandwidth are in --json" in help_text  # --csv


@pytest.mark.parametrize(
    "args, message",
    [
        (["--shape", "64xfoo"], "shape must look like"),
        (["--shape", "0x3"], "positive sizes"),
        (["--shape", "1x16"], "fewer than 2 values per channel"),
        (["--op", "forward,sideways"], "unknown op 'sideways'"),
        (["--suite", "huge"], "unknown suite 'huge'"),
        (["--compare", "jax"], "expected a comma list"),
        (["--dtype", "float16"], "'float16' is not one of"),
        (["--threads", "0"], "not in the range"),
        (["--threads", "100000"], "CPUs this process may use"),
        (["--backend", "cuda", "--threads", "2"], "does not apply to --backend cuda"),
        (["--json", "-", "--csv", "-"], "cannot both write to stdout"),
        (["--plot", "plot.txt"], ".png, .svg or .pdf"),
        (["--json", "no/such/dir/x.json"], "does not exist"),
        (["--layout", "nhwc"], "--layout sets the channel axis of --shape; give --shape too"),
        (["--json", ""], "an empty path (use '-' for stdout)"),
        (["--layout", "nchw", "--suite", "tiny"], "--layout sets the channel axis of --shape"),
    ],
)
def test_bench_usage_errors(args, message):
    result = invoke("bench", *args)
    assert result.exit_code == 2
    assert message in error_line(result)


@pytest.mark.parametrize(
    "args, message",
    [
        (
            ["--json", "out.json", "--csv", "out.json"],
            "--json and --csv name the same file ('out.json' and 'out.json')",
        ),
        (["--json", "x.png", "--plot", "./x.png"], "--json and --plot name the same file ('x.png' and './x.png')"),
        (["--csv", "link.csv", "--json", "sub/../real.csv"], "--json and --csv name the same file"),  # a symlink
        (["--json", "real.csv", "--csv", "hard.csv"], "--json and --csv name the same file"),  # a hard link
        (["--json", "-", "--csv", "/dev/stdout"], "--json and --csv cannot both write to stdout"),
    ],
)
def test_bench_outputs_naming_one_file_are_refused_before_any_work(tmp_path, monkeypatch, args, message):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "sub").mkdir()
    (tmp_path / "real.csv").write_text("old")
    (tmp_path / "link.csv").symlink_to("real.csv")
    os.link(tmp_path / "real.csv", tmp_path / "hard.csv")
    monkeypatch.setattr("numbabn.bench.harness.run", lambda *a, **k: pytest.fail("the benchmark ran"))
    result = invoke("bench", "--shape", "8x4", "--repeat", "1", "--compare", "none", *args)
    assert result.exit_code == 2 and message in error_line(result) and result.output.count("\n") == 1, result.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["hard.csv", "link.csv", "real.csv", "sub"]
    assert (tmp_path / "real.csv").read_text() == "old"


@pytest.mark.parametrize("option", ["--json", "--csv"])
def test_bench_output_to_dev_stdout_on_a_pipe_is_stdout(option):
    # /dev/stdout on a pipe passed the up-front check, then the run failed at the end:
    # "cannot write the JSON report to '/dev/stdout': No such file or directory"
    cmd = [sys.executable, "-m", "numbabn", "bench", "--shape", "8x4", "--op", "eval", "--repeat", "1"]
    out = subprocess.run(
        cmd + ["--compare", "none", option, "/dev/stdout"], capture_output=True, text=True, cwd=ROOT, timeout=300
    )
    assert out.returncode == 0, out.stderr
    if option == "--json":
        assert [r["op"] for r in json.loads(out.stdout)["rows"]] == ["eval"]
    else:
        assert [r["op"] for r in csv.DictReader(out.stdout.splitlines())] == ["eval"]
    assert "numbabn cpu bench" in out.stderr and "numbabn cpu bench" not in out.stdout  # the table: stderr


def test_bench_outputs_may_both_go_to_dev_null(tmp_path, monkeypatch):
    """A device keeps nothing to overwrite: --json and --csv to /dev/null both run."""
    monkeypatch.chdir(tmp_path)
    result = invoke(
        "-q",
        "bench",
        "--shape",
        "8x4",
        "--repeat",
        "1",
        "--compare",
        "none",
        "--op",
        "forward",
        "--json",
        "/dev/null",
        "--csv",
        "/dev/null",
    )
    assert result.exit_code == 0, result.output
    assert not list(tmp_path.iterdir())


def test_bench_cuda_without_gpu(monkeypatch):
    monkeypatch.setattr(numbabn, "cuda_available", lambda: False)
    result = invoke("bench", "--backend", "cuda", "--suite", "tiny")
    assert result.exit_code == 2
    assert result.output.strip() == (
        "Error: CUDA backend requested but no GPU is available (simulator timings are refused)"
    )


def test_bench_torch_not_installed(monkeypatch):
    monkeypatch.setattr(bench_cli, "torch_import_error", lambda: "PyTorch is not installed")
    result = invoke("bench", "--suite", "tiny", "--compare", "numpy,torch")
    assert result.exit_code == 2
    assert result.output.strip() == "Error: --compare torch: PyTorch is not installed; use --compare numpy or none"


BROKEN_TORCH = "simulated broken torch: libtorch_cpu.so: cannot open shared object file"


@pytest.fixture
def broken_torch(tmp_path, monkeypatch):
    """A PyTorch that is found but whose import raises (a missing shared library)."""
    fake = tmp_path / "fake_torch"
    fake.mkdir()
    (fake / "torch.py").write_text(f"raise ImportError({BROKEN_TORCH!r})\n")
    monkeypatch.syspath_prepend(str(fake))
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # restored afterwards
    monkeypatch.setattr("numbabn.bench.harness.copy_bandwidth", lambda *a, **k: 1.0)


@pytest.mark.parametrize("quiet", [False, True])
def test_bench_default_compare_leaves_out_a_torch_that_fails_to_import(broken_torch, quiet):
    # used to run the copy probe, then die with the ImportError's traceback
    args = ["-q"] * quiet + ["bench", "--shape", "8x4", "--op", "eval", "--repeat", "1", "--json", "-"]
    result = invoke(*args)
    assert result.exit_code == 0, result.output
    assert all(r["torch_ms"] is None and r["numpy_ms"] > 0 for r in json.loads(result.stdout)["rows"])
    note = f"note: not comparing with PyTorch: PyTorch is installed but fails to import (ImportError: {BROKEN_TORCH})"
    assert (note in result.stderr) is not quiet, result.stderr


@pytest.mark.parametrize(
    "args",
    [["bench", "--suite", "tiny", "--compare", "torch"], ["bench", "torch", "--part", "bn", "--repeat", "1"]],
)
def test_a_torch_that_fails_to_import_is_one_line_before_any_work(broken_torch, monkeypatch, args):
    monkeypatch.setattr("numbabn.bench.harness.run", lambda *a, **k: pytest.fail("the benchmark ran"))
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1, result.output
    prefix = "--compare torch" if args[1] != "torch" else "numbabn bench torch needs PyTorch"
    assert result.output.startswith(
        f"Error: {prefix}: PyTorch is installed but fails to import (ImportError: {BROKEN_TORCH})"
    ), result.output


def test_bench_torch_out_of_memory_is_one_line(monkeypatch):
    # a --batch too large for memory was a RuntimeError traceback, exit 1
    pytest.importorskip("torch", reason="PyTorch is not installed")
    from numbabn.bench import torch_modules

    message = (
        "[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: "
        "you tried to allocate 1717986918400 bytes. Error code 12 (Cannot allocate memory)"
    )

    def run_step(**kwargs):
        raise RuntimeError(message)

    monkeypatch.setattr(torch_modules, "run_step", run_step)
    result = invoke("bench", "torch", "--part", "step", "--batch", "100000000")
    assert result.exit_code == 2, result.output
    assert result.output == f"Error: out of memory (RuntimeError: {message}); try smaller inputs\n"


@pytest.mark.skipif(not numbabn.cuda_available(), reason="needs a real CUDA GPU (not the simulator)")
def test_bench_cuda_on_gpu():
    result = invoke(
        "bench", "--backend", "cuda", "--suite", "tiny", "--repeat", "2", "--compare", "numpy", "--json", "-"
    )
    assert result.exit_code == 0, result.output
    report = json.loads(result.stdout)
    assert report["meta"]["backend"] == "cuda" and report["meta"]["copy_gbps"] > 0
    assert all(r["backend"] == "cuda" and r["ms"] > 0 and r["numpy_ms"] > 0 for r in report["rows"])


FAKE_BENCH = click.Command(
    "fake", callback=lambda: click.echo("fake benchmark ran"), help="A stand-in for a benchmark subcommand module."
)


def test_bench_subcommand_seam(monkeypatch):
    """A subcommand is one SUBCOMMANDS entry, and running it skips the kernel benchmark."""
    monkeypatch.setitem(bench_cli.SUBCOMMANDS, "fake", f"{__name__}:FAKE_BENCH")
    assert "fake" in invoke("bench", "--help").output
    result = invoke("bench", "fake")
    assert result.exit_code == 0
    assert result.output == "fake benchmark ran\n"


# --- experiment ------------------------------------------------------------------------


def toy_experiment(*, steps=None, seeds=None, lr=None, full=False, out=None):
    """Toy experiment standing in for numbabn.train.experiments.

    Writes two files to --out and echoes its arguments.
    """
    if out is not None:
        (out / "toy.json").write_text("{}")
        (out / "toy.txt").write_text("done")
    return {"steps": steps, "seeds": seeds, "lr": lr, "full": full, "out": None if out is None else str(out)}


@pytest.fixture
def fake_experiments(monkeypatch):
    module = types.ModuleType("fake_numbabn_experiments")
    module.EXPERIMENTS = {"toy": toy_experiment}
    monkeypatch.setitem(sys.modules, module.__name__, module)
    monkeypatch.setattr(experiment_cli, "EXPERIMENTS_MODULE", module.__name__)


def test_experiment_seam(fake_experiments, tmp_path):
    listing = invoke("experiment", "--help").output
    assert "toy" in listing and "Toy experiment standing in" in listing
    assert all(
        opt in invoke("experiment", "toy", "--help").output
        for opt in ("--steps", "--seeds", "--seed", "--lr", "--full", "--out", "--json")
    )
    assert "--depth" not in invoke("experiment", "toy", "--help").output  # toy takes no depth
    out = tmp_path / "new"  # the last component is created
    result = invoke(
        "experiment",
        "toy",
        "--steps",
        "5",
        "--seed",
        "3",
        "--seed",
        "4",
        "--lr",
        "0.5",
        "--lr",
        "0.2",
        "--full",
        "--out",
        str(out),
        "--json",
    )
    assert result.exit_code == 0, result.output
    assert json.loads(result.output) == {"steps": 5, "seeds": [3, 4], "lr": [0.5, 0.2], "full": True, "out": str(out)}
    assert (out / "toy.txt").read_text() == "done"
    assert json.loads(invoke("experiment", "toy", "--seeds", "2", "--json").output)["seeds"] == 2
    assert invoke("experiment", "toy").output.splitlines() == [  # numbabn.train.summary.format_summary
        "steps: None",
        "seeds: None",
        "lr:    None",
        "full:  False",
        "out:   None",
    ]
    assert invoke("experiment", "toy", "--steps", "0").exit_code == 2
    assert invoke("experiment", "nope").exit_code == 2
    missing = invoke("experiment", "toy", "--out", str(tmp_path / "no" / "such"))  # one rule with bench
    assert missing.exit_code == 2 and "does not exist" in error_line(missing)
    assert not (tmp_path / "no").exists()


def test_experiment_group_without_module(monkeypatch):
    monkeypatch.setattr(experiment_cli, "EXPERIMENTS_MODULE", "numbabn._no_such_experiments")
    result = invoke("experiment", "--help")
    assert result.exit_code == 0
    assert "none installed (numbabn._no_such_experiments is not available)" in result.output


def test_experiment_real_registry():
    experiments = importlib.import_module(experiment_cli.EXPERIMENTS_MODULE).EXPERIMENTS
    assert experiments, "numbabn.train.experiments.EXPERIMENTS is empty"
    listing = invoke("experiment", "--help").output
    for name in experiments:
        assert name in listing
        result = invoke("experiment", name, "--help")
        assert result.exit_code == 0 and "--steps" in result.output


@pytest.mark.parametrize(
    "message, args, expected",
    [
        (
            "experiment toy: seeds must be odd, got [2]",
            ["--seed", "2"],
            "Invalid value for '--seed': seeds must be odd",
        ),
        (
            "experiment toy: seeds must be odd, got 2",
            ["--seeds", "2"],
            "Invalid value for '--seeds': seeds must be odd",
        ),
        ("experiment toy: lr must be < 1, got (2.0,)", ["--lr", "2"], "Invalid value for '--lr': lr must be < 1"),
    ],
)
def test_experiment_argument_check_is_an_option_error(fake_experiments, monkeypatch, message, args, expected):
    def toy(**kwargs):
        raise ValueError(message)

    monkeypatch.setitem(sys.modules[experiment_cli.EXPERIMENTS_MODULE].EXPERIMENTS, "toy", toy)
    result = invoke("experiment", "toy", *args)
    assert result.exit_code == 2 and result.output.startswith(f"Error: {expected}") and result.output.count("\n") == 1


def test_experiment_other_value_errors_are_not_option_errors(fake_experiments, monkeypatch):
    def toy(**kwargs):
        raise ValueError("experiment toy: the data must be finite")  # a bug or the data, not an option

    monkeypatch.setitem(sys.modules[experiment_cli.EXPERIMENTS_MODULE].EXPERIMENTS, "toy", toy)
    with pytest.raises(ValueError, match="the data must be finite"):
        invoke("experiment", "toy")


def test_experiment_json_is_strict(fake_experiments, monkeypatch):
    """A summary over no finite value (NaN, infinities) prints null: NaN is not JSON."""
    summary = {"median": float("nan"), "ci": [float("-inf"), 1.0], "max": np.float64("inf")}
    monkeypatch.setitem(sys.modules[experiment_cli.EXPERIMENTS_MODULE].EXPERIMENTS, "toy", lambda **kw: summary)
    result = invoke("experiment", "toy", "--json")
    assert result.exit_code == 0, result.output

    def refuse(constant):
        raise AssertionError(f"{constant} is not JSON")

    assert json.loads(result.output, parse_constant=refuse) == {"median": None, "ci": [None, 1.0], "max": None}


def test_experiment_out_is_created_with_the_mode_mkdir_gives(fake_experiments, tmp_path):
    umask = os.umask(0o027)
    try:
        result = invoke("experiment", "toy", "--out", str(tmp_path / "new"))
    finally:
        os.umask(umask)
    assert result.exit_code == 0, result.output
    assert stat.S_IMODE((tmp_path / "new").stat().st_mode) == 0o750  # not mkdtemp's 0o700


def test_experiment_out_empty_is_an_option_error(fake_experiments, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    result = invoke("experiment", "toy", "--out", "")
    assert result.exit_code == 2 and "Invalid value for '--out': an empty path" in result.output
    assert result.output.count("\n") == 1 and not list(tmp_path.iterdir())  # nothing written to the cwd


def test_staged_output_dir_publishes_paths_joined():
    """Paths in the stage become the same names in --out (joined: --out / gives /x, not
    //x); other strings, even ones starting with the stage's name, stay."""
    from numbabn.cli._common import staged_output_dir

    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "out"
        with staged_output_dir(out) as (stage, publish):
            got = publish({"json": str(stage / "a.json"), "figs": [str(stage / "f" / "b.png"), str(stage)]})
            kept = publish([f"{stage}x/c.json", "toy"])
        assert got == {"json": str(out / "a.json"), "figs": [str(out / "f" / "b.png"), str(out)]}
        assert kept == [f"{stage}x/c.json", "toy"]


def _kept_stage(result, where, existed=True):
    """The staging directory a finished run's files were kept in: named by the error
    (one line on stderr) and by the summary printed before it on stdout."""
    (line,) = result.stderr.splitlines()
    head, _, stage = line.partition(
        ", apart from this run's files, kept in " if existed else "; this run's files are kept in "
    )
    assert head == f"Error: {where}", line
    stage = Path(stage.strip("'"))
    assert f"'out': '{stage}'" in result.stdout or str(stage) in result.stdout, result.stdout
    assert sorted(p.name for p in stage.iterdir()) == ["toy.json", "toy.txt"]
    assert (stage / "toy.txt").read_text() == "done"
    return stage


def test_experiment_out_with_a_directory_in_the_way_moves_nothing(fake_experiments, tmp_path):
    """The run finished: nothing moves into --out, and its files are kept (not deleted)
    in the staging directory, which the error names after the summary is printed."""
    out = tmp_path / "out"
    (out / "toy.txt").mkdir(parents=True)
    (out / "toy.json").write_text("old")
    result = invoke("experiment", "toy", "--out", str(out))
    assert result.exit_code == 2
    stage = _kept_stage(result, f"cannot write '{out / 'toy.txt'}': it is a directory; '{out}' is left as it was")
    assert sorted(p.name for p in out.iterdir()) == sorted(["toy.json", "toy.txt", stage.name])
    assert (out / "toy.json").read_text() == "old" and not list((out / "toy.txt").iterdir())


@pytest.mark.parametrize("taken", ["toy.json", "toy_fig1.png"])
def test_experiment_out_with_a_directory_named_like_its_output_is_refused_before_training(
    fake_experiments, tmp_path, monkeypatch, taken
):
    """The experiment's own JSON and figures (NAME.json, NAME_*.png): a directory of
    such a name in --out was found only when the finished run was moved in, after
    minutes or hours of training."""
    monkeypatch.setitem(
        sys.modules[experiment_cli.EXPERIMENTS_MODULE].EXPERIMENTS, "toy", lambda **kw: pytest.fail("it trained")
    )
    out = tmp_path / "out"
    (out / taken).mkdir(parents=True)
    (out / "toy_notes").mkdir()  # not an output name: no matter
    result = invoke("experiment", "toy", "--out", str(out))
    assert result.exit_code == 2 and result.output.count("\n") == 1
    assert f"Invalid value for '--out': '{out / taken}' is not a file" in result.output
    assert sorted(p.name for p in out.iterdir()) == sorted([taken, "toy_notes"])


def test_experiment_out_undoes_a_move_that_fails_midway(fake_experiments, tmp_path, monkeypatch):
    out = tmp_path / "out"
    out.mkdir()
    (out / "toy.json").write_text("old")  # replaced first (names in order), then restored
    replace = os.replace

    def replace_or_fail(src, dst):
        if Path(dst) == out / "toy.txt":
            raise OSError(errno.ENOSPC, "No space left on device")
        replace(src, dst)

    monkeypatch.setattr(os, "replace", replace_or_fail)
    result = invoke("experiment", "toy", "--out", str(out))
    assert result.exit_code == 2
    stage = _kept_stage(result, f"cannot write '{out / 'toy.txt'}': No space left on device; '{out}' is left as it was")
    assert sorted(p.name for p in out.iterdir()) == sorted(["toy.json", stage.name])
    assert (out / "toy.json").read_text() == "old"


def test_experiment_out_that_cannot_be_created_at_the_end(fake_experiments, tmp_path, monkeypatch):
    def rename_fails(src, dst):
        raise OSError(errno.ENOTEMPTY, "Directory not empty")

    monkeypatch.setattr(os, "rename", rename_fails)
    result = invoke("experiment", "toy", "--out", str(tmp_path / "new"))
    assert result.exit_code == 2
    stage = _kept_stage(result, f"cannot create '{tmp_path / 'new'}': Directory not empty", existed=False)
    assert [p.name for p in tmp_path.iterdir()] == [stage.name]


@pytest.mark.parametrize("named", [False, True])
@pytest.mark.parametrize("existed", [False, True])
def test_experiment_out_write_that_fails_is_one_line_and_changes_nothing(
    fake_experiments, tmp_path, monkeypatch, existed, named
):
    """A full disk while the experiment writes its files (PIL's write to an open file
    names no file; open() names it): one line naming the path and the OS error, exit 2,
    and --out as it was (not created, or its files unchanged), no stage left behind."""
    out = tmp_path / "out"
    if existed:
        out.mkdir()
        (out / "toy.json").write_text("old")
    write_text = Path.write_text

    def disk_full(self, *args, **kwargs):
        if self.name == "toy.txt":
            raise OSError(errno.ENOSPC, "No space left on device", *([str(self)] if named else []))
        return write_text(self, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", disk_full)
    result = invoke("experiment", "toy", "--out", str(out))
    assert result.exit_code == 2, result.output
    where = out / "toy.txt" if named else out
    assert result.output == f"Error: cannot write '{where}': No space left on device; '{out}' is left as it was\n"
    if existed:
        assert [p.name for p in out.iterdir()] == ["toy.json"] and (out / "toy.json").read_text() == "old"
        assert [p.name for p in tmp_path.iterdir()] == ["out"]
    else:
        assert not list(tmp_path.iterdir())


def test_experiment_os_error_outside_its_output_is_not_an_output_error(fake_experiments, tmp_path, monkeypatch):
    """An OSError naming a file outside --out (the data it reads, say) is not reported as
    a failed write of the outputs."""

    def toy(**kwargs):
        raise FileNotFoundError(errno.ENOENT, "No such file or directory", str(tmp_path / "data.csv"))

    monkeypatch.setitem(sys.modules[experiment_cli.EXPERIMENTS_MODULE].EXPERIMENTS, "toy", toy)
    with pytest.raises(FileNotFoundError, match="data.csv"):
        invoke("experiment", "toy", "--out", str(tmp_path / "out"))
    assert not list(tmp_path.iterdir())


def test_experiment_os_error_without_a_file_is_an_output_error_only_for_a_write(
    fake_experiments, tmp_path, monkeypatch
):
    """An OSError naming no file is reported as a failed write of the outputs only for
    what a write raises (a full disk, ...); a dropped connection is not relabelled."""

    def toy(**kwargs):
        raise ConnectionResetError(errno.ECONNRESET, "Connection reset by peer")

    monkeypatch.setitem(sys.modules[experiment_cli.EXPERIMENTS_MODULE].EXPERIMENTS, "toy", toy)
    with pytest.raises(ConnectionResetError):
        invoke("experiment", "toy", "--out", str(tmp_path / "out"))
    assert not list(tmp_path.iterdir())


def test_dangling_symlinks_as_outputs_are_refused_before_any_work(fake_experiments, tmp_path, monkeypatch):
    monkeypatch.setitem(
        sys.modules[experiment_cli.EXPERIMENTS_MODULE].EXPERIMENTS, "toy", lambda **kw: pytest.fail("it ran")
    )
    monkeypatch.setattr("numbabn.bench.harness.run", lambda *a, **k: pytest.fail("the benchmark ran"))
    target = tmp_path / "nonexistent"
    (tmp_path / "dang").symlink_to(target)
    result = invoke("experiment", "toy", "--out", str(tmp_path / "dang"))
    assert result.exit_code == 2 and result.output == (
        f"Error: Invalid value for '--out': '{tmp_path / 'dang'}' is a dangling symbolic link "
        f"(its target '{target}' does not exist)\n"
    )
    result = invoke("bench", "--shape", "8x4", "--json", str(tmp_path / "dang"))
    assert result.exit_code == 2 and result.output == (
        f"Error: Invalid value for '--json': cannot write '{tmp_path / 'dang'}': it is a dangling symbolic link "
        f"(its target '{target}' does not exist)\n"
    )
    assert [p.name for p in tmp_path.iterdir()] == ["dang"] and not target.exists()


# --- warmup ----------------------------------------------------------------------------


def test_warmup_compiles_the_requested_variants_and_info_counts_them():
    from numbabn.kernels import cpu_driver

    result = invoke("warmup", "--dtype", "float32", "--layout", "mc")
    assert result.exit_code == 0, result.output
    plan = cpu_driver.warmup_plan(("float32",), ("mc",))
    assert f"{len(plan)} kernel variants ready" in result.output
    k = cpu_driver.specs(np.dtype(np.float32), "mc")
    assert all(name in vars(k) for name in k.all_names())  # every kernel is compiled now
    cache = json.loads(invoke("info", "--json").output)["kernel_cache"]
    if cache["dir"]:
        assert cache["entries"] >= len(plan) - 2  # merge/sum kernels are shared across dtypes


def test_warmup_residual_adds_the_fused_residual_variants():
    from numbabn.kernels import cpu_driver

    result = invoke("warmup", "--dtype", "float32", "--layout", "mc", "--residual")
    assert result.exit_code == 0, result.output
    plan = cpu_driver.warmup_plan(("float32",), ("mc",), residual=True)
    assert len(plan) == len(cpu_driver.warmup_plan(("float32",), ("mc",))) + 3
    # ncl: also the gradient sums of its short rows (over tiles) with a residual
    ncl = len(cpu_driver.warmup_plan(("float32",), ("ncl",), residual=True))
    assert ncl == len(cpu_driver.warmup_plan(("float32",), ("ncl",))) + 6  # + mc's for short rows
    # a repeated --dtype or --layout counts once ("28 kernel variants ready" for 7)
    assert len(cpu_driver.warmup_plan(("float32", "float32"), ("mc", "mc"))) == len(
        cpu_driver.warmup_plan(("float32",), ("mc",))
    )
    assert f"{len(plan)} kernel variants ready" in result.output
    k = cpu_driver.specs(np.dtype(np.float32), "mc")
    assert {"apply_res", "grad_sums_res", "grad_apply_res"} <= set(vars(k))


def test_warmup_of_ncl_covers_the_channels_last_passes_of_short_rows():
    """NCHW inputs of small maps (a ResNet's 7x7 stage) run their element-wise passes
    on the channels-last kernels: ``warmup --layout ncl`` left those out, and every
    process compiled them (or, on a read-only install, compiled them in memory)."""
    from numbabn.kernels import cpu_driver

    needed = set()
    for side in (7, 5):  # 7x7: the normalise pass on mc kernels; 5x5: dx's too
        x = np.zeros((32, 64, side * side), np.float32)
        _, _, _, walk, dx_walk = cpu_driver.plan(x, "ncl", numbabn.config.CHUNK)
        needed |= {f"apply float32 {walk.layout}", f"grad_apply float32 {dx_walk.layout}"}
    assert {"apply float32 mc", "grad_apply float32 mc"} <= needed
    for layouts in (("ncl",), ("ncl", "mc")):
        labels = [label for label, _ in cpu_driver.warmup_plan(("float32",), layouts)]
        assert needed <= set(labels) and len(labels) == len(set(labels)), labels


def test_warmup_of_a_16_bit_dtype_compiles_its_data_kernels():
    from numbabn.kernels import cpu_driver

    result = invoke("warmup", "--dtype", "bfloat16", "--layout", "mc")
    assert result.exit_code == 0, result.output
    k = cpu_driver.specs(np.dtype(np.uint16), "mc")  # bfloat16's 16-bit storage
    assert set(k.all_names()) <= set(vars(k)) and k.compute == np.float32


@pytest.mark.parametrize(
    ("dirs", "writable", "unsaved", "why"),
    [
        ([], False, 0, "no writable cache location"),
        (["/ro/cache"], True, 0, "writing to /ro/cache failed"),
        (["/ro/cache"], False, 0, "the cache in /ro/cache is read-only"),
        # a read-only warmed cache holds some variants, others compiled and not saved
        (["/ro/cache"], False, 3, "the cache in /ro/cache is read-only"),
    ],
)
def test_warmup_that_cannot_cache_what_it_compiled_fails(monkeypatch, dirs, writable, unsaved, why):
    """A warmup whose kernels could not all be cached (a read-only install, an
    unwritable NUMBA_CACHE_DIR, a full disk) exits 2 with one line saying so: it used
    to exit 0, and a Docker build step passed while every later process compiled
    again; also when a read-only cache it found held some of the variants."""
    from numbabn import _jit

    monkeypatch.setattr(_jit, "cached_entries", lambda: (5 if unsaved else 0, dirs))
    monkeypatch.setattr(_jit, "cache_writable", lambda: writable)
    monkeypatch.setattr(_jit, "unsaved", lambda: unsaved)
    result = invoke("warmup", "--dtype", "float32", "--layout", "mc")
    assert result.exit_code == 2, result.output
    assert f"{unsaved or 'all'} compiled ones could not be cached ({why})" in result.output, result.output
    assert "NUMBA_CACHE_DIR" in result.output and len(result.output.strip().splitlines()) == 1


@pytest.mark.parametrize("args", [["warmup", "--dtype", "float32", "--layout", "mc"], ["info"]])
def test_commands_run_without_a_stderr(args):
    """A process started with fd 2 closed (a daemon, ``2>&-``) has sys.stderr None:
    warmup (and bench, and a verbose Trainer) read sys.stderr.isatty() for their progress
    bar and ended with an AttributeError and exit 1, silently."""
    code = "import os, sys, runpy; os.close(2); sys.stderr = None; sys.argv = ['numbabn', *sys.argv[1:]]; " + (
        "runpy.run_module('numbabn', run_name='__main__')"
    )
    done = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout


@pytest.mark.parametrize(
    ("dirs", "writable", "new", "read_only"),
    [
        (["/home/u/.cache/numba/k", "/site/numbabn/kernels/__pycache__"], True, "/home/u/.cache/numba/k", 1),
        (["/site/numbabn/kernels/__pycache__"], False, None, 1),
        ([], False, None, 0),
    ],
)
def test_info_names_the_writable_cache_and_the_read_only_ones(monkeypatch, dirs, writable, new, read_only):
    """A warmed read-only install seen with a writable home: info named the (empty)
    home directory as where the 25 entries were, and left out the read-only one they
    are loaded from."""
    from numbabn import _jit

    monkeypatch.setattr(_jit, "cached_entries", lambda: (25, dirs))
    monkeypatch.setattr(_jit, "cache_writable", lambda: writable)
    cache = json.loads(invoke("info", "--json").output)["kernel_cache"]
    assert cache["dir"] == new and cache["read_only_dirs"] == (dirs[1:] if new else dirs)
    assert len(cache["read_only_dirs"]) == read_only
    text = [line for line in invoke("info").output.splitlines() if line.startswith("kernel cache")][0]
    assert "25 compiled signatures" in text
    assert (f"new ones cached in {new}" if new else "new ones compiled in memory") in text
    assert ("read-only: /site/numbabn/kernels/__pycache__" in text) == bool(read_only)


def test_a_warning_inside_a_command_names_the_line_that_ran_it(monkeypatch):
    """A CacheWarning in `numbabn warmup` or `bench` named click's decorators.py: the
    first frame outside numbabn was click's. Here a warning raised below `info`'s
    code (a C-level partial: no frame of its own) is attributed past click, to this
    test's line that ran the command."""
    import functools

    from numbabn import _jit, _warnings

    monkeypatch.setattr(_jit, "cached_entries", functools.partial(_warnings.warn_at_caller, "probe", UserWarning))
    with pytest.warns(UserWarning, match="probe") as record:
        CliRunner().invoke(main, ["info"])  # which then fails: the stub returns no entries
    assert record[0].filename == __file__, record[0].filename


@pytest.mark.parametrize(
    ("dirs", "writable", "said"),
    [
        (["/c"], True, "(25 compiled signatures cached in /c)"),
        (["/c", "/ro"], True, "(25 compiled signatures loadable from /c and read-only /ro; new ones go to /c)"),
        (["/ro"], False, "(25 compiled signatures loadable from read-only /ro; none could be added)"),
    ],
)
def test_warmup_says_where_the_signatures_are(monkeypatch, dirs, writable, said):
    """With a warmed read-only cache it said "39 signatures cached in HOME", where HOME
    held 14 and the read-only directory the other 25."""
    from numbabn import _jit

    monkeypatch.setattr(_jit, "cached_entries", lambda: (25, dirs))
    monkeypatch.setattr(_jit, "cache_writable", lambda: writable)
    monkeypatch.setattr(_jit, "unsaved", lambda: 0)
    result = invoke("warmup", "--dtype", "float32", "--layout", "mc")
    assert result.exit_code == 0 and said in result.output, result.output


def test_a_warning_on_the_command_line_is_one_line(monkeypatch):
    """Python's warning display adds the source line, which for a command is the console
    script's `sys.exit(main())`: while a command runs, a warning shows as "Category:
    message" alone; the display is put back after the command."""
    from numbabn import _jit

    seen = []

    def entries():
        seen.append(warnings.formatwarning(UserWarning("probe"), UserWarning, "/bin/numbabn", 8, "sys.exit(main())"))
        return 0, []

    monkeypatch.setattr(_jit, "cached_entries", entries)
    before = warnings.formatwarning
    assert invoke("info").exit_code == 0
    assert seen == ["UserWarning: probe\n"] and warnings.formatwarning is before


def test_warmup_rejects_unknown_dtype():
    result = invoke("warmup", "--dtype", "int8")
    assert result.exit_code == 2 and "'int8' is not one of" in result.output


# --- one-line errors, outputs checked first --------------------------------------------


@pytest.mark.parametrize(
    "args, message",
    [
        (["bench", "--json", "/sys/x.json"], "Error: Invalid value for '--json': cannot write '/sys/x.json': "),
        (["bench", "--csv", "/dev/full"], "Error: Invalid value for '--csv': cannot write '/dev/full': No space left"),
        (["bench", "--plot", "/sys/x.png"], "Error: Invalid value for '--plot': cannot write '/sys/x.png': "),
        (
            ["bench", "--json", "/etc/passwd/x.json"],
            "Error: Invalid value for '--json': '/etc/passwd' is not a directory",
        ),
        (["bench", "--shape", "100000x100000"], "Error: case '100000x100000' (100000x100000, float32) needs about "),
        (["experiment", "ioffe", "--out", "/proc/foo"], "Error: Invalid value for '--out': cannot write into '/proc'"),
        (
            ["experiment", "ioffe", "--out", "/etc/passwd/foo"],
            "Error: Invalid value for '--out': '/etc/passwd' is not a",
        ),
        (
            ["experiment", "ioffe", "--out", "/etc/passwd"],
            "Error: Invalid value for '--out': Directory '/etc/passwd' is a",
        ),
        (
            ["bench", "--shape", "64x64xfoo"],
            "Error: Invalid value for '--shape': shape must look like 64x64x56x56, got",
        ),
        (["experiment", "ioffe", "--lr", "nan"], "Error: Invalid value for '--lr': nan is not in the range 0<x<inf."),
        (["experiment", "ioffe", "--lr", "inf"], "Error: Invalid value for '--lr': inf is not in the range 0<x<inf."),
        (
            ["experiment", "ioffe", "--seed", "-1"],
            "Error: Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295.",
        ),
        (
            ["experiment", "ioffe", "--seed", "99999999999999999999999"],
            "Error: Invalid value for '--seed': 99999999999999999999999 is not in the range 0<=x<=4294967295.",
        ),
        (
            ["experiment", "ioffe", "--seeds", "99999999999999999999999"],
            "Error: Invalid value for '--seeds': 99999999999999999999999 is not in the range 1<=x<=4294967296.",
        ),
        (
            ["experiment", "ioffe", "--seed", "1", "--seed", "2", "--seed", "1"],
            "Error: Invalid value for '--seed': 1 is given twice (seeds must be distinct)",
        ),
        (["nope"], "Error: No such command 'nope'."),
        (
            ["bench", "sklearn", "--json", "/sys/x.json"],
            "Error: Invalid value for '--json': cannot write '/sys/x.json'",
        ),
        (["bench", "torch", "--json", "/sys/x.json"], "Error: Invalid value for '--json': cannot write '/sys/x.json'"),
        (
            ["bench", "sklearn", "--part", "mlp", "--epochs", "1", "--seed", "-1"],
            "Error: Invalid value for '--seed': -1 is not in the range 0<=x<=4294967295.",
        ),
        (
            ["bench", "sklearn", "--part", "mlp", "--epochs", "1", "--seed", "4294967296"],
            "Error: Invalid value for '--seed': 4294967296 is not in the range 0<=x<=4294967295.",
        ),
    ],
)
def test_errors_are_one_line_before_any_work(args, message, monkeypatch):
    """Each of these used to run the whole benchmark (or experiment) first, or print a
    traceback, or click's four lines. Now: one line, exit 2, nothing run."""
    monkeypatch.setattr("numbabn.bench.harness.run", lambda *a, **k: pytest.fail("the benchmark ran"))
    monkeypatch.setattr("numbabn.bench.sklearn_estimators.run_sklearn_bench", lambda *a, **k: pytest.fail("it ran"))
    monkeypatch.setattr("numbabn.train.experiments.EXPERIMENTS", {"ioffe": lambda **kw: pytest.fail("it ran")})
    if args[-1].startswith("/sys/") and os.access("/sys", os.W_OK) and not Path("/sys/class").exists():
        pytest.skip("/sys is not sysfs here")
    result = invoke(*args)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1 and result.output.startswith(message), result.output


@pytest.mark.parametrize("name,lr", [("dln", "2600"), ("landscape", "1e308"), ("maxlr", "2e4")])
def test_a_learning_rate_above_the_searchs_ceiling_is_one_line_before_any_run(monkeypatch, name, lr):
    # the search starts at 4 x lr (maxlr: at lr) and stops at 1e4; above, it raised
    # from inside the search, a traceback
    monkeypatch.setattr("numbabn.train.experiments._train", lambda *a, **k: pytest.fail("a network trained"))
    result = invoke("experiment", name, "--steps", "2", "--seeds", "1", "--lr", lr)
    assert result.exit_code == 2, result.output
    assert result.output.count("\n") == 1, result.output
    assert result.output.startswith("Error: Invalid value for '--lr': lr must be small enough"), result.output


def test_memory_check_uses_what_is_available(monkeypatch):
    monkeypatch.setattr(bench_cli, "_available_memory", lambda: 10 * 2**20)  # 10 MiB left
    bench_cli._check_memory([Case("small", (256, 1024))], "float32", (), "cpu")  # 1 MiB x 4: fits
    with pytest.raises(bench_cli.CLIError, match="needs about 0.1 GB of memory .* only 0.0 GB"):
        bench_cli._check_memory([Case("big", (1024, 1024))], "float32", ("numpy",), "cpu")
    monkeypatch.setattr(bench_cli, "_available_memory", lambda: None)  # unknown: no check
    bench_cli._check_memory([Case("big", (1024, 1024))], "float32", ("numpy",), "cpu")


@pytest.mark.parametrize("text", ["8x1_0", " 8 x 4 ", "8x+4", "8x\u0664", "8xx4", "8x4x"])
def test_bench_shape_takes_only_ascii_digits_between_the_xs(text):
    # int() accepted "1_0", spaces, '+' and non-ASCII digits
    result = invoke("bench", "--shape", text)
    assert result.exit_code == 2, result.output
    assert result.output == (f"Error: Invalid value for '--shape': shape must look like 64x64x56x56, got {text!r}\n"), (
        result.output
    )


def test_bench_shape_errors_that_stay():
    assert invoke("bench", "--shape", "8x-4").output.endswith("shape needs >= 2 positive sizes, got '8x-4'\n")
    assert invoke("bench", "--shape", "8x0").output.endswith("shape needs >= 2 positive sizes, got '8x0'\n")
    assert invoke("bench", "--shape", "8").output.endswith("shape needs >= 2 positive sizes, got '8'\n")


def test_memory_error_without_comparisons_names_inputs_and_outputs_only(monkeypatch):
    # it said "(inputs, outputs and the no comparison)"
    monkeypatch.setattr(bench_cli, "_available_memory", lambda: 10 * 2**20)
    with pytest.raises(bench_cli.CLIError, match=r"of memory \(inputs and outputs\), but only") as info:
        bench_cli._check_memory([Case("big", (1024, 1024))], "float32", (), "cpu")
    assert "comparison" not in str(info.value)
    with pytest.raises(bench_cli.CLIError, match=r"\(inputs and outputs and the numpy, torch comparison\)"):
        bench_cli._check_memory([Case("big", (1024, 1024))], "float32", ("numpy", "torch"), "cpu")


def test_bench_threads_help_names_numbabns_default():
    help_text = " ".join(invoke("bench", "--help").output.split())
    assert "[default: numbabn's: NUMBABN_NUM_THREADS, else the CPUs this process may use]" in help_text
    assert "Numba's]" not in help_text


def test_bench_title_says_1_thread(monkeypatch):
    from numbabn.bench import harness, report

    rows = [harness.Row("eval", "a", (8, 4), "nc", "float32", "cpu", 1.0, 1.0, 1.0, 0.1)]
    meta = dict(backend="cpu", threads=1, threading_layer="python threads", dtype="float32", copy_gbps=1.0)
    title = report.format_table(harness.Report(rows, {**meta, "torch": None, "repeat": 1})).splitlines()[0]
    assert "float32, 1 thread (python threads)," in title
    title = report.format_table(harness.Report(rows, {**meta, "threads": 2, "torch": None, "repeat": 1}))
    assert "float32, 2 threads (python threads)," in title


def test_readme_error_examples_are_what_the_cli_prints():
    readme = (ROOT / "README.md").read_text()
    block = readme.split("Errors are one line and exit code 2")[1].split("```")[1]
    commands = [line[len("$ numbabn ") :] for line in block.splitlines() if line.startswith("$ numbabn ")]
    expected = [line for line in block.splitlines() if line.startswith("Error:")]
    assert len(commands) == len(expected) >= 3
    for command, line in zip(commands, expected, strict=True):
        if "--backend cuda" in command and numbabn.cuda_available():
            continue
        result = invoke(*command.split())
        assert result.exit_code == 2 and result.output == line + "\n", (command, result.output)


def test_help_texts_are_whole_sentences():
    """Listings show each command's whole first paragraph (wrapped, never cut with '...'),
    and the README shows the top-level listing as it is."""
    for args in (["--help"], ["experiment", "--help"], ["bench", "--help"]):
        text = invoke(*args).output
        assert "..." not in text.split("Commands:")[-1], text
    listing = " ".join(invoke("--help").output.split("Commands:")[1].split())
    assert listing in " ".join((ROOT / "README.md").read_text().split())
    listing = invoke("experiment", "--help").output
    assert "standard vs batch norm vs noisy batch norm." in " ".join(listing.split())
    out_help = " ".join(invoke("experiment", "ioffe", "--help").output.split())
    assert "raw series (JSON) and the figures (PNG)" in out_help and "CSV" not in out_help


_SLOW_TOY = """
import sys, time, types
import numbabn.cli.experiment as experiment_cli
from numbabn.cli import main

def slow(*, steps=None, seeds=None, lr=None, full=False, out=None):
    (out / "toy.json").write_text("{}")
    print("written", flush=True)
    time.sleep(60)

module = types.ModuleType("slow_experiments")
module.EXPERIMENTS = {"slow": slow}
sys.modules[module.__name__] = module
experiment_cli.EXPERIMENTS_MODULE = module.__name__
main(["experiment", "slow", "--out", sys.argv[1]])
"""


@pytest.mark.parametrize("existed", [False, True])
def test_sigterm_ends_a_run_like_ctrl_c_leaving_no_staging_directory(tmp_path, existed):
    """``kill``/``timeout``/a scheduler: the cleanup runs (no staging directory left in
    --out or beside it), --out is as it was, and the status is 128 + SIGTERM."""
    import signal

    out = tmp_path / "out"
    if existed:
        out.mkdir()
        (out / "toy.json").write_text("old")
    proc = subprocess.Popen(
        [sys.executable, "-c", _SLOW_TOY, str(out)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline() == "written\n"
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=30)
    finally:
        proc.kill()
    assert proc.returncode == 128 + signal.SIGTERM, err
    assert [p.name for p in tmp_path.iterdir()] == (["out"] if existed else [])
    if existed:
        assert [p.name for p in out.iterdir()] == ["toy.json"] and (out / "toy.json").read_text() == "old"


def test_sigterm_and_ctrl_c_wait_while_outputs_move_into_place():
    """An exit in the middle of moving the outputs (or of undoing a failed move) would
    leave --out half replaced, and the staging directory's removal would delete the
    user's previous files set aside there: the signals are held until the move ends."""
    import signal
    import time

    from numbabn.cli._common import _signals_held

    got = []
    previous = signal.signal(signal.SIGINT, lambda *args: got.append("SIGINT"))
    try:
        with _signals_held():
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(0.05)
            assert got == []  # held
        for _ in range(100):  # delivered once the block ends
            if got:
                break
            time.sleep(0.01)
        assert got == ["SIGINT"]
    finally:
        signal.signal(signal.SIGINT, previous)
