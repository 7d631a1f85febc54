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
cache) and numbabn may use at least two threads (:func:`numbabn.get_num_threads`);
``NUMBABN_COMPILE_AHEAD=0`` (or ``numbabn.config.COMPILE_AHEAD = False``) turns it
off. A forked child neither uses nor stops its parent's helper.
"""

import atexit
import itertools
import os
import select
import subprocess
import sys
import threading
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

    The pipes are plain file descriptors (``os.write``/``os.read``), not Python file
    objects: a forked child must close its copies, and a buffered file object could
    be locked by the parent's reader thread at fork time."""

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
        self.pending: dict[str, threading.Event] = {}
        self.alive = True  # the job pipe is open (cleared before it is closed)
        self.reading = True  # the result pipe is open (cleared before it is closed)
        threading.Thread(target=self._read, name="numbabn-compile-ahead", daemon=True).start()

    def submit(self, job: str, words: str) -> threading.Event | None:
        """Queue one job (``words``: dtype char, layout, kernel names); its event is set
        when the helper is done with it or gone. None if the helper is gone already."""
        event = threading.Event()
        with _lock:  # the job pipe is closed under this lock only (never written closed)
            if not self.alive:
                return None
            try:
                os.write(self.jobs, f"{job} {words}\n".encode())  # < PIPE_BUF: one atomic write
            except OSError:  # it exited (idle) a moment ago
                self._gone()
                return None
            self.pending[job] = event
        return event

    def _gone(self) -> list[threading.Event]:
        """Under ``_lock``: mark the helper gone, close the job pipe, hand back the
        events still pending (the caller sets them)."""
        if self.alive:
            self.alive = False
            _close(self.jobs)
        left = list(self.pending.values())
        self.pending.clear()
        return left

    def _read(self) -> None:
        buffered = b""
        while True:
            try:
                chunk = os.read(self.done, 4096)
            except OSError:
                chunk = b""
            if not chunk:
                break
            *lines, buffered = (buffered + chunk).split(b"\n")
            with _lock:
                events = [self.pending.pop(line.decode(), None) for line in lines]
            for event in events:
                if event is not None:
                    event.set()
        self.reading = False
        _close(self.done)
        with _lock:  # the helper exited: nothing more will come
            left = self._gone()
        for event in left:
            event.set()
        self.proc.wait()

    def stop(self) -> None:
        """Close the job pipe and kill the helper (a half-written cache entry is never
        visible: Numba writes a temporary file, then renames it)."""
        with _lock:
            self._gone()
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def _close(fd: int) -> None:
    try:
        os.close(fd)
    except OSError:
        pass


_lock = threading.Lock()  # a helper's pending jobs
_start_lock = threading.Lock()  # the helper and the job table
_helper: _Helper | None = None
_jobs: dict[tuple[str, str, str], threading.Event] = {}  # (dtype char, layout, kernel) -> done
_numbers = itertools.count()


def enabled() -> bool:
    """Whether a cache miss may hand work to a helper (setting, threads, an interpreter)."""
    return (
        config.COMPILE_AHEAD
        and _threads.get_num_threads() >= 2
        and bool(sys.executable)
        and not getattr(sys, "frozen", False)
    )


def start(dtype: str, layout: str, names: tuple[str, ...]) -> None:
    """Have the helper compile the kernels ``names`` of ``cpu_driver.specs(dtype,
    layout)`` (``dtype``: a storage dtype's character code), unless it has them
    already. Never raises: without a helper the caller compiles them itself."""
    global _helper
    if not enabled():
        return
    with _start_lock:
        todo = [n for n in names if (dtype, layout, n) not in _jobs]
        if not todo:
            return
        job = str(next(_numbers))
        words = " ".join([dtype, layout, *todo])
        for _ in range(2):  # a second try with a new helper if the old one just exited
            if _helper is None or not _helper.alive:
                try:
                    _helper = _Helper()
                except (OSError, ValueError):
                    return
            event = _helper.submit(job, words)
            if event is not None:
                for n in todo:
                    _jobs[dtype, layout, n] = event
                return


def wait(dtype: str, layout: str, name: str) -> None:
    """If the helper was given kernel ``name``, wait until it is done with it (at most
    :data:`WAIT_S`), so that the kernel loads from the disk cache."""
    event = _jobs.get((dtype, layout, name))
    if event is not None:
        event.wait(WAIT_S)


def serve(idle: float) -> None:
    """The helper's loop: read ``job dtype layout name...`` lines from stdin, compile
    (or load) those kernels, write ``job`` back; return at end of input or after
    ``idle`` seconds (the parent's :data:`IDLE_S`) without one."""
    import numpy as np

    from .kernels import cpu_driver

    fd = sys.stdin.fileno()
    out: IO[str] = sys.stdout
    buffered = b""
    while True:
        while b"\n" not in buffered:
            if not select.select([fd], [], [], idle)[0]:
                return
            chunk = os.read(fd, 4096)
            if not chunk:
                return
            buffered += chunk
        line, buffered = buffered.split(b"\n", 1)
        job, dtype, layout, *names = line.decode().split()
        try:
            kernels = cpu_driver.specs(np.dtype(dtype), layout)
            for name in names:
                getattr(kernels, name)
        except Exception:  # the parent compiles what is missing, and reports its errors
            pass
        out.write(job + "\n")
        out.flush()


@atexit.register
def _at_exit() -> None:
    if _helper is not None:
        _helper.stop()


def _after_fork() -> None:
    # The helper is the parent's: the child closes its copies of the pipes (so the
    # helper still sees the parent's exit) and starts its own if it needs one.
    global _helper, _lock, _start_lock
    if _helper is not None:
        if _helper.alive:
            _close(_helper.jobs)
        if _helper.reading:
            _close(_helper.done)
    _helper = None
    _jobs.clear()
    _lock = threading.Lock()
    _start_lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)
