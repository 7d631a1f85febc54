"""Large output buffers, kept for reuse once their caller has dropped them.

Why: glibc serves an allocation above its mmap threshold (which it raises as blocks
are freed, but never above 32 MiB on 64-bit Linux) with fresh pages from the
kernel, and returns them to the kernel on ``free``. Every batch norm of a
64x64x56x56 float32 input (51 MB) used to fault in and zero a new output: 2.3-2.8 ms
of an 8 ms eval forward on a 2-vCPU VM even with NumPy's transparent-huge-page hint,
the difference between 55 % and 80 % of the copy bandwidth (docs/performance.md, "Output
buffers"). Below the threshold glibc already reuses freed memory, so only buffers
of at least :data:`MIN_BYTES` come from here.

How: :func:`empty` hands out a *view* (the requested shape and dtype, starting at a
64-byte boundary) of a 1-D uint8 block that the pool keeps. The view, and every view or tensor made from it,
holds a reference to the block, so a block whose only reference is the pool's is
one nobody can reach any more: the next request of the same byte size gets it back
instead of new pages. Blocks are matched by exact size (a training loop asks for
the same shapes again), the most recently used last. The pool holds at most
``config.BUFFER_CACHE_MB`` MiB of blocks, in use or not (default 256;
``NUMBABN_BUFFER_CACHE_MB=0`` turns it off); beyond that it forgets the oldest
ones (a block still in use is then simply the caller's). :func:`empty_cache`
releases the blocks nobody uses now.

Like ``np.empty``, the contents of a returned buffer are undefined.
"""

import os
import sys
import threading
from math import prod
from typing import Any

import numpy as np

from . import config

# glibc's largest mmap threshold on 64-bit (DEFAULT_MMAP_THRESHOLD_MAX): smaller
# blocks come back from malloc's own free lists without page faults.
MIN_BYTES = 32 << 20

# Views start at a multiple of this many bytes (a cache line), so that rows of the
# streaming kernels (numbabn.kernels.stream) start on a 32-byte boundary.
ALIGN = 64

_lock = threading.Lock()
_pool: list[np.ndarray] = []  # 1-D uint8 blocks, least recently handed out first


def _unused(i: int) -> bool:
    """Whether block ``_pool[i]`` is referenced by the pool alone: the list's
    reference and the argument of ``getrefcount`` (a view of it, or anything built
    on one, would add its own)."""
    return sys.getrefcount(_pool[i]) == 2


def empty(shape: tuple[int, ...], dtype: np.dtype[Any], nbytes: int | None = None) -> np.ndarray:
    """A C-contiguous array of ``shape`` and ``dtype`` (a ``np.dtype``), contents
    undefined: a view of a pooled block when it is at least :data:`MIN_BYTES` and the
    pool is on, else ``np.empty``. ``nbytes``: its size in bytes when the caller has
    it at hand (an input's ``nbytes``: computing it here costs 0.3 us of a 10 us call)."""
    if nbytes is None:
        nbytes = prod(shape) * dtype.itemsize
    if nbytes < MIN_BYTES:  # first and cheap: small calls are all per-call overhead
        return np.empty(shape, dtype)
    limit = config.BUFFER_CACHE_MB << 20
    size = nbytes + ALIGN  # the block: the view plus room to align its start
    if size > limit:
        return np.empty(shape, dtype)
    with _lock:
        for i in range(len(_pool)):
            if _pool[i].nbytes == size and _unused(i):
                block = _pool.pop(i)
                break
        else:
            block = np.empty(size, np.uint8)
            held = size + sum(b.nbytes for b in _pool)
            while held > limit:
                held -= _pool.pop(0).nbytes
        _pool.append(block)
    start = -block.ctypes.data % ALIGN
    return block[start : start + nbytes].view(dtype).reshape(shape)


def empty_cache() -> int:
    """Release the pooled output blocks that no array refers to any more; returns the
    bytes released (to the allocator, which hands blocks this large back to the
    operating system)."""
    with _lock:
        freed = [i for i in range(len(_pool)) if _unused(i)]
        released = sum(_pool[i].nbytes for i in freed)
        for i in reversed(freed):
            del _pool[i]
    return released


def pooled_bytes() -> tuple[int, int]:
    """(bytes of the pooled blocks, bytes of those no array refers to)."""
    with _lock:
        return sum(b.nbytes for b in _pool), sum(_pool[i].nbytes for i in range(len(_pool)) if _unused(i))


def _after_fork() -> None:
    # Another thread of the parent may have held the lock at the fork.
    global _lock
    _lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork)
