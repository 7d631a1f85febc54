"""Layer-specific behaviour beyond the contract (tests/test_layer_contract.py):
values against independent formulas, semantics, errors, and training on digits."""

import copy
import warnings

import numpy as np
import pytest
from numbabn_plugins.batch_renorm import BatchRenorm
from numbabn_plugins.ghost_batch_norm import GhostBatchNorm
from numbabn_plugins.lp_batch_norm import LpBatchNorm
from numbabn_plugins.noisy_batch_norm import NoisyBatchNorm
from numbabn_plugins.per_sample_norm import GroupNorm, LayerNorm
from scipy.signal import correlate2d
from scipy.special import expit

from numbabn.kernels import reference as R
from numbabn.layers import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Flatten,
    HalfSquaredError,
    Linear,
    MSELoss,
    ReLU,
    Sequential,
    Sigmoid,
    SoftmaxCrossEntropy,
    Tanh,
)
from numbabn.optim import SGD

from .helpers import central_diff

F64 = dict(rtol=1e-10, atol=1e-12)


def randn(rng, *shape, dtype=np.float64, loc=0.0, scale=1.0):
    return (rng.standard_normal(shape) * scale + loc).astype(dtype)


# ---------------------------------------------------------------- Linear, activations, Flatten
def test_linear_matches_the_formula(rng):
    layer = Linear(5, 3, dtype=np.float64, rng=rng)
    layer.bias.value[...] = rng.standard_normal(3)
    x, dy = randn(rng, 4, 5), randn(rng, 4, 3)
    W, b = layer.weight.value, layer.bias.value
    np.testing.assert_allclose(layer.forward(x), np.einsum("ni,oi->no", x, W) + b, **F64)
    np.testing.assert_allclose(layer.backward(dy), np.einsum("no,oi->ni", dy, W), **F64)
    np.testing.assert_allclose(layer.weight.grad, np.einsum("no,ni->oi", dy, x), **F64)
    np.testing.assert_allclose(layer.bias.grad, dy.sum(0), **F64)


@pytest.mark.parametrize("init, fan_in, fan_out", [("glorot", 400, 200), ("he", 400, 200)])
def test_linear_init_distributions(rng, init, fan_in, fan_out):
    w = Linear(fan_in, fan_out, init=init, rng=rng, dtype=np.float64).weight.value
    if init == "glorot":
        limit = np.sqrt(6 / (fan_in + fan_out))
        assert np.abs(w).max() <= limit and np.abs(w).max() > 0.99 * limit
        np.testing.assert_allclose(w.std(), limit / np.sqrt(3), rtol=0.02)
    else:
        np.testing.assert_allclose(w.std(), np.sqrt(2 / fan_in), rtol=0.02)
    assert abs(w.mean()) < 0.01
    same = Linear(fan_in, fan_out, init=init, rng=np.random.default_rng(3), dtype=np.float64).weight.value
    np.testing.assert_array_equal(
        same, Linear(fan_in, fan_out, init=init, rng=np.random.default_rng(3), dtype=np.float64).weight.value
    )
    # an int seed, as the signature says: numpy.random.default_rng(seed)
    np.testing.assert_array_equal(same, Linear(fan_in, fan_out, init=init, rng=3, dtype=np.float64).weight.value)


def test_linear_errors():
    with pytest.raises(ValueError, match="init must be one of"):
        Linear(2, 3, init="xavier")
    with pytest.raises(TypeError, match="rng must be a numpy.random.Generator, an int seed >= 0 or None"):
        Linear(2, 3, rng="42")
    with pytest.raises(ValueError, match="Linear: rng must be an int >= 0, got -1"):
        Linear(2, 3, rng=-1)
    with pytest.raises(ValueError, match="in_features must be a positive int"):
        Linear(0, 3)
    with pytest.raises(TypeError, match="dtype must be float32 or float64"):
        Linear(2, 3, dtype=np.float16)
    for bad in ("no", "False", 0, None):  # truthy strings would have added a bias
        with pytest.raises(TypeError, match="Linear: bias must be a bool, got"):
            Linear(2, 3, bias=bad)
        with pytest.raises(TypeError, match="Conv2d: bias must be a bool, got"):
            Conv2d(1, 2, 3, bias=bad)
    assert Linear(2, 3, bias=np.False_).bias is None and Conv2d(1, 2, 3, bias=False).bias is None
    layer = Linear(4, 3)
    with pytest.raises(
        ValueError,
        match=r"Linear\(in_features=4, out_features=3, bias=True\): "
        r"expected input of shape \(N, 4\), got \(2, 5\)",
    ):
        layer.forward(np.zeros((2, 5), np.float32))
    with pytest.raises(TypeError, match="must have the layer's dtype float32, got float64"):
        layer.forward(np.zeros((2, 4)))
    with pytest.raises(TypeError, match="floating-point"):
        layer.forward(np.zeros((2, 4), np.int64))


