"""numbabn.torch residual fusion: ``bn(x, residual=r)`` with ``activation="relu"`` is
``torch.relu(batch_norm(x) + r)`` in one op (issue 15, item 5)."""

import copy

import pytest

torch = pytest.importorskip("torch")

import numbabn.torch as nbt  # noqa: E402
from numbabn.torch.function import BatchNormFunction  # noqa: E402
from numbabn.torch.resnet import BasicBlock, fuse_residual, resnet18  # noqa: E402

TOL = {torch.float32: dict(rtol=1e-4, atol=1e-4), torch.float64: dict(rtol=1e-10, atol=1e-10)}


@pytest.mark.parametrize("relu", [True, False])
@pytest.mark.parametrize("training", [True, False])
def test_gradcheck_through_the_function(relu, training):
    g = torch.Generator().manual_seed(0)
    x, r = (torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True) for _ in range(2))
    w = (1 + 0.3 * torch.randn(3, generator=g, dtype=torch.float64)).requires_grad_()
    b = torch.randn(3, generator=g, dtype=torch.float64, requires_grad=True)
    rm, rv = torch.zeros(3, dtype=torch.float64), torch.ones(3, dtype=torch.float64)

    def f(x, w, b, r):
        return BatchNormFunction.apply(
            x, w, b, None if training else rm, None if training else rv, training, 0.1, 1e-5, relu, None, None, r
        )

    assert torch.autograd.gradcheck(f, (x, w, b, r))


