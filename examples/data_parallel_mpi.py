"""Data-parallel training of a BN-MLP over MPI ranks, on scikit-learn's bundled digits.

Run::

    mpiexec -n 2 python -m mpi4py examples/data_parallel_mpi.py            # 2 ranks
    mpiexec -n 2 python -m mpi4py examples/data_parallel_mpi.py --check    # + single-process reference
    python examples/data_parallel_mpi.py                         # 1 process, no MPI needed

(``pip install '.[mpi]'`` in a clone of the repository brings mpi4py and the mpich
wheel's ``mpiexec``.)

Model: Linear(64, h) - SyncBatchNorm1d(h) - ReLU - Linear(h, h) - SyncBatchNorm1d(h) -
ReLU - Linear(h, 10) (the ReLUs fused into the batch-norm passes), float64,
SGD with momentum, softmax cross-entropy. Each global batch of ``--batch`` rows is
cut into contiguous per-rank slices (:func:`~numbabn.distributed.rank_slice`; sizes
differ by at most one); every rank back-propagates the gradient of the global mean
loss for its rows and the parameter gradients are summed over the ranks
(:func:`~numbabn.distributed.allreduce_gradients`; with equal slices this is the
average of the ranks' gradients). The batch-norm statistics are those of the
global batch, so the run is the single-process run on the global batch, to float
rounding, and rank 0 prints the same loss curve.

``--check`` also trains the single-process reference on rank 0 -- the same model
with plain ``BatchNorm1d`` layers, trained by :class:`numbabn.train.Trainer` on the
whole global batches, which come in the Trainer's documented order -- and prints the
max abs difference of the two loss curves and whether the parameters are
bit-identical on all ranks; it exits with status 1 when the difference exceeds
``--tol`` or the ranks disagree. "To float rounding" holds step by step, but batch
norm over very few rows amplifies rounding along a run: with ``--batch 2`` a
one-ulp change of one weight of the single-process model alone moves its loss by
about 0.2 within 30 steps, so there the two curves part by that much and
``--check`` fails at the default ``--tol`` (at ``--batch 3`` they differ by 2e-10,
from 4 rows on by 1e-12 or less).
"""

import argparse
import sys

import numpy as np

from numbabn.distributed import SyncBatchNorm1d, allreduce_gradients, global_mean, rank_slice
from numbabn.distributed.comm import world
from numbabn.layers import BatchNorm1d, Linear, Sequential, SoftmaxCrossEntropy
from numbabn.optim import SGD
from numbabn.train import Trainer


def load_data(seed):
    """Digits scaled to [0, 1], split 1437/360 into train and test (fixed seed)."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    return train_test_split(X / 16.0, y, test_size=0.2, random_state=seed, stratify=y)


def build_model(hidden, seed, comm, sync=True):
    """The BN-MLP; ``sync=False`` gives plain BatchNorm1d layers (the reference)."""
    rng = np.random.default_rng(seed)

    def bn():
        if sync:
            return SyncBatchNorm1d(hidden, activation="relu", dtype=np.float64, comm=comm)
        return BatchNorm1d(hidden, activation="relu", dtype=np.float64)

    return Sequential(
        Linear(64, hidden, init="he", rng=rng, dtype=np.float64),
        bn(),
        Linear(hidden, hidden, init="he", rng=rng, dtype=np.float64),
        bn(),
        Linear(hidden, 10, rng=rng, dtype=np.float64),
    )


def global_batches(n_train, batch, steps, seed):
    """Row indices of each global batch, in :class:`numbabn.train.Trainer`'s order: one
    permutation per epoch from ``default_rng(seed)``, the last partial batch dropped."""
    rng = np.random.default_rng(seed)
    per_epoch = n_train // batch
    out = []
    while len(out) < steps:
        perm = rng.permutation(n_train)
        out.extend(perm[k * batch : (k + 1) * batch] for k in range(per_epoch))
    return out[:steps]


def optimizer(model, lr):
    return SGD(model.parameters(), lr=lr, momentum=0.9)


def train(model, X, y, batches, lr, comm):
    """SGD steps on this rank's slices of the global batches; the global loss per step."""
    loss_fn = SoftmaxCrossEntropy()
    opt = optimizer(model, lr)
    model.train()
    losses = []
    for idx in batches:
        rows = idx[rank_slice(len(idx), comm)]
        opt.zero_grad()
        logits = model.forward(X[rows])
        if len(rows):
            loss_local, dlogits = loss_fn(logits, y[rows])
        else:  # a rank without rows still joins every collective
            loss_local, dlogits = float("nan"), np.zeros_like(logits)
        losses.append(global_mean(loss_local, len(rows), comm))
        model.backward(dlogits * (len(rows) / len(idx)))
        allreduce_gradients(model, comm)
        opt.step()
    return np.array(losses)


