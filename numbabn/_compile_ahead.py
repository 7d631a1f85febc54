"""Compiling the backward's kernels in a helper process while the caller compiles the
forward's.

Numba compiles under one process-wide lock, so a process compiles one kernel at a
time however many CPUs it may use. A cold training step compiles the forward's
kernels (statistics, coefficients, normalise) and then the backward's (gradient sums,
gradient coefficients, gradient apply). When the statistics kernel of a (dtype,
layout) misses the disk cache -- a training forward is about to compile --
:func:`start` hands the backward's kernels to a helper process, which compiles them
into the same disk cache meanwhile. Before compiling one of them itself, the caller
:func:`wait`\\ s for that job and then loads the kernel from the cache. PyTorch's
inductor compiles in worker processes for the same reason.

The helper is one new interpreter (``python -c``) per process, started on the first
such miss, with the parent's ``sys.path`` (as ``multiprocessing``'s spawn passes it,
without re-running the caller's ``__main__``). It pays Numba's start-up once and
serves later jobs (the float64 variant, the other layout) from a pipe; it exits when
the parent closes the pipe (exit, or kill at exit), or after :data:`IDLE_S` seconds
without a job.

Correctness never depends on the helper: Numba keys each cache entry by signature,
source file stamp and CPU, so an entry the helper did not write (it failed, was slower
than :data:`WAIT_S`, imported other numbabn sources, or ran under other Numba
settings) is a cache miss, and the caller compiles that kernel as it would without a
helper. A helper is used only when compiled kernels can be shared (a writable disk
cache), numbabn may use at least two threads (:func:`numbabn.get_num_threads`), and
the process did not start together with siblings that compile too (a
``multiprocessing`` worker, one of several local MPI or torchrun ranks: there a
helper each made a cold 2-worker pool on 2 CPUs 30 % slower, not faster);
``NUMBABN_COMPILE_AHEAD=0`` (or ``numbabn.config.COMPILE_AHEAD = False``) turns it
off. A forked child neither uses nor stops its parent's helper.
"""

import atexit
import itertools
import math
import os
import select
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from typing import IO

from . import _threads, config

#: Longest wait for one job before the caller compiles the kernel itself (seconds).
WAIT_S = 60.0
#: A helper without a job for this long exits (seconds); a later miss starts another.
IDLE_S = 20.0

# The helper's program: the parent's sys.path, the same numbabn (else exit 3: the
# parent's misses are then its own to compile), then the job loop.
_CHILD = """\
import sys
sys.path[:] = {path!r}
import numbabn
if numbabn.__file__ != {file!r}:
    sys.exit(3)
from numbabn._compile_ahead import serve
serve({idle!r})
"""


class _Helper:
    """The parent's end of one helper process: numbered jobs in, their numbers out.

    No thread reads the results: a caller that needs one reads them (:meth:`poll`).
    The pipes are plain file descriptors (``os.write``/``os.read``), which a forked
    child closes; every use is under the module's lock."""

    def __init__(self) -> None:
        import numba

        import numbabn

        env = dict(os.environ, NUMBABN_QUIET="1", NUMBABN_COMPILE_AHEAD="0")
        if numba.config.CACHE_DIR:  # the same cache, also when set on numba.config after import
            env["NUMBA_CACHE_DIR"] = numba.config.CACHE_DIR
        jobs_r, self.jobs = os.pipe()
        self.done, done_w = os.pipe()
        try:
            self.proc = subprocess.Popen(
                [sys.executable, "-c", _CHILD.format(path=list(sys.path), file=numbabn.__file__, idle=IDLE_S)],
                env=env,
                stdin=jobs_r,
                stdout=done_w,
                stderr=subprocess.DEVNULL,
            )
        except BaseException:
            for fd in (self.jobs, self.done):
                os.close(fd)
            raise
        finally:
            os.close(jobs_r)
            os.close(done_w)
        # Reaped as soon as it exits (idle, or failed): nothing else need look at it
        # again, and in a long process it would stay a zombie ("<defunct>") till the end.
        try:
            threading.Thread(target=self.proc.wait, daemon=True, name="numbabn-helper-reaper").start()
        except RuntimeError:  # no thread can be started: reaped when next polled, or at exit
            pass
        self.open = True  # both pipes open (cleared before they are closed)
        self.finished: set[int] = set()  # job numbers the helper reported done
        self.buffered = b""

    def submit(self, job: int, words: str) -> bool:
        """Queue one job (``words``: dtype char, then layout.kernel words); False if the
        helper is gone (it exits after IDLE_S seconds without a job)."""
        if self.open and self.proc.poll() is None:
            try:
                os.write(self.jobs, f"{job} {words}\n".encode())  # < PIPE_BUF: one atomic write
                return True
            except OSError:
                pass
        self.close()
        return False

    def poll(self, job: int, timeout: float) -> bool:
        """Whether ``job`` is done or the helper gone, reading what it reported within
        ``timeout`` seconds."""
        if job in self.finished or not self.open:
            return True
        if not _readable(self.done, timeout):
            return False
        try:
            chunk = os.read(self.done, 4096)
        except OSError:
            chunk = b""
        if not chunk:  # the helper exited: nothing more will come
            self.close()
            return True
        *lines, self.buffered = (self.buffered + chunk).split(b"\n")
        self.finished.update(int(line) for line in lines if line.strip().isdigit())
        return job in self.finished

    def close(self) -> None:
        """Close both pipes (a helper at end of input exits) and reap it if it has."""
        if self.open:
            self.open = False
            _close(self.jobs)
            _close(self.done)
        self.proc.poll()

    def stop(self) -> None:
        """Close the pipes and kill the helper (a half-written cache entry is never
        visible: Numba writes a temporary file, then renames it)."""
        self.close()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _readable(fd: int, timeout: float) -> bool:
    """Whether ``fd`` has data or end of file within ``timeout`` seconds. poll(), not
    select(): select() refuses descriptors from 1024 (FD_SETSIZE) up, which new pipes
    get in a process with many files open (a data loader's, a server's)."""
    poller = select.poll()
    poller.register(fd, select.POLLIN)
    return bool(poller.poll(math.ceil(max(0.0, timeout) * 1000)))


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


