"""Run small inputs on the calling thread alone.

Waking Numba's thread pool costs several microseconds, and idle pool threads spin
for a while afterwards; on a small input (a BN layer in an MLP with batch 60) that
is more than the work itself, and the spinning threads then compete with BLAS's
own threads for the same cores. PyTorch does the same (``at::parallel_for`` runs
serially below a grain size of 32768 elements). Results do not change: the
kernels' chunking never depends on the thread count.
"""
import numba
from numba.np.ufunc import parallel as _parallel

from . import config

_raw = None


def _raw_get_set():
    """Numba's unchecked thread-count getter and setter (~0.3 us a call, against
    ~1.5 us for the public ones, which re-check the pool and argument every time).
    They are bound when the pool starts, so start it first; the public functions
    stand in should a Numba release rename them."""
    numba.get_num_threads()
    return (getattr(_parallel, "_get_num_threads", None) or numba.get_num_threads,
            getattr(_parallel, "_set_num_threads", None) or numba.set_num_threads)


def run(kernel, size, *args):
    """``kernel(*args)``, on one thread when ``size`` <= config.SERIAL_MAX elements."""
    if size > config.SERIAL_MAX:
        return kernel(*args)
    global _raw
    if _raw is None:
        _raw = _raw_get_set()
    get, set_ = _raw
    prev = get()
    set_(1)
    try:
        return kernel(*args)
    finally:
        set_(prev)
