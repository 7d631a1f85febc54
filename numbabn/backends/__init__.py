"""The two compute backends behind :mod:`numbabn.functional`.

Each backend module (:mod:`.cpu`, :mod:`.cuda`) offers the same operations on its
own kind of arrays, called by the dispatcher after every shared check has passed:

* ``canonical(fn, name, x, axis)``, ``param(...)``, ``output(...)``,
  ``check_apart(...)``, ``deliver(...)``: where arrays live (views, copies, checks
  that depend on the kind of array);
* ``moments(cx)``: per-channel (2, C) float64 [mean, M2] on the host;
* ``forward(...)``: statistics (the batch's or given ones), running-statistics
  update and normalisation -> (mean, invstd, coef); the CUDA backend only stages
  the running-statistics update and returns it in place of ``coef``, and the
  dispatcher publishes it with ``commit_running(pending)`` once the output has been
  delivered (a call that raises leaves the statistics as they were);
* ``grad_sums(cdy, ctx)`` -> backend partials; ``pack_grad_sums`` /
  ``unpack_grad_sums`` convert them to and from the host (2, C) float64
  [sum g, sum g*(x - mean)] that an ``allreduce`` combines; ``grad_apply(...)`` ->
  dx, dgamma, dbeta.

Only these modules import ``numbabn.kernels``. The CUDA module imports
``numba.cuda`` and is imported on first use (:func:`get`).
"""

from types import ModuleType


def get(name: str) -> ModuleType:
    """The backend module ``name`` ("cpu" or "cuda")."""
    if name == "cpu":
        from . import cpu

        return cpu
    from . import cuda

    return cuda
