"""``sample_weight`` as the estimators of :mod:`numbabn.sklearn` accept it: None, a
number (every sample that weight), or one finite weight >= 0 per sample, not all 0.

As scikit-learn's ``_check_sample_weight`` (whose wrong-shape message it keeps), but
negative weights are refused: every estimator here treats a weight as a frequency
(weight k counts a sample k times), which a negative weight is not.
"""

from numbers import Real
from typing import Any

import numpy as np
from numpy.typing import NDArray

from .._checks import check_weights


def check_sample_weight(name: str, sample_weight: Any, n_samples: int) -> NDArray[np.float64] | None:
    """``sample_weight`` of ``n_samples`` samples as (n_samples,) float64, or None;
    a ValueError that names it (and ``name``, the estimator) otherwise."""
    if sample_weight is None:
        return None
    if isinstance(sample_weight, Real) and not isinstance(sample_weight, (bool, np.bool_)):
        try:
            sample_weight = np.full(n_samples, float(sample_weight))
        except OverflowError:  # an int beyond float64
            raise ValueError(f"{name}: sample_weight must be finite, got {sample_weight!r:.80}") from None
    else:  # np.asarray, not np.shape: array-likes such as scikit-learn's _NotAnArray refuse the latter
        try:
            sample_weight = np.asarray(sample_weight)
        except (TypeError, ValueError):  # ragged nested sequences
            raise ValueError(
                f"{name}: sample_weight must be a number or {n_samples} numbers, got {sample_weight!r:.80}"
            ) from None
        if sample_weight.shape != (n_samples,):  # scikit-learn's message
            raise ValueError(
                f"{name}: sample_weight.shape == {sample_weight.shape}, expected ({n_samples},)! "
                "(one weight per sample)"
            )
    w = check_weights(name, sample_weight, n_samples)
    if not w.any():
        raise ValueError(f"{name}: sample_weight is all zero; weights must contain at least one non-zero number")
    return w
