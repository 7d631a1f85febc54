"""Shared test helpers: cases, tolerances, finite differences, the backend under test."""

import inspect

import numpy as np
import pytest


def estimator_checks(estimators, expected_failed_checks):
    """scikit-learn's ``parametrize_with_checks`` with the expected failures strict (one
    that passes fails the test) where scikit-learn offers it (``xfail_strict``, 1.8 and
    later); on 1.6 and 1.7, which pyproject allows, they are plain xfails."""
    from sklearn.utils.estimator_checks import parametrize_with_checks

    strict = "xfail_strict" in inspect.signature(parametrize_with_checks).parameters
    return parametrize_with_checks(
        estimators, expected_failed_checks=expected_failed_checks, **({"xfail_strict": True} if strict else {})
    )


# (shape, axis) covering both canonical layouts, L == 1, channels-last, odd sizes.
CASES = [
    ((4, 3, 5, 7), 1),  # NCHW -> ncl
    ((6, 5), 1),  # NC -> mc
    ((3, 4, 9), 1),  # NCL -> ncl
    ((5, 4, 3, 6), -1),  # NHWC -> mc
    ((2, 7, 1), 1),  # L == 1 -> mc
    ((7, 3), 0),  # channel axis first on a matrix
    ((2, 1, 33), 1),  # C == 1
    ((2, 3, 4, 5, 2), 2),  # channel axis in the middle of 5-D
]

TOL = {
    np.float64: dict(rtol=1e-10, atol=1e-11),
    np.float32: dict(rtol=2e-5, atol=2e-5),
    np.float16: dict(rtol=3e-3, atol=3e-3),
}


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


class Backend:
    """One compute backend as the numeric tests see it: ``put`` moves a NumPy input
    to where the backend computes (the GPU for "cuda", unchanged for "cpu"),
    ``host`` brings a result back as a NumPy array, so that a test body is written
    once for both. Under the CUDA simulator "cuda" runs Numba's simulator."""

    def __init__(self, name):
        self.name = name
        self.device = name == "cuda"
        if self.device:
            from numba import cuda

            self._cuda = cuda

    def __repr__(self):
        return f"Backend({self.name!r})"

    def put(self, a):
        """``a`` on the backend's device (None and scalars unchanged)."""
        if self.device and isinstance(a, np.ndarray) and a.ndim:
            return self._cuda.to_device(a)
        return a

    @staticmethod
    def host(a):
        """A NumPy array of ``a`` (device arrays copied back; None unchanged)."""
        return a.copy_to_host() if hasattr(a, "copy_to_host") else a

    def empty(self, shape, dtype):
        """An uninitialised output array of the backend's kind."""
        return self._cuda.device_array(shape, dtype) if self.device else np.empty(shape, dtype)

    def assert_native(self, *arrays):
        """Results are arrays of the backend's kind: NumPy on "cpu", device arrays on "cuda"."""
        from numbabn._layout import is_device_array

        for a in arrays:
            if self.device:
                assert is_device_array(a), type(a)
            else:
                assert isinstance(a, np.ndarray), type(a)

    def force_partitions(self, monkeypatch):
        """Make the kernels split the work finely, so that the multi-part paths
        run on small inputs: 7-element chunks on the CPU, 32 threads per block on CUDA."""
        from numbabn import config

        if self.device:
            monkeypatch.setattr(config, "CUDA_THREADS", 32)
        else:
            monkeypatch.setattr(config, "CHUNK", 7)


BACKENDS = ("cpu", "cuda")


def by_backend(argnames, cpu, cuda):
    """``pytest.mark.parametrize`` over ``backend`` plus ``argnames`` with different
    cases per backend (the CUDA simulator is slow: its cases stay small).
    ``cpu`` and ``cuda`` are lists of value tuples (or single values) for ``argnames``."""
    names = [n.strip() for n in argnames.split(",")]
    params = []
    for name, cases in (("cpu", cpu), ("cuda", cuda)):
        for case in cases:
            values = case if len(names) > 1 else (case,)
            params.append(pytest.param(name, *values))
    return pytest.mark.parametrize(["backend"] + names, params, indirect=["backend"])


def load_sklearn_mlp_weights(ours, theirs):
    """Give a fitted numbabn BN-MLP without batch norm the weights of a fitted
    scikit-learn MLP of the same shape (coefs_ (in, out) -> Linear weights (out, in))."""
    state = {}
    for i, (W, b) in enumerate(zip(theirs.coefs_, theirs.intercepts_, strict=True)):
        state[f"{2 * i}.weight"], state[f"{2 * i}.bias"] = W.T.copy(), b.copy()
    ours._model.load_state_dict(state)


def sgd_settings(**extra):
    """hidden (6,) relu, plain SGD with momentum, no penalty, one full batch of 48 in order:
    the settings under which a numbabn MLP without batch norm, given scikit-learn's
    weights (:func:`load_sklearn_mlp_weights`), steps as scikit-learn's MLP."""
    return dict(
        hidden_layer_sizes=(6,),
        activation="relu",
        solver="sgd",
        alpha=0.0,
        shuffle=False,
        batch_size=48,
        momentum=0.9,
        **extra,
    )
