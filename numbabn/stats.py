"""Per-channel moments and their exact merge (Chan, Golub & LeVeque 1979).

(Named stats.py, not moments.py, so it cannot shadow the public function
``numbabn.moments``.)

``Moments(count, mean, m2)`` summarises ``count`` values per channel:
``mean`` and ``m2 = sum((x - mean)**2)`` are float64 arrays of shape ``(C,)``.
Two summaries of disjoint data merge exactly::

    n = na + nb;  delta = mean_b - mean_a
    mean = mean_a + delta*nb/n;  m2 = m2_a + m2_b + delta**2 * na*nb/n

This is what SyncBatchNorm exchanges, what ``partial_fit`` accumulates and what Dask
chunk reductions combine (not (mean, invstd), which loses precision).
"""

from dataclasses import dataclass
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from ._checks import check_moments_value, describe


@dataclass(frozen=True, eq=False)
class Moments:
    """count (int, values per channel), mean and m2 (float64, shape (C,)).

    Compared and hashed by identity, as NumPy arrays cannot give a ``==`` that is
    one bool (compare the fields with ``np.array_equal`` instead)."""

    count: int
    mean: NDArray[np.float64]
    m2: NDArray[np.float64]

    @classmethod
    def empty(cls, channels: int) -> "Moments":
        """The summary of no data: merging with it changes nothing."""
        return cls(0, np.zeros(channels), np.zeros(channels))

    @property
    def channels(self) -> int:
        """Number of channels C (the length of ``mean`` and ``m2``)."""
        return self.mean.shape[0]

    def var(self, ddof: int = 0) -> NDArray[np.float64]:
        """m2 / (count - ddof); NaN where count <= ddof."""
        denom = int(self.count) - ddof  # a NumPy unsigned count would wrap around
        if denom <= 0:
            return np.full(self.channels, np.nan)
        return self.m2 / denom

    def to_array(self) -> NDArray[np.float64]:
        """Pack as one float64 vector [count, mean..., m2...] (for MPI buffers)."""
        return np.concatenate(([float(self.count)], self.mean, self.m2))

    @classmethod
    def from_array(cls, packed: ArrayLike) -> "Moments":
        """Inverse of :meth:`to_array`: a 1-D array of odd length 2C + 1 whose first
        entry is a whole number >= 0 (the count)."""
        packed = np.asarray(packed)
        if packed.dtype.kind not in "iuf":
            raise TypeError(
                f"Moments.from_array: expected real numbers [count, mean (C), m2 (C)], got {describe(packed)}"
            )
        packed = packed.astype(np.float64, copy=False)
        if packed.ndim != 1 or packed.shape[0] % 2 != 1:
            raise ValueError(
                f"Moments.from_array: expected a 1-D array [count, mean (C), m2 (C)] of odd length, "
                f"got shape {packed.shape}"
            )
        count = packed[0]
        if not (np.isfinite(count) and count >= 0 and count == np.floor(count)):
            raise ValueError(
                f"Moments.from_array: the count (entry 0) must be a whole number >= 0, got {float(count)!r}"
            )
        C = (packed.shape[0] - 1) // 2
        return cls(int(count), packed[1 : 1 + C].copy(), packed[1 + C :].copy())


