"""How numbabn compiles its CPU kernels: explicit signatures, a cache that cannot
stop the package, and one line on stderr when a compile is about to happen.

Every kernel is a serial ``@njit(nogil=True, error_model="numpy")`` function
(threads come from :mod:`numbabn._threads`). The NumPy error model drops the zero
check, and its exception machinery, that Python's would add to every division: the
only zero divisor is an empty batch's count, whose inf/NaN coefficients no element
uses. A kernel is compiled only for the signatures its driver asks for
(:meth:`Kernel.specialize`): one per dtype and layout, with read-only input arrays in
the signature, so writeable, read-only, C-contiguous views of any origin all reuse
that one machine-code specialisation (Numba converts a writeable array to a
read-only one for free when compilation at call time is disabled, which it is).

The on-disk cache (Numba's ``cache=True`` machinery, in ``__pycache__`` next to
the source or Numba's user-wide fallback, or only ``NUMBA_CACHE_DIR`` when that is
set) is wrapped so that

* a warmed cache this process can read but not write (``numbabn warmup`` run as
  root in a Docker build, then a non-root user, a read-only file system or a
  shared install) is still loaded: where a writable location exists too (the
  user's own cache) it is tried on a miss there, before compiling; where none
  does, it is the cache, and a kernel missing from it compiles in memory (warned
  once);
* no cache location at all (or an unusable ``NUMBA_CACHE_DIR``) -> compile without
  caching, warn once;
* a corrupted index or data file (truncated, garbage) -> warn once, drop that
  function's cache entry, recompile (and save a good entry for later processes);
* an entry is valid for the kernel's source file *and* the other modules of
  ``numbabn.kernels``, whose helpers it inlines: Numba's own stamp covers the first
  only.

Numba has no public hook for either, so the wrapper is a subclass of Numba's
``FunctionCache`` installed on the dispatcher; ``tests/test_runtime.py`` checks
both behaviours against the installed Numba. The same subclass makes a warm load
cheap: it rebuilds the cached object code without first loading Numba's compiler
registries (0.8 -> 0.17 s CPU for the first forward of a warm process).

``NUMBABN_QUIET=1`` (or ``numbabn.config.QUIET = True``) silences the compile notice.
"""

import functools
import hashlib
import os
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numba
from numba import njit
from numba.core.caching import (
    CompileResultCacheImpl,
    FunctionCache,
    InTreeCacheLocator,
    NullCache,
    UserProvidedCacheLocator,
    UserWideCacheLocator,
)
from numba.core.runtime import rtsys

from . import config
from ._warnings import warn_at_caller

_KERNELS: list["Kernel"] = []  # every kernel made by `kernel`, for warmup and info
_lock = threading.RLock()
_noticed = False
_warned: set[Any] = set()


def _before_fork() -> None:
    # A fork waits for a compile in progress on another thread: that thread holds
    # Numba's own compiler lock too, which a child would inherit held, with no thread
    # to release it (its first compile would wait for ever).
    _lock.acquire()


def _after_fork_in_parent() -> None:
    _lock.release()


def _after_fork() -> None:
    # The child has no other thread: a lock of its own.
    global _lock
    _lock = threading.RLock()


os.register_at_fork(before=_before_fork, after_in_parent=_after_fork_in_parent, after_in_child=_after_fork)


class CompilerDisabledError(RuntimeError):
    """Numba's compiler is switched off in this process (``NUMBA_DISABLE_JIT=1``), and
    the kernels cannot run without it (see :func:`require_compiler`)."""


class CacheWarning(UserWarning):
    """The kernel cache could not be used; kernels still work (compiled in memory)."""


def _warn_once(key: Any, message: str) -> None:
    if key not in _warned:
        _warned.add(key)
        warn_at_caller(message, CacheWarning)


