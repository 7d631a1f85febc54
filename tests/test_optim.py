"""Optimizers: PyTorch parity, subset steps, state copy/restore, errors."""

import copy

import numpy as np
import pytest

from numbabn.layers import BatchNorm1d, Linear, Parameter, ReLU, Sequential, SoftmaxCrossEntropy
from numbabn.optim import SGD, Adam

SHAPES = [(3, 4), (4,), (2, 2, 3)]
SGD_CASES = [
    dict(lr=0.1),
    dict(lr=0.05, momentum=0.9),
    dict(lr=0.05, momentum=0.9, nesterov=True),
    dict(lr=0.1, momentum=0.5, weight_decay=0.01),
]
ADAM_CASES = [dict(lr=1e-2), dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.1)]


def make_params(rng, dtype=np.float64):
    return [Parameter(f"p{i}", rng.standard_normal(s).astype(dtype)) for i, s in enumerate(SHAPES)]


def grads_for(rng, steps, dtype=np.float64):
    return [[rng.standard_normal(s).astype(dtype) for s in SHAPES] for _ in range(steps)]


def step_both(opt, topt, params, tparams, grads):
    """One step of numbabn's optimizer and of torch's on the same gradients."""
    for p, tp, g in zip(params, tparams, grads, strict=True):
        p.grad, tp.grad = g.copy(), torch_tensor(g)
    opt.step()
    topt.step()


def torch_tensor(a):
    import torch

    return torch.tensor(a)


def run(opt, params, grads):
    for step in grads:
        for p, g in zip(params, step, strict=True):
            p.grad = g.copy()
        opt.step()


@pytest.mark.parametrize("cls, kwargs", [(SGD, k) for k in SGD_CASES] + [(Adam, k) for k in ADAM_CASES])
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_matches_torch_optim(rng, cls, kwargs, dtype):
    torch = pytest.importorskip("torch", reason="PyTorch not installed: no reference optimizer")
    params = make_params(rng, dtype)
    tparams = [torch.nn.Parameter(torch.tensor(p.value)) for p in params]
    opt = cls(params, **kwargs)
    topt = getattr(torch.optim, cls.__name__)(tparams, **kwargs)
    for step in grads_for(rng, 6, dtype):
        step_both(opt, topt, params, tparams, step)
        tol = dict(rtol=1e-12, atol=1e-14) if dtype == np.float64 else dict(rtol=1e-5, atol=1e-6)
        for p, tp in zip(params, tparams, strict=True):
            assert p.value.dtype == dtype
            np.testing.assert_allclose(p.value, tp.detach().numpy(), **tol)


@pytest.mark.parametrize("nesterov", [False, True])
def test_momentum_switched_off_and_on_again_follows_torch(rng, nesterov):
    """torch.optim.SGD keeps its momentum buffer through steps with momentum 0 and goes
    on from it; dropping it made the parameters 0.3-1.0 off from the next step on."""
    torch = pytest.importorskip("torch", reason="PyTorch not installed: no reference optimizer")
    params = make_params(rng)
    tparams = [torch.nn.Parameter(torch.tensor(p.value)) for p in params]
    opt = SGD(params, lr=0.05, momentum=0.9, nesterov=nesterov)
    topt = torch.optim.SGD(tparams, lr=0.05, momentum=0.9, nesterov=nesterov)
    for i, step in enumerate(grads_for(rng, 9)):
        momentum = 0.0 if i in (3, 4) else 0.9
        opt.momentum = topt.param_groups[0]["momentum"] = momentum
        if nesterov:  # nesterov needs momentum > 0 in both: plain steps meanwhile
            opt.nesterov = topt.param_groups[0]["nesterov"] = momentum > 0
        step_both(opt, topt, params, tparams, step)
        for p, tp in zip(params, tparams, strict=True):
            np.testing.assert_allclose(p.value, tp.detach().numpy(), rtol=1e-12, atol=1e-14)


