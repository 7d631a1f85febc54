"""numbabn.torch's BatchNorm1d/2d/3d against torch.nn's over several training steps.

Each case runs both modules side by side for several SGD steps (forward, backward,
update), comparing outputs, input and parameter gradients, running statistics and
the batch counter every step, then the eval-mode forward; plus gradcheck in float64,
state-dict round trips, mixed precision, errors that change nothing, double backward,
and the CUDA dispatch logic (on CPU tensors: no GPU here).
"""

import contextlib
import copy
import inspect
import subprocess
import sys
import warnings

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

import numbabn.torch as nbt  # noqa: E402
from numbabn import config  # noqa: E402
from numbabn.torch import _bridge, function  # noqa: E402

TOL = {torch.float64: dict(rtol=1e-10, atol=1e-10), torch.float32: dict(rtol=1e-4, atol=1e-5)}

CASES = [  # (class name, kwargs, input shape, memory format)
    ("BatchNorm1d", {}, (16, 5), None),
    ("BatchNorm1d", dict(momentum=None), (8, 3, 7), None),
    ("BatchNorm1d", dict(affine=False, momentum=0.3), (8, 3, 7), None),
    ("BatchNorm2d", {}, (4, 3, 5, 6), None),
    ("BatchNorm2d", {}, (4, 3, 5, 6), torch.channels_last),
    ("BatchNorm2d", dict(momentum=None), (4, 3, 5, 6), torch.channels_last),
    ("BatchNorm2d", dict(track_running_stats=False), (4, 3, 5, 6), None),
    ("BatchNorm2d", dict(bias=False), (3, 4, 2, 5), None),
    ("BatchNorm3d", {}, (2, 3, 4, 3, 5), None),
    ("BatchNorm3d", dict(momentum=0.5), (2, 3, 4, 3, 5), torch.channels_last_3d),
]


def assert_close(ours, theirs, what):
    assert ours.dtype == theirs.dtype, what
    torch.testing.assert_close(ours, theirs, **TOL.get(theirs.dtype, dict(rtol=0, atol=0)), msg=what)


def pair(name, C, kwargs, dtype, activation=None):
    """(numbabn module, torch module) with the same random affine parameters."""
    if "bias" in kwargs and "bias" not in inspect.signature(getattr(torch.nn, name)).parameters:
        pytest.skip(f"torch.nn.{name} of PyTorch {torch.__version__} has no bias argument")
    ours = getattr(nbt, name)(C, dtype=dtype, activation=activation, **kwargs)
    theirs = getattr(torch.nn, name)(ours.num_features, dtype=dtype, **kwargs)
    theirs.load_state_dict(ours.state_dict())
    if ours.weight is not None:
        with torch.no_grad():
            ours.weight.uniform_(0.5, 1.5)
            theirs.weight.copy_(ours.weight)
    return ours, theirs


def inputs(shape, fmt, dtype, step):
    x = torch.randn(shape, dtype=dtype) * (1 + step) + step
    dy = torch.randn(shape, dtype=dtype)
    if fmt is not None:
        x, dy = x.to(memory_format=fmt), dy.to(memory_format=fmt)
    return x, dy


@pytest.mark.parametrize("name, kwargs, shape, fmt", CASES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_matches_torch_over_training_steps_and_eval(name, kwargs, shape, fmt, dtype, activation):
    torch.manual_seed(0)
    ours, theirs = pair(name, shape[1], kwargs, dtype, activation)
    after = torch.relu if activation else (lambda y: y)
    params = [p for p in ours.parameters()]
    opt = torch.optim.SGD(params, lr=0.1, momentum=0.9) if params else None
    topt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9) if params else None
    for step in range(4):
        x, dy = inputs(shape, fmt, dtype, step)
        xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = ours(xa), after(theirs(xb))
        assert_close(ya, yb, f"output, step {step}")
        if fmt is not None:
            assert ya.is_contiguous(memory_format=fmt), "output keeps the input's memory format"
        ya.backward(dy)
        yb.backward(dy)
        assert_close(xa.grad, xb.grad, f"input gradient, step {step}")
        for (n, p), q in zip(ours.named_parameters(), theirs.parameters(), strict=True):
            assert_close(p.grad, q.grad, f"{n}.grad, step {step}")
        for (n, b), c in zip(ours.named_buffers(), theirs.buffers(), strict=True):
            assert_close(b, c, f"buffer {n}, step {step}")
        if opt:
            opt.step(), topt.step(), opt.zero_grad(), topt.zero_grad()
    ours.eval(), theirs.eval()
    x, dy = inputs(shape, fmt, dtype, 5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), after(theirs(xb))
    assert_close(ya, yb, "eval output")
    ya.backward(dy), yb.backward(dy)
    assert_close(xa.grad, xb.grad, "eval input gradient")


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_gradcheck_float64(training, activation):
    torch.manual_seed(1)
    bn = nbt.BatchNorm2d(3, dtype=torch.float64, activation=activation).train(training)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-0.5, 0.5)
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
    x = torch.randn(3, 3, 4, 2, dtype=torch.float64, requires_grad=True)
    momentum = bn.momentum
    bn.momentum = 0.0  # gradcheck calls forward many times: keep the running statistics fixed
    assert torch.autograd.gradcheck(lambda x, w, b: bn(x), (x, bn.weight, bn.bias))
    bn.momentum = momentum


