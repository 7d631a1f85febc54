"""Layer registry: names -> layer classes, built-in and from plugins.

Three ways in, one table::

    @register_layer("my_norm")           # in-process (scripts, notebooks, numbabn itself)
    class MyNorm(Layer): ...

    # or, in a distribution's pyproject.toml (discovered by importlib.metadata):
    [project.entry-points."numbabn.layers"]
    my_norm = "my_package.module:MyNorm"

    layer = get_layer("my_norm", num_features=16)
    available_layers()   # {"batch_norm1d": "builtin", "my_norm": "my-dist 1.0 (my_package.module:MyNorm)", ...}

Discovery is lazy and runs once: the first lookup registers the built-in layers
(``numbabn.layers.BUILTIN_LAYERS``; the layer modules never import this one) and
loads every entry point of the group ``numbabn.layers``. A plugin that fails to load (import error, not a
Layer, name clash) produces one warning naming it and is skipped; it never breaks
``import numbabn`` or the other layers.
"""

import importlib.metadata
import threading
import warnings
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

if TYPE_CHECKING:
    from .layers.base import Layer

_LayerT = TypeVar("_LayerT", bound="type[Layer]")

ENTRY_POINT_GROUP = "numbabn.layers"

_registry: dict[str, tuple[Any, str]] = {}  # name -> (class, origin)
_discovered = False  # discovery has finished: the table is complete
_discovering = False  # discovery is running (in the thread that holds _lock)
_lock = threading.RLock()  # re-entrant: a plugin module may itself look layers up while loading
_failed: dict[str, str] = {}  # entry-point name -> why it was not registered (for UnknownLayerError)


class UnknownLayerError(KeyError):
    """Raised for a name nothing registered; the message lists what is available."""

    def __str__(self) -> str:  # KeyError would print the message in quotes
        return str(self.args[0])


def _check_name(fn: str, name: Any) -> str:
    if not isinstance(name, str) or not name.isidentifier():
        raise ValueError(f"{fn}: name must be a Python identifier string such as 'batch_norm1d', got {name!r}")
    return name


def _is_layer_class(obj: Any) -> bool:
    from .layers.base import Layer

    return isinstance(obj, type) and issubclass(obj, Layer)


def _add(name: str, cls: "type[Layer]", origin: str) -> str | None:
    """Register; the same class under the same name again is a no-op. Returns the
    error message on a clash (the caller decides: raise or warn)."""
    current = _registry.get(name)
    if current is not None and current[0] is not cls:
        return (
            f"the name {name!r} is already registered to {current[0].__module__}.{current[0].__qualname__} "
            f"({current[1]})"
        )
    if current is None:
        _registry[name] = (cls, origin)
    return None


def register_layer(name: str) -> Callable[[_LayerT], _LayerT]:
    """Class decorator: register a :class:`~numbabn.layers.Layer` subclass as ``name``.

    The origin shown by :func:`available_layers` is "builtin" for numbabn's own
    layers and the defining module otherwise. Registering a different class under a
    taken name (a built-in's, whether or not a layer was looked up before, a loaded
    plugin's or an earlier registration's) raises ValueError.
    """
    fn = "register_layer"
    _check_name(fn, name)

    def decorator(cls: _LayerT) -> _LayerT:
        if not _is_layer_class(cls):
            raise TypeError(f"{fn}({name!r}): expected a Layer subclass, got {cls!r}")
        module = cls.__module__
        origin = "builtin" if module == "numbabn" or module.startswith("numbabn.") else module
        # The built-in names first: registered before the first lookup, a class would
        # otherwise take a built-in's name, silently (the built-in skipped). Entry points
        # are not loaded here: one may point at the module this decorator runs in (a
        # circular import); a plugin that clashes is skipped, with a warning, when they are.
        with _lock:
            _add_builtins()
            clash = _add(name, cls, origin)
        if clash:
            raise ValueError(f"{fn}: {clash}")
        return cls

    return decorator


def _load_entry_points() -> list[str]:
    """Register every loadable entry point of the group; return the warnings for the
    others (issued by the caller once all are registered: a warning turned into an
    error must not leave the table half filled). Entry points are taken sorted by
    distribution and name, so which of two plugins claiming one name wins does not
    depend on the order of site-packages."""
    problems = []
    found = importlib.metadata.entry_points(group=ENTRY_POINT_GROUP)
    # (a distribution's name may be None: a dist-info folder without METADATA)
    for ep in sorted(found, key=lambda e: (str(getattr(e.dist, "name", None) or ""), e.name)):
        dist = f"{ep.dist.name} {ep.dist.version}" if ep.dist is not None else "unknown distribution"
        label = f"layer plugin {ep.name!r} = {ep.value!r} from {dist}"
        try:
            obj = ep.load()
        except Exception as exc:  # a broken plugin must never break numbabn
            problem = f"could not load {label}: {type(exc).__name__}: {exc}"
        else:
            if not _is_layer_class(obj):
                problem = f"skipped {label}: it is {obj!r}, not a numbabn Layer subclass"
            elif not ep.name.isidentifier():
                problem = f"skipped {label}: the name is not a Python identifier"
            else:
                clash = _add(ep.name, obj, f"{dist} ({ep.value})")
                if not clash:
                    continue
                problem = f"skipped {label}: {clash}"
        problems.append(problem)
        _failed.setdefault(ep.name, problem)
    return problems


def _ensure_discovered() -> None:
    global _discovered, _discovering
    if _discovered:
        return
    with _lock:
        # _discovering: a plugin looking layers up while it loads (the same thread,
        # the lock is re-entrant) must not start discovery again. _discovered is set
        # only once the table is complete: set before, another thread's lookup would
        # skip the lock and miss the layers still loading (even the built-ins).
        if _discovered or _discovering:
            return
        _discovering = True
        try:
            _add_builtins()
            problems = _load_entry_points()
            _discovered = True
        finally:
            _discovering = False
    for problem in problems:  # the table is complete: a warning raised as an error cannot cut it short
        warnings.warn(f"numbabn: {problem}", RuntimeWarning, stacklevel=3)


def _add_builtins() -> None:
    """Register numbabn.layers' built-in layers (again: a no-op); under ``_lock``."""
    from .layers import BUILTIN_LAYERS

    for name, cls in BUILTIN_LAYERS.items():
        _add(name, cls, "builtin")


def available_layers() -> dict[str, str]:
    """``{name: origin}`` of every registered layer, sorted by name. Origin is
    "builtin", the module of an in-process registration, or
    "<distribution> <version> (<module>:<attr>)" for an entry point."""
    _ensure_discovered()
    return {name: _registry[name][1] for name in sorted(_registry)}


def layer_class(name: str) -> "type[Layer]":
    """The class registered as ``name`` (:class:`UnknownLayerError`, a KeyError
    listing the available names, if there is none; TypeError if ``name`` is not a str)."""
    if not isinstance(name, str):
        raise TypeError(f"numbabn: name must be a layer's name (a str), got {type(name).__name__} {name!r:.80}")
    _ensure_discovered()
    entry = _registry.get(name)
    if entry is None:
        why = f" (a plugin's entry point of that name was not registered: {_failed[name]})" if name in _failed else ""
        raise UnknownLayerError(f"numbabn: unknown layer {name!r}{why}; available: {', '.join(sorted(_registry))}")
    return entry[0]


def get_layer(name: str, *args: Any, **kwargs: Any) -> "Layer":
    """Construct the layer registered as ``name``: ``layer_class(name)(*args, **kwargs)``."""
    return layer_class(name)(*args, **kwargs)
