"""Time one training step of a 3x100 BN-MLP on digits: numbabn layers vs PyTorch CPU.

Network (Ioffe & Szegedy's MNIST set-up at digits scale): (Linear(., 100) -> BN -> ReLU) x 3
-> Linear(100, 10), softmax cross-entropy, SGD(lr=0.1, momentum=0.9), batch 60.
A step is forward + loss + backward + zero_grad + optimizer step. All rows run in the
same process on the same batches, float32, interleaved in rounds so that machine
noise hits them alike; reported is the median over all steps after a warm-up (JIT
compile and first-call costs excluded). PyTorch uses 2 threads
(torch.set_num_threads(2)).

Rows: "numbabn" (separate ReLU layers, the same graph as PyTorch), "numbabn fused"
(ReLU fused into BatchNorm1d(activation="relu")), each twice: with NumPy's BLAS at
its default thread count, and limited to 1 thread (threadpoolctl). The second
configuration exists because NumPy's OpenBLAS worker threads keep spinning after a
matmul while Numba's parallel kernels need the same cores: on a machine with few
cores each BN kernel launch can then wait for the scheduler (milliseconds).

    python bench/layers_step.py [--steps 300] [--rounds 3]
"""

import argparse
import contextlib
import time

import numpy as np
from sklearn.datasets import load_digits
from threadpoolctl import threadpool_limits

from numbabn.layers import BatchNorm1d, Linear, ReLU, Sequential, SoftmaxCrossEntropy
from numbabn.optim import SGD

BATCH, WIDTH, DEPTH, LR, MOMENTUM = 60, 100, 3, 0.1, 0.9


def batches(steps, seed=0):
    X, y = load_digits(return_X_y=True)
    X = (X / 16.0).astype(np.float32)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(X), size=(steps, BATCH))
    return [(X[i], y[i].astype(np.int64)) for i in idx]


def numbabn_step(fused, seed=0):
    rng = np.random.default_rng(seed)
    layers, width = [], 64
    for _ in range(DEPTH):
        layers.append(Linear(width, WIDTH, init="he", rng=rng))
        if fused:
            layers.append(BatchNorm1d(WIDTH, activation="relu"))
        else:
            layers += [BatchNorm1d(WIDTH), ReLU()]
        width = WIDTH
    layers.append(Linear(width, 10, rng=rng))
    model = Sequential(*layers)
    loss_fn = SoftmaxCrossEntropy()
    opt = SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step(x, t):
        loss, dlogits = loss_fn(model.forward(x), t)
        opt.zero_grad()
        model.backward(dlogits)
        opt.step()
        return loss

    return step


def torch_step(seed=0):
    import torch

    torch.manual_seed(seed)
    layers, width = [], 64
    for _ in range(DEPTH):
        layers += [torch.nn.Linear(width, WIDTH), torch.nn.BatchNorm1d(WIDTH), torch.nn.ReLU()]
        width = WIDTH
    layers.append(torch.nn.Linear(width, 10))
    model = torch.nn.Sequential(*layers)
    loss_fn = torch.nn.CrossEntropyLoss()
    opt = torch.optim.SGD(model.parameters(), lr=LR, momentum=MOMENTUM)

    def step(x, t):
        opt.zero_grad()
        loss = loss_fn(model(x), t)
        loss.backward()
        opt.step()
        return loss

    return step


def time_steps(step, data):
    times = np.empty(len(data))
    for k, (x, t) in enumerate(data):
        t0 = time.perf_counter()
        step(x, t)
        times[k] = time.perf_counter() - t0
    return times


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=300, help="steps per round and row")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=30)
    args = parser.parse_args()

    data = batches(args.steps)
    default, one_blas_thread = contextlib.nullcontext, lambda: threadpool_limits(1, user_api="blas")
    rows = {}  # name -> (step function, its batches, context to time it in)
    for fused in (False, True):
        for label, context in (("", default), (", BLAS 1 thread", one_blas_thread)):
            rows[f"numbabn{' fused' if fused else ''}{label}"] = (numbabn_step(fused), data, context)
    try:
        import torch
    except ImportError:
        print("PyTorch is not installed: numbabn rows only")
    else:
        torch.set_num_threads(2)
        rows["torch"] = (torch_step(), [(torch.from_numpy(x), torch.from_numpy(t)) for x, t in data], default)

    for step, batch_list, context in rows.values():  # warm-up: JIT compilation, allocator, caches
        with context():
            time_steps(step, batch_list[: args.warmup])
    times = {name: [] for name in rows}
    for _ in range(args.rounds):
        for name, (step, batch_list, context) in rows.items():
            with context():
                times[name].append(time_steps(step, batch_list))

    print(
        f"BN-MLP {DEPTH}x{WIDTH}, batch {BATCH}, float32, SGD(momentum={MOMENTUM}); "
        f"median of {args.rounds}x{args.steps} steps per row"
    )
    medians = {name: np.median(np.concatenate(t)) * 1e3 for name, t in times.items()}
    for name, ms in medians.items():
        ratio = f"  ({ms / medians['torch']:.2f}x torch)" if "torch" in medians else ""
        print(f"  {name:30s} {ms:8.3f} ms/step{ratio}")


if __name__ == "__main__":
    main()
