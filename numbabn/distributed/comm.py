"""The MPI plumbing of :mod:`numbabn.distributed`: the only module that talks to mpi4py.

Every collective here is ONE ``comm.Allgather`` of a fixed-size float64 buffer,
after which every rank reduces the gathered rows itself, in rank order:

* :func:`merge_in_rank_order` -- per-channel :class:`~numbabn.stats.Moments`
  packed as ``[count, mean..., m2...]`` (2C+1 values), merged exactly with Chan et al.
  (``merge(...merge(merge(empty, rank0), rank1)..., rank P-1)``);
* :func:`sum_in_rank_order` -- any float64 array (the backward pass's (2, C) sums,
  the parameter gradients), summed ``rank0 + rank1 + ... + rank P-1``.

Why not ``Allreduce``: the MPI standard leaves the order (and grouping) in which a
reduction combines the ranks' contributions to the implementation and does not
require every rank to receive the same bits (MPI-4.0 only *recommends* reproducible
reductions). Float addition is not associative, so ranks could drift apart by an
ulp per step, and the result may change with the MPI library, the process count
or the message size. With Allgather + the same deterministic code on identical
bytes, every rank gets bit-identical statistics and gradients by construction, for
any MPI implementation. The price is received volume (P rows instead of one);
for batch-norm statistics (a few KB per layer) the collective is latency-bound and
this does not matter -- see :mod:`numbabn.distributed.sync_batchnorm` for the bytes.

Before each of them the synchronized layers exchange a fixed-size header
(:func:`agree`, one more ``Allgather`` of 8 float64): what every rank is about to do
(forward or backward, the layer's call number, channels, dtype, batch or running
statistics) and whether its own input check failed. Every rank checks every row and,
when they differ or any rank failed, raises the same :class:`SyncError` -- nobody is
left waiting in a collective, and no payload of mismatched size is ever exchanged
(MPI requires equal counts: "Message truncated", or garbage merged, otherwise). The
header needs its own collective because it must be exchanged *before* the sizes of
the payload are known to agree.

Communicators: an ``mpi4py.MPI.Intracomm`` (``MPI.COMM_WORLD``, a ``Split``/``Dup``
of it) or any object with the same ``Get_rank``, ``Get_size`` and
``Allgather(sendbuf, recvbuf)`` methods. ``None`` means ``MPI.COMM_WORLD`` when
mpi4py can start MPI, and no synchronization at all otherwise. A communicator of
size 1 never communicates.
"""

import functools
import os
import sys
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from numpy.typing import ArrayLike, NDArray

from .. import _checks as V
from ..stats import Moments, merge_moments

_METHODS = ("Get_rank", "Get_size", "Allgather")

# The header of every synchronized exchange (see the module docstring and :func:`agree`).
HEADER = ("magic", "version", "exchange", "call", "channels", "itemsize", "mode", "error")
_MAGIC, _VERSION = 1.2512e9, 1.0  # any value no statistic is likely to start with
EXCHANGES = {1: "forward", 2: "backward"}
MODES = {1: "batch statistics", 0: "running statistics"}


class SyncError(RuntimeError):
    """The ranks of a synchronized layer disagree (channels, dtype, mode, forward vs
    backward, call number) or one of them rejected its input. Raised on EVERY rank,
    with the same message, before any state changes (on the rank whose own check
    failed, that error is chained as ``__cause__``)."""


# Environment variables through which MPI launchers announce the number of ranks
# (MPICH/Intel MPI's Hydra, Open MPI): used only to refuse silently running
# unsynchronized when mpiexec started us but mpi4py is unusable.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def check_comm(owner: str, comm: Any) -> Any:
    """``comm`` validated: None, or an intracommunicator (clear TypeError otherwise)."""
    if comm is None:
        return None
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and isinstance(comm, mpi.Comm) and not isinstance(comm, mpi.Intracomm):
        raise TypeError(
            f"{owner}: comm must be an intracommunicator such as MPI.COMM_WORLD, got "
            f"{type(comm).__name__} {comm.Get_name() if comm != mpi.COMM_NULL else 'MPI.COMM_NULL'}"
        )
    missing = [m for m in _METHODS if not callable(getattr(comm, m, None))]
    if missing:
        raise TypeError(
            f"{owner}: comm must be None or an mpi4py.MPI.Intracomm (e.g. MPI.COMM_WORLD), got "
            f"{V.describe(comm)}, which has no {', '.join(missing)} method"
        )
    return comm


def _launched_size() -> int:
    """The number of ranks an MPI launcher announced (1 when none did)."""
    for var in _LAUNCHER_SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


