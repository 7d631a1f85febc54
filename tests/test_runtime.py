"""The kernel runtime as users meet it: fork pools, Python threads, the disk cache,
specialisations, overflow, thread settings (issue 11).

Cache tests run in fresh processes with their own ``NUMBA_CACHE_DIR``, so they see
an empty cache whatever this process has compiled.
"""

import itertools
import json
import multiprocessing
import os
import pickle
import shutil
import subprocess
import sys
import textwrap
import threading
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import numbabn
from numbabn import _buffers, _jit, config
from numbabn.kernels import reference as R

# A script run in a fresh process: one float32 NCHW forward + backward, results
# pickled to stdout so the parent can compare them.
_SCRIPT = textwrap.dedent("""
    import pickle, sys
    import numpy as np
    import numbabn
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 6)).astype(np.float32)
    y, ctx = numbabn.batch_norm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32))
    dx = numbabn.batch_norm_backward(y * 0.5, ctx)[0]
    sys.stdout.buffer.write(pickle.dumps((y, dx)))
""")


def _fresh(cache_dir, script=_SCRIPT, **env):
    full = {k: v for k, v in os.environ.items() if k != "NUMBABN_QUIET"}
    full.update(NUMBA_CACHE_DIR=str(cache_dir), **env)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, env=full, timeout=600)


def _expected():
    x = np.random.default_rng(0).standard_normal((4, 3, 5, 6)).astype(np.float32)
    y, ctx = numbabn.batch_norm_forward(x, np.ones(3, np.float32), np.zeros(3, np.float32))
    return y, numbabn.batch_norm_backward(y * 0.5, ctx)[0]


def _same(result, expected):
    assert result.returncode == 0, result.stderr.decode()
    for a, b in zip(pickle.loads(result.stdout), expected, strict=True):
        assert np.array_equal(a, b)


# ------------------------------------------------------------------ disk cache


_FLAGS_SCRIPT = textwrap.dedent("""
    import json, re
    import numpy as np
    from numba.core.registry import CPUDispatcher
    from numbabn.kernels import cpu, cpu_driver, stream
    # the fast-math kernels first: each helper compiles inside one of them
    ncl, tiles, mc = (cpu_driver.specs(np.dtype(np.float32), k) for k in ("ncl", "tiles", "mc"))
    for k in (ncl, tiles, mc):
        k.stats, k.grad_sums
    ncl.apply, ncl.grad_apply, mc.apply, mc.grad_apply, ncl.coef, ncl.grad_coef
    flag = re.compile(r"\\b(fadd|fsub|fmul|fdiv|frem|fneg|fcmp|call)\\b[^\\n]*"
                      r"\\b(fast|reassoc|contract|nnan|ninf|nsz|arcp|afn)\\b")
    seen, flagged = [], []
    for mod in (cpu, stream):
        for name, f in vars(mod).items():
            if isinstance(f, CPUDispatcher) and f.targetoptions.get("inline") != "always" and f.signatures:
                seen.append(name)
                flagged += [name for ir in f.inspect_llvm().values() if flag.search(ir)]
    print(json.dumps([seen, flagged]))
""")


def test_helpers_keep_no_fast_math_flags_whichever_kernel_compiles_them_first(tmp_path):
    """The element helpers (shared by every kernel, compiled once per process) must not
    take the fast-math flags of the reduction whose compile first needs them (Numba's
    default, inherit_if_not_set): until they stated fastmath=False, the normalise pass
    gave other bits (in 17 % of the outputs) in a process that had compiled the
    gradient sums first, or whose cache entry came from one. A fresh process (empty
    cache: everything compiles) compiles the reductions first; no helper's machine code
    may carry a fast-math flag (those of the reductions' own loops are in the kernels)."""
    full = {**os.environ, "NUMBA_CACHE_DIR": str(tmp_path), "NUMBABN_COMPILE_AHEAD": "0"}
    res = subprocess.run([sys.executable, "-c", _FLAGS_SCRIPT], capture_output=True, env=full, timeout=600)
    assert res.returncode == 0, res.stderr.decode()
    seen, flagged = json.loads(res.stdout.decode().strip().splitlines()[-1])
    assert {"_normalise", "_masked", "_gd", "_dx", "_fold_sums", "_fold_tile", "write"} <= set(seen)
    assert flagged == []


@pytest.fixture(scope="module")
def populated(tmp_path_factory):
    """A cache filled by one cold process, and what that process printed."""
    cache = tmp_path_factory.mktemp("kernel-cache")
    first = _fresh(cache)
    _same(first, _expected())
    return cache, first.stderr.decode()


def _copy(cache, tmp_path):
    shutil.copytree(cache, tmp_path / "cache")
    return tmp_path / "cache"


def test_compile_notice_once_then_cached(populated):
    cache, err = populated
    notes = [line for line in err.splitlines() if line.startswith("numbabn: compiling")]
    assert len(notes) == 1 and str(cache) in notes[0]
    warm = _fresh(cache)  # loads from the cache: nothing to say
    _same(warm, _expected())
    assert warm.stderr == b""


def test_a_cache_warmed_by_plain_python_serves_python_OO(populated, tmp_path):
    """``python -OO`` (PYTHONOPTIMIZE=2, common in Docker images) strips docstrings,
    which changes every kernel's bytecode, part of Numba's cache key: -OO processes
    compiled everything again beside the plain entries (on a read-only install: in
    memory, every time). Both now find the same entries."""
    cache = _copy(populated[0], tmp_path)
    optimised = _fresh(cache, PYTHONOPTIMIZE="2")
    _same(optimised, _expected())
    assert optimised.stderr == b""


def test_corrupted_cache_recompiles_warns_once_and_heals(populated, tmp_path):
    cache = _copy(populated[0], tmp_path)
    files = [p for p in cache.rglob("*") if p.suffix in (".nbi", ".nbc")]
    assert files
    for p in files:  # truncate every index and data file
        p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])
    hurt = _fresh(cache, NUMBABN_QUIET="1")  # quiet: no compile notice, warnings stay
    _same(hurt, _expected())
    err = hurt.stderr.decode()
    assert err.count("CacheWarning") == 1 and "corrupted kernel cache" in err
    assert "numbabn: compiling" not in err
    healed = _fresh(cache)  # the recompiled entries were saved
    _same(healed, _expected())
    assert healed.stderr == b""


def test_garbage_cache_files_recompile(populated, tmp_path):
    cache = _copy(populated[0], tmp_path)
    for p in cache.rglob("*.nbc"):
        p.write_bytes(b"not a pickle at all" * 10)
    _same(_fresh(cache), _expected())