def test_zero_grad_skips_parameters_without_gradient(rng):
    params = make_params(rng)
    opt = SGD(params, lr=0.1, momentum=0.9)
    before = [p.value.copy() for p in params]
    params[0].grad = np.ones(SHAPES[0])
    opt.step()
    np.testing.assert_allclose(params[0].value, before[0] - 0.1)
    for p, b in zip(params[1:], before[1:], strict=True):
        np.testing.assert_array_equal(p.value, b)
    assert opt.state[1] == {}
    opt.zero_grad()
    assert all(p.grad is None for p in params)


@pytest.mark.parametrize("cls, kwargs", [(SGD, SGD_CASES[1]), (Adam, ADAM_CASES[1])])
def test_subset_step_equals_a_full_step_on_those_parameters(rng, cls, kwargs):
    """step(params=subset) applies the real update (state included) to the subset only."""
    params = make_params(rng)
    opt = cls(params, **kwargs)
    history = grads_for(rng, 3)
    run(opt, params, history[:2])  # build up momentum / moments
    reference = copy.deepcopy((params, opt))
    ref_params, ref_opt = reference
    for p, rp, g in zip(params, ref_params, history[2], strict=True):
        p.grad, rp.grad = g.copy(), g.copy()
    untouched = params[2].value.copy(), copy.deepcopy(opt.state[2])
    opt.step(params[:2])
    ref_opt.step()
    for i in range(2):
        np.testing.assert_array_equal(params[i].value, ref_params[i].value)
        for key, value in opt.state[i].items():
            np.testing.assert_array_equal(value, ref_opt.state[i][key])
    np.testing.assert_array_equal(params[2].value, untouched[0])
    assert opt.state[2].keys() == untouched[1].keys()
    for key, value in untouched[1].items():
        np.testing.assert_array_equal(opt.state[2][key], value)
    with pytest.raises(ValueError, match="not managed by this optimizer"):
        opt.step([Parameter("stranger", np.zeros(3))])


def tiny_model(rng):
    return Sequential(
        Linear(4, 6, rng=rng, dtype=np.float64),
        BatchNorm1d(6, dtype=np.float64),
        ReLU(),
        Linear(6, 3, rng=rng, dtype=np.float64),
    )


def train_step(model, opt, x, t):
    _, d = SoftmaxCrossEntropy()(model.forward(x), t)
    opt.zero_grad()
    model.backward(d)
    opt.step()


@pytest.mark.parametrize("cls, kwargs", [(SGD, SGD_CASES[2]), (Adam, ADAM_CASES[0])])
def test_snapshot_probe_restore_leaves_training_unchanged(rng, cls, kwargs):
    """The ICS probe's pattern: save model+optimizer state, take a real step on the
    first layers only, restore -- the run continues bit-identically."""
    x, t = rng.standard_normal((8, 4)), rng.integers(0, 3, 8)
    model = tiny_model(rng)
    opt = cls(model.parameters(), **kwargs)
    twin = copy.deepcopy((model, opt))
    for m, o in ((model, opt), twin):
        train_step(m, o, x, t)

    saved_model, saved_opt = model.state_dict(), opt.state_dict()
    _, d = SoftmaxCrossEntropy()(model.forward(x), t)
    model.backward(d)
    first = model[:2].parameters()
    opt.step(first)
    assert not np.array_equal(model[0].weight.value, saved_model["0.weight"])
    np.testing.assert_array_equal(model[3].weight.value, saved_model["3.weight"])
    model.load_state_dict(saved_model)
    opt.load_state_dict(saved_opt)

    for m, o in ((model, opt), twin):
        train_step(m, o, x, t)
    for (k, a), (_, b) in zip(model.state_dict().items(), twin[0].state_dict().items(), strict=True):
        np.testing.assert_array_equal(a, b, err_msg=k)


def test_state_dict_is_a_copy_and_round_trips(rng):
    params = make_params(rng)
    opt = Adam(params, lr=0.01)
    run(opt, params, grads_for(rng, 2))
    saved = opt.state_dict()
    assert saved["state"][0]["step"] == 2 and saved["hyperparameters"]["lr"] == 0.01
    assert saved["state"][0]["exp_avg"] is not opt.state[0]["exp_avg"]
    run(opt, params, grads_for(rng, 1))
    assert opt.state[0]["step"] == 3
    opt.load_state_dict(saved)
    assert opt.state[0]["step"] == 2
    np.testing.assert_array_equal(opt.state[1]["exp_avg_sq"], saved["state"][1]["exp_avg_sq"])
    opt.lr = 0.5  # hyperparameters are part of the state
    opt.load_state_dict(saved)
    assert opt.lr == 0.01