def test_linear_without_bias(rng):
    layer = Linear(3, 2, bias=False, rng=rng, dtype=np.float64)
    assert [p.name for p in layer.parameters()] == ["weight"]
    np.testing.assert_allclose(layer.forward(np.eye(3)), layer.weight.value.T, **F64)


def test_relu_at_nan_and_zero_follows_torch():
    """NaN in, NaN out, and the gradient of a NaN passes, as PyTorch's ReLU backward
    (mask: output <= 0) does; 0 and negative inputs get none."""
    x = np.array([[np.nan, -1.0, 0.0, 2.0, -np.inf, np.inf]])
    relu = ReLU()
    y = relu.forward(x)
    np.testing.assert_array_equal(y, [[np.nan, 0, 0, 2, 0, np.inf]])
    np.testing.assert_array_equal(relu.backward(np.full_like(x, 3.0)), [[3, 0, 0, 3, 0, 3]])
    torch = pytest.importorskip("torch")
    tx = torch.tensor(x, requires_grad=True)
    torch.relu(tx).backward(torch.full_like(tx, 3.0))
    np.testing.assert_array_equal(relu.backward(np.full_like(x, 3.0)), tx.grad.numpy())


def test_activations_values_and_no_overflow_warnings():
    x = np.array([[-1000.0, -2.0, 0.0, 3.0, 1000.0]], np.float32)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        np.testing.assert_array_equal(ReLU().forward(x), [[0, 0, 0, 3, 1000]])
        s = Sigmoid().forward(x)
        t = Tanh().forward(x)
    np.testing.assert_allclose(s, expit(x.astype(np.float64)), rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(t, np.tanh(x.astype(np.float64)), rtol=1e-6)
    assert s.dtype == t.dtype == np.float32


def test_softmax_cross_entropy_under_numpy_errors_raised():
    """A logit far below its row's largest underflows to probability 0 by design;
    with np.seterr(all="raise") (how users hunt their own NaNs) that used to raise
    FloatingPointError from inside the loss."""
    z = np.array([[0.0, -200.0, 5.0], [1000.0, 0.0, -1000.0]])
    with np.errstate(all="raise"):
        loss, grad = SoftmaxCrossEntropy().forward(z, np.array([2, 0]))
    expected = (np.log(1 + np.exp(-5.0)) + 0.0) / 2  # row 0: -log softmax(z)[2]; row 1: exactly 0
    assert loss == pytest.approx(expected, rel=1e-12)
    assert grad[1, 1] == 0.0 and grad[1, 2] == 0.0 and np.isfinite(grad).all()


def test_flatten_round_trip(rng):
    x = randn(rng, 2, 3, 4)
    layer = Flatten()
    y = layer.forward(x)
    assert y.shape == (2, 12)
    np.testing.assert_array_equal(layer.backward(y), x)
    with pytest.raises(ValueError, match=r"Flatten\(\): expected input of shape"):
        layer.forward(np.zeros(3))


# ---------------------------------------------------------------- batch norm layers
def test_batchnorm1d_modes_follow_pytorch_table(rng):
    x = randn(rng, 8, 3, loc=2.0, scale=3.0)
    bn = BatchNorm1d(3, dtype=np.float64)._randomize_state(rng)
    g, b = bn.weight.value, bn.bias.value
    rm, rv = bn.running_mean.copy(), bn.running_var.copy()
    # train: batch statistics, running statistics updated with the unbiased variance
    y = bn.forward(x)
    np.testing.assert_allclose(y, R.forward(x, g, b)[0], **F64)
    rm_ref, rv_ref = R.update_running(rm, rv, x.mean(0), x.var(0), 8, 0.1)
    np.testing.assert_allclose(bn.running_mean, rm_ref, **F64)
    np.testing.assert_allclose(bn.running_var, rv_ref, **F64)
    assert int(bn.num_batches_tracked) == 1
    # eval: running statistics
    bn.eval()
    np.testing.assert_allclose(bn.forward(x), R.forward(x, g, b, mean=rm_ref, var=rv_ref)[0], **F64)
    # eval without tracked statistics: batch statistics (as PyTorch), nothing to update
    free = BatchNorm1d(3, track_running_stats=False, dtype=np.float64).eval()
    assert free.state_dict().keys() == {"weight", "bias"}
    np.testing.assert_allclose(free.forward(x), R.forward(x)[0], **F64)


def test_batchnorm_cumulative_momentum_is_the_plain_average(rng):
    bn = BatchNorm1d(2, momentum=None, dtype=np.float64)
    batches = [randn(rng, 5, 2, 4, loc=i) for i in range(4)]
    for x in batches:
        bn.forward(x)
    means = [x.mean(axis=(0, 2)) for x in batches]
    uvars = [x.var(axis=(0, 2), ddof=1) for x in batches]
    np.testing.assert_allclose(bn.running_mean, np.mean(means, 0), **F64)
    np.testing.assert_allclose(bn.running_var, np.mean(uvars, 0), **F64)


def test_fused_relu_equals_bn_then_relu(rng):
    x, dy = randn(rng, 6, 4, 3), randn(rng, 6, 4, 3)
    fused = BatchNorm1d(4, activation="relu", dtype=np.float64)._randomize_state(rng)
    plain, relu = copy.deepcopy(fused), ReLU()
    plain.activation = None
    np.testing.assert_allclose(fused.forward(x), relu.forward(plain.forward(x)), **F64)
    np.testing.assert_allclose(fused.backward(dy), plain.backward(relu.backward(dy)), **F64)
    np.testing.assert_allclose(fused.weight.grad, plain.weight.grad, **F64)


def test_batchnorm2d_channels_last_equals_nchw(rng):
    x, dy = randn(rng, 3, 4, 5, 2), randn(rng, 3, 4, 5, 2)
    nchw = BatchNorm2d(2, dtype=np.float64)._randomize_state(rng)
    nhwc = copy.deepcopy(nchw)
    nhwc.channels_last, nhwc.axis = True, -1
    to_nchw = (0, 3, 1, 2)
    np.testing.assert_allclose(nhwc.forward(x).transpose(to_nchw), nchw.forward(x.transpose(to_nchw)), **F64)
    np.testing.assert_allclose(nhwc.backward(dy).transpose(to_nchw), nchw.backward(dy.transpose(to_nchw)), **F64)
    np.testing.assert_allclose(nhwc.weight.grad, nchw.weight.grad, **F64)
    np.testing.assert_allclose(nhwc.running_var, nchw.running_var, **F64)


def test_batchnorm_input_errors_name_the_layer_and_shape():
    with pytest.raises(
        ValueError,
        match=r"BatchNorm1d\(3, .*\): expected input of shape \(N, 3\) or \(N, 3, L\), "
        r"got \(2, 4\)",
    ):
        BatchNorm1d(3).forward(np.zeros((2, 4), np.float32))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 3\) or \(N, 3, L\), got \(2, 3, 1, 1\)"):
        BatchNorm1d(3).forward(np.zeros((2, 3, 1, 1), np.float32))
    with pytest.raises(ValueError, match=r"expected input of shape \(N, H, W, 3\) \(channels_last\)"):
        BatchNorm2d(3, channels_last=True).forward(np.zeros((2, 3, 4, 4), np.float32))
    with pytest.raises(ValueError, match="momentum must be None or a number in"):
        BatchNorm1d(3, momentum=1.5)
    with pytest.raises(ValueError, match="activation must be None or 'relu'"):
        BatchNorm1d(3, activation="gelu")
    with pytest.raises(ValueError, match="more than 1 value per channel"):
        BatchNorm1d(3).forward(np.zeros((1, 3), np.float32))


