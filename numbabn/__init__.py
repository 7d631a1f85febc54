"""numbabn: batch normalization for the NumPy world, on Numba kernels.

Public API (see :mod:`numbabn.functional` for the formulas)::

    y, ctx = numbabn.batch_norm_forward(x, gamma, beta, running_mean=..., running_var=...)
    dx, dgamma, dbeta = numbabn.batch_norm_backward(dy, ctx)
    m = numbabn.moments(x, axis=1); m = numbabn.merge_moments(m1, m2)

Attributes are imported lazily (PEP 562) so that ``import numbabn`` -- and the CLI's
``--help`` -- stay fast and never import Numba or touch the CUDA driver until a
kernel is actually needed.
"""

from ._lazy import lazy_exports

__version__ = "0.1.0"

_LAZY = {
    "BatchNormContext": "numbabn.functional",
    "batch_norm_forward": "numbabn.functional",
    "batch_norm_backward": "numbabn.functional",
    "moments": "numbabn.functional",
    "cuda_available": "numbabn.functional",
    "Moments": "numbabn.stats",
    "merge_moments": "numbabn.stats",
    "get_num_threads": "numbabn._threads",
    "set_num_threads": "numbabn._threads",
    "limit_threads": "numbabn._threads",
    "available_cpus": "numbabn._threads",
    "empty_cache": "numbabn._buffers",
}

__getattr__, __dir__, __all__ = lazy_exports(globals(), _LAZY, ["__version__"])
