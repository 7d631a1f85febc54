"""The kernel runtime under conditions users meet and the other runtime tests do not:
a process without a usable stderr, a process with many files open, a compile helper
left idle in a long process.

Tests that compile use their own small kernel and a temporary cache; the helper
tests start a real helper process (a second or two: it imports Numba).
"""

import io
import os
import resource
import subprocess
import sys
import time

import numba
import pytest
from numba import types

from numbabn import _compile_ahead, _jit, config


def _tiny(x):
    return x + 1.0


@pytest.fixture
def cold_kernel(tmp_path, monkeypatch):
    """A kernel that misses an empty disk cache on its first specialisation, in a
    process that has not printed the compile notice yet."""
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(_jit, "_noticed", False)
    monkeypatch.setattr(config, "QUIET", False)
    return _jit.Kernel(_tiny, False)


# ------------------------------------------------------------------ the compile notice


def test_without_a_stderr_the_compile_notice_stays_out_of_stdout(cold_kernel, monkeypatch, capsys):
    """A process started with fd 2 closed (``prog 2>&-``, some daemons) has
    ``sys.stderr = None``; ``print(file=None)`` writes to stdout, so the notice went
    into the program's output (a CSV piped into a file) instead of nowhere."""
    monkeypatch.setattr(sys, "stderr", None)
    disp = cold_kernel.specialize((types.float64,))
    assert disp(1.0) == 2.0
    assert capsys.readouterr().out == ""


class _Unwritable(io.TextIOBase):
    """A stderr that refuses every write: a full disk, a log pipe whose reader exited."""

    def __init__(self, error):
        self.error = error

    def write(self, text):
        raise self.error

    def flush(self):
        raise self.error


@pytest.mark.parametrize(
    "error",
    [OSError(28, "No space left on device"), BrokenPipeError(32, "Broken pipe"), ValueError("closed file")],
    ids=["full", "broken-pipe", "closed"],
)
def test_a_stderr_that_cannot_be_written_does_not_fail_the_call(cold_kernel, monkeypatch, error):
    """``python train.py 2>/dev/full``, or a log pipe whose reader died: the first
    call that compiled raised OSError from the notice, a cosmetic line, and computed
    nothing."""
    monkeypatch.setattr(sys, "stderr", _Unwritable(error))
    disp = cold_kernel.specialize((types.float64,))
    assert disp(1.0) == 2.0


# ------------------------------------------------------------------ the compile helper


@pytest.fixture
def own_helper(monkeypatch):
    """numbabn._compile_ahead with no helper and no jobs of this process's, enabled;
    whatever helper a test starts is stopped afterwards."""
    monkeypatch.setattr(_compile_ahead, "_helper", None)
    monkeypatch.setattr(_compile_ahead, "_jobs", {})
    monkeypatch.setattr(config, "COMPILE_AHEAD", True)
    monkeypatch.setattr(_compile_ahead, "_has_siblings", lambda: False)
    from numbabn import _threads

    monkeypatch.setattr(_threads, "_threads", 2)
    helpers = []
    real = _compile_ahead._Helper

    def tracked():
        helpers.append(real())
        return helpers[-1]

    monkeypatch.setattr(_compile_ahead, "_Helper", tracked)
    yield helpers
    for h in helpers:
        h.stop()


def test_a_helper_whose_pipes_are_above_fd_1024_is_waited_for(own_helper):
    """A process with more than about 1000 files open (a data loader's shards, a
    server's sockets) gets its helper's pipes at fd 1024 and up, which select()
    refuses: every cold backward raised "ValueError: filedescriptor out of range in
    select()", again on every later call (the job stayed in the table)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = 1100
    if soft < need + 64:
        if hard != resource.RLIM_INFINITY and hard < need + 64:
            pytest.skip(f"the fd limit ({hard}) is too low to open {need} files")
        resource.setrlimit(resource.RLIMIT_NOFILE, (need + 64, hard))
    held = []
    try:
        held = [os.open(os.devnull, os.O_RDONLY) for _ in range(need)]
        # a kernel whose (cached or compiled) signature the helper reports at once
        _compile_ahead.start("d", [("ncl", "grad_coef")])
        (helper,) = own_helper
        assert helper.done >= 1024  # what this test is about
        _compile_ahead.wait("d", "ncl", "grad_coef")
        assert helper.finished  # the job was reported done and read (not given up on)
    finally:
        for fd in held:
            os.close(fd)
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


def _state(pid):
    """The process's state letter ('Z': a zombie), or None once it is gone (reaped)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