# ---------------------------------------------------------------- Conv2d
@pytest.mark.parametrize("stride, padding", [(1, 0), (2, 1), ((1, 2), (2, 0))])
def test_conv2d_matches_scipy_correlation(rng, stride, padding):
    conv = Conv2d(3, 2, (3, 2), stride=stride, padding=padding, rng=rng, dtype=np.float64)
    conv.bias.value[...] = rng.standard_normal(2)
    x = randn(rng, 2, 3, 7, 6)
    (sh, sw), (ph, pw) = conv.stride, conv.padding
    xp = np.pad(x, ((0, 0), (0, 0), (ph, ph), (pw, pw)))
    W = conv.weight.value
    expected = np.stack(
        [
            np.stack(
                [
                    sum(correlate2d(xp[n, c], W[o, c], mode="valid") for c in range(3))[::sh, ::sw] + conv.bias.value[o]
                    for o in range(2)
                ]
            )
            for n in range(2)
        ]
    )
    y = conv.forward(x)
    np.testing.assert_allclose(y, expected, **F64)
    assert y.flags.c_contiguous


def test_conv2d_errors():
    conv = Conv2d(2, 4, 3)
    with pytest.raises(
        ValueError,
        match=r"Conv2d\(2, 4, .*\): expected input of shape \(N, 2, H, W\), "
        r"got \(1, 3, 5, 5\)",
    ):
        conv.forward(np.zeros((1, 3, 5, 5), np.float32))
    with pytest.raises(ValueError, match="smaller than the kernel"):
        conv.forward(np.zeros((1, 2, 2, 5), np.float32))
    with pytest.raises(ValueError, match="stride must be an int >= 1"):
        Conv2d(2, 4, 3, stride=0)


