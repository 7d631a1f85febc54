"""Dask arrays through numbabn's Numba kernels: tree-merged chunk moments, lazy transform.

Statistics (:func:`moments`, and ``BatchNormTransformer.fit``/``partial_fit``)::

    chunk (i, j) --numbabn.moments--> Moments(n_i, mean_ij, m2_ij)    (one task per chunk)
    for each channel group j: pairwise tree of merge_moments over i  (Chan et al.)
    concatenate the channel groups                                    -> Moments(n, mean, m2)

Every chunk is read once, by the Numba kernel (exact per-chunk two-pass moments in
float64); the tree has depth log2(row chunks) and a fixed shape, so the result is
the same whatever the scheduler or the number of workers, and equals the NumPy
result to float64 rounding (the merges group the data differently). Chan's merge::

    n = na + nb;  delta = mean_b - mean_a
    mean = mean_a + delta*nb/n;  m2 = m2_a + m2_b + delta**2 * na*nb/n

``transform`` stays lazy: ``map_blocks`` of the eval-mode kernel, each chunk with its
columns' slice of the parameters; nothing is computed until the caller asks.

Dask is optional (``pip install 'dask[array]'``, numbabn's ``dask`` extra): nothing here imports it until a
Dask array is actually handled. The hooks used by
:class:`~numbabn.sklearn.BatchNormTransformer` are :func:`is_dask_array`,
:func:`fit_batch`, :func:`check_array` and :func:`transform`.

Limits: 2-D arrays for the transformer (any ndim for :func:`moments`); Dask
DataFrames are not accepted (convert with ``.to_dask_array(lengths=True)``), so
``feature_names_in_`` is never set from a Dask input. ``inverse_transform`` of a Dask
array is lazy too (``map_blocks``, NaN/infinity raise when computed).
``fit``/``partial_fit`` take ``sample_weight`` with a Dask X too (NumPy or Dask
weights, cut along X's row chunks, which must be known).
"""

import sys
import threading
import warnings
from collections.abc import Callable, Sequence
from typing import Any, cast

import numpy as np
from numpy.typing import NDArray
from sklearn.utils import assert_all_finite

from ..functional import batch_norm_forward
from ..functional import moments as numpy_moments
from ..sklearn.transformer import register_array_kind
from ..stats import Moments, Summary, merge_moments, merge_summaries, weighted_moments

_KEEP_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))

# One kernel call at a time per process: each kernel call already runs on numbabn's
# threads (every CPU by default), so letting Dask's threaded scheduler (its default for
# arrays) call several at once would only oversubscribe the cores. Concurrent calls are
# safe (tests/test_runtime.py); reading and preparing chunks still overlaps.
_KERNEL_LOCK = threading.Lock()


def is_dask_array(X: Any) -> bool:
    """True for a ``dask.array.Array`` (without importing Dask: none can exist unless
    Dask was imported)."""
    da = sys.modules.get("dask.array")
    return da is not None and isinstance(X, da.Array)


# ---------------------------------------------------------------- statistics
def _block_moments(block: NDArray[Any], axis: int, check_finite: bool) -> Moments:
    """Moments of one chunk by the Numba kernel (one task per chunk)."""
    if check_finite:
        assert_all_finite(block, input_name="X", estimator_name="BatchNormTransformer")
    with _KERNEL_LOCK:
        return numpy_moments(block, axis=axis)


def _concat_channels(parts: Sequence[Moments]) -> Moments:
    """Moments of consecutive channel groups (same rows) as one summary."""
    return Moments(parts[0].count, np.concatenate([p.mean for p in parts]), np.concatenate([p.m2 for p in parts]))


def _tree(items: list[Any], combine: Callable[[Any, Any], Any]) -> Any:
    """Pairwise tree over ``items`` (neighbours merged level by level, order kept)."""
    while len(items) > 1:
        items = [combine(items[i], items[i + 1]) if i + 1 < len(items) else items[i] for i in range(0, len(items), 2)]
    return items[0]


