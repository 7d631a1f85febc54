"""The compile helper (numbabn._compile_ahead): a cold training forward hands the
backward's kernels to a helper process; the backward loads them from the disk cache.

Each test runs a fresh process with its own empty ``NUMBA_CACHE_DIR`` and reads, per
kernel, whether that process compiled it (a cache miss) or loaded it (a hit, written
by the helper), plus a digest of its results, which must equal this process's.
"""

import hashlib
import inspect
import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

import numbabn
from numbabn import _compile_ahead, config


def step(dtype, shape):
    """One training step's results, as a digest (also run in the fresh processes)."""
    x = np.random.default_rng(0).standard_normal(shape).astype(dtype)
    C = shape[1]
    y, ctx = numbabn.batch_norm_forward(x, np.ones(C, dtype), np.zeros(C, dtype))
    dx, dg, db = numbabn.batch_norm_backward(y * 0.5, ctx)
    return hashlib.sha256(b"".join(a.tobytes() for a in (y, dx, dg, db))).hexdigest()


_SCRIPT = textwrap.dedent("""
    import hashlib, json, os, sys, time
    import numpy as np
    import numbabn
    from numbabn import _compile_ahead, _jit

    STEP
    def helper_pid():
        h = _compile_ahead._helper
        return None if h is None else h.proc.pid

    out = {"digests": [], "pids": []}
    SETUP
    for dtype, shape in STEPS:
        out["digests"].append(step(dtype, shape))
        out["pids"].append(helper_pid())
    AFTER
    out["compiled"] = sorted({k.name for k in _jit.kernels() for d in k._specs.values()
                              if sum(d.stats.cache_misses.values())})
    out["loaded"] = sorted({k.name for k in _jit.kernels() for d in k._specs.values()
                            if sum(d.stats.cache_hits.values())})
    print(json.dumps(out))
""")

# Rows of 80 values: the NCL kernels throughout (shorter rows run their element-wise
# passes on the channels-last kernels, see test_short_rows_send_the_channels_last_dx_kernel)
_F32 = ("np.float32", (4, 3, 8, 10))
_F64 = ("np.float64", (4, 3, 8, 10))
_MC = ("np.float32", (16, 5))
_BACKWARD = {"grad_sums_ncl", "grad_coefficients", "grad_apply_ncl"}


def _run(tmp_path, steps, setup="", after="", **env):
    listed = "[" + ", ".join(f"({d}, {s})" for d, s in steps) + "]"
    script = _SCRIPT.replace("STEP\n", inspect.getsource(step)).replace("STEPS", listed)
    script = script.replace("SETUP", setup).replace("AFTER", after)
    # A lone process: no NUMBABN_ settings of this one, no launcher's rank counts.
    full = {
        k: v for k, v in os.environ.items() if not k.startswith("NUMBABN_") and k not in _compile_ahead._LOCAL_RANKS
    }
    full.update(NUMBA_CACHE_DIR=str(tmp_path / "cache"), NUMBABN_NUM_THREADS="2", **env)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, env=full, timeout=600)
    assert res.returncode == 0, res.stderr.decode()
    out = json.loads(res.stdout.decode().splitlines()[-1])
    expected = [step(np.dtype(d.split(".")[1]), s) for d, s in steps]
    assert out["digests"] == expected  # bit for bit what this process computes
    out["stderr"] = res.stderr.decode()
    return out