def test_small_cnn_with_batchnorm2d_learns(rng):
    """Conv-BN2d(ReLU)-Flatten-Linear trains on a toy task (bright top vs bottom half)."""
    x = randn(rng, 64, 1, 6, 6, dtype=np.float32)
    t = rng.integers(0, 2, 64)
    x[t == 1, :, :3] += 1.0
    x[t == 0, :, 3:] += 1.0
    model = Sequential(
        Conv2d(1, 4, 3, padding=1, rng=rng), BatchNorm2d(4, activation="relu"), Flatten(), Linear(4 * 36, 2, rng=rng)
    )
    loss_fn, opt = SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for _ in range(30):
        loss, dlogits = loss_fn(model.forward(x), t)
        opt.zero_grad()
        model.backward(dlogits)
        opt.step()
        losses.append(loss)
    assert losses[-1] < 0.2 * losses[0]
    assert (model.eval().forward(x).argmax(1) == t).mean() > 0.95


# ---------------------------------------------------------------- containers and losses
def test_sequential_indexing_shares_layers(rng):
    a, b, c = Linear(2, 3, rng=rng), ReLU(), Linear(3, 1, rng=rng)
    seq = Sequential(a, b, c)
    assert seq[0] is a and seq[-1] is c and list(seq) == [a, b, c] and len(seq) == 3 and seq.layers == (a, b, c)
    head = seq.eval()[:2]
    assert isinstance(head, Sequential) and head.layers == (a, b) and not head.training
    assert head.parameters()[0] is a.weight
    assert [q for q, _ in seq.named_parameters()] == ["0.weight", "0.bias", "2.weight", "2.bias"]
    with pytest.raises(TypeError, match="must be a Layer"):
        Sequential(a, "relu")


def test_slicing_a_sequential_keeps_every_layers_mode(rng):
    """A slice shares the layers: it takes the model's own flag and sets none of theirs
    (a batch norm frozen in eval mode inside a training model stays frozen)."""
    lin, norm, out = Linear(3, 4, rng=rng), BatchNorm1d(4), Linear(4, 2, rng=rng)
    model = Sequential(lin, norm, out)
    norm.eval()
    tail = model[1:]
    assert tail.training and model.training and not norm.training and lin.training and out.training
    model.eval()
    lin.train()
    head = model[:2]
    assert not head.training and not model.training and lin.training and not norm.training and not out.training


def test_a_layer_used_twice_in_one_model_is_refused(rng):
    """A layer keeps its last forward's input for its backward: used twice, the
    second forward would overwrite it and the weight gradient would be wrong
    (PyTorch's autograd would sum both uses). Refused when the model is built, also
    through a nested container, and the error names the layer."""
    lin, relu = Linear(3, 3, rng=rng), ReLU()
    with pytest.raises(ValueError, match=r"child '2' would use Linear\(in_features=3, .*a second time in one model"):
        Sequential(lin, Tanh(), lin)
    with pytest.raises(ValueError, match=r"child '1' would use ReLU\(\) a second time"):
        Sequential(Sequential(lin, relu), Sequential(Linear(3, 3, rng=rng), relu))
    model = Sequential(lin, relu)
    assert model[0:2][0] is lin  # a slice is a new model holding each layer once
    Sequential(model, Linear(3, 3, rng=rng))  # a model inside a larger one: each layer still once


