"""Warnings attributed to the user's code rather than to numbabn's own lines."""

import os
import sys
import warnings


def _prefix(module_file: str | None) -> str | None:
    """The directory of a package's ``__init__`` as a path prefix (case-normalised,
    as frames' file names are compared), or None without a file."""
    return None if not module_file else os.path.normcase(os.path.dirname(os.path.abspath(module_file))) + os.sep


_PACKAGE = _prefix(__file__)


def warn_at_caller(message: str, category: type[Warning]) -> None:
    """``warnings.warn(message, category)`` attributed to the first frame outside the
    numbabn package (and Numba's, which calls back into it, and click's, which runs
    numbabn's commands): the user's line that
    called into numbabn (or scikit-learn's, when it calls an estimator), however many
    of numbabn's own calls lie in between. A fixed ``stacklevel`` pointed wherever
    numbabn's call depth happened to put it (a kernel compile sits four to eight calls
    below the public function), so ``-W`` could not filter by module and the printed
    location named numbabn's internals. Where every frame is numbabn's (a thread that
    numbabn started), the outermost one is named."""
    # also click's frames: between numbabn's own commands and the script that ran them
    libraries = (sys.modules.get("numba"), sys.modules.get("click"))
    skip = tuple(p for p in (_PACKAGE, *(_prefix(getattr(m, "__file__", None)) for m in libraries)) if p)
    frame, level = sys._getframe(1), 2
    while frame.f_back is not None and os.path.normcase(frame.f_code.co_filename).startswith(skip):
        frame, level = frame.f_back, level + 1
    warnings.warn(message, category, stacklevel=level)
