"""numbabn.train.Trainer and History: determinism, metrics that change nothing,
errors, the progress bar, and the JSON round trip; and the argument checks of
numbabn.train.lr_search.largest_stable_lr (its search is tested in test_train_summary.py)."""

import io
import json
import pickle
import re
import subprocess
import sys

import numpy as np
import pytest

from numbabn.layers import Linear, MSELoss, SigmoidBinaryCrossEntropy, SoftmaxCrossEntropy
from numbabn.optim import SGD
from numbabn.train import GradientNorm, HessianEigenvalue, History, LandscapeProbe, Metric, Trainer
from numbabn.train.lr_search import largest_stable_lr

from .train_nets import all_metrics, bn_net, data, two_layer


def _trainer(model, seed, metrics, record_every=3, **extra):
    """The suite's Trainer: SGD with momentum, batches of 16, evaluated on held-out data."""
    opt = SGD(model.parameters(), lr=0.2, momentum=0.9)
    return Trainer(
        model,
        SoftmaxCrossEntropy(),
        opt,
        batch_size=16,
        seed=seed,
        metrics=metrics,
        record_every=record_every,
        eval_data=data(99, 40),
        verbose=0,
        **extra,
    )


def _train(seed, metrics, steps=25, noisy=True):
    model, (X, y) = bn_net(seed, noisy=noisy), data(seed + 7)
    return model, _trainer(model, seed, metrics).fit(X, y, steps=steps)


def test_trainer_with_metrics_is_bit_identical():
    plain_model, plain = _train(3, [])
    model, hist = _train(3, all_metrics())
    assert hist.loss == plain.loss and hist.accuracy == plain.accuracy and hist.eval == plain.eval
    a, b = plain_model.state_dict(), model.state_dict()
    assert all(np.array_equal(a[k], b[k]) for k in a)
    assert set(hist.metrics) == {"ics", "landscape", "percentiles", "grad_norm", "weight_norm", "hessian"}
    assert hist.metrics["ics"]["step"] == list(range(0, 25, 3))
    # the probes evaluate the training step's own function (same batch, same noise draw)
    for step, value in zip(*hist.metric("landscape"), strict=True):
        assert value["loss"] == pytest.approx(hist.loss[step], rel=1e-12)
    assert hist.metrics["ics"]["value"][0]["0"]["l2"] == 0.0


def test_trainer_determinism_and_batches():
    _, a = _train(5, [], noisy=False)
    model_b, b = _train(5, [], noisy=False)
    _, c = _train(6, [], noisy=False)
    assert a.loss == b.loss and a.step == list(range(25))
    assert a.loss != c.loss
    assert a.eval["step"] == [0, 3, 6, 9, 12, 15, 18, 21, 24, 25]
    # 120 samples / batch 16: 7 batches per epoch, 25 steps -> ceil(25/7) = 4 epochs
    X, y = data(5 + 7)
    tr = Trainer(model_b, SoftmaxCrossEntropy(), SGD(model_b.parameters(), lr=0.1), batch_size=16, seed=0, verbose=0)
    assert len(tr.fit(X, y, epochs=2).step) == 14
    assert tr.steps_done == 14


def test_reused_metric_records_what_a_new_one_does():
    """A run starts every Metric afresh: a HessianEigenvalue that measured a run
    before (and holds its warm-start vector) records the same values as a new one."""
    reused = HessianEigenvalue(iters=3, eps=1e-2)
    _, first = _train(4, [reused], steps=7)
    _, again = _train(4, [reused], steps=7)
    _, new = _train(4, [HessianEigenvalue(iters=3, eps=1e-2)], steps=7)
    assert again.metrics == first.metrics == new.metrics