def _notice(place: str) -> None:
    """The one stderr line of a process that is about to compile (``place``: where the
    result goes, "cached in DIR" or why it is not cached)."""
    global _noticed
    if _noticed or config.QUIET:
        return
    _noticed = True
    # A process without a stderr (started with fd 2 closed: sys.stderr is None) says
    # nothing: print(file=None) would write the line into its stdout, its data. A
    # stderr that cannot take the line (a full disk, a log pipe whose reader exited,
    # closed) must not fail the kernel call that is about to compile.
    stream = sys.stderr
    if stream is None:
        return
    try:
        print(
            f"numbabn: compiling CPU kernels not yet in the cache (a few seconds per variant, once; {place}; "
            "`numbabn warmup` compiles them ahead of time, --residual and --dtype float16/bfloat16 the "
            "rarer ones; NUMBABN_QUIET=1 silences this)",
            file=stream,
            flush=True,
        )
    except (OSError, ValueError):  # ValueError: "I/O operation on closed file"
        pass


@functools.cache
def _dependency_stamp() -> str:
    """A hash of every module of ``numbabn.kernels``. Numba stamps a cache entry with
    a hash of the kernel's own source file only, but the kernels inline helpers from
    their sibling modules (``storage``, ``stream``, ``prefetch``): an edit or an upgrade that
    changed only one of those would leave the old machine code in the cache. Hashing
    the whole package (not a list of the modules imported today) also covers a helper
    module added later; a change to the CUDA kernels costs one needless recompile."""
    digest = hashlib.sha256()
    for path in sorted((Path(__file__).parent / "kernels").glob("*.py")):
        digest.update(path.name.encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


class _UserDirImpl(CompileResultCacheImpl):
    """The cache where ``NUMBA_CACHE_DIR`` says, or nowhere: Numba would fall back,
    silently, to the package's own ``__pycache__`` (an editable checkout, or
    site-packages) when that directory is not writable."""

    _locator_classes = [UserProvidedCacheLocator]


class _Readable:
    """For Numba's source-file locators: a cache directory that exists and can be read,
    whether or not it can be written (Numba's own locators insist on writing)."""

    def ensure_cache_path(self) -> None:
        path = self.get_cache_path()
        if not (os.path.isdir(path) and os.access(path, os.R_OK | os.X_OK)):
            raise OSError(f"{path} is not a readable directory")


class _ReadableUserProvided(_Readable, UserProvidedCacheLocator):
    pass


class _ReadableInTree(_Readable, InTreeCacheLocator):
    pass


class _ReadableUserWide(_Readable, UserWideCacheLocator):
    pass


def _impl(locator: type) -> type:
    """Numba's cache implementation looking in ``locator``'s directory only."""
    return type(f"_{locator.__name__}Impl", (CompileResultCacheImpl,), {"_locator_classes": [locator]})


# Where a warmed cache may sit that this process cannot write, in the order tried: the
# package's own ``__pycache__`` (``numbabn warmup`` run by root in a Docker build, then
# a non-root user or a read-only file system), then Numba's user-wide directory; with
# ``NUMBA_CACHE_DIR`` set, only there (the user chose it: an empty one must mean a cold
# cache, as the tests and benchmarks that set it rely on).
_READABLE = [_impl(_ReadableInTree), _impl(_ReadableUserWide)]
_READABLE_USER_DIR = [_impl(_ReadableUserProvided)]


class _GuardedCache(FunctionCache):
    """Numba's per-function disk cache, but a fault in it is a warning, not an error.
    ``on_miss`` (if set) is called when a signature is not in the cache, just before
    Numba compiles it. Entries are stamped with the kernel's source file and the
    modules of its package (:func:`_dependency_stamp`). ``fallback``: a read-only
    cache of the same function elsewhere (a warmed install), tried on a miss."""

    on_miss: Callable[[], Any] | None = None
    fallback: "_ReadOnlyCache | None" = None
    writable = True

    def __init__(self, py_func: Callable[..., Any], impl: Any = None) -> None:
        if impl is not None:
            self._impl_class = impl
        elif numba.config.CACHE_DIR:
            self._impl_class = _UserDirImpl
        super().__init__(py_func)
        self._cache_file._source_stamp = (self._cache_file._source_stamp, _dependency_stamp())

    def _index_key(self, sig: Any, codegen: Any) -> Any:
        # Numba keys an entry with a hash of the function's bytecode, which ``python
        # -OO`` changes (without the docstring every constant index moves): a cache
        # warmed by plain Python was useless to -OO processes (Docker images that set
        # PYTHONOPTIMIZE=2), which compiled again, or on a read-only install, every
        # time. The entries' source stamp holds a hash of every kernel module's text
        # (_dependency_stamp), which covers what the bytecode did (the kernels hold no
        # assert, the only code -O removes); the closure's hash stays.
        key = super()._index_key(sig, codegen)
        try:
            signature, machine, (_, closure) = key
        except (TypeError, ValueError):  # another Numba's layout: its own key
            return key
        return (signature, machine, ("numbabn kernel sources", closure))

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        data = self._load_guarded(sig, target_context)
        if data is None and self.fallback is not None:
            data = self.fallback._load_guarded(sig, target_context)
        if data is None:
            _notice(f"cached in {self.cache_path}" if self.writable else f"not cached: {self.cache_path} is read-only")
            if self.on_miss is not None:
                self.on_miss()
        return data

    def _load_guarded(self, sig: Any, target_context: Any) -> Any:
        """The cached entry of ``sig``, or None (absent, or corrupted: warned once and,
        where the cache can be written, dropped so that the recompiled entry replaces it)."""
        try:
            return self._load_only(sig, target_context)
        except Exception as exc:  # truncated/garbage pickle, bad object code, I/O error
            _warn_once(
                ("load", self.cache_path),
                f"numbabn: ignoring a corrupted kernel cache entry in {self.cache_path} "
                f"({type(exc).__name__}: {exc}); recompiling it",
            )
            try:
                self.flush()  # drops the index: the recompiled entry replaces it
            except OSError:
                pass
            return None

    def _load_only(self, sig: Any, target_context: Any) -> Any:
        # Numba's Cache.load_overload first runs target_context.refresh(), which imports
        # every lowering registry of Numba (and SciPy's BLAS through numba.np.linalg):
        # about 0.6 s of a warm first call. Rebuilding cached object code needs only
        # the runtime (NRT) that the kernels link against; a later compile still
        # refreshes (Numba's compiler does that itself). If a Numba release drops the
        # hook, fall back to the full path.
        load = getattr(self, "_load_overload", None)
        if load is None:
            return super().load_overload(sig, target_context)
        rtsys.initialize(target_context)
        return load(sig, target_context)

    def save_overload(self, sig: Any, data: Any) -> None:
        try:
            super().save_overload(sig, data)
        except Exception as exc:  # disk full, permissions changed, ...
            _count_unsaved()
            _warn_once(
                ("save", self.cache_path),
                f"numbabn: could not write the kernel cache in {self.cache_path} "
                f"({type(exc).__name__}: {exc}); a kernel that cannot be written there is compiled "
                "in memory only, for this process (this warning is shown once)",
            )


class _ReadOnlyCache(_GuardedCache):
    """A cache directory this process can read but not write: its entries load, and a
    kernel missing there is compiled in memory for this process (warned once)."""

    writable = False

    def save_overload(self, sig: Any, data: Any) -> None:
        _count_unsaved()
        _warn_once(
            "read-only",
            f"numbabn: the kernel cache in {self.cache_path} is read-only: kernels found there are loaded, "
            "others are compiled in memory for this process (run `numbabn warmup` with write access to fill "
            "it; a writable NUMBA_CACHE_DIR caches them there instead, and then only there)",
        )


class _NoCache(NullCache):
    """No cache location at all: every process compiles (and says so once)."""

    def load_overload(self, sig: Any, target_context: Any) -> Any:
        _notice("not cached: no writable cache location")

    def save_overload(self, sig: Any, data: Any) -> None:
        _count_unsaved()


# Kernel specialisations compiled but not saved to disk in this process: what
# ``numbabn warmup`` checks before saying it is done. (Saves run under _lock.)
_unsaved = 0


def _count_unsaved() -> None:
    global _unsaved
    _unsaved += 1


def unsaved() -> int:
    """How many kernel specialisations this process compiled without saving them."""
    return _unsaved


class Kernel:
    """A kernel's Python function plus its compiled specialisations, one Numba
    dispatcher per signature, each compiled eagerly and closed to further
    compilation (so a call can never compile behind the driver's back)."""

    def __init__(self, fn: Callable[..., Any], fastmath: bool | set[str]) -> None:
        self.py_func = fn
        self.name = fn.__name__
        self.fastmath = fastmath
        self._specs: dict[tuple[Any, ...], Any] = {}

    def specialize(self, signature: tuple[Any, ...], on_miss: Callable[[], Any] | None = None) -> Any:
        """The dispatcher of ``signature`` (a tuple of Numba types), compiled or
        loaded from the disk cache on first request; ``on_miss()`` runs before a
        compile that a writable disk cache could keep (not without one)."""
        disp = self._specs.get(signature)
        if disp is None:
            with _lock:
                disp = self._specs.get(signature)
                if disp is None:
                    require_compiler()
                    disp = njit(nogil=True, fastmath=self.fastmath, error_model="numpy")(self.py_func)
                    disp._cache = _cache_for(self.py_func)  # see the module docstring
                    if isinstance(disp._cache, _GuardedCache) and disp._cache.writable:
                        disp._cache.on_miss = on_miss  # the helper compiles into a cache this process loads
                    disp.compile(signature)
                    disp.disable_compile()
                    self._specs[signature] = disp
        return disp


def require_compiler() -> None:
    """Raise if Numba's compiler is switched off in this process. With
    ``NUMBA_DISABLE_JIT=1`` (how users debug their own Numba code) ``njit`` returns
    the plain Python function, and the kernels cannot run as Python: they are built
    on LLVM intrinsics (``numbabn.kernels.storage``, ``stream``, ``prefetch``). Checked
    before anything is computed, so a call that raises here changes nothing."""
    if numba.config.DISABLE_JIT:
        raise CompilerDisabledError(
            "numbabn's CPU kernels need Numba's compiler, which NUMBA_DISABLE_JIT=1 "
            "(numba.config.DISABLE_JIT) turns off in this process; they cannot run as plain Python. "
            "Unset NUMBA_DISABLE_JIT in the process that calls numbabn"
        )


def _read_only(fn: Callable[..., Any], other_than: str | None = None) -> "_ReadOnlyCache | None":
    """The read-only cache of ``fn`` (module docstring): the first directory of
    :data:`_READABLE` that can be read and holds an index for ``fn``, other than
    ``other_than`` (the writable cache); without ``other_than`` (there is no writable
    cache), failing that the first that can be read at all, so that every kernel of
    the process says the same about its cache; else None."""
    first = None
    for impl in _READABLE_USER_DIR if numba.config.CACHE_DIR else _READABLE:
        try:
            cache = _ReadOnlyCache(fn, impl)
        except RuntimeError:  # not a readable directory
            continue
        if cache.cache_path == other_than:
            continue
        if os.path.exists(cache._cache_file._index_path):
            return cache
        first = first or cache
    return None if other_than is not None else first


def _cache_for(fn: Callable[..., Any]) -> "FunctionCache | NullCache":
    """The disk cache of kernel ``fn``: Numba's writable location, with a read-only
    warmed cache elsewhere as its fallback; or, with no writable location, the
    read-only cache alone; or none (each case after the first warned once)."""
    try:
        cache = _GuardedCache(fn)
    except RuntimeError as exc:  # Numba: "cannot cache function ...: no locator available"
        read_only = _read_only(fn)
        if read_only is not None:
            return read_only
        _warn_once(
            "locator",
            f"numbabn: kernels will not be cached ({exc}); "
            + (
                "NUMBA_CACHE_DIR names a directory that cannot be used: point it at a writable one"
                if os.environ.get("NUMBA_CACHE_DIR")
                else "set NUMBA_CACHE_DIR to a writable directory to cache them"
            ),
        )
        return _NoCache()
    cache.fallback = _read_only(fn, other_than=cache.cache_path)
    return cache


def kernel(fastmath: bool | set[str] = False) -> Callable[[Callable[..., Any]], "Kernel"]:
    """Decorator: a serial, GIL-free Numba kernel compiled per explicit signature
    (:meth:`Kernel.specialize`)."""

    def wrap(fn: Callable[..., Any]) -> Kernel:
        k = Kernel(fn, fastmath)
        _KERNELS.append(k)
        return k

    return wrap


def kernels() -> list["Kernel"]:
    """Every :class:`Kernel` defined so far."""
    return list(_KERNELS)


def cached_entries() -> tuple[int, list[str]]:
    """(number of cached signatures a call could load now, cache directories: the
    writable one first, then read-only ones a warmed cache is loaded from) over all
    kernels. Index files of other source versions (a kernel that sat at another line,
    or a file that changed since: left behind by edits and in-place upgrades) are
    not counted: Numba ignores them, and so does this count, which reads each
    kernel's index as Numba's loader does (an unreadable or stale index counts 0).
    Nor are entries compiled for another CPU (a cache filled on another machine: a
    Docker image built elsewhere, a shared home): Numba's key holds the CPU's name
    and features, which this count compares as its loader does."""
    from numba.core.registry import cpu_target

    codegen = cpu_target.target_context.codegen()  # whose magic tuple (CPU) keys the entries
    count = 0
    dirs: dict[str, bool] = {}  # path -> writable
    for k in _KERNELS:
        caches: list[_GuardedCache] = []
        try:
            caches.append(_GuardedCache(k.py_func))
        except RuntimeError:
            pass
        read_only = _read_only(k.py_func, other_than=caches[0].cache_path if caches else None)
        caches += [read_only] if read_only is not None else []
        loadable = set()  # a signature in both the writable and the read-only cache counts once
        for cache in caches:
            dirs.setdefault(cache.cache_path, cache.writable)
            try:
                index = cache._cache_file._load_index()  # {} when stale or absent
                # an entry whose data file is gone or empty (deleted, or a disk that filled
                # up after the index was written) is recompiled too
                loadable |= {
                    key
                    for key, name in index.items()
                    if _loadable_here(cache, key, codegen) and _has_data(os.path.join(cache.cache_path, name))
                }
            except Exception:  # corrupted: the next call recompiles it
                continue
        count += len(loadable)
    # writable directories first: the one new entries go to
    return count, sorted(dirs, key=lambda path: (not dirs[path], path))


def cache_locations() -> tuple[int, str | None, list[str]]:
    """(signatures a call can load, the directory new kernels are cached in or None,
    the read-only directories warmed entries are loaded from): :func:`cached_entries`
    split by :func:`cache_writable`, as ``numbabn info`` and ``numbabn warmup`` report it."""
    entries, dirs = cached_entries()  # the writable directory first, if there is one
    writable = dirs[0] if dirs and cache_writable() else None
    return entries, writable, dirs[1:] if writable else dirs


def cache_writable() -> bool:
    """Whether new kernels can be saved to a disk cache (else they compile in memory)."""
    if not _KERNELS:
        return False
    try:
        _GuardedCache(_KERNELS[0].py_func)
    except RuntimeError:
        return False
    return True


def _has_data(path: str) -> bool:
    """Whether an entry's data file exists and is not empty (a disk that filled up as
    it was written, or ``truncate -s 0``: counted, it was recompiled all the same).
    What a partly written file holds is known only by loading it, which counting does not."""
    try:
        return os.path.getsize(path) > 0
    except OSError:
        return False


def _loadable_here(cache: Any, key: Any, codegen: Any) -> bool:
    """Whether the index entry ``key`` was compiled for this CPU: Numba's loader looks
    an entry up by ``_index_key`` (signature, CPU name and features, ...). That is a
    private method: should a Numba release change it, every entry counts as loadable
    (as before this check) rather than none, which would make ``numbabn warmup``
    report that nothing was cached."""
    try:
        return bool(cache._index_key(key[0], codegen) == key)
    except (AttributeError, TypeError, IndexError):
        return True
