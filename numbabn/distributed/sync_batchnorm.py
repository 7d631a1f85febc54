"""Synchronized batch norm over MPI ranks: ``SyncBatchNorm1d`` and ``SyncBatchNorm2d``.

Each rank holds a slice of the global batch (any size, zero included), as a NumPy
array or a GPU array (the CUDA backend; the exchanged per-channel sums are copied
to the host for the collectives, and gradients of the host parameters come back as
NumPy arrays). The layers are :class:`~numbabn.layers.BatchNorm1d` / ``BatchNorm2d`` plus their collectives;
all the math stays in :mod:`numbabn.functional`:

header (every synchronized forward, and every backward)
    one ``Allgather`` of 8 float64 per rank: forward or backward, the layer's call
    number, channels, dtype, batch or running statistics, and an error code set by a
    rank whose own check failed -- of its input, of the layer's parameters and
    running statistics, or of its settings (eps, momentum, activation set to invalid
    values after construction); such a rank still takes part. Unless all rows agree
    and no code is set, EVERY rank raises the same
    :class:`~numbabn.distributed.comm.SyncError` before anything changes: ranks in
    different modes, with different channel counts or dtypes, one in forward and one
    in backward, or one rejecting its arguments no longer hang, crash inside MPI or
    mix statistics. (The header is a collective of its own: it must be exchanged
    before the payload sizes, which depend on the channels, are known to agree.)
    After a disagreement every rank continues from the same call number, so a layer
    whose count fell behind on one rank (a later layer failed there only, and
    ``Sequential`` rolled this layer's call back) raises once and then works again;
    that rank's running statistics stay those it rolled back to.
forward (batch statistics: training mode, or no running statistics)
    local ``numbabn.moments(x)`` -> ONE ``Allgather`` of ``Moments.to_array()``
    ``[count, mean(C), m2(C)]`` (2C+1 float64) followed by the layer's 5 settings
    (eps, momentum, affine, activation, track_running_stats), which must be equal on
    every rank (SyncError naming each differing setting, rank by rank, otherwise) ->
    exact Chan merge in rank order
    (:func:`~numbabn.distributed.comm.merge_in_rank_order`) ->
    ``batch_norm_forward(x, ..., moments=merged)``. The running statistics see the
    global count m: ``running_var`` gets ``var*m/(m-1)`` of the whole batch.
forward (running statistics: eval mode)
    local, exactly ``BatchNorm``'s: nothing is exchanged, so ranks may evaluate
    different numbers of batches (an uneven validation split), as with
    ``torch.nn.SyncBatchNorm``. The price: a rank left in eval mode while the others
    train is found only when its next collective meets theirs (the backward of its
    eval forward: every rank raises), and its settings are not compared.
backward (always, also after an eval-mode forward)
    ``batch_norm_backward(dy, ctx, allreduce=...)``: the local (2, C) sums
    ``[sum g, sum g*(x - mean)]`` -> ONE ``Allgather`` -> summed in rank order.
    ``dx`` is this rank's slice of the global batch's input gradient, and
    ``weight.grad``/``bias.grad`` are the GLOBAL batch's gradients, identical on
    every rank -- so a data-parallel gradient all-reduce must skip them
    (:func:`numbabn.distributed.allreduce_gradients` does).

Result: the same as one ``BatchNorm`` on the concatenation of the ranks' batches in
rank order (to float rounding), bit-identical statistics and parameter gradients on
every rank. Every rank must make the same training-mode forward calls and the same
backward calls, in the same layer order (the collectives are blocking; a rank with
an empty batch still takes part); the header turns a violation into the same
SyncError on every rank, except two layers of the same shape, dtype and call count
called in swapped order (nothing in the exchange tells them apart; nor in
``torch.nn.SyncBatchNorm``'s). A rank that raises an uncaught exception before a
collective leaves the others waiting in it: run the script with
``mpiexec -n P python -m mpi4py script.py``, which aborts every rank instead.

``comm=None`` means ``MPI.COMM_WORLD`` when mpi4py can start MPI; in a single process
(no mpiexec, or mpi4py missing) the layers are exactly ``BatchNorm1d``/``BatchNorm2d``:
same calls, same bits. State dicts have the same keys as BatchNorm's, so checkpoints
move freely between the two.

Payload per layer per training step, from the buffers actually passed (C channels,
P ranks, float64 here; PyTorch's ``SyncBatchNorm`` buffers have the dtype of its
statistics, float32 for float32 input; both measured in
``tests/test_distributed_mpi.py``). For C = 256:

=========================  ===========================  ==============================
                           numbabn (Allgather both)     PyTorch SyncBatchNorm
=========================  ===========================  ==============================
header, sent per rank      8*8 = 64 B, forward and      none
                           backward (P*64 B received)
forward, sent per rank     (2C+6)*8 = 4144 B            (2C+1)*4 = 2052 B (all_gather
                           [count, mean, m2, settings]  of [mean, invstd, count])
forward, received          P*4144 B                     P*2052 B
backward, sent per rank    2C*8 = 4096 B                2C*4 = 2048 B (all_reduce of
                           [sum g, sum g*(x-mean)]      [sum_dy, sum_dy_xmu])
backward, received         P*4096 B                     2048 B (the reduced buffer)
per step, sent             8368 B in 4 collectives      4100 B in 2 collectives
=========================  ===========================  ==============================

Twice PyTorch's bytes (float64 instead of float32), P rows received in the
backward instead of one, and twice the collectives (the headers); at these sizes an
MPI collective costs its latency rather than its bandwidth. What this buys: ranks
that disagree raise instead of hanging, and
exact statistics (Chan merge of m2, not a variance rebuilt from float32 invstd),
and results identical on all ranks by construction (see :mod:`.comm`).
"""

