"""``SyncBatchNorm`` for CPU tensors over ``torch.distributed`` (gloo), which
``torch.nn.SyncBatchNorm`` refuses ("expected input tensor to be on GPU").

Each rank holds a slice of the global batch (any size, zero included). In training
mode, per layer and step:

forward
    local ``numbabn.moments(x)`` -> ONE ``all_gather`` of a header
    ``[exchange, ok, C, call, dtype, eps, momentum, affine, bias,
    track_running_stats, activation]`` and the packed moments ``[count, mean(C),
    m2(C)]``, the header checked on every rank -> merged exactly (Chan) in rank order
    -> ``batch_norm_forward(..., moments=merged)``. Running statistics see the global
    count m (``var*m/(m-1)``).
backward
    this rank's (2, C) sums ``[sum g, sum g*(x - mean)]`` -> ONE ``all_gather`` of the
    header and the sums -> summed in rank order -> ``dx``.

(A layer of more than 512 channels gathers the rest of its payload in a second
``all_gather``, see below.)

Every rank gathers the same bytes and reduces them with the same code in the same
order, so statistics and ``dx`` are bit-identical on all ranks, whatever the
backend's reduction order (this is why it is all_gather, not all_reduce). The
result equals one BatchNorm on the concatenation of the ranks' batches in rank
order, to float rounding. ``weight.grad``/``bias.grad`` are this rank's share, as in
``torch.nn.SyncBatchNorm``: summed over the ranks they are the global batch's
gradients, and DistributedDataParallel's averaging completes them like any other
parameter's. Uneven inputs under DDP's ``join()`` need
``throw_on_early_termination=True``, as for ``torch.nn.SyncBatchNorm``: ``Join``
shadows only DDP's own collectives, not this layer's ``all_gather``.

The header makes misuse fail on every rank instead of hanging, crashing or merging
garbage. The gathered row has one size on every rank, whatever the layer and the
exchange (header plus room for the payload of 512 channels), so it always arrives;
what does not fit follows only when every header agrees. (Rows sized by the payload,
as before, differed between ranks whose layers have other channel counts, or where
one rank was in a backward and another in a forward: gloo aborted one rank's process
from its C++ code, and the other read a payload as a header. A separate header
gather would cost a second collective per exchange: 2 ms more per layer and step,
measured with 2 ranks on a 2-vCPU VM.) An
input refused on one rank (wrong channel count, dtype, a setting checked below, a
tensor subclass such as ``DTensor``, ...) still sends its header with ``ok=0``, and
then every rank raises; ranks that disagree on the exchange (forward statistics or backward sums),
the channel count, the dtype, how many synchronized calls this layer made, or the
layer's settings (``eps``, ``momentum`` including None against a number, ``affine``,
``bias``, ``track_running_stats``, ``activation``; the error lists each that
differs with every rank's value) raise too. Nothing is updated when it raises, and
the layer works again once the ranks agree. A meta input (shapes only, a model on the
meta device) exchanges no statistics: every rank's input must be meta then, or every
rank raises. Recording the layer while it synchronizes (``torch.jit.trace``,
``torch.export``, ``torch.fx``, ``torch.func`` transforms) raises without an
exchange, on every rank that records: a rank that records alone must not wait for
the others; so does a tensor subclass input under a ``TorchDispatchMode``
(``FakeTensorMode``'s fake tensors), where the exchange's own tensors would be
fake. Two layers of the same channel count called in swapped order on two ranks
cannot be told apart (each layer counts its own calls), as with
``torch.nn.SyncBatchNorm``.

``eps`` must be a finite number > 0 in training mode (with one process too), checked
before anything changes: the kernels that synchronize refuse ``eps=0`` (a channel of
zero variance would give inf), and PyTorch's op, which cannot stand in for them,
refuses it in training as well. In eval mode ``eps=0`` runs PyTorch's op, as in
torch.nn.

In eval mode (and with one process, or torch.distributed not initialised) the layer
is a plain numbabn BatchNorm. CUDA tensors are not synchronized by numbabn: use
``torch.nn.SyncBatchNorm`` (NCCL) there.

Every rank must be in the same mode. An eval-mode call exchanges nothing, as in
``torch.nn.SyncBatchNorm``, so that ranks can evaluate different numbers of batches
(an uneven validation split); the price is that a rank left in eval mode while the
others train cannot be detected: the training ranks wait in an exchange that rank
never joins, or meet its next collective. (numbabn's MPI layer,
:mod:`numbabn.distributed.sync_batchnorm`, also exchanges nothing in an eval forward
with running statistics; without them it synchronizes the batch statistics in eval
too, where this layer, as torch.nn's, uses the local batch's.)
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.modules.batchnorm import _BatchNorm

import numbabn
from numbabn._checks import check_number

from . import _bridge as B
from . import _openmp
from .modules import _PLAIN, NumbabnBatchNorm, _functorch_active, _is_exporting, check_activation

_DTYPE_CODE = {torch.float16: 16, torch.bfloat16: 116, torch.float32: 32, torch.float64: 64}  # compared for equality
_DTYPE_NAME = {code: str(dtype).removeprefix("torch.") for dtype, code in _DTYPE_CODE.items()}  # for the errors
_FORWARD, _BACKWARD = 1.0, 2.0  # the header's exchange: forward statistics or backward gradient sums
# The header's ok: this rank's input was refused (it raises its own error), has data,
# or is a meta tensor (shapes only: nothing to exchange, which every rank must agree on).
_REFUSED, _OK, _SHAPES_ONLY = 0.0, 1.0, 2.0
# The layer's settings in the header, each with how a gathered value reads in the
# error: ranks that differ in any of them would compute different outputs, gradients
# or running statistics from the same merged moments, silently.
_SETTINGS: tuple[tuple[str, Callable[[float], Any]], ...] = (
    ("eps", float),
    ("momentum", lambda v: None if v < 0 else float(v)),  # None is sent as -1
    ("affine", bool),  # whether there is a weight
    ("bias", bool),  # whether there is a bias (bias=False)
    ("track_running_stats", bool),
    ("activation", lambda v: "relu" if v else None),
)
_HEAD = 5 + len(_SETTINGS)  # exchange, ok, channels, call, dtype, settings
# Payload values sent in the header's all_gather: a forward's moments (2C + 1 values)
# or a backward's sums (2C) of up to 512 channels. An all_gather per exchange costs
# 1-2 ms on a 2-vCPU VM over loopback; 8 KB instead of 1 KB costs nothing measurable.
_INLINE = 2 * 512 + 1


class SyncBatchNorm(NumbabnBatchNorm, _BatchNorm):
    """Batch norm over (N, C, ...) input (any ndim >= 2, contiguous or channels-last)
    synchronized across the ranks of ``process_group`` (None: the default group).

    Same constructor, parameters, buffers and state_dict keys as
    ``torch.nn.SyncBatchNorm``, plus ``activation=None | "relu"`` (fused ReLU). It is
    deliberately not a subclass of ``torch.nn.SyncBatchNorm``: DistributedDataParallel
    refuses CPU modules containing one. Every rank must give the layer the same
    settings (checked at every synchronized call); ``eps`` must be a finite number
    > 0 in training mode. See :mod:`numbabn.torch.sync` for the protocol.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        process_group: Any = None,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        activation: str | None = None,
    ) -> None:
        _BatchNorm.__init__(
            self,
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,
            **({} if bias else {"bias": False}),
        )
        self.process_group = process_group
        self._set_activation(activation)
        self._sync_calls = 0

    _may_synchronize = True

    @classmethod
    def convert_sync_batchnorm(cls, module: torch.nn.Module, process_group: Any = None) -> torch.nn.Module:
        """What ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does, with numbabn's
        layer: every batch norm in ``module`` becomes a :class:`SyncBatchNorm` over
        ``process_group`` (None: the default group), keeping its parameters, buffers
        and mode. It is ``convert_batchnorm(module, sync=True,
        process_group=process_group)``, which works in place (see there). Returns
        ``module``, or its replacement when ``module`` is a batch norm."""
        from .convert import convert_batchnorm  # convert imports this module

        return convert_batchnorm(module, sync=True, process_group=process_group)

    def _check_input_dim(self, input: torch.Tensor) -> None:
        if input.dim() < 2:
            raise ValueError(f"expected at least 2D input (got {input.dim()}D input)")
        if input.shape[1] == 0:
            # torch.nn.SyncBatchNorm's check; PyTorch's op raised IndexError after the
            # batch count had been incremented.
            raise ValueError(f"{type(self).__name__}: number of input channels should be non-zero")

    def _group(self) -> Any:
        """The process group to synchronize over, or None when there is nothing to do."""
        if not (self.training and dist.is_available() and dist.is_initialized()):
            return None
        group = self.process_group or dist.group.WORLD
        return group if dist.get_world_size(group) > 1 else None

    def _input_rejected(self, error: Exception) -> None:
        group = self._group()
        if group is not None:  # the other ranks are about to wait for this one
            self._gather_moments(group, None, None)

    def _check_call(self, input: torch.Tensor, residual: torch.Tensor | None, state: tuple[Any, ...]) -> None:
        """The plain layers' checks, then the settings the ranks exchange: checked here,
        before the exchange, so that a bad one goes out as a refused input and every
        rank raises before anything changes. ``eps`` must be a finite number > 0 in
        training mode: the synchronized kernels refuse anything else, and PyTorch's op
        cannot stand in for them (torch.nn refuses eps=0 in training too, from its op)."""
        super()._check_call(input, residual, state)
        if self.training:
            check_number(
                type(self).__name__,
                "eps",
                self.eps,
                0,
                low_open=True,
                expected="a finite number > 0 in training mode (it is added to the batch variance, and a "
                "channel of zero variance would give inf; set SyncBatchNorm(eps=...) or the module's eps)",
            )
        check_activation(type(self).__name__, self.activation)  # set after construction, perhaps
        if input.numel() == input.shape[1] > 0 and (self.training or state[2] is None) and self._group() is None:
            # One value per channel, not synchronizing (the others' values would count):
            # the plain layers' error, named by the layer (the kernels name themselves).
            raise ValueError(
                f"{type(self).__name__}: Expected more than 1 value per channel when training, got input size "
                f"{input.size()}"
            )

    def _without_kernels(self, input: Any, residual: Any, batch_stats: bool) -> None:
        group = self._group() if batch_stats else None
        if group is None:
            return
        name = type(self).__name__
        if isinstance(input, torch.fx.Proxy) or torch.jit.is_tracing() or _is_exporting() or _functorch_active():
            # No exchange to tell the other ranks (a recorder would record the collective
            # too, and a rank that records alone would wait for the others): a script that
            # records on every rank raises on every rank.
            raise NotImplementedError(
                f"{name}: cannot synchronize batch statistics while torch.jit.trace, torch.export, "
                "torch.fx or a torch.func transform record a graph; record the model in eval mode or in a "
                "single process"
            )
        if input.is_meta and type(input) in _PLAIN and (residual is None or type(residual) in _PLAIN):
            # Shapes only (a model on the meta device), which every rank must agree on:
            # a rank with data would otherwise meet this rank's next exchange.
            self._gather_moments(group, None, input.dtype, _SHAPES_ONLY)
            return
        # A tensor subclass. Under a dispatch mode (FakeTensorMode's fake tensors) the
        # exchange's own tensors would be fake: this rank raises alone, as a recorder does.
        if _dispatch_mode() is None:
            self._gather_moments(group, None, None)  # the others raise too
        kinds = sorted({type(t).__name__ for t in (input, residual) if t is not None and type(t) not in _PLAIN})
        raise NotImplementedError(
            f"{name}: cannot synchronize batch statistics of a tensor subclass input ({', '.join(kinds)}): "
            "numbabn reads the memory of a plain torch.Tensor; pass one, or call the layer in eval mode "
            "or in a single process"
        )

    def _synchronize(self, x: torch.Tensor, batch_stats: bool) -> tuple[Any, Any]:
        group = self._group() if batch_stats else None
        if group is None:
            return None, None
        if x.device.type != "cpu":
            self._gather_moments(group, None, None)
            raise NotImplementedError(
                f"{type(self).__name__}: numbabn synchronizes CPU tensors only; "
                f"for {x.device} tensors use torch.nn.SyncBatchNorm"
            )
        perm = B.channels_last_perm(x)
        try:
            with _openmp.use_torch_threads():  # PyTorch's threads, as in BatchNormFunction
                local = numbabn.moments(B.to_array(x, perm), axis=1 if perm is None else -1)
        except Exception:
            self._gather_moments(group, None, None)
            raise
        weight, bias = self._state()[:2]
        # Valid numbers here: _check_call checked eps, momentum and activation.
        settings = (
            float(self.eps),
            -1.0 if self.momentum is None else float(self.momentum),
            weight is not None,
            bias is not None,
            bool(self.track_running_stats),
            self.activation == "relu",
        )
        merged, call = self._gather_moments(group, local, x.dtype, _OK, settings)

        def allreduce(sums: np.ndarray) -> np.ndarray:
            rows = self._exchange(group, _BACKWARD, call, 0, settings, _OK, sums.ravel())
            total = rows[0].copy()
            for row in rows[1:]:
                total += row
            return total.reshape(sums.shape)

        return merged, allreduce

    def _gather_moments(
        self,
        group: Any,
        local: Any,
        dtype: torch.dtype | None,
        ok: float = _REFUSED,
        settings: Sequence[float] = (0.0,) * len(_SETTINGS),
    ) -> tuple[Any, int]:
        """The forward's exchange of this rank's moments (``local``, with ``ok=_OK``
        and the layer's ``settings``; ``local=None``: ``ok=_REFUSED`` announces a
        refused input, ``ok=_SHAPES_ONLY`` a meta input). Returns (merged moments in
        rank order, or None without moments, this call's index)."""
        call = self._sync_calls
        self._sync_calls += 1
        rows = self._exchange(
            group,
            _FORWARD,
            call,
            _DTYPE_CODE.get(dtype, 0),
            settings,
            ok,
            None if local is None else local.to_array(),
        )
        if rows is None:
            return None, call
        merged = numbabn.Moments.empty(self.num_features)
        for row in rows:
            merged = numbabn.merge_moments(merged, numbabn.Moments.from_array(row))
        return merged, call

    def _exchange(
        self, group: Any, exchange: float, call: int, dtype: int, settings: Sequence[float], ok: float, payload: Any
    ) -> Any:
        """All-gather a row of one size on every rank, whatever the layer: the header
        ``[exchange, ok, C, call, dtype, *settings]`` and the first :data:`_INLINE`
        values of ``payload`` (None unless ``ok`` is ``_OK``); check the headers on
        every rank; gather the rest of ``payload`` (more than 512 channels) in a second
        all_gather, of one size too once the headers agree. Returns (P, payload.size)
        float64 rows in rank order, or None for ``payload=None`` (this rank refused
        its input and raises its own error, or every rank's input is meta); every rank
        raises if another refused or the headers disagree (the same headers, so the
        same decision on every rank: nobody gathers again)."""
        n = 0 if payload is None else payload.size
        row = np.zeros(_HEAD + _INLINE)
        row[:_HEAD] = (exchange, ok, self.num_features, call, dtype, *settings)
        if payload is not None:
            row[_HEAD : _HEAD + min(n, _INLINE)] = payload[:_INLINE]
        rows = _all_gather(group, row)
        heads = rows[:, :_HEAD]
        try:
            _check_agree(self, heads[:, :1], (("exchange (forward statistics or backward gradient sums)", _exchange),))
            if ok == _REFUSED:  # this rank refused its input and raises its own error
                self._sync_calls = int(heads[:, 3].max()) + 1  # as the others do below
                return None
            oks = heads[:, 1]
            refused = [r for r, v in enumerate(oks) if v == _REFUSED]
            if refused:
                raise RuntimeError(
                    f"{type(self).__name__}: rank(s) {refused} of the process group refused their "
                    "input or the layer's settings there (see the error raised there); nothing was updated"
                )
            if (oks != oks[0]).any():
                meta = [r for r, v in enumerate(oks) if v == _SHAPES_ONLY]
                raise RuntimeError(
                    f"{type(self).__name__}: rank(s) {meta} of the process group passed a meta tensor "
                    "(shapes only, no statistics) while the others passed data; every rank must pass "
                    "data, or every rank a meta tensor; nothing was updated"
                )
            _check_agree(
                self,
                heads[:, 2:5],
                (("channel count", int), ("synchronized call", int), ("input dtype", _dtype_name)),
            )
            _check_settings(self, heads[:, 5:])
        except RuntimeError:
            # Every rank saw the same headers: all move their call count past the largest
            # (the values need only agree), so that the next call agrees again (a rank
            # that skipped a backward, then caught the error, would otherwise disagree
            # on every later call).
            self._sync_calls = int(heads[:, 3].max()) + 1
            raise
        if payload is None:  # every rank's input is meta: shapes only
            return None
        if n <= _INLINE:
            return rows[:, _HEAD : _HEAD + n]
        return np.concatenate((rows[:, _HEAD:], _all_gather(group, payload[_INLINE:])), axis=1)


