"""SyncBatchNorm over real MPI ranks (``mpiexec -n 2`` and ``-n 3`` from the mpich wheel).

The MPI tests start this very file under ``mpiexec ... python -m mpi4py`` (an
exception on one rank then aborts the job instead of leaving the others waiting).
Every rank builds the same global batches, keeps its slice -- unequal sizes and
empty slices included -- and runs forward, backward and running-statistics
updates through SyncBatchNorm1d/2d. Rank 0 gathers the slices and compares them
with ONE plain BatchNorm on the concatenated batch, and checks that the
statistics and parameter gradients are bit-identical on all ranks. The numbers
(ranks, max abs differences, payload bytes) are written to the terminal even
without ``-s`` and are part of every assertion message.

The in-process tests (errors, a mirror communicator, PyTorch's payload) need no MPI.
"""

import copy
import importlib.util
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from numbabn.distributed import (
    SyncBatchNorm1d,
    SyncBatchNorm2d,
    SyncError,
    allreduce_gradients,
    global_mean,
    rank_slice,
)
from numbabn.distributed import comm as comm_module
from numbabn.distributed.comm import check_comm
from numbabn.layers import BatchNorm1d, BatchNorm2d, Linear, Sequential

C_PAYLOAD = 256
TIMEOUT = 300

# (name, layer class, constructor kwargs, shape of one sample, dtype)
CONFIGS = [
    ("1d NC relu", "1d", dict(num_features=5, activation="relu"), (5,), np.float64),
    ("1d NCL cumulative", "1d", dict(num_features=3, momentum=None), (3, 4), np.float64),
    ("2d NCHW", "2d", dict(num_features=3), (3, 2, 3), np.float64),
    ("2d NHWC float32", "2d", dict(num_features=4, channels_last=True), (4, 2, 3), np.float32),
    ("1d no running stats", "1d", dict(num_features=4, track_running_stats=False), (4,), np.float64),
]
# Per world size: rows of the global batch held by each rank, for each of two steps.
SPLITS = {
    2: [[(5, 3), (0, 7)], [(8, 0), (1, 1)]],
    3: [[(4, 0, 3), (1, 5, 2)], [(0, 0, 6), (2, 2, 2)]],
}


def _classes(kind, sync):
    if kind == "1d":
        return SyncBatchNorm1d if sync else BatchNorm1d
    return SyncBatchNorm2d if sync else BatchNorm2d


def _make(kind, kwargs, dtype, sync, comm=None):
    layer = _classes(kind, sync)(dtype=dtype, **kwargs, **({"comm": comm} if sync else {}))
    rng = np.random.default_rng(7)
    if layer.affine:
        layer.weight.value[...] = rng.uniform(0.5, 1.5, layer.num_features)
        layer.bias.value[...] = rng.standard_normal(layer.num_features)
    return layer


def _to_channels(x, layer):
    """Samples are drawn channels-first; NHWC layers get them channels-last."""
    return np.moveaxis(x, 1, -1).copy() if getattr(layer, "channels_last", False) else x


def _global_batch(rng, n, sample_shape, dtype):
    return (
        (rng.standard_normal((n,) + sample_shape) * 3 + 40).astype(dtype),
        rng.standard_normal((n,) + sample_shape).astype(dtype),
    )