@pytest.mark.skipif(not os.path.isdir("/proc/self"), reason="reads process states from /proc")
def test_a_helper_that_exits_when_idle_is_reaped(own_helper, monkeypatch):
    """A helper exits after IDLE_S seconds without a job. Nothing in a long training
    process looked at it again, so it stayed a zombie ("[python] <defunct>" in ps) for
    the rest of that process's life."""
    monkeypatch.setattr(_compile_ahead, "IDLE_S", 0.2)
    _compile_ahead.start("d", [("ncl", "grad_coef")])
    (helper,) = own_helper
    _compile_ahead.wait("d", "ncl", "grad_coef")
    pid = helper.proc.pid
    deadline = time.monotonic() + 60
    while _state(pid) not in (None, "Z") and time.monotonic() < deadline:
        time.sleep(0.05)  # the helper idles, then exits
    grace = time.monotonic() + 10
    while _state(pid) == "Z" and time.monotonic() < grace:
        time.sleep(0.05)
    assert _state(pid) is None


# ------------------------------------------------------------------ the cache count


_OTHER_CPU = """
import sys
from numba import types
from numbabn import _jit
from tests.test_audit_runtime import _tiny
kernel = _jit.Kernel(_tiny, False)
_jit._KERNELS[:] = [kernel]
kernel.specialize((types.float64,))
print(_jit.cached_entries()[0])
"""


def test_entries_of_another_cpu_are_not_counted(tmp_path, monkeypatch):
    """A cache filled on another CPU (a Docker image built elsewhere, a shared home
    on a cluster): Numba keys each entry by CPU name and features, so none of them
    loads here, but ``numbabn info`` (and ``warmup``'s last line) counted them as
    "compiled signatures" while every process compiled."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, NUMBA_CACHE_DIR=str(tmp_path), NUMBA_CPU_NAME="generic", NUMBABN_QUIET="1")
    env["PYTHONPATH"] = os.pathsep.join([root, env.get("PYTHONPATH", "")])
    other = subprocess.run([sys.executable, "-c", _OTHER_CPU], env=env, cwd=root, capture_output=True, text=True)
    assert other.returncode == 0, other.stderr
    assert other.stdout.split() == ["1"]  # there, the entry counts
    monkeypatch.setattr(numba.config, "CACHE_DIR", str(tmp_path))
    monkeypatch.setattr(config, "QUIET", True)
    kernel = _jit.Kernel(_tiny, False)
    monkeypatch.setattr(_jit, "_KERNELS", [kernel])
    assert _jit.cached_entries()[0] == 0  # here, it does not load
    kernel.specialize((types.float64,))
    assert sum(kernel._specs[(types.float64,)].stats.cache_misses.values()) == 1  # as the count said
    assert _jit.cached_entries()[0] == 1  # this CPU's own entry, beside the other's
    # Should Numba's private key method change, every entry counts (as before the CPU
    # check) rather than none, which would make `numbabn warmup` fail.
    monkeypatch.setattr(_jit._GuardedCache, "_index_key", None, raising=False)  # calling it: TypeError
    assert _jit.cached_entries()[0] == 2


# ------------------------------------------------------------------ the command line


@pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full, a device that is always full")
@pytest.mark.parametrize("args", [["--version"], ["layers"]])
def test_a_full_stdout_is_one_line_not_a_traceback(args):
    """``numbabn ... > file`` on a full disk: the command line's rule (numbabn.cli._common)
    makes an output that cannot be written one ``Error:`` line with exit code 2; a full
    stdout was a traceback ending in "OSError: [Errno 28] No space left on device" (and
    a second report from the interpreter's last flush of stdout at exit)."""
    with open("/dev/full", "w") as full:
        run = subprocess.run(
            [sys.executable, "-m", "numbabn", *args], stdout=full, stderr=subprocess.PIPE, text=True, timeout=120
        )
    assert run.returncode == 2, run.stderr
    assert run.stderr.startswith("Error: ") and run.stderr.count("\n") == 1, run.stderr
    assert "No space left on device" in run.stderr
