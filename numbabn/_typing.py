"""Array type aliases of the public signatures (``numpy.typing``).

``FloatArray`` is a NumPy array of any floating dtype (float16/32/64): layers and
kernels check the exact dtype at run time, with an error naming the argument, so the
static type only promises "a floating-point ndarray".
"""

from typing import Any

import numpy as np
from numpy.typing import NDArray

FloatArray = NDArray[np.floating[Any]]
"""An ndarray of float16, float32 or float64."""

AnyArray = Any
"""A NumPy array or, on the CUDA backend, a GPU array (anything with
``__cuda_array_interface__``, e.g. a numba device array): the array arguments of
:mod:`numbabn.functional`, whose kind selects the backend at run time."""
