"""Host-side defaults, read once from environment variables when this module is
first imported: not by ``import numbabn``, but at the first use that needs them (the
first kernel call, ``import numbabn.layers``, the command line).

Integers must parse (and be in range) and switches must be one of 1/true/yes/on or
0/false/no/off, any case; otherwise that import raises ``SettingError`` (a
ValueError) naming the variable: a misspelt setting never silently means something
else. A variable that is unset, empty or only white space takes its default.

Kernels never read these globals (Numba would freeze them at compile time); the
functional layer passes them in as arguments.

``NUMBABN_CHUNK``
    elements per CPU work chunk (default 16384). Results are bit-identical for any
    thread count at a fixed chunk size.
``NUMBABN_SERIAL_MAX``
    inputs of at most this many elements run on the calling thread alone (default
    524288 = 2 MB of float32: below it, sharing the work with a pool thread costs more
    than it saves; measured in the README's "Kernel runtime").
``NUMBABN_CUDA_THREADS``
    threads per CUDA block (default 256; tests use 32).
``NUMBABN_NUM_THREADS``
    CPU kernel threads (default: the CPUs this process may use, see
    ``numbabn.set_num_threads``).
``NUMBABN_QUIET``
    1 (a switch) silences the one-line notice printed before the first kernel compile of a
    process.
``NUMBABN_COMPILE_AHEAD``
    0 stops numbabn from compiling the backward's kernels in a helper process while
    a cold first training forward compiles the forward's (default 1; see
    ``numbabn._compile_ahead``).
``NUMBABN_BUFFER_CACHE_MB``
    MiB of large output buffers (32 MiB and up) kept for reuse once dropped
    (default 256; 0 turns the reuse off; see ``numbabn._buffers``).
``NUMBABN_STREAM_MIN_MB``
    outputs of at least this many MiB are written with non-temporal stores, which
    skip reading the output into the cache first (see ``numbabn.kernels.stream``).
    Unset (the default), outputs of at least the largest CPU cache Linux reports
    (32 MiB where it reports none) use whichever of the two kinds of store timed
    faster on their first calls (``numbabn._stores``).
``NUMBABN_TORCH_NATIVE_BELOW``
    numbabn.torch's modules hand CPU inputs of fewer elements to PyTorch's own
    ``batch_norm`` (default 1048576 = 2**20; 0: every input runs numbabn's kernels).
    Below about that size what numbabn adds around its kernels in a PyTorch call
    (Python, the autograd Function) costs more than they save (README, "Small
    inputs"). SyncBatchNorm never hands over while it synchronizes processes.
    Channels-last inputs (4-D, 5-D) hand over below ``TORCH_CHANNELS_LAST_FACTOR``
    (8) times as many (``TORCH_CHANNELS_LAST_FUSED_FACTOR`` (2) times with a fused ReLU or
    residual), where PyTorch's channels-last kernel is faster.
``NUMBABN_TORCH_NATIVE_EVAL_BELOW``
    the same for plain inference: a call that records no autograd graph, uses the
    running statistics and fuses neither ReLU nor a residual hands CPU inputs of fewer
    elements to PyTorch's ``batch_norm`` (default 8388608 = 2**23; 0: the kernels).
    There both read x and write y once at the memory's pace, and what numbabn adds
    (its threads, Python) made it 0.45-0.89x of PyTorch from 2**20 to 6.4M values; from
    12.8M values up PyTorch's fresh output pages make the kernels 5-7x faster (README,
    "Small inputs"). The eager path only (under torch.compile: the threshold above).
``NUMBABN_TORCH_OPENMP``
    0 makes numbabn.torch run the kernels on numbabn's own threads instead of
    PyTorch's OpenMP team (default 1; see ``numbabn.torch._openmp``).
``NUMBABN_TORCH_CUDA_KERNELS``
    1 makes numbabn.torch's modules run numbabn's CUDA kernels on CUDA tensors
    (default 0: they hand CUDA tensors to PyTorch's own ``batch_norm``, cuDNN's,
    which was 2.3 to 33 times faster on the first GPU measured, an H200; README, "On
    a GPU"). SyncBatchNorm never hands over while it synchronizes processes.
"""

