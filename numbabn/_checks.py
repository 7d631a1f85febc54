"""Argument checks shared by every module: one rule, one message per kind of value.

Each check takes the caller's name ``fn`` (a function or class name, first in the
message), the argument's ``name``, and the value; it returns the value in its
canonical Python type or raises with what was expected and what came. ``bool`` is
never taken for a number (``True`` is an int to Python, not to a user), and NumPy
scalars are taken where Python ones are.
"""

import numbers
from collections.abc import Collection
from math import isfinite
from typing import Any

import numpy as np
from numpy.typing import NDArray


def describe(value: Any) -> str:
    """Short description of what came, for error messages."""
    if hasattr(value, "shape") and hasattr(value, "dtype"):
        return f"{type(value).__name__} of shape {tuple(value.shape)} and dtype {value.dtype}"
    return f"{type(value).__name__} {value!r}"[:120]


def is_int(value: Any) -> bool:
    """An integer (Python or NumPy), not a bool."""
    return isinstance(value, numbers.Integral) and not isinstance(value, (bool, np.bool_))


def is_real(value: Any) -> bool:
    """A finite real number (Python or NumPy), not a bool; an int too large for a
    float is not (math.isfinite raised OverflowError, a message naming nothing)."""
    if not isinstance(value, numbers.Real) or isinstance(value, (bool, np.bool_)):
        return False
    try:
        return isfinite(value)
    except OverflowError:
        return False


def check_int(fn: str, name: str, value: Any, minimum: int = 1, *, error: type[Exception] = ValueError) -> int:
    """An int >= ``minimum``; the message says "a positive int" for ``minimum=1``."""
    if type(value) is int and value >= minimum:
        return value
    if not is_int(value) or value < minimum:
        expected = "a positive int" if minimum == 1 else f"an int >= {minimum}"
        raise error(f"{fn}: {name} must be {expected}, got {value!r}")
    return int(value)


def check_number(
    fn: str,
    name: str,
    value: Any,
    low: float | None = None,
    high: float | None = None,
    *,
    low_open: bool = False,
    high_open: bool = False,
    expected: str | None = None,
) -> float:
    """A finite real number in the interval from ``low`` to ``high`` (None: unbounded;
    ``*_open``: the bound itself excluded). Returns a float. ``expected`` replaces
    the generated description ("a number in [0, 1]", "a number > 0", ...)."""
    ok = (
        is_real(value)
        and (low is None or (value > low if low_open else value >= low))
        and (high is None or (value < high if high_open else value <= high))
    )
    if not ok:
        raise ValueError(f"{fn}: {name} must be {expected or _interval(low, high, low_open, high_open)}, got {value!r}")
    return float(value)


def _interval(low: float | None, high: float | None, low_open: bool, high_open: bool) -> str:
    if high is None:
        return "a finite number" if low is None else f"a number {'>' if low_open else '>='} {low}"
    if low is None:
        return f"a number {'<' if high_open else '<='} {high}"
    return f"a number in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}"


def check_bool(fn: str, name: str, value: Any) -> bool:
    if value is True or value is False:
        return value
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"{fn}: {name} must be a bool, got {describe(value)}")
    return bool(value)


def check_choice(fn: str, name: str, value: Any, choices: Collection[Any]) -> Any:
    """One of ``choices`` (compared with ==); the message lists them."""
    if any(value == c for c in choices if isinstance(c, str) == isinstance(value, str)):
        return value
    listed = ", ".join(repr(c) for c in choices)
    raise ValueError(f"{fn}: {name} must be one of {listed}, got {value!r}")


def check_eps(fn: str, eps: Any) -> float:
    if type(eps) is float and eps > 0 and isfinite(eps):
        return eps
    return check_number(fn, "eps", eps, 0, low_open=True, expected="a finite number > 0")


def check_momentum(fn: str, momentum: Any) -> float | None:
    if momentum is None:
        return None
    if type(momentum) is float and 0.0 <= momentum <= 1.0:
        return momentum
    if not (is_real(momentum) and 0.0 <= momentum <= 1.0):
        raise ValueError(f"{fn}: momentum must be None or a number in [0, 1], got {momentum!r}")
    return float(momentum)


def check_activation(fn: str, activation: Any) -> bool:
    """None or "relu" -> whether a ReLU is fused. A ``str`` subclass (``np.str_``, what
    indexing a NumPy string array gives) is a string like any other."""
    if activation is None:
        return False
    if isinstance(activation, str) and activation == "relu":  # not an array's element-wise ==
        return True
    raise ValueError(f"{fn}: activation must be None or 'relu', got {activation!r}")


def check_moments_value(fn: str, name: str, m: Any) -> None:
    """A :class:`~numbabn.stats.Moments` a caller built: an integer count >= 0, and
    mean and m2 real floating 1-D arrays of one shape with m2 >= 0 (NaN passes:
    it is what a NaN in the data gives)."""
    count = m.count
    if not is_int(count):
        raise TypeError(f"{fn}: {name}.count must be an int (values per channel), got {describe(count)}")
    if count < 0:
        raise ValueError(f"{fn}: {name}.count must be >= 0, got {count}")
    for field in ("mean", "m2"):
        a = getattr(m, field)
        if not isinstance(a, np.ndarray) or a.dtype.kind != "f" or a.ndim != 1:
            raise TypeError(f"{fn}: {name}.{field} must be a 1-D real floating NumPy array, got {describe(a)}")
        if np.ma.is_masked(a):  # a hidden value would still enter the arithmetic
            raise ValueError(f"{fn}: {name}.{field} is a masked array with masked values")
    if m.mean.shape != m.m2.shape:
        raise ValueError(f"{fn}: {name}.mean and {name}.m2 differ in shape ({m.mean.shape} vs {m.m2.shape})")
    if np.any(m.m2 < 0):
        raise ValueError(f"{fn}: {name}.m2 (sum of squared deviations) must be >= 0, got {float(m.m2.min())!r}")


def check_weights(fn: str, value: Any, n: int) -> NDArray[np.float64]:
    """``sample_weight``: n numbers (one per sample), finite and >= 0, as float64
    (an array or anything ``np.asarray`` takes)."""
    try:
        w = np.asarray(value)
    except (TypeError, ValueError):
        w = None
    if w is None or w.shape != (n,) or w.dtype.kind not in "biuf":  # bool: a mask, as scikit-learn takes it
        raise ValueError(f"{fn}: sample_weight must be {n} numbers (one per sample), got {describe(value)}")
    w = w.astype(np.float64)
    finite = np.isfinite(w)
    if not finite.all():
        i = int(np.argmin(finite))
        raise ValueError(f"{fn}: sample_weight must be finite, got {w[i]} at index {i}")
    if (w < 0).any():
        raise ValueError(f"{fn}: sample_weight must be >= 0, got a smallest weight of {w.min()}")
    return w