def test_load_state_dict_errors_leave_state_untouched(rng):
    params = make_params(rng)
    opt = SGD(params, lr=0.1, momentum=0.9)
    run(opt, params, grads_for(rng, 1))
    good = opt.state_dict()
    bad_shape = copy.deepcopy(good)
    bad_shape["state"][2]["momentum_buffer"] = np.zeros(5)
    bad_shape["hyperparameters"]["lr"] = 0.7
    bad_dtype = copy.deepcopy(good)
    bad_dtype["state"][1]["momentum_buffer"] = good["state"][1]["momentum_buffer"].astype(np.float32)
    bad_count = copy.deepcopy(good)
    bad_count["state"].pop()
    bad_hyper = copy.deepcopy(good)
    bad_hyper["hyperparameters"]["lr"] = -1.0
    for state, error, match in [
        (bad_shape, ValueError, "shape"),
        (bad_dtype, TypeError, "dtype"),  # a TypeError, as a wrong dtype is everywhere
        (bad_count, ValueError, "one dict per parameter"),
        (bad_hyper, ValueError, "lr must be"),
        ({"state": []}, ValueError, "keys"),
    ]:
        with pytest.raises(error, match=match):
            opt.load_state_dict(state)
        assert opt.lr == 0.1
        for s, g in zip(opt.state, good["state"], strict=True):
            np.testing.assert_array_equal(s["momentum_buffer"], g["momentum_buffer"])


def test_constructor_and_step_errors(rng):
    params = make_params(rng)
    with pytest.raises(ValueError, match="lr must be a finite number"):
        SGD(params, lr=-0.1)
    with pytest.raises(ValueError, match="nesterov=True needs momentum > 0"):
        SGD(params, lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match=r"betas\[1\] must be a finite number in \[0.0, 1.0\)"):
        Adam(params, betas=(0.9, 1.0))
    with pytest.raises(ValueError, match="same Parameter more than once"):
        SGD(params + params[:1], lr=0.1)
    with pytest.raises(TypeError, match="must be Parameters"):
        SGD([np.zeros(3)], lr=0.1)
    with pytest.raises(ValueError, match="params is empty"):
        Adam([])
    opt = SGD(params, lr=0.1)
    params[0].grad = np.zeros(SHAPES[0], np.float32)
    with pytest.raises(
        TypeError,
        match=r"^SGD.step: the grad of .* must be a NumPy array of its value's shape .* and dtype float64, got ",
    ):
        opt.step()
    params[0].grad = np.zeros((7,), np.float64)  # the right dtype, another shape
    with pytest.raises(ValueError, match="shape .* and dtype float64, got ndarray of shape \\(7,\\)"):
        opt.step()
    params[0].grad = [0.0] * SHAPES[0][0]  # not an array
    with pytest.raises(TypeError, match="must be a NumPy array of its value's shape"):
        opt.step()
    # np.matrix multiplies as matrices (Adam's g*g: "shapes not aligned"), a masked array
    # skips its masked entries silently: both refused, naming what came
    for odd in (np.ones(SHAPES[0]).view(np.matrix), np.ma.masked_all(SHAPES[0])):
        params[0].grad = odd
        with pytest.raises(TypeError, match=f"must be a NumPy array of its value's shape .* got {type(odd).__name__}"):
            opt.step()
    params[0].grad = None
    adam = Adam(params)
    state = adam.state_dict()
    state["state"][0] = {"step": 10**400, "exp_avg": np.zeros(SHAPES[0]), "exp_avg_sq": np.zeros(SHAPES[0])}
    with pytest.raises(ValueError, match=r"'step' must be < 2\*\*63"):
        adam.load_state_dict(state)
    assert "lr=0.1" in repr(opt)


