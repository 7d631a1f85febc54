"""Layers against their torch.nn counterparts (skipped without PyTorch).

Batch norm runs several training steps on both sides -- forward, backward, an SGD
update of gamma/beta -- comparing outputs, input and parameter gradients, running
statistics and the batch counter at every step, then the eval-mode forward.
"""

import numpy as np
import pytest
from numbabn_plugins.per_sample_norm import GroupNorm, LayerNorm

from numbabn.layers import BatchNorm1d, BatchNorm2d, Conv2d, Linear, MSELoss, SoftmaxCrossEntropy
from numbabn.optim import SGD

torch = pytest.importorskip("torch", reason="PyTorch is not installed: no reference layers to compare with")

TOL = {np.float64: dict(rtol=1e-10, atol=1e-10), np.float32: dict(rtol=1e-4, atol=1e-5)}


def t(a):
    return torch.tensor(a, requires_grad=True)


def close(ours, theirs, dtype, what):
    theirs = theirs.detach().numpy() if isinstance(theirs, torch.Tensor) else theirs
    assert ours.dtype == dtype, what
    np.testing.assert_allclose(ours, theirs, **TOL[dtype], err_msg=what)


BN_CASES = [  # (layer class, kwargs, input shape, permutation making the torch input NC...)
    (BatchNorm1d, {}, (16, 5), None),
    (BatchNorm1d, dict(momentum=None), (8, 3, 7), None),
    (BatchNorm1d, dict(affine=False, momentum=0.3), (8, 3, 7), None),
    (BatchNorm2d, {}, (4, 3, 5, 6), None),
    (BatchNorm2d, dict(momentum=None, channels_last=True), (4, 5, 6, 3), (0, 3, 1, 2)),
    (BatchNorm2d, dict(track_running_stats=False), (4, 3, 5, 6), None),
]


@pytest.mark.parametrize("cls, kwargs, shape, perm", BN_CASES)
@pytest.mark.parametrize("dtype", [np.float64, np.float32])
def test_batch_norm_matches_torch_over_training_steps(rng, cls, kwargs, shape, perm, dtype):
    ours = cls(shape[-1] if perm else shape[1], dtype=dtype, **kwargs)
    torch_kwargs = {k: v for k, v in kwargs.items() if k != "channels_last"}
    theirs = getattr(torch.nn, cls.__name__)(
        ours.num_features, dtype=getattr(torch, np.dtype(dtype).name), **torch_kwargs
    )
    if ours.affine:
        gamma = rng.uniform(0.5, 1.5, ours.num_features).astype(dtype)
        ours.weight.value[...] = gamma
        with torch.no_grad():
            theirs.weight.copy_(torch.tensor(gamma))
        opt, topt = (
            SGD(ours.parameters(), lr=0.1, momentum=0.9),
            torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9),
        )
    to_torch = (lambda a: a.transpose(perm)) if perm else (lambda a: a)

    for step in range(4):
        x = (rng.standard_normal(shape) * (1 + step) + step).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        xt = t(np.ascontiguousarray(to_torch(x)))
        yt = theirs(xt)
        yt.backward(torch.tensor(np.ascontiguousarray(to_torch(dy))))
        y = ours.forward(x)
        dx = ours.backward(dy)
        close(to_torch(y), yt, dtype, f"output, step {step}")
        close(to_torch(dx), xt.grad, dtype, f"input gradient, step {step}")
        if ours.affine:
            close(ours.weight.grad, theirs.weight.grad, dtype, f"gamma gradient, step {step}")
            close(ours.bias.grad, theirs.bias.grad, dtype, f"beta gradient, step {step}")
            opt.step()
            topt.step()
            topt.zero_grad()
        if ours.track_running_stats:
            close(ours.running_mean, theirs.running_mean, dtype, f"running mean, step {step}")
            close(ours.running_var, theirs.running_var, dtype, f"running var, step {step}")
            assert int(ours.num_batches_tracked) == int(theirs.num_batches_tracked) == step + 1

    ours.eval()
    theirs.eval()
    x = rng.standard_normal(shape).astype(dtype)
    xt = t(np.ascontiguousarray(to_torch(x)))
    yt = theirs(xt)
    yt.sum().backward()
    close(to_torch(ours.forward(x)), yt, dtype, "eval output")
    close(to_torch(ours.backward(np.ones_like(x))), xt.grad, dtype, "eval input gradient")
    if ours.track_running_stats:
        sd, tsd = ours.state_dict(), theirs.state_dict()
        assert sd.keys() == tsd.keys()
        for k in sd:
            np.testing.assert_allclose(sd[k], tsd[k].numpy(), **TOL[dtype], err_msg=k)


def _compare_float64(ours, theirs, x, rng):
    """Output, input gradient and weight/bias gradients of a float64 layer vs torch."""
    xt = t(x)
    yt = theirs(xt)
    dy = rng.standard_normal(tuple(yt.shape))
    yt.backward(torch.tensor(dy))
    close(ours.forward(x), yt, np.float64, f"{ours!r} output")
    close(ours.backward(dy), xt.grad, np.float64, f"{ours!r} input gradient")
    close(ours.weight.grad, theirs.weight.grad, np.float64, f"{ours!r} weight gradient")
    close(ours.bias.grad, theirs.bias.grad, np.float64, f"{ours!r} bias gradient")


def test_linear_and_conv2d_match_torch(rng):
    lin = Linear(5, 3, rng=rng, dtype=np.float64)
    tlin = torch.nn.Linear(5, 3, dtype=torch.float64)
    conv = Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), rng=rng, dtype=np.float64)
    tconv = torch.nn.Conv2d(2, 3, (3, 2), stride=(2, 1), padding=(1, 2), dtype=torch.float64)
    for ours, theirs, shape in [(lin, tlin, (4, 5)), (conv, tconv, (2, 2, 7, 6))]:
        ours.load_state_dict({k: v.numpy().copy() for k, v in theirs.state_dict().items()})
        x = rng.standard_normal(shape)
        _compare_float64(ours, theirs, x, rng)


def test_layer_norm_and_group_norm_match_torch(rng):
    cases = [
        (LayerNorm((4, 5), dtype=np.float64), torch.nn.LayerNorm((4, 5), dtype=torch.float64), (3, 4, 5)),
        (GroupNorm(2, 6, dtype=np.float64), torch.nn.GroupNorm(2, 6, dtype=torch.float64), (3, 6, 4, 2)),
    ]
    for ours, theirs, shape in cases:
        with torch.no_grad():
            theirs.weight.uniform_(0.5, 1.5)
            theirs.bias.normal_()
        ours.load_state_dict({k: v.numpy().copy() for k, v in theirs.state_dict().items()})
        x = rng.standard_normal(shape) * 3 + 1
        _compare_float64(ours, theirs, x, rng)


def test_losses_match_torch(rng):
    z = rng.standard_normal((6, 4)) * 5
    cases = [
        (SoftmaxCrossEntropy(), torch.nn.functional.cross_entropy, rng.integers(0, 4, 6), "cross-entropy"),
        (MSELoss(), torch.nn.functional.mse_loss, rng.standard_normal((6, 4)), "MSE"),
    ]
    for ours, theirs, target, what in cases:
        zt = t(z)
        lt = theirs(zt, torch.tensor(target))
        lt.backward()
        loss, dz = ours(z, target)
        np.testing.assert_allclose(loss, lt.item(), rtol=1e-12)
        close(dz, zt.grad, np.float64, f"{what} gradient")
