"""``numbabn info``: versions, Numba threading, CUDA, cache directory, layers."""

import json
from typing import Any

import click

from ._common import Settings

_PACKAGES = ("numbabn", "numpy", "numba", "numba-cuda", "scikit-learn", "click", "torch", "matplotlib")


def _versions() -> dict[str, str | None]:
    """Installed versions from package metadata: nothing is imported (torch takes seconds)."""
    from importlib import metadata

    versions: dict[str, str | None] = {}
    for name in _PACKAGES:
        try:
            versions[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            versions[name] = None
    return versions


def _threading() -> dict[str, Any]:
    from numbabn import _threads

    return {
        "layer": "python threads (serial nogil kernels)",
        "threads": _threads.get_num_threads(),
        "available_cpus": _threads.available_cpus(),
    }


def _cuda() -> dict[str, Any]:
    """'gpu' (with the device), 'simulator', 'none' or 'unusable' (a GPU, but numba-cuda
    cannot compile for it here); never raises without a driver."""
    import numba

    if numba.config.ENABLE_CUDASIM:  # type: ignore[attr-defined]  # set from the environment at import
        return {"status": "simulator", "note": "NUMBA_ENABLE_CUDASIM=1: the CUDA backend runs on the CPU, slowly"}
    try:
        from numba import cuda
    except ImportError:
        return {"status": "none", "note": "numba-cuda is not installed"}
    if not cuda.is_available():
        return {"status": "none", "note": "no CUDA driver or GPU found"}
    from numbabn.functional import cuda_compiler_problem

    problem = cuda_compiler_problem()
    if problem:
        return {"status": "unusable", "note": f"a GPU is present, but {problem}"}
    device = cuda.get_current_device()
    free, total = cuda.current_context().get_memory_info()
    return {
        "status": "gpu",
        "device": device.name,
        "compute_capability": list(device.compute_capability),
        "memory_total_bytes": total,
        "memory_free_bytes": free,
    }


def _kernel_cache() -> dict[str, Any]:
    """Where the compiled CPU kernels are cached (asked of Numba's cache locators, so
    NUMBA_CACHE_DIR and the fallbacks for read-only installs are accounted for), how
    many compiled signatures are stored there, and whether a cold training step may
    hand the backward's kernels to a helper process (``numbabn._compile_ahead``)."""
    from numbabn import _compile_ahead, _jit
    from numbabn.backends import cpu  # noqa: F401  (its import defines the kernels)

    entries, writable, read_only = _jit.cache_locations()
    return {
        "dir": writable,  # where new kernels are cached (None: nowhere, compiled in memory)
        "read_only_dirs": read_only,  # warmed caches loaded, not written
        "entries": entries,
        "kernels": len(_jit.kernels()),
        "compile_helper": _jit.cache_writable() and _compile_ahead.enabled(),
    }


def _output_buffers() -> dict[str, int]:
    """The reuse of large outputs (``numbabn._buffers``): its size threshold, its limit
    (``NUMBABN_BUFFER_CACHE_MB``, 0 = off) and what it holds in this process; and the
    size from which outputs may be written with non-temporal stores
    (``NUMBABN_STREAM_MIN_MB``, ``numbabn.kernels.stream``) and whether numbabn times
    them against ordinary stores there (``numbabn._stores``: unless that is set)."""
    from numbabn import _buffers, config

    held, unused = _buffers.pooled_bytes()
    return {
        "min_bytes": _buffers.MIN_BYTES,
        "limit_mib": config.BUFFER_CACHE_MB,
        "held_bytes": held,
        "unused_bytes": unused,
        "stream_min_bytes": config.STREAM_MIN,
        "stream_timed": config.STREAM_AUTO,
    }


def _torch_native_below() -> int:
    """numbabn.torch's modules run PyTorch's batch norm on CPU inputs of fewer values
    (``NUMBABN_TORCH_NATIVE_BELOW``, :mod:`numbabn.torch.modules`)."""
    from numbabn import config

    return config.TORCH_NATIVE_BELOW


def _torch_native_eval_below() -> int:
    """numbabn.torch's modules run PyTorch's batch norm for plain CPU inference of fewer
    values (``NUMBABN_TORCH_NATIVE_EVAL_BELOW``, :mod:`numbabn.torch.modules`)."""
    from numbabn import config

    return config.TORCH_NATIVE_EVAL_BELOW


def _torch_cuda_kernels() -> bool:
    """Whether numbabn.torch's modules run numbabn's CUDA kernels on CUDA tensors
    (``NUMBABN_TORCH_CUDA_KERNELS``; by default they run PyTorch's batch norm)."""
    from numbabn import config

    return config.TORCH_CUDA_KERNELS


def _layers() -> dict[str, str] | None:
    from importlib import import_module

    try:
        registry = import_module("numbabn.registry")
    except ModuleNotFoundError as exc:
        if exc.name != "numbabn.registry":
            raise
        return None
    return registry.available_layers()


def collect() -> dict[str, Any]:
    """Everything ``numbabn info`` reports, as a JSON-serialisable dict."""
    import platform
    import sys

    return {
        "versions": _versions(),
        "python": sys.version.split()[0],
        "executable": sys.executable,
        "platform": platform.platform(),
        "threading": _threading(),
        "cuda": _cuda(),
        "kernel_cache": _kernel_cache(),
        "output_buffers": _output_buffers(),
        "torch_native_below": _torch_native_below(),
        "torch_native_eval_below": _torch_native_eval_below(),
        "torch_cuda_kernels": _torch_cuda_kernels(),
        "layers": _layers(),
    }


def _format_cuda(c: dict[str, Any]) -> str:
    if c["status"] != "gpu":
        return f"{c['status']} ({c['note']})"
    cc = ".".join(map(str, c["compute_capability"]))
    return (
        f"gpu: {c['device']}, compute capability {cc}, "
        f"{c['memory_total_bytes'] / 2**30:.1f} GiB ({c['memory_free_bytes'] / 2**30:.1f} GiB free)"
    )


@click.command(short_help="Versions, threading, CUDA status, kernel cache, layers.")
@click.option("--json", "as_json", is_flag=True, help="Print one JSON object instead of text.")
@click.pass_context
def info(ctx: click.Context, as_json: bool) -> None:
    """Versions, Numba threading, CUDA status, kernel cache and registered layers."""
    data = collect()
    if as_json:
        click.echo(json.dumps(data, indent=2))
        return
    settings = ctx.find_object(Settings) or Settings()
    t, k, ob = data["threading"], data["kernel_cache"], data["output_buffers"]
    lines = [f"{name:<16}{version or 'not installed'}" for name, version in data["versions"].items()]
    lines += [
        f"{'python':<16}{data['python']} ({data['executable']})",
        f"{'platform':<16}{data['platform']}",
        f"{'threading':<16}{t['layer']}, {t['threads']} threads ({t['available_cpus']} CPUs available)",
        f"{'CUDA':<16}{_format_cuda(data['cuda'])}",
        f"{'kernel cache':<16}{k['entries']} compiled signatures of {k['kernels']} kernels, "
        + (f"new ones cached in {k['dir']}" if k["dir"] else "new ones compiled in memory (no writable cache)")
        + (f"; read-only: {', '.join(k['read_only_dirs'])}" if k["read_only_dirs"] else ""),
        f"{'compiling':<16}"
        + (
            "a cold training step compiles the backward's kernels in a helper process (NUMBABN_COMPILE_AHEAD=0: off)"
            if k["compile_helper"]
            else "in the calling process only (no cache to share, one thread, a multiprocessing worker or "
            "one of several local ranks, or NUMBABN_COMPILE_AHEAD=0)"
        ),
        f"{'output buffers':<16}"
        + (
            f"outputs of {ob['min_bytes'] >> 20} MiB and more reuse dropped ones, up to {ob['limit_mib']} MiB kept "
            "(NUMBABN_BUFFER_CACHE_MB=0: off)"
            if ob["limit_mib"]
            else "every output is newly allocated (NUMBABN_BUFFER_CACHE_MB=0)"
        ),
        f"{'':<16}outputs of {ob['stream_min_bytes'] / 2**20:g} MiB and more "
        + (
            "use non-temporal or ordinary stores, whichever times faster on their first calls "
            "(NUMBABN_STREAM_MIN_MB fixes it)"
            if ob["stream_timed"]
            else "are written with non-temporal stores (NUMBABN_STREAM_MIN_MB)"
        ),
    ]
    from numbabn import config

    below = data["torch_native_below"]
    lines.append(
        f"{'numbabn.torch':<16}"
        + (
            f"CPU inputs of fewer than {below} values (channels-last: {config.TORCH_CHANNELS_LAST_FACTOR * below}, "
            f"{config.TORCH_CHANNELS_LAST_FUSED_FACTOR * below} with a fused "
            "ReLU/residual) run PyTorch's batch norm (NUMBABN_TORCH_NATIVE_BELOW)"
            if below
            else "every CPU input runs numbabn's kernels (NUMBABN_TORCH_NATIVE_BELOW=0)"
        )
    )
    eval_below = data["torch_native_eval_below"]
    lines.append(
        " " * 16
        + (
            f"plain CPU inference (no graph, no fused ReLU/residual) of fewer than {eval_below} values "
            "runs PyTorch's batch norm (NUMBABN_TORCH_NATIVE_EVAL_BELOW)"
            if eval_below > below
            else "plain CPU inference: as above (NUMBABN_TORCH_NATIVE_EVAL_BELOW)"
        )
    )
    lines.append(
        " " * 16
        + (
            "CUDA tensors run numbabn's CUDA kernels (NUMBABN_TORCH_CUDA_KERNELS=1)"
            if data["torch_cuda_kernels"]
            else "CUDA tensors run PyTorch's batch norm (NUMBABN_TORCH_CUDA_KERNELS=1: numbabn's kernels)"
        )
    )
    layers = data["layers"]
    if layers is None:
        lines.append(f"{'layers':<16}registry not installed")
    else:
        lines.append(f"{'layers':<16}{len(layers)} registered" + ("" if settings.verbose else ": " + ", ".join(layers)))
        if settings.verbose:
            lines += [f"{'':<16}{name} ({origin})" for name, origin in layers.items()]
    click.echo("\n".join(lines))