def test_a_later_fit_continues_the_metrics_state():
    """Only a run's first fit resets the metrics: two fits of one epoch each record
    what one fit of two epochs does (the probe of the second fit stays warm-started;
    reset there, it would start cold and record other values)."""
    histories = []
    for parts in ([1, 1], [2]):
        model, (X, y) = bn_net(4), data(11)
        opt = SGD(model.parameters(), lr=0.2, momentum=0.9)
        metrics = [HessianEigenvalue(iters=5, tol=1e-6, eps=1e-2)]
        tr = Trainer(
            model, SoftmaxCrossEntropy(), opt, batch_size=16, seed=4, metrics=metrics, record_every=3, verbose=0
        )
        runs = [tr.fit(X, y, epochs=epochs).metrics["hessian"] for epochs in parts]
        histories.append({k: sum((r[k] for r in runs), []) for k in ("step", "value")})
    assert histories[0]["step"] == histories[1]["step"] == [0, 3, 6, 9, 12]
    assert histories[0]["value"] == histories[1]["value"]


def test_failed_fit_leaves_metric_state_as_before():
    kept, failed = HessianEigenvalue(iters=3, eps=1e-2), HessianEigenvalue(iters=3, eps=1e-2)
    for metric in (kept, failed):
        _train(4, [metric], steps=7)  # both hold the vector of step 6 now
    calls = []

    def fails_second_time(model, loss, optimizer, batch):
        calls.append(batch)
        if len(calls) == 2:
            raise RuntimeError("probe failed")
        return 0.0

    with pytest.raises(RuntimeError, match="probe failed"):
        _train(4, [failed, fails_second_time], steps=7)  # `failed` probes steps 0 and 3 first
    model, (X, y) = bn_net(4), data(11)
    batch = (X[:16], y[:16])  # a standalone call warm-starts from the vector kept
    assert failed(model, SoftmaxCrossEntropy(), None, batch) == kept(model, SoftmaxCrossEntropy(), None, batch)


def test_trainer_errors(rng):
    model = two_layer(rng)
    opt = SGD(model.parameters(), lr=0.1)
    X, y = rng.standard_normal((10, 3)), rng.standard_normal((10, 2))
    tr = Trainer(model, MSELoss(), opt, batch_size=4, seed=0, verbose=0)
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        tr.fit(X, y)
    with pytest.raises(ValueError, match="exactly one of steps and epochs"):
        tr.fit(X, y, steps=2, epochs=1)
    with pytest.raises(ValueError, match="same"):
        tr.fit(X, y[:5], steps=2)
    with pytest.raises(ValueError, match="larger than the 10"):
        Trainer(model, MSELoss(), opt, batch_size=11, seed=0).fit(X, y, steps=1)
    with pytest.raises(ValueError, match="batch_size"):
        Trainer(model, MSELoss(), opt, batch_size=0, seed=0)
    with pytest.raises(ValueError, match="Trainer: seed must be an int >= 0, got -1"):
        Trainer(model, MSELoss(), opt, batch_size=2, seed=-1)
    with pytest.raises(ValueError, match="distinct"):
        Trainer(model, MSELoss(), opt, batch_size=2, seed=0, metrics=[GradientNorm(), GradientNorm()])
    with pytest.raises(TypeError, match="callable"):
        Trainer(model, MSELoss(), opt, batch_size=2, seed=0, metrics=[3])
    with pytest.raises(ValueError, match="sample_weight is all zero"):  # every step a NaN loss, no gradient
        tr.fit(X, y, steps=2, sample_weight=np.zeros(len(X)))
    # an optimizer built for another model would train nothing; one over some of the
    # model's parameters (the others frozen) is fine
    with pytest.raises(ValueError, match="optimizer manages 4 Parameters, none of the model's 4, so fit"):
        Trainer(model, MSELoss(), SGD(two_layer(rng).parameters(), lr=0.1), batch_size=2, seed=0)
    Trainer(model, MSELoss(), SGD(model[1].parameters(), lr=0.1), batch_size=2, seed=0)
    with pytest.raises(TypeError, match=r"^Trainer: metrics must be a sequence of callables .*, got int 5$"):
        Trainer(model, MSELoss(), opt, batch_size=2, seed=0, metrics=5)
    with pytest.raises(ValueError, match="spacing"):
        LandscapeProbe(spacing="cubic")
    hist = tr.fit(X, y, steps=3)
    assert hist.accuracy is None and "accuracy" not in hist.eval