def test_softmax_cross_entropy_is_stable_and_exact(rng):
    z = randn(rng, 5, 4, scale=3.0)
    t = rng.integers(0, 4, 5)
    loss, dz = SoftmaxCrossEntropy()(z, t)
    p = np.exp(z) / np.exp(z).sum(1, keepdims=True)
    np.testing.assert_allclose(loss, -np.mean(np.log(p[np.arange(5), t])), rtol=1e-12)
    np.testing.assert_allclose(
        dz, central_diff(lambda v: SoftmaxCrossEntropy()(v, t)[0], z.copy()), rtol=1e-6, atol=1e-9
    )
    big, dbig = SoftmaxCrossEntropy()((z * 1e4).astype(np.float32), t)  # exp would overflow
    assert np.isfinite(big) and np.all(np.isfinite(dbig)) and dbig.dtype == np.float32
    with pytest.raises(ValueError, match=r"labels must lie in \[0, 4\)"):
        SoftmaxCrossEntropy()(z, t + 4)
    with pytest.raises(ValueError, match="labels must be integers of shape"):
        SoftmaxCrossEntropy()(z, t.astype(float))


def test_mse_loss(rng):
    pred, target = randn(rng, 4, 3), randn(rng, 4, 3)
    loss, d = MSELoss()(pred, target)
    np.testing.assert_allclose(loss, np.mean((pred - target) ** 2), rtol=1e-12)
    np.testing.assert_allclose(d, central_diff(lambda v: MSELoss()(v, target)[0], pred.copy()), rtol=1e-6, atol=1e-9)
    with pytest.raises(ValueError, match="target must have the prediction's shape"):
        MSELoss()(pred, target[:2])


def test_half_squared_error(rng):
    """Half the squared error summed over outputs, averaged over samples: the function
    whose gradient is (pred - target) / N, weighted or not."""
    pred, target, w = randn(rng, 5, 3), randn(rng, 5, 3), rng.uniform(0.5, 2.0, 5)
    loss, d = HalfSquaredError()(pred, target)
    np.testing.assert_allclose(loss, 0.5 * np.sum((pred - target) ** 2) / 5, rtol=1e-12)
    np.testing.assert_allclose(d, (pred - target) / 5, rtol=1e-12)
    np.testing.assert_allclose(
        d, central_diff(lambda v: HalfSquaredError()(v, target)[0], pred.copy()), rtol=1e-6, atol=1e-9
    )
    loss, d = HalfSquaredError()(pred, target, w)
    np.testing.assert_allclose(loss, np.dot(w, 0.5 * np.sum((pred - target) ** 2, axis=1)) / w.sum(), rtol=1e-12)
    np.testing.assert_allclose(
        d, central_diff(lambda v: HalfSquaredError()(v, target, w)[0], pred.copy()), rtol=1e-6, atol=1e-9
    )
    f32, d32 = HalfSquaredError()(pred.astype(np.float32), target)
    assert d32.dtype == np.float32 and f32 == pytest.approx(HalfSquaredError()(pred, target)[0], rel=1e-6)
    with pytest.raises(ValueError, match="predictions must have shape"):
        HalfSquaredError()(pred[:, 0], target[:, 0])
    with pytest.raises(ValueError, match="target must be real numbers of the prediction's shape"):
        HalfSquaredError()(pred, target[:2])


@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_losses_of_an_empty_batch_are_nan_like_torch(dtype):
    """PyTorch's mean losses of an empty batch are NaN with an empty gradient; no
    ZeroDivisionError, no "Mean of empty slice" warning (turned into an error here)."""
    pred = np.zeros((0, 3), dtype)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for loss_fn, target in (
            (MSELoss(), np.zeros((0, 3))),
            (HalfSquaredError(), np.zeros((0, 3))),
            (SoftmaxCrossEntropy(), np.zeros(0, np.int64)),
        ):
            loss, grad = loss_fn(pred, target)
            assert np.isnan(loss) and grad.shape == (0, 3) and grad.dtype == dtype