_lock = threading.Lock()  # the helper, its pipes and the job table
_helper: _Helper | None = None
_jobs: dict[tuple[str, str, str], tuple[_Helper, int]] = {}  # (dtype char, layout, kernel) -> job
_numbers = itertools.count()
#: Seconds a waiting caller holds the lock per look at the result pipe.
_SLICE = 0.05


# Launchers' counts of the ranks on this machine: torchrun, MPICH (Hydra), Open MPI.
_LOCAL_RANKS = ("LOCAL_WORLD_SIZE", "MPI_LOCALNRANKS", "OMPI_COMM_WORLD_LOCAL_SIZE")


def _has_siblings() -> bool:
    """Whether this process was started with others that compile the same kernels on
    the same CPUs: a ``multiprocessing`` child (pool, ``concurrent.futures``, joblib's
    loky workers; its bootstrap imported multiprocessing) or one of several local
    ranks of a launcher. A helper each would only add processes to busy CPUs."""
    mp = sys.modules.get("multiprocessing")
    if mp is not None and mp.parent_process() is not None:
        return True
    for name in _LOCAL_RANKS:
        try:
            if int(os.environ.get(name, "1")) > 1:
                return True
        except ValueError:
            pass
    return False


def enabled() -> bool:
    """Whether a cache miss may hand work to a helper (setting, threads, an
    interpreter, a process that compiles alone)."""
    return (
        config.COMPILE_AHEAD
        and _threads.get_num_threads() >= 2
        and bool(sys.executable)
        and not getattr(sys, "frozen", False)
        and not _has_siblings()
    )


def start(dtype: str, kernels: Sequence[tuple[str, str]], spawn: bool = True) -> None:
    """Have the helper compile ``kernels``, (layout, name) pairs of
    ``cpu_driver.specs(dtype, layout)`` (``dtype``: a storage dtype's character
    code), as one job, unless it has them already. ``spawn=False``: only if a helper
    is running (a kernel that may well be in the disk cache is worth a job, not a new
    process). Never raises: without a helper the caller compiles them itself."""
    global _helper
    if not enabled():
        return
    with _lock:
        todo = [(layout, n) for layout, n in kernels if (dtype, layout, n) not in _jobs]
        if not todo or not spawn and (_helper is None or not _helper.open):
            return
        job = next(_numbers)
        words = " ".join([dtype, *(f"{layout}.{n}" for layout, n in todo)])
        for _ in range(2):  # a second try with a new helper if the old one just exited
            if _helper is None or not _helper.open:
                try:
                    _helper = _Helper()
                except (OSError, ValueError):
                    return
            if _helper.submit(job, words):
                for layout, n in todo:
                    _jobs[dtype, layout, n] = (_helper, job)
                return


def wait(dtype: str, layout: str, name: str) -> None:
    """If the helper was given kernel ``name``, wait until it is done with it, so that
    the kernel loads from the disk cache: at most :data:`WAIT_S` per job, after which
    the caller compiles the job's kernels itself."""
    entry = _jobs.get((dtype, layout, name))
    if entry is None:
        return
    helper, job = entry
    deadline = time.monotonic() + WAIT_S
    while True:  # in slices, so that a thread starting a job is not held up for long
        with _lock:
            if helper.poll(job, min(_SLICE, max(0.0, deadline - time.monotonic()))):
                return
            if time.monotonic() >= deadline:
                # Given up on this job: its other kernels are not waited for again
                # (one WAIT_S per job, not per kernel); the caller compiles them.
                for key in [k for k, v in _jobs.items() if v == entry]:
                    del _jobs[key]
                return


def serve(idle: float) -> None:
    """The helper's loop: read ``job dtype layout.name...`` lines from stdin, compile
    (or load) those kernels, write ``job`` back; return at end of input or after
    ``idle`` seconds (the parent's :data:`IDLE_S`) without one."""
    import numpy as np

    from .kernels import cpu_driver

    fd = sys.stdin.fileno()
    out: IO[str] = sys.stdout
    buffered = b""
    while True:
        while b"\n" not in buffered:
            if not _readable(fd, idle):
                return
            chunk = os.read(fd, 4096)
            if not chunk:
                return
            buffered += chunk
        line, buffered = buffered.split(b"\n", 1)
        job, dtype, *kernels = line.decode().split()
        try:
            for kernel in kernels:
                layout, name = kernel.split(".")
                getattr(cpu_driver.specs(np.dtype(dtype), layout), name)
        except Exception:  # the parent compiles what is missing, and reports its errors
            pass
        out.write(job + "\n")
        out.flush()


@atexit.register
def _at_exit() -> None:
    # Under the lock (held at most one slice by a waiting daemon thread), so that no
    # thread is inside select() on a pipe this closes.
    locked = _lock.acquire(timeout=1.0)
    try:
        if _helper is not None:
            _helper.stop()
    finally:
        if locked:
            _lock.release()


def _after_fork() -> None:
    # The helper is the parent's: the child closes its copies of the pipes (so the
    # helper still sees the parent's exit) and starts its own if it needs one. The
    # lock may have been held by a parent thread at fork time: a new one.
    global _helper, _lock
    if _helper is not None and _helper.open:
        _close(_helper.jobs)
        _close(_helper.done)
    _helper = None
    _jobs.clear()
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)