# ---------------------------------------------------------------- the MPI worker
def _worker(out_path):
    """Runs on every rank; rank 0 writes the results as JSON to ``out_path``."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    size, rank = comm.Get_size(), comm.Get_rank()
    results = []
    for case, (name, kind, kwargs, sample_shape, dtype) in enumerate(CONFIGS):
        for split, steps in enumerate(SPLITS[size]):
            sync = _make(kind, kwargs, dtype, True, comm)
            ref = _make(kind, kwargs, dtype, False) if rank == 0 else None
            rng = np.random.default_rng([case, split])  # the same global data on every rank
            diffs = dict(y=0.0, dx=0.0, dgamma=0.0, dbeta=0.0, running=0.0, eval_y=0.0)
            identical = True
            for counts in steps:
                x, dy = _global_batch(rng, sum(counts), sample_shape, dtype)
                x, dy = _to_channels(x, sync), _to_channels(dy, sync)
                lo = sum(counts[:rank])
                mine = slice(lo, lo + counts[rank])
                y = sync.forward(x[mine])
                dx = sync.backward(dy[mine])
                grads = [p.grad for p in sync.parameters()]
                state = list(sync.state_dict().values())
                y_all, dx_all = comm.gather(y, root=0), comm.gather(dx, root=0)
                shared = comm.gather([*grads, *state], root=0)
                if rank == 0:
                    identical &= all(
                        np.array_equal(a, b) for other in shared for a, b in zip(other, shared[0], strict=True)
                    )
                    y_ref = ref.forward(x)
                    dx_ref = ref.backward(dy)
                    diffs["y"] = max(diffs["y"], float(np.max(np.abs(np.concatenate(y_all) - y_ref))))
                    diffs["dx"] = max(diffs["dx"], float(np.max(np.abs(np.concatenate(dx_all) - dx_ref))))
                    if ref.affine:
                        diffs["dgamma"] = max(diffs["dgamma"], float(np.max(np.abs(grads[0] - ref.weight.grad))))
                        diffs["dbeta"] = max(diffs["dbeta"], float(np.max(np.abs(grads[1] - ref.bias.grad))))
                    for key, value in ref.state_dict().items():
                        diffs["running"] = max(
                            diffs["running"], float(np.max(np.abs(sync.state_dict()[key].astype(np.float64) - value)))
                        )
            # Eval mode: running statistics, local forward; the backward still sums dgamma, dbeta.
            x, dy = _global_batch(rng, 6, sample_shape, dtype)
            x, dy = _to_channels(x, sync), _to_channels(dy, sync)
            mine = rank_slice(6, comm)
            y = sync.eval().forward(x[mine])
            sync.backward(dy[mine])
            y_all = comm.gather(y, root=0)
            eval_grads = comm.gather([p.grad for p in sync.parameters()], root=0)
            if rank == 0:
                diffs["eval_y"] = float(np.max(np.abs(np.concatenate(y_all) - ref.eval().forward(x))))
                ref.backward(dy)
                for g_sync, g_ref in zip(eval_grads[0], [p.grad for p in ref.parameters()], strict=True):
                    diffs["dgamma"] = max(diffs["dgamma"], float(np.max(np.abs(g_sync - g_ref))))
                identical &= all(
                    np.array_equal(a, b) for other in eval_grads for a, b in zip(other, eval_grads[0], strict=True)
                )
                results.append(
                    dict(
                        name=name,
                        splits=[list(c) for c in steps],
                        dtype=np.dtype(dtype).name,
                        identical=bool(identical),
                        **diffs,
                    )
                )

    # A global batch of ONE row (all on the last rank): every rank raises the same
    # SyncError after the collective -- nobody is left waiting -- and nothing changes.
    layer = SyncBatchNorm1d(3, dtype=np.float64, comm=comm)
    try:
        layer.forward(np.ones((1 if rank == size - 1 else 0, 3)))
        error = ""
    except SyncError as exc:
        error = str(exc)
    state = layer.state_dict()
    error += "" if int(state["num_batches_tracked"]) == 0 and not state["running_mean"].any() else " [changed]"
    layer.forward(np.ones((2, 3)))  # the layer goes on
    errors = comm.gather(error, root=0)

    # Payload of one training step of a SyncBatchNorm1d(256): the buffers actually passed.
    counting = _CountingComm(comm)
    layer = SyncBatchNorm1d(C_PAYLOAD, comm=counting)
    x = np.random.default_rng(rank).standard_normal((3 + rank, C_PAYLOAD)).astype(np.float32)
    layer.backward(layer.forward(x))
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(size=size, results=results, errors=errors, payload=counting.calls), f)


# ---------------------------------------------------------------- ranks that disagree
def _mismatch_cases(comm):
    """name -> (expected message fragment, action(rank, size) -> (layers touched, call)).

    Each case makes the ranks disagree in one way; every rank must raise the same
    SyncError and leave its layers exactly as they were."""
    from numbabn.distributed import SyncBatchNorm1d as S1

    def rows(n, C, dtype=np.float64, seed=0):
        return np.random.default_rng(seed).standard_normal((n, C)).astype(dtype)

    def trained(C=4, dtype=np.float64):
        layer = S1(C, dtype=dtype, comm=comm)
        layer.backward(layer.forward(rows(3, C, dtype)))  # one agreed step: ctx, grads, counters set
        return layer

    def channels(rank, size):
        layer = S1(4 if rank == 0 else 400, dtype=np.float64, comm=comm)
        return [layer], lambda: layer.forward(rows(3, layer.num_features))

    def dtype(rank, size):
        dt = np.float32 if rank == 0 else np.float64
        layer = S1(4, dtype=dt, comm=comm)
        return [layer], lambda: layer.forward(rows(3, 4, dt))

    def mode(rank, size):
        """Rank 0 in eval (its forward exchanges nothing), the others training: they
        meet when rank 0 goes back through its eval forward."""
        layer = trained()
        if rank == 0:
            layer.eval().forward(rows(3, 4))
            return [layer], lambda: layer.backward(rows(3, 4))
        return [layer], lambda: layer.forward(rows(3, 4))

    def setting(name, value, other):
        """A layer built with ``name=value`` on rank 0 and ``name=other`` elsewhere."""

        def make(rank, size):
            layer = S1(4, dtype=np.float64, comm=comm, **{name: value if rank == 0 else other})
            return [layer], lambda: layer.forward(rows(3, 4))

        return make

    def frozen(rank, size):
        layer = trained()
        layer.track_running_stats = rank != 0  # rank 0 stops updating its running statistics
        return [layer], lambda: layer.forward(rows(3, 4))

    def bad_setting(name, value, on):
        """A trained layer whose ``name`` was set to an invalid ``value`` on rank ``on``
        (-1: the last) after construction."""

        def make(rank, size):
            layer = trained()
            if rank == on % size:
                setattr(layer, name, value)
            return [layer], lambda: layer.forward(rows(3, 4))

        return make

    def read_only_stats(rank, size):
        layer = trained()
        if rank == 1:
            layer.running_mean.setflags(write=False)
        return [layer], lambda: layer.forward(rows(3, 4))

    def forward_vs_backward(rank, size):
        layer = trained()
        layer.forward(rows(3, 4))
        if rank == 0:
            return [layer], lambda: layer.backward(rows(3, 4))
        return [layer], lambda: layer.forward(rows(3, 4))

    def call_order(rank, size):
        a, b = trained(), S1(4, dtype=np.float64, comm=comm)  # same shape; a was called before
        return [a, b], (lambda: a.forward(rows(3, 4))) if rank == 0 else (lambda: b.forward(rows(3, 4)))

    def bad_input_shape(rank, size):
        layer = trained()
        return [layer], lambda: layer.forward(rows(3, 5 if rank == size - 1 else 4))

    def bad_input_dtype(rank, size):
        layer = trained(dtype=np.float32)
        return [layer], lambda: layer.forward(rows(3, 4, np.float64 if rank == 0 else np.float32))

    def bad_dy(rank, size):
        layer = trained()
        layer.forward(rows(3, 4))
        return [layer], lambda: layer.backward(rows(2 if rank == 1 else 3, 4))

    def backward_before_forward(rank, size):
        layer = trained()
        layer.forward(rows(3, 4))
        if rank == 0:
            layer = S1(4, dtype=np.float64, comm=comm)  # a fresh layer: nothing to go back through
        return [layer], lambda: layer.backward(rows(3, 4))

    def gradients(rank, size):
        """allreduce_gradients with a gradient set on rank 0 that rank 1 lacks (MPICH
        summed the shorter contribution silently: other sums on each rank)."""
        model = Sequential(Linear(3, 4, rng=0, dtype=np.float64), Linear(4, 2, rng=0, dtype=np.float64))
        for i, p in enumerate(model.parameters()):
            p.grad = None if rank == 1 and i >= 2 else np.full_like(p.value, rank + 1.0)
        return list(model), lambda: allreduce_gradients(model, comm)

    def gradient_dtypes(rank, size):
        """The same gradients in float32 on rank 0, float64 elsewhere: summed as float64
        and cast back, every rank would hold other numbers."""
        dt = np.float32 if rank == 0 else np.float64
        model = Linear(2, 3, rng=0, dtype=dt)
        for p in model.parameters():
            p.grad = np.full_like(p.value, rank + 1.0)
        return [model], lambda: allreduce_gradients(model, comm)

    def not_a_model(rank, size):
        model = Linear(2, 3, rng=0, dtype=np.float64)
        for p in model.parameters():
            p.grad = np.ones_like(p.value)
        return [model], lambda: allreduce_gradients("notamodel" if rank == 1 else model, comm)

    def mean_args(local_mean, local_count):
        """global_mean with ``(local_mean, local_count)`` on rank 1, (1.0, 3) elsewhere."""
        return lambda rank, size: (
            [],
            lambda: global_mean(*((local_mean, local_count) if rank == 1 else (1.0, 3)), comm),
        )

    return {
        "gradients": (
            "rank 0: 4 of 4 parameters, 26 float64 values; rank 1: 2 of 4 parameters, 16 float64 values",
            gradients,
        ),
        "gradient dtypes": (
            "rank 0: 2 of 2 parameters, 9 float32 values; rank 1: 2 of 2 parameters, 9 float64 values",
            gradient_dtypes,
        ),
        "not a model": ("allreduce_gradients: the model was rejected on rank(s) [1] of", not_a_model),
        "mean not a number": ("global_mean: the local_mean was rejected on rank(s) [1]", mean_args("abc", 3)),
        "negative count": ("global_mean: the local_count was rejected on rank(s) [1]", mean_args(1.0, -3)),
        "fractional count": ("global_mean: the local_count was rejected on rank(s) [1]", mean_args(2.0, 2.5)),
        "eps": ("eps: rank 0: 1e-05; rank 1: 0.1", setting("eps", 1e-5, 0.1)),
        "momentum": ("momentum: rank 0: None; rank 1: 0.1", setting("momentum", None, 0.1)),
        "affine": ("affine: rank 0: False; rank 1: True", setting("affine", False, True)),
        "activation": ("activation: rank 0: None; rank 1: 'relu'", setting("activation", None, "relu")),
        "track_running_stats": (
            "track_running_stats: rank 0: False (running statistics kept, not updated); rank 1: True",
            frozen,
        ),
        "bad momentum": ("the layer's momentum was rejected on rank(s) [1]", bad_setting("momentum", 5.0, 1)),
        "bad eps": ("the layer's eps was rejected on rank(s) [0]", bad_setting("eps", -1.0, 0)),
        "bad activation": (
            "the layer's activation was rejected on rank(s) [LAST]",
            bad_setting("activation", "gelu", -1),
        ),
        "read-only statistics": (
            "the layer's state (parameters, running statistics) was rejected on rank(s) [1]",
            read_only_stats,
        ),
        "channels": ("channels: rank 0: 4 channels; rank 1: 400 channels", channels),
        "dtype": ("dtype: rank 0: float32; rank 1: float64", dtype),
        "mode": (
            "operation: rank 0: backward; rank 1: forward",
            mode,
        ),
        "forward vs backward": ("operation: rank 0: backward; rank 1: forward", forward_vs_backward),
        "call order": ("call number: rank 0: call #1; rank 1: call #0", call_order),
        "input shape": ("the input was rejected on rank(s) [LAST]", bad_input_shape),
        "input dtype": ("the input was rejected on rank(s) [0]", bad_input_dtype),
        "dy shape": ("the input was rejected on rank(s) [1]", bad_dy),
        "backward before forward": ("the input was rejected on rank(s) [0]", backward_before_forward),
    }


def _layer_snapshot(layers):
    out = []
    for layer in layers:
        out.append(
            (
                layer.state_dict(),
                [None if p.grad is None else p.grad.copy() for p in layer.parameters()],
                getattr(layer, "_ctx", None),
                list(getattr(layer, "_sync_calls", [])),
                layer.training,
            )
        )
    return out


def _same_snapshot(a, b):
    for (state_a, grads_a, ctx_a, calls_a, mode_a), (state_b, grads_b, ctx_b, calls_b, mode_b) in zip(
        a, b, strict=True
    ):
        if state_a.keys() != state_b.keys() or not all(np.array_equal(state_a[k], state_b[k]) for k in state_a):
            return False
        if any(
            (x is None) != (y is None) or (x is not None and not np.array_equal(x, y))
            for x, y in zip(grads_a, grads_b, strict=True)
        ):
            return False
        if ctx_a is not ctx_b or calls_a != calls_b or mode_a != mode_b:
            return False
    return True


def _mismatch_worker(out_path):
    """Runs every mismatch case on every rank; rank 0 writes what each rank raised."""
    from mpi4py import MPI

    from numbabn.distributed import SyncBatchNorm1d

    comm = MPI.COMM_WORLD
    rank, size = comm.Get_rank(), comm.Get_size()
    report = {}
    for name, (fragment, make) in _mismatch_cases(comm).items():
        layers, call = make(rank, size)
        before = _layer_snapshot(layers)
        try:
            call()
            outcome = dict(type=None, message="no error")
        except Exception as exc:  # noqa: BLE001 -- recorded and compared across ranks
            outcome = dict(
                type=type(exc).__name__,
                message=str(exc),
                cause=None if exc.__cause__ is None else type(exc.__cause__).__name__,
            )
        outcome["unchanged"] = _same_snapshot(before, _layer_snapshot(layers))
        # The ranks still agree on what comes next: a fresh layer takes a normal step.
        check = SyncBatchNorm1d(2, dtype=np.float64, comm=comm)
        check.backward(check.forward(np.arange(6.0).reshape(3, 2) * (rank + 1)))
        outcome["after"] = float(check.weight.grad[0])
        outcomes = comm.gather(outcome, root=0)
        if rank == 0:
            report[name] = dict(fragment=fragment.replace("LAST", str(size - 1)), ranks=outcomes)
    if rank == 0:
        with open(out_path, "w") as f:
            json.dump(dict(size=size, cases=report), f)


def _attempt(call):
    """``call()`` -> (its result or None, "ok" or "ErrorType: message")."""
    try:
        return call(), "ok"
    except Exception as exc:  # noqa: BLE001 -- recorded and compared across ranks
        return None, f"{type(exc).__name__}: {exc}"


def _sequence_worker(out_path):
    """Call sequences that once left the ranks out of step for good, run on every rank;
    rank 0 writes what each rank saw, and the comparisons, as JSON."""
    from mpi4py import MPI

    comm = MPI.COMM_WORLD
    rank = comm.Get_rank()
    rng = np.random.default_rng([11, rank])
    report = {}

    # A later layer fails on rank 1 only, after the batch-norm exchange succeeded:
    # Sequential rolls back rank 1's batch-norm call, so its call count falls one
    # behind. The next call raises SyncError on every rank (through Sequential, which
    # restores the layer's attributes again); the one after works on every rank.
    bn = SyncBatchNorm1d(3, dtype=np.float64, comm=comm)
    x = rng.standard_normal((4, 3)) + rank
    broken = Sequential(bn, Linear(4 if rank == 1 else 3, 2, rng=1, dtype=np.float64))
    fixed = Sequential(bn, Linear(3, 2, rng=1, dtype=np.float64))
    steps = [_attempt(lambda: broken.forward(x))[1], _attempt(lambda: fixed.forward(x))[1]]

    def step():
        y = fixed.forward(x)
        return y, fixed.backward(np.ones_like(y))

    result, outcome = _attempt(step)
    steps.append(outcome)
    gathered = comm.gather((steps, x, result, [p.grad for p in bn.parameters()]), root=0)
    if rank == 0:
        ref = Sequential(BatchNorm1d(3, dtype=np.float64), Linear(3, 2, rng=1, dtype=np.float64))
        diff = None
        if all(g[2] is not None for g in gathered):
            y_ref = ref.forward(np.concatenate([g[1] for g in gathered]))
            dx_ref = ref.backward(np.ones_like(y_ref))
            diff = max(
                float(np.max(np.abs(np.concatenate([g[2][0] for g in gathered]) - y_ref))),
                float(np.max(np.abs(np.concatenate([g[2][1] for g in gathered]) - dx_ref))),
                *(float(np.max(np.abs(g - r.grad))) for g, r in zip(gathered[0][3], ref[0].parameters(), strict=True)),
            )
        report["rolled back"] = dict(
            steps=[g[0] for g in gathered],
            diff=diff,
            identical=all(
                np.array_equal(a, b)
                for g in gathered
                if g[2] is not None
                for a, b in zip(g[3], gathered[0][3], strict=True)
            ),
        )

    # Uneven evaluation: rank 0 evaluates 3 batches, the others 2 (an uneven validation
    # split); then every rank trains on.
    bn = SyncBatchNorm1d(3, dtype=np.float64, comm=comm)
    bn.backward(bn.forward(x))
    bn.eval()
    evals = [_attempt(lambda: bn.forward(rng.standard_normal((2, 3))))[1] for _ in range(3 if rank == 0 else 2)]
    bn.train()
    _, outcome = _attempt(lambda: bn.backward(bn.forward(x)))
    gathered = comm.gather((evals + [outcome], [*bn.state_dict().values(), bn.weight.grad]), root=0)
    if rank == 0:
        report["uneven eval"] = dict(
            steps=[g[0] for g in gathered],
            identical=all(np.array_equal(a, b) for g in gathered for a, b in zip(g[1], gathered[0][1], strict=True)),
        )
        with open(out_path, "w") as f:
            json.dump(report, f)


class _CountingComm:
    """Wraps a communicator and records the bytes of every Allgather's buffers."""

    def __init__(self, comm):
        self.comm, self.calls = comm, []

    def Get_rank(self):
        return self.comm.Get_rank()

    def Get_size(self):
        return self.comm.Get_size()

    def Allgather(self, send, recv):
        self.calls.append(dict(sent=int(send.nbytes), received=int(recv.nbytes), dtype=send.dtype.name))
        self.comm.Allgather(send, recv)


