"""Data-parallel training over MPI ranks: this rank's rows, global loss, gradient sum.

Every rank runs the same model, initialised identically, on its slice of each
global batch of N rows; the update is the one a single process would make on the
whole batch::

    rows = rank_slice(N, comm)                        # this rank's n rows of the batch
    loss_local, dlogits = loss_fn(model.forward(x[rows]), t[rows])   # mean over n rows
    loss = global_mean(loss_local, n, comm)           # the whole batch's mean loss
    model.backward(dlogits * (n / N))                 # gradient of the GLOBAL mean loss
    allreduce_gradients(model, comm)                  # + the other ranks' contributions
    opt.step()

Scaling the local gradient by n/N makes every rank back-propagate the gradient of the
global mean loss with respect to its own rows; summing the parameter gradients over
the ranks then gives the full-batch gradient. With equal local batch sizes this is
the usual "average of the ranks' gradients". Synchronized batch-norm layers need
the gradient of the global loss for their own backward (their statistics are the
global batch's), which is why the scaling happens before ``backward`` and not after.

All reductions run through :mod:`.comm` (Allgather, then a fixed-order sum), so
every rank holds bit-identical gradients and the models never drift apart.

:func:`global_mean` and :func:`allreduce_gradients` check their arguments on each
rank first, and a rank that refuses them still takes part in the collective with
an error flag: every rank then raises the same
:class:`~numbabn.distributed.comm.SyncError` (that rank's own error chained), and
nothing changes -- one rank's bad argument no longer leaves the others waiting.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import _checks as V
from ..layers.base import Layer
from .comm import SyncError, active, allgather_rows, check_comm, raise_if_rejected, sum_in_rank_order
from .sync_batchnorm import SyncBatchNormMixin


def rank_slice(n: int, comm: Any = None) -> slice:
    """The rows of a global batch of ``n`` that this rank takes: contiguous, in rank
    order, sizes differing by at most one (``numpy.array_split``'s split); ranks
    beyond ``n`` get an empty slice. One process: ``slice(0, n)``."""
    if isinstance(n, (bool, np.bool_)) or not isinstance(n, (int, np.integer)) or n < 0:
        raise ValueError(f"rank_slice: n must be a non-negative int, got {n!r}")
    comm = active(check_comm("rank_slice", comm))
    if comm is None:
        return slice(0, int(n))
    size, rank = comm.Get_size(), comm.Get_rank()
    base, extra = divmod(int(n), size)
    start = rank * base + min(rank, extra)
    return slice(start, start + base + (rank < extra))


def _check_mean(fn: str, value: Any) -> float:
    """A real number (NaN included: the mean of no rows), as a float."""
    if isinstance(value, (bool, np.bool_)) or np.ndim(value) != 0 or np.asarray(value).dtype.kind not in "fiu":
        raise TypeError(f"{fn}: local_mean must be a real number (this rank's mean loss), got {V.describe(value)}")
    return float(value)


def global_mean(local_mean: float, local_count: int, comm: Any = None) -> float:
    """``sum(count_r * mean_r) / sum(count_r)`` over the ranks (one collective): the
    mean over the whole batch of per-rank means over ``local_count`` items. A rank
    with ``local_count == 0`` contributes nothing (its mean, typically NaN, is ignored).

    ``local_mean``: a real number; ``local_count``: an int >= 0. A rank whose
    arguments are refused still takes part in the collective with an error flag, and
    every rank raises the same :class:`SyncError` (that rank's own error chained).
    """
    fn = "global_mean"
    comm = active(check_comm(fn, comm))
    if comm is None:
        mean = _check_mean(fn, local_mean)
        V.check_int(fn, "local_count", local_count, minimum=0)
        return mean
    # Any exception, not only the checks' own: one raised here would leave the other
    # ranks waiting in the collective.
    rejected, error, weighted, count = 0.0, None, 0.0, 0.0
    try:
        mean = _check_mean(fn, local_mean)
    except Exception as exc:
        rejected, error = 1.0, exc
    else:
        try:
            count = float(V.check_int(fn, "local_count", local_count, minimum=0))
        except Exception as exc:
            rejected, error = 2.0, exc
        else:
            weighted = mean * count if count else 0.0
    rows = allgather_rows(comm, [rejected, weighted, count])
    raise_if_rejected(fn, rows[:, 0], ("local_mean", "local_count"), error, "nothing was computed")
    total, count = rows[0, 1:].copy()
    for row in rows[1:]:
        total += row[1]
        count += row[2]
    return float(total / count) if count else float("nan")


def _sync_layers(layer: Layer) -> Iterator[Layer]:
    if isinstance(layer, SyncBatchNormMixin):
        yield layer
    for child in layer.children():
        yield from _sync_layers(child)


_GRAD_DTYPES = (np.dtype(np.float16), np.dtype(np.float32), np.dtype(np.float64))


def _gradients(fn: str, model: Any) -> tuple[list[Any], list[float]]:
    """The parameters whose gradients are summed, checked, and the summary the ranks
    compare: [parameters, gradients, values, the gradients' positions weighted by
    their sizes (another set of the same count and size differs there), values per
    dtype in ``_GRAD_DTYPES``, the positions weighted by the itemsizes (other dtypes
    by parameter)]."""
    if not isinstance(model, Layer):
        raise TypeError(f"{fn}: model must be a numbabn Layer, got {V.describe(model)}")
    synced = {id(p) for layer in _sync_layers(model) for p in layer.parameters()}
    named = list(model.named_parameters())
    chosen = [i for i, (_, p) in enumerate(named) if p.grad is not None and id(p) not in synced]
    for i in chosen:
        name, p = named[i]
        grad = p.grad
        if not isinstance(grad, np.ndarray) or grad.dtype not in _GRAD_DTYPES or grad.shape != p.value.shape:
            raise TypeError(
                f"{fn}: the gradient of parameter {name!r} must be a float16, float32 or float64 NumPy array "
                f"of the parameter's shape {p.value.shape}, got {V.describe(grad)}"
            )
    grads = [named[i][1].grad for i in chosen]
    sizes = [g.size for g in grads]
    per_dtype = [sum(g.size for g in grads if g.dtype == dt) for dt in _GRAD_DTYPES]
    summary = [
        len(named),
        len(chosen),
        sum(sizes),
        sum((i + 1) * n for i, n in zip(chosen, sizes, strict=True)),
        *per_dtype,
        sum((i + 1) * g.dtype.itemsize for i, g in zip(chosen, grads, strict=True)),
    ]
    return [named[i][1] for i in chosen], summary


def _describe_gradients(row: Any) -> str:
    """One rank's summary (without its error flag) in words."""
    parts = [(int(n), dt.name) for n, dt in zip(row[4:7], _GRAD_DTYPES, strict=True) if n]
    values = f"{int(row[2])} {parts[0][1]} values" if len(parts) == 1 else f"{int(row[2])} values"
    if len(parts) > 1:
        values += " (" + ", ".join(f"{n} {name}" for n, name in parts) + ")"
    return f"{int(row[1])} of {int(row[0])} parameters, {values}"


def allreduce_gradients(model: Layer, comm: Any = None) -> None:
    """Replace every parameter gradient of ``model`` by its sum over the ranks, in place
    (one collective for all of them; float64 sums cast back to each gradient's dtype).

    Skipped: parameters whose ``grad`` is None, and those of synchronized batch-norm
    layers, whose backward already produced the global batch's gradients. Every
    rank must call this with the same model structure and the same gradients set, in
    the same dtypes: the ranks first compare which ones (one more Allgather of 9
    values), and if they differ, or a rank's ``model`` or a gradient (a float16/32/64
    NumPy array of its parameter's shape) is refused there, every rank raises the same
    :class:`SyncError` and no gradient changes (summed as they came, the shorter
    contributions would mix values of different parameters, and gradients cast back
    to other dtypes would differ between ranks).
    """
    fn = "allreduce_gradients"
    comm = active(check_comm(fn, comm))
    if comm is None:
        _gradients(fn, model)
        return
    try:
        params, summary = _gradients(fn, model)
        rejected, error = 0, None
    except Exception as exc:  # any: one raised here would leave the other ranks waiting
        params, summary = [], [0.0] * 8
        rejected, error = 1 if not isinstance(model, Layer) else 2, exc
    rows = allgather_rows(comm, [rejected, *summary])
    raise_if_rejected(fn, rows[:, 0], ("model", "gradient of a parameter"), error, "no gradient changed")
    if (rows != rows[0]).any():
        described = "; ".join(f"rank {r}: {_describe_gradients(row[1:])}" for r, row in enumerate(rows))
        raise SyncError(
            f"{fn}: the ranks disagree on the gradients to sum ({described}); every rank must have the same "
            "parameters' gradients set, in the same dtypes; no gradient changed"
        )
    if not params:
        return
    total = sum_in_rank_order(comm, np.concatenate([p.grad.ravel() for p in params]).astype(np.float64))
    offset = 0
    for p in params:
        size = p.grad.size
        p.grad = total[offset : offset + size].reshape(p.grad.shape).astype(p.grad.dtype)
        offset += size