def test_bn_mlp_learns_digits():
    """Linear-BN-ReLU x2 + Linear on sklearn's digits with SGD: >= 95% test accuracy."""
    from sklearn.datasets import load_digits
    from sklearn.model_selection import train_test_split

    X, y = load_digits(return_X_y=True)
    X_tr, X_te, y_tr, y_te = train_test_split(
        (X / 16).astype(np.float32), y, test_size=0.25, random_state=0, stratify=y
    )
    rng = np.random.default_rng(0)
    model = Sequential(
        Linear(64, 100, init="he", rng=rng),
        BatchNorm1d(100, activation="relu"),
        Linear(100, 100, init="he", rng=rng),
        BatchNorm1d(100, activation="relu"),
        Linear(100, 10, rng=rng),
    )
    loss_fn, opt = SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.1, momentum=0.9)
    for _ in range(4):  # epochs of 23 steps
        order = rng.permutation(len(X_tr))
        for i in range(0, len(order) - 59, 60):
            idx = order[i : i + 60]
            _, dlogits = loss_fn(model.train().forward(X_tr[idx]), y_tr[idx])
            opt.zero_grad()
            model.backward(dlogits)
            opt.step()
    accuracy = (model.eval().forward(X_te).argmax(1) == y_te).mean()
    assert accuracy >= 0.95


# ---------------------------------------------------------------- plugins: specifics
def test_batch_renorm_schedule_and_limits():
    layer = BatchRenorm(2, rmax=3.0, dmax=5.0, relax_from=10, rmax_until=30, dmax_until=20)
    for t, expected in [
        (0, (1.0, 0.0)),
        (9, (1.0, 0.0)),
        (10, (1.0, 0.0)),
        (15, (1.5, 2.5)),
        (20, (2.0, 5.0)),
        (30, (3.0, 5.0)),
        (100, (3.0, 5.0)),
    ]:
        layer.num_batches_tracked[...] = t
        assert layer.limits() == pytest.approx(expected)
    with pytest.raises(ValueError, match="rmax must be a number >= 1"):
        BatchRenorm(2, rmax=0.5)
    # Infinite limits: none in force during the warm-up, no clipping once relaxing.
    unlimited = BatchRenorm(2, rmax=np.inf, dmax=np.inf, relax_from=10, rmax_until=30, dmax_until=20)
    for t, expected in [(0, (1.0, 0.0)), (10, (1.0, 0.0)), (11, (np.inf, np.inf)), (40, (np.inf, np.inf))]:
        unlimited.num_batches_tracked[...] = t
        assert unlimited.limits() == expected


def test_batch_renorm_with_infinite_limits_trains_finite(rng):
    """rmax = dmax = inf from step 0 (relax_from=0): batch norm at step 0 (the
    limits' product with a ramp of 0 made every output NaN), then no clipping."""
    x = randn(rng, 6, 3, 2, loc=1.0)
    layer = BatchRenorm(3, dtype=np.float64, rmax=np.inf, dmax=np.inf, relax_from=0, rmax_until=4, dmax_until=4)
    bn = BatchNorm1d(3, dtype=np.float64)
    np.testing.assert_allclose(layer.forward(x), bn.forward(x), **F64)
    for _ in range(3):
        assert np.isfinite(layer.forward(x * 3 + 1)).all()


def test_batch_renorm_failed_eval_keeps_the_training_forwards_r_and_d(rng):
    """An eval forward that raises changes nothing: the pending backward of the
    training forward still applies its (r, d)."""
    x, dy = randn(rng, 8, 3, 2, loc=0.3, scale=1.2), randn(rng, 8, 3, 2)
    layer = BatchRenorm(3, dtype=np.float64, relax_from=0, rmax_until=0, dmax_until=0)._randomize_state(rng)
    twin = BatchRenorm(3, dtype=np.float64, relax_from=0, rmax_until=0, dmax_until=0)
    twin.load_state_dict(layer.state_dict())
    layer.forward(x)
    twin.forward(x)
    layer.eval()
    layer.activation = "bogus"  # refused by the functional call, after the layer's own checks
    with pytest.raises(ValueError, match="activation"):
        layer.forward(x)
    layer.activation = None
    layer.train()
    np.testing.assert_array_equal(layer.backward(dy), twin.backward(dy))
    np.testing.assert_array_equal(layer.weight.grad, twin.weight.grad)


def test_batch_renorm_is_batch_norm_during_warmup(rng):
    x, dy = randn(rng, 6, 3, 2, loc=1.0), randn(rng, 6, 3, 2)
    renorm = BatchRenorm(3, dtype=np.float64)._randomize_state(rng)
    bn = BatchNorm1d(3, dtype=np.float64)
    bn.load_state_dict(renorm.state_dict())
    np.testing.assert_allclose(renorm.forward(x), bn.forward(x), **F64)
    np.testing.assert_allclose(renorm.backward(dy), bn.backward(dy), **F64)
    np.testing.assert_allclose(renorm.weight.grad, bn.weight.grad, **F64)
    np.testing.assert_allclose(renorm.running_var, bn.running_var, **F64)