# ---------------------------------------------------------------- launching
def _mpiexec():
    """The mpiexec next to this Python (the mpich wheel's), else the one on PATH."""
    here = Path(sys.executable).parent / "mpiexec"
    return str(here) if here.exists() else shutil.which("mpiexec")


def _mpi_missing():
    if importlib.util.find_spec("mpi4py") is None:
        return "mpi4py is not installed (pip install -e '.[mpi]')"
    if _mpiexec() is None:
        return "no mpiexec next to the Python executable or on PATH (pip install -e '.[mpi]')"
    return None


needs_mpi = pytest.mark.skipif(_mpi_missing() is not None, reason=str(_mpi_missing()))


def _launch(n, args, timeout=TIMEOUT):
    """``timeout mpiexec -n n python ...args`` on this machine; stdout+stderr, checked exit
    status. coreutils' ``timeout`` (when present) ends the whole job, so a rank left
    waiting in a collective fails the test instead of hanging it."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PMI_", "HYDRA_", "MPIR_"))}
    env["NUMBA_NUM_THREADS"] = "1"  # the ranks share this machine's cores
    guard = [shutil.which("timeout"), "-k", "10", str(timeout)] if shutil.which("timeout") else []
    cmd = [*guard, _mpiexec(), "-n", str(n), sys.executable, *args]
    proc = subprocess.run(
        cmd, capture_output=True, text=True, timeout=timeout + 30, env=env, cwd=Path(__file__).resolve().parent.parent
    )
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, f"{' '.join(cmd)} exited with {proc.returncode}:\n{output[-4000:]}"
    return output


def _report(capsys, text):
    """Show ``text`` in the test log whether or not pytest captures output."""
    with capsys.disabled():
        print("\n" + text)


TOLERANCES = {"float64": 1e-11, "float32": 1e-5}


@pytest.fixture(scope="module")
def worker_results(tmp_path_factory):
    """``worker_results(ranks)``: the worker's JSON for that world size, launched once."""
    cache = {}

    def run(ranks):
        if ranks not in cache:
            out = tmp_path_factory.mktemp(f"mpi{ranks}") / "result.json"
            _launch(ranks, ["-m", "mpi4py", __file__, str(out)])
            cache[ranks] = json.loads(out.read_text())
        return cache[ranks]

    return run


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_sync_batch_norm_equals_batch_norm_on_the_concatenated_batch(ranks, worker_results, capsys):
    data = worker_results(ranks)
    assert data["size"] == ranks
    lines = []
    worst = 0.0
    for r in data["results"]:
        keys = ("y", "dx", "dgamma", "dbeta", "running", "eval_y")
        diff = max(r[k] for k in keys)
        worst = max(worst, diff)
        lines.append(
            f"mpi parity: ranks={ranks} {r['name']:<20} rows/rank per step={r['splits']} "
            f"max abs diff={diff:.2e} ({', '.join(f'{k} {r[k]:.1e}' for k in keys)}) "
            f"identical on all ranks={r['identical']}"
        )
    text = "\n".join(lines)
    _report(capsys, text)
    for r in data["results"]:
        assert r["identical"], f"statistics or gradients differ between ranks:\n{text}"
        for key in ("y", "dx", "dgamma", "dbeta", "running", "eval_y"):
            assert r[key] <= TOLERANCES[r["dtype"]], f"{r['name']}: {key} differs:\n{text}"
    assert len(data["errors"]) == ranks and len(set(data["errors"])) == 1, data["errors"]  # the same on every rank
    assert f"1 value per channel in the whole batch of the {ranks} ranks; nothing was updated" in data["errors"][0]


