"""Where numbabn.torch's kernels start to beat PyTorch's batch norm (the defaults of
``NUMBABN_TORCH_NATIVE_BELOW`` and, for plain eval, ``NUMBABN_TORCH_NATIVE_EVAL_BELOW``).

Per shape, in one process with the same thread count for both: a training-mode
forward + backward through autograd (``y = bn(x); y.backward(dy)``) and a no-grad
eval forward, each plain and with ReLU (native ``torch.relu`` after the BN against
numbabn's fused ``activation="relu"``); native ``torch.nn.BatchNorm*`` against the
numbabn module with the kernels forced on every size (``TORCH_NATIVE_BELOW = 0``).
Interleaved rounds (``numbabn.bench.harness.interleaved``), median per call; ratio =
native / kernels. The machine is noisy: run it twice.

    python bench/torch_small.py [--threads 2] [--repeat 11] [--shapes 256x512,64x128x8x8]
                                [--channels-last]

``--channels-last``: 4-D and 5-D inputs in PyTorch's channels_last(_3d) memory format.
"""

import argparse

import torch

import numbabn
from numbabn import config
from numbabn.bench.harness import interleaved
from numbabn.torch import modules

SHAPES = "64x100,256x512,512x512,1024x512,2048x1024,4096x1024,64x64x8x8,64x512x4x4,64x256x8x8,32x64x32x32,64x64x32x32"


def _pair(shape, relu, train, channels_last):
    g = torch.Generator().manual_seed(0)
    x, dy = torch.randn(shape, generator=g) * 2 + 1, torch.randn(shape, generator=g)
    if channels_last and len(shape) in (4, 5):
        fmt = torch.channels_last if len(shape) == 4 else torch.channels_last_3d
        x, dy = x.contiguous(memory_format=fmt), dy.contiguous(memory_format=fmt)
    x.requires_grad_(train)
    name = f"BatchNorm{max(1, len(shape) - 2)}d"
    native = getattr(torch.nn, name)(shape[1]).train(train)
    ours = getattr(modules, name)(shape[1], activation="relu" if relu else None).train(train)
    after = torch.relu if relu else (lambda y: y)

    def run_native():
        if train:
            after(native(x)).backward(dy)
            x.grad = None
        else:
            with torch.no_grad():
                after(native(x))

    def run_ours():
        if train:
            ours(x).backward(dy)
            x.grad = None
        else:
            with torch.no_grad():
                ours(x)

    return run_native, run_ours


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--repeat", type=int, default=11)
    parser.add_argument("--shapes", default=SHAPES)
    parser.add_argument("--channels-last", action="store_true", help="4-D/5-D inputs in channels_last memory format")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    numbabn.set_num_threads(args.threads)
    default, eval_default = config.TORCH_NATIVE_BELOW, config.TORCH_NATIVE_EVAL_BELOW
    config.TORCH_NATIVE_BELOW = config.TORCH_NATIVE_EVAL_BELOW = 0
    print(
        f"torch {torch.__version__}, {args.threads} threads; default TORCH_NATIVE_BELOW = {default}, "
        f"TORCH_NATIVE_EVAL_BELOW = {eval_default} (plain eval)"
    )
    print(f"{'shape':>14} {'values':>8}  {'mode':5} {'relu':4} {'native ms':>9} {'kernels ms':>10} {'x':>5}  default")
    for text in args.shapes.split(","):
        shape = tuple(int(v) for v in text.split("x"))
        n = torch.Size(shape).numel()
        for train in (True, False):
            for relu in (False, True):
                a, b = _pair(shape, relu, train, args.channels_last)
                for fn in (a, b, a, b):  # warm-up (and the first-call compile)
                    fn()
                t = interleaved({"native": a, "kernels": b}, args.repeat)
                # the modules' rule: channels-last inputs hand over below 8x the
                # threshold (2x fused), plain eval below the eval threshold too
                factor = 1
                if args.channels_last and len(shape) in (4, 5):
                    factor = config.TORCH_CHANNELS_LAST_FUSED_FACTOR if relu else config.TORCH_CHANNELS_LAST_FACTOR
                below = default * factor if train or relu else max(eval_default, default * factor)
                print(
                    f"{text:>14} {n:>8}  {'train' if train else 'eval':5} {'relu' if relu else '':4} "
                    f"{t['native'] * 1e3:9.3f} {t['kernels'] * 1e3:10.3f} {t['native'] / t['kernels']:5.2f}  "
                    f"{'torch' if n < below else 'kernels'}",
                    flush=True,
                )


if __name__ == "__main__":
    main()