def test_batch_renorm_corrects_with_constant_r_and_d(rng):
    """Unclipped r, d: forward = gamma*(xhat*r + d) + beta, backward = BN's with r, d constant."""
    x, dy = randn(rng, 8, 3, 2, loc=0.3, scale=1.2), randn(rng, 8, 3, 2)
    layer = BatchRenorm(3, dtype=np.float64, relax_from=0, rmax_until=0, dmax_until=0)._randomize_state(rng)
    g, b, rm, rv = (
        layer.weight.value.copy(),
        layer.bias.value.copy(),
        layer.running_mean.copy(),
        layer.running_var.copy(),
    )
    mean, var = x.mean(axis=(0, 2)), x.var(axis=(0, 2))
    r = np.sqrt(var + layer.eps) / np.sqrt(rv + layer.eps)
    d = (mean - rm) / np.sqrt(rv + layer.eps)
    assert np.all((r > 1 / 3) & (r < 3) & (np.abs(d) < 5)) and not np.allclose(r, 1)  # really unclipped
    xhat = R.forward(x, eps=layer.eps)[0]
    bc = (1, 3, 1)
    np.testing.assert_allclose(
        layer.forward(x), g.reshape(bc) * (xhat * r.reshape(bc) + d.reshape(bc)) + b.reshape(bc), **F64
    )
    dx_ref, dgr, dbeta = R.backward(dy, x, g * r, eps=layer.eps)
    np.testing.assert_allclose(layer.backward(dy), dx_ref, **F64)
    np.testing.assert_allclose(layer.weight.grad, (dy * (xhat * r.reshape(bc) + d.reshape(bc))).sum((0, 2)), **F64)
    np.testing.assert_allclose(layer.bias.grad, dy.sum((0, 2)), **F64)


def test_ghost_batch_norm_is_batch_norm_per_virtual_batch(rng):
    x, dy = randn(rng, 10, 3, 2, loc=1.0), randn(rng, 10, 3, 2)
    ghost = GhostBatchNorm(3, virtual_batch_size=4, dtype=np.float64)._randomize_state(rng)
    bn = BatchNorm1d(3, dtype=np.float64)
    bn.load_state_dict(ghost.state_dict())
    y = ghost.forward(x)
    dx = ghost.backward(dy)
    dgamma = 0
    for s in (slice(0, 4), slice(4, 8), slice(8, 10)):
        np.testing.assert_allclose(y[s], bn.forward(x[s]), **F64)
        np.testing.assert_allclose(dx[s], bn.backward(dy[s]), **F64)
        dgamma = dgamma + bn.weight.grad
    np.testing.assert_allclose(ghost.weight.grad, dgamma, **F64)
    assert_running = [(ghost.running_mean, bn.running_mean), (ghost.running_var, bn.running_var)]
    for a, b in assert_running:
        np.testing.assert_allclose(a, b, **F64)
    assert int(ghost.num_batches_tracked) == 3
    with pytest.raises(ValueError, match="last virtual batch .* holds 1 value"):
        GhostBatchNorm(3, virtual_batch_size=4).forward(np.zeros((5, 3), np.float32))


def test_noisy_batch_norm_noise_statistics(rng):
    x = randn(rng, 20000, 6, loc=3.0, scale=2.0, dtype=np.float32)
    noisy = NoisyBatchNorm(6, rng=np.random.default_rng(5))
    clean = BatchNorm1d(6).forward(x)
    y = noisy.forward(x)
    s = noisy._scale
    # per unit: s ~ N(sigma_t, 0.1) with sigma_t in [1, 1.25]; y - s*a = m ~ U(mu_t +- 0.1), mu_t in [-0.5, 0.5]
    sigma_t, mu_t = s.mean(0), (y - s * clean).mean(0)
    assert np.all((sigma_t > 0.99) & (sigma_t < 1.26)) and np.ptp(sigma_t) > 0.01
    np.testing.assert_allclose(s.std(0), 0.1, rtol=0.05)
    assert np.all(np.abs(mu_t) < 0.51) and np.ptp(mu_t) > 0.05
    m = y - s * clean
    np.testing.assert_allclose(np.ptp(m, axis=0), 0.2, rtol=0.01)  # U(mu_t - 0.1, mu_t + 0.1)
    np.testing.assert_allclose(m.std(0), 0.2 / np.sqrt(12), rtol=0.05)
    # noise changes every step, is reproducible from the seed, and is absent in eval
    assert not np.allclose(noisy.forward(x), y)
    again = NoisyBatchNorm(6, rng=np.random.default_rng(5))
    np.testing.assert_array_equal(again.forward(x), y)
    plain = BatchNorm1d(6)
    plain.load_state_dict(noisy.state_dict())
    np.testing.assert_array_equal(noisy.eval().forward(x), plain.eval().forward(x))