# ---------------------------------------------------------------- a run split into several fits
def _state(trainer):
    """Everything that decides the rest of a run, as bytes and plain values."""
    model = trainer.model
    arrays = [v.tobytes() for v in model.state_dict().values()]
    generators = [layer.rng.bit_generator.state for layer in model if hasattr(layer, "rng")]
    optimizer = [{k: v.tobytes() for k, v in s.items()} for s in trainer.optimizer.state_dict()["state"]]
    return arrays, generators, optimizer, trainer.rng.bit_generator.state, trainer.steps_done


def _records(histories):
    """The step records of several fits, joined (the evaluations are left out: every fit
    evaluates after its last step)."""
    joined = {"step": [], "loss": [], "accuracy": [], "metrics": {}}
    for h in histories:
        for key in ("step", "loss", "accuracy"):
            joined[key] += getattr(h, key)
        for name, series in h.metrics.items():
            for key, values in series.items():
                joined["metrics"].setdefault(name, {}).setdefault(key, []).extend(values)
    return joined


class _BatchIds:
    """A metric that notes the samples of each batch it sees (by X's first column)."""

    name = "batch"

    def __init__(self):
        self.seen = []

    def __call__(self, model, loss, optimizer, batch):
        self.seen.append(batch[0][:, 0].tolist())
        return 0.0


def _split_run(parts, shuffle=True, weighted=False, loss=None, metrics=(), exact_resume=False):
    """A NoisyBatchNorm net (its own generator) trained by one fit per entry of
    ``parts`` (its step count); 100 samples in batches of 16: 6 steps an epoch."""
    model, (X, y) = bn_net(4), data(11, 100)
    ids = _BatchIds()
    trainer = Trainer(
        model,
        loss or SoftmaxCrossEntropy(),
        SGD(model.parameters(), lr=0.2, momentum=0.9),
        batch_size=16,
        seed=4,
        shuffle=shuffle,
        metrics=[ids, *metrics],
        verbose=0,
        exact_resume=exact_resume,
    )
    weights = np.random.default_rng(5).uniform(0.0, 2.0, len(X)) if weighted else None
    histories = [trainer.fit(X, y, steps=steps, sample_weight=weights) for steps in parts]
    return trainer, histories, ids.seen


@pytest.mark.parametrize("shuffle", [True, False])
@pytest.mark.parametrize("weighted", [False, True])
@pytest.mark.parametrize("parts", [[3, 2], [1] * 5, [4, 5, 5], [6, 8], [5, 1, 8]])
def test_several_fits_train_as_one_fit(shuffle, weighted, parts):
    """A later fit continues the epoch in progress: the batches, the records and the
    final state are those of one fit of all the steps, bit for bit (splits inside an
    epoch, at its end, and across epochs of 6 steps)."""
    one, [whole], seen = _split_run([sum(parts)], shuffle, weighted)
    split, histories, split_seen = _split_run(parts, shuffle, weighted)
    epoch = [i for batch in seen[:6] for i in batch]
    assert split_seen == seen and len(set(epoch)) == len(epoch)  # no sample twice in an epoch
    assert _records(histories) == _records([whole])
    assert _state(split) == _state(one)


def test_other_data_begins_a_new_epoch():
    """The epoch in progress continues on the same data (equal arrays: a copy does);
    other data (other values, or the same X with other y) begins a new one."""
    X, y = data(11, 100)
    other = X[::-1].copy()
    orders = np.random.default_rng(4)  # the trainer's generator: one permutation per epoch
    first, second, third = (orders.permutation(100) for _ in range(3))

    def batch(x, order, b):
        return x[order[16 * b : 16 * (b + 1)], 0].tolist()

    trainer, _, seen = _split_run([3])
    trainer.fit(X.copy(), y.copy(), steps=2)
    trainer.fit(other, y, steps=2)
    trainer.fit(other, (y + 1) % 3, steps=1)
    assert seen == [batch(X, first, b) for b in range(5)] + [
        batch(other, second, 0),
        batch(other, second, 1),
        batch(other, third, 0),
    ]
    ordered, _, seen = _split_run([3], shuffle=False)
    ordered.fit(other, y, steps=1)  # in order: the new epoch starts at sample 0
    assert seen[3] == other[:16, 0].tolist()


