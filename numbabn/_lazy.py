"""Lazy attribute exports for packages (PEP 562), so that importing a package does
not import its heavy modules (Numba, mpi4py, ...) until a name is used."""

from collections.abc import Callable, Iterable, Mapping
from importlib import import_module
from typing import Any


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
        value = getattr(import_module(module), name)
        namespace[name] = value
        return value

    def __dir__() -> list[str]:
        return names

    return __getattr__, __dir__, names
