"""Parity with torch.nn.functional.batch_norm + autograd (skipped without torch)."""

import numpy as np
import pytest

import numbabn

torch = pytest.importorskip("torch", reason="PyTorch not installed: parity tests need the optional reference")


def _to_channels_first(a, axis):
    return np.moveaxis(a, axis, 1)


@pytest.mark.parametrize("shape,axis", [((8, 4, 6, 5), 1), ((16, 7), 1), ((4, 3, 3, 6), -1), ((5, 3, 11), 1)])
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
@pytest.mark.parametrize("momentum", [0.1, None])
@pytest.mark.parametrize("relu", [False, True])
def test_training_steps_match_torch(rng, shape, axis, dtype, momentum, relu):
    C = shape[axis]
    gamma = rng.uniform(0.5, 1.5, C).astype(dtype)
    beta = rng.standard_normal(C).astype(dtype)
    rm, rv = np.zeros(C, dtype), np.ones(C, dtype)
    nbt = np.zeros((), np.int64)
    t_rm, t_rv = torch.zeros(C, dtype=torch.from_numpy(rm).dtype), torch.ones(C, dtype=torch.from_numpy(rm).dtype)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == np.float32 else dict(rtol=1e-9, atol=1e-10)
    for step in range(1, 4):
        x = (rng.standard_normal(shape) * step + step).astype(dtype)
        dy = rng.standard_normal(shape).astype(dtype)
        y, ctx = numbabn.batch_norm_forward(
            x,
            gamma,
            beta,
            running_mean=rm,
            running_var=rv,
            num_batches_tracked=nbt,
            momentum=momentum,
            axis=axis,
            activation="relu" if relu else None,
        )
        dx, dg, db = numbabn.batch_norm_backward(dy, ctx)

        tx = torch.tensor(_to_channels_first(x, axis).copy(), requires_grad=True)
        tg = torch.tensor(gamma, requires_grad=True)
        tb = torch.tensor(beta, requires_grad=True)
        mom = momentum if momentum is not None else 1.0 / step
        ty = torch.nn.functional.batch_norm(tx, t_rm, t_rv, tg, tb, training=True, momentum=mom, eps=1e-5)
        if relu:
            ty = torch.relu(ty)
        ty.backward(torch.tensor(_to_channels_first(dy, axis).copy()))
        np.testing.assert_allclose(_to_channels_first(y, axis), ty.detach().numpy(), **tol)
        np.testing.assert_allclose(_to_channels_first(dx, axis), tx.grad.numpy(), **tol)
        np.testing.assert_allclose(dg, tg.grad.numpy(), **tol)
        np.testing.assert_allclose(db, tb.grad.numpy(), **tol)
        np.testing.assert_allclose(rm, t_rm.numpy(), **tol)
        np.testing.assert_allclose(rv, t_rv.numpy(), **tol)

    # eval mode with the accumulated statistics
    x = rng.standard_normal(shape).astype(dtype)
    y, ctx = numbabn.batch_norm_forward(x, gamma, beta, running_mean=rm, running_var=rv, training=False, axis=axis)
    dy = rng.standard_normal(shape).astype(dtype)
    dx, dg, db = numbabn.batch_norm_backward(dy, ctx)
    tx = torch.tensor(_to_channels_first(x, axis).copy(), requires_grad=True)
    tg = torch.tensor(gamma, requires_grad=True)
    tb = torch.tensor(beta, requires_grad=True)
    ty = torch.nn.functional.batch_norm(tx, t_rm, t_rv, tg, tb, training=False, eps=1e-5)
    ty.backward(torch.tensor(_to_channels_first(dy, axis).copy()))
    np.testing.assert_allclose(_to_channels_first(y, axis), ty.detach().numpy(), **tol)
    np.testing.assert_allclose(_to_channels_first(dx, axis), tx.grad.numpy(), **tol)
    np.testing.assert_allclose(dg, tg.grad.numpy(), **tol)
    np.testing.assert_allclose(db, tb.grad.numpy(), **tol)