def test_a_pickled_trainer_continues_the_epoch():
    one, [whole], seen = _split_run([5])
    trainer, [first], _ = _split_run([3])
    copy = pickle.loads(pickle.dumps(trainer))
    rest = copy.fit(*data(11, 100), steps=2)
    assert first.loss + rest.loss == whole.loss and copy.metrics[0].seen == seen
    assert _state(copy) == _state(one)


def test_the_same_arrays_continue_without_hashing_them_again(monkeypatch):
    """A loop of short fits on the same arrays hashes the data once, when the first call
    leaves its epoch unfinished (each continuing call used to hash all of X)."""
    from numbabn.train import trainer as trainer_module

    calls = []
    real = trainer_module._fingerprint
    monkeypatch.setattr(trainer_module, "_fingerprint", lambda X, y: calls.append(1) or real(X, y))
    trainer, _, _ = _split_run([])
    X, y = data(11, 100)
    for _ in range(5):
        trainer.fit(X, y, steps=1)
    assert len(calls) == 1
    trainer.fit(X.copy(), y.copy(), steps=1)  # equal copies: hashed, and the epoch goes on
    assert len(calls) == 2 and trainer._epoch is None  # the sixth step ended the 6-step epoch


@pytest.mark.parametrize("change", [("batch_size", 50), ("batch_size", 8), ("shuffle", False)])
def test_another_batch_size_or_shuffle_begins_a_new_epoch(change):
    """The epoch in progress was cut with the old batch size: continuing it with another
    gave empty batches (NaN losses, for ever) or trained samples twice in one epoch."""
    trainer, _, seen = _split_run([2])
    setattr(trainer, *change)
    X, y = data(11, 100)
    rng = np.random.default_rng()
    rng.bit_generator.state = trainer.rng.bit_generator.state
    order = rng.permutation(100) if trainer.shuffle else np.arange(100)  # a new epoch's
    history = trainer.fit(X, y, steps=2)
    assert np.isfinite(history.loss).all()
    assert seen[2] == X[order[: trainer.batch_size], 0].tolist()
    assert trainer._epoch is None or trainer._epoch.cut == trainer._cut()


@pytest.mark.parametrize(
    "n, leftover, shuffle, sizes",
    [
        (100, "batch", True, [16] * 6 + [4]),  # scikit-learn's gen_batches
        (97, "batch", True, [16] * 5 + [17]),  # one sample left: it joins the last batch
        (96, "batch", False, [16] * 6),
        (98, "keep", True, [16] * 6 + [2]),  # scikit-learn's (one sample would be a batch too: not with BN)
        (100, "join", True, [16] * 5 + [20]),
        (100, "skip", False, [16] * 6),
        (100, None, True, [16] * 6),  # the defaults: skip when shuffling
        (100, None, False, [16] * 5 + [20]),  # join in order
    ],
)
def test_leftover_rules_cut_each_epoch_as_documented(n, leftover, shuffle, sizes):
    model, (X, y) = bn_net(4), data(11, n)
    ids = _BatchIds()
    trainer = Trainer(
        model,
        SoftmaxCrossEntropy(),
        SGD(model.parameters(), lr=0.1),
        batch_size=16,
        seed=4,
        shuffle=shuffle,
        leftover=leftover,
        metrics=[ids],
        verbose=0,
    )
    trainer.fit(X, y, epochs=2)
    assert [len(b) for b in ids.seen] == sizes * 2 and trainer.epoch_batch_sizes(n) == sizes
    for epoch in (ids.seen[: len(sizes)], ids.seen[len(sizes) :]):
        drawn = sorted(v for batch in epoch for v in batch)
        assert len(set(drawn)) == len(drawn) == sum(sizes)  # each sample at most once an epoch
    with pytest.raises(ValueError, match="leftover must be None, 'skip', 'join', 'batch' or 'keep', got 'last'"):
        Trainer(model, SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.1), batch_size=16, seed=0, leftover="last")


