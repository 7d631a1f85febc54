"""The rules of one batch-norm call, checked once by :mod:`numbabn.functional` for
both backends (and by layers that call the kernels through it): per-channel
arguments against the input, the batch counter, ``moments=``, what an
``allreduce`` returned, the batch size, and ``dy`` against the forward.
"""

from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from ._checks import check_moments_value, describe
from ._layout import Canonical, check_param, compute_dtype, is_device_array

if TYPE_CHECKING:
    from ._context import BatchNormContext

_FLOAT64 = np.dtype(np.float64)


def check_forward_params(
    fn: str,
    cx: Canonical,
    gamma: Any,
    beta: Any,
    running_mean: Any,
    running_var: Any,
    num_batches_tracked: Any,
    training: bool,
    check: Callable[..., Any] | None = None,
) -> tuple[Any, Any, Any, Any, Any]:
    """The per-channel arguments of a forward pass, checked against the input ``cx``
    with ``check`` (:func:`check_param`, or :func:`check_device_param` on the GPU).
    Running statistics are updated in place only in training mode; in eval mode
    they are only read, so read-only ones are fine there, and float64 ones are
    accepted for float32 input too.
    Returns (gamma, beta, running_mean, running_var, num_batches_tracked)."""
    check = check or check_param
    dt = compute_dtype(cx.dtype)
    stats_dt = dt if training else _stats_dtype(fn, running_mean, running_var, dt)
    return (
        check(fn, "gamma", gamma, cx.channels, dt),
        check(fn, "beta", beta, cx.channels, dt),
        check(
            fn,
            "running_mean",
            running_mean,
            cx.channels,
            stats_dt,
            inplace=training,
        ),
        check(
            fn,
            "running_var",
            running_var,
            cx.channels,
            stats_dt,
            inplace=training,
        ),
        # written only where it counts: training with running statistics
        check_counter(fn, num_batches_tracked, inplace=training and running_mean is not None),
    )


def _stats_dtype(fn: str, running_mean: Any, running_var: Any, dt: np.dtype[Any]) -> np.dtype[Any]:
    """The dtype eval-mode running statistics must have: the compute dtype, or float64
    for both (in any byte order) -- e.g. a float64 ``mean_`` with ``|mean| >> std``,
    which rounding to float32 first would spoil (they are only read there; the
    kernels turn them into float64 coefficients). One of each is a TypeError."""
    wide = [_is_float64(value) for value in (running_mean, running_var)]
    if wide[0] != wide[1] and dt != _FLOAT64:
        raise TypeError(
            f"{fn}: running_mean and running_var must have one dtype, {dt} (the input's) or float64 "
            f"(read in eval), got {describe(running_mean)} and {describe(running_var)}"
        )
    return _FLOAT64 if wide[0] else dt


def _is_float64(value: Any) -> bool:
    """Whether ``value`` holds float64 numbers (in any byte order). A dtype that is not
    NumPy's (a torch tensor's ``torch.float64``, which ``np.dtype`` cannot interpret) is
    read from the host array NumPy makes of the value, which the parameter check takes
    next; a device array's, or one NumPy cannot make, counts as not float64 (that check
    then names the argument)."""
    dtype = getattr(value, "dtype", None)
    if dtype is None:
        return False
    try:
        dtype = np.dtype(dtype)
    except TypeError:
        if is_device_array(value):
            return False
        try:
            dtype = np.asarray(value).dtype
        except Exception:  # the parameter check converts it again and names it
            return False
    return dtype.kind == "f" and dtype.itemsize == 8


_INT64_MAX = int(np.iinfo(np.int64).max)
_INT64 = np.dtype(np.int64)


def check_counter(fn: str, value: Any, *, inplace: bool = True) -> Any:
    """num_batches_tracked: None or a one-element int64 array holding a count >= 0
    (writeable when ``inplace``). int64 as in PyTorch: a narrower counter would wrap
    (uint8: 255 -> 0, and the cumulative average would restart from one batch)."""
    if value is None:
        return None
    if not isinstance(value, np.ndarray) or value.size != 1 or value.dtype != _INT64:
        raise TypeError(
            f"{fn}: num_batches_tracked must be a one-element int64 NumPy array "
            f"(updated in place), got {describe(value)}"
        )
    if value.item() < 0:
        raise ValueError(f"{fn}: num_batches_tracked counts batches and must be >= 0, got {value.item()}")
    if inplace and not value.flags.writeable:
        raise ValueError(f"{fn}: num_batches_tracked is updated in place but is read-only")
    if inplace and value.item() == _INT64_MAX:  # += 1 would wrap it to -2**63
        raise ValueError(f"{fn}: num_batches_tracked is at the int64 maximum {_INT64_MAX}; it cannot count this call")
    return value