@functools.cache
def world() -> Any:
    """``MPI.COMM_WORLD``, or None when mpi4py is not installed or cannot load an
    MPI library (a single process then: nothing to synchronize).

    Raises RuntimeError instead of returning None when an MPI launcher started
    this process as one of several ranks: training would otherwise silently run
    unsynchronized on every rank.
    """
    try:
        from mpi4py import MPI
    except (ImportError, RuntimeError) as exc:
        ranks = _launched_size()
        if ranks > 1:
            raise RuntimeError(
                f"numbabn.distributed: this process is one of {ranks} MPI ranks, but mpi4py cannot be "
                f"used ({type(exc).__name__}: {exc}); install it with: pip install 'numbabn[mpi]'"
            ) from exc
        return None
    return MPI.COMM_WORLD


def active(comm: Any) -> Any:
    """The communicator to synchronize over, or None for a single process:
    ``comm`` (``world()`` when None) unless it has only one rank."""
    if comm is None:
        comm = world()
    return comm if comm is not None and comm.Get_size() > 1 else None


def allgather_rows(comm: Any, values: ArrayLike) -> NDArray[np.float64]:
    """``(P, values.size)`` float64: row r is rank r's ``values`` (one ``Allgather``).

    Every rank must pass the same number of values.
    """
    row = np.ascontiguousarray(values, dtype=np.float64).ravel()
    rows = np.empty((comm.Get_size(), row.size))
    comm.Allgather(row, rows)
    return rows


def merge_in_rank_order(comm: Any, local: Moments) -> Moments:
    """The exact :class:`~numbabn.stats.Moments` of all ranks' data, bit-identical on
    every rank: one Allgather of the packed ``[count, mean, m2]`` (2C+1 float64), then
    Chan merges in rank order. Ranks without data contribute ``Moments.empty(C)``."""
    merged = Moments.empty(local.channels)
    for row in allgather_rows(comm, local.to_array()):
        merged = merge_moments(merged, Moments.from_array(row))
    return merged


def sum_in_rank_order(comm: Any, local: ArrayLike) -> NDArray[np.float64]:
    """Sum of ``local`` (float64, same shape on every rank) over all ranks, added in
    rank order, bit-identical on every rank (one Allgather)."""
    rows = allgather_rows(comm, local)
    total = rows[0].copy()
    for row in rows[1:]:
        total += row
    return total.reshape(np.shape(local))


def header(
    exchange: float,
    call: float,
    channels: int,
    itemsize: int,
    mode: float,
    error: bool,
) -> NDArray[np.float64]:
    """The 8 float64 header values of one exchange (field names in ``HEADER``)."""
    return np.array([_MAGIC, _VERSION, exchange, call, channels, itemsize, mode, 1.0 if error else 0.0])


_LABELS = {"exchange": "operation", "channels": "channels", "itemsize": "dtype", "mode": "mode", "call": "call number"}


def _values(rows: Sequence[Sequence[float]], field: str, fmt: Callable[[float], str]) -> str:
    return "; ".join(f"rank {r}: {fmt(row[HEADER.index(field)])}" for r, row in enumerate(rows))


def describe_disagreement(rows: Sequence[Sequence[float]]) -> str | None:
    """The error message for gathered headers, or None when they agree (a function of
    ``rows`` only, so every rank builds the same text)."""
    P = len(rows)
    strangers = [r for r, row in enumerate(rows) if row[0] != _MAGIC or row[1] != _VERSION]
    if strangers:
        return (
            f"SyncBatchNorm: rank(s) {strangers} of {P} sent no synchronized-batch-norm header: they are in "
            "another collective on this communicator (the ranks do not run the same program order)"
        )
    failed = [r for r, row in enumerate(rows) if row[HEADER.index("error")]]
    if failed:
        what = sorted({EXCHANGES.get(int(row[2]), "?") for row in rows})
        return (
            f"SyncBatchNorm {'/'.join(what)}: the input was rejected on rank(s) {failed} of {P} (that rank's "
            "own error is chained to its exception); every rank raises this error and no layer changed"
        )
    formats = {
        "exchange": lambda v: EXCHANGES.get(int(v), f"? ({v})"),
        "channels": lambda v: f"{int(v)} channels",
        "itemsize": lambda v: {4: "float32", 8: "float64"}.get(int(v), f"? ({v})"),
        "mode": lambda v: MODES.get(int(v), f"? ({v})"),
        "call": lambda v: f"call #{int(v)}",
    }
    differ = [field for field in formats if len({row[HEADER.index(field)] for row in rows}) > 1]
    if not differ:
        return None
    return (
        f"SyncBatchNorm: the {P} ranks disagree -- "
        + " | ".join(f"{_LABELS[field]}: {_values(rows, field, formats[field])}" for field in differ)
        + " -- every rank raises this error and no layer changed (every rank must call the same layers, "
        "in the same order and mode, with the same settings)"
    )


def agree(comm: Any, values: ArrayLike, local_error: BaseException | None = None) -> None:
    """Exchange this rank's :func:`header` ``values`` (one Allgather) and raise
    :class:`SyncError` on every rank unless all rows agree and none has its error flag
    set; ``local_error`` (this rank's own failure) becomes the ``__cause__``."""
    message = describe_disagreement(allgather_rows(comm, values))
    if message is not None:
        raise SyncError(message) from local_error