def test_an_epoch_pickled_before_leftover_existed_continues():
    """Its cut was (batch_size, shuffle); compared with (batch_size, shuffle, rule) it
    never matched, and the loaded trainer silently dropped the rest of its epoch."""
    one, [whole], _ = _split_run([5])
    trainer, [first], _ = _split_run([3])
    state = dict(vars(trainer))
    state["_epoch"] = state["_epoch"]._replace(cut=state["_epoch"].cut[:2])
    loaded = Trainer.__new__(Trainer)
    loaded.__setstate__(state)
    rest = loaded.fit(*data(11, 100), steps=2)
    assert first.loss + rest.loss == whole.loss


def test_a_trainer_pickled_by_an_earlier_version_loads_and_trains():
    trainer, _, _ = _split_run([2])
    old = dict(vars(trainer))
    for name in ("history", "_epoch", "exact_resume"):
        del old[name]
    old["_step_checkpoints"] = True  # a name of the first version of that day
    loaded = Trainer.__new__(Trainer)
    loaded.__setstate__(old)  # what unpickling does with such a state
    assert loaded.history is None and loaded._epoch is None and loaded.exact_resume is False
    assert np.isfinite(loaded.fit(*data(11, 100), steps=3).loss).all()


class _Count(Metric):
    """A metric with state: the number of its calls since the run began."""

    name = "count"

    def __init__(self):
        self.calls = 0

    def reset(self):
        self.calls = 0

    def __call__(self, model, loss, optimizer, batch):
        self.calls += 1
        return self.calls


class _RaiseAt(SoftmaxCrossEntropy):
    """A loss, or a metric (called with 4 arguments, recording 0), that raises ``error``
    on its ``at``-th call."""

    name = "raiser"

    def __init__(self, at, error):
        super().__init__()
        self.at, self.error, self.calls = at, error, 0

    def __call__(self, *args, **kwargs):
        self.calls += 1
        if self.calls == self.at:
            raise self.error
        return 0.0 if len(args) == 4 else super().__call__(*args, **kwargs)


@pytest.mark.parametrize(
    "where, at, error",
    [
        ("loss", 4, KeyboardInterrupt),  # after the forward pass of step 3, inside the first epoch
        ("loss", 7, KeyboardInterrupt),  # the first step of the second epoch
        ("metric", 5, KeyboardInterrupt),  # before the forward pass, after the counting metric
        ("loss", 1, SystemExit),  # the first step: nothing is kept
    ],
)
def test_an_interrupt_keeps_the_steps_done_and_the_run_resumes_exactly(where, at, error):
    """With ``exact_resume``, a BaseException that is not an Exception (Ctrl-C) keeps
    the completed steps and their records (trainer.history) and undoes the step it cut
    short: running statistics, counters, generators, a Metric's state, the epoch
    position. A later fit then continues as the uninterrupted run, bit for bit."""
    steps, done = 10, at - 1
    one, [whole], _ = _split_run([steps], metrics=[_Count()])
    raiser = _RaiseAt(at, error())
    kwargs = {"loss": raiser, "metrics": [_Count()]} if where == "loss" else {"metrics": [_Count(), raiser]}
    trainer, _, seen = _split_run([], exact_resume=True, **kwargs)
    X, y = data(11, 100)
    with pytest.raises(error):
        trainer.fit(X, y, steps=steps)
    assert trainer.steps_done == done and trainer.metrics[1].calls == done
    kept = [trainer.history] if done else []  # interrupted in its first step, the call changed nothing
    if done:
        partial, [head], _ = _split_run([done], metrics=[_Count()])
        kept[0].metrics.pop("raiser", None)
        assert _records(kept) == _records([head]) and _state(trainer) == _state(partial)
    else:
        assert trainer.history is None and _state(trainer) == _state(_split_run([])[0])
    rest = trainer.fit(X, y, steps=steps - done)
    rest.metrics.pop("raiser", None)
    assert _records([*kept, rest]) == _records([whole]) and _state(trainer) == _state(one)
    assert seen[:done] + seen[-(steps - done) :] == _split_run([steps])[2]