# ---------------------------------------------------------------- a failed step changes nothing
def _snapshot(params, opt):
    return [p.value.copy() for p in params], opt.state_dict(), [p.grad for p in params]


def _assert_unchanged(params, opt, snap):
    values, state, grads = snap
    for p, v, g in zip(params, values, grads, strict=True):
        np.testing.assert_array_equal(p.value, v)
        assert p.grad is g
    after = opt.state_dict()
    assert after["hyperparameters"] == state["hyperparameters"]
    for s_after, s_before in zip(after["state"], state["state"], strict=True):
        assert s_after.keys() == s_before.keys()
        for key in s_before:
            np.testing.assert_array_equal(s_after[key], s_before[key])


@pytest.mark.parametrize("cls, kwargs", [(SGD, SGD_CASES[1]), (Adam, ADAM_CASES[0])])
@pytest.mark.parametrize("first_step", [True, False])
def test_one_bad_gradient_updates_nothing(rng, cls, kwargs, first_step):
    """The last parameter's grad has the wrong dtype: no parameter before it is updated
    and no momentum / Adam state is created or advanced."""
    params = make_params(rng)
    opt = cls(params, **kwargs)
    if not first_step:
        run(opt, params, grads_for(rng, 2))
    for p, g in zip(params, grads_for(rng, 1)[0], strict=True):
        p.grad = g
    params[-1].grad = params[-1].grad.astype(np.float32)
    snap = _snapshot(params, opt)
    with pytest.raises(TypeError, match="dtype float64"):
        opt.step()
    _assert_unchanged(params, opt, snap)
    params[-1].grad = params[-1].grad.astype(np.float64)
    opt.step()  # fixed: the step runs
    assert not np.array_equal(params[0].value, snap[0][0])


@pytest.mark.parametrize("cls", [SGD, Adam])
def test_other_failed_steps_change_nothing(rng, cls):
    params = make_params(rng)
    opt = cls(params, lr=0.1)
    run(opt, params, grads_for(rng, 1))
    for p, g in zip(params, grads_for(rng, 1)[0], strict=True):
        p.grad = g
    snap = _snapshot(params, opt)
    params[1].value.setflags(write=False)  # e.g. loaded with mmap_mode="r"
    with pytest.raises(ValueError, match="writeable"):
        opt.step()
    _assert_unchanged(params, opt, snap)
    params[1].value.setflags(write=True)
    with pytest.raises(ValueError, match="same Parameter more than once"):
        opt.step([params[0], params[0]])
    with pytest.raises(ValueError, match="not managed"):
        opt.step([params[0], Parameter("stranger", np.zeros(3))])
    opt.lr = -1.0  # an assigned hyperparameter is checked at step time
    with pytest.raises(ValueError, match="lr must be"):
        opt.step()
    opt.lr = 0.1
    _assert_unchanged(params, opt, snap)


@pytest.mark.parametrize("cls", [SGD, Adam])
@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_subset_step_after_copying_model_and_optimizer(rng, cls, how):
    """Parameters are matched by identity at call time: after pickling or deep-copying
    (model, optimizer) together a subset step updates exactly the named parameters."""
    import pickle

    model = tiny_model(rng)
    opt = cls(model.parameters(), lr=0.1)
    x, t = rng.standard_normal((8, 4)), rng.integers(0, 3, 8)
    train_step(model, opt, x, t)
    model2, opt2 = copy.deepcopy((model, opt)) if how == "deepcopy" else pickle.loads(pickle.dumps((model, opt)))
    assert opt2.params[0] is model2.parameters()[0]
    _, d = SoftmaxCrossEntropy()(model2.forward(x), t)
    model2.backward(d)
    before = model2.state_dict()
    opt2.step(model2[:1].parameters())  # the first Linear only
    after = model2.state_dict()
    changed = sorted(k for k in before if not np.array_equal(before[k], after[k]))
    assert changed == ["0.bias", "0.weight"]
    with pytest.raises(ValueError, match="not managed"):
        opt2.step(model.parameters()[:1])  # the original's parameter is a stranger to the copy


