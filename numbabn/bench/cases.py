"""What the benchmarks time: ops, bytes moved, cases and suites, and the parts of the
scikit-learn and PyTorch benchmarks.

Imports nothing beyond the standard library: the CLI builds its option choices from
these names while answering ``--help``.
"""

from dataclasses import dataclass

OPS = ("forward", "eval", "backward")
# Bytes moved, multiples of S = bytes of x: training forward reads x twice and writes
# y, eval reads x and writes y, backward reads x and dy twice and writes dx.
TRAFFIC = {"forward": 3, "eval": 2, "backward": 5}
COMPARE = ("numpy", "torch")  # what the kernels can be timed against
SKLEARN_PARTS = ("transformer", "mlp")  # numbabn.bench.sklearn_estimators
TORCH_PARTS = ("bn", "step")  # numbabn.bench.torch_modules


@dataclass(frozen=True)
class Case:
    """One benchmark input: ``shape`` with channel axis ``axis``."""

    name: str
    shape: tuple
    axis: int = 1

    @property
    def layout(self) -> str:
        if len(self.shape) == 2:
            return "nc"
        return "nhwc" if self.axis in (-1, len(self.shape) - 1) else "nchw"

    @property
    def channels(self) -> int:
        return self.shape[self.axis]


SUITES = {
    "default": (
        Case("resnet-conv1", (64, 64, 56, 56)),
        Case("resnet-stage3", (128, 256, 14, 14)),
        Case("resnet-nhwc", (64, 56, 56, 64), -1),
        Case("mlp-wide", (4096, 1024)),
        Case("tiny", (64, 100)),
    ),
    "resnet": (
        Case("resnet-conv1", (64, 64, 56, 56)),
        Case("resnet-stage2", (64, 128, 28, 28)),
        Case("resnet-stage3", (128, 256, 14, 14)),
        Case("resnet-stage4", (128, 512, 7, 7)),
        Case("resnet-nhwc", (64, 56, 56, 64), -1),
    ),
    "mlp": (
        Case("mlp-wide", (4096, 1024)),
        Case("mlp-tall", (65536, 64)),
        Case("mlp-small", (256, 512)),
    ),
    "tiny": (
        Case("tiny", (64, 100)),
        Case("tiny-conv", (8, 16, 8, 8)),
    ),
}


def parse_shape(text: str) -> tuple[int, ...]:
    """'64x64x56x56' -> (64, 64, 56, 56); ValueError with the offending text."""
    parts = text.lower().split("x")
    # only ASCII digits between the 'x's (a '-' before them is refused below as not
    # positive): int() would also take "1_0", " 8 ", "+8" and other scripts' digits
    if not all((d := p.removeprefix("-")) and d.isascii() and d.isdigit() for p in parts):
        raise ValueError(f"shape must look like 64x64x56x56, got {text!r}")
    shape = tuple(int(p) for p in parts)
    if len(shape) < 2 or min(shape) < 1:
        raise ValueError(f"shape needs >= 2 positive sizes, got {text!r}")
    return shape
