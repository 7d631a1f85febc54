"""The one scheduler of the CPU kernels: fixed blocks, a persistent pool of Python
threads, kernels that release the GIL.

A kernel processes the blocks ``t0 <= t < t1`` of a fixed grid (its geometry
depends on the shape and ``config.CHUNK`` only) and writes per-block partial
results, which the driver merges in block order. How the blocks are split over
threads therefore never changes a result: outputs are bit-identical for any
thread count, and concurrent calls from several Python threads give what serial
calls give.

Why Python threads rather than Numba's ``parallel=True``: serial kernels compile
several times faster than parfors; no OpenMP/TBB/workqueue runtime is loaded, so a
forked child (``multiprocessing``, joblib) works after the parent used the kernels,
and several Python threads may call kernels at once under any Numba threading
configuration; idle pool threads block on a queue instead of spinning against BLAS.
See the README's "Kernel runtime" section for the measurements behind the choice.

Thread count: :func:`set_num_threads`, else ``NUMBABN_NUM_THREADS``, else the CPUs
this process may use (:func:`available_cpus`: affinity mask and cgroup CPU quota).
Inputs of at most ``config.SERIAL_MAX`` elements (default 2**19) run on the calling
thread alone: a parallel call wakes a blocked pool thread (28-52 us a round trip on
the project's VM) and shares cache-resident data between two cores, and below that
size one thread was faster (README, "Kernel runtime"; PyTorch's OpenMP grain is
32768, but its workers spin between regions). Pieces of a parallel call hold at least
:data:`PIECE_MIN` elements, which is what one hand-over of the GIL is worth.
"""

import contextlib
import contextvars
import functools
import itertools
import os
import queue
import threading
from collections.abc import Callable, Iterator
from typing import Any

from . import config

_lock = threading.Lock()
_pool: "_Pool | None" = None  # _Pool, created on first parallel use
_threads: int | None = None  # the setting; None until first read
# A piece is 1/(_SHARE * threads) of the blocks not yet cut into pieces (guided
# scheduling): pieces shrink towards the end, so the threads finish within a small
# piece of each other. Equal pieces, 2 per thread, left one thread idle for up to
# a quarter of the call at the end (README, "Kernel runtime").
_SHARE = 2
#: Elements a piece holds at least (unless that would leave a thread without one): the
#: serial threshold before it was raised to 2**19, kept for the pieces so that large
#: inputs are cut as finely as before (their last pieces even out the threads).
PIECE_MIN = 1 << 18


def available_cpus() -> int:
    """CPUs this process may run on: the affinity mask, capped by a cgroup v2/v1
    CPU quota (containers), at least 1."""
    try:
        n = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        n = os.cpu_count() or 1
    quota = _cgroup_quota()
    if quota is not None:
        n = min(n, quota)
    return max(1, n)


# Where the process's cgroups are read (module attributes: the tests point them at a
# fake tree).
_CGROUP_ROOT = "/sys/fs/cgroup"
_PROC_CGROUP = "/proc/self/cgroup"


def _cgroup_quota() -> int | None:
    """ceil(quota / period) of the tightest CPU quota on this process's cgroup or one of
    its ancestors (a systemd service's ``CPUQuota=``, a Slurm job, a container's
    limit): cgroup v2 ``cpu.max``, v1 ``cpu.cfs_quota_us`` / ``cpu.cfs_period_us``;
    None if unlimited. Reading only the mount's top directory missed every limit set
    below it."""
    limits = [q for d in _cgroup_dirs() if (q := _dir_quota(d)) is not None]
    return min(limits) if limits else None


def _cgroup_dirs() -> list[str]:
    """The cgroup directories whose CPU limits apply to this process: its own (from
    ``/proc/self/cgroup``: the v2 unified hierarchy, or v1's cpu controller) and each
    ancestor, then the mounts' top directories (inside a container without a cgroup
    namespace the listed path does not exist under the mount, which is the
    container's own cgroup)."""
    try:
        with open(_PROC_CGROUP) as f:
            lines = f.read().splitlines()
    except OSError:
        lines = []
    dirs = []
    for line in lines:
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        _, controllers, path = parts
        if controllers == "":
            base = _CGROUP_ROOT
        elif "cpu" in controllers.split(","):
            base = os.path.join(_CGROUP_ROOT, "cpu")
        else:
            continue
        rel = path.strip("/")
        while rel:
            dirs.append(os.path.join(base, rel))
            rel = os.path.dirname(rel)
    dirs += [_CGROUP_ROOT, os.path.join(_CGROUP_ROOT, "cpu")]
    return list(dict.fromkeys(dirs))