_COUNT = "from numbabn import _jit; import numbabn.backends.cpu; print(_jit.cached_entries()[0])"


def test_cache_count_skips_index_files_of_other_sources(populated, tmp_path):
    """``numbabn info``/``warmup`` count the signatures this numbabn can load: not index
    files left by other versions of the source (a kernel that moved to another line
    after an upgrade or edit, or whose file changed), which Numba ignores. They used
    to be counted (a working copy showed 299 entries where 61 were loadable)."""
    cache = _copy(populated[0], tmp_path)

    def count():
        result = _fresh(cache, _COUNT)
        assert result.returncode == 0, result.stderr.decode()
        return int(result.stdout)

    indexes = sorted(cache.rglob("*.nbi"))
    assert count() == len(indexes) == 6  # float32 NCHW forward + backward: six kernels, one signature each
    for p in indexes:  # the same kernels, as if they had been at line 1 of an older file
        shutil.copy(p, p.with_name(p.name.split("-")[0] + "-1.py" + p.name.split(".py")[1]))
    assert count() == 6
    with open(indexes[0], "rb") as f:  # one index written for other source bytes
        version = pickle.load(f)
        stamp, overloads = pickle.loads(f.read())
    with open(indexes[0], "wb") as f:
        pickle.dump(version, f)
        f.write(pickle.dumps((("another source", stamp), overloads)))
    assert count() == 5


def test_cache_count_skips_entries_whose_data_file_is_gone(populated, tmp_path):
    """An index entry whose data file was deleted, or never written (a disk that filled
    up after the index), is recompiled by the next call: ``numbabn info`` must not
    count it."""
    cache = _copy(populated[0], tmp_path)
    data = sorted(cache.rglob("*.nbc"))
    data[0].unlink()
    result = _fresh(cache, _COUNT)
    assert result.returncode == 0, result.stderr.decode()
    assert int(result.stdout) == len(data) - 1 == 5
    data[1].write_bytes(b"")  # truncated to nothing: recompiled as well
    result = _fresh(cache, _COUNT)
    assert int(result.stdout) == len(data) - 2


def test_an_edit_of_an_inlined_module_invalidates_the_cached_kernels(populated, tmp_path):
    """Numba stamps an entry with its kernel's own file; the kernels also inline
    numbabn.kernels.storage and .stream, so an upgrade that changed only one of those
    used to run the old machine code from the cache (a fix to the streaming stores
    did not take effect until the cache was cleared)."""
    cache = _copy(populated[0], tmp_path)
    edited = "from numbabn import _jit; _jit._dependency_stamp = lambda: 'edited'; " + _COUNT.split("; ", 1)[1]
    for script, expected in ((_COUNT, 6), (edited, 0)):
        result = _fresh(cache, script)
        assert result.returncode == 0, result.stderr.decode()
        assert int(result.stdout) == expected


# Channels-last float64 with fused ReLU, its backward, and eval of float32 input with
# float64 running statistics: kernels the float32 NCHW script does not load.
_VARIANTS = textwrap.dedent("""
    import pickle, sys
    import numpy as np
    import numbabn
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 6)) * 3 + 1
    g, b = rng.standard_normal(6), rng.standard_normal(6)
    y, ctx = numbabn.batch_norm_forward(x, g, b, activation="relu")
    dx, dg, db = numbabn.batch_norm_backward(np.cos(x), ctx)
    x32 = x.astype(np.float32)
    rm, rv = np.linspace(-1, 1, 6), np.linspace(0.5, 2, 6)
    ye, _ = numbabn.batch_norm_forward(x32, None, None, running_mean=rm, running_var=rv,
                                       training=False)
    sys.stdout.buffer.write(pickle.dumps((y, dx, dg, db, ye)))
    sys.stderr.write("linalg loaded\\n" if "numba.np.linalg" in sys.modules else "")
""")