def test_by_default_an_interrupt_keeps_the_steps_done_and_trains_the_cut_batch_again():
    """Without ``exact_resume`` (no per-step copies of the model): the completed steps
    and their records stay, the trainer's own state goes back to the cut step's start
    (so the next fit trains that batch again), and the model keeps what the cut step
    did: here its forward pass moved the running statistics, and no parameter changed.
    (The interrupt used to lose the records, and the next fit skipped the cut batch.)"""
    trainer, _, seen = _split_run([], loss=_RaiseAt(4, KeyboardInterrupt()))
    X, y = data(11, 100)
    with pytest.raises(KeyboardInterrupt):
        trainer.fit(X, y, steps=10)
    done, [head], head_seen = _split_run([3])
    assert trainer.steps_done == 3 and _records([trainer.history]) == _records([head])
    assert trainer.rng.bit_generator.state == done.rng.bit_generator.state
    params = lambda t: [p.value.tobytes() for p in t.model.parameters()]  # noqa: E731
    assert params(trainer) == params(done)
    stats = lambda t: [b.tobytes() for layer in t.model for b in getattr(layer, "_buffers", {}).values()]  # noqa: E731
    assert stats(trainer) != stats(done)  # the cut forward moved them: not undone by default
    trainer.loss = SoftmaxCrossEntropy()
    trainer.fit(X, y, steps=1)
    assert seen[3:] == [seen[3], seen[3]] and seen[3] == _split_run([4])[2][3]  # the cut batch, trained again


def test_an_interrupt_in_the_final_evaluation_drops_that_evaluation_only():
    X, y = data(11, 100)

    def trainer(loss):
        model = bn_net(4)
        opt = SGD(model.parameters(), lr=0.2, momentum=0.9)
        return Trainer(model, loss, opt, batch_size=16, seed=4, eval_data=data(99, 40), verbose=0)

    done = trainer(SoftmaxCrossEntropy())
    whole = done.fit(X, y, steps=3)
    cut = trainer(_RaiseAt(7, KeyboardInterrupt()))  # each step evaluates, then trains: call 7 is the last evaluation
    with pytest.raises(KeyboardInterrupt):
        cut.fit(X, y, steps=3)
    assert cut.steps_done == 3 and cut.history.eval == {k: v[:-1] for k, v in whole.eval.items()}
    assert _records([cut.history]) == _records([whole]) and _state(cut) == _state(done)


def test_a_failed_fit_also_restores_the_epoch_and_the_history():
    """An Exception undoes the whole call (unlike an interrupt): the epoch position and
    ``history`` too, so the run then continues as if the call never happened."""
    one, [whole], _ = _split_run([5])
    trainer, [first], _ = _split_run([3])
    X, y = data(11, 100)
    trainer.loss = _RaiseAt(2, RuntimeError("bad batch"))
    with pytest.raises(RuntimeError, match="bad batch"):
        trainer.fit(X, y, steps=2)
    assert trainer.history is first and len(first.step) == 3 and trainer.steps_done == 3
    trainer.loss = SoftmaxCrossEntropy()
    rest = trainer.fit(X, y, steps=2)
    assert first.loss + rest.loss == whole.loss and _state(trainer) == _state(one)


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"refine": 2.5}, ValueError, "refine must be an int >= 0, got 2.5"),
        ({"refine": -1}, ValueError, "refine must be an int >= 0, got -1"),
        ({"max_trials": 0}, ValueError, "max_trials must be a positive int, got 0"),
        ({"max_trials": "5"}, ValueError, "max_trials must be a positive int, got '5'"),
        ({"factor": 1.0}, ValueError, "factor must be a finite number > 1, got 1.0"),
        ({"lr_max": True}, ValueError, "lr_max must be a finite number > 0, got True"),
        ({"run": 3}, TypeError, "run must be callable as run(lr) -> step losses, got int 3"),
    ],
)
def test_largest_stable_lr_checks_every_argument_before_training(kwargs, error, message):
    runs = []

    def run(lr):
        runs.append(lr)
        return [1.0, 0.5]

    with pytest.raises(error, match=re.escape(f"largest_stable_lr: {message}")):
        largest_stable_lr(**{"run": run, "lr0": 1.0, **kwargs})
    assert runs == []


