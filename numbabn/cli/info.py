"""``numbabn info``: versions, Numba threading, CUDA, cache directory, layers."""
import json

import click

from ._common import Settings

_PACKAGES = ("numbabn", "numpy", "numba", "numba-cuda", "scikit-learn", "click", "torch", "matplotlib")


def _versions():
    """Installed versions from package metadata: nothing is imported (torch takes seconds)."""
    from importlib import metadata

    versions = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _threading():
    import numba
    from numba.np.ufunc import parallel

    # numba.threading_layer() only answers once the pool is up; this starts it
    # (what Numba does before the first parallel region) without compiling anything.
    parallel._launch_threads()
    return {"layer": numba.threading_layer(), "requested": numba.config.THREADING_LAYER,
            "threads": numba.get_num_threads(), "max_threads": numba.config.NUMBA_NUM_THREADS}


def _cuda():
    """'gpu' (with the device), 'simulator' or 'none'; never raises without a driver."""
    import numba

    import numbabn

    if numba.config.ENABLE_CUDASIM:
        return {"status": "simulator", "note": "NUMBA_ENABLE_CUDASIM=1: the CUDA backend runs on the CPU, slowly"}
    if not numbabn.cuda_available():
        return {"status": "none", "note": "no CUDA driver or GPU found"}
    from numba import cuda

    device = cuda.get_current_device()
    free, total = cuda.current_context().get_memory_info()
    return {"status": "gpu", "device": device.name, "compute_capability": list(device.compute_capability),
            "memory_total_bytes": total, "memory_free_bytes": free}


def _cache_dir():
    """Where Numba caches numbabn's compiled CPU kernels (asked of the kernels themselves,
    so NUMBA_CACHE_DIR and Numba's fallbacks for read-only installs are accounted for)."""
    from numba.core.dispatcher import Dispatcher

    from numbabn.kernels import cpu

    paths = {v._cache.cache_path for v in vars(cpu).values() if isinstance(v, Dispatcher)}
    paths.discard(None)   # kernels compiled without cache=True
    return sorted(paths)[0] if paths else None


def _layers():
    from importlib import import_module

    try:
        registry = import_module("numbabn.registry")
    except ModuleNotFoundError as exc:
        if exc.name != "numbabn.registry":
            raise
        return None
    return registry.available_layers()


def collect():
    """Everything ``numbabn info`` reports, as a JSON-serialisable dict."""
    import platform
    import sys

    return {"versions": _versions(), "python": sys.version.split()[0], "executable": sys.executable,
            "platform": platform.platform(), "threading": _threading(), "cuda": _cuda(),
            "numba_cache_dir": _cache_dir(), "layers": _layers()}


def _format_cuda(c):
    if c["status"] != "gpu":
        return f"{c['status']} ({c['note']})"
    cc = ".".join(map(str, c["compute_capability"]))
    return (f"gpu: {c['device']}, compute capability {cc}, "
            f"{c['memory_total_bytes'] / 2**30:.1f} GiB ({c['memory_free_bytes'] / 2**30:.1f} GiB free)")


@click.command(short_help="Versions, threading, CUDA status, kernel cache, layers.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.pass_context
def info(ctx, as_json):
    """Versions, Numba threading, CUDA status, kernel cache and registered layers."""
    data = collect()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    settings = ctx.find_object(Settings) or Settings()
    t = data["threading"]
    lines = [f"{name:<16}{version or 'not installed'}" for name, version in data["versions"].items()]
    lines += [
        f"{'python':<16}{data['python']} ({data['executable']})",
        f"{'platform':<16}{data['platform']}",
        f"{'threading':<16}{t['layer']} (requested: {t['requested']}), {t['threads']} threads "
        f"(max {t['max_threads']})",
        f"{'CUDA':<16}{_format_cuda(data['cuda'])}",
        f"{'numba cache':<16}{data['numba_cache_dir'] or 'none (kernels are not cached)'}",
    ]
    layers = data["layers"]
    if layers is None:
        lines.append(f"{'layers':<16}registry not installed")
    else:
        lines.append(f"{'layers':<16}{len(layers)} registered" + ("" if settings.verbose else ": " + ", ".join(layers)))
        if settings.verbose:
            lines += [f"{'':<16}{name} ({origin})" for name, origin in layers.items()]
    click.echo("\n".join(lines))
