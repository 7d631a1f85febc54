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
statistics) and whether its own check of its arguments failed (and which: the
input, the layer's state, or one of its settings, :data:`REJECTED`). Every rank
checks every row and, when they differ or any rank failed, raises the same
:class:`SyncError` -- nobody is left waiting in a collective, and no payload of
mismatched size is ever exchanged (MPI requires equal counts: "Message truncated",
or garbage merged, otherwise). The header needs its own collective because it must
be exchanged *before* the sizes of the payload are known to agree. The layer's
settings (eps, momentum, affine, activation, track_running_stats:
:func:`settings_row`) need none: their size is fixed, so they travel with the
forward's moments and are compared before anything is computed from them.

After a disagreement every rank moves the layer's call number past the largest
any rank sent (:func:`next_call`), so that ranks whose counts drifted apart (one
rolled back a successful call) disagree once, not on every later call.

The data-parallel helpers use the same error-flag protocol without a header: each
rank's row starts with 0, or the code of the argument its own check refused, and
every rank raises the same SyncError when any is set (:func:`raise_if_rejected`).

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
#: The header's error field: what a rank's own check refused, by code (0: nothing).
REJECTED = {
    1: "the input",
    2: "the layer's state (parameters, running statistics)",
    3: "the layer's eps",
    4: "the layer's momentum",
    5: "the layer's activation",
    6: "the layer's track_running_stats",
}


class SyncError(RuntimeError):
    """The ranks of a synchronized call disagree (channels, dtype, mode, forward vs
    backward, call number, the layer's settings, the gradients to sum) or one of them
    rejected its arguments. Raised on EVERY rank, with the same message, before any
    state changes (on the rank whose own check failed, that error is chained as
    ``__cause__``). A synchronized layer's call number is the one exception: after a
    disagreement every rank continues from the same one (see :func:`agree`)."""


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
                f"used ({type(exc).__name__}: {exc}); install it with: pip install mpi4py mpich (numbabn's 'mpi' extra)"
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


def merge_in_rank_order(comm: Any, local: Moments, settings: ArrayLike = ()) -> Moments:
    """The exact :class:`~numbabn.stats.Moments` of all ranks' data, bit-identical on
    every rank: one Allgather of the packed ``[count, mean, m2]`` (2C+1 float64), then
    Chan merges in rank order. Ranks without data contribute ``Moments.empty(C)``.

    ``settings`` (:func:`settings_row`, the same number of values on every rank) travel
    in the same row: unless they are equal on every rank, every rank raises the same
    :class:`SyncError` naming each differing setting and its value rank by rank."""
    n = 2 * local.channels + 1
    rows = allgather_rows(comm, np.concatenate([local.to_array(), np.asarray(settings, dtype=np.float64)]))
    if rows.shape[1] > n:
        differ = _differences(rows[:, n:], SETTINGS, _SETTINGS_FORMATS)
        if differ is not None:
            raise SyncError(f"SyncBatchNorm forward: the {len(rows)} ranks disagree -- {differ}{_DISAGREE_TAIL}")
    merged = Moments.empty(local.channels)
    for row in rows:
        merged = merge_moments(merged, Moments.from_array(row[:n]))
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
    rejected: int,
) -> NDArray[np.float64]:
    """The 8 float64 header values of one exchange (field names in ``HEADER``);
    ``rejected``: 0, or the :data:`REJECTED` code of what this rank's own check refused."""
    return np.array([_MAGIC, _VERSION, exchange, call, channels, itemsize, mode, float(rejected)])


def settings_row(
    eps: float, momentum: float | None, affine: bool, activation: str | None, track_running_stats: bool, buffers: bool
) -> NDArray[np.float64]:
    """A synchronized layer's settings, already checked on this rank, as the float64
    values (named in ``SETTINGS``) that travel with its forward payload. ``buffers``:
    the layer has running statistics."""
    return np.array(
        [
            eps,
            -1.0 if momentum is None else momentum,  # valid momenta are in [0, 1]
            1.0 if affine else 0.0,
            0.0 if activation is None else 1.0,  # "relu", the one activation there is
            2.0 * buffers + bool(track_running_stats),
        ]
    )


# How the compared columns read in messages, by field: a function of the value only,
# so that every rank builds the same text.
_HEADER_FORMATS: dict[str, tuple[str, Callable[[float], str]]] = {
    "exchange": ("operation", lambda v: EXCHANGES.get(int(v), f"? ({v})")),
    "channels": ("channels", lambda v: f"{int(v)} channels"),
    "itemsize": ("dtype", lambda v: {4: "float32", 8: "float64"}.get(int(v), f"? ({v})")),
    "mode": ("mode", lambda v: MODES.get(int(v), f"? ({v})")),
    "call": ("call number", lambda v: f"call #{int(v)}"),
}
_TRACKING = {
    3.0: "True",
    2.0: "False (running statistics kept, not updated)",
    1.0: "True (no running statistics: built with track_running_stats=False)",
    0.0: "False",
}
_SETTINGS_FORMATS: dict[str, tuple[str, Callable[[float], str]]] = {
    "eps": ("eps", lambda v: repr(float(v))),
    "momentum": ("momentum", lambda v: "None" if v == -1 else repr(float(v))),
    "affine": ("affine", lambda v: str(v == 1)),
    "activation": ("activation", lambda v: "None" if v == 0 else "'relu'"),
    "track_running_stats": ("track_running_stats", lambda v: _TRACKING[float(v)]),
}
SETTINGS = tuple(_SETTINGS_FORMATS)


