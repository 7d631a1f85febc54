"""Scale-out on existing engines: MPI (mpi4py) for synchronized batch norm and
data-parallel training, Dask for out-of-core statistics. No networking of our own.

* :class:`SyncBatchNorm1d`, :class:`SyncBatchNorm2d` -- batch norm whose statistics
  and gradients are those of the batch spread over all MPI ranks (exact Chan merge
  of per-rank moments; see :mod:`numbabn.distributed.sync_batchnorm`); ranks that
  disagree (channels, dtype, mode, call order, settings) or reject their input or
  settings all raise the same :class:`SyncError` instead of hanging.
* :func:`rank_slice`, :func:`global_mean`, :func:`allreduce_gradients` --
  data-parallel training (:mod:`numbabn.distributed.data_parallel`); a runnable
  example: ``mpiexec -n 2 python -m mpi4py examples/data_parallel_mpi.py --check``.
* :mod:`numbabn.distributed.dask` -- :class:`~numbabn.sklearn.BatchNormTransformer`
  on Dask arrays: chunk moments by the Numba kernels merged in a tree, lazy transform.

mpi4py and dask are optional (numbabn's extras ``mpi`` and ``dask``) and are
imported only when used. Names are loaded lazily (PEP 562), so importing
``numbabn.distributed.dask`` does not import the layers.
"""

from numbabn._lazy import lazy_exports

_LAZY = {
    "SyncBatchNorm1d": "numbabn.distributed.sync_batchnorm",
    "SyncBatchNorm2d": "numbabn.distributed.sync_batchnorm",
    "SyncError": "numbabn.distributed.comm",
    "rank_slice": "numbabn.distributed.data_parallel",
    "global_mean": "numbabn.distributed.data_parallel",
    "allreduce_gradients": "numbabn.distributed.data_parallel",
}

__getattr__, __dir__, __all__ = lazy_exports(globals(), _LAZY)