@pytest.mark.parametrize("p", [1, 2, np.inf])
def test_lp_batch_norm_forward_and_backward(rng, p):
    x, dy = randn(rng, 7, 3, 2, loc=0.5), randn(rng, 7, 3, 2)
    layer = LpBatchNorm(3, p=p, dtype=np.float64)._randomize_state(rng)
    u = x - x.mean(axis=(0, 2), keepdims=True)
    s = (
        np.abs(u).max(axis=(0, 2), keepdims=True)
        if p == np.inf
        else (np.mean(np.abs(u) ** p, axis=(0, 2), keepdims=True)) ** (1 / p)
    )
    bc = (1, 3, 1)
    expected = layer.weight.value.reshape(bc) * u / (s + layer.eps) + layer.bias.value.reshape(bc)
    probe = copy.deepcopy(layer)
    np.testing.assert_allclose(layer.forward(x), expected, **F64)
    dx = layer.backward(dy)
    np.testing.assert_allclose(
        dx, central_diff(lambda v: np.sum(dy * copy.deepcopy(probe).forward(v)), x.copy()), rtol=1e-6, atol=1e-8
    )
    np.testing.assert_allclose(layer.running_norm, 0.9 * probe.running_norm + 0.1 * s.ravel(), **F64)
    with pytest.raises(ValueError, match="p must be 1, 2 or numpy.inf"):
        LpBatchNorm(3, p=3)


def test_lp2_is_close_to_batch_norm(rng):
    x = randn(rng, 50, 4, loc=2.0, scale=3.0)
    np.testing.assert_allclose(
        LpBatchNorm(4, p=2, eps=1e-12, dtype=np.float64).forward(x),
        BatchNorm1d(4, eps=1e-12, dtype=np.float64).forward(x),
        rtol=1e-9,
        atol=1e-9,
    )


def test_layer_norm_and_group_norm_formulas(rng):
    x = randn(rng, 3, 4, 5, loc=1.0, scale=2.0)
    ln = LayerNorm((4, 5), dtype=np.float64)
    ln.weight.value[...] = rng.standard_normal((4, 5))
    mu, var = x.mean(axis=(1, 2), keepdims=True), x.var(axis=(1, 2), keepdims=True)
    np.testing.assert_allclose(ln.forward(x), (x - mu) / np.sqrt(var + 1e-5) * ln.weight.value, **F64)
    gn = GroupNorm(2, 4, dtype=np.float64)
    gn.bias.value[...] = rng.standard_normal(4)
    xg = x.reshape(3, 2, 10)
    ref = ((xg - xg.mean(2, keepdims=True)) / np.sqrt(xg.var(2, keepdims=True) + 1e-5)).reshape(x.shape)
    np.testing.assert_allclose(gn.forward(x), ref + gn.bias.value.reshape(1, 4, 1), **F64)
    with pytest.raises(ValueError, match="must be divisible by num_groups"):
        GroupNorm(3, 4)
    with pytest.raises(ValueError, match=r"LayerNorm\(\(4, 5\).*\): expected input of shape \(\.\.\., 4, 5\)"):
        ln.forward(np.zeros((3, 5, 4)))
    for bad in [None, "ab", (4, 2.0), True, np.array([4.0]), np.array(4), np.ones((1, 2), int)]:
        with pytest.raises(TypeError, match="LayerNorm: normalized_shape must be an int >= 1 or a non-empty sequence"):
            LayerNorm(bad)
    for bad in [(), (4, 0), 0, np.array([], dtype=np.int64)]:
        with pytest.raises(ValueError, match="LayerNorm: normalized_shape must be an int >= 1 or a non-empty sequence"):
            LayerNorm(bad)
    with pytest.raises(TypeError, match="LayerNorm: elementwise_affine must be a bool"):
        LayerNorm(4, elementwise_affine=1)
    for ok in [np.int64(4), [4], np.array([4])]:
        assert LayerNorm(ok).normalized_shape == (4,)
    assert LayerNorm([2, 3]).normalized_shape == LayerNorm(np.array([2, 3])).normalized_shape == (2, 3)
