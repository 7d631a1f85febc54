"""The choice between streamed and ordinary stores (numbabn._stores): timed on the
first calls per (pass, output size, threads), then fixed; small outputs and a
user-set NUMBABN_STREAM_MIN_MB never time anything; the outputs are the same."""

import numpy as np
import pytest

import numbabn
from numbabn import _stores, config


@pytest.fixture(autouse=True)
def _fresh(monkeypatch):
    monkeypatch.setattr(config, "STREAM_AUTO", True)
    monkeypatch.setattr(config, "STREAM_MIN", 1000)
    _stores.forget()
    yield
    _stores.forget()


class _Clock:
    """A clock the timed call advances: ``cost(stream)`` seconds a call (``cost`` a
    dict or a function)."""

    def __init__(self, cost):
        self.now = 0.0
        self.cost = cost.__getitem__ if isinstance(cost, dict) else cost

    def __call__(self):
        return self.now

    def call(self, log):
        def run(stream):
            log.append(stream)
            self.now += self.cost(stream)
            return stream

        return run


@pytest.mark.parametrize("faster", [True, False])
def test_the_faster_kind_is_kept_after_the_trials(faster):
    clock = _Clock({faster: 1.0, not faster: 2.0})
    log = []
    for _ in range(2 * _stores.TRIALS + 5):
        _stores.run("apply", 5000, clock.call(log), clock)
    trials = log[: 2 * _stores.TRIALS]
    assert trials.count(True) == trials.count(False) == _stores.TRIALS  # both timed, alternating
    assert trials[0] is True and trials[1] is False
    assert log[2 * _stores.TRIALS :] == [faster] * 5
    assert list(_stores.chosen().values()) == [faster]


def test_one_slow_first_call_does_not_decide():
    # the first streamed call pays for fresh pages: the minimum of the trials decides
    costs = iter([9.0, 2.0, 1.0, 2.0, 1.0, 2.0, 1.0])  # streamed, ordinary, ...
    clock = _Clock(lambda stream: next(costs))
    log = []
    for _ in range(2 * _stores.TRIALS + 1):
        _stores.run("apply", 5000, clock.call(log), clock)
    assert log[-1] is True


def test_each_pass_size_class_and_thread_count_is_timed_apart():
    clock = _Clock({True: 1.0, False: 2.0})
    for name, nbytes in (("apply", 5000), ("apply", 6000), ("apply", 20000), ("grad_apply", 5000)):
        for _ in range(2 * _stores.TRIALS):
            _stores.run(name, nbytes, clock.call([]), clock)
    with numbabn.limit_threads(1):
        _stores.run("apply", 5000, clock.call([]), clock)
    n = numbabn.get_num_threads()
    # 5000 and 6000 bytes are one size class (4096-8191), decided by the first's trials
    assert set(_stores.chosen()) == {("apply", 13, n), ("apply", 15, n), ("grad_apply", 13, n)}
    # (the one-thread call started its own trials)


def test_small_outputs_and_a_set_threshold_are_not_timed(monkeypatch):
    log = []
    _stores.run("apply", 999, lambda s: log.append(s))
    assert log == [False]
    monkeypatch.setattr(config, "STREAM_AUTO", False)  # NUMBABN_STREAM_MIN_MB set
    _stores.run("apply", 1000, lambda s: log.append(s))
    assert log == [False, True] and not _stores.chosen()


def test_calls_during_the_trials_give_the_same_outputs(rng):
    # 4000 float32 values = 16000 bytes >= STREAM_MIN: every call here is a trial or
    # uses the choice; all must write the same bytes
    x = rng.standard_normal((4, 5, 200)).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    first = None
    for _ in range(2 * _stores.TRIALS + 2):
        y, ctx = numbabn.batch_norm_forward(x)
        dx, _, _ = numbabn.batch_norm_backward(dy, ctx)
        if first is None:
            first = (y.copy(), dx.copy())
        np.testing.assert_array_equal(y, first[0])
        np.testing.assert_array_equal(dx, first[1])
    assert {k[0] for k in _stores.chosen()} == {("apply", "f", "ncl"), ("grad_apply", "f", "ncl")}


@pytest.mark.skipif(not hasattr(__import__("os"), "fork"), reason="needs fork")
def test_a_fork_while_another_thread_holds_the_lock_leaves_the_child_working():
    import os
    import threading

    inside, release = threading.Event(), threading.Event()

    def holder():  # another thread inside run()'s locked section at the fork
        with _stores._LOCK:
            inside.set()
            release.wait()

    t = threading.Thread(target=holder)
    t.start()
    inside.wait()
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        try:
            _stores.run("apply", 5000, lambda s: None)  # needs the lock: hung before the fix
            os.write(w, b"ok")
        finally:
            os._exit(0)
    release.set()
    t.join()
    os.close(w)
    import select

    ready, _, _ = select.select([r], [], [], 30)
    got = os.read(r, 2) if ready else b""
    if not got:
        os.kill(pid, 9)
    os.waitpid(pid, 0)
    os.close(r)
    assert got == b"ok"


def test_the_thread_count_is_the_one_the_call_uses():
    # numbabn.torch runs the kernels on PyTorch's team and thread count (use_team):
    # a choice timed there belongs to that count, not to numbabn's own setting
    from numbabn import _threads

    clock = _Clock({True: 1.0, False: 2.0})
    with _threads.use_team(None, 1):
        for _ in range(2 * _stores.TRIALS):
            _stores.run("apply", 5000, clock.call([]), clock)
    assert set(_stores.chosen()) == {("apply", 13, 1)}


def test_the_fused_residual_kernels_are_timed_apart_from_the_plain_ones(rng):
    # Their extra input stream changes the bytes moved per output byte, so the plain
    # kernels' choice does not carry over; both runs write the same bytes as before.
    x = rng.standard_normal((4, 5, 200)).astype(np.float32)
    r = rng.standard_normal(x.shape).astype(np.float32)
    dy = rng.standard_normal(x.shape).astype(np.float32)
    for _ in range(2 * _stores.TRIALS):
        y, ctx = numbabn.batch_norm_forward(x, activation="relu")
        numbabn.batch_norm_backward(dy, ctx)
        yr, ctxr = numbabn.batch_norm_forward(x, activation="relu", residual=r)
        numbabn.batch_norm_backward(dy, ctxr)
    assert {k[0] for k in _stores.chosen()} == {
        ("apply", "f", "ncl"),
        ("grad_apply", "f", "ncl"),
        ("apply_res", "f", "ncl"),
        ("grad_apply_res", "f", "ncl"),
    }