def _dir_quota(path: str) -> int | None:
    """The CPU quota in one cgroup directory, in CPUs rounded up; None if none."""
    try:
        with open(os.path.join(path, "cpu.max")) as f:
            quota, period = f.read().split()[:2]
        return None if quota == "max" else max(1, -(-int(quota) // int(period)))
    except (OSError, ValueError):
        pass
    try:
        with open(os.path.join(path, "cpu.cfs_quota_us")) as f:
            quota = int(f.read())
        with open(os.path.join(path, "cpu.cfs_period_us")) as f:
            period = int(f.read())
        return None if quota <= 0 else max(1, -(-quota // period))
    except (OSError, ValueError):
        return None


def get_num_threads() -> int:
    """Threads the CPU kernels use for inputs larger than ``config.SERIAL_MAX``."""
    global _threads
    if _threads is None:
        _threads = config.NUM_THREADS or available_cpus()
    return _threads


def set_num_threads(n: int) -> int:
    """Use ``n`` threads (1 <= n; more than :func:`available_cpus` is allowed but
    only oversubscribes; a call starts no more threads than it has pieces).
    Returns the previous setting. Results do not depend on it.
    (numbabn.torch's modules use ``torch.get_num_threads()`` threads instead.)"""
    if isinstance(n, bool) or not isinstance(n, int) and not hasattr(n, "__index__"):
        raise TypeError(f"set_num_threads: n must be a positive int, got {type(n).__name__} {n!r}")
    n = int(n.__index__()) if not isinstance(n, int) else n
    if n < 1:
        raise ValueError(f"set_num_threads: n must be a positive int, got {n}")
    global _threads
    with _lock:
        previous = get_num_threads()
        _threads = n
    return previous


@contextlib.contextmanager
def limit_threads(n: int | None) -> Iterator[None]:
    """``with limit_threads(n):`` the kernels use ``n`` threads (None: no change);
    the previous setting is restored on exit. The setting is process-wide: blocks
    entered by two Python threads at once restore each other's saved values (the
    last to exit decides what remains), so set it from one thread."""
    if n is None:
        yield
        return
    previous = set_num_threads(n)
    try:
        yield
    finally:
        set_num_threads(previous)


class _Pool:
    """Worker threads taking (function, args) jobs from one queue."""

    def __init__(self) -> None:
        self.size = 0
        self.jobs: queue.SimpleQueue[Any] = queue.SimpleQueue()

    def grow(self, workers: int) -> None:
        """Start workers until there are ``workers`` (called under ``_lock``)."""
        while self.size < workers:
            threading.Thread(target=self._work, daemon=True, name="numbabn-kernel").start()
            self.size += 1

    def _work(self) -> None:
        # daemon threads for the life of the process, blocked on the queue when idle
        while True:
            fn, args = self.jobs.get()
            fn(*args)  # never raises: parallel_for's pieces record their errors
            # Blocked on the queue, the worker must not keep the call's arrays alive.
            del fn, args


def _get_pool(workers: int) -> "_Pool":
    """The pool, with at least ``workers`` workers."""
    global _pool
    with _lock:
        # Grown to the most workers a call has used, never shrunk: a caller asking
        # for fewer queues fewer jobs, and idle workers block. (numbabn.torch's calls
        # follow PyTorch's thread count, numbabn's own follow numbabn's: a pool
        # rebuilt on every change would start threads on every call that alternates
        # between them.)
        if _pool is None:
            _pool = _Pool()
        _pool.grow(workers)
        return _pool


def _after_fork() -> None:
    # The child has no copy of the parent's worker threads; its pool (and the
    # lock, which a parent thread may have held at fork time) start afresh.
    global _pool, _lock
    _pool = None
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


_Runner = Callable[[Callable[[], Any], int], None]
# (runner, threads) of :func:`use_team`, or None outside it. A runner ``run(body, n)``
# runs ``body()`` on ``n`` threads (the calling one among them) and returns when
# every one has returned; None: numbabn's own pool. numbabn.torch sets PyTorch's
# OpenMP team and thread count here around its kernel calls.
_team: contextvars.ContextVar[tuple[_Runner | None, int | None] | None] = contextvars.ContextVar(
    "numbabn_team", default=None
)


@contextlib.contextmanager
def use_team(run: _Runner | None, threads: int | None = None) -> Iterator[None]:
    """``with use_team(run, threads):`` the kernels called in this context (this
    thread or task) use ``threads`` threads (None: :func:`get_num_threads`) and run
    their pieces through ``run(body, n)``, which must call ``body()`` on ``n``
    threads, the calling one included, and return when all have returned (None:
    numbabn's own pool). Results do not depend on either."""
    token = _team.set((run, threads))
    try:
        yield
    finally:
        _team.reset(token)


def _runner() -> tuple[_Runner | None, int]:
    """(runner, threads) of a parallel kernel call made here: those :func:`use_team`
    set in this context, else numbabn's pool and :func:`get_num_threads`."""
    run, threads = _team.get() or (None, None)
    return run, get_num_threads() if threads is None else threads


def threads_in_use() -> int:
    """Threads a parallel kernel call made here would use (see :func:`_runner`)."""
    return _runner()[1]


def parallel_for(kernel: Callable[..., Any], blocks: int, size: int, *args: Any) -> None:
    """Run ``kernel(*args, t0, t1)`` over the blocks ``0 <= t < blocks``.

    Serial (one call on this thread) when ``size`` <= ``config.SERIAL_MAX`` elements,
    when there is one block, or with one thread (:func:`get_num_threads`, or the
    count :func:`use_team` sets). Otherwise the blocks are cut into contiguous
    pieces, large first and shrinking (:func:`_guided`; each of at least
    :data:`PIECE_MIN` elements, or smaller where that would leave a thread
    without a piece), and the calling thread
    and the pool's workers take pieces in turn until none is left, so that they
    finish within one small piece of each other. Taking pieces rather than being handed one fixed span each
    matters on a busy machine: a thread that gets less CPU (another process,
    PyTorch's OpenMP workers spinning after their last parallel region) leaves its
    pieces to the others instead of holding up the call, and the call returns as
    soon as every piece is done, even if a worker never got to run. Inside
    :func:`use_team` the team's threads take the pieces instead of the pool's.
    A piece that raises does not stop the others; the first error is raised once
    all are done. Ctrl-C (KeyboardInterrupt) stops every thread at its next piece
    boundary and is raised once no thread is left in a piece: never while a worker
    still writes the caller's arrays.
    """
    if size <= config.SERIAL_MAX or blocks <= 1:
        kernel(*args, 0, blocks)
        return
    run, threads = _runner()
    if threads <= 1:
        kernel(*args, 0, blocks)
        return
    # pieces of at least PIECE_MIN elements, but never fewer pieces than threads
    bounds = _guided(blocks, threads, max(1, min(blocks * PIECE_MIN // size, blocks // threads)))
    pieces = len(bounds) - 1
    claim = itertools.count().__next__  # one C call: atomic under the GIL
    errors: list[BaseException] = []
    stop: list[bool] = []  # non-empty: claim no more pieces (the caller was interrupted)

    def take() -> None:
        """Run pieces until none is left."""
        while not stop and (i := claim()) < pieces:
            try:
                kernel(*args, bounds[i], bounds[i + 1])
            except BaseException as exc:  # raised by the caller once all pieces are done
                errors.append(exc)
                if not isinstance(exc, Exception):
                    stop.append(True)  # Ctrl-C: no thread starts another piece

    if run is not None:
        run(take, min(threads, pieces))  # returns once every team thread has returned
    else:
        # workers for the pieces there are: a thread count far above the CPUs (or
        # the pieces) starts no thread that could never get work
        helpers = min(threads, pieces) - 1
        try:
            pool = _get_pool(helpers)
        except RuntimeError:
            # No thread can be started: Python 3.12 refuses new threads at interpreter
            # shutdown (an atexit handler's first parallel call), or the system's limit
            # is reached. The pieces run here instead, with the same results.
            kernel(*args, 0, blocks)
            return
        _run_on_pool(take, helpers, pool, stop)
    if errors:
        raise errors[0]


@functools.lru_cache(maxsize=1024)
def _guided(blocks: int, threads: int, least: int) -> tuple[int, ...]:
    """Piece bounds ``(0, b1, ..., blocks)``: each piece takes 1/(2*threads) of the
    blocks not yet in a piece, and at least ``least`` blocks (the last may hold
    fewer). Large pieces first, the small ones last, where they even out the
    threads' finishing times. With T threads about 2T * (ln(blocks / (2T * least)) + 1)
    pieces, each costing one GIL hand-over. Memoised: few (blocks, threads, least) recur."""
    bounds = [0]
    t = 0
    while t < blocks:
        t = min(blocks, t + max(least, (blocks - t) // (_SHARE * threads)))
        bounds.append(t)
    return tuple(bounds)


def _run_on_pool(take: Callable[[], Any], helpers: int, pool: "_Pool", stop: list[bool]) -> None:
    """Run ``take()`` on this thread and on up to ``helpers`` pool workers; return
    once this thread's ``take()`` is done and no worker is inside its own.

    A worker whose job starts after this thread has finished takes nothing (every
    piece is claimed by then), so only workers that got to run are waited for.
    An exception raised on this thread outside the kernels (Ctrl-C's
    KeyboardInterrupt, a signal handler's error) stops the claiming (``stop``) but
    is raised only then: leaving earlier would let a worker go on writing the
    caller's arrays after the call has raised."""
    idle = threading.Condition(threading.Lock())
    active, closed = 0, False  # workers inside take(); no worker may enter any more

    def job() -> None:
        nonlocal active
        with idle:
            if closed:
                return
            active += 1
        try:
            take()
        finally:
            with idle:
                active -= 1
                idle.notify()

    interrupt: BaseException | None = None
    try:
        for _ in range(helpers):
            pool.jobs.put((job, ()))
        take()
    except BaseException as exc:  # only a signal's: take() keeps the kernels' errors
        interrupt = exc
        stop.append(True)  # the workers finish the piece they are in, then leave
    while True:
        try:
            with idle:
                closed = True
                while active:
                    idle.wait()
            break
        except BaseException as exc:
            interrupt = interrupt or exc
    if interrupt is not None:
        raise interrupt
