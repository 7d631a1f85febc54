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
"""

from collections.abc import Iterator
from typing import Any

import numpy as np

from .. import _checks as V
from ..layers.base import Layer
from .comm import SyncError, active, allgather_rows, check_comm, sum_in_rank_order
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


def global_mean(local_mean: float, local_count: int, comm: Any = None) -> float:
    """``sum(count_r * mean_r) / sum(count_r)`` over the ranks (one collective): the
    mean over the whole batch of per-rank means over ``local_count`` items. A rank
    with ``local_count == 0`` contributes nothing (its mean, typically NaN, is ignored)."""
    comm = active(check_comm("global_mean", comm))
    if comm is None:
        return float(local_mean)
    weighted = float(local_mean) * local_count if local_count else 0.0
    total, count = sum_in_rank_order(comm, np.array([weighted, float(local_count)]))
    return total / count if count else float("nan")


def _sync_layers(layer: Layer) -> Iterator[Layer]:
    if isinstance(layer, SyncBatchNormMixin):
        yield layer
    for child in layer.children():
        yield from _sync_layers(child)


def allreduce_gradients(model: Layer, comm: Any = None) -> None:
    """Replace every parameter gradient of ``model`` by its sum over the ranks, in place
    (one collective for all of them; float64 sums cast back to each gradient's dtype).

    Skipped: parameters whose ``grad`` is None, and those of synchronized batch-norm
    layers, whose backward already produced the global batch's gradients. Every
    rank must call this with the same model structure and the same gradients set:
    the ranks first compare which ones (one more Allgather of 4 values), and if they
    differ every rank raises the same :class:`SyncError` and no gradient changes
    (summed as they came, the shorter contributions would mix values of different
    parameters, differently on each rank).
    """
    fn = "allreduce_gradients"
    if not isinstance(model, Layer):
        raise TypeError(f"{fn}: model must be a numbabn Layer, got {V.describe(model)}")
    comm = active(check_comm(fn, comm))
    if comm is None:
        return
    synced = {id(p) for layer in _sync_layers(model) for p in layer.parameters()}
    every = model.parameters()
    chosen = [i for i, p in enumerate(every) if p.grad is not None and id(p) not in synced]
    params = [every[i] for i in chosen]
    # Which gradients, in 4 numbers: parameters, gradients, values, and the gradients'
    # positions weighted by their sizes (another set of the same count and size differs there).
    sizes = [every[i].grad.size for i in chosen]
    summary = [len(every), len(chosen), sum(sizes), sum((i + 1) * n for i, n in zip(chosen, sizes, strict=True))]
    rows = allgather_rows(comm, summary)
    if (rows != rows[0]).any():
        described = "; ".join(
            f"rank {r}: {int(row[1])} of {int(row[0])} parameters, {int(row[2])} values" for r, row in enumerate(rows)
        )
        raise SyncError(
            f"{fn}: the ranks disagree on the gradients to sum ({described}); every rank must have the same "
            "parameters' gradients set; no gradient changed"
        )
    if not params:
        return
    total = sum_in_rank_order(comm, np.concatenate([p.grad.ravel() for p in params]).astype(np.float64))
    offset = 0
    for p in params:
        size = p.grad.size
        p.grad = total[offset : offset + size].reshape(p.grad.shape).astype(p.grad.dtype)
        offset += size