def merge_moments(a: Moments, b: Moments) -> Moments:
    """Exact merge of two :class:`Moments` of disjoint data (Chan et al.); when one
    holds no data (count 0) the other is returned as it is.

    Each must be a valid summary: an int count >= 0, real float mean and m2 of one
    shape (without masked values), m2 >= 0 (a clear error otherwise, before any
    arithmetic). The merge computes in float64 whatever the fields' float type.

    Examples
    --------
    The values 1, 2 and 3, 4 of one channel, summarised apart and merged:

    >>> import numpy as np
    >>> from numbabn import Moments, merge_moments
    >>> a = Moments(2, np.array([1.5]), np.array([0.5]))
    >>> b = Moments(2, np.array([3.5]), np.array([0.5]))
    >>> m = merge_moments(a, b)
    >>> m.count, m.mean, m.var()
    (4, array([2.5]), array([1.25]))
    """
    if not isinstance(a, Moments) or not isinstance(b, Moments):
        raise TypeError(f"merge_moments expects two Moments, got {type(a).__name__} and {type(b).__name__}")
    check_moments_value("merge_moments", "a", a)
    check_moments_value("merge_moments", "b", b)
    if a.channels != b.channels:
        raise ValueError(f"merge_moments: channel counts differ ({a.channels} vs {b.channels})")
    if b.count == 0:
        return a
    if a.count == 0:
        return b
    # Python ints: NumPy integer counts (np.int32, or np.int64 products of shapes at
    # dataset scale) would wrap in na*nb. float64 fields: summaries a caller built in
    # float16 or float32 (e.g. from torch tensors) would overflow or round in the merge.
    f64 = np.float64
    return Moments(
        *chan_merge(
            int(a.count), a.mean.astype(f64), a.m2.astype(f64), int(b.count), b.mean.astype(f64), b.m2.astype(f64)
        )
    )


def chan_merge(
    na: float,
    mean_a: NDArray[np.float64],
    m2_a: NDArray[np.float64],
    nb: float,
    mean_b: NDArray[np.float64],
    m2_b: NDArray[np.float64],
) -> tuple[float, NDArray[np.float64], NDArray[np.float64]]:
    """Chan et al.'s merge of two summaries (count or weight sum, mean, m2) of
    disjoint data, both counts > 0 -> (na + nb, mean, m2). Counts may be Python ints
    (exact ``na*nb``) or float weight sums (:class:`~numbabn.sklearn.BatchNormTransformer`
    with ``sample_weight``, where weight k counts a sample k times)."""
    n = na + nb
    with np.errstate(invalid="ignore"):  # infinite data: see below
        delta = mean_b - mean_a
        mean = mean_a + delta * (nb / n)
        m2 = m2_a + m2_b + delta * delta * (na * nb / n)
        off = ~np.isfinite(delta)
        if off.any():
            # An infinite (or NaN) mean on one side: the weighted mean keeps +-inf where
            # Chan's update gives inf + (finite - inf) = NaN; the M2 of data holding
            # infinities is NaN (PyTorch: mean inf, var NaN).
            mean = np.where(off, mean_a * (na / n) + mean_b * (nb / n), mean)
            m2 = np.where(off, np.nan, m2)
    return n, mean, m2


# (n, mean, m2): n values per channel (an int), or their weight sum (a float), with
# mean and m2 float64 (C,): what a weighted fit accumulates (BatchNormTransformer).
Summary = tuple[float, NDArray[np.float64], NDArray[np.float64]]


def weighted_moments(X: NDArray[Any], w: NDArray[np.float64], rows: int = 1 << 14) -> Summary:
    """(W, mean, m2) per column of X (n, C) with sample weights w (n,), >= 0 and finite,
    in float64, two passes over blocks of ``rows`` rows (a float64 copy of X is never
    made whole)::

        W = sum_i w_i;  mean = sum_i w_i x_i / W;  m2 = sum_i w_i (x_i - mean)**2

    Weight k counts a row k times; weights summing to 0 give (0.0, zeros, zeros), the
    summary of no data."""
    total = float(w.sum())
    mean = np.zeros(X.shape[1])
    m2 = np.zeros(X.shape[1])
    if total == 0.0:
        return 0.0, mean, m2
    for r in range(0, X.shape[0], rows):
        mean += w[r : r + rows] @ X[r : r + rows].astype(np.float64)
    mean /= total
    for r in range(0, X.shape[0], rows):
        m2 += w[r : r + rows] @ (X[r : r + rows] - mean) ** 2
    return total, mean, m2


def merge_summaries(a: Summary, b: Summary) -> Summary:
    """Two summaries (n, mean, m2) of disjoint data as one (:func:`chan_merge`; a count
    of 0 is no data)."""
    if a[0] == 0:
        return b
    if b[0] == 0:
        return a
    return chan_merge(*a, *b)