def accuracy(model, X, y):
    return float(np.mean(np.argmax(model.eval().forward(X), axis=1) == y))


def share_cores(comm):
    """Give each rank its share of this machine's cores for numbabn's kernel threads.

    MPI ranks wait in collectives by polling, so ranks that each start one Numba
    thread per core fight over the CPUs (ten times slower on a 2-core machine).
    The ranks on one node (``Split_type(COMM_TYPE_SHARED)``) split its cores evenly.
    """
    if comm is None:
        return
    from mpi4py import MPI

    from numbabn import _threads

    node = comm.Split_type(MPI.COMM_TYPE_SHARED)
    _threads.set_num_threads(max(1, _threads.available_cpus() // node.Get_size()))
    node.Free()


def _parser():
    p = argparse.ArgumentParser(prog="python examples/data_parallel_mpi.py", description=__doc__.split("\n")[0])
    p.add_argument("--steps", type=int, default=150, help="SGD steps (global batches)")
    p.add_argument("--batch", type=int, default=64, help="global batch size, split over the ranks")
    p.add_argument("--hidden", type=int, default=64, help="hidden units per layer")
    p.add_argument("--lr", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--every", type=int, default=25, help="print the loss every this many steps")
    p.add_argument("--check", action="store_true", help="compare with the single-process run on rank 0")
    p.add_argument("--tol", type=float, default=1e-9, help="largest loss-curve difference --check accepts")
    return p


def run(argv=None):
    """The example; returns the exit status (0, or 1 when ``--check`` fails)."""
    parser = _parser()
    args = parser.parse_args(argv)
    comm = world()
    size, rank = (1, 0) if comm is None else (comm.Get_size(), comm.Get_rank())
    X_train, X_test, y_train, y_test = load_data(args.seed)
    if args.steps < 1 or args.hidden < 1 or args.every < 1 or not 2 <= args.batch <= len(X_train):
        parser.error(f"--steps, --hidden and --every must be >= 1 and --batch in [2, {len(X_train)}]")
    share_cores(comm)
    batches = global_batches(len(X_train), args.batch, args.steps, args.seed)
    model = build_model(args.hidden, args.seed, comm)
    mine = rank_slice(args.batch, comm)
    local_sizes = [mine.stop - mine.start] if comm is None else comm.allgather(mine.stop - mine.start)
    losses = train(model, X_train, y_train, batches, args.lr, comm)
    acc = accuracy(model, X_test, y_test)
    status = 0
    if rank == 0:
        print(
            f"data-parallel BN-MLP on digits: {size} rank{'s' if size > 1 else ''}, global batch {args.batch} "
            f"(local {'/'.join(map(str, local_sizes))}), {args.steps} steps"
        )
        for step in sorted({*range(0, args.steps, args.every), args.steps - 1}):  # the last step once
            print(f"step {step:5d}  loss {losses[step]:.10f}")
        print(f"test accuracy {acc:.4f}")
    if args.check:
        flat = np.concatenate([p.value.ravel() for p in model.parameters()])
        gathered = [flat] if comm is None else comm.gather(flat, root=0)
        if rank == 0:
            ref = build_model(args.hidden, args.seed, None, sync=False)
            trainer = Trainer(
                ref, SoftmaxCrossEntropy(), optimizer(ref, args.lr), batch_size=args.batch, seed=args.seed, verbose=0
            )
            ref_losses = np.array(trainer.fit(X_train, y_train, steps=args.steps).loss)
            diff = float(np.max(np.abs(losses - ref_losses)))
            same = all(np.array_equal(g, gathered[0]) for g in gathered)
            ref_flat = np.concatenate([p.value.ravel() for p in ref.parameters()])
            print(
                f"check: max abs difference of the loss curves, {size} rank(s) vs single process: "
                f"{diff:.3e} ({args.steps} steps)"
            )
            print(f"check: max abs difference of the final parameters: {np.max(np.abs(flat - ref_flat)):.3e}")
            print(f"check: parameters bit-identical on all {size} rank(s): {'yes' if same else 'NO'}")
            status = 0 if diff <= args.tol and same else 1
        if comm is not None:
            status = comm.bcast(status, root=0)
    return status


def main():
    """Entry point: on an exception with several ranks, abort the whole job (the other
    ranks would otherwise wait in a collective forever)."""
    comm = world()
    try:
        status = run()
    except SystemExit:
        raise
    except BaseException:
        if comm is None or comm.Get_size() == 1:
            raise
        import traceback

        traceback.print_exc()
        sys.stderr.flush()
        comm.Abort(1)
    sys.exit(status)


if __name__ == "__main__":
    main()