MISMATCH_TIMEOUT = 120


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_that_disagree_all_raise_the_same_error(ranks, tmp_path, capsys):
    """Each way of disagreeing (channels, dtype, mode, forward vs backward, call order,
    the layer's settings, a rank whose input, dy, settings or running statistics are
    rejected, backward before forward, the gradients to all-reduce and their dtypes,
    global_mean's and allreduce_gradients' arguments): under a timeout, every rank
    raises the same SyncError, no layer changes, and the ranks go on in step."""
    out = tmp_path / "mismatch.json"
    _launch(ranks, ["-m", "mpi4py", __file__, "--mismatch", str(out)], timeout=MISMATCH_TIMEOUT)
    data = json.loads(out.read_text())
    assert data["size"] == ranks
    lines = []
    for name, case in data["cases"].items():
        first = case["ranks"][0]
        lines.append(f"mismatch ranks={ranks} {name:<24} {first['type']}: {first['message'][:150]}")
        for r, outcome in enumerate(case["ranks"]):
            assert outcome["type"] == "SyncError", (name, r, outcome)
            assert outcome["message"] == first["message"], (name, r, outcome, first)
            assert outcome["unchanged"], (name, r, "a layer changed")
            assert outcome["after"] == case["ranks"][0]["after"], (name, "the next step differs between ranks")
        assert case["fragment"] in first["message"], (name, first["message"])
    assert "mode: rank 0: running statistics; rank 1: batch statistics" in data["cases"]["mode"]["ranks"][0]["message"]
    causes = {name: [o["cause"] for o in case["ranks"]] for name, case in data["cases"].items()}
    assert causes["input shape"][-1] == "ValueError" and causes["input dtype"][0] == "TypeError"
    assert causes["dy shape"][1] == "ValueError" and causes["backward before forward"][0] == "RuntimeError"
    for name in ("channels", "eps", "momentum", "affine", "activation", "track_running_stats", "gradient dtypes"):
        assert causes[name] == [None] * ranks, (name, causes[name])
    assert causes["bad momentum"][1] == causes["bad eps"][0] == causes["bad activation"][-1] == "ValueError"
    assert causes["read-only statistics"][1] == "ValueError"
    assert causes["not a model"][1] == causes["mean not a number"][1] == "TypeError"
    assert causes["negative count"][1] == causes["fractional count"][1] == "ValueError"
    _report(capsys, "\n".join(lines))