def _differences(
    rows: NDArray[np.float64], names: Sequence[str], formats: dict[str, tuple[str, Callable[[float], str]]]
) -> str | None:
    """``label: rank 0: value; rank 1: value`` for each column (named by ``names``)
    whose value is not the same on every rank, joined by `` | ``; None when all agree."""
    parts = []
    for field, (label, fmt) in formats.items():
        column = rows[:, names.index(field)]
        if (column != column[0]).any():
            parts.append(f"{label}: " + "; ".join(f"rank {r}: {fmt(v)}" for r, v in enumerate(column)))
    return " | ".join(parts) if parts else None


_DISAGREE_TAIL = (
    " -- every rank raises this error and no layer changed (every rank must call the same layers, in the "
    "same order and mode, with the same settings)"
)


def describe_disagreement(rows: ArrayLike) -> str | None:
    """The error message for gathered headers, or None when they agree (a function of
    ``rows`` only, so every rank builds the same text)."""
    rows = np.asarray(rows, dtype=np.float64)
    P = len(rows)
    strangers = [r for r, row in enumerate(rows) if row[0] != _MAGIC or row[1] != _VERSION]
    if strangers:
        return (
            f"SyncBatchNorm: rank(s) {strangers} of {P} sent no synchronized-batch-norm header: they are in "
            "another collective on this communicator (the ranks do not run the same program order)"
        )
    codes = rows[:, HEADER.index("error")]
    if codes.any():
        what = sorted({EXCHANGES.get(int(row[2]), "?") for row in rows})
        rejected = "; ".join(
            f"{REJECTED.get(int(code), f'? ({code})')} was rejected on rank(s) "
            f"{[r for r, c in enumerate(codes) if c == code]}"
            for code in sorted(set(codes[codes != 0]))
        )
        return (
            f"SyncBatchNorm {'/'.join(what)}: {rejected} of {P} (that rank's own error is chained to its "
            "exception); every rank raises this error and no layer changed"
        )
    formats = dict(_HEADER_FORMATS)
    if len(set(rows[:, HEADER.index("exchange")])) > 1:
        del formats["call"]  # forward and backward calls are counted apart: nothing to compare
    differ = _differences(rows, HEADER, formats)
    if differ is None:
        return None
    if "call" in formats and len(set(rows[:, HEADER.index("call")])) > 1:
        # A rank that rolled back a successful call (Sequential, Trainer) or skipped
        # one: the numbers continue in step (see agree), the running statistics do not.
        differ += (
            " (from the next call on, every rank continues from the same call number; a rank that rolled "
            "back a successful call keeps its other running statistics)"
        )
    return f"SyncBatchNorm: the {P} ranks disagree -- {differ}{_DISAGREE_TAIL}"


def next_call(rows: ArrayLike) -> int:
    """The call number every rank continues from after gathered headers disagree: one
    past the largest any rank sent (the same on every rank: the same rows)."""
    rows = np.asarray(rows, dtype=np.float64)
    ours = (rows[:, 0] == _MAGIC) & (rows[:, 1] == _VERSION)  # a stranger's row holds no call number
    calls = rows[ours, HEADER.index("call")]
    return int(calls.max()) + 1 if calls.size else 0


def agree(
    comm: Any,
    values: ArrayLike,
    local_error: BaseException | None = None,
    realign: Callable[[int], None] | None = None,
) -> None:
    """Exchange this rank's :func:`header` ``values`` (one Allgather) and raise
    :class:`SyncError` on every rank unless all rows agree and none rejected its own
    arguments; ``local_error`` (this rank's own failure) becomes the ``__cause__``.

    Before raising, ``realign(next_call(rows))`` lets the layer continue from the same
    call number on every rank: otherwise ranks whose counts drifted apart (one rolled
    back a successful call) would disagree on every later call, for good, as
    :mod:`numbabn.torch.sync` does too.
    """
    rows = allgather_rows(comm, values)
    message = describe_disagreement(rows)
    if message is not None:
        if realign is not None:
            realign(next_call(rows))
        raise SyncError(message) from local_error


def raise_if_rejected(
    fn: str, codes: ArrayLike, names: Sequence[str], local_error: BaseException | None, changed: str
) -> None:
    """The error-flag protocol of the collectives without a header (the data-parallel
    helpers): ``codes`` holds every rank's gathered code, 0 when its arguments passed
    its own checks, else k for ``names[k - 1]``. Unless all are 0, every rank raises
    the same :class:`SyncError` (``local_error`` chained); ``changed`` says what stayed
    as it was."""
    codes = np.asarray(codes, dtype=np.float64)
    if not codes.any():
        return
    rejected = "; ".join(
        f"the {names[int(code) - 1]} was rejected on rank(s) {[r for r, c in enumerate(codes) if c == code]}"
        for code in sorted(set(codes[codes != 0]))
    )
    raise SyncError(
        f"{fn}: {rejected} of {len(codes)} (that rank's own error is chained to its exception); every rank "
        f"raises this error and {changed}"
    ) from local_error