def moments_graph(X: Any, axis: int = 1, *, check_finite: bool = False) -> Any:
    """A ``dask.delayed`` :class:`~numbabn.stats.Moments` of the Dask array ``X`` per
    channel of ``axis`` (statistics over every other axis), not yet computed.

    ``check_finite``: each chunk task raises scikit-learn's ValueError on NaN or
    infinity (as ``validate_data`` does for NumPy input).
    """
    fn = "numbabn.distributed.dask.moments"
    if not is_dask_array(X):
        raise TypeError(f"{fn}: X must be a dask.array.Array, got {type(X).__name__}")
    import dask

    if X.ndim < 2:
        raise ValueError(f"{fn}: X must have at least 2 dimensions (samples and channels), got shape {X.shape}")
    if isinstance(axis, (bool, np.bool_)) or not isinstance(axis, (int, np.integer)) or not -X.ndim <= axis < X.ndim:
        raise ValueError(f"{fn}: axis must be an int in [{-X.ndim}, {X.ndim}), got {axis!r}")
    axis = int(axis) % X.ndim
    block_moments = dask.delayed(_block_moments, pure=True)
    merge = dask.delayed(merge_moments, pure=True)
    groups = np.moveaxis(X.to_delayed(), axis, 0)
    per_group = [_tree([block_moments(b, axis, check_finite) for b in group.ravel()], merge) for group in groups]
    if len(per_group) == 1:
        return per_group[0]
    return dask.delayed(_concat_channels, pure=True)(per_group)


def moments(X: Any, axis: int = 1) -> Moments:
    """:class:`~numbabn.stats.Moments` (count, mean, m2) of the Dask array ``X`` per
    channel of ``axis``, computed with the current Dask scheduler: the Dask
    counterpart of :func:`numbabn.moments`."""
    return moments_graph(X, axis).compute()


# ---------------------------------------------------------------- scikit-learn hooks
def check_array(estimator: Any, X: Any, reset: bool) -> Any:
    """What ``validate_data(estimator, X, reset=reset, dtype=(float64, float32))`` checks,
    without computing anything: 2-D, numeric (float32/float64 kept, other dtypes
    cast lazily to float64), at least one feature, the fitted number of features
    (``reset=False``) or a new one (``reset=True`` sets ``n_features_in_``).
    NaN/infinity are rejected later, by the chunk tasks. Returns the (lazy) array.
    """
    name = type(estimator).__name__
    if X.ndim != 2:
        raise ValueError(f"{name}: expected a 2D Dask array (n_samples, n_features), got shape {X.shape}")
    if X.dtype.kind not in "biuf":
        raise ValueError(f"{name}: X must be numeric (bool, integer or float), got dtype {X.dtype}")
    if X.dtype not in _KEEP_DTYPES:
        X = X.astype(np.float64)
    if X.shape[0] == 0:  # as validate_data (an unknown length, NaN, is not 0: checked by the tasks)
        raise ValueError(f"Found array with 0 sample(s) (shape={X.shape}) while a minimum of 1 is required by {name}.")
    n_features = X.shape[1]
    if n_features == 0:
        raise ValueError(f"Found array with 0 feature(s) (shape={X.shape}) while a minimum of 1 is required by {name}.")
    if reset:
        estimator.n_features_in_ = n_features
        estimator.__dict__.pop("feature_names_in_", None)
        return X
    if n_features != estimator.n_features_in_:
        raise ValueError(
            f"X has {n_features} features, but {name} is expecting {estimator.n_features_in_} features as input."
        )
    if hasattr(estimator, "feature_names_in_"):
        warnings.warn(
            f"X does not have valid feature names, but {name} was fitted with feature names", UserWarning, stacklevel=3
        )
    return X