def test_new_object_at_an_old_address_is_not_mistaken_for_a_managed_one(rng):
    """The copied optimizer's parameters are new objects; an old parameter's address
    may be reused by another object. Membership is by identity, never by address."""
    params = make_params(rng)
    opt2 = copy.deepcopy(SGD(params, lr=0.1))
    del params
    strangers = [Parameter(f"s{i}", np.zeros(2)) for i in range(200)]  # some reuse the old addresses
    for p in strangers:
        with pytest.raises(ValueError, match="not managed"):
            opt2.step([p])
    for p in opt2.params:
        p.grad = np.ones_like(p.value)
    before = [p.value.copy() for p in opt2.params]
    opt2.step([opt2.params[0]])
    np.testing.assert_allclose(opt2.params[0].value, before[0] - 0.1)
    for p, b in zip(opt2.params[1:], before[1:], strict=True):
        np.testing.assert_array_equal(p.value, b)


@pytest.mark.parametrize(
    "cls, kwargs",
    [(SGD, dict(lr=0.1, momentum=0.9, weight_decay=0.05)), (Adam, dict(lr=1e-2, weight_decay=0.1))],
)
def test_decayed_mask_matches_torch_param_groups(rng, cls, kwargs):
    # weight_decay on p0 and p2 only = torch's two parameter groups, the other without decay
    torch = pytest.importorskip("torch", reason="PyTorch not installed: no reference optimizer")
    params = make_params(rng)
    tparams = [torch.nn.Parameter(torch.tensor(p.value)) for p in params]
    opt = copy.deepcopy(cls(params, **kwargs, decayed=[params[2], params[0]]))  # positions survive a copy
    opt.params = params  # the copy's own parameters are copies; step these
    groups = [{"params": [tparams[0], tparams[2]]}, {"params": [tparams[1]], "weight_decay": 0.0}]
    topt = getattr(torch.optim, cls.__name__)(groups, **kwargs)
    for step in grads_for(rng, 5):
        step_both(opt, topt, params, tparams, step)
    for p, tp in zip(params, tparams, strict=True):
        np.testing.assert_allclose(p.value, tp.detach().numpy(), rtol=1e-12, atol=1e-14)
    # and the mask matters: decaying everything gives other values
    full = make_params(np.random.default_rng(0))
    masked = make_params(np.random.default_rng(0))
    a, b = cls(full, **kwargs), cls(masked, **kwargs, decayed=masked[:1])
    run(a, full, grads_for(np.random.default_rng(1), 2))
    run(b, masked, grads_for(np.random.default_rng(1), 2))
    np.testing.assert_array_equal(full[0].value, masked[0].value)
    assert not np.allclose(full[1].value, masked[1].value)


def test_decayed_must_be_managed_parameters(rng):
    params = make_params(rng)
    other = Parameter("other", np.zeros(3))
    with pytest.raises(ValueError, match=r"SGD: decayed: .*other.* is not managed by this optimizer"):
        SGD(params, lr=0.1, weight_decay=0.1, decayed=[params[0], other])
    with pytest.raises(ValueError, match="decayed names the same Parameter more than once"):
        Adam(params, weight_decay=0.1, decayed=[params[0], params[0]])


def test_an_argument_that_is_not_iterable_is_named(rng):
    params = make_params(rng)
    with pytest.raises(TypeError, match=r"^SGD: params must be an iterable of Parameters .*, got int 5$"):
        SGD(5, lr=0.1)
    with pytest.raises(TypeError, match=r"^Adam: decayed must be an iterable of Parameters .*, got int 5$"):
        Adam(params, weight_decay=0.1, decayed=5)
    opt = SGD(params, lr=0.1, momentum=0.9)
    run(opt, params, grads_for(rng, 1))
    for p, g in zip(params, grads_for(rng, 1)[0], strict=True):
        p.grad = g
    snap = _snapshot(params, opt)
    with pytest.raises(TypeError, match=r"^SGD.step: params must be an iterable of Parameters .*, got int 5$"):
        opt.step(5)
    _assert_unchanged(params, opt, snap)