def test_warm_process_loads_every_variant_without_compiling(tmp_path):
    cold = _fresh(tmp_path, _VARIANTS)
    assert cold.returncode == 0, cold.stderr.decode()
    y, dx, dg, db, ye = pickle.loads(cold.stdout)
    rng = np.random.default_rng(1)
    x = rng.standard_normal((40, 6)) * 3 + 1
    g, b = rng.standard_normal(6), rng.standard_normal(6)
    ry = R.forward(x, g, b, relu=True)[0]
    rdx, rdg, rdb = R.backward(np.cos(x), x, g, b, relu=True)
    np.testing.assert_allclose(y, ry, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, rdx, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(dg, rdg, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(db, rdb, rtol=1e-10, atol=1e-12)
    rm, rv = np.linspace(-1, 1, 6), np.linspace(0.5, 2, 6)
    np.testing.assert_allclose(ye, (x.astype(np.float32) - rm) / np.sqrt(rv + 1e-5), rtol=1e-5, atol=1e-5)
    warm = _fresh(tmp_path, _VARIANTS)
    assert warm.returncode == 0, warm.stderr.decode()
    # Nothing compiled, nothing said, and Numba's compiler registries (which import
    # SciPy's BLAS) were never loaded: a warm first call only rebuilds object code.
    assert warm.stderr == b""
    for a, b_ in zip(pickle.loads(warm.stdout), pickle.loads(cold.stdout), strict=True):
        assert np.array_equal(a, b_)


# Unwritable as this process sees it (the tests may run as root, whom permissions do
# not stop): Numba's locators test a directory by writing a temporary file into it.
_UNWRITABLE = textwrap.dedent("""
    import numba.core.caching as c
    def unwritable(self):
        raise PermissionError(13, "Permission denied", self.get_cache_path())
    c._CacheLocator.ensure_cache_path = unwritable
""")

# A float64 eval call: kernels the populated cache (float32 training) does not hold.
_FLOAT64_EVAL = textwrap.dedent("""
    x = np.random.default_rng(0).standard_normal((6, 3)) * 2 + 1
    rm, rv = np.array([0.5, -1.0, 2.0]), np.array([1.0, 4.0, 0.25])
    y64, _ = numbabn.batch_norm_forward(x, None, None, running_mean=rm, running_var=rv, training=False)
    assert np.allclose(y64, (x - rm) / np.sqrt(rv + 1e-5))
""")


def _listing(path):
    return sorted((str(p.relative_to(path)), p.stat().st_size, p.stat().st_mtime_ns) for p in path.rglob("*"))


def test_a_warmed_cache_that_cannot_be_written_is_still_loaded(populated, tmp_path):
    """``numbabn warmup`` in a Docker build (as root), then a non-root user or a
    read-only file system: Numba's locators refuse a directory they cannot write, and
    every process compiled again, silently when a home was writable. Now the warmed
    entries load (nothing compiled, nothing said, nothing written); a kernel missing
    from the cache compiles in memory, with one warning and a notice that says why."""
    cache = _copy(populated[0], tmp_path)
    before = _listing(cache)
    warm = _fresh(cache, _UNWRITABLE + _SCRIPT)
    _same(warm, _expected())
    assert warm.stderr == b"", warm.stderr.decode()
    missing = _fresh(cache, _UNWRITABLE + _SCRIPT.replace("sys.stdout", _FLOAT64_EVAL + "sys.stdout"))
    _same(missing, _expected())
    err = missing.stderr.decode()
    assert err.count("CacheWarning") == 1 and "is read-only: kernels found there are loaded" in err, err
    assert f"not cached: {cache}" in err and "is read-only" in err.splitlines()[0], err
    assert _listing(cache) == before
    # numbabn info / warmup count what loads from it, and start no compile helper
    count = (
        "import json; from numbabn import _jit; import numbabn.backends.cpu\n"
        "print(json.dumps([*_jit.cached_entries(), _jit.cache_writable()]))"
    )
    read_only, writable = (json.loads(_fresh(cache, prefix + count).stdout) for prefix in (_UNWRITABLE, ""))
    assert read_only[0] == writable[0] > 0  # the same entries, counted
    assert read_only[1] == writable[1] and all(d.startswith(str(cache)) for d in read_only[1])
    assert read_only[2] is False and writable[2] is True  # no compile helper: it could save nothing


def _default_locations(script, xdg, **env):
    """A fresh process with Numba's default cache locations (no NUMBA_CACHE_DIR), its
    user-wide one under ``xdg`` (XDG_CACHE_HOME)."""
    full = {k: v for k, v in os.environ.items() if k not in ("NUMBABN_QUIET", "NUMBA_CACHE_DIR")}
    full.update(XDG_CACHE_HOME=str(xdg), NUMBABN_COMPILE_AHEAD="0", **env)
    return subprocess.run([sys.executable, "-c", script], capture_output=True, env=full, timeout=600)


def test_a_warmed_user_wide_cache_is_found_past_a_package_pycache_without_one(tmp_path):
    """``USER app; RUN numbabn warmup`` (site-packages owned by root: the warmup fills
    the user-wide cache), then ``docker run --read-only``: the package's __pycache__
    exists (pip byte-compiles) but holds no kernel index, and the user-wide cache was
    never looked at. (The package's own __pycache__ stands in as an empty directory.)"""
    xdg, empty = tmp_path / "xdg", tmp_path / "pycache"
    empty.mkdir()
    not_in_tree = "import numba.core.caching as c; c.InTreeCacheLocator.from_function = classmethod(lambda *a: None)\n"
    warm = _default_locations(not_in_tree + _SCRIPT, xdg)
    _same(warm, _expected())
    assert list(xdg.rglob("*.nbi")), warm.stderr.decode()
    pycache = f"from numbabn import _jit; _jit._ReadableInTree.get_cache_path = lambda self: {str(empty)!r}\n"
    read_only = _default_locations(_UNWRITABLE + pycache + _SCRIPT, xdg)
    _same(read_only, _expected())
    assert read_only.stderr == b"", read_only.stderr.decode()


def test_warmup_into_a_read_only_cache_fails(populated, tmp_path):
    """A warmup that finds the cache read-only exits 2 for the variants it had to
    compile (they are not saved), even though the cache holds others."""
    cache = _copy(populated[0], tmp_path)
    script = _UNWRITABLE + "from numbabn.cli import main\nmain(['warmup', '--dtype', 'float64', '--layout', 'mc'])\n"
    result = _fresh(cache, script)
    assert result.returncode == 2, result.stderr.decode()
    assert f"could not be cached (the cache in {cache}" in result.stderr.decode()


def test_a_warmed_cache_elsewhere_is_tried_before_compiling_into_a_writable_one(populated, tmp_path):
    """The same image with a writable home: Numba picks the (empty) user cache, and each
    new container compiled everything into it. The warmed, unwritable cache is now
    tried on a miss there: nothing compiles; what it lacks compiles into the writable
    cache, where the next process finds it."""
    warmed = _copy(populated[0], tmp_path)
    before = _listing(warmed)
    mine = tmp_path / "mine"
    # The readable locator looks in the warmed directory (as in a Docker image: the
    # package's own __pycache__), the writable one is NUMBA_CACHE_DIR.
    script = textwrap.dedent(f"""
        import os
        from numba.core.caching import UserProvidedCacheLocator
        from numbabn import _jit
        class Warmed(_jit._Readable, UserProvidedCacheLocator):
            def __init__(self, py_func, py_file):
                super().__init__(py_func, py_file)
                self._cache_path = os.path.join({str(warmed)!r}, os.path.basename(self._cache_path))
        _jit._READABLE_USER_DIR[:] = [_jit._impl(Warmed)]
    """)
    first = _fresh(mine, script + _SCRIPT)
    _same(first, _expected())
    assert first.stderr == b"", first.stderr.decode()
    assert not list(mine.rglob("*.nbc"))  # everything came from the warmed cache
    extra = _fresh(mine, script + _SCRIPT.replace("sys.stdout", _FLOAT64_EVAL + "sys.stdout"))
    _same(extra, _expected())
    assert f"cached in {mine}" in extra.stderr.decode() and "CacheWarning" not in extra.stderr.decode()
    assert list(mine.rglob("*.nbc"))  # the missing kernels, saved where they can be
    again = _fresh(mine, script + _SCRIPT.replace("sys.stdout", _FLOAT64_EVAL + "sys.stdout"))
    assert again.stderr == b"", again.stderr.decode()
    assert _listing(warmed) == before


def test_warn_at_caller_names_the_callers_line_even_with_a_numba_without_a_file(monkeypatch):
    """A stub or zipped ``numba`` module without ``__file__`` must not turn a warning
    into a TypeError; the warning still names this line."""
    import types

    from numbabn import _warnings

    monkeypatch.setitem(sys.modules, "numba", types.ModuleType("numba"))
    with pytest.warns(UserWarning, match="attributed") as record:
        _warnings.warn_at_caller("attributed", UserWarning)
    assert record[0].filename == __file__


def test_no_writable_cache_location_compiles_in_memory(tmp_path):
    # As in a read-only install with no writable home: Numba finds no cache locator.
    script = (
        "import numba.core.caching as c; c.CacheImpl._locator_classes = []\n"
        "c.UserProvidedCacheLocator.from_function = classmethod(lambda *a: None)\n" + _SCRIPT
    )
    result = _fresh(tmp_path, script)
    _same(result, _expected())
    err = result.stderr.decode()
    assert err.count("CacheWarning") == 1 and "will not be cached" in err
    assert "not cached: no writable cache location" in err
    assert not any(tmp_path.iterdir())


def test_an_unwritable_cache_dir_is_not_replaced_by_the_package_folder(tmp_path):
    """NUMBA_CACHE_DIR set but not writable: compile in memory and warn once. Numba's
    own fallback wrote the entries into the package's __pycache__ (a checkout, or
    site-packages) without a word. (Unwritable here as a path under a regular file:
    the tests may run as root, whom permissions do not stop.)"""
    blocker = tmp_path / "file"
    blocker.write_text("")
    # Numba's next locator would write beside the package; asking it at all fails here
    script = "import numba.core.caching as c; c.InTreeCacheLocator.from_function = classmethod(lambda *a: 1 / 0)\n"
    result = _fresh(blocker / "cache", script + _SCRIPT, NUMBABN_COMPILE_AHEAD="0")
    _same(result, _expected())
    err = result.stderr.decode()
    assert err.count("CacheWarning") == 1 and "will not be cached" in err, err
    # it is set: the advice is to point it elsewhere, not to set it
    assert "NUMBA_CACHE_DIR names a directory that cannot be used" in err, err


def test_a_cache_write_that_fails_warns_once_and_compiles_in_memory(tmp_path):
    """A disk that fills up (or a directory whose permissions change) after Numba chose
    the cache location: every entry fails to save, the calls still give the right
    results, and one warning says what happened, not one per kernel. (An eval call:
    two kernels, the fewest that show "once".)"""
    script = textwrap.dedent("""
        import errno
        import numba.core.caching as c
        import numpy as np
        import numbabn
        def full(*args, **kwargs):
            raise OSError(errno.ENOSPC, "No space left on device")
        c.IndexDataCacheFile.save = full
        x = np.random.default_rng(0).standard_normal((4, 3, 5)).astype(np.float32)
        rm, rv = np.array([0.5, -1, 2], np.float32), np.array([1, 4, 0.25], np.float32)
        y, _ = numbabn.batch_norm_forward(x, None, None, running_mean=rm, running_var=rv, training=False)
        expected = (x - rm[:, None]) / np.sqrt(rv[:, None] + 1e-5)
        print(float(np.abs(y - expected).max()))
    """)
    result = _fresh(tmp_path, script, NUMBABN_COMPILE_AHEAD="0")
    assert result.returncode == 0, result.stderr.decode()
    assert float(result.stdout) < 1e-6
    err = result.stderr.decode()
    assert err.count("CacheWarning") == 1, err
    # attributed to the user's call (the script), not to numbabn's compile machinery
    (where,) = [line for line in err.splitlines() if "CacheWarning" in line]
    assert where.startswith("<string>:11: CacheWarning"), where
    assert "could not write the kernel cache" in err and "No space left on device" in err
    assert "compiled in memory only, for this process" in err
    assert not list(tmp_path.rglob("*.nbc"))


def test_numba_jit_disabled_raises_a_clear_error_before_anything_changes(tmp_path):
    """NUMBA_DISABLE_JIT=1 (how users debug their own Numba code) turns ``njit`` into
    a no-op, and the kernels cannot run as Python: a call says so, naming the switch,
    before it touches the running statistics; ``import numbabn`` still works, and so
    does the CLI's error convention (one line, exit code 2)."""
    script = textwrap.dedent("""
        import numpy as np
        import numbabn
        from numbabn._jit import CompilerDisabledError
        x = np.random.default_rng(0).standard_normal((4, 3, 5, 6)).astype(np.float32)
        rm, rv = np.full(3, 0.5, np.float32), np.full(3, 2.0, np.float32)
        try:
            numbabn.batch_norm_forward(x, None, None, running_mean=rm, running_var=rv)
        except CompilerDisabledError as exc:
            assert isinstance(exc, RuntimeError)
            print(exc)
        else:
            raise AssertionError("no error")
        assert (rm == 0.5).all() and (rv == 2.0).all()
    """)
    result = _fresh(tmp_path, script, NUMBA_DISABLE_JIT="1")
    assert result.returncode == 0, result.stderr.decode()
    assert "NUMBA_DISABLE_JIT" in result.stdout.decode()
    assert not any(tmp_path.iterdir())  # nothing compiled, nothing cached
    for command in (["warmup"], ["bench", "--repeat", "1", "--compare", "none"]):
        result = _fresh(tmp_path, f"from numbabn.cli import main; main({command!r})", NUMBA_DISABLE_JIT="1")
        err = result.stderr.decode().strip().splitlines()
        assert result.returncode == 2 and len(err) == 1, (command, result.stderr.decode())
        assert err[0].startswith("Error: numbabn's CPU kernels need Numba's compiler"), command


# ------------------------------------------------------------------ fork and threads


def _child_forward(seed):
    x = np.random.default_rng(seed).standard_normal((64, 8, 300)).astype(np.float32)
    y, ctx = numbabn.batch_norm_forward(x, None, None)
    return y, numbabn.batch_norm_backward(x, ctx)[0]


def _pool_every_output(monkeypatch, pooled):
    """Hand out every output from numbabn._buffers (whose threshold is 32 MiB)."""
    if pooled:
        monkeypatch.setattr(_buffers, "MIN_BYTES", 0)
        monkeypatch.setattr(_buffers, "_pool", [])


@pytest.mark.parametrize("pooled", [False, True], ids=["fresh outputs", "pooled outputs"])
@pytest.mark.parametrize("serial_max", [10**9, 0])  # calling thread only / thread pool
def test_fork_pool_after_the_parent_used_the_kernels(monkeypatch, serial_max, pooled):
    monkeypatch.setattr(config, "SERIAL_MAX", serial_max)
    _pool_every_output(monkeypatch, pooled)
    with numbabn.limit_threads(2):
        expected = [_child_forward(s) for s in range(4)]  # parent uses kernels (and pool) first
        with multiprocessing.get_context("fork").Pool(2) as pool:
            got = pool.map_async(_child_forward, range(4)).get(timeout=300)
    for (y, dx), (ey, edx) in zip(got, expected, strict=True):
        assert np.array_equal(y, ey) and np.array_equal(dx, edx)


@pytest.mark.parametrize("pooled", [False, True], ids=["fresh outputs", "pooled outputs"])
def test_python_threads_match_serial_calls(rng, monkeypatch, pooled):
    monkeypatch.setattr(config, "SERIAL_MAX", 0)  # every call uses the pool too
    _pool_every_output(monkeypatch, pooled)
    xs = [rng.standard_normal((16, 4, 40)).astype(np.float32) for _ in range(4)]
    g, b = np.full(4, 1.5, np.float32), np.full(4, 0.25, np.float32)

    def once(x):
        y, ctx = numbabn.batch_norm_forward(x, g, b, activation="relu")
        return (y,) + numbabn.batch_norm_backward(x, ctx)

    expected = [once(x) for x in xs]
    failures = []

    def worker(i):
        for _ in range(200):
            for a, e in zip(once(xs[i]), expected[i], strict=True):
                if not np.array_equal(a, e):
                    failures.append(i)
                    return

    with numbabn.limit_threads(2):
        threads = [threading.Thread(target=worker, args=(i,)) for i in range(4)]
        for t in threads:
            t.start()
        for t in threads:
            t.join(timeout=300)
    assert not failures and not any(t.is_alive() for t in threads)


def test_threads_under_numba_workqueue_layer(tmp_path):
    """The abort reported with Numba's workqueue layer: no Numba threading layer is
    involved any more, so 4 Python threads are fine under any NUMBA_THREADING_LAYER."""
    script = textwrap.dedent("""
        import threading, numpy as np, numbabn
        from numbabn import config
        config.SERIAL_MAX = 0
        x = np.random.default_rng(0).standard_normal((64, 8, 100)).astype(np.float32)
        ref = numbabn.batch_norm_forward(x)[0]
        bad = []
        def work():
            for _ in range(50):
                if not np.array_equal(numbabn.batch_norm_forward(x)[0], ref):
                    bad.append(1)
        ts = [threading.Thread(target=work) for _ in range(4)]
        [t.start() for t in ts]; [t.join() for t in ts]
        print("ok" if not bad else "mismatch")
    """)
    result = _fresh(tmp_path, script, NUMBA_THREADING_LAYER="workqueue", NUMBABN_NUM_THREADS="2")
    assert result.returncode == 0 and result.stdout.strip() == b"ok", result.stderr.decode()


# ------------------------------------------------------------------ thread settings


def test_available_cpus_follows_affinity_and_quota():
    from numbabn import _threads

    quota = _threads._cgroup_quota()
    expected = len(os.sched_getaffinity(0))
    assert numbabn.available_cpus() == (expected if quota is None else min(expected, quota))


def _cgroup_tree(root, files):
    for rel, text in files.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(text)


@pytest.mark.parametrize(
    ("proc", "files", "expected"),
    [
        # v2: a service two levels down holds the tightest limit (1.5 CPUs -> 2)
        (
            "0::/system.slice/job.service\n",
            {
                "cpu.max": "max 100000\n",
                "system.slice/cpu.max": "300000 100000\n",
                "system.slice/job.service/cpu.max": "150000 100000\n",
            },
            2,
        ),
        # ... or its parent does
        ("0::/a/b\n", {"a/cpu.max": "100000 100000\n", "a/b/cpu.max": "max 100000\n"}, 1),
        # v1: the cpu controller's hierarchy (a Slurm job), other controllers ignored
        (
            "5:memory:/slurm/job1\n4:cpu,cpuacct:/slurm/job1\n",
            {"cpu/slurm/job1/cpu.cfs_quota_us": "100000\n", "cpu/slurm/job1/cpu.cfs_period_us": "100000\n"},
            1,
        ),
        # a container without its own cgroup namespace: the listed path is not under
        # the mount, whose top is the container's cgroup
        ("0::/docker/abc\n", {"cpu.max": "200000 100000\n"}, 2),
        ("0::/\n", {"cpu.max": "max 100000\n"}, None),
        ("", {}, None),
    ],
)
def test_the_cgroup_quota_is_the_tightest_on_the_processs_path(tmp_path, monkeypatch, proc, files, expected):
    """The quota of the process's own cgroup and its ancestors, not only the mount's top
    directory, where a systemd service, a Slurm job or a nested container has none."""
    from numbabn import _threads

    _cgroup_tree(tmp_path / "fs", files)
    (tmp_path / "proc").write_text(proc)
    monkeypatch.setattr(_threads, "_CGROUP_ROOT", str(tmp_path / "fs"))
    monkeypatch.setattr(_threads, "_PROC_CGROUP", str(tmp_path / "proc"))
    assert _threads._cgroup_quota() == expected


def test_default_threads_follow_a_narrowed_affinity_mask(tmp_path):
    # The CPUs this process may use, not the machine's: a child pinned to one CPU
    # gets one thread by default and still computes the same result.
    script = textwrap.dedent("""
        import os, sys
        os.sched_setaffinity(0, {sorted(os.sched_getaffinity(0))[0]})
        import numbabn
        print(numbabn.available_cpus(), numbabn.get_num_threads())
    """)
    result = _fresh(tmp_path, script)
    assert result.returncode == 0, result.stderr.decode()
    assert result.stdout.split() == [b"1", b"1"]


# A thread makes a first call of numbabn (``x`` given) while the main thread forks
# after ``DELAY`` s; the child makes its own call. Prints whether the thread was still
# busy at the fork (``BUSY``, an expression) and the child's exit status, or "hung".
_FORK_BESIDE_A_THREAD = """
import os, sys, threading, time
import numpy as np
import numbabn
{setup}
x = np.random.default_rng(0).standard_normal((4, 3, 5))
t = threading.Thread(target=lambda: numbabn.batch_norm_forward(x))
t.start()
time.sleep({delay})
busy = {busy}
pid = os.fork()
if pid == 0:
    y, _ = numbabn.batch_norm_forward(x)
    os._exit(0 if np.isfinite(y).all() else 3)
for _ in range(600):  # up to 60 s
    done, status = os.waitpid(pid, os.WNOHANG)
    if done:
        break
    time.sleep(0.1)
else:
    os.kill(pid, 9)
    os.waitpid(pid, 0)
    status = "hung"
t.join()
print(busy, status)
"""


def _fork_beside_a_thread(tmp_path, what, setup="", delay=0.5, busy="t.is_alive()"):
    script = _FORK_BESIDE_A_THREAD.format(setup=setup, delay=delay, busy=busy)
    result = _fresh(tmp_path, script, NUMBABN_COMPILE_AHEAD="0", NUMBABN_QUIET="1")
    assert result.returncode == 0, result.stderr.decode()
    was_busy, status = result.stdout.split()
    assert was_busy == b"True", f"the fork came after the {what}: nothing tested"
    assert status == b"0", status


def test_a_fork_during_another_threads_first_import_gives_a_working_child(tmp_path):
    """``import numbabn`` is lazy: a thread's first call imports numbabn.functional (and
    Numba), holding that module's import lock meanwhile. A child forked then inherited
    the lock held, with no thread left to release it, and its own first call hung for
    ever (a fork pool started beside a background thread's first call). The fork now
    waits for the lazy imports other threads have in progress. (The import is made to
    last a second, by a finder that sleeps while the module's lock is held.)"""
    slow = textwrap.dedent("""
        class Slow:
            def find_spec(self, name, path=None, target=None):
                if name == "numbabn.functional":
                    time.sleep(1.0)  # inside importlib, with the module's lock held
                return None
        sys.meta_path.insert(0, Slow())
    """)
    _fork_beside_a_thread(tmp_path, "import", slow, 0.3, '"numbabn.functional" not in sys.modules')


def test_a_fork_during_another_threads_compile_gives_a_working_child(tmp_path):
    """A thread compiles on a cold cache while the main thread forks: the child used to
    inherit Numba's compiler lock held by a thread it does not have, and its first
    compile waited for ever. The fork now waits for the compile in progress."""
    _fork_beside_a_thread(tmp_path, "compile")


def test_thread_settings(monkeypatch):
    before = numbabn.get_num_threads()
    with numbabn.limit_threads(3):
        assert numbabn.get_num_threads() == 3
    assert numbabn.get_num_threads() == before
    for bad, exc in [(0, ValueError), (-2, ValueError), (1.5, TypeError), (True, TypeError), ("2", TypeError)]:
        with pytest.raises(exc, match="set_num_threads: n must be a positive int"):
            numbabn.set_num_threads(bad)
    assert numbabn.get_num_threads() == before


def test_a_large_thread_count_starts_workers_only_for_the_pieces(monkeypatch):
    """``set_num_threads(2000)`` is allowed (it only oversubscribes), but a call cut
    into 8 pieces must not start 1999 threads that can never get work; the pool
    grows as later calls need more."""
    from numbabn import _threads

    monkeypatch.setattr(_threads, "_pool", None)  # a pool of this test's own
    seen = []
    with numbabn.limit_threads(2000):
        _threads.parallel_for(lambda t0, t1: seen.append((t0, t1)), 8, 10**8)
        assert _threads._pool.size == 7
        _threads.parallel_for(lambda t0, t1: seen.append((t0, t1)), 12, 10**8)
        assert _threads._pool.size == 11
        _threads.parallel_for(lambda t0, t1: seen.append((t0, t1)), 5, 10**8)
        assert _threads._pool.size == 11  # never shrunk
    assert sorted(seen) == sorted([(t, t + 1) for n in (8, 12, 5) for t in range(n)])


def test_idle_workers_keep_no_arrays_of_the_last_call(monkeypatch):
    """A worker waiting for the next job held the last one's arguments: after a
    forward and backward whose results were all dropped, three inputs' worth of
    arrays stayed alive until the next parallel call."""
    import gc
    import weakref

    monkeypatch.setattr(config, "SERIAL_MAX", 1)  # every call of more than one block runs on the pool
    with numbabn.limit_threads(2):
        x = np.random.default_rng(0).standard_normal((64, 3, 32, 32)).astype(np.float32)
        y, ctx = numbabn.batch_norm_forward(x)
        dx, _, _ = numbabn.batch_norm_backward(y, ctx)
        alive = [weakref.ref(a) for a in (x, y, dx)]
        del x, y, ctx, dx
        gc.collect()
        assert [r() is None for r in alive] == [True] * 3


def test_a_call_where_no_thread_can_start_runs_its_pieces_here(monkeypatch, rng):
    """Python 3.12 refuses new threads at interpreter shutdown: an atexit handler's
    first parallel call raised "can't create new thread at interpreter shutdown".
    The call now runs on the calling thread, with the serial call's results."""
    from numbabn import _threads

    def refuse(self):
        raise RuntimeError("can't create new thread at interpreter shutdown")

    x = rng.standard_normal((16, 8, 64, 80)).astype(np.float32)  # above SERIAL_MAX: parallel
    with numbabn.limit_threads(1):
        serial = numbabn.batch_norm_forward(x)[0]
    monkeypatch.setattr(_threads, "_pool", None)  # no worker started yet
    monkeypatch.setattr(threading.Thread, "start", refuse)
    with numbabn.limit_threads(2):
        y, ctx = numbabn.batch_norm_forward(x)
        dx = numbabn.batch_norm_backward(np.ones_like(y), ctx)[0]
    np.testing.assert_array_equal(y, serial)
    assert np.isfinite(dx).all() and _threads._pool.size == 0


def test_pieces_of_a_stalled_worker_are_taken_by_the_caller(monkeypatch):
    """A worker that gets no CPU (another process, PyTorch's spinning OpenMP threads)
    does not hold up a call: the calling thread takes every piece and returns. Here
    the pool never runs its jobs at all."""
    import queue

    from numbabn import _threads

    class StalledPool:
        size = 1
        jobs: queue.SimpleQueue = queue.SimpleQueue()  # nobody takes these

    monkeypatch.setattr(_threads, "_get_pool", lambda workers: StalledPool)
    seen = []
    with numbabn.limit_threads(2):
        call = threading.Thread(target=_threads.parallel_for, args=(lambda t0, t1: seen.append((t0, t1)), 64, 10**7))
        call.start()
        call.join(timeout=30)
    assert not call.is_alive(), "parallel_for waited for a worker that never ran"
    assert seen == list(itertools.pairwise(_threads._guided(64, 2, 1)))  # every piece once, in order
    assert seen[0] == (0, 16) and seen[-1][1] == 64
    assert StalledPool.jobs.qsize() == 1


@pytest.mark.parametrize("threads", [2, 3, 7])
@pytest.mark.parametrize(("blocks", "least"), [(1, 1), (7, 1), (64, 1), (512, 20), (512, 600), (4096, 3)])
def test_pieces_shrink_towards_the_end_and_cover_every_block_once(blocks, least, threads):
    """Guided pieces: each takes 1/(2T) of the blocks left, at least ``least``
    (only the last may hold fewer), so sizes never grow and the last ones are small."""
    from numbabn import _threads

    bounds = _threads._guided(blocks, threads, least)
    sizes = [b - a for a, b in itertools.pairwise(bounds)]
    assert bounds[0] == 0 and bounds[-1] == blocks and all(s > 0 for s in sizes)
    assert all(a >= b for a, b in itertools.pairwise(sizes[:-1]))  # large first
    assert all(s >= least for s in sizes[:-1]) and sizes[-1] <= max(least, blocks // (2 * threads) or 1)
    left = blocks
    for s in sizes[:-1]:
        assert s == max(least, left // (2 * threads))
        left -= s


def test_a_failing_piece_raises_after_every_other_piece_is_done():
    from numbabn import _threads

    done = []

    def kernel(t0, t1):
        if t0 == 0:
            raise FloatingPointError("piece 0")
        done.append(t0)

    with numbabn.limit_threads(2), pytest.raises(FloatingPointError, match="piece 0"):
        _threads.parallel_for(kernel, 64, 10**7)
    assert sorted(done) == list(_threads._guided(64, 2, 1)[1:-1])  # every other piece ran


@pytest.mark.parametrize("when", ["in_a_piece", "waiting"])
def test_ctrl_c_raises_only_once_no_worker_writes_the_arrays(when):
    """Ctrl-C (SIGINT on the main thread) during a parallel call, while the calling
    thread runs a piece or while it waits for a pool worker: the KeyboardInterrupt
    comes once the worker has left the caller's arrays, no thread starts another
    piece after it, and the pool serves the next call."""
    import signal

    from numbabn import _threads

    main = threading.main_thread()
    assert threading.current_thread() is main  # SIGINT goes to the main thread
    # Python's own handler, whatever this process inherited (a background job, or
    # nohup, starts with SIGINT ignored, and Python then installs none).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    worker_in, release = threading.Event(), threading.Event()
    log = []
    piece_time = 0.5 if when == "in_a_piece" else 0.0

    def kernel(t0, t1):
        if threading.current_thread() is main:
            worker_in.wait(30)
            time.sleep(piece_time)
        else:
            worker_in.set()
            release.wait(30)
            time.sleep(0.05)
            log.append("worker left")
        log.append(t0)

    def ctrl_c():
        worker_in.wait(30)
        time.sleep(0.2)
        signal.pthread_kill(main.ident, signal.SIGINT)
        time.sleep(0.3)
        release.set()

    poke = threading.Thread(target=ctrl_c)
    with numbabn.limit_threads(2):
        poke.start()
        try:
            with pytest.raises(KeyboardInterrupt):
                _threads.parallel_for(kernel, 64, 10**7)
            log.append("raised")
        finally:
            poke.join()
            signal.signal(signal.SIGINT, previous)
        assert "worker left" in log and log.index("worker left") < log.index("raised")
        if when == "in_a_piece":  # the worker's piece only: the interrupted one and the rest never started
            assert [t for t in log if isinstance(t, int)] == [16]
        seen = []
        _threads.parallel_for(lambda t0, t1: seen.append((t0, t1)), 64, 10**7)
    assert sorted(seen) == list(itertools.pairwise(_threads._guided(64, 2, 1)))  # the pool serves again


def test_thread_count_from_environment(tmp_path):
    script = "import numbabn; print(numbabn.get_num_threads(), numbabn.available_cpus())"
    env = _fresh(tmp_path, script, NUMBABN_NUM_THREADS="5")
    assert env.stdout.split()[0] == b"5"
    default = _fresh(tmp_path, script)
    threads, cpus = default.stdout.split()
    assert threads == cpus


# ------------------------------------------------------------------ specialisations


def _specialisations():
    return sum(len(k._specs) for k in _jit.kernels())


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_unusual_input_views_compile_nothing_new(rng, dtype):
    x = rng.standard_normal((6, 4, 10)).astype(dtype)
    g, b = np.ones(4, dtype), np.zeros(4, dtype)
    rm, rv = np.zeros(4, dtype), np.ones(4, dtype)

    def both(xi):
        y, ctx = numbabn.batch_norm_forward(xi, g, b, running_mean=rm.copy(), running_var=rv.copy())
        dy = np.ones_like(xi)
        dx = numbabn.batch_norm_backward(dy, ctx)[0]
        ye, _ = numbabn.batch_norm_forward(xi, g, b, running_mean=rm, running_var=rv, training=False)
        return y, dx, ye

    reference = both(x)
    before = _specialisations()
    readonly = x.copy()
    readonly.flags.writeable = False
    ro_stats = rm.copy(), rv.copy()
    for s in ro_stats:
        s.flags.writeable = False
    variants = [readonly, np.asfortranarray(x), x.astype(x.dtype.newbyteorder(">")), np.repeat(x, 2, axis=2)[:, :, ::2]]
    for v in variants:
        for a, e in zip(both(v), reference, strict=True):
            np.testing.assert_array_equal(a, e)
    numbabn.batch_norm_forward(x, g, b, running_mean=ro_stats[0], running_var=ro_stats[1], training=False)
    assert _specialisations() == before


# ------------------------------------------------------------------ numerics


def test_float32_extremes_do_not_overflow():
    x = np.array([[3e38], [-3e38], [3e38]], np.float32)
    y, ctx = numbabn.batch_norm_forward(x, eps=1e-5)
    np.testing.assert_allclose(y[:, 0], [2**-0.5, -(2**0.5), 2**-0.5], rtol=1e-6)
    dx = numbabn.batch_norm_backward(np.array([[1.0], [0.0], [-1.0]], np.float32), ctx)[0]
    assert np.all(np.isfinite(dx))
    ye, _ = numbabn.batch_norm_forward(
        x, running_mean=np.array([1e38], np.float32), running_var=np.array([1e30], np.float32), training=False
    )
    np.testing.assert_allclose(ye[:, 0], (x[:, 0].astype(np.float64) - 1e38) / 1e15, rtol=1e-6)


def test_moments_of_a_near_constant_column_among_many():
    """Block means enter the merge relative to an exact shift: the variance of a
    column of 1 +- 1e-5 fitted with 49 others stays at float64 accuracy."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((10_000, 50)) * rng.uniform(0.1, 100, 50) + rng.uniform(-1e3, 1e3, 50)
    X[:, 7] = 1 + 1e-5 * rng.standard_normal(10_000)
    m = numbabn.moments(X, axis=1)
    exact_mean = np.array([np.sum(c.astype(np.longdouble)) / len(c) for c in X.T])
    exact_m2 = np.array([np.sum((c.astype(np.longdouble) - mu) ** 2) for c, mu in zip(X.T, exact_mean, strict=True)])
    np.testing.assert_allclose(m.m2, exact_m2.astype(np.float64), rtol=5e-14)
    np.testing.assert_allclose(m.mean, exact_mean.astype(np.float64), rtol=1e-15, atol=0)


@pytest.mark.parametrize(
    "shape,chunk",
    [
        ((7, 5, 3), 16),
        ((3, 9000, 2), 64),
        ((2, 3, 100), 16),
        ((5, 4, 40), 16),
        ((1, 5000, 16), 512),
        ((9, 2, 3), 16),
        ((4, 7, 5), 16),
        ((6, 40, 200), 16384),
        ((3, 300, 100), 16384),
        ((2, 5, 9), 16),  # blocks of 2 channels, 18 values: more than the chunk
        ((3, 5, 90), 256),
    ],
)
def test_python_block_count_matches_the_kernel_grid(shape, chunk):
    """ncl_blocks (the driver's count, in Python) and _ncl_block (the kernels' geometry)
    must describe the same grid: the blocks tile every element exactly once, each
    block is one contiguous run of the C-ordered input under 2*chunk values (the
    element-wise kernels buffer a whole block), and the partial rows are exactly
    the block rows used."""
    from numbabn.kernels import cpu

    blocks, rows = cpu.ncl_blocks(shape, chunk)
    seen = np.zeros(shape, np.int64)
    flat = np.arange(np.prod(shape)).reshape(shape)
    used_rows = set()
    for t in range(blocks):
        kn, n0, n1, c0, c1, l0, l1 = cpu._ncl_block.py_func(t, shape, chunk)
        seen[n0:n1, c0:c1, l0:l1] += 1
        assert np.all(np.diff(flat[n0:n1, c0:c1, l0:l1].ravel()) == 1), (t, n0, n1, c0, c1, l0, l1)
        assert (n1 - n0) * (c1 - c0) * (l1 - l0) < 2 * chunk, (t, n0, n1, c0, c1, l0, l1)
        used_rows.add(kn)
    assert np.all(seen == 1)
    assert used_rows == set(range(rows))


@pytest.mark.parametrize(
    "shape,chunk",
    [
        ((7, 5, 3), 16),
        ((3, 9000, 2), 64),
        ((64, 512, 16), 16384),
        ((9, 7, 48), 300),
        ((5, 600, 1), 1000),
        ((2, 3, 40), 1),
    ],
)
def test_short_row_tiles_cover_every_row_once(shape, chunk):
    """The reductions' tiles of short rows (_ncl_tile; tile_blocks counts them in
    Python): every (sample, channel) row in exactly one tile, whole rows, about a
    chunk of values (at least a row, at most a tile's width), and the partial rows
    exactly the tile rows used."""
    from numbabn.kernels import cpu

    N, C, L = shape
    assert L < cpu._SHORT_L
    blocks, rows = cpu.tile_blocks(shape, chunk)
    seen = np.zeros((N, C), np.int64)
    used_rows = set()
    for t in range(blocks):
        kn, n0, n1, c0, c1 = cpu._ncl_tile.py_func(t, shape, chunk)
        seen[n0:n1, c0:c1] += 1
        assert (n1 - n0) * (c1 - c0) * L <= max(chunk, L, cpu._TILE), (t, n0, n1, c0, c1)
        used_rows.add(kn)
    assert np.all(seen == 1)
    assert used_rows == set(range(rows))


@settings(max_examples=300, deadline=None)
@given(
    N=st.integers(1, 9),
    C=st.integers(1, 600),
    L=st.integers(1, 5000),
    chunk=st.integers(1, 20000),
    where=st.lists(st.floats(0, 1, exclude_max=True), min_size=1, max_size=8),
)
def test_every_block_is_one_run_under_two_chunks(N, C, L, chunk, where):
    """The bound the element-wise kernels' whole-block output buffer (2*chunk values)
    relies on, for any shape and chunk: a block is at most one sample's channels (or
    whole samples), so one contiguous run, and holds fewer than 2*chunk values."""
    from numbabn.kernels import cpu

    blocks, _ = cpu.ncl_blocks((N, C, L), chunk)
    for t in {int(f * blocks) for f in where} | {0, blocks - 1}:
        kn, n0, n1, c0, c1, l0, l1 = cpu._ncl_block.py_func(t, (N, C, L), chunk)
        if n1 - n0 > 1:
            assert (c0, c1, l0, l1) == (0, C, 0, L)
        if c1 - c0 > 1:
            assert (l0, l1) == (0, L)
        assert 0 < (n1 - n0) * (c1 - c0) * (l1 - l0) < 2 * chunk


@pytest.mark.parametrize("shape", [(2, 3000, 16), (300, 64)])
def test_many_channels_small_rows_against_reference(rng, shape):
    """The shapes that were quadratic in C (per-block gathers of all channels)."""
    x = rng.standard_normal(shape) + 5.0
    y, ctx = numbabn.batch_norm_forward(x, axis=1)
    yr = R.forward(x, axis=1)[0]
    np.testing.assert_allclose(y, yr, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("C", [1, 3, 64, 100, 129, 255, 256, 300])
@pytest.mark.parametrize("M", [7, 301, 1000])
def test_channels_last_runs_of_rows_against_reference(rng, C, M):
    """The channels-last reductions walk F = 256 // C rows at a time and fold per
    channel: row counts not divisible by F, blocks of R rows (chunk 16384: several
    blocks at M = 1000 for C >= 64), training forward + backward with ReLU and a
    residual against the float64 reference."""
    x = rng.standard_normal((M, C)) * 3.0 + 7.0
    r = rng.standard_normal((M, C))
    dy = rng.standard_normal((M, C))
    gamma, beta = rng.uniform(0.5, 2.0, C), rng.standard_normal(C)
    y, ctx = numbabn.batch_norm_forward(x, gamma, beta, axis=-1, activation="relu", residual=r)
    dx, dgamma, dbeta, dres = numbabn.batch_norm_backward(dy, ctx)
    yr = R.forward(x, gamma, beta, axis=-1, relu=True, residual=r)[0]
    dxr, dgr, dbr, drr = R.backward(dy, x, gamma, beta, axis=-1, relu=True, residual=r)
    np.testing.assert_allclose(y, yr, rtol=1e-12, atol=1e-12)
    np.testing.assert_allclose(dx, dxr, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dgamma, dgr, rtol=1e-10, atol=1e-10)
    np.testing.assert_allclose(dbeta, dbr, rtol=1e-10, atol=1e-10)
    np.testing.assert_array_equal(dres, drr)
    np.testing.assert_allclose(ctx.mean, x.mean(axis=0), rtol=1e-13, atol=1e-13)