def test_function_takes_the_nine_argument_form():
    """moments, allreduce and residual may be left out of apply (they default to None)."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, 5, generator=g, dtype=torch.float64, requires_grad=True)
    w, b = torch.ones(3, dtype=torch.float64, requires_grad=True), torch.zeros(3, dtype=torch.float64)
    short = BatchNormFunction.apply(x, w, b, None, None, True, 0.1, 1e-5, True)
    full = BatchNormFunction.apply(x, w, b, None, None, True, 0.1, 1e-5, True, None, None, None)
    assert torch.equal(short, full)
    (dx_short,) = torch.autograd.grad(short.sum(), x)
    (dx_full,) = torch.autograd.grad(full.sum(), x)
    assert torch.equal(dx_short, dx_full)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("channels_last", [False, True])
@pytest.mark.parametrize("relu", [True, False])
def test_parity_with_torch_over_steps_and_eval(dtype, channels_last, relu):
    torch.manual_seed(0)
    ours = nbt.BatchNorm2d(4, activation="relu" if relu else None, dtype=dtype)
    ref = torch.nn.BatchNorm2d(4, dtype=dtype)
    with torch.no_grad():
        ours.weight.uniform_(0.5, 1.5)
        ours.bias.uniform_(-0.5, 0.5)
    ref.load_state_dict(ours.state_dict())
    act = torch.relu if relu else (lambda t: t)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    for step in range(4):
        training = step < 3
        ours.train(training)
        ref.train(training)
        x = (torch.randn(6, 4, 5, 5, dtype=dtype) * 2 + 1).to(memory_format=fmt)
        r = torch.randn(6, 4, 5, 5, dtype=dtype)
        xa, ra = x.clone().requires_grad_(), r.clone().requires_grad_()
        xb, rb = x.clone().requires_grad_(), r.clone().requires_grad_()
        ya = ours(xa, residual=ra)
        yb = act(ref(xb) + rb)
        dy = torch.randn_like(yb)
        ya.backward(dy)
        yb.backward(dy)
        assert ya.is_contiguous(memory_format=fmt)
        for a, b in [
            (ya, yb),
            (xa.grad, xb.grad),
            (ra.grad, rb.grad),
            (ours.weight.grad, ref.weight.grad),
            (ours.bias.grad, ref.bias.grad),
            (ours.running_mean, ref.running_mean),
            (ours.running_var, ref.running_var),
        ]:
            torch.testing.assert_close(a, b, **TOL[dtype])
        assert int(ours.num_batches_tracked) == int(ref.num_batches_tracked)
        ours.zero_grad()
        ref.zero_grad()


def test_without_residual_the_module_is_unchanged():
    torch.manual_seed(0)
    m = nbt.BatchNorm2d(3, activation="relu")
    x = torch.randn(4, 3, 4, 4)
    torch.testing.assert_close(m(x), m(x, residual=None))


@pytest.mark.parametrize(
    "bad,exc,match",
    [
        ("shape", nbt.InputMismatchError, r"residual must have the input's shape \(4, 3, 5, 5\), got \(4, 3, 5, 4\)"),
        ("dtype", nbt.InputDtypeError, "residual must have the input's dtype torch.float32, got torch.float64"),
        ("type", TypeError, "residual must be a torch.Tensor or None, got ndarray"),
    ],
)
def test_bad_residual_changes_nothing(bad, exc, match):
    m = nbt.BatchNorm2d(3, activation="relu")
    x = torch.randn(4, 3, 5, 5)
    r = {
        "shape": torch.randn(4, 3, 5, 4),
        "dtype": torch.randn(4, 3, 5, 5, dtype=torch.float64),
        "type": torch.randn(4, 3, 5, 5).numpy(),
    }[bad]
    state = copy.deepcopy(m.state_dict())
    with pytest.raises(exc, match=match):
        m(x, residual=r)
    for k, v in m.state_dict().items():
        assert torch.equal(v, state[k]), k


def test_a_bad_residual_raises_what_torch_raises_too():
    """Code written against ``bn(x) + r`` catches RuntimeError for a mismatched r."""
    m = nbt.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    with pytest.raises(RuntimeError):
        torch.nn.BatchNorm2d(3)(x) + torch.randn(4, 3, 5, 4)
    with pytest.raises(RuntimeError, match="residual must have the input's shape"):
        m(x, residual=torch.randn(4, 3, 5, 4))
    with pytest.raises(RuntimeError, match="residual must have the input's dtype"):
        m(x, residual=torch.randn(4, 3, 5, 5, dtype=torch.float64))


@pytest.mark.parametrize("relu", [False, True])
def test_changing_the_residual_after_the_forward(relu):
    """Without ReLU, backward does not read the residual: changing it in place after
    the forward is allowed and the gradients are torch's (``bn(x) + r`` saves no r).
    With ReLU the fused backward reads it for the mask: autograd refuses the backward
    instead of returning gradients of other values."""
    torch.manual_seed(0)
    ours = nbt.BatchNorm2d(3, activation="relu" if relu else None)
    ref = torch.nn.BatchNorm2d(3)
    x = torch.randn(4, 3, 5, 5)
    xa, xb = x.clone().requires_grad_(), x.clone().requires_grad_()
    ra = torch.randn(4, 3, 5, 5)
    rb = ra.clone()
    ya = ours(xa, residual=ra)
    with torch.no_grad():
        ra.add_(1.0)
    if relu:
        with pytest.raises(RuntimeError, match="modified by an inplace operation"):
            ya.sum().backward()
        return
    yb = ref(xb) + rb
    with torch.no_grad():
        rb.add_(1.0)
    dy = torch.randn_like(yb)
    ya.backward(dy)
    yb.backward(dy)
    torch.testing.assert_close(xa.grad, xb.grad, rtol=1e-4, atol=1e-4)


def test_fused_resnet_trains_like_the_unfused_one():
    torch.manual_seed(0)
    base = resnet18()
    x, labels = torch.randn(8, 3, 32, 32), torch.randint(0, 10, (8,))
    plain = nbt.convert_batchnorm(copy.deepcopy(base), fuse_relu=True)
    fused = fuse_residual(nbt.convert_batchnorm(copy.deepcopy(base), fuse_relu=True))
    assert sum(getattr(m, "fuses_residual", False) for m in fused.modules()) == 8
    losses = []
    for model in (plain, fused):
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)
        for _ in range(2):
            opt.zero_grad()
            loss = torch.nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
        losses.append(loss.item())
    assert losses[0] == pytest.approx(losses[1], rel=1e-4)
    sa, sb = plain.state_dict(), fused.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        torch.testing.assert_close(sa[k], sb[k], rtol=1e-3, atol=1e-4)


def test_fuse_residual_needs_numbabn_modules():
    with pytest.raises(TypeError, match="run convert_batchnorm first"):
        fuse_residual(torch.nn.Sequential(BasicBlock(4, 4, 1)))
