"""Warnings attributed to the user's code rather than to numbabn's own lines."""

import os
import sys
import warnings

_PACKAGE = os.path.dirname(os.path.abspath(__file__)) + os.sep


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside the
    numbabn package (and Numba's, which calls back into it): the user's line that
    called into numbabn (or scikit-learn's, when it calls an estimator), however many
    of numbabn's own calls lie in between. A fixed ``stacklevel`` pointed wherever
    numbabn's call depth happened to put it (a kernel compile sits four to eight calls
    below the public function), so ``-W`` could not filter by module and the printed
    location named numbabn's internals."""
    # Numba's frames too: a cache warning comes from a method Numba's compiler calls back.
    numba = sys.modules.get("numba")
    skip = (_PACKAGE,) if numba is None else (_PACKAGE, os.path.dirname(os.path.abspath(numba.__file__)) + os.sep)
    frame, level = sys._getframe(1), 2
    while frame is not None and frame.f_code.co_filename.startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