# The innermost active TorchDispatchMode (FakeTensorMode, ...), or None; always None if
# a release drops the name (then FakeTensorMode's fake tensors fail in the exchange).
_dispatch_mode = getattr(torch.utils._python_dispatch, "_get_current_dispatch_mode", lambda: None)


def _all_gather(group: Any, row: np.ndarray) -> np.ndarray:
    """(P, row.size) float64: row r is group rank r's ``row`` (one all_gather; every
    rank's row must have the same size, or gloo aborts the process)."""
    t = torch.from_numpy(np.ascontiguousarray(row, dtype=np.float64))
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size(group))]
    dist.all_gather(parts, t, group=group)
    return torch.stack(parts).numpy()


def _dtype_name(code: float) -> str:
    """The name of an input dtype as the header sends it (0: one the layer refuses)."""
    return _DTYPE_NAME.get(int(code), "another dtype")


def _exchange(code: float) -> str:
    return "forward" if code == _FORWARD else "backward"


def _check_agree(
    module: torch.nn.Module, rows: np.ndarray, columns: Sequence[tuple[str, Callable[[float], Any]]]
) -> None:
    """The leading columns of ``rows`` (one (name, how a value reads) each) must be
    equal on every rank."""
    for col, (name, read) in enumerate(columns):
        values = rows[:, col]
        if (values != values[0]).any():
            raise RuntimeError(
                f"{type(module).__name__}: the ranks of the process group disagree on the {name} "
                f"({[read(v) for v in values]} by rank); every rank must call the same layers in the "
                "same order with inputs of the same channels and dtype"
            )


def _check_settings(module: torch.nn.Module, rows: np.ndarray) -> None:
    """The layer's settings (columns of ``rows``, as in :data:`_SETTINGS`) must be equal
    on every rank; the error names every one that is not, with each rank's value."""
    differ = [
        f"{name} {[read(v) for v in rows[:, col]]} by rank"
        for col, (name, read) in enumerate(_SETTINGS)
        if (rows[:, col] != rows[0, col]).any()
    ]
    if differ:
        raise RuntimeError(
            f"{type(module).__name__}: the ranks of the process group disagree on the layer's settings: "
            f"{'; '.join(differ)}; every rank must give this layer the same eps, momentum, affine, bias, "
            "track_running_stats and activation; nothing was updated"
        )