def check_moments(fn: str, moments: Any, cx: Canonical, training: bool) -> tuple[NDArray[np.float64] | None, int]:
    """Given moments for the forward -> ((2, C) float64 stats, count); none given ->
    (None, the batch's count)."""
    if moments is None:
        return None, cx.count
    from .stats import Moments

    if not isinstance(moments, Moments):
        raise TypeError(f"{fn}: moments must be a numbabn.Moments or None, got {describe(moments)}")
    if not training:
        raise ValueError(f"{fn}: moments= replaces the batch statistics and needs training=True")
    check_moments_value(fn, "moments", moments)
    if moments.mean.shape != (cx.channels,) or moments.m2.shape != (cx.channels,):
        raise ValueError(
            f"{fn}: moments must have {cx.channels} channels like x, got mean of shape {moments.mean.shape}"
        )
    if moments.count < cx.count:
        raise ValueError(
            f"{fn}: moments must summarise at least x's own values, got count {moments.count} for x "
            f"with {cx.count} value(s) per channel"
        )
    return np.ascontiguousarray(np.stack([moments.mean, moments.m2]), dtype=np.float64), int(moments.count)


def check_sums(fn: str, sums: Any, shape: tuple[int, ...]) -> NDArray[np.float64]:
    """What an ``allreduce`` callable returned: a float64 array of ``shape``."""
    if not isinstance(sums, np.ndarray):
        raise TypeError(f"{fn}: allreduce must return the summed {shape} array (a NumPy array), got {describe(sums)}")
    if sums.dtype.kind not in "fiu":
        raise TypeError(f"{fn}: allreduce must return a real array, got dtype {sums.dtype}")
    if np.ma.is_masked(sums):  # a hidden value would still enter the gradient
        raise ValueError(f"{fn}: allreduce returned a masked array with masked values")
    sums = np.ascontiguousarray(sums, dtype=np.float64)
    if sums.shape != shape:
        raise ValueError(f"{fn}: allreduce must return an array of shape {shape}, got {sums.shape}")
    return sums


def check_training_batch(
    fn: str,
    count: int,
    shape: tuple[int, ...],
    training: bool,
    tracking: bool,
    momentum: float | None,
    nbt: Any,
    merged: bool = False,
) -> None:
    """Rules that depend on the batch: not exactly one value per channel to train
    (none is an empty batch, as in PyTorch), and a counter for the cumulative
    average (``momentum=None``). ``merged``: ``count`` is of given moments (a batch
    merged over processes, SyncBatchNorm), not of this input alone."""
    if training and count == 1:
        whole = " (1 value per channel in the whole batch the given moments describe)" if merged else ""
        raise ValueError(
            f"{fn}: Expected more than 1 value per channel when training, got input of shape {shape}{whole}"
        )
    if tracking and momentum is None and nbt is None:
        raise ValueError(f"{fn}: momentum=None (cumulative average) needs num_batches_tracked")


def resolve_momentum(tracking: bool, momentum: float | None, nbt: Any) -> float:
    """The running-statistics factor of this step: ``momentum``, or
    1/num_batches_tracked after this step for the cumulative average; 0 when not tracking."""
    if not tracking:
        return 0.0
    return momentum if momentum is not None else 1.0 / (nbt.item() + 1)


def check_like_forward(fn: str, cdy: Canonical, ctx: "BatchNormContext") -> None:
    """dy (canonical) must have the forward input's shape and dtype."""
    if cdy.shape != ctx.shape:
        raise ValueError(f"{fn}: dy must have the forward input's shape {ctx.shape}, got {cdy.shape}")
    if cdy.dtype != ctx.dtype:
        raise TypeError(f"{fn}: dy must have the forward input's dtype {ctx.dtype}, got {cdy.dtype}")


def check_residual(fn: str, cres: Canonical, cx: Canonical) -> Canonical:
    """The residual (canonical) must have the input's shape and dtype; returns it."""
    if cres.shape != cx.shape:
        raise ValueError(f"{fn}: residual must have the shape of x {tuple(cx.shape)}, got {tuple(cres.shape)}")
    if cres.dtype != cx.dtype:
        raise TypeError(f"{fn}: residual must have the dtype of x ({cx.dtype}), got {cres.dtype}")
    return cres
