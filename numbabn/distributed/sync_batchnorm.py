"""Synchronized batch norm over MPI ranks: ``SyncBatchNorm1d`` and ``SyncBatchNorm2d``.

Each rank holds a slice of the global batch (any size, zero included). The layers
are :class:`~numbabn.layers.BatchNorm1d` / ``BatchNorm2d`` plus two collectives;
all the math stays in :mod:`numbabn.functional`:

forward (batch statistics: training mode, or ``track_running_stats=False``)
    local ``numbabn.moments(x)`` -> ONE ``Allgather`` of ``Moments.to_array()``
    ``[count, mean(C), m2(C)]`` (2C+1 float64) -> exact Chan merge in rank order
    (:func:`~numbabn.distributed.comm.merge_in_rank_order`) ->
    ``batch_norm_forward(x, ..., moments=merged)``. The running statistics see the
    global count m: ``running_var`` gets ``var*m/(m-1)`` of the whole batch.
backward (always, also after an eval-mode forward)
    ``batch_norm_backward(dy, ctx, allreduce=...)``: the local (2, C) sums
    ``[sum g, sum g*(x - mean)]`` -> ONE ``Allgather`` -> summed in rank order.
    ``dx`` is this rank's slice of the global batch's input gradient, and
    ``weight.grad``/``bias.grad`` are the GLOBAL batch's gradients, identical on
    every rank -- so a data-parallel gradient all-reduce must skip them
    (:func:`numbabn.distributed.allreduce_gradients` does).

Result: the same as one ``BatchNorm`` on the concatenation of the ranks' batches in
rank order (to float rounding), bit-identical statistics and parameter gradients on
every rank. Every rank must call forward and backward the same number of times, in
the same layer order (the collectives are blocking; a rank with an empty batch still
takes part). An input error raised on one rank only (wrong shape) leaves the others
waiting in the collective, as in any MPI program: launch scripts with
``python -m mpi4py`` (or catch and ``comm.Abort()``) so that one rank's exception ends the job.

``comm=None`` means ``MPI.COMM_WORLD`` when mpi4py can start MPI; in a single process
(no mpiexec, or mpi4py missing) the layers are exactly ``BatchNorm1d``/``BatchNorm2d``:
same calls, same bits. State dicts have the same keys as BatchNorm's, so checkpoints
move freely between the two.

Payload per layer per training step, from the buffers actually passed (C channels,
P ranks, float64 here; PyTorch's ``SyncBatchNorm`` buffers have the dtype of its
statistics, float32 for float32 input; both measured in
``tests/test_distributed_mpi.py``). For C = 256:

=========================  =========================  ==============================
                           numbabn (Allgather both)   PyTorch SyncBatchNorm
=========================  =========================  ==============================
forward, sent per rank     (2C+1)*8 = 4104 B          (2C+1)*4 = 2052 B (all_gather
                           [count, mean, m2]          of [mean, invstd, count])
forward, received          P*4104 B                   P*2052 B
backward, sent per rank    2C*8 = 4096 B              2C*4 = 2048 B (all_reduce of
                           [sum g, sum g*(x-mean)]    [sum_dy, sum_dy_xmu])
backward, received         P*4096 B                   2048 B (the reduced buffer)
per step, sent             8200 B                     4100 B
=========================  =========================  ==============================

Twice PyTorch's bytes (float64 instead of float32) and P rows received in the
backward instead of one; at these sizes an MPI collective costs its latency rather
than its bandwidth. What the doubling buys:
exact statistics (Chan merge of m2, not a variance rebuilt from float32 invstd),
and results identical on all ranks by construction (see :mod:`.comm`).
"""
import numpy as np

from ..functional import batch_norm_backward, batch_norm_forward, moments
from ..layers.batchnorm import BatchNorm1d, BatchNorm2d
from ..registry import register_layer
from .comm import active, check_comm, merge_in_rank_order, sum_in_rank_order


class SyncBatchNormMixin:
    """The synchronization shared by :class:`SyncBatchNorm1d` and
    :class:`SyncBatchNorm2d` (see the module docstring). ``self.comm`` is the
    communicator given (None: ``MPI.COMM_WORLD`` if available)."""

    _sync_comm = None    # the communicator the last forward used; None: it ran locally
    _transient = ("_sync_comm",)

    def _set_comm(self, comm):
        self.comm = check_comm(type(self).__name__, comm)

    def _bn_forward(self, x, gamma, beta, out=None):
        comm = self._sync_comm = active(self.comm)
        if comm is None or not self.uses_batch_stats:
            return super()._bn_forward(x, gamma, beta, out)
        merged = merge_in_rank_order(comm, moments(x, axis=self.axis))
        return batch_norm_forward(
            x, gamma, beta, **self._running_args(), training=True, momentum=self.momentum,
            eps=self.eps, axis=self.axis, activation=self.activation, out=out, moments=merged)

    def backward(self, dy):
        """dx (this rank's slice); weight.grad and bias.grad of the global batch."""
        comm = self._sync_comm
        if comm is None:
            return super().backward(dy)
        ctx = self._cached("_ctx")
        dx, dgamma, dbeta = batch_norm_backward(
            self._check_dy(dy, ctx.shape, ctx.dtype), ctx, allreduce=lambda sums: sum_in_rank_order(comm, sums))
        if self.affine:
            self.weight.grad = dgamma
            self.bias.grad = dbeta
        return dx

    def extra_repr(self):
        text = super().extra_repr()
        if self.comm is not None:
            name = self.comm.Get_name() if callable(getattr(self.comm, "Get_name", None)) else ""
            text += f", comm={name or type(self.comm).__name__}"
        return text


@register_layer("sync_batch_norm1d")
class SyncBatchNorm1d(SyncBatchNormMixin, BatchNorm1d):
    """:class:`~numbabn.layers.BatchNorm1d` synchronized over the ranks of ``comm``
    ((N, C) or (N, C, L) input; N may differ between ranks, 0 included).

    ``comm``: an ``mpi4py.MPI.Intracomm`` or None (``MPI.COMM_WORLD`` when available,
    else a plain BatchNorm1d). See the module docstring for what is exchanged. The
    layer-contract example (``_contract_example``) is BatchNorm1d's, inherited.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 activation=None, dtype=np.float32, comm=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation, dtype)
        self._set_comm(comm)


@register_layer("sync_batch_norm2d")
class SyncBatchNorm2d(SyncBatchNormMixin, BatchNorm2d):
    """:class:`~numbabn.layers.BatchNorm2d` synchronized over the ranks of ``comm``
    (NCHW, or NHWC with ``channels_last=True``; N may differ between ranks, 0 included).

    ``comm``: as for :class:`SyncBatchNorm1d`.
    """

    def __init__(self, num_features, eps=1e-5, momentum=0.1, affine=True, track_running_stats=True,
                 activation=None, dtype=np.float32, channels_last=False, comm=None):
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation, dtype,
                         channels_last)
        self._set_comm(comm)