def test_state_dict_round_trips_with_torch():
    torch.manual_seed(2)
    theirs = torch.nn.BatchNorm2d(4)
    theirs(torch.randn(8, 4, 3, 3) * 3 + 1)
    with torch.no_grad():
        theirs.weight.uniform_(0.5, 1.5), theirs.bias.uniform_(-1, 1)
    ours = nbt.BatchNorm2d(4, activation="relu")
    ours.load_state_dict(theirs.state_dict())
    assert list(ours.state_dict()) == list(theirs.state_dict())
    back = torch.nn.BatchNorm2d(4)
    back.load_state_dict(ours.state_dict())
    for k, v in theirs.state_dict().items():
        assert torch.equal(back.state_dict()[k], v), k
    assert isinstance(ours, torch.nn.BatchNorm2d)
    assert "activation='relu'" in repr(ours)
    ours.eval(), theirs.eval()
    x = torch.randn(5, 4, 3, 3)
    torch.testing.assert_close(ours(x), torch.relu(theirs(x)))


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_16_bit_input_with_float32_parameters_like_torch(dtype):
    torch.manual_seed(3)
    ours, theirs = nbt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = (torch.randn(4, 3, 5, 5) * 2 + 1).to(dtype)
    dy = torch.randn(4, 3, 5, 5).to(dtype)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya, yb = ours(xa), theirs(xb)
    assert ya.dtype == dtype and xa.grad is None
    ya.backward(dy), yb.backward(dy)
    tol = dict(rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(ya.float(), yb.float(), **tol)
    torch.testing.assert_close(xa.grad.float(), xb.grad.float(), **tol)
    assert xa.grad.dtype == dtype and ours.weight.grad.dtype == torch.float32
    torch.testing.assert_close(ours.weight.grad, theirs.weight.grad, rtol=1e-2, atol=1e-2)
    torch.testing.assert_close(ours.running_var, theirs.running_var, rtol=1e-3, atol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
@pytest.mark.parametrize("residual", [False, True])
def test_16_bit_input_is_float32_batch_norm_rounded_without_copies(dtype, fmt, residual):
    """16-bit input runs on the kernels' 16-bit path: outputs and input gradients are
    exactly the float32 module's on the same values, rounded to the 16-bit dtype
    (parameter gradients and running statistics equal), and the backward keeps the
    16-bit input itself, not a float32 copy."""
    torch.manual_seed(8)
    a, b = nbt.BatchNorm2d(6, activation="relu"), nbt.BatchNorm2d(6, activation="relu")
    with torch.no_grad():
        a.weight.uniform_(0.5, 1.5)
    b.load_state_dict(a.state_dict())
    x16 = (torch.randn(4, 6, 5, 7) * 2 + 1).to(dtype)
    dy16 = torch.randn(4, 6, 5, 7).to(dtype)
    r16 = torch.randn(4, 6, 5, 7).to(dtype) if residual else None
    if fmt is not None:
        x16, dy16 = x16.to(memory_format=fmt), dy16.to(memory_format=fmt)
        r16 = None if r16 is None else r16.to(memory_format=fmt)
    x16.requires_grad_()
    x32 = x16.detach().float().requires_grad_()
    y16 = a(x16) if r16 is None else a(x16, residual=r16)
    y32 = b(x32) if r16 is None else b(x32, residual=r16.float())
    assert y16.dtype == dtype and torch.equal(y16, y32.to(dtype))
    assert fmt is None or y16.is_contiguous(memory_format=fmt)
    fn = y16.grad_fn  # the 16-bit input is read as it is (no float32 copy kept)
    assert fn.bn.x is None and fn.saved_tensors[0].data_ptr() == x16.data_ptr()
    kept = function._attached(fn.bn, fn.dropped, fn.saved_tensors, fn.perm).x
    assert kept.dtype.itemsize == 2
    assert kept.__array_interface__["data"][0] == x16.data_ptr()
    y16.backward(dy16)
    y32.backward(dy16.float())
    assert x16.grad.dtype == dtype and torch.equal(x16.grad, x32.grad.to(dtype))
    assert torch.equal(a.weight.grad, b.weight.grad) and torch.equal(a.bias.grad, b.bias.grad)
    for p, q in zip(a.buffers(), b.buffers(), strict=True):
        assert torch.equal(p, q)


def test_half_module_updates_its_half_buffers():
    torch.manual_seed(4)
    ours, theirs = nbt.BatchNorm1d(6).half(), torch.nn.BatchNorm1d(6).half()
    x = torch.randn(10, 6).half()
    torch.testing.assert_close(ours(x), theirs(x), rtol=1e-2, atol=1e-2)
    assert ours.running_mean.dtype == torch.float16
    torch.testing.assert_close(ours.running_mean, theirs.running_mean, rtol=1e-2, atol=1e-3)


def test_empty_batch_follows_torch():
    ours, theirs = nbt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = torch.zeros(0, 3, 4, 4, requires_grad=True)
    y = ours(x)
    assert y.shape == x.shape
    theirs(torch.zeros(0, 3, 4, 4))
    for a, b in zip(ours.buffers(), theirs.buffers(), strict=True):
        assert torch.equal(a, b)


BAD = [  # (input, error type, words the message must contain)
    (torch.randn(4, 5, 3, 3), ValueError, ["BatchNorm2d", "3 channels", "(4, 5, 3, 3)"]),
    (torch.randn(4, 3, 3), ValueError, ["4D"]),
    (torch.randn(4, 3, 3, 3, dtype=torch.float64), TypeError, ["float64", "float32"]),
    (torch.ones(4, 3, 3, 3, dtype=torch.int32), TypeError, ["int32"]),
    (torch.randn(1, 3, 1, 1), ValueError, ["BatchNorm2d", "more than 1 value per channel", "[1, 3, 1, 1]"]),
    (torch.randn(4, 3, 3, 3).to_sparse(), TypeError, ["BatchNorm2d", "dense", "sparse"]),
]


def _inference_tensor(shape):
    with torch.inference_mode():
        return torch.randn(shape)


@pytest.mark.parametrize("x, error, words", BAD)
@pytest.mark.parametrize("native_below", [0, 1 << 30])  # the kernels; PyTorch's op for small input
def test_a_refused_input_changes_nothing_mid_training(monkeypatch, x, error, words, native_below):
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", native_below)
    torch.manual_seed(5)
    bn = nbt.BatchNorm2d(3, momentum=None)
    opt = torch.optim.SGD(bn.parameters(), lr=0.1)
    for _ in range(2):
        bn(torch.randn(4, 3, 3, 3)).square().sum().backward()
        opt.step()
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(error) as info:
        bn(x)
    for word in words:
        assert word in str(info.value)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k
    bn(torch.randn(4, 3, 3, 3)).sum().backward()  # training goes on
    assert int(bn.num_batches_tracked) == 3


SPOILED = [  # (change to a trained module, input, error type, words the message must contain)
    (lambda bn: setattr(bn, "momentum", 1.5), None, ValueError, ["BatchNorm2d: momentum must be None", "1.5"]),
    (lambda bn: setattr(bn, "momentum", -0.1), None, ValueError, ["in [0, 1], got -0.1"]),
    (lambda bn: bn.running_mean.requires_grad_(True), None, RuntimeError, ["running_mean requires grad"]),
    # the weight requires grad: autograd would save the input, which it cannot
    (lambda bn: None, _inference_tensor((4, 3, 3, 3)), RuntimeError, ["inference tensors cannot be saved"]),
]


@pytest.mark.parametrize("spoil, x, error, words", SPOILED)
@pytest.mark.parametrize("native_below", [0, 1 << 30])  # the kernels; PyTorch's op for small input
def test_what_autograd_or_the_settings_refuse_changes_nothing(monkeypatch, spoil, x, error, words, native_below):
    """Refused whatever the input's size (PyTorch's op, on small inputs, takes any
    momentum), and before the kernels would have updated the running statistics
    (autograd refuses an inference tensor only when it saves it, after the op)."""
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", native_below)
    torch.manual_seed(5)
    bn = nbt.BatchNorm2d(3)
    bn(torch.randn(4, 3, 3, 3)).sum().backward()
    spoil(bn)
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    with pytest.raises(error) as info:
        bn(torch.randn(4, 3, 3, 3) if x is None else x)
    for word in words:
        assert word in str(info.value)
    for k, v in bn.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("activation", [None, "relu"])
def test_eval_gradients_of_nonfinite_input_like_torch(monkeypatch, fmt, activation):
    """Eval mode on the kernels: inf, -inf and NaN inputs give torch.nn's finite input
    gradient (BN then ReLU on the torch side), and non-finite weight gradients where
    torch.nn's are."""
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", 0)
    torch.manual_seed(0)
    theirs = torch.nn.BatchNorm2d(3)
    theirs.running_mean.normal_()
    theirs.running_var.uniform_(0.5, 2)
    theirs.weight.data.normal_()
    ours = nbt.BatchNorm2d(3, activation=activation)
    ours.load_state_dict(theirs.state_dict())
    ours.eval()
    theirs.eval()
    x = torch.randn(2, 3, 4, 4)
    x[0, 0, 0, 0], x[1, 2, 1, 1], x[0, 1, 2, 3] = float("inf"), float("nan"), -float("inf")
    x = x.contiguous(memory_format=fmt)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ya = theirs(xa)
    ya = torch.relu(ya) if activation else ya
    yb = ours(xb)
    g = torch.randn_like(ya)
    ya.backward(g)
    yb.backward(g)
    assert torch.isfinite(xb.grad).all()
    torch.testing.assert_close(xb.grad, xa.grad, rtol=1e-5, atol=1e-6)
    assert torch.equal(torch.isfinite(ours.weight.grad), torch.isfinite(theirs.weight.grad))
    torch.testing.assert_close(ours.bias.grad, theirs.bias.grad)


@pytest.mark.parametrize("fmt", [torch.contiguous_format, torch.channels_last])
def test_training_statistics_of_infinite_input_like_torch(monkeypatch, fmt):
    """Training on the kernels with +inf, -inf, both and NaN in four channels: the
    running statistics and outputs torch.nn gives (running_mean +-inf or NaN,
    running_var NaN, the channel's output NaN), the finite channels to rounding,
    over a batch large enough for many blocks (the infinity at a block's start and
    inside a later one)."""
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", 0)
    torch.manual_seed(0)
    theirs, ours = torch.nn.BatchNorm2d(6), nbt.BatchNorm2d(6)
    x = torch.randn(64, 6, 32, 32)
    x[0, 0, 0, 0], x[40, 1, 7, 3] = float("inf"), float("inf")
    x[63, 2, 31, 31] = -float("inf")
    x[5, 3, 1, 1], x[50, 3, 2, 2] = float("inf"), -float("inf")
    x[33, 4, 0, 0] = float("nan")
    x = x.contiguous(memory_format=fmt)
    ya, yb = theirs(x), ours(x)
    assert torch.equal(torch.isnan(yb), torch.isnan(ya))
    torch.testing.assert_close(yb, ya, rtol=1e-5, atol=1e-5, equal_nan=True)
    for name in ("running_mean", "running_var"):
        torch.testing.assert_close(getattr(ours, name), getattr(theirs, name), equal_nan=True)
    assert torch.isinf(ours.running_mean[:3]).all() and torch.isnan(ours.running_var[:5]).all()


@pytest.mark.parametrize("native_below", [0, 1 << 30])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_strided_running_buffers_are_updated_like_torch(monkeypatch, native_below, dtype):
    """Buffers that are strided views (a slice of a larger tensor, as
    ``load_state_dict(assign=True)`` may leave) are updated in place, as torch.nn
    updates them; the kernels update contiguous buffers directly, so these went to a
    copy and the module's statistics never moved."""
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", native_below)
    ours, theirs = nbt.BatchNorm2d(4, dtype=dtype), torch.nn.BatchNorm2d(4, dtype=dtype)
    tables = []
    for m in (ours, theirs):
        table = torch.zeros(2, 8, dtype=dtype)
        table[1] = 1
        m.running_mean, m.running_var = table[0, ::2], table[1, ::2]
        tables.append(table)
    for step in range(2):
        x = (torch.randn(8, 4, 5, 5) * 2 + 3 + step).to(dtype)
        ours(x)
        theirs(x)
    assert ours.running_mean.data_ptr() == tables[0].data_ptr()
    torch.testing.assert_close(tables[0], tables[1], rtol=2e-3, atol=1e-3)
    assert tables[0][0, 1::2].eq(0).all() and tables[0][1, 1::2].eq(1).all()  # the other elements untouched
    assert tables[0][0, ::2].abs().min() > 0.4  # moved: 0.1 * mean 3 and 0.19 * mean 4


@pytest.mark.parametrize("native_below", [0, 1 << 30])  # the kernels; PyTorch's op for small input
@pytest.mark.parametrize("momentum", [0.1, None])
def test_checkpoint_recomputation_counts_like_torch(monkeypatch, native_below, momentum):
    """``torch.utils.checkpoint(use_reentrant=False)`` runs the forward again in the
    backward and stops that rerun (by raising) once the last tensor it needs is saved,
    inside the last layer's op. torch.nn's layers count the call before their op, so
    the rerun counts; numbabn's counted after it and lost that count (then, with
    momentum=None, the running averages drift from torch's)."""
    from torch.utils.checkpoint import checkpoint

    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", native_below)
    torch.manual_seed(7)
    ref = torch.nn.Sequential(
        torch.nn.Conv2d(3, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4, momentum=momentum),
        torch.nn.ReLU(),
        torch.nn.Conv2d(4, 4, 3, padding=1),
        torch.nn.BatchNorm2d(4, momentum=momentum),
    )
    ours = nbt.convert_batchnorm(copy.deepcopy(ref))
    for _ in range(3):
        x, w = torch.randn(8, 3, 6, 6, requires_grad=True), torch.randn(8, 4, 6, 6)
        for model in (ours, ref):
            checkpoint(model, x, use_reentrant=False).mul(w).sum().backward()
    assert int(ours[4].num_batches_tracked) == int(ref[4].num_batches_tracked) == 6
    for (name, a), b in zip(ours.state_dict().items(), ref.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)
    for (name, p), q in zip(ours.named_parameters(), ref.parameters(), strict=True):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
@pytest.mark.parametrize("relu", [False, True])
def test_checkpoint_frees_the_input_until_the_recomputation(fmt, relu):
    """Under ``checkpoint(use_reentrant=False)`` autograd keeps no tensor of the
    segment; the layer must not keep its input's memory alive through numbabn's
    context either (a 10-layer segment of 4 MiB activations held 44 MiB instead of
    4). The memory is watched through a weak reference to the tensor's storage
    (the private hooks torch.multiprocessing uses for this; a Python weakref to
    the tensor would miss the NumPy view of a detached alias)."""
    import gc

    from torch.utils.checkpoint import checkpoint

    torch.manual_seed(3)
    conv, ref_bn = torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4)
    bn = nbt.convert_batchnorm(copy.deepcopy(torch.nn.Sequential(ref_bn)))[0]
    if relu:
        bn.activation = "relu"
    inner = []

    def segment(t, layer):
        h = conv(t)
        inner.append(h.untyped_storage()._weak_ref())
        out = layer(h)
        return torch.relu(out) if relu and layer is ref_bn else out

    x = torch.randn(6, 4, 5, 5).to(memory_format=fmt or torch.contiguous_format).requires_grad_()
    w = torch.randn(6, 4, 5, 5)
    grads = []
    for layer in (bn, ref_bn):
        inner.clear()
        x.grad = None
        y = checkpoint(segment, x, layer, use_reentrant=False)
        gc.collect()
        assert torch.UntypedStorage._expired(inner[0]), "the segment's intermediate outlived the forward"
        torch.UntypedStorage._free_weak_ref(inner[0])
        y.mul(w).sum().backward()
        grads.append(x.grad.clone())
    torch.testing.assert_close(grads[0], grads[1], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("residual", [None, "add", "relu"])
def test_backward_reads_what_saved_tensors_hooks_unpack(training, residual):
    """A ``saved_tensors_hooks`` pair that saves a copy: backward must read the
    unpacked copy, not the input's memory, which the caller changes afterwards (as
    torch.nn's layers do); numbabn read the changed input and its gradients moved
    by up to 140."""
    torch.manual_seed(5)
    bn = nbt.BatchNorm2d(3, activation="relu" if residual == "relu" else None).train(training)
    x0, r0 = torch.randn(4, 3, 5, 6) * 2 + 1, torch.randn(4, 3, 5, 6)
    dy = torch.randn(4, 3, 5, 6)
    state = copy.deepcopy(bn.state_dict())

    def run(hooked):
        bn.load_state_dict(state)
        bn.zero_grad()
        x = x0.clone().requires_grad_()
        r = r0.clone().requires_grad_() if residual else None
        hooks = torch.autograd.graph.saved_tensors_hooks(lambda t: t.clone(), lambda t: t)
        with hooks if hooked else contextlib.nullcontext():
            h, hr = x * 1, None if r is None else r * 1
            y = bn(h) if hr is None else bn(h, residual=hr)
        if hooked:  # the copies are what backward must see
            with torch.no_grad():
                h.mul_(0).add_(5)
                if hr is not None:
                    hr.mul_(-1)
        y.backward(dy)
        return [t.grad.clone() for t in (x, r, bn.weight, bn.bias) if t is not None]

    for a, b in zip(run(True), run(False), strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_an_input_pytorch_refuses_changes_nothing():
    """An input the layer hands to PyTorch's op unchecked (a tensor subclass) and that
    PyTorch refuses leaves the counter as it was (it is counted before the op)."""
    bn = nbt.BatchNorm2d(3)
    with pytest.raises(RuntimeError):
        bn(torch.randn(4, 5, 3, 3).as_subclass(_Tagged))
    assert int(bn.num_batches_tracked) == 0
    assert torch.equal(bn.running_mean, torch.zeros(3)) and torch.equal(bn.running_var, torch.ones(3))


def test_bad_activation_names_the_argument():
    with pytest.raises(ValueError, match="activation must be None or 'relu', got 'gelu'"):
        nbt.BatchNorm1d(3, activation="gelu")


def test_double_backward_raises_a_clear_error():
    bn = nbt.BatchNorm1d(3)
    x = torch.randn(6, 3, requires_grad=True)
    (gx,) = torch.autograd.grad(bn(x).square().sum(), x, create_graph=True)
    with pytest.raises(RuntimeError, match="double backward"):
        gx.sum().backward()


def test_backward_after_in_place_change_of_the_input_is_refused():
    bn = nbt.BatchNorm1d(3)
    z = torch.randn(6, 3, requires_grad=True) * 1
    y = bn(z)
    with torch.no_grad():
        z.add_(1)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        y.sum().backward()


def test_cpu_tensors_are_viewed_without_copies():
    x = torch.randn(4, 3, 5, 5).to(memory_format=torch.channels_last)
    perm = _bridge.channels_last_perm(x)
    a = _bridge.to_array(x, perm)
    assert perm == (0, 2, 3, 1) and a.flags.c_contiguous and a.ctypes.data == x.data_ptr()
    y, out = _bridge.empty_like(x, perm)
    assert y._base is None and y.is_contiguous(memory_format=torch.channels_last)
    assert out.shape == (4, 5, 5, 3) and out.flags.c_contiguous and out.ctypes.data == y.data_ptr()
    ncl = torch.randn(2, 7, 3).transpose(1, 2)  # (N, C, L) stored as (N, L, C)
    y, out = _bridge.empty_like(ncl, _bridge.channels_last_perm(ncl))
    assert y.stride() == ncl.stride() and out.flags.c_contiguous
    assert _bridge.channels_last_perm(torch.randn(4, 3, 5, 5)) is None
    w = torch.nn.Parameter(torch.randn(3))  # requires grad: viewed through a detached alias
    assert _bridge.to_array(w).ctypes.data == w.data_ptr() and w.requires_grad


def test_a_gradient_in_another_layout_than_the_input_is_copied_by_torch(monkeypatch):
    """Input stored (N, L, C), gradient (N, C, L)-contiguous (the output used as torch
    lays it out): the gradient reaches numbabn as one contiguous copy made by PyTorch
    (NumPy's single-threaded copy of that transpose took 167 ms at (64, 256, 1024)),
    and the results are torch.nn's."""
    torch.manual_seed(4)
    data = torch.randn(4, 7, 3)  # (N, L, C)
    dy = torch.randn(4, 3, 7)
    perm = _bridge.channels_last_perm(data.transpose(1, 2))
    assert perm == (0, 2, 1) and _bridge.to_array(dy, perm).flags.c_contiguous
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", 0)  # the kernels, not PyTorch's op
    ours, ref = nbt.BatchNorm1d(3), torch.nn.BatchNorm1d(3)
    xa, xb = data.clone().requires_grad_(), data.clone().requires_grad_()
    ya, yb = ours(xa.transpose(1, 2)), ref(xb.transpose(1, 2))
    ya.backward(dy), yb.backward(dy)
    torch.testing.assert_close(ya, yb)
    torch.testing.assert_close(xa.grad, xb.grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


@pytest.mark.parametrize("channels_last", [False, True])
def test_outputs_may_be_modified_in_place(channels_last):
    """The output and the input gradient wrap NumPy memory (huge pages); they are not
    views, so in-place ops (ReLU(inplace=True), gradient accumulation) work as on
    torch's own outputs, and the results match torch.nn.BatchNorm2d."""
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    x0 = torch.randn(4, 3, 5, 5).to(memory_format=fmt)
    dy = torch.randn(4, 3, 5, 5)
    grads = []
    for bn in (nbt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)):
        x = x0.clone().requires_grad_()
        y = bn(x)
        assert y._base is None and y.is_contiguous(memory_format=fmt)
        y = torch.relu_(y) * 1
        y.backward(dy)
        y2 = bn(x)  # a second backward accumulates into x.grad in place
        y2.backward(dy)
        grads.append((y.detach(), x.grad.clone()))
    torch.testing.assert_close(grads[0][0], grads[1][0])
    torch.testing.assert_close(grads[0][1], grads[1][1], atol=1e-5, rtol=1e-5)


class FakeCudaTensor:
    """Stands in for a CUDA tensor in the bridge (no GPU here): records what it is asked."""

    is_cpu = False

    def __init__(self, t):
        self.t, self.device, self.calls = t, torch.device("cuda", 0), []

    def detach(self):
        return self

    def resolve_neg(self):
        self.calls.append(("resolve_neg",))
        return self

    def permute(self, perm):
        self.calls.append(("permute", perm))
        return self

    def contiguous(self):
        self.calls.append(("contiguous",))
        return self


def test_cuda_tensors_go_to_numbabn_as_they_are(monkeypatch):
    """The dispatch logic of the CUDA path, without a device: a CUDA tensor is handed
    to numbabn itself (made contiguous in numbabn's layout), so numbabn's functional API
    sees ``__cuda_array_interface__`` and picks its CUDA backend; a per-channel numba
    device array coming back is wrapped with torch.as_tensor on the input's device."""
    fake = FakeCudaTensor(torch.randn(2, 3, 4, 4))
    assert _bridge.to_array(fake, (0, 2, 3, 1)) is fake
    assert fake.calls == [("permute", (0, 2, 3, 1)), ("resolve_neg",), ("contiguous",)]  # a lazy negation applied
    seen = {}

    def as_tensor(obj, device=None):
        seen.update(obj=obj, device=device)
        return torch.zeros(3)

    monkeypatch.setattr(torch, "as_tensor", as_tensor)
    device_array = object()
    _bridge.to_tensor(device_array, fake)
    assert seen == dict(obj=device_array, device=fake.device)

    from numbabn import _layout  # numbabn's own dispatch rule for such an object

    assert _layout.is_device_array(type("T", (), {"__cuda_array_interface__": {}})())


def test_importing_numbabn_does_not_import_torch():
    code = "import sys, numbabn; numbabn.batch_norm_forward; assert 'torch' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True)


@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_calls_without_a_graph_compute_what_the_autograd_path_does(training, fmt):
    """Where no gradient can flow (``no_grad``, ``inference_mode``, no input requiring
    grad) the module skips ``autograd.Function``: same output bit for bit, same
    running statistics and counter, no graph node."""
    torch.manual_seed(2)
    x = torch.randn(4, 3, 5, 6) * 2 + 1
    x = x if fmt is None else x.to(memory_format=fmt)
    r = torch.randn_like(x)
    modules = [nbt.BatchNorm2d(3, activation="relu").train(training) for _ in range(4)]
    for m in modules[1:]:
        m.load_state_dict(modules[0].state_dict())
    with_graph = modules[0](x.clone().requires_grad_(), residual=r)
    assert with_graph.grad_fn is not None
    with torch.no_grad():
        no_grad = modules[1](x, residual=r)
    with torch.inference_mode():
        inference = modules[2](x, residual=r)
    modules[3].weight.requires_grad_(False), modules[3].bias.requires_grad_(False)
    frozen = modules[3](x, residual=r)  # nothing requires grad
    for y in (no_grad, inference, frozen):
        assert y.grad_fn is None and torch.equal(y, with_graph.detach())
        assert y.is_contiguous(memory_format=fmt or torch.contiguous_format)
    for m in modules[1:]:
        for (name, a), b in zip(modules[0].state_dict().items(), m.state_dict().values(), strict=True):
            assert torch.equal(a, b), name


def test_inference_mode_and_cpu_autocast_like_torch():
    torch.manual_seed(6)
    ours, theirs = nbt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    with torch.inference_mode():
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    conv = torch.nn.Conv2d(3, 3, 1)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        h = conv(x)
        ya, yb = ours(h), theirs(h)
    assert ya.dtype == yb.dtype == torch.bfloat16
    torch.testing.assert_close(ya.float(), yb.float(), rtol=2e-2, atol=2e-2)
    ya.float().sum().backward()
    assert ours.weight.grad.dtype == torch.float32 and conv.weight.grad is not None


@pytest.mark.parametrize("name", ["BatchNorm1d", "BatchNorm2d", "BatchNorm3d", "SyncBatchNorm"])
def test_meta_tensors_give_torch_shapes(name):
    """A model on the meta device (shapes only: model-size tools, deferred init) runs
    its forward as torch.nn's does: an output of the right shape, dtype and memory
    format on the meta device, with the fused ReLU and the residual accepted."""
    shape = {"BatchNorm1d": (4, 3, 7), "BatchNorm3d": (2, 3, 4, 3, 5)}.get(name, (4, 3, 5, 6))
    ref = getattr(torch.nn, "BatchNorm2d" if name == "SyncBatchNorm" else name)(3, device="meta")
    x = torch.empty(shape, device="meta")
    if len(shape) == 4:
        x = x.to(memory_format=torch.channels_last)
    for kwargs in ({}, {"activation": "relu"}):
        bn = getattr(nbt, name)(3, device="meta", **kwargs)
        for y in (bn(x), bn(x, residual=torch.empty_like(x))):
            expected = ref(x)
            assert y.is_meta and y.shape == expected.shape and y.dtype == expected.dtype
            assert y.stride() == expected.stride()
        assert bn.num_batches_tracked.is_meta
        bn.eval()
        assert bn(x).shape == x.shape


class _Block(torch.nn.Module):
    """conv -> BN (+ the conv's input as residual) -> ReLU, in numbabn's or torch's form."""

    def __init__(self, ours: bool):
        super().__init__()
        torch.manual_seed(3)
        self.conv = torch.nn.Conv2d(3, 3, 3, padding=1)
        self.bn = nbt.BatchNorm2d(3, activation="relu") if ours else torch.nn.BatchNorm2d(3)
        self.ours = ours

    def forward(self, x):
        y = self.conv(x)
        return self.bn(y, residual=x) if self.ours else torch.relu(self.bn(y) + x)


def _trained_pair():
    """The block in both forms with the same state, after a numbabn training step (so
    the running statistics are not the defaults)."""
    ours, ref = _Block(True), _Block(False)
    ours(torch.randn(4, 3, 6, 6))
    ref.load_state_dict(ours.state_dict())
    return ours, ref


@pytest.mark.parametrize("training", [False, True])
def test_traced_module_holds_torch_batch_norm_and_saves(training, tmp_path):
    """``torch.jit.trace`` records PyTorch's batch_norm (the kernels are Python calls no
    graph can hold), so the traced module saves, loads and computes what torch.nn's
    does, running statistics included; before, ``torch.jit.save`` refused it."""
    ours, ref = _trained_pair()
    ours.train(training), ref.train(training)
    x = torch.randn(4, 3, 6, 6)
    traces, tracer_warnings = [], []
    for model in (ours, copy.deepcopy(ref)):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            traces.append(torch.jit.trace(model, x, check_trace=False))
        tracer_warnings.append({str(w.message) for w in caught if issubclass(w.category, torch.jit.TracerWarning)})
    assert tracer_warnings[0] == tracer_warnings[1]  # torch.nn's own (training: F.batch_norm's batch check)
    traced = traces[0]
    graph = str(traced.inlined_graph)
    assert "aten::batch_norm" in graph and "PythonOp" not in graph
    ref(x)  # tracing ran the forward once
    torch.jit.save(traced, tmp_path / "block.pt")
    loaded = torch.jit.load(tmp_path / "block.pt")
    x2 = torch.randn(4, 3, 6, 6) + 1
    ref_before = {k: v.clone() for k, v in ref.state_dict().items()}
    torch.testing.assert_close(loaded(x2), ref(x2), rtol=0, atol=0)
    for name, buf in loaded.bn.named_buffers():
        if name != "num_batches_tracked":  # a traced graph does not count calls
            assert torch.equal(buf, ref.bn.state_dict()[name]), name
    assert training or all(torch.equal(v, ref.state_dict()[k]) for k, v in ref_before.items())


@pytest.mark.parametrize("strict", [False, True])
def test_exported_program_holds_torch_batch_norm(strict):
    """``torch.export`` (and so ``torch.onnx.export``) records PyTorch's batch norm;
    it used to fail inside the kernels' NumPy view of its fake tensors. Strict export
    traces with Dynamo, as torch.compile does, but must record the op, not break."""
    ours, ref = _trained_pair()
    ours.eval(), ref.eval()
    x = torch.randn(4, 3, 6, 6)
    program = torch.export.export(ours, (x,), strict=strict)
    assert "batch_norm" in str(program.graph)
    x2 = torch.randn(4, 3, 6, 6) - 1
    # PyTorch's op: the bits of torch.nn's eager layer on the PyTorch CI runs (2.13); on
    # 2.4 the exported programs of both blocks round differently from it and each other
    exact = torch.__version__ >= "2.13"  # a TorchVersion: compared as a version
    tol = dict(rtol=0, atol=0) if exact else dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(program.module()(x2), ref(x2), **tol)
    torch.testing.assert_close(program.module()(x2), ours(x2), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("momentum", [0.1, None])
def test_fx_symbolic_trace_keeps_the_layer_as_one_call(momentum):
    """``torch.fx.symbolic_trace`` (feature extraction, FX quantization) records the
    layer as one call, as it records torch.nn's: the GraphModule then follows
    ``train()``/``eval()``, ``momentum=None`` and the batch count like torch.nn's
    traced block. Tracing through the layer fixed the mode and the momentum as
    constants and counted a batch at trace time; before that it raised ("input must
    be a torch.Tensor, got Proxy")."""
    ours, ref = _trained_pair()
    ours.bn.momentum = ref.bn.momentum = momentum
    traced = {name: torch.fx.symbolic_trace(model) for name, model in (("ours", ours), ("ref", ref))}
    assert "self.bn(" in traced["ours"].code and "batch_norm" not in traced["ours"].code
    assert int(ours.bn.num_batches_tracked) == int(ref.bn.num_batches_tracked)  # tracing counted nothing
    for mode in (True, True, True, False, True):
        for g in traced.values():
            g.train(mode)
        x = torch.randn(4, 3, 6, 6) * 2 + 1
        torch.testing.assert_close(traced["ours"](x), traced["ref"](x), rtol=1e-5, atol=1e-5)
        state = traced["ref"].state_dict()
        for name, buf in traced["ours"].state_dict().items():
            torch.testing.assert_close(buf, state[name], rtol=1e-6, atol=1e-6, msg=name)
    assert int(ours.bn.num_batches_tracked) == 1 + 4  # _trained_pair's step, four here


@pytest.mark.parametrize("training", [False, True])
def test_fx_symbolic_trace_of_the_layer_itself_records_torch_batch_norm(training):
    """Traced as the root module the layer records PyTorch's op, as torch.nn's
    does (a root is traced through, never a leaf), in the mode it was traced in."""
    ours, ref = _trained_pair()
    ours.train(training), ref.train(training)
    count = int(ours.bn.num_batches_tracked)
    graph_module = torch.fx.symbolic_trace(ours.bn)
    assert "batch_norm" in graph_module.code and "relu" in graph_module.code
    assert int(ours.bn.num_batches_tracked) == count  # tracing counted nothing
    # With and without the residual (the graph's argument defaults to None; it used to
    # add None), each call counted by the graph (the GraphModule shares the buffers).
    x, r = torch.randn(4, 3, 6, 6) * 2, torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(graph_module(x, r), torch.relu(ref.bn(x) + r), rtol=0, atol=0)
    x = torch.randn(4, 3, 6, 6) * 2
    torch.testing.assert_close(graph_module(x), torch.relu(ref.bn(x)), rtol=0, atol=0)
    for name, buf in ref.bn.named_buffers():
        assert torch.equal(buf, ours.bn.state_dict()[name]), name


def test_fx_symbolic_trace_of_the_layer_itself_with_cumulative_momentum_says_why_not():
    bn = nbt.BatchNorm2d(3, momentum=None)
    with pytest.raises(TypeError, match="BatchNorm2d: torch.fx.symbolic_trace .*momentum=None"):
        torch.fx.symbolic_trace(bn)
    assert int(bn.num_batches_tracked) == 0
    assert "batch_norm" in torch.fx.symbolic_trace(bn.eval()).code


@pytest.mark.parametrize("assign", [False, True])
@pytest.mark.parametrize("fault", ["wrong shape", "missing key", "unexpected key"])
def test_a_failed_load_state_dict_changes_nothing(fault, assign):
    """torch.nn's load copies every key that fits before it raises for the one that
    does not; the layer's load is all or nothing (the objects too, with assign=True)."""
    bn = nbt.BatchNorm2d(3)
    bn(torch.randn(4, 3, 2, 2))
    held = {name: (t, t.detach().clone()) for name, t in [*bn.named_parameters(), *bn.named_buffers()]}
    state = {k: v + 5 for k, v in bn.state_dict().items()}
    if fault == "wrong shape":
        state["running_var"] = torch.ones(4)
    elif fault == "missing key":
        del state["running_var"]
    else:
        state["extra"] = torch.ones(1)
    with pytest.raises(RuntimeError, match="size mismatch|Missing key|Unexpected key"):
        bn.load_state_dict(state, assign=assign)
    for name, (t, value) in held.items():
        assert getattr(bn, name) is t and torch.equal(t, value), name
    if fault != "wrong shape":
        bn.load_state_dict(state, strict=False, assign=assign)  # the keys that fit, as torch.nn
        assert torch.equal(bn.weight, held["weight"][1] + 5)


def test_a_wrong_shape_in_a_models_load_leaves_the_layer_as_it_was():
    model = torch.nn.Sequential(torch.nn.Conv2d(2, 3, 1), nbt.BatchNorm2d(3))
    before = {k: v.clone() for k, v in model[1].state_dict().items()}
    state = {k: v + 5 for k, v in model.state_dict().items()}
    state["1.running_var"] = torch.ones(4)
    with pytest.raises(RuntimeError, match="size mismatch for 1.running_var"):
        model.load_state_dict(state)
    for k, v in model[1].state_dict().items():
        assert torch.equal(v, before[k]), k


def test_torch_func_transforms_run_torch_batch_norm():
    """Under torch.func transforms (``jacrev``, ``vmap``, ``grad`` through
    ``functional_call``) the layer computes exactly what torch.nn's does; it used to
    raise (the kernels' autograd.Function has no ``setup_context``)."""
    from torch.func import functional_call, grad, jacrev, vmap

    torch.manual_seed(0)
    ours = torch.nn.Sequential(torch.nn.Linear(4, 3), nbt.BatchNorm1d(3, activation="relu"))
    ref = torch.nn.Sequential(torch.nn.Linear(4, 3), torch.nn.BatchNorm1d(3), torch.nn.ReLU())
    ours(torch.randn(8, 4))  # running statistics that are not the defaults
    ref.load_state_dict(ours.state_dict())
    x = torch.randn(5, 4)

    def loss(model):
        return lambda params, buffers, x: functional_call(model, (params, buffers), (x,)).square().sum()

    buffers = [{k: v.clone() for k, v in model.named_buffers()} for model in (ours, ref)]
    grads = [
        grad(loss(model))(dict(model.named_parameters()), b, x) for model, b in zip((ours, ref), buffers, strict=True)
    ]
    for name in grads[1]:
        assert torch.equal(grads[0][name], grads[1][name]), name
    for name in buffers[1]:  # training mode: the passed buffers were updated alike
        assert torch.equal(buffers[0][name], buffers[1][name]), name
    ours.eval(), ref.eval()
    assert torch.equal(jacrev(ours)(x), jacrev(ref)(x))
    xs = torch.randn(3, 5, 4)
    assert torch.equal(vmap(ours)(xs), vmap(ref)(xs))


class _Tagged(torch.Tensor):
    """A user's tensor subclass (as torchvision's tv_tensors are)."""


def test_tensor_subclasses_take_torch_batch_norm():
    """A tensor subclass (``FakeTensor``, ``DTensor``, a user's own) has no memory numbabn
    may view: the module computes exactly what torch.nn's does, subclass kept."""
    torch.manual_seed(0)
    ours, ref = nbt.BatchNorm2d(3, activation="relu"), torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5).as_subclass(_Tagged)
    y = ours(x)
    assert type(y) is _Tagged and torch.equal(y, torch.relu(ref(x)))
    assert torch.equal(ours.running_var, ref.running_var) and int(ours.num_batches_tracked) == 1
    fake_tensor = pytest.importorskip("torch._subclasses.fake_tensor")
    with fake_tensor.FakeTensorMode(allow_non_fake_inputs=True) as mode:  # real parameters
        fake = mode.from_tensor(torch.randn(4, 3, 5, 5))
        assert ours(fake, residual=fake).shape == (4, 3, 5, 5)


class _TwoLayers(torch.nn.Module):
    """conv -> numbabn BN -> relu -> conv -> numbabn BN, written out (not a Sequential,
    whose loop Dynamo does not resume after a break)."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.b1 = torch.nn.Conv2d(3, 4, 3, padding=1), nbt.BatchNorm2d(4)
        self.c2, self.b2 = torch.nn.Conv2d(4, 4, 3, padding=1), nbt.BatchNorm2d(4, activation="relu")

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b2(self.c2(torch.relu(self.b1(self.c1(x)))))


def test_torch_compile_traces_the_layers_into_one_graph():
    """Under torch.compile each numbabn layer is one call of its custom operator
    (numbabn.torch.ops) in the graph, nothing of numbabn's Python. It used to trace
    into the layer (NumPy views, the thread pool's locks): 11 graphs and 10 breaks for
    this model, a warning per break, and an inductor-compiled step slower than the
    eager one; then (until the thirty-first session) one break per layer."""
    import torch._dynamo

    torch.manual_seed(5)
    model, x = _TwoLayers(), torch.randn(4, 3, 6, 6)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(x)
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    assert str(explained.graphs[0].graph).count("numbabn.batch_norm") == 2
    eager = _TwoLayers()
    eager.load_state_dict(model.state_dict())
    compiled = torch.compile(model, backend="eager")
    for step in range(2):
        xs = torch.randn(4, 3, 6, 6) + step
        assert torch.equal(compiled(xs), eager(xs))
    for a, b in zip(eager.buffers(), model.buffers(), strict=True):
        assert torch.equal(a, b)


def test_torch_compile_runs_the_same_steps():
    """``torch.compile`` (the batch norm as numbabn's custom operator in the graph)
    trains exactly as the eager module does: outputs, gradients, running stats."""
    torch.manual_seed(7)
    eager = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), nbt.BatchNorm2d(4, activation="relu"))
    compiled_model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 1), nbt.BatchNorm2d(4, activation="relu"))
    compiled_model.load_state_dict(eager.state_dict())
    compiled = torch.compile(compiled_model, backend="eager")
    for step in range(3):
        x = torch.randn(4, 3, 5, 5) + step
        ya, yb = eager(x), compiled(x)
        assert torch.equal(ya, yb)
        ya.square().sum().backward()
        yb.square().sum().backward()
        for (name, a), b in zip(eager.named_parameters(), compiled_model.parameters(), strict=True):
            assert torch.equal(a.grad, b.grad), name
    for a, b in zip(eager.buffers(), compiled_model.buffers(), strict=True):
        assert torch.equal(a, b)


def test_torch_compile_with_cumulative_momentum_does_not_recompile_every_step(monkeypatch):
    """momentum=None in training on a small input (PyTorch's op): the factor
    1/(count + 1) used to reach the compiled graph as a constant, so every step
    recompiled it (eight times, then Dynamo gave up on the frame); now that call runs
    eagerly, as torch.nn's layer does, and matches torch.nn's buffers."""
    import torch._dynamo
    from torch._dynamo.utils import counters

    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", 1 << 20)  # the default: small inputs to PyTorch's op
    torch._dynamo.reset()
    counters.clear()
    ours, ref = nbt.BatchNorm2d(8, momentum=None), torch.nn.BatchNorm2d(8, momentum=None)
    compiled = torch.compile(ours, backend="eager")
    for step in range(6):
        x = torch.randn(4, 8, 6, 6) * (step + 1)
        torch.testing.assert_close(compiled(x), ref(x), rtol=1e-6, atol=1e-6)
    assert counters["stats"]["unique_graphs"] <= 1
    for name, buf in ref.named_buffers():
        torch.testing.assert_close(ours.get_buffer(name), buf, rtol=1e-6, atol=1e-6, msg=name)
    torch._dynamo.reset()


@pytest.mark.filterwarnings("ignore:`torch.jit.script` is deprecated:DeprecationWarning")
@pytest.mark.parametrize("make", ["bn", "sync", "fused"])
def test_scripting_raises_a_clear_error_and_changes_nothing(make):
    """``torch.jit.script`` on a model holding a numbabn layer raises an error that
    names the layer and what works instead, rather than TorchScript's message about
    the first Python construct it meets inside the layer; and the model keeps its
    layers (scripting replaces submodules in the caller's model with what their
    ``__prepare_scriptable__`` returns)."""
    torch.manual_seed(0)
    layers = [torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()]
    model = torch.nn.Sequential(*layers)
    nbt.convert_batchnorm(model, sync=make == "sync", fuse_relu=make == "fused")
    if make == "fused":  # the FusedReLU alone, its batch norm put back to torch.nn's
        model[1] = torch.nn.BatchNorm2d(4)
    before = list(model)
    x = torch.randn(2, 3, 6, 6)
    expected = model(x)
    name = type(model[2] if make == "fused" else model[1]).__name__
    with pytest.raises(
        RuntimeError, match=rf"torch\.jit\.script cannot compile numbabn\.torch\.{name}: .*torch\.jit\.trace"
    ):
        torch.jit.script(model)
    assert list(model) == before
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_second_derivatives_through_the_incoming_gradient_raise(monkeypatch):
    """Under create_graph=True the kernels' gradients are tied to dy as well as to x
    and weight: a second derivative through dy (a skip connection around the layer,
    torch.autograd.functional.jvp, which differentiates a vjp by its vector) raises
    numbabn's error. It used to count as zero: jvp gave zeros and the skip
    connection's second derivative a wrong value, with no error."""
    import torch.autograd.functional as AF

    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", 0)
    torch.manual_seed(0)
    x = torch.randn(8, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="numbabn.torch batch norm: double backward"):
        AF.jvp(nbt.BatchNorm1d(3, dtype=torch.float64).eval(), x, torch.randn_like(x))
    bn, head = nbt.BatchNorm1d(3, dtype=torch.float64), torch.nn.Linear(3, 1, dtype=torch.float64)
    xi = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad(head(bn(xi) + xi).pow(2).sum(), xi, create_graph=True)
    with pytest.raises(RuntimeError, match="numbabn.torch batch norm: double backward"):
        torch.autograd.grad(gx.pow(2).sum(), head.weight)


def test_forward_mode_ad_gives_torch_nn_results(monkeypatch):
    """Dual tensors (torch.autograd.forward_ad) go to PyTorch's op, whose jvp torch.nn
    has: tangents and running statistics as torch.nn's; the kernels' autograd
    Function has no jvp and raised PyTorch's NotImplementedError."""
    import torch.autograd.forward_ad as fwAD

    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", 0)
    torch.manual_seed(0)
    x, v = torch.randn(8, 3, 5, dtype=torch.float64), torch.randn(8, 3, 5, dtype=torch.float64)
    ours, theirs = nbt.BatchNorm1d(3, dtype=torch.float64), torch.nn.BatchNorm1d(3, dtype=torch.float64)
    with fwAD.dual_level():
        a = fwAD.unpack_dual(ours(fwAD.make_dual(x, v)))
        b = fwAD.unpack_dual(theirs(fwAD.make_dual(x, v)))
    torch.testing.assert_close(a.primal, b.primal)
    torch.testing.assert_close(a.tangent, b.tangent)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    assert int(ours.num_batches_tracked) == 1


def test_vectorized_jacobian_raises_a_clear_error(monkeypatch):
    import torch.autograd.functional as AF

    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", 0)
    bn = nbt.BatchNorm1d(3, dtype=torch.float64)
    x = torch.randn(8, 3, dtype=torch.float64)
    with pytest.raises(RuntimeError, match="vectorize=True.*not supported by numbabn's kernels"):
        AF.jacobian(bn, x, vectorize=True)
    torch.testing.assert_close(AF.jacobian(bn, x), AF.jacobian(torch.nn.BatchNorm1d(3, dtype=torch.float64), x))


@pytest.mark.parametrize("training", [False, True])
@pytest.mark.parametrize("eps", [0.0, 0])
def test_eps_zero_like_torch(monkeypatch, training, eps):
    """torch.nn takes eps=0; numbabn's kernels refuse it, so the layer hands such a
    call to PyTorch's op at any size (it raised above the small-input threshold)."""
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", 0)
    torch.manual_seed(0)
    ours, theirs = nbt.BatchNorm2d(2, eps=eps), torch.nn.BatchNorm2d(2, eps=eps)
    ours.train(training)
    theirs.train(training)
    x = torch.randn(4, 2, 8, 8)
    try:
        expected = theirs(x)
    except ValueError:  # refused by PyTorch's op in training (PyTorch 2.4 takes it); nothing changes
        assert training
        with pytest.raises(ValueError, match="eps must be positive"):
            ours(x)
        assert int(ours.num_batches_tracked) == 0 and torch.equal(ours.running_var, torch.ones(2))
        return
    torch.testing.assert_close(ours(x), expected, rtol=0, atol=0)


@pytest.mark.parametrize("native_below", [0, 1 << 30])
def test_inference_mode_buffers_updated_outside_it_raise_and_change_nothing(monkeypatch, native_below):
    """A layer built under torch.inference_mode() holds inference-tensor buffers; a
    training call outside inference mode raises PyTorch's error before anything
    changes, as torch.nn does. On the kernels the running statistics were written
    through NumPy first, and only the counter's update raised."""
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", native_below)
    with torch.inference_mode():
        ours, theirs = nbt.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    x = torch.randn(6, 4, 3, 3) * 3 + 5
    for m in (ours, theirs):
        with torch.no_grad(), pytest.raises(RuntimeError, match="[Ii]nference tensor"):
            m(x)
        assert torch.equal(m.running_mean, torch.zeros(4)) and torch.equal(m.running_var, torch.ones(4))
    assert int(ours.num_batches_tracked) == 0  # (torch.nn counts the call before its op raises)
    with torch.inference_mode():  # where the buffers can be updated: as torch.nn
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)


@pytest.mark.parametrize("native_below", [0, 1 << 30])
def test_any_channel_count_without_per_channel_state(monkeypatch, native_below):
    """affine=False, track_running_stats=False: no per-channel state, and torch.nn
    normalises any channel count; a layer with state still refuses a wrong one."""
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", native_below)
    x = torch.randn(6, 5, 4)
    ours = nbt.BatchNorm1d(3, affine=False, track_running_stats=False)
    theirs = torch.nn.BatchNorm1d(3, affine=False, track_running_stats=False)
    torch.testing.assert_close(ours(x), theirs(x))
    with pytest.raises(ValueError, match="expected input with 3 channels"):
        nbt.BatchNorm1d(3, affine=False)(x)


@pytest.mark.parametrize("native_below", [0, 1 << 30])
def test_input_errors_are_also_torch_nn_exception_types(monkeypatch, native_below):
    """Code written against torch.nn catches what it raises (RuntimeError for a wrong
    channel count or mixed dtypes, NotImplementedError for an integer input); numbabn's
    own types (ValueError, TypeError) hold too. Nothing changes."""
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", native_below)
    ours, theirs = nbt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    cases = [
        (torch.randn(2, 4, 3, 3), RuntimeError, nbt.InputMismatchError, ValueError),
        (torch.randn(2, 3, 3, 3, dtype=torch.float64), RuntimeError, nbt.InputDtypeError, TypeError),
        (torch.ones(2, 3, 3, 3, dtype=torch.int64), NotImplementedError, nbt.UnsupportedDtypeError, TypeError),
    ]
    for x, torch_type, ours_type, numbabn_type in cases:
        # (PyTorch 2.4 raised a plain RuntimeError for an integer input, which numbabn's
        # NotImplementedError is too; the version CI runs, 2.13, is checked exactly)
        with pytest.raises(torch_type if torch.__version__ >= "2.13" else RuntimeError):
            theirs(x)
        with pytest.raises(torch_type) as caught:
            ours(x)
        assert isinstance(caught.value, ours_type) and isinstance(caught.value, numbabn_type)
    assert int(ours.num_batches_tracked) == 0 and torch.equal(ours.running_mean, torch.zeros(3))


def _replace(name, make):
    """A change to a module: its parameter or buffer ``name`` replaced by ``make(old)``."""

    def change(bn):
        old = getattr(bn, name)
        if name in bn._parameters:
            setattr(bn, name, torch.nn.Parameter(make(old.detach())))
        else:
            setattr(bn, name, make(old))

    return change


MIXED_STATE = [  # (change, numbabn's types, words the message must contain)
    (_replace("running_mean", lambda t: t.long()), (nbt.InputDtypeError, TypeError), ["running_mean", "int64"]),
    (_replace("bias", lambda t: t.double()), (nbt.InputDtypeError, TypeError), ["bias has dtype torch.float64"]),
    (_replace("running_var", lambda t: t.half()), (nbt.InputDtypeError, TypeError), ["running_var", "float16"]),
    (
        _replace("weight", lambda t: torch.ones(4)),
        (nbt.InputMismatchError, ValueError),
        ["weight must have shape (3,)"],
    ),
    (_replace("running_var", lambda t: torch.ones(2)), (nbt.InputMismatchError, ValueError), ["running_var", "(2,)"]),
    (lambda bn: setattr(bn, "running_var", None), (nbt.InputMismatchError, ValueError), ["running_var is None"]),
]


@pytest.mark.parametrize("change, types, words", MIXED_STATE)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("native_below", [0, 1 << 30])
def test_parameters_and_buffers_that_do_not_fit_each_other_raise_as_in_torch_nn(
    monkeypatch, change, types, words, training, native_below
):
    """Mixed dtypes or a wrong size among weight, bias and the running statistics, or
    one running statistic None: torch.nn raises a RuntimeError (the last, in training,
    a ValueError; PyTorch 2.4 trained with it); numbabn raises an error of both types,
    before anything changes (an int64 running_mean was updated and rounded to 0 by the
    kernels' write-back)."""
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", native_below)
    x = torch.randn(8, 3, 4, 4) * 2 + 3
    ours, theirs = nbt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    change(ours), change(theirs)
    ours.train(training), theirs.train(training)
    try:
        theirs(x)
    except (RuntimeError, ValueError):  # one running statistic None: ValueError in training
        pass
    else:  # PyTorch 2.4 trained with running_var None, updating running_mean alone
        assert torch.__version__ < "2.13" and training and theirs.running_var is None
        assert int(theirs.num_batches_tracked) == 1
    before = {k: v.clone() for k, v in ours.state_dict().items()}
    with pytest.raises(RuntimeError) as caught:
        ours(x)
    assert all(isinstance(caught.value, t) for t in types)
    for word in words:
        assert word in str(caught.value)
    for k, v in ours.state_dict().items():
        assert torch.equal(v, before[k]) and v.dtype == before[k].dtype, k


_CL_VIEWS = {
    "channel split": lambda x: x.chunk(2, dim=1)[1],  # ShuffleNet-style
    "batch stride": lambda x: x[::2],
    "width slice": lambda x: x[..., :5],
    "transposed": lambda x: x.transpose(2, 3),  # no longer channels-last: contiguous output
}


@pytest.mark.parametrize("view", list(_CL_VIEWS))
@pytest.mark.parametrize("dims", [2, 3])
def test_views_of_channels_last_data_keep_torch_nns_layouts(monkeypatch, view, dims):
    """A view into channels-last data that is not dense (a channel split, a batch
    stride) gives a channels-last output, as torch.nn's layer does (it gave an NCHW
    one, and the next channels-last convolution a copy); values and gradients and
    their layouts as torch.nn's."""
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", 0)  # the kernels, not PyTorch's op
    fmt = torch.channels_last if dims == 2 else torch.channels_last_3d
    torch.manual_seed(0)
    base = torch.randn(6, 8, *([7] * dims)).contiguous(memory_format=fmt)
    results = []
    for cls in (getattr(torch.nn, f"BatchNorm{dims}d"), getattr(nbt, f"BatchNorm{dims}d")):
        x = base.clone().requires_grad_()
        v = _CL_VIEWS[view](x)
        v.retain_grad()
        y = cls(v.shape[1])(v)
        (y * torch.linspace(-1, 1, y.numel()).reshape(y.shape)).sum().backward()
        results.append((y, v.grad, x.grad))
    for ref, got in zip(*results, strict=True):
        assert got.stride() == ref.stride()
        torch.testing.assert_close(got, ref, rtol=1e-5, atol=1e-5)


def test_inference_mode_with_enable_grad_records_no_graph_as_torch_nn():
    """``enable_grad`` inside ``inference_mode`` records nothing in torch: the layer
    returned an inference tensor carrying a graph (a later backward filled x.grad), and
    refused an input made in inference mode with requires_grad=True."""
    torch.manual_seed(0)
    ours, ref = nbt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5, requires_grad=True)
    with torch.inference_mode(), torch.enable_grad():
        y, y_ref = ours(x), ref(x)
        made_inside = torch.randn(4, 3, 5, 5, requires_grad=True)
        z, z_ref = ours(made_inside), ref(made_inside)
    assert not y.requires_grad and y.grad_fn is None and not y_ref.requires_grad
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(z, z_ref)
    assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked) == 2


def test_tensors_with_the_lazy_negation_bit_read_their_values():
    """``torch._neg_view`` tensors (input, residual, incoming gradient): .numpy() refused
    them, so the kernels' path raised "Can't call numpy() on Tensor that has negative bit set"."""
    torch.manual_seed(1)
    ours, ref = nbt.BatchNorm2d(3, activation="relu"), torch.nn.BatchNorm2d(3)
    base, res, g = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    xs = [torch._neg_view(base).requires_grad_(), (-base).requires_grad_()]
    y = ours(xs[0], residual=torch._neg_view(res))
    y.backward(torch._neg_view(g))
    y_ref = torch.relu(ref(xs[1]) - res)
    y_ref.backward(-g)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(xs[0].grad, xs[1].grad)
    torch.testing.assert_close(ours.weight.grad, ref.weight.grad)


def test_a_channel_step_of_channels_last_data_gives_a_channels_last_output():
    """``x[:, ::2]`` of channels-last data: PyTorch's stride rule calls it channels-last
    (each stride covers the axes before it), and so does torch.nn's output; the kernels'
    path gave a contiguous one (it wanted a channel stride of 1)."""
    base = torch.randn(4, 8, 6, 6).to(memory_format=torch.channels_last)
    x = base[:, ::2]
    ours, ref = nbt.BatchNorm2d(4), torch.nn.BatchNorm2d(4)
    y, y_ref = ours(x), ref(x)
    assert y_ref.is_contiguous(memory_format=torch.channels_last)
    assert y.stride() == y_ref.stride()
    torch.testing.assert_close(y, y_ref)
    overlapping = torch.randn(200).as_strided((2, 4, 3, 3), (4, 1, 8, 4))  # not channels-last for PyTorch
    assert ours(overlapping).stride() == ref(overlapping).stride()


def test_a_three_dimensional_view_that_is_not_dense_gives_torch_nns_contiguous_output():
    """PyTorch's memory formats are 4-D and 5-D: BatchNorm1d's output of a strided
    (N, C, L) view is contiguous in torch.nn; the channels-last rule gave it (N, L, C)
    strides, on which y.view(N, -1) failed."""
    data = torch.randn(4, 10, 8)  # (N, L, C) in memory
    x = data.transpose(1, 2)[:, :, ::2]  # (N, C, L/2), not dense
    ours, ref = nbt.BatchNorm1d(8), torch.nn.BatchNorm1d(8)
    y, y_ref = ours(x), ref(x)
    assert y.stride() == y_ref.stride() and y.is_contiguous()
    torch.testing.assert_close(y, y_ref)
    assert y.view(4, -1).shape == (4, 40)


@pytest.mark.parametrize("value", [torch.tensor(0.3), torch.tensor(0.3, dtype=torch.float64), torch.tensor(1)])
def test_a_0d_tensor_momentum_updates_as_torch_nn(value):
    """torch.nn takes a 0-d tensor momentum (a schedule computed with torch ops); it was
    refused as "must be None or a number in [0, 1], got tensor(0.3000)"."""
    torch.manual_seed(0)
    x = torch.randn(8, 3, 5, 5)
    ours, theirs = nbt.BatchNorm2d(3, momentum=value), torch.nn.BatchNorm2d(3, momentum=value)
    for _ in range(3):
        torch.testing.assert_close(ours(x), theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
    torch.testing.assert_close(ours.running_var, theirs.running_var)
    with pytest.raises(ValueError, match=r"momentum must be None or a number in \[0, 1\].*got tensor\(\[0.3000\]\)"):
        nbt.BatchNorm2d(3, momentum=torch.tensor([0.3]))(x)


def test_settings_that_fail_late_are_refused_naming_them_and_change_nothing():
    """An eps of 10**400 reached PyTorch's op, whose OverflowError was not among the
    errors that undo the count (num_batches_tracked went 0 -> 1); a counter of -1 with
    momentum=None divided by zero (a bare ZeroDivisionError)."""
    x = torch.randn(2, 3, 4, 4)
    m = nbt.BatchNorm2d(3)
    m.eps = 10**400
    with pytest.raises(ValueError, match="eps must be a number a float can hold"):
        m(x)
    assert int(m.num_batches_tracked) == 0
    m = nbt.BatchNorm2d(3, momentum=None)
    m.num_batches_tracked.fill_(-1)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    with pytest.raises(ValueError, match="num_batches_tracked must be >= 0 for momentum=None.*got -1"):
        m(x)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())


@pytest.mark.parametrize("flags", [dict(sync="no"), dict(fuse_relu=0.0), dict(sync=1)])
def test_convert_batchnorm_flags_are_bools(flags):
    """sync="no" made every batch norm a SyncBatchNorm (truthiness)."""
    net = torch.nn.Sequential(torch.nn.Linear(4, 4), torch.nn.BatchNorm1d(4), torch.nn.ReLU())
    with pytest.raises(TypeError, match=f"convert_batchnorm: {next(iter(flags))} must be a bool"):
        nbt.convert_batchnorm(net, **flags)
    assert type(net[1]) is torch.nn.BatchNorm1d


def test_a_0d_tensor_momentum_compiles_with_captured_scalars():
    """torch.compile with capture_scalar_outputs traced float(momentum) into an unbacked
    SymFloat, which the custom operator's float? schema refused (TorchRuntimeError);
    the call now runs eagerly behind a graph break, as torch.nn's does."""
    torch.manual_seed(0)
    x = torch.randn(4, 3, 5, 5)
    ours, theirs = nbt.BatchNorm2d(3), torch.nn.BatchNorm2d(3)
    ours.momentum = theirs.momentum = torch.tensor(0.3)
    torch._dynamo.reset()
    with torch._dynamo.config.patch(capture_scalar_outputs=True):
        y = torch.compile(ours, backend="eager")(x)
    torch.testing.assert_close(y, theirs(x))
    torch.testing.assert_close(ours.running_mean, theirs.running_mean)
