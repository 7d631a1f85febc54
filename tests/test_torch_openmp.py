"""numbabn.torch runs numbabn's kernels on PyTorch's OpenMP team (numbabn/torch/_openmp.py):
used for large inputs, same results as numbabn's own pool, never after fork, and
switched off by NUMBABN_TORCH_OPENMP=0."""

import multiprocessing
import os
import subprocess
import sys
import threading

import numpy as np
import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

import numbabn  # noqa: E402
import numbabn.torch as nbt  # noqa: E402
from numbabn import _threads  # noqa: E402
from numbabn.torch import _openmp  # noqa: E402

needs_openmp = pytest.mark.skipif(
    "ATen parallel backend: OpenMP" not in torch.__config__.parallel_info() or not sys.platform.startswith("linux"),
    reason="this PyTorch does not run on OpenMP, or the runtime cannot be found on this OS",
)
SHAPE = (8, 16, 64, 80)  # 655 360 values: above SERIAL_MAX, so the kernels go parallel


@pytest.fixture(autouse=True)
def _two_torch_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def _fwd_bwd(seed, channels_last=False):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(SHAPE, generator=g)
    dy = torch.randn(SHAPE, generator=g)
    if channels_last:
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    out = []
    for bn in (nbt.BatchNorm2d(SHAPE[1], activation="relu"), torch.nn.BatchNorm2d(SHAPE[1])):
        xr = x.clone().requires_grad_()
        y = bn(xr)
        y = y if isinstance(bn, nbt.BatchNorm2d) else torch.relu(y)
        y.backward(dy)
        out.append((y.detach(), xr.grad, bn.weight.grad, bn.running_var.clone()))
    return out