@needs_mpi
@pytest.mark.parametrize("ranks", [2, 3])
def test_ranks_out_of_step_recover_and_eval_counts_may_differ(ranks, tmp_path, capsys):
    """(1) A rank whose batch-norm call was rolled back (a later layer failed there
    only) falls one call behind: the next call raises the same SyncError on every
    rank, and the one after succeeds on every rank, equal to BatchNorm on the
    concatenated batch (the call numbers were realigned, through Sequential's
    rollback too). (2) Ranks evaluating different numbers of batches: eval-mode
    forwards exchange nothing, so training goes on in step afterwards."""
    out = tmp_path / "sequences.json"
    _launch(ranks, ["-m", "mpi4py", __file__, "--sequences", str(out)], timeout=MISMATCH_TIMEOUT)
    data = json.loads(out.read_text())
    rolled = data["rolled back"]
    _report(capsys, f"sequences ranks={ranks}: {json.dumps(data)[:600]}")
    first, second, third = zip(*rolled["steps"], strict=True)
    assert first[0] == "ok" and first[1].startswith("ValueError"), first  # rank 1's Linear refused 3 columns
    assert all(s == second[0] for s in second) and second[0].startswith("SyncError"), second
    assert "call number: rank 0: call #1; rank 1: call #0" in second[0], second[0]
    assert third == ("ok",) * ranks, third
    assert rolled["identical"] and rolled["diff"] is not None and rolled["diff"] < 1e-12, rolled
    uneven = data["uneven eval"]
    assert uneven["steps"] == [["ok"] * 4] + [["ok"] * 3] * (ranks - 1), uneven
    assert uneven["identical"], uneven


