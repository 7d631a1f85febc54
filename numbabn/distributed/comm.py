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

Communicators: an ``mpi4py.MPI.Intracomm`` (``MPI.COMM_WORLD``, a ``Split``/``Dup``
of it) or any object with the same ``Get_rank``, ``Get_size`` and
``Allgather(sendbuf, recvbuf)`` methods. ``None`` means ``MPI.COMM_WORLD`` when
mpi4py can start MPI, and no synchronization at all otherwise. A communicator of
size 1 never communicates.
"""
import functools
import os
import sys

import numpy as np

from .. import _validation as V
from ..stats import Moments, merge_moments

_METHODS = ("Get_rank", "Get_size", "Allgather")

# Environment variables through which MPI launchers announce the number of ranks
# (MPICH/Intel MPI's Hydra, Open MPI): used only to refuse silently running
# unsynchronized when mpiexec started us but mpi4py is unusable.
_LAUNCHER_SIZE_VARS = ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE")


def check_comm(owner, comm):
    """``comm`` validated: None, or an intracommunicator (clear TypeError otherwise)."""
    if comm is None:
        return None
    mpi = sys.modules.get("mpi4py.MPI")
    if mpi is not None and isinstance(comm, mpi.Comm) and not isinstance(comm, mpi.Intracomm):
        raise TypeError(
            f"{owner}: comm must be an intracommunicator such as MPI.COMM_WORLD, got "
            f"{type(comm).__name__} {comm.Get_name() if comm != mpi.COMM_NULL else 'MPI.COMM_NULL'}")
    missing = [m for m in _METHODS if not callable(getattr(comm, m, None))]
    if missing:
        raise TypeError(
            f"{owner}: comm must be None or an mpi4py.MPI.Intracomm (e.g. MPI.COMM_WORLD), got "
            f"{V.describe(comm)}, which has no {', '.join(missing)} method")
    return comm


def _launched_size():
    """The number of ranks an MPI launcher announced (1 when none did)."""
    for var in _LAUNCHER_SIZE_VARS:
        value = os.environ.get(var, "")
        if value.isdigit():
            return int(value)
    return 1


@functools.cache
def world():
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
                f"used ({type(exc).__name__}: {exc}); install it with: pip install 'numbabn[mpi]'") from exc
        return None
    return MPI.COMM_WORLD


def active(comm):
    """The communicator to synchronize over, or None for a single process:
    ``comm`` (``world()`` when None) unless it has only one rank."""
    if comm is None:
        comm = world()
    return comm if comm is not None and comm.Get_size() > 1 else None


def allgather_rows(comm, values):
    """``(P, values.size)`` float64: row r is rank r's ``values`` (one ``Allgather``).

    Every rank must pass the same number of values.
    """
    row = np.ascontiguousarray(values, dtype=np.float64).ravel()
    rows = np.empty((comm.Get_size(), row.size))
    comm.Allgather(row, rows)
    return rows


def merge_in_rank_order(comm, local):
    """The exact :class:`~numbabn.stats.Moments` of all ranks' data, bit-identical on
    every rank: one Allgather of the packed ``[count, mean, m2]`` (2C+1 float64), then
    Chan merges in rank order. Ranks without data contribute ``Moments.empty(C)``."""
    merged = Moments.empty(local.channels)
    for row in allgather_rows(comm, local.to_array()):
        merged = merge_moments(merged, Moments.from_array(row))
    return merged


def sum_in_rank_order(comm, local):
    """Sum of ``local`` (float64, same shape on every rank) over all ranks, added in
    rank order, bit-identical on every rank (one Allgather)."""
    rows = allgather_rows(comm, local)
    total = rows[0].copy()
    for row in rows[1:]:
        total += row
    return total.reshape(np.shape(local))