def test_history_json_round_trip():
    _, hist = _train(2, all_metrics(), steps=7)
    text = hist.to_json()
    back = History.from_json(text)
    assert back.to_dict() == json.loads(text) == hist.to_dict()
    assert back.metric("ics") == hist.metric("ics")
    with pytest.raises(KeyError, match="no metric"):
        back.metric("nope")
    with pytest.raises(ValueError, match="keys"):
        History.from_json('{"loss": []}')
    pd = pytest.importorskip("pandas")
    frame = back.to_frame()
    assert isinstance(frame, pd.DataFrame) and list(frame.index) == list(range(8))
    assert frame.loc[3, "landscape.beta_smoothness"] == hist.metrics["landscape"]["value"][1]["beta_smoothness"]
    assert np.isnan(frame.loc[1, "ics.1.l2"]) and frame.loc[7, "eval_loss"] == hist.eval["loss"][-1]


class _Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_on_a_terminal_only(monkeypatch, rng):
    model = two_layer(rng)
    X, y = rng.standard_normal((40, 3)), rng.standard_normal((40, 2))
    terminal = _Terminal()
    monkeypatch.setattr(sys, "stderr", terminal)
    Trainer(model, MSELoss(), SGD(model.parameters(), lr=0.01), batch_size=4, seed=0, label="fit").fit(X, y, steps=3)
    frames = terminal.getvalue().split("\r")[1:]
    assert [f.split()[-2:] for f in frames] == [["0/3", "0%"], ["1/3", "33%"], ["2/3", "66%"], ["3/3", "100%"]]
    assert frames[-1] == f"fit  [{'#' * 30}]  3/3  100%\n"
    pipe = io.StringIO()  # not a terminal: nothing drawn
    monkeypatch.setattr(sys, "stderr", pipe)
    Trainer(model, MSELoss(), SGD(model.parameters(), lr=0.01), batch_size=4, seed=0).fit(X, y, steps=3)
    assert pipe.getvalue() == ""


def test_training_does_not_load_the_command_line_toolkit():
    code = "import sys, numbabn.train, numbabn.sklearn.mlp; assert 'click' not in sys.modules, 'click imported'"
    subprocess.run([sys.executable, "-c", code], check=True)


def test_sigmoid_loss_records_subset_accuracy():
    """With the sigmoid loss the accuracy is the fraction of samples whose every output
    has its target's sign (one output: the binary accuracy; several: subset accuracy)."""
    rng = np.random.default_rng(0)
    X = rng.standard_normal((40, 3)).astype(np.float32)
    Y = (X @ rng.standard_normal((3, 2)) + rng.standard_normal((40, 2)) > 0).astype(np.float32)
    model = Linear(3, 2, rng=rng)
    trainer = Trainer(model, SigmoidBinaryCrossEntropy(), SGD(model.parameters(), lr=0.5), batch_size=40, seed=0)
    history = trainer.fit(X, Y, epochs=20)
    assert history.accuracy is not None and len(history.accuracy) == 20
    out = model.forward(X)
    _, accuracy = trainer.evaluate(X, Y)
    assert accuracy == np.mean(((out > 0) == (Y > 0.5)).all(axis=1))
    assert 0.0 < accuracy < np.mean((out > 0) == (Y > 0.5)) < 1.0  # not the label-wise mean


@pytest.mark.parametrize("cls", [LandscapeProbe, HessianEigenvalue, GradientNorm])
def test_a_metric_class_is_refused_at_construction(cls):
    """A Metric class where an instance belongs is callable and has a name, so it was
    accepted and failed only inside fit, with a message about its constructor."""
    model = bn_net(0)
    state, attributes = model.state_dict(), dict(vars(cls))
    with pytest.raises(TypeError) as info:
        Trainer(model, SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.1), batch_size=10, seed=0, metrics=[cls])
    assert str(info.value) == (
        "Trainer: metrics must hold metric instances, callables metric(model, loss, optimizer, batch), got the "
        f"class {cls.__name__}; write {cls.__name__}() (or {cls.__name__}(...) with its settings)"
    )
    assert all(np.array_equal(v, state[k]) for k, v in model.state_dict().items()) and dict(vars(cls)) == attributes