@needs_mpi
def test_payload_per_layer_per_step(worker_results, capsys):
    calls = worker_results(2)["payload"]
    C = C_PAYLOAD
    head = dict(sent=8 * 8, received=2 * 8 * 8, dtype="float64")  # the header
    assert calls == [
        head,
        # forward: the moments and the layer's 5 settings
        dict(sent=(2 * C + 1 + 5) * 8, received=2 * (2 * C + 1 + 5) * 8, dtype="float64"),
        head,
        dict(sent=2 * C * 8, received=2 * 2 * C * 8, dtype="float64"),
    ], calls  # backward
    _report(capsys, f"payload numbabn SyncBatchNorm1d(C={C}), 2 ranks, one step: {calls}")


# ---------------------------------------------------------------- in process, no MPI
class MirrorComm:
    """P ranks holding identical data (Allgather repeats this rank's buffer): the
    synchronized result must equal BatchNorm on P copies of the batch."""

    def __init__(self, size):
        self.size = size

    def Get_rank(self):
        return 0

    def Get_size(self):
        return self.size

    def Allgather(self, send, recv):
        recv[...] = send


@pytest.mark.parametrize(
    "kind, kwargs, shape",
    [
        ("1d", dict(num_features=4, activation="relu"), (5, 4, 3)),
        ("2d", dict(num_features=3, channels_last=True), (2, 3, 2, 3)),
    ],
)
def test_mirror_comm_equals_batch_norm_on_copies(kind, kwargs, shape):
    rng = np.random.default_rng(0)
    x, dy = rng.standard_normal(shape) + 3, rng.standard_normal(shape)
    sync = _make(kind, kwargs, np.float64, True, MirrorComm(3))
    ref = _make(kind, kwargs, np.float64, False)
    np.testing.assert_allclose(sync.forward(x), ref.forward(np.concatenate([x] * 3))[: len(x)], atol=1e-12)
    np.testing.assert_allclose(sync.backward(dy), ref.backward(np.concatenate([dy] * 3))[: len(x)], atol=1e-12)
    np.testing.assert_allclose(sync.weight.grad, ref.weight.grad, rtol=1e-12)
    np.testing.assert_allclose(sync.bias.grad, ref.bias.grad, rtol=1e-12)
    for key, value in ref.state_dict().items():
        np.testing.assert_allclose(sync.state_dict()[key], value, rtol=1e-12, err_msg=key)


def test_without_mpi_it_is_exactly_batch_norm():
    """comm=None in a single process (COMM_WORLD of size 1, or no mpi4py): the same
    bits as BatchNorm, in training and eval, forward and backward."""
    rng = np.random.default_rng(1)
    x, dy = rng.standard_normal((6, 3, 4)) + 2, rng.standard_normal((6, 3, 4))
    for mode in (True, False):
        sync = _make("1d", dict(num_features=3), np.float32, True).train(mode)
        ref = _make("1d", dict(num_features=3), np.float32, False).train(mode)
        np.testing.assert_array_equal(sync.forward(x.astype(np.float32)), ref.forward(x.astype(np.float32)))
        np.testing.assert_array_equal(sync.backward(dy.astype(np.float32)), ref.backward(dy.astype(np.float32)))
        np.testing.assert_array_equal(sync.weight.grad, ref.weight.grad)
        for key, value in ref.state_dict().items():
            np.testing.assert_array_equal(sync.state_dict()[key], value)


@pytest.fixture
def no_mpi4py(monkeypatch):
    """``from mpi4py import MPI`` fails, as when mpi4py is not installed."""
    monkeypatch.setitem(sys.modules, "mpi4py", None)
    monkeypatch.delitem(sys.modules, "mpi4py.MPI", raising=False)
    for var in ("PMI_SIZE", "OMPI_COMM_WORLD_SIZE"):
        monkeypatch.delenv(var, raising=False)
    comm_module.world.cache_clear()
    yield monkeypatch
    comm_module.world.cache_clear()


def test_without_mpi4py_it_is_exactly_batch_norm(no_mpi4py):
    assert comm_module.world() is None
    rng = np.random.default_rng(3)
    x = (rng.standard_normal((5, 4)) + 1).astype(np.float32)
    sync = _make("1d", dict(num_features=4), np.float32, True)
    ref = _make("1d", dict(num_features=4), np.float32, False)
    np.testing.assert_array_equal(sync.forward(x), ref.forward(x))
    np.testing.assert_array_equal(sync.backward(x), ref.backward(x))
    assert rank_slice(5) == slice(0, 5) and global_mean(0.5, 5) == 0.5


def test_launched_by_mpiexec_without_mpi4py_is_an_error(no_mpi4py):
    no_mpi4py.setenv("PMI_SIZE", "2")
    with pytest.raises(RuntimeError, match="one of 2 MPI ranks, but mpi4py cannot be used"):
        SyncBatchNorm1d(3).forward(np.ones((4, 3), np.float32))


def test_data_parallel_helpers_on_a_mirror_comm():
    comm = MirrorComm(4)
    assert rank_slice(10, comm) == slice(0, 3)  # array_split: 3, 3, 2, 2
    assert rank_slice(2, MirrorComm(3)) == slice(0, 1)
    assert rank_slice(7, None) == slice(0, 7)
    assert global_mean(2.5, 3, comm) == 2.5
    assert global_mean(float("nan"), 0, comm) != global_mean(float("nan"), 0, comm)  # NaN: no rows anywhere
    rng = np.random.default_rng(2)
    model = Sequential(
        Linear(3, 4, rng=rng, dtype=np.float64),
        SyncBatchNorm1d(4, dtype=np.float64, comm=comm),
        Linear(4, 2, rng=rng, dtype=np.float64),
    )
    model.backward(model.forward(rng.standard_normal((5, 3))))
    before = {q: p.grad.copy() for q, p in model.named_parameters()}
    allreduce_gradients(model, comm)
    for q, p in model.named_parameters():
        factor = 1 if q.startswith("1.") else 4  # sync BN grads are already global
        np.testing.assert_allclose(p.grad, factor * before[q], rtol=1e-15, err_msg=q)