@needs_openmp
@pytest.mark.parametrize("channels_last", [False, True])
def test_large_calls_run_on_the_openmp_team_not_the_pool(monkeypatch, channels_last):
    calls = []
    run = _openmp.team()
    assert run is not None

    def counting(body, n):
        calls.append(n)
        return run(body, n)

    def no_pool(workers):
        raise AssertionError("numbabn's own pool was used inside numbabn.torch")

    monkeypatch.setattr(_openmp, "team", lambda: counting)
    monkeypatch.setattr(_threads, "_get_pool", no_pool)
    with numbabn.limit_threads(2):
        ours, native = _fwd_bwd(0, channels_last)
    assert len(calls) >= 4 and set(calls) == {2}  # statistics, apply, gradient sums, gradient apply
    for a, b in zip(ours, native, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("openmp", [True, False])
@pytest.mark.parametrize(("torch_threads", "numbabn_threads"), [(1, 2), (2, 1), (3, 2)])
def test_modules_use_pytorchs_thread_count(monkeypatch, openmp, torch_threads, numbabn_threads):
    """A numbabn.torch layer uses as many threads as torch.set_num_threads allows, as
    the torch.nn layer it replaces would, whatever numbabn's own setting: with
    PyTorch limited to one thread (torchrun's OMP_NUM_THREADS=1 per rank) it used to
    start a second one. On the OpenMP team or on numbabn's pool."""
    if openmp and (_openmp.team() is None or not sys.platform.startswith("linux")):
        pytest.skip("this PyTorch does not run on OpenMP, or the runtime cannot be found")
    teams, helpers = [], []
    run = _openmp.team() if openmp else None
    if run is not None:
        monkeypatch.setattr(_openmp, "team", lambda: lambda body, n: (teams.append(n), run(body, n))[1])
    else:
        monkeypatch.setattr(_openmp, "team", lambda: None)
    on_pool = _threads._run_on_pool
    monkeypatch.setattr(
        _threads, "_run_on_pool", lambda take, n, *rest: (helpers.append(n), on_pool(take, n, *rest))[1]
    )
    torch.set_num_threads(torch_threads)

    def used():
        return teams + [n + 1 for n in helpers]  # a pool call's helpers and the caller

    with numbabn.limit_threads(numbabn_threads):
        ours, native = _fwd_bwd(0)
        by_torch = used()
        numbabn.batch_norm_forward(np.zeros(SHAPE, np.float32))  # numbabn's own API: its own setting
    # statistics, normalise, gradient sums, gradient apply; then numbabn's statistics, normalise
    assert by_torch == ([] if torch_threads == 1 else [torch_threads] * 4)
    assert used()[len(by_torch) :] == ([] if numbabn_threads == 1 else [numbabn_threads] * 2)
    for a, b in zip(ours, native, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


@needs_openmp
@pytest.mark.parametrize("threads", [2, 3])
def test_team_and_pool_give_identical_results(threads):
    x = np.random.default_rng(1).standard_normal(SHAPE).astype(np.float32)
    dy = np.random.default_rng(2).standard_normal(SHAPE).astype(np.float32)
    g, b = np.full(SHAPE[1], 1.5, np.float32), np.full(SHAPE[1], 0.25, np.float32)
    results = []
    for run in (None, _openmp.team()):
        with numbabn.limit_threads(threads), _threads.use_team(run):
            y, ctx = numbabn.batch_norm_forward(x, g, b, activation="relu")
            results.append((y, *numbabn.batch_norm_backward(dy, ctx)))
    for a, b_ in zip(*results, strict=True):
        assert np.array_equal(a, b_)


@needs_openmp
def test_python_threads_each_get_their_own_team():
    with numbabn.limit_threads(2):
        expected = [_fwd_bwd(s)[0] for s in range(4)]
        got = {}
        workers = [threading.Thread(target=lambda s=s: got.update({s: _fwd_bwd(s)[0]})) for s in range(4)]
        for w in workers:
            w.start()
        for w in workers:
            w.join(timeout=120)
    assert sorted(got) == [0, 1, 2, 3]
    for s in range(4):
        for a, b in zip(got[s], expected[s], strict=True):
            assert torch.equal(a, b)


def _child(seed):
    x = np.random.default_rng(seed).standard_normal(SHAPE).astype(np.float32)
    bn = nbt.BatchNorm2d(SHAPE[1])
    with torch.no_grad():
        y = bn(torch.from_numpy(x))
    ref, _ = numbabn.batch_norm_forward(x, None, None)
    return _openmp.team() is None, bool(np.allclose(y.numpy(), ref, atol=1e-5))


@needs_openmp
def test_a_forked_child_uses_numbabns_pool():
    """The OpenMP team does not survive fork (PyTorch's own parallel ops hang in such
    a child); numbabn.torch falls back to numbabn's pool there and works."""
    with numbabn.limit_threads(2):
        _fwd_bwd(0)  # the parent uses the team first
        assert _openmp.team() is not None
        with multiprocessing.get_context("fork").Pool(1) as pool:
            got = pool.map_async(_child, [0, 1]).get(timeout=120)
    assert got == [(True, True), (True, True)]


def test_switched_off_by_the_environment():
    code = "import numbabn.torch._openmp as o; print(o.team() is None)"
    env = dict(os.environ, NUMBABN_TORCH_OPENMP="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "True"


@needs_openmp
@pytest.mark.parametrize("error", [KeyboardInterrupt, SystemExit])
def test_an_interrupt_as_a_team_thread_enters_the_callback_is_raised_not_lost(error):
    """A signal handler's exception can be raised as the team's callback starts, before
    its ``try`` (Ctrl-C, a SIGTERM handler's sys.exit): ctypes dropped it and the call
    returned normally (1 signal in 6-20). A trace function raising at the callback's
    'call' event puts the exception at that very point, on this thread."""
    run = _openmp.team()
    assert run is not None
    pieces = []
    previous = sys.unraisablehook

    def tracer(frame, event, arg):
        if event == "call" and frame.f_code.co_name == "call" and frame.f_code.co_filename == _openmp.__file__:
            sys.settrace(None)
            raise error
        return None

    sys.settrace(tracer)
    try:
        with pytest.raises(error):
            run(lambda: pieces.append(1), 2)
    finally:
        sys.settrace(None)
    assert sys.unraisablehook is previous  # the hook is put back
    run(lambda: pieces.append(1), 2)  # and the team works as before
