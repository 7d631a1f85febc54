"""numbabn's kernels on PyTorch's own OpenMP threads, for the numbabn.torch modules.

Why: after each parallel region PyTorch's OpenMP workers keep spinning for a few
milliseconds (GNU OpenMP's default wait policy; about 4-10 ms of CPU time on the
project's machine, measured with ``time.process_time`` around a sleep after a
``Tensor.mul_``). In a network every batch norm follows a convolution, so
numbabn's own worker threads would share the cores with those spinning threads.
Handing the pieces to the same OpenMP team instead puts them on the threads that
are spinning anyway, waiting for work. BN forward+backward through autograd, same
machine, alternating processes: 4096x1024 from 15.6-17.1 ms to 12.6-13.0 ms (native
12.8-16.9 ms), 128x256x14x14 from 22.2-25.8 ms to 16.7-19.4 ms (native 28.0-36.3 ms);
64x64x56x56 unchanged within the noise. (A ResNet-18 step is 89 % convolutions on
that machine and moves by less than its noise; README, "Use it from PyTorch".)

How: ``GOMP_parallel`` of the OpenMP runtime PyTorch loaded (GNU's ``libgomp``, or
Intel's/LLVM's, which export the same entry point), called through :mod:`ctypes`
with a Python callback; each team thread takes pieces of the call until none is
left (:func:`numbabn._threads.parallel_for`), so results are bit-identical to the
pool's. The GIL is held only between pieces; the kernels release it.

When not: PyTorch built without OpenMP, no OpenMP runtime found in the process
(only Linux's ``/proc/self/maps`` is searched), ``NUMBABN_TORCH_OPENMP=0``, or a
process forked from one that imported this module (an OpenMP team does not survive
``fork``; PyTorch's own parallel ops hang there too): numbabn's pool runs the
kernels as everywhere else.
"""

import contextlib
import ctypes
import os
import sys
import threading
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager
from pathlib import Path
from typing import Any

import torch

from numbabn import _threads, config

_Callback = ctypes.CFUNCTYPE(None, ctypes.c_void_p)
_lock = threading.Lock()
_entry: Any = None  # GOMP_parallel, once found
_searched = False
_forked = False


def _runtime_paths() -> list[str]:
    """Paths of the OpenMP runtimes mapped into this process (Linux)."""
    try:
        with open("/proc/self/maps") as f:
            names = {line.split()[-1] for line in f if "/" in line}
    except OSError:
        return []
    return sorted(p for p in names if any(k in Path(p).name for k in ("libgomp", "libiomp", "libomp")))


def _find_entry() -> Any:
    """``GOMP_parallel`` of the OpenMP runtime PyTorch uses, or None."""
    if not config.TORCH_OPENMP:
        return None
    if "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info():
        return None
    paths = _runtime_paths()
    own = [p for p in paths if p.startswith(str(Path(torch.__file__).parent))]
    if len(own) != 1 and len(paths) != 1:
        return None  # several runtimes and none is PyTorch's own: do not guess
    try:
        entry = ctypes.CDLL((own or paths)[0]).GOMP_parallel
    except (OSError, AttributeError):
        return None
    entry.argtypes = [_Callback, ctypes.c_void_p, ctypes.c_uint, ctypes.c_uint]
    entry.restype = None
    return entry


def _run_on_team(body: Callable[[], Any], threads: int) -> None:
    """Call ``body()`` on ``threads`` threads of PyTorch's OpenMP team (this one
    among them); return when all have returned, then raise the first error."""
    errors: list[BaseException] = []

    def call(_data: Any) -> None:
        try:
            body()
        except BaseException as exc:  # an exception cannot cross the C runtime
            errors.append(exc)

    with _keeping_lost(call, errors):
        _entry(_Callback(call), None, threads, 0)
    if errors:
        raise errors[0]


# Callbacks on a team now -> their call's error list. A signal handler's exception
# (Ctrl-C's KeyboardInterrupt, a SIGTERM handler's SystemExit) can be raised as the
# callback's frame starts, before its ``try``: ctypes then hands it to
# sys.unraisablehook and drops it, and the call returned normally (1 signal in 6-20
# was lost so on a 2-vCPU VM). While any call runs on a team, numbabn's hook takes
# such an exception of its callbacks into their list; anything else goes on to the
# hook that was there before.
_running: dict[Any, list[BaseException]] = {}
_hook_lock = threading.Lock()
_previous_hook: Any = None


def _unraisable(info: Any) -> None:
    errors = _running.get(info.object)
    if errors is None and info.object is None:
        # Python 3.13 passes no object for a ctypes callback, only its repr in the message
        message = info.err_msg or ""
        errors = next((e for cb, e in list(_running.items()) if f"{id(cb):#x}" in message), None)
    if errors is not None and info.exc_value is not None:
        errors.append(info.exc_value)
    else:
        _previous_hook(info)


@contextlib.contextmanager
def _keeping_lost(callback: Any, errors: list[BaseException]) -> Iterator[None]:
    """Within: an exception raised in ``callback`` outside its ``try`` goes into ``errors``."""
    global _previous_hook
    with _hook_lock:
        if not _running and sys.unraisablehook is not _unraisable:
            _previous_hook = sys.unraisablehook
            sys.unraisablehook = _unraisable
        _running[callback] = errors
    try:
        yield
    finally:
        with _hook_lock:
            del _running[callback]
            if not _running and sys.unraisablehook is _unraisable:  # unless someone installed theirs since
                sys.unraisablehook = _previous_hook


def team() -> Callable[[Callable[[], Any], int], None] | None:
    """The runner for :func:`numbabn._threads.use_team`, or None for numbabn's pool."""
    global _entry, _searched
    if _forked:
        return None
    if not _searched:
        with _lock:
            if not _searched:
                _entry = _find_entry()
                _searched = True
    return _run_on_team if _entry is not None else None


def use_torch_threads() -> AbstractContextManager[None]:
    """The context numbabn.torch calls the kernels in: as many threads as
    ``torch.get_num_threads()`` (what the ``torch.nn`` layer it replaces would use;
    ``numbabn.set_num_threads`` applies to numbabn's own API), on PyTorch's OpenMP
    team when :func:`team` finds it, else on numbabn's pool."""
    return _threads.use_team(team(), torch.get_num_threads())


def _after_fork() -> None:
    global _forked
    _forked = True


os.register_at_fork(after_in_child=_after_fork)
