"""Test-suite set-up.

Without a usable GPU the CUDA tests run on Numba's CUDA simulator: the variable
must be set before numba.cuda is first imported, so it is done here, at collection.
"""

import os


def _gpu_present():
    # An explicit NUMBA_ENABLE_CUDASIM wins: "0" asks for the real GPU, and a test run
    # that asked for it must fail on a machine without one, not fall back silently.
    sim = os.environ.get("NUMBA_ENABLE_CUDASIM")
    if sim is not None:
        return sim != "1"
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia/version")


if not _gpu_present():
    os.environ["NUMBA_ENABLE_CUDASIM"] = "1"
    # Small blocks so that several blocks, the tails and the cross-block merge run.
    os.environ.setdefault("NUMBABN_CUDA_THREADS", "32")

# numbabn.torch hands small CPU inputs to PyTorch's own batch norm by default; the
# suite's small inputs are there to test the kernels (tests/test_torch_small_inputs.py
# tests that hand-over with its own thresholds). Spawned processes inherit this.
os.environ.setdefault("NUMBABN_TORCH_NATIVE_BELOW", "0")
os.environ.setdefault("NUMBABN_TORCH_NATIVE_EVAL_BELOW", "0")

import numpy as np  # noqa: E402
import pytest  # noqa: E402

from .helpers import BACKENDS, Backend  # noqa: E402


@pytest.fixture
def rng():
    return np.random.default_rng(12345)


@pytest.fixture(params=BACKENDS)
def backend(request):
    """The backend under test: "cpu", then "cuda" (on Numba's simulator without a GPU)."""
    return Backend(request.param)