import glob
import os


class SettingError(ValueError):
    """An environment variable numbabn reads holds a value it refuses. (The ``numbabn``
    command prints it as one line; it is raised while this module is imported, so
    the command recognises it by name and module.)"""


def _given(name: str) -> bool:
    """Whether environment variable ``name`` holds a value (not unset, empty or blank)."""
    return bool(os.environ.get(name, "").strip())


def _positive_int(name: str, default: int, least: int = 1, most: int = 1 << 62) -> int:
    if not _given(name):
        return default
    raw = os.environ[name]
    kind = "a positive" if least == 1 else "a non-negative"
    try:
        value = int(raw)
    except ValueError:
        raise SettingError(f"environment variable {name} must be {kind} integer, got {raw!r}") from None
    if value < least:
        raise SettingError(f"environment variable {name} must be {kind} integer, got {raw!r}")
    if value > most:
        raise SettingError(f"environment variable {name} must be at most {most}, got {raw!r}")
    return value


_ON = ("1", "true", "yes", "on")
_OFF = ("0", "false", "no", "off")


def _switch(name: str, default: bool) -> bool:
    """An on/off environment variable: 1/true/yes/on or 0/false/no/off (any case);
    unset or empty: ``default``. Anything else raises, as a bad integer does: a
    ``NUMBABN_COMPILE_AHEAD=false`` read as "not 0" used to leave the switch on."""
    raw = os.environ.get(name, "")
    value = raw.strip().lower()
    if not value:
        return default
    if value in _ON:
        return True
    if value in _OFF:
        return False
    raise SettingError(f"environment variable {name} must be one of {'/'.join(_ON)} or {'/'.join(_OFF)}, got {raw!r}")


def _last_level_cache() -> int:
    """Bytes of the largest cache of CPU 0 in Linux's sysfs, or 32 MiB if unknown."""
    units = {"K": 1 << 10, "M": 1 << 20, "G": 1 << 30}
    largest = 0
    for index in glob.glob("/sys/devices/system/cpu/cpu0/cache/index*/size"):
        try:
            with open(index) as f:
                text = f.read().strip()
            largest = max(largest, int(text[:-1]) * units[text[-1]] if text[-1] in units else int(text))
        except (OSError, ValueError, IndexError):
            continue
    return largest or 32 << 20


CHUNK = _positive_int("NUMBABN_CHUNK", 16384)
SERIAL_MAX = _positive_int("NUMBABN_SERIAL_MAX", 1 << 19)
CUDA_THREADS = _positive_int("NUMBABN_CUDA_THREADS", 256, most=1024)  # CUDA: <= 1024 a block
NUM_THREADS = _positive_int("NUMBABN_NUM_THREADS", 0) if _given("NUMBABN_NUM_THREADS") else None
QUIET = _switch("NUMBABN_QUIET", False)
COMPILE_AHEAD = _switch("NUMBABN_COMPILE_AHEAD", True)
BUFFER_CACHE_MB = _positive_int("NUMBABN_BUFFER_CACHE_MB", 256, least=0, most=1 << 40)
STREAM_MIN = (
    _positive_int("NUMBABN_STREAM_MIN_MB", 0, least=0, most=1 << 40) << 20
    if _given("NUMBABN_STREAM_MIN_MB")
    else _last_level_cache()
)
STREAM_AUTO = not _given("NUMBABN_STREAM_MIN_MB")
TORCH_NATIVE_BELOW = _positive_int("NUMBABN_TORCH_NATIVE_BELOW", 1 << 20, least=0)
TORCH_NATIVE_EVAL_BELOW = _positive_int("NUMBABN_TORCH_NATIVE_EVAL_BELOW", 1 << 23, least=0)
#: Multiples of TORCH_NATIVE_BELOW below which channels-last inputs hand over (measured:
#: README, "Small inputs").
TORCH_CHANNELS_LAST_FACTOR = 8
TORCH_CHANNELS_LAST_FUSED_FACTOR = 2
TORCH_OPENMP = _switch("NUMBABN_TORCH_OPENMP", True)
TORCH_CUDA_KERNELS = _switch("NUMBABN_TORCH_CUDA_KERNELS", False)
