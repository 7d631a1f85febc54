"""The CUDA side of the benchmark harness (:func:`numbabn.bench.harness.run` with
``backend='cuda'``); imported only then, since it imports ``numba.cuda``.

Inputs, parameters and running statistics are device arrays and the outputs are
preallocated on the device, so no host<->device copy is timed. Each call is timed with
CUDA events (:func:`event_time`); the first call per op (kernel compilation) is
reported as ``first_s``. ``pct_copy`` compares with the device-to-device copy
bandwidth (:func:`device_copy_bandwidth`) measured in the same run. "torch" times
``F.batch_norm`` / ``native_batch_norm_backward`` on CUDA tensors of the same data
(PyTorch must see the GPU); "numpy" times the float64 reference on the host.
"""

import statistics
from collections.abc import Callable, Sequence
from importlib.metadata import version
from typing import Any

import numpy as np
from numba import cuda

from .. import config
from .cases import Case
from .harness import numbabn_ops


def event_time(fn: Callable[[], Any], calls: int) -> float:
    """Seconds per call of ``calls`` back-to-back calls of ``fn``, between two CUDA
    events on the default stream (one sample of the harness's median).

    Waiting for the stop event synchronises with the device, so the time covers every
    kernel the calls launched; the GPU is idle when the start event is recorded, so
    host-side launch overhead inside the calls counts too.
    """
    start, stop = cuda.event(), cuda.event()
    start.record()
    for _ in range(calls):
        fn()
    stop.record()
    stop.synchronize()
    return start.elapsed_time(stop) / 1e3 / calls  # elapsed_time: milliseconds


MIN_COPY_BYTES = 256 << 20  # several times any GPU's L2 (an H200 has 60 MB)
COPIES_PER_SAMPLE = 8


def device_copy_bandwidth(nbytes: int, repeats: int = 20) -> float:
    """Device-to-device copy bandwidth in GB/s, the speed limit of memory-bound kernels.

    Copies ``b = max(nbytes, MIN_COPY_BYTES)`` bytes between two device buffers:
    ``repeats`` samples (after one warm-up copy), each COPIES_PER_SAMPLE back-to-back
    copies between two CUDA events, and returns ``2*b / median time per copy / 1e9``:
    a copy reads and writes ``b``, counted like the bytes moved by the batch-norm
    kernels (each value read or written once). One copy of 64 MiB per sample, as this probe timed
    until the first real GPU run, measured 540 to 870 GB/s on an H200 (4.8 TB/s by
    its datasheet): the host's call and event overhead per copy, not the memory.
    Back-to-back copies queue on the device, so that overhead overlaps them.
    Raises RuntimeError under the CUDA simulator (its timings mean nothing).
    """
    if cuda.config.ENABLE_CUDASIM:  # type: ignore[attr-defined]  # set from the environment at import
        raise RuntimeError("device_copy_bandwidth: refusing to time the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
    if isinstance(nbytes, bool) or not isinstance(nbytes, (int, np.integer)) or nbytes <= 0:
        raise ValueError(f"device_copy_bandwidth: nbytes must be a positive int, got {nbytes!r}")
    if isinstance(repeats, bool) or not isinstance(repeats, (int, np.integer)) or repeats <= 0:
        raise ValueError(f"device_copy_bandwidth: repeats must be a positive int, got {repeats!r}")
    size = max(int(nbytes), MIN_COPY_BYTES)
    src = cuda.device_array(size, np.uint8)
    dst = cuda.device_array(size, np.uint8)
    dst.copy_to_device(src)
    start = cuda.event()
    stop = cuda.event()
    seconds = []
    for _ in range(repeats):
        start.record()
        for _ in range(COPIES_PER_SAMPLE):
            dst.copy_to_device(src)
        stop.record()
        stop.synchronize()
        seconds.append(cuda.event_elapsed_time(start, stop) / 1e3 / COPIES_PER_SAMPLE)
    return 2 * size / statistics.median(seconds) / 1e9


class CUDABackend:
    """Strategy for device arrays (module docstring)."""

    name = "cuda"
    torch_device = "cuda"
    threading_layer = None
    sync = staticmethod(cuda.synchronize)
    sample = staticmethod(event_time)
    min_sample_s = 0.0  # CUDA events time one call exactly; the simulator's are fake

    def __init__(self, compare: Sequence[str]) -> None:
        if cuda.config.ENABLE_CUDASIM:  # type: ignore[attr-defined]  # (see above)
            raise RuntimeError("cuda benchmark: refusing to time the CUDA simulator (NUMBA_ENABLE_CUDASIM=1)")
        if not cuda.is_available():
            raise RuntimeError("cuda benchmark: no CUDA GPU is available")
        self.torch_threads = None
        if "torch" in compare:
            import torch

            if not torch.cuda.is_available():
                raise RuntimeError(
                    f"cuda benchmark: compare='torch' needs a PyTorch that sees the GPU (torch {torch.__version__})"
                )
            self.torch_threads = torch.get_num_threads()
        self.threads = config.CUDA_THREADS

    def where(self) -> dict[str, Any]:
        return {"device": cuda.get_current_device().name}

    def versions(self) -> dict[str, str]:
        return {"numba": version("numba"), "numba_cuda": version("numba-cuda")}

    def copy_bandwidth(self, nbytes: int) -> float:
        return device_copy_bandwidth(nbytes)

    def ops(self, case: Case, *host: Any) -> dict[str, Callable[[], Any]]:
        """Device copies of the host arrays, preallocated outputs; synchronised so the
        setup time includes compiling the forward kernels."""
        x, dy, gamma, beta, rm, rv = (cuda.to_device(a) for a in host)
        ops = numbabn_ops(
            case, x, gamma, beta, dy, rm, rv, "cuda", y=cuda.device_array_like(x), dx=cuda.device_array_like(x)
        )
        cuda.synchronize()
        return ops
