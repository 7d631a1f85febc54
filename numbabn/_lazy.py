"""Lazy attribute exports for packages (PEP 562), so that importing a package does
not import its heavy modules (Numba, mpi4py, ...) until a name is used.

A ``fork`` waits for the lazy imports other threads have in progress: a child forked
while another thread of the parent held a module's import lock (the first use of
``numbabn.batch_norm_forward`` imports Numba, about 0.4 s) inherits that lock held,
with no thread left to release it, and its own first use hung for ever (a
``multiprocessing`` fork pool started beside a thread's first call)."""

import os
import threading
from collections.abc import Callable, Iterable, Mapping
from importlib import import_module
from typing import Any

# thread ident -> how deep in lazy imports that thread is, under _cond
_active: dict[int, int] = {}
_cond = threading.Condition()
# How long a fork waits for other threads' imports: one that waits on a module lock
# the forking thread holds (it forks in the middle of an import) would never finish.
FORK_WAIT_S = 60.0


def _before_fork() -> None:
    me = threading.get_ident()
    _cond.acquire()  # held across the fork: no lazy import starts meanwhile
    _cond.wait_for(lambda: all(ident == me for ident in _active), timeout=FORK_WAIT_S)


def _after_fork_in_parent() -> None:
    _cond.release()


def _after_fork_in_child() -> None:
    # The child has only the forking thread; the others' imports did not come along.
    global _cond
    _cond = threading.Condition()
    me = threading.get_ident()
    for ident in [i for i in _active if i != me]:
        del _active[ident]


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork_in_child)


def lazy_exports(
    namespace: dict[str, Any],
    exports: Mapping[str, str],
    extra: Iterable[str] = (),
) -> tuple[Callable[[str], Any], Callable[[], list[str]], list[str]]:
    """Module-level ``(__getattr__, __dir__, __all__)`` for ``exports`` = {name: module}.

    ``namespace`` is the package's ``globals()``: a resolved name is cached there so
    the next lookup is a plain attribute access.
    """
    package = namespace["__name__"]
    names = sorted(exports) + list(extra)

    def __getattr__(name: str) -> Any:
        module = exports.get(name)
        if module is None:
            raise AttributeError(f"module {package!r} has no attribute {name!r}")
        me = threading.get_ident()
        with _cond:
            _active[me] = _active.get(me, 0) + 1
        try:
            value = getattr(import_module(module), name)
        finally:
            with _cond:
                if _active[me] == 1:
                    del _active[me]
                else:
                    _active[me] -= 1
                _cond.notify_all()
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__, names