class FitBatch:
    """A validated Dask batch reduced for fitting: ``shape`` (n_samples, n_features)
    and the merged ``summary`` (n, mean, m2) (``numbabn.stats.Summary``; n the
    weight sum with ``sample_weight``). Returned by :func:`fit_batch` in place of the array."""

    __slots__ = ("shape", "summary")

    def __init__(self, n_samples: int, summary: Summary) -> None:
        self.summary = summary
        self.shape = (n_samples, summary[1].shape[0])


def _block_weighted(block: NDArray[Any], w: Any, name: str) -> Summary:
    """Weighted moments of one chunk, its weights checked there (a Dask ``sample_weight``
    is only seen when computed)."""
    assert_all_finite(block, input_name="X", estimator_name="BatchNormTransformer")
    w = np.asarray(w, dtype=np.float64)
    bad = ~(np.isfinite(w) & (w >= 0))
    if bad.any():  # the first offending value (min/max of a chunk holding NaN are NaN)
        raise ValueError(f"{name}: sample_weight must be finite and >= 0, got {w[bad][0]} in a chunk of {w.size}")
    return weighted_moments(block, w)


def _concat_summaries(parts: Sequence[Summary]) -> Summary:
    """Summaries of consecutive column groups (same rows) as one."""
    return parts[0][0], np.concatenate([p[1] for p in parts]), np.concatenate([p[2] for p in parts])


def _weight_blocks(name: str, sample_weight: Any, X: Any) -> list[Any]:
    """``sample_weight`` cut along X's row chunks: NumPy pieces (checked now, as
    :func:`numbabn.sklearn._sample_weight.check_sample_weight` does) or, for a Dask
    array, its rechunked delayed blocks (checked by the chunk tasks)."""
    from ..sklearn._sample_weight import check_sample_weight

    n = X.shape[0]
    if np.isnan(n):
        raise ValueError(
            f"{name}: sample_weight needs X's row chunk sizes, which are unknown; call X.compute_chunk_sizes() first"
        )
    if is_dask_array(sample_weight):
        if sample_weight.shape != (n,):
            raise ValueError(
                f"{name}: sample_weight.shape == {sample_weight.shape}, expected ({n},)! (one weight per sample)"
            )
        return list(sample_weight.rechunk((X.chunks[0],)).to_delayed())
    w = cast(NDArray[np.float64], check_sample_weight(name, sample_weight, int(n)))  # not None: weights given
    return np.split(w, np.cumsum(X.chunks[0])[:-1])


def fit_batch(estimator: Any, X: Any, reset: bool, sample_weight: Any = None) -> FitBatch:
    """:func:`check_array`, then the chunk moments merged in a tree, computed with the
    current scheduler (one pass over the chunks, NaN/infinity rejected there). With
    ``sample_weight`` (a number, one weight per sample as NumPy or a Dask array), each
    chunk's weighted moments (:func:`numbabn.stats.weighted_moments`, NumPy) merge
    instead, in the same tree.

    Reducing while validating means a bad chunk raises inside the estimator's
    validation step, which restores its fitted state on errors.
    """
    import dask

    name = type(estimator).__name__
    X = check_array(estimator, X, reset)
    if sample_weight is None:
        m = moments_graph(X, axis=1, check_finite=True).compute()
        batch = FitBatch(m.count, (m.count, m.mean, m.m2))
    else:
        weights = _weight_blocks(name, sample_weight, X)
        block = dask.delayed(_block_weighted, pure=True)
        merge = dask.delayed(merge_summaries, pure=True)
        columns = X.to_delayed().T  # per column group, its chunks in row order
        groups = [_tree([block(b, w, name) for b, w in zip(col, weights, strict=True)], merge) for col in columns]
        summary = (groups[0] if len(groups) == 1 else dask.delayed(_concat_summaries, pure=True)(groups)).compute()
        if summary[0] == 0 and X.shape[0]:
            raise ValueError(f"{name}: sample_weight is all zero; weights must contain at least one non-zero number")
        batch = FitBatch(int(X.shape[0]), summary)
    if batch.shape[0] == 0:
        raise ValueError(
            f"Found array with 0 sample(s) (shape={batch.shape}) while a minimum of 1 is required by {name}."
        )
    return batch


