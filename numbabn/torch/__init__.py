"""numbabn inside PyTorch: drop-in batch norm modules on numbabn's kernels, a CPU
SyncBatchNorm over torch.distributed, and model converters.

    import numbabn.torch as nbt
    nbt.convert_batchnorm(model, fuse_relu=True)     # every BatchNorm*, in place
    nbt.convert_batchnorm(model, sync=True)          # SyncBatchNorm for gloo/CPU DDP

Needs PyTorch (``pip install 'numbabn[torch]'``); ``import numbabn`` never imports it.
"""

from .convert import convert_batchnorm, fold_batchnorm
from .function import BatchNormFunction
from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, FusedReLU
from .sync import SyncBatchNorm

__all__ = [
    "BatchNorm1d",
    "BatchNorm2d",
    "BatchNorm3d",
    "FusedReLU",
    "SyncBatchNorm",
    "BatchNormFunction",
    "convert_batchnorm",
    "fold_batchnorm",
]
