"""Streamed or ordinary stores for an element-wise pass: which one, per output.

Non-temporal stores (:mod:`numbabn.kernels.stream`) skip reading each output line
into the cache first, so an eval over data larger than the cache moves 2S bytes
instead of 3S. Whether that makes a pass faster depends on the machine, and by more
than the noise: on a 2-vCPU AVX2 EPYC VM (8 MiB L3) they made the 51 MB NCHW passes
1.2-1.4x faster; on a 2-vCPU AVX-512 EPYC VM (32 MiB L3) ordinary stores were as
fast or faster on two threads (channels-last eval 2.4-3.4 ms against 3.7-4.5) and
1.3-1.7x faster on one (docs/performance.md). Neither a cache size nor a CPU flag
tells the two apart, so, as ``torch.backends.cudnn.benchmark`` picks a convolution
algorithm, numbabn times both on the first calls: outputs of at least
``config.STREAM_MIN`` bytes (the last-level cache) alternate between the two for
:data:`TRIALS` calls each, per (kernel, output size class, thread count), and from then
on use the faster by the minimum time. A size class is a power of two (outputs of
32-64 MiB share one): batches of varying size do not start the trials again, and
the choices stay few. Smaller outputs always use ordinary stores (the
data stays in the cache between passes). The values written are the same bytes
either way (tests/test_stream.py), so the choice changes speed only.
``NUMBABN_STREAM_MIN_MB`` set by the user fixes the choice: streamed from that
size up, no timing.
"""

import os
import threading
import time
from collections.abc import Callable
from typing import Any

from . import _threads, config

TRIALS = 3

_LOCK = threading.Lock()
_TIMES: dict[Any, tuple[list[float], list[float]]] = {}  # key -> (ordinary, streamed) seconds
_CHOICE: dict[Any, bool] = {}  # key -> streamed


def run(kernel: Any, nbytes: int, call: Callable[[bool], Any], clock: Callable[[], float] = time.perf_counter) -> Any:
    """``call(stream)`` for an output of ``nbytes`` bytes written by ``kernel`` (a
    hashable name: pass, dtype, layout), with the stores chosen as the module
    docstring says; returns what ``call`` returns."""
    if nbytes < config.STREAM_MIN:
        return call(False)
    if not config.STREAM_AUTO:
        return call(True)
    key = (kernel, nbytes.bit_length(), _threads.threads_in_use())  # numbabn.torch: PyTorch's count
    choice = _CHOICE.get(key)
    if choice is not None:
        return call(choice)
    with _LOCK:
        times = _TIMES.setdefault(key, ([], []))
        stream = len(times[1]) <= len(times[0])  # alternate, streamed first
    t0 = clock()
    out = call(stream)
    elapsed = clock() - t0
    with _LOCK:
        times[stream].append(elapsed)
        if key not in _CHOICE and min(len(times[0]), len(times[1])) >= TRIALS:
            _CHOICE[key] = min(times[1]) < min(times[0])
            del _TIMES[key]
    return out


def chosen() -> dict[Any, bool]:
    """{(kernel, output size class, threads): streamed} decided so far in this
    process; the class of an output of n bytes is ``n.bit_length()``."""
    with _LOCK:
        return dict(_CHOICE)


def _after_fork() -> None:
    # Another thread of the parent may have held the lock at the fork (as _buffers).
    global _LOCK
    _LOCK = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)


def forget() -> None:
    """Drop the timings and choices (tests; a process whose machine changed)."""
    with _LOCK:
        _TIMES.clear()
        _CHOICE.clear()
