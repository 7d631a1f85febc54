"""ResNet-18 for 32x32 images (CIFAR-style stem), written so that every
conv -> BN -> ReLU is a ``torch.nn.Sequential``: :func:`numbabn.torch.convert_batchnorm` with
``fuse_relu=True`` can then fold those ReLUs into the batch norms (9 of the 20).
The ReLU after each residual addition stays separate unless :func:`fuse_residual`
folds the addition and that ReLU into the block's last batch norm (a numbabn
``BatchNorm2d(activation="relu")`` called as ``bn(out, residual=identity)``: 8 more
fused BNs). :func:`~numbabn.torch.convert_batchnorm` cannot do this for an arbitrary model: the
addition lives in a block's ``forward`` code, not in a ``Sequential``; a user writes
it as this module's :class:`BasicBlock` does. Used by the benchmark
(:mod:`numbabn.bench.torch_modules`) and the converter tests; no weights, no download.

Layout (torchvision's resnet18 with a 3x3 stride-1 stem and no max-pool)::

    conv3x3(3, 64) BN ReLU
    4 stages x 2 BasicBlocks, widths 64, 128, 256, 512, stride 2 entering stages 2-4
        block: relu(BN(conv3x3(ReLU(BN(conv3x3(x))))) + shortcut(x)),
               shortcut = identity, or conv1x1(stride) BN when the shape changes
    global average pool, Linear(512, num_classes)
"""

import torch
from torch import nn


def _conv_bn(cin: int, cout: int, kernel: int, stride: int, relu: bool) -> list[nn.Module]:
    layers = [nn.Conv2d(cin, cout, kernel, stride, padding=kernel // 2, bias=False), nn.BatchNorm2d(cout)]
    return layers + [nn.ReLU(inplace=True)] if relu else layers


class BasicBlock(nn.Module):
    """ResNet basic block: relu(conv-bn-relu-conv-bn(x) + shortcut(x)); the shortcut is a
    strided 1x1 conv-bn when the stride or the channel count changes, else the identity."""

    def __init__(self, cin: int, cout: int, stride: int) -> None:
        super().__init__()
        self.branch = nn.Sequential(*_conv_bn(cin, cout, 3, stride, True), *_conv_bn(cout, cout, 3, 1, False))
        changes = stride != 1 or cin != cout
        self.shortcut = nn.Sequential(*_conv_bn(cin, cout, 1, stride, False)) if changes else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        identity = self.shortcut(x)
        bn = self.branch[-1]
        if getattr(bn, "fuses_residual", False):
            # relu(bn(out) + identity) as one numbabn op, forward and backward.
            out = x
            for i in range(len(self.branch) - 1):
                out = self.branch[i](out)
            return bn(out, residual=identity)
        return torch.relu(self.branch(x) + identity)


def fuse_residual(model: torch.nn.Module) -> torch.nn.Module:
    """Fold each :class:`BasicBlock`'s residual addition and ReLU into its last batch
    norm, in place (after :func:`~numbabn.torch.convert_batchnorm`, which makes them
    numbabn modules); returns ``model``. Parameters, buffers and outputs are unchanged.
    Blocks already fused (a second call) are left as they are. A fused block calls
    its ``branch`` layer by layer (the last batch norm takes the residual), so hooks
    registered on the ``branch`` Sequential itself no longer run: register them on
    its layers."""
    from .modules import NumbabnBatchNorm

    # A fused block's batch norm has activation="relu": the check below would refuse it.
    blocks = [m for m in model.modules() if isinstance(m, BasicBlock) and not _fused(m.branch[-1])]
    for block in blocks:
        bn = block.branch[-1]
        if not isinstance(bn, NumbabnBatchNorm) or bn.activation is not None:
            raise TypeError(
                f"fuse_residual: a block's last batch norm must be a numbabn.torch module without "
                f"activation (run convert_batchnorm first), got {bn!r}"
            )
    for block in blocks:
        block.branch[-1].activation = "relu"
        block.branch[-1].fuses_residual = True
    return model


def _fused(bn: torch.nn.Module) -> bool:
    """Whether :func:`fuse_residual` fused ``bn``, a block's last batch norm."""
    return bool(getattr(bn, "fuses_residual", False)) and getattr(bn, "activation", None) == "relu"


def resnet18(num_classes: int = 10) -> nn.Sequential:
    """The network described in the module docstring, with torch.nn.BatchNorm2d."""
    layers = _conv_bn(3, 64, 3, 1, True)
    cin = 64
    for i, width in enumerate((64, 128, 256, 512)):
        for j in range(2):
            layers.append(BasicBlock(cin, width, 2 if i and not j else 1))
            cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))