from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import DTypeLike

from .. import _bn_checks as B
from .. import _checks as V
from .._layout import is_device_array
from .._typing import AnyArray, FloatArray
from ..backends import get as backend
from ..functional import batch_norm_backward, moments
from ..layers.batchnorm import BatchNorm1d, BatchNorm2d, BatchNormBase
from ..registry import register_layer
from .comm import (
    SyncError,
    active,
    agree,
    check_comm,
    header,
    merge_in_rank_order,
    settings_row,
    sum_in_rank_order,
)

__all__ = ["SyncBatchNorm1d", "SyncBatchNorm2d", "SyncBatchNormMixin", "SyncError"]


_FORWARD, _BACKWARD = 1, 2


if TYPE_CHECKING:  # the mixin is used only with BatchNormBase subclasses
    _MixinBase = BatchNormBase
else:
    _MixinBase = object


class SyncBatchNormMixin(_MixinBase):
    """The synchronization shared by :class:`SyncBatchNorm1d` and
    :class:`SyncBatchNorm2d` (see the module docstring). ``self.comm`` is the
    communicator given (None: ``MPI.COMM_WORLD`` if available)."""

    _sync_comm: Any = None  # the communicator the last forward used; None: it ran locally
    _transient: tuple[str, ...] = ("_sync_comm",)

    def _set_comm(self, comm: Any) -> None:
        self.comm = check_comm(type(self).__name__, comm)
        self._sync_calls = [0, 0]  # successful synchronized forward / backward calls
        # Added to the counts in the header; set after a disagreement so that every rank
        # continues from the same call number. Updated in place, never rebound: a caller
        # that restores the layer's attributes after a failure (Sequential, Trainer)
        # must not undo what all ranks agreed on, or the ranks would disagree for good.
        self._sync_offset = [0, 0]

    def _agree(self, comm: Any, exchange: int, mode: bool, error: BaseException | None, rejected: int) -> None:
        """The header exchange before every synchronized call (see :mod:`.comm`): all
        ranks raise the same SyncError unless they agree and none rejected its own
        arguments (``rejected``: 0, or the :data:`~.comm.REJECTED` code of ``error``)."""
        calls = getattr(self, "_sync_calls", None) or [0, 0]
        offset = self.__dict__.setdefault("_sync_offset", [0, 0])

        def realign(call: int) -> None:
            offset[:] = [call - calls[0], call - calls[1]]

        agree(
            comm,
            header(
                exchange,
                calls[exchange - 1] + offset[exchange - 1],
                self.num_features,
                self.dtype.itemsize,
                1 if mode else 0,
                rejected,
            ),
            error,
            realign,
        )

    def _count(self, exchange: int) -> None:
        # A new list, not an in-place update: a caller that restores the layer's
        # attributes after a later failure (Sequential, Trainer) restores the count too,
        # and the next exchange then tells every rank that this one fell out of step.
        calls = list(getattr(self, "_sync_calls", None) or [0, 0])
        calls[exchange - 1] += 1
        self._sync_calls = calls

    def _settings(self) -> Any:
        """This layer's settings as they travel with the forward payload."""
        return settings_row(
            self.eps,
            self.momentum,
            self.weight is not None,
            self.activation,
            self.track_running_stats,
            self.running_mean is not None,
        )

    def _local_forward_check(self, x: Any) -> tuple[Any, Exception | None, int]:
        """Everything batch_norm_forward checks that does not need the other ranks:
        the layer's settings, the input, the parameters and running statistics.
        Returns (x, None, 0), or (x, the error, its :data:`~.comm.REJECTED` code)."""
        fn = f"{type(self).__name__}.forward"
        settings = (
            (3, lambda: V.check_eps(fn, self.eps)),
            (4, lambda: V.check_momentum(fn, self.momentum)),
            (5, lambda: V.check_activation(fn, self.activation)),
            (6, lambda: bool(self.track_running_stats)),
        )
        for code, check in settings:
            try:
                check()
            except Exception as exc:
                return x, exc, code
        try:
            x = self._check_input(x)
            be = backend("cuda" if is_device_array(x) else "cpu")
            cx = be.canonical(fn, "x", x, self.axis)
        except Exception as exc:
            return x, exc, 1
        try:
            running = self._running_args()
            B.check_forward_params(
                fn,
                cx,
                *self._affine_values(),
                running["running_mean"],
                running["running_var"],
                running["num_batches_tracked"],
                self.uses_batch_stats,
                be.param,
            )
            # count=0: the one-value-per-channel rule needs the merged count, which is
            # the same on every rank and is checked after the exchange.
            B.check_training_batch(
                fn,
                0,
                cx.shape,
                self.uses_batch_stats,
                running["running_mean"] is not None and self.uses_batch_stats,
                self.momentum,
                running["num_batches_tracked"],
            )
        except Exception as exc:
            return x, exc, 2
        return x, None, 0

    def forward(self, x: FloatArray) -> FloatArray:
        """y = BN(x) with the statistics of the global batch (training, or no running
        statistics) or the running statistics (eval).

        With batch statistics every rank takes part in the header exchange, so that
        ranks in different modes or calls, or one whose input or settings are
        rejected, make every rank raise the same SyncError instead of hanging or
        mixing statistics; the settings then travel with the moments. With running
        statistics (eval) the forward is local and exchanges nothing, so ranks may
        evaluate different numbers of batches; the backward still sums the parameter
        gradients over the ranks."""
        comm = active(self.comm)
        if comm is None or not self.uses_batch_stats:
            y = super().forward(x)
            self._sync_comm = comm
            return y
        x, error, rejected = self._local_forward_check(x)
        self._agree(comm, _FORWARD, True, error, rejected)
        merged = merge_in_rank_order(comm, moments(x, axis=self.axis), self._settings())
        if merged.count == 1:  # every rank has the same merged count: all raise this, before any change
            raise SyncError(
                f"{type(self).__name__}.forward: Expected more than 1 value per channel when training, got 1 "
                f"value per channel in the whole batch of the {comm.Get_size()} ranks; nothing was updated"
            )
        y, ctx = self._bn_forward(x, *self._affine_values(), moments=merged)
        self._ctx, self._sync_comm = ctx, comm
        self._count(_FORWARD)
        return y

    def _bn_backward(self, dy: AnyArray) -> tuple[AnyArray, ...]:
        """dx (this rank's slice), dgamma and dbeta of the global batch: the gradient
        sums are summed over the ranks between the two backward passes."""
        comm = self._sync_comm if self._sync_comm is not None else active(self.comm)
        if comm is None:
            return super()._bn_backward(dy)
        try:
            ctx = self._cached("_ctx")
            dy, error = self._check_dy(dy, ctx.shape, ctx.dtype), None
        except Exception as exc:
            ctx, error = None, exc
        mode = ctx.training if ctx is not None else self.uses_batch_stats
        self._agree(comm, _BACKWARD, mode, error, 0 if error is None else 1)
        grads = batch_norm_backward(dy, ctx, allreduce=lambda sums: sum_in_rank_order(comm, sums))
        self._count(_BACKWARD)
        return grads

    def extra_repr(self) -> str:
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

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str | None = None,
        dtype: DTypeLike = np.float32,
        comm: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation, dtype)
        self._set_comm(comm)


@register_layer("sync_batch_norm2d")
class SyncBatchNorm2d(SyncBatchNormMixin, BatchNorm2d):
    """:class:`~numbabn.layers.BatchNorm2d` synchronized over the ranks of ``comm``
    (NCHW, or NHWC with ``channels_last=True``; N may differ between ranks, 0 included).

    ``comm``: as for :class:`SyncBatchNorm1d`.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        activation: str | None = None,
        dtype: DTypeLike = np.float32,
        channels_last: bool = False,
        comm: Any = None,
    ) -> None:
        super().__init__(num_features, eps, momentum, affine, track_running_stats, activation, dtype, channels_last)
        self._set_comm(comm)
