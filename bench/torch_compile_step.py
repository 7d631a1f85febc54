"""A training step under ``torch.compile`` with numbabn.torch's layers, against the
eager step and torch.nn's compiled one.

The model: conv, BN, ReLU, conv, BN (``--channels`` channels) on an (N, C, H, W)
input, SGD on the mean square of its output. Four steps, alternating: numbabn eager;
numbabn compiled with one graph break per layer (the layer as one opaque call, the
path before ``numbabn.torch.ops``: forced here by having ``_traced_forward`` decline);
numbabn compiled as one graph (its custom operators); torch.nn compiled. Each is
compiled (and warmed by two steps) before the timed rounds; min and median ms per
step. The kernels run on every size (``NUMBABN_TORCH_NATIVE_BELOW=0``, as in
bench/torch_small.py). The machine is noisy: run it twice.

    python bench/torch_compile_step.py [--shape 64x8x32x32] [--channels 16]
                                       [--threads 2] [--rounds 15] [--backend inductor]
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("NUMBABN_TORCH_NATIVE_BELOW", "0")  # before numbabn reads its config
os.environ.setdefault("NUMBABN_TORCH_NATIVE_EVAL_BELOW", "0")

import torch  # noqa: E402

import numbabn.torch as nbt  # noqa: E402
from numbabn.torch.modules import NumbabnBatchNorm  # noqa: E402

_TRACED = NumbabnBatchNorm._traced_forward


def _model(bn: type, cin: int, channels: int) -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(
        torch.nn.Conv2d(cin, channels, 3, padding=1),
        bn(channels),
        torch.nn.ReLU(),
        torch.nn.Conv2d(channels, channels, 3, padding=1),
        bn(channels),
    )


def _with_breaks(on: bool) -> None:
    """Whether numbabn's layers decline to trace (one graph break each)."""
    NumbabnBatchNorm._traced_forward = (lambda self, *args: None) if on else _TRACED  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--shape", default="64x8x32x32")
    ap.add_argument("--channels", type=int, default=16)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--backend", default="inductor")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    shape = tuple(int(v) for v in args.shape.split("x"))
    x = torch.randn(shape)
    variants = {
        "numbabn eager": (nbt.BatchNorm2d, False, False),
        "numbabn compiled, a break per layer": (nbt.BatchNorm2d, True, True),
        "numbabn compiled, one graph": (nbt.BatchNorm2d, True, False),
        "torch.nn compiled": (torch.nn.BatchNorm2d, True, False),
    }
    steps = {}
    for name, (bn, compiled, breaks) in variants.items():
        model = _model(bn, shape[1], args.channels)
        opt = torch.optim.SGD(model.parameters(), lr=0.01)
        fn = torch.compile(model, backend=args.backend) if compiled else model

        def step(fn=fn, opt=opt, breaks=breaks) -> None:
            _with_breaks(breaks)  # Dynamo's guards see the same method it traced
            opt.zero_grad()
            fn(x).square().mean().backward()
            opt.step()

        t0 = time.perf_counter()
        step()
        step()
        print(f"{name}: first two steps {time.perf_counter() - t0:.2f} s")
        steps[name] = step
    times: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(args.rounds):
        for name, step in steps.items():
            t0 = time.perf_counter()
            step()
            times[name].append((time.perf_counter() - t0) * 1e3)
    print(f"training step {args.shape}, {args.channels} channels, {args.backend}, {args.threads} threads")
    for name, ms in times.items():
        print(f"{name:36s} min {min(ms):7.2f}  median {statistics.median(ms):7.2f} ms")


if __name__ == "__main__":
    main()
