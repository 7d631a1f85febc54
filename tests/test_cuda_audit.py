"""Audit of the CUDA path against the CPU backend: GPU arrays the kernels cannot read
are refused by an error that names the argument, what was expected and what came,
before anything changes.

Without a GPU these run on Numba's CUDA simulator (tests/conftest.py).
"""

import numpy as np
import pytest
from numba import cuda

import numbabn


def host(a):
    return a.copy_to_host() if hasattr(a, "copy_to_host") else np.asarray(a)


@pytest.mark.parametrize("call", ["forward", "moments"])
def test_big_endian_device_input_is_refused_naming_it(call):
    """A big-endian GPU array (``cuda.to_device`` of data read from a file): the host
    path converts such data to the native order, but a device array cannot be
    converted without a kernel reading it, and Numba cannot type a non-native dtype
    for a GPU kernel ("Unsupported array dtype: >f4", deep in the launch; the
    simulator instead ran, updated the running statistics and returned a big-endian
    ``y``, unlike the CPU backend's native one). Refused up front, naming x, with
    nothing changed."""
    xh = np.random.default_rng(0).standard_normal((4, 3)).astype(np.float32)
    big = cuda.to_device(xh.astype(">f4"))
    rm, rv = cuda.to_device(np.zeros(3, np.float32)), cuda.to_device(np.ones(3, np.float32))
    nbt = np.zeros(1, np.int64)
    with pytest.raises(TypeError, match="x is a GPU array in non-native byte order .*>f4"):
        if call == "forward":
            numbabn.batch_norm_forward(big, running_mean=rm, running_var=rv, num_batches_tracked=nbt)
        else:
            numbabn.moments(big)
    np.testing.assert_array_equal(host(rm), 0)
    np.testing.assert_array_equal(host(rv), 1)
    assert int(nbt[0]) == 0


@pytest.mark.parametrize("name", ["gamma", "running_mean"])
def test_non_contiguous_device_parameter_error_says_what_came(name):
    """A strided GPU parameter is refused (GPU arrays are used in place); the error
    names the argument, what is expected and what came (its strides), like x's."""
    x = cuda.to_device(np.ones((4, 3), np.float32))
    strided = cuda.to_device(np.ones(6, np.float32))[::2]
    kw = {name: strided}
    if name == "running_mean":
        kw["running_var"] = cuda.to_device(np.ones(3, np.float32))
    with pytest.raises(ValueError, match=rf"{name} must be a C-contiguous GPU array, got strides \(8,\)"):
        numbabn.batch_norm_forward(x, **kw)
