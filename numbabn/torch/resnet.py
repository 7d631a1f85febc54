"""ResNet-18 for 32x32 images (CIFAR-style stem), written so that every
conv -> BN -> ReLU is a ``torch.nn.Sequential``: :func:`numbabn.torch.convert_batchnorm` with
``fuse_relu=True`` can then fold those ReLUs into the batch norms (9 of the 20).
The ReLU after each residual addition stays separate. Used by the benchmark
(``numbabn.torch.benchmark``) and the converter tests; no weights, no download.

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
        return torch.relu(self.branch(x) + self.shortcut(x))


def resnet18(num_classes: int = 10) -> nn.Sequential:
    """The network described in the module docstring, with torch.nn.BatchNorm2d."""
    layers = _conv_bn(3, 64, 3, 1, True)
    cin = 64
    for i, width in enumerate((64, 128, 256, 512)):
        for j in range(2):
            layers.append(BasicBlock(cin, width, 2 if i and not j else 1))
            cin = width
    return nn.Sequential(*layers, nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(512, num_classes))
