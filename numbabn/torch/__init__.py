"""numbabn inside PyTorch: drop-in batch norm modules on numbabn's kernels, a CPU
SyncBatchNorm over torch.distributed, and model converters.

    import numbabn.torch as nbt
    nbt.convert_batchnorm(model, fuse_relu=True)     # every BatchNorm*, in place
    nbt.convert_batchnorm(model, sync=True)          # SyncBatchNorm for gloo/CPU DDP

CPU inputs of fewer than ``numbabn.config.TORCH_NATIVE_BELOW`` values (default 2**20;
8 times that for channels-last inputs, whose PyTorch kernel is faster, 2 times with a
fused ReLU or residual) run PyTorch's own batch norm, where numbabn's per-call Python
would cost more than its kernels save, as does plain inference (no graph, no fused ReLU or residual) below
``TORCH_NATIVE_EVAL_BELOW`` values (2**23), where both read and write memory once, and
so do CUDA tensors, where cuDNN's kernels were faster on the GPU
measured (``NUMBABN_TORCH_CUDA_KERNELS=1`` runs numbabn's; see
:mod:`numbabn.torch.modules`).

Needs PyTorch (``pip install torch``, numbabn's ``torch`` extra); ``import numbabn`` never imports it.
"""

try:
    import torch as _torch  # noqa: F401  (a clear message when it is missing)
except ModuleNotFoundError as exc:
    if exc.name != "torch":
        raise
    raise ModuleNotFoundError(
        "numbabn.torch needs PyTorch, which is not installed: pip install torch (numbabn's 'torch' extra)",
        name="torch",
    ) from exc

from .convert import convert_batchnorm, fold_batchnorm
from .function import BatchNormFunction
from .modules import (
    BatchNorm1d,
    BatchNorm2d,
    BatchNorm3d,
    FusedReLU,
    InputDtypeError,
    InputMismatchError,
    UnsupportedDtypeError,
    UnsupportedLayoutError,
)
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
    "InputMismatchError",
    "InputDtypeError",
    "UnsupportedDtypeError",
    "UnsupportedLayoutError",
]