def test_clear_errors():
    with pytest.raises(TypeError, match="comm must be None or an mpi4py.MPI.Intracomm.*no Get_rank"):
        SyncBatchNorm1d(3, comm="MPI.COMM_WORLD")
    with pytest.raises(TypeError, match="no Allgather"):
        SyncBatchNorm2d(3, comm=type("HalfComm", (), {"Get_rank": lambda s: 0, "Get_size": lambda s: 2})())
    with pytest.raises(TypeError, match="model must be a numbabn Layer"):
        allreduce_gradients([1, 2])
    with pytest.raises(SyncError, match=r"the model was rejected on rank\(s\) \[0, 1\] of 2") as info:
        allreduce_gradients([1, 2], MirrorComm(2))
    assert isinstance(info.value.__cause__, TypeError) and "model must be a numbabn Layer" in str(info.value.__cause__)
    with pytest.raises(ValueError, match="n must be a non-negative int"):
        rank_slice(-1, MirrorComm(2))
    if _mpi_missing() is None:
        from mpi4py import MPI

        with pytest.raises(TypeError, match="intracommunicator"):
            check_comm("SyncBatchNorm1d", MPI.COMM_NULL)


def test_global_mean_checks_its_arguments():
    with pytest.raises(TypeError, match="local_mean must be a real number .* got str 'abc'"):
        global_mean("abc", 3)
    with pytest.raises(ValueError, match="local_count must be an int >= 0, got -3"):
        global_mean(1.0, -3)
    with pytest.raises(ValueError, match="local_count must be an int >= 0, got 2.5"):
        global_mean(1.0, 2.5)
    # With other ranks, the rank still takes part, and every rank raises the same error.
    with pytest.raises(SyncError, match=r"the local_count was rejected on rank\(s\) \[0, 1\] of 2") as info:
        global_mean(1.0, 2.5, MirrorComm(2))
    assert isinstance(info.value.__cause__, ValueError)
    assert global_mean(np.float32(2.0), np.int64(3), MirrorComm(2)) == 2.0


class _PeerComm:
    """Two ranks; the other rank's row is ``peer(this rank's row)``."""

    def __init__(self, peer):
        self.peer, self.sizes = peer, []

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def Allgather(self, send, recv):
        self.sizes.append(send.size)
        recv[0] = send
        recv[1] = self.peer(send.copy())


def _state(layer):
    return [v.copy() for v in layer.state_dict().values()] + [layer._ctx, list(layer._sync_calls)]


def _same_state(a, b):
    return all(
        np.array_equal(x, y) if isinstance(x, np.ndarray) else x is y or x == y for x, y in zip(a, b, strict=True)
    )


def test_settings_travel_with_the_moments_and_must_agree():
    """The peer's eps differs: found in the forward's own Allgather (no extra
    collective), before anything changed, and named with both values."""

    def peer(row):
        if row.size == 2 * 4 + 1 + 5:  # the forward payload: moments, then the 5 settings
            row[-5] = 0.1  # eps
        return row

    layer = SyncBatchNorm1d(4, dtype=np.float64, comm=_PeerComm(peer))
    before = _state(layer)
    with pytest.raises(SyncError, match=r"eps: rank 0: 1e-05; rank 1: 0\.1"):
        layer.forward(np.random.default_rng(0).standard_normal((5, 4)))
    assert _same_state(before, _state(layer))


@pytest.mark.parametrize("name, value", [("momentum", 5.0), ("eps", -1.0), ("activation", "gelu"), ("momentum", "0.1")])
def test_bad_settings_are_rejected_before_the_exchange(name, value):
    """A setting made invalid after construction: caught by the rank's own check, which
    sets the header's error flag, so every rank raises and nothing changes."""
    layer = SyncBatchNorm1d(4, dtype=np.float64, comm=MirrorComm(2))
    setattr(layer, name, value)
    before = _state(layer)
    with pytest.raises(SyncError, match=rf"the layer's {name} was rejected on rank\(s\) \[0, 1\]") as info:
        layer.forward(np.random.default_rng(0).standard_normal((5, 4)))
    assert isinstance(info.value.__cause__, ValueError) and name in str(info.value.__cause__)
    assert _same_state(before, _state(layer))


def test_call_numbers_realign_after_a_disagreement():
    """The peer's forward call count falls one behind (its call was rolled back): every
    rank raises, then continues from the same number -- also when Sequential restores
    the layer's attributes after the error."""
    peer_next = {1: 0, 2: 0}  # the peer's next call number, by exchange (1 forward, 2 backward)

    def peer(row):
        """The peer's header: ours with its own call number; it realigns as a rank does."""
        if row.size == 8:  # the header (3 channels: no payload has 8 values)
            exchange, ours, theirs = int(row[2]), row[3], peer_next[int(row[2])]
            row[3] = theirs
            if theirs == ours:
                peer_next[exchange] += 1
            else:
                peer_next.update({1: int(max(ours, theirs)) + 1, 2: int(max(ours, theirs)) + 1})
        return row

    layer = SyncBatchNorm1d(3, dtype=np.float64, comm=_PeerComm(peer))
    model = Sequential(layer)
    x = np.random.default_rng(0).standard_normal((5, 3))
    model.backward(model.forward(x))
    peer_next[1] -= 1
    with pytest.raises(SyncError, match="call number: rank 0: call #1; rank 1: call #0"):
        model.forward(x)
    model.backward(model.forward(x))  # both continue from call #2
    assert layer._sync_calls == [2, 2] and peer_next == {1: 3, 2: 3}