def _transform_block(
    block: NDArray[Any],
    gamma: NDArray[Any],
    beta: NDArray[Any],
    running_mean: NDArray[Any],
    running_var: NDArray[Any],
    eps: float,
    block_info: Any = None,
) -> NDArray[Any]:
    assert_all_finite(block, input_name="X", estimator_name="BatchNormTransformer")
    cols = slice(*block_info[0]["array-location"][1])
    with _KERNEL_LOCK:
        return batch_norm_forward(
            block,
            gamma[cols],
            beta[cols],
            running_mean=running_mean[cols],
            running_var=running_var[cols],
            training=False,
            eps=eps,
        )[0]


def transform(
    X: Any,
    gamma: NDArray[Any],
    beta: NDArray[Any],
    running_mean: NDArray[Any],
    running_var: NDArray[Any],
    eps: float,
    training: bool = False,
) -> Any:
    """Lazy eval-mode batch norm of a 2-D Dask array: ``map_blocks`` of
    :func:`numbabn.batch_norm_forward` (``training=False``) with each chunk's columns
    of the per-feature ``gamma``, ``beta``, ``running_mean``, ``running_var`` (NumPy,
    of X's dtype). Same chunks and dtype as ``X``; NaN/infinity raise when computed.

    The parameters' lengths are checked here, against X's columns: each chunk task
    sees only its columns' slice, whose error would come only at compute time and
    name the slice, not the mistake."""
    fn = "numbabn.distributed.dask.transform"
    if training:
        raise ValueError(
            f"{fn}: only the eval-mode (training=False) transform is lazy and chunk-wise; batch statistics "
            "need moments() first"
        )
    if X.ndim != 2:
        raise ValueError(f"{fn}: X must be a 2-D Dask array (n_samples, n_features), got shape {X.shape}")
    channels = X.shape[1]
    for name, value in (("gamma", gamma), ("beta", beta), ("running_mean", running_mean), ("running_var", running_var)):
        shape = np.shape(value)
        if shape != (channels,):
            got = f"{shape[0]} values" if len(shape) == 1 else f"an array of shape {shape}"
            raise ValueError(f"{fn}: {name} must have one value per channel of X ({channels} channels), got {got}")
    return X.map_blocks(
        _transform_block,
        gamma=gamma,
        beta=beta,
        running_mean=running_mean,
        running_var=running_var,
        eps=eps,
        dtype=X.dtype,
        meta=np.empty((0, 0), X.dtype),
    )


# Dask arrays take these paths in numbabn.sklearn.BatchNormTransformer (it imports this
# module once dask.array is loaded; the transformer never names Dask's functions).
register_array_kind(is_dask_array, sys.modules[__name__])


def _inverse_block(block: NDArray[Any], scale: NDArray[Any], shift: NDArray[Any], block_info: Any = None) -> Any:
    assert_all_finite(block, input_name="X", estimator_name="BatchNormTransformer")
    cols = slice(*block_info[0]["array-location"][1])
    return block * scale[cols] + shift[cols]


def inverse_transform(X: Any, scale: NDArray[Any], shift: NDArray[Any]) -> Any:
    """Lazy ``X*scale + shift`` per feature of a 2-D Dask array (``scale``, ``shift``
    NumPy arrays of X's dtype and one value per column): what
    ``BatchNormTransformer.inverse_transform`` computes in place for NumPy input.
    Same chunks and dtype as ``X``; NaN/infinity raise when computed, as for NumPy."""
    return X.map_blocks(_inverse_block, scale=scale, shift=shift, dtype=X.dtype)
