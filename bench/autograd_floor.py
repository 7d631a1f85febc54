"""The floor under any batch norm written as a Python ``torch.autograd.Function``.

    python bench/autograd_floor.py [--repeat 20] [--shape 64x100]

``numbabn.torch`` runs numbabn's kernels inside a Python autograd Function, so each
forward + backward pays PyTorch's Python-level costs (``Function.apply``, the
autograd engine calling back into Python, gradient accumulation) before any
kernel runs. This times, as ``numbabn bench torch --part bn`` does (forward, then
``y.backward(dy)``, interleaved rounds, median per call), native BN + ReLU, numbabn's
fused module, and a Function with numbabn's 12 arguments whose forward and backward
only allocate their outputs, called bare and from a BatchNorm module. When the
empty Function costs about half of native's time (it does for (64, 100) on the
project's machine), no Python Function, however fast its kernels, is 2x native.
"""

import argparse

import torch

import numbabn.torch as nbt
from numbabn.bench.harness import interleaved


class EmptyFunction(torch.autograd.Function):
    """numbabn's BatchNormFunction signature; allocates the outputs, computes nothing."""

    @staticmethod
    def forward(ctx, x, weight, bias, running_mean, running_var, training, momentum, eps, relu, moments, allreduce, r):
        return torch.empty_like(x)

    @staticmethod
    def backward(ctx, dy):
        c = dy.shape[1]
        return (torch.empty_like(dy), torch.empty(c), torch.empty(c)) + (None,) * 9


class EmptyBatchNorm(torch.nn.BatchNorm1d):
    def forward(self, x):
        args = (self.weight, self.bias, self.running_mean, self.running_var, True, 0.1, 1e-5, True, None, None, None)
        return EmptyFunction.apply(x, *args)


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeat", type=int, default=20)
    parser.add_argument("--shape", default="64x100", help="(N, C) input, e.g. 64x100")
    args = parser.parse_args()
    n, c = (int(v) for v in args.shape.split("x"))
    g = torch.Generator().manual_seed(0)
    x = (torch.randn(n, c, generator=g) * 2 + 1).requires_grad_()
    dy = torch.randn(n, c, generator=g)
    native, ours, empty = torch.nn.BatchNorm1d(c), nbt.BatchNorm1d(c, activation="relu"), EmptyBatchNorm(c)
    w, b, rm, rv = empty.weight, empty.bias, empty.running_mean, empty.running_var

    def timed(forward):
        def run():
            forward().backward(dy)
            x.grad = None

        return run

    fns = {
        "native BN + ReLU": timed(lambda: torch.relu(native(x))),
        "numbabn.torch fused BN + ReLU": timed(lambda: ours(x)),
        "empty Function": timed(lambda: EmptyFunction.apply(x, w, b, rm, rv, True, 0.1, 1e-5, True, None, None, None)),
        "empty Function in a module": timed(lambda: empty(x)),
    }
    for fn in fns.values():
        fn(), fn()
    print(f"forward + backward of ({n}, {c}) float32, torch threads {torch.get_num_threads()}, median per call")
    for name, seconds in interleaved(fns, args.repeat).items():
        print(f"{name:32s} {seconds * 1e6:8.1f} us")


if __name__ == "__main__":
    main()
