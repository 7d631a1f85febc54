"""Shared test helpers: cases, tolerances, finite differences."""
import numpy as np

# (shape, axis) covering both canonical layouts, L == 1, channels-last, odd sizes.
CASES = [
    ((4, 3, 5, 7), 1),      # NCHW -> ncl
    ((6, 5), 1),            # NC -> mc
    ((3, 4, 9), 1),         # NCL -> ncl
    ((5, 4, 3, 6), -1),     # NHWC -> mc
    ((2, 7, 1), 1),         # L == 1 -> mc
    ((7, 3), 0),            # channel axis first on a matrix
    ((2, 1, 33), 1),        # C == 1
    ((2, 3, 4, 5, 2), 2),   # channel axis in the middle of 5-D
]

TOL = {np.float64: dict(rtol=1e-10, atol=1e-11),
       np.float32: dict(rtol=2e-5, atol=2e-5),
       np.float16: dict(rtol=3e-3, atol=3e-3)}


def param_dtype(dtype):
    return np.float32 if dtype == np.float16 else dtype


def make_inputs(rng, shape, axis, dtype, loc=0.5, scale=2.0):
    C = shape[axis]
    pdt = param_dtype(dtype)
    x = (rng.standard_normal(shape) * scale + loc).astype(dtype)
    gamma = rng.uniform(0.5, 1.5, C).astype(pdt)
    beta = rng.standard_normal(C).astype(pdt)
    return x, gamma, beta


def central_diff(f, x, eps=1e-6):
    """Gradient of the scalar f at x (float64) by central differences."""
    g = np.zeros_like(x)
    flat = x.reshape(-1)
    gf = g.reshape(-1)
    for i in range(flat.size):
        old = flat[i]
        flat[i] = old + eps
        fp = f(x)
        flat[i] = old - eps
        fm = f(x)
        flat[i] = old
        gf[i] = (fp - fm) / (2 * eps)
    return g