def test_eval_forward_exchanges_nothing():
    """With running statistics the forward is local (ranks may evaluate different
    numbers of batches); the backward still sums the parameter gradients."""
    comm = _PeerComm(lambda row: row)
    layer = SyncBatchNorm1d(4, dtype=np.float64, comm=comm).eval()
    x = np.random.default_rng(0).standard_normal((5, 4))
    ref = BatchNorm1d(4, dtype=np.float64).eval()
    np.testing.assert_array_equal(layer.forward(x), ref.forward(x))
    assert comm.sizes == []
    layer.backward(x)
    ref.backward(x)
    assert comm.sizes == [8, 2 * 4]  # header, then the gradient sums
    np.testing.assert_array_equal(layer.weight.grad, 2 * ref.weight.grad)  # the peer's equal share


def test_repr_and_state_dict_interchangeable_with_batch_norm():
    layer = SyncBatchNorm1d(3, comm=MirrorComm(2))
    assert repr(layer).startswith("SyncBatchNorm1d(3, ") and repr(layer).endswith("comm=MirrorComm)")
    plain = BatchNorm1d(3)
    plain.load_state_dict(layer.state_dict())
    assert copy.deepcopy(layer).comm is not None


def _torch_cpu_stand_ins(torch):
    """CPU versions of the CUDA-only kernels PyTorch's SyncBatchNorm calls, returning
    what the CUDA kernels return for float32 input (float32 statistics)."""

    def dims(t):
        return [d for d in range(t.dim()) if d != 1]

    def bcast(v, t):
        return v.reshape([1, -1] + [1] * (t.dim() - 2))

    def stats(x, eps):
        mean = x.mean(dims(x))
        return mean, torch.rsqrt(x.var(dims(x), unbiased=False) + eps)

    def gather_stats_with_counts(x, mean_all, invstd_all, running_mean, running_var, momentum, eps, counts):
        w = (counts / counts.sum()).reshape(-1, 1)
        mean = (w * mean_all).sum(0)
        var = (w * (invstd_all.pow(-2) - eps + (mean_all - mean) ** 2)).sum(0)
        return mean, torch.rsqrt(var + eps)

    def elemt(x, weight, bias, mean, invstd, eps):
        return (x - bcast(mean, x)) * bcast(invstd * weight, x) + bcast(bias, x)

    def backward_reduce(dy, x, mean, invstd, weight, *needs):
        sum_dy, sum_dy_xmu = dy.sum(dims(x)), (dy * (x - bcast(mean, x))).sum(dims(x))
        return sum_dy, sum_dy_xmu, sum_dy_xmu * invstd, sum_dy

    def backward_elemt(dy, x, mean, invstd, weight, sum_dy, sum_dy_xmu, count):
        m = count.sum()
        xhat = (x - bcast(mean, x)) * bcast(invstd, x)
        return bcast(weight * invstd, x) * (dy - bcast(sum_dy / m, x) - xhat * bcast(sum_dy_xmu * invstd / m, x))

    return dict(
        batch_norm_stats=stats,
        batch_norm_gather_stats_with_counts=gather_stats_with_counts,
        batch_norm_elemt=elemt,
        batch_norm_backward_reduce=backward_reduce,
        batch_norm_backward_elemt=backward_elemt,
    )


def test_pytorch_payload(capsys):
    """PyTorch's SyncBatchNorm buffers for C=256, world size 2, float32 input: its own
    autograd Function runs with the collectives replaced by recorders. Its statistics
    kernels exist only for CUDA, so CPU stand-ins with the CUDA kernels' output dtype
    (float32 for float32 input) supply the numbers; the buffers are PyTorch's code."""
    torch = pytest.importorskip("torch")
    from unittest import mock

    import torch.distributed as dist
    from torch.nn.modules._functions import SyncBatchNorm as TorchSyncBN

    calls = []

    def all_gather(tensors, tensor, group=None, async_op=False):
        calls.append(
            dict(op="all_gather", sent=tensor.nbytes, received=sum(t.nbytes for t in tensors), dtype=str(tensor.dtype))
        )
        for t in tensors:
            t.copy_(tensor)

    def all_reduce(tensor, op=None, group=None, async_op=False):
        calls.append(dict(op="all_reduce", sent=tensor.nbytes, received=tensor.nbytes, dtype=str(tensor.dtype)))
        tensor.mul_(2)

    group = mock.Mock()
    group._get_backend_name.return_value = "gloo"  # the all_gather (list) code path
    C = C_PAYLOAD
    x = torch.randn(4, C, requires_grad=True)
    w, b = torch.ones(C, requires_grad=True), torch.zeros(C, requires_grad=True)
    with (
        mock.patch.multiple(torch, **_torch_cpu_stand_ins(torch)),
        mock.patch.object(dist, "all_gather", all_gather),
        mock.patch.object(dist, "all_reduce", all_reduce),
    ):
        y = TorchSyncBN.apply(x, w, b, torch.zeros(C), torch.ones(C), 1e-5, 0.1, group, 2)
        y.sum().backward()
    assert x.grad is not None and x.grad.shape == x.shape
    assert calls == [
        dict(op="all_gather", sent=(2 * C + 1) * 4, received=2 * (2 * C + 1) * 4, dtype="torch.float32"),
        dict(op="all_reduce", sent=2 * C * 4, received=2 * C * 4, dtype="torch.float32"),
    ], calls
    _report(capsys, f"payload PyTorch SyncBatchNorm(C={C}), world size 2, one step: {calls}")


if __name__ == "__main__":
    if sys.argv[1] == "--mismatch":
        _mismatch_worker(sys.argv[2])
    elif sys.argv[1] == "--sequences":
        _sequence_worker(sys.argv[2])
    else:
        _worker(sys.argv[1])