def _gone(pid):
    """The helper no longer exists (killed and reaped by its parent, or exited)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(")")[-1].split()[0] == "Z"  # only a zombie left
    except FileNotFoundError:
        return True


def test_backward_kernels_are_compiled_by_the_helper(tmp_path):
    out = _run(tmp_path, [_F32, _F64, _MC])
    # The parent compiled the forward's kernels and loaded the backward's (the helper's).
    assert {"stats_ncl", "coefficients", "apply_ncl", "stats_mc", "apply_mc"} <= set(out["compiled"])
    assert not (_BACKWARD | {"grad_sums_mc", "grad_apply_mc"}) & set(out["compiled"])
    assert _BACKWARD | {"grad_sums_mc", "grad_apply_mc"} <= set(out["loaded"])
    # One helper served all three variants and is gone with its parent.
    pids = set(out["pids"])
    assert len(pids) == 1 and None not in pids
    assert _gone(pids.pop())
    # The parent's one notice; the helper says nothing.
    assert sum(line.startswith("numbabn: compiling") for line in out["stderr"].splitlines()) == 1


def test_short_rows_send_the_channels_last_dx_kernel(tmp_path):
    """A first step on short NCL rows (4x4 maps) runs its element-wise passes on the
    channels-last kernels and its reductions on the tile kernels: the helper compiles
    the backward's reduction over tiles and the channels-last dx kernel, as one job,
    and neither process compiles the NCL kernels nobody uses."""
    out = _run(tmp_path, [("np.float32", (4, 3, 4, 4))])
    assert {"stats_tiles", "coefficients", "apply_mc"} <= set(out["compiled"])
    backward = {"grad_sums_tiles", "grad_coefficients", "grad_apply_mc"}
    assert backward <= set(out["loaded"]) and not backward & set(out["compiled"])
    assert not {"stats_ncl", "grad_sums_ncl", "apply_ncl", "grad_apply_ncl"} & set(out["compiled"] + out["loaded"])
    assert len(set(out["pids"])) == 1 and None not in out["pids"]


def test_short_rows_after_long_ones_send_their_dx_kernel_to_the_running_helper(tmp_path):
    """A cold run whose first shape has long rows and a later one short rows (a
    ResNet's 32x32 then 4x4 maps): the later shape's dx kernel (channels-last) goes to
    the helper the first miss started, as is its reduction over tiles, whose
    statistics kernel's miss sends it; the parent only loads them."""
    out = _run(tmp_path, [_F32, ("np.float32", (4, 3, 4, 4))])
    assert {"stats_ncl", "apply_ncl", "stats_tiles", "apply_mc"} <= set(out["compiled"])
    assert {"grad_sums_ncl", "grad_apply_ncl", "grad_sums_tiles", "grad_apply_mc"} <= set(out["loaded"])
    assert not {"grad_sums_ncl", "grad_apply_ncl", "grad_sums_tiles", "grad_apply_mc"} & set(out["compiled"])
    assert len(set(out["pids"])) == 1 and None not in out["pids"]


def test_long_rows_after_short_ones_send_their_dx_kernel_to_the_running_helper(tmp_path):
    """The other order (a sequence model's rows growing): the NCL dx kernel of the
    later, longer rows goes to the running helper while the caller compiles their
    NCL normalise kernel."""
    out = _run(tmp_path, [("np.float32", (4, 3, 4, 4)), _F32])
    assert {"stats_tiles", "apply_mc", "stats_ncl", "apply_ncl"} <= set(out["compiled"])
    assert {"grad_sums_tiles", "grad_apply_mc", "grad_sums_ncl", "grad_apply_ncl"} <= set(out["loaded"])
    assert not {"grad_sums_tiles", "grad_apply_mc", "grad_sums_ncl", "grad_apply_ncl"} & set(out["compiled"])
    assert len(set(out["pids"])) == 1 and None not in out["pids"]


def test_eval_alone_starts_no_helper(tmp_path):
    """Eval computes no statistics, and a new shape's dx kernel is only handed to a
    helper that is already running: an inference-only cold process starts none."""
    setup = textwrap.dedent("""
        x = np.random.default_rng(0).standard_normal((4, 3, 4, 4)).astype(np.float32)
        one = np.ones(3, np.float32)
        numbabn.batch_norm_forward(x, running_mean=one * 0, running_var=one, training=False)
        out["eval_helper"] = helper_pid()
    """)
    out = _run(tmp_path, [], setup=setup)
    assert out["eval_helper"] is None


def test_switched_off_the_caller_compiles_everything(tmp_path):
    out = _run(tmp_path, [_F32], NUMBABN_COMPILE_AHEAD="0")
    assert _BACKWARD <= set(out["compiled"]) and out["pids"] == [None]


@pytest.mark.parametrize(
    "change",
    [
        {"COMPILE_AHEAD": False},
        {"threads": 1},
        {"frozen": True},
        {"executable": ""},
    ],
)
def test_when_no_helper_is_used(monkeypatch, change):
    monkeypatch.setattr(config, "COMPILE_AHEAD", change.get("COMPILE_AHEAD", True))
    monkeypatch.setattr(_compile_ahead._threads, "get_num_threads", lambda: change.get("threads", 2))
    monkeypatch.setattr(sys, "frozen", change.get("frozen", False), raising=False)
    monkeypatch.setattr(sys, "executable", change.get("executable", sys.executable))
    assert not _compile_ahead.enabled()


def test_enabled_by_default_with_two_threads(monkeypatch):
    monkeypatch.setattr(config, "COMPILE_AHEAD", True)
    monkeypatch.setattr(_compile_ahead._threads, "get_num_threads", lambda: 2)
    for name in _compile_ahead._LOCAL_RANKS:
        monkeypatch.delenv(name, raising=False)
    assert _compile_ahead.enabled()


@pytest.mark.parametrize(
    "env, expected",
    [
        ({"LOCAL_WORLD_SIZE": "2"}, False),  # torchrun
        ({"MPI_LOCALNRANKS": "2"}, False),  # MPICH's mpiexec
        ({"OMPI_COMM_WORLD_LOCAL_SIZE": "4"}, False),  # Open MPI's mpirun
        ({"MPI_LOCALNRANKS": "1"}, True),  # the only rank on this machine
        ({"LOCAL_WORLD_SIZE": "two"}, True),  # not a count: ignored
    ],
)
def test_no_helper_for_one_of_several_local_ranks(monkeypatch, env, expected):
    # Ranks start together and compile the same kernels: a helper each only adds
    # processes to busy CPUs.
    monkeypatch.setattr(config, "COMPILE_AHEAD", True)
    monkeypatch.setattr(_compile_ahead._threads, "get_num_threads", lambda: 2)
    for name in _compile_ahead._LOCAL_RANKS:
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert _compile_ahead.enabled() is expected


def _helper_allowed(_):
    return _compile_ahead.enabled()


@pytest.mark.parametrize("method", ["fork", "spawn"])
def test_no_helper_in_multiprocessing_workers(monkeypatch, method):
    # Pool workers start together and compile the same kernels (a cold 2-worker pool
    # on 2 CPUs ran 30 % slower with a helper each). Spawned workers get the
    # setting through the environment, forked ones inherit it.
    import multiprocessing

    monkeypatch.setenv("NUMBABN_NUM_THREADS", "2")
    monkeypatch.setenv("NUMBABN_COMPILE_AHEAD", "1")
    monkeypatch.setattr(config, "COMPILE_AHEAD", True)
    monkeypatch.setattr(_compile_ahead._threads, "get_num_threads", lambda: 2)
    for name in _compile_ahead._LOCAL_RANKS:
        monkeypatch.delenv(name, raising=False)
    assert _compile_ahead.enabled()
    with multiprocessing.get_context(method).Pool(2) as pool:
        assert pool.map(_helper_allowed, range(2)) == [False, False]


def test_a_helper_that_fails_at_once_costs_nothing(tmp_path):
    # The "interpreter" exits 1 without reading a job: the caller compiles it all.
    out = _run(
        tmp_path,
        [_F32],
        setup="sys.executable = '/bin/false'\nt0 = time.perf_counter()",
        after="out['s'] = time.perf_counter() - t0",
    )
    assert _BACKWARD <= set(out["compiled"])
    assert out["s"] < _compile_ahead.WAIT_S / 2  # did not wait for the job


def test_a_hung_helper_is_waited_for_briefly_then_killed(tmp_path):
    sleeper = tmp_path / "sleeper"
    sleeper.write_text("#!/bin/sh\nexec sleep 300\n")
    sleeper.chmod(0o755)
    # Time spent in wait(): one WAIT_S for the job, not one per kernel it holds.
    timed = textwrap.dedent("""
        waited = [0.0]
        def timed_wait(*args, _wait=_compile_ahead.wait):
            t = time.perf_counter()
            _wait(*args)
            waited[0] += time.perf_counter() - t
        _compile_ahead.wait = timed_wait
    """)
    setup = f"sys.executable = {str(sleeper)!r}\n_compile_ahead.WAIT_S = 0.5\n{timed}"
    out = _run(tmp_path, [_F32], setup=setup, after="out['waited'] = waited[0]")
    assert _BACKWARD <= set(out["compiled"])
    assert 0.5 <= out["waited"] < 1.0  # 3 kernels in the job
    assert _gone(out["pids"][0])  # killed at the caller's exit, not left sleeping


def test_an_idle_helper_exits_and_the_next_miss_starts_another(tmp_path):
    after = "h = _compile_ahead._helper\nh.proc.wait(timeout=60)\nout['idle_exit'] = h.proc.returncode\n"
    after += "out['f64'] = step(np.float64, (4, 3, 8, 10))\nout['pids'].append(helper_pid())"
    out = _run(tmp_path, [_F32], setup="_compile_ahead.IDLE_S = 0.5", after=after)
    assert out["f64"] == step(np.float64, (4, 3, 8, 10))
    assert out["idle_exit"] == 0
    first, second = out["pids"]
    assert first != second and None not in (first, second)
    assert not {"grad_sums_ncl", "grad_apply_ncl"} & set(out["compiled"])  # both variants: the helpers'


def test_fork_pool_and_threads_during_a_helper_job(tmp_path):
    # The parent's first forward starts the helper; while it works, a fork pool and four
    # threads run cold float64 steps. Children neither use nor stop the parent's helper.
    after = textwrap.dedent("""
        import multiprocessing, threading
        with multiprocessing.get_context("fork").Pool(2) as pool:
            out["pool"] = pool.starmap(step, [(np.float64, (4, 3, 8, 10))] * 4)
        found = []
        threads = [threading.Thread(target=lambda: found.append(step(np.float64, (6, 3, 8, 10)))) for _ in range(4)]
        for t in threads: t.start()
        for t in threads: t.join()
        out["threads"] = found
    """)
    out = _run(tmp_path, [_F32], after=after)
    assert out["pool"] == [step(np.float64, (4, 3, 8, 10))] * 4
    assert out["threads"] == [step(np.float64, (6, 3, 8, 10))] * 4
    assert _gone(out["pids"][0])


def test_no_helper_without_a_writable_cache(tmp_path):
    # As in a read-only install with no writable home: nothing a helper could share.
    setup = (
        "import numba.core.caching as c\nc.CacheImpl._locator_classes = []\n"
        "c.UserProvidedCacheLocator.from_function = classmethod(lambda *a: None)"
    )
    out = _run(tmp_path, [_F32], setup=setup)
    assert _BACKWARD <= set(out["compiled"]) and out["pids"] == [None]


def test_warmup_compiles_the_backward_last():
    # numbabn warmup: the forward's kernels first, so that the helper has the
    # backward's (queued on the first statistics miss) done when the plan reaches them.
    from numbabn.kernels import cpu_driver

    labels = [label.split()[0] for label, _ in cpu_driver.warmup_plan(residual=True)]
    backward = [i for i, name in enumerate(labels) if name.startswith("grad_")]
    assert backward and backward == list(range(len(labels) - len(backward), len(labels)))
    assert {"grad_sums", "grad_coef", "grad_apply", "grad_sums_res", "grad_apply_res"} == {labels[i] for i in backward}