def _manual_steps(model, X, y, steps, batch_size, seed):
    """The Trainer's steps written out (same batches, shuffle=True), with whatever
    modes the layers are in: the reference for a frozen layer."""
    loss, opt = SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.2, momentum=0.9)
    rng, n = np.random.default_rng(seed), len(X)
    order = []
    for _ in range(steps):
        if not order:
            perm = rng.permutation(n)
            order = [perm[i : i + batch_size] for i in range(0, n - batch_size + 1, batch_size)]
        idx = order.pop(0)
        out = model.forward(X[idx])
        _, dout = loss(out, y[idx])
        opt.zero_grad()
        model.backward(dout)
        opt.step()


def test_a_layer_frozen_in_eval_mode_stays_frozen_through_fit_evaluate_and_metrics():
    """``model.train(); bn.eval()`` (a batch norm frozen for fine-tuning): fit, its
    evaluations and the metric probes keep that layer in eval mode, its running
    statistics and counter untouched, and train as a hand-written loop with the same
    modes does, bit for bit."""
    X, y = data(8)
    model, twin = bn_net(2, noisy=False), bn_net(2, noisy=False)
    frozen, frozen_twin = model[4], twin[4]
    for bn in (frozen, frozen_twin):
        bn.running_mean[:] = np.linspace(-1, 1, 6)
        bn.running_var[:] = np.linspace(0.5, 2, 6)
        bn.eval()
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    before = {k: frozen.state_dict()[k].copy() for k in buffers}
    trainer = _trainer(model, 4, all_metrics(), record_every=2, eval_every=3)
    trainer.fit(X, y, steps=7)
    assert [layer.training for layer in model] == [True, True, True, True, False, True, True]
    assert model.training
    for k in buffers:  # its weight and bias train (eval mode freezes the statistics only)
        np.testing.assert_array_equal(frozen.state_dict()[k], before[k], err_msg=k)
    assert int(model[1].num_batches_tracked) == 7  # the other batch norm trained
    _manual_steps(twin, X, y, 7, 16, 4)
    for (k, a), b in zip(model.state_dict().items(), twin.state_dict().values(), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=k)


def test_fit_trains_a_model_left_in_eval_mode():
    """After ``model.eval()`` (to predict, say) fit trains in training mode as before:
    the running statistics move, and every layer is in training mode afterwards."""
    X, y = data(8)
    model = bn_net(2, noisy=False).eval()
    Trainer(model, SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.2), batch_size=16, seed=0, verbose=0).fit(
        X, y, steps=2
    )
    assert model.training and all(layer.training for layer in model)
    assert int(model[1].num_batches_tracked) == 2 and int(model[4].num_batches_tracked) == 2


def test_evaluate_puts_every_layer_back_in_its_mode():
    model = bn_net(2, noisy=False)
    model[1].eval()
    trainer = Trainer(model, SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.2), batch_size=16, seed=0, verbose=0)
    loss, acc = trainer.evaluate(*data(99, 40))
    assert np.isfinite(loss) and 0 <= acc <= 1
    assert [layer.training for layer in model] == [True, False, True, True, True, True, True]
    model.eval()
    trainer.evaluate(*data(99, 40))
    assert not model.training and not any(layer.training for layer in model)


def test_a_diverged_network_has_no_accuracy():
    """NaN outputs have no prediction: argmax of a NaN row is 0, which read as the share
    of class 0 (10 % on digits) in the training record, evaluate and the experiments'
    population accuracy; it is NaN, which the summaries count as dropped."""
    from numbabn.train.experiments import PopulationAccuracy

    model = bn_net(0)
    X, y = data(1, 60)
    trainer = _trainer(model, 0, [])
    trainer.fit(X, y, steps=2)
    assert np.isfinite(trainer.evaluate(X, y)[1])
    for p in model.parameters():
        p.value[...] = np.nan
    assert np.isnan(trainer.evaluate(X, y)[1])
    history = trainer.fit(X, y, steps=1)
    assert np.isnan(history.accuracy[-1])
    population = PopulationAccuracy(X, X, y, batch_size=20)
    assert np.isnan(population(model, SoftmaxCrossEntropy(), None, (X, y)))
