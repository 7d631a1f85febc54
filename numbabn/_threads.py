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

# Numba's public get/set_num_threads re-check their argument and the pool on every
# call (~1.5 us each); the unchecked setters below cost ~0.3 us. They exist in every
# Numba release this package supports (pinned to 0.68); fall back to the public ones.
_get = getattr(_parallel, "_get_num_threads", numba.get_num_threads)
_set = getattr(_parallel, "_set_num_threads", numba.set_num_threads)


def run(kernel, size, *args):
    """``kernel(*args)``, on one thread when ``size`` <= config.SERIAL_MAX elements."""
    if size > config.SERIAL_MAX:
        return kernel(*args)
    numba.get_num_threads()          # makes sure the pool exists before the raw setter
    prev = _get()
    _set(1)
    try:
        return kernel(*args)
    finally:
        _set(prev)
