"""numbabn.train.metrics: the measurement probes on cases with known answers, and the
promise that they leave everything untouched (the Trainer and History are in
test_train_trainer.py)."""

import numpy as np
import pytest

from numbabn.layers import (
    BatchNorm1d,
    BatchNorm2d,
    Conv2d,
    Layer,
    Linear,
    MSELoss,
    ReLU,
    Sequential,
    Sigmoid,
    SoftmaxCrossEntropy,
)
from numbabn.optim import SGD, Adam
from numbabn.train import (
    ActivationPercentiles,
    HessianEigenvalue,
    InternalCovariateShift,
    LandscapeProbe,
    Trainer,
    activation_percentiles,
    eta_grid,
    gradient_norm,
    hessian_top_eigenvalue,
    internal_covariate_shift,
    landscape_probe,
    leaf_layers,
    weight_layers,
    weight_norm,
)

from .train_nets import F64, all_metrics, bn_net, data, two_layer


# ------------------------------------------------------------------ a quadratic "network"
class Theta(Layer):
    """Ignores its input and outputs the parameter θ as a (1, d) row: with
    :class:`QuadraticLoss` the loss is L(θ) = ½ θᵀAθ and ∇L = Aθ."""

    def __init__(self, theta):
        super().__init__()
        self.theta = self.add_parameter("theta", np.array(theta, dtype=F64))

    def forward(self, x):
        return self.theta.value[None, :].copy()

    def backward(self, dy):
        self.theta.grad = dy[0].copy()
        return None


class QuadraticLoss:
    def __init__(self, A):
        self.A = A

    def __call__(self, prediction, target):
        p = prediction[0]
        return 0.5 * float(p @ self.A @ p), (self.A @ p)[None, :]


@pytest.fixture
def quadratic(rng):
    d = 6
    M = rng.standard_normal((d, d))
    A = M @ M.T + np.eye(d)  # symmetric positive definite
    theta = rng.standard_normal(d)
    return Theta(theta), QuadraticLoss(A), A, theta


@pytest.mark.parametrize("wrap", [False, True])
def test_landscape_quadratic_exact(quadratic, wrap):
    layer, loss, A, theta = quadratic
    model = Sequential(layer) if wrap else layer
    lr = 0.01
    res = landscape_probe(model, loss, (np.zeros((1, 1)), None), lr)
    g = A @ theta
    etas = lr * np.linspace(0.5, 4.0, 8)
    assert np.allclose(res["etas"], etas, rtol=0, atol=1e-15)
    # gradient predictiveness ‖∇L(θ) − ∇L(θ − ηg)‖ = η‖Ag‖, for every η
    np.testing.assert_allclose(res["grad_diffs"], etas * np.linalg.norm(A @ g), rtol=1e-10)
    np.testing.assert_allclose(res["beta_smoothness"], np.linalg.norm(A @ g) / np.linalg.norm(g), rtol=1e-10)
    expected_losses = [0.5 * (theta - e * g) @ A @ (theta - e * g) for e in etas]
    np.testing.assert_allclose(res["losses"], expected_losses, rtol=1e-12)
    assert res["loss_min"] == min(res["losses"]) and res["loss_max"] == max(res["losses"])
    np.testing.assert_allclose(res["loss"], 0.5 * theta @ A @ theta, rtol=1e-14)
    np.testing.assert_allclose(res["grad_norm"], np.linalg.norm(g), rtol=1e-14)
    assert np.array_equal(layer.theta.value, theta)  # restored


def test_landscape_custom_grid_and_errors(quadratic):
    layer, loss, A, theta = quadratic
    etas = np.geomspace(1e-4, 0.3, 5)
    res = landscape_probe(layer, loss, (None, None), 0.01, etas=etas)
    g = A @ theta
    np.testing.assert_allclose(res["grad_diffs"], etas * np.linalg.norm(A @ g), rtol=1e-9)
    for bad in ([], [0.1, -0.1], [[0.1]], [np.nan], "abc", [0.0]):
        with pytest.raises(ValueError, match="bad eta grid"):
            landscape_probe(layer, loss, (None, None), 0.01, etas=bad)
    with pytest.raises(ValueError, match="lr"):
        landscape_probe(layer, loss, (None, None), -1.0)
    with pytest.raises(TypeError, match="pair"):
        landscape_probe(layer, loss, np.zeros(3), 0.01)


def test_eta_grid():
    np.testing.assert_allclose(eta_grid(0.1), np.linspace(0.05, 0.4, 8))
    np.testing.assert_allclose(eta_grid(2.0, 0.01, 30, num=5, spacing="log"), 2.0 * np.geomspace(0.01, 30, 5))
    for kwargs in ({"lr": 0}, {"lr": 1, "low": 2, "high": 1}, {"lr": 1, "num": 0}, {"lr": 1, "spacing": "cubic"}):
        with pytest.raises(ValueError):
            eta_grid(**kwargs)


# ------------------------------------------------------------------ top Hessian eigenvalue
def test_hessian_quadratic_exact(quadratic):
    layer, loss, A, theta = quadratic
    eigenvalues = np.linalg.eigvalsh(A)
    res = hessian_top_eigenvalue(layer, loss, (None, None), iters=500, tol=1e-13)
    np.testing.assert_allclose(res["eigenvalue"], eigenvalues[-1], rtol=1e-9)
    assert res["residual"] < 1e-5 and res["iterations"] < 500
    v = np.linalg.eigh(A)[1][:, -1]
    assert abs(abs(res["vector"] @ v) - 1) < 1e-8
    assert np.array_equal(layer.theta.value, theta)  # restored
    # warm start from the eigenvector: converged after two products
    again = hessian_top_eigenvalue(layer, loss, (None, None), iters=50, tol=1e-10, v0=res["vector"])
    assert again["iterations"] <= 2 and again["eigenvalue"] == pytest.approx(eigenvalues[-1], rel=1e-9)
    assert res["max_eigenvalue"] == res["eigenvalue"] and res["max_iterations"] == 0  # λ > 0: λ_max = λ
    # an indefinite quadratic: the largest |λ| wins, sign kept; λ_max (the stability
    # edge's eigenvalue) from the second iteration on H − λI
    B = np.diag([1.0, -5.0, 2.0])
    neg = hessian_top_eigenvalue(Theta([1.0, 1.0, 1.0]), QuadraticLoss(B), (None, None), iters=300, tol=1e-12)
    assert neg["eigenvalue"] == pytest.approx(-5.0, rel=1e-8)
    assert neg["max_eigenvalue"] == pytest.approx(2.0, rel=1e-8) and 0 < neg["max_iterations"] < 300
    # warm-started from λ's own eigenvector (a metric's v0), which H − λI maps to 0
    warm = hessian_top_eigenvalue(
        Theta([1.0, 1.0, 1.0]), QuadraticLoss(B), (None, None), iters=300, tol=1e-12, v0=[0.0, 1.0, 0.0]
    )
    assert warm["eigenvalue"] == pytest.approx(-5.0) and warm["max_eigenvalue"] == pytest.approx(2.0, rel=1e-8)
    # every eigenvalue negative (a maximum): λ_max is the one closest to 0
    C = np.diag([-1.0, -5.0, -2.0])
    top = hessian_top_eigenvalue(Theta([1.0, 1.0, 1.0]), QuadraticLoss(C), (None, None), iters=300, tol=1e-12)
    assert top["eigenvalue"] == pytest.approx(-5.0, rel=1e-8) and top["max_eigenvalue"] == pytest.approx(-1.0, rel=1e-7)


def test_hessian_max_eigenvalue_is_exact_where_the_negative_top_dominates():
    """λ = −20 dominates and λ_max = 6 is followed by 1, 0.5, ...: a few power steps on
    H − λI (the method before) stop far below (they returned 0.90 at
    iters=3); Lanczos finds 6 within the budget, and a rotated copy of the spectrum
    (a dense Hessian) the same."""
    B = np.diag([-20.0, 6.0, 1.0, 0.5, 0.2, 0.1])
    res = hessian_top_eigenvalue(Theta(np.ones(6)), QuadraticLoss(B), (None, None), iters=3, tol=1e-3)
    assert res["eigenvalue"] == pytest.approx(-20.0, rel=0.05)
    assert res["max_eigenvalue"] == pytest.approx(6.0, rel=1e-6) and 0 < res["max_iterations"] <= 20
    Q = np.linalg.qr(np.random.default_rng(5).standard_normal((6, 6)))[0]
    dense = hessian_top_eigenvalue(Theta(np.ones(6)), QuadraticLoss(Q @ B @ Q.T), (None, None), iters=3, tol=1e-3)
    assert dense["max_eigenvalue"] == pytest.approx(6.0, rel=1e-6)
    # λ_max = 0, which ARPACK's relative test never accepts (it was NaN, or an
    # ArpackError): the shifted operator's, to about tol·|λ|
    flat = np.zeros(50)
    flat[0] = -20.0
    zero = hessian_top_eigenvalue(Theta(np.ones(50)), QuadraticLoss(np.diag(flat)), (None, None), iters=10, tol=1e-4)
    assert abs(zero["max_eigenvalue"]) <= 1e-4 * 20


def test_hessian_of_weights_too_large_for_the_step_is_nan_not_flat():
    """Weights of 1e12 (a diverged run): θ ± 1e-6 u rounds back to θ, and the
    difference of two equal gradients read as a flat loss (eigenvalue 0, agreeing with
    itself at ε/10); it is NaN now. A larger ε that the weights can take measures it."""
    layer = Theta(np.full(3, 1e12))
    loss = QuadraticLoss(np.diag([3.0, 2.0, 1.0]))
    with pytest.warns(RuntimeWarning, match="eps=1e-06 is too small a step for these parameters"):
        lost = hessian_top_eigenvalue(layer, loss, (None, None), iters=20, tol=1e-8)
    assert np.isnan(lost["eigenvalue"]) and np.isnan(lost["max_eigenvalue"])
    # one parameter too large to move, on the top eigenvector: a step that keeps 99.99 %
    # of its norm never sees that curvature (λ_max read 0.1 for 6); NaN too
    d = np.full(30, 0.1)
    d[:2] = 6.0, -20.0
    with pytest.warns(RuntimeWarning, match="too small a step"):
        part = hessian_top_eigenvalue(Theta(np.r_[1e12, np.ones(29)]), QuadraticLoss(np.diag(d)), (None, None))
    assert np.isnan(part["max_eigenvalue"])
    kept = hessian_top_eigenvalue(layer, loss, (None, None), iters=200, tol=1e-12, eps=1.0)
    assert kept["eigenvalue"] == pytest.approx(3.0, rel=1e-6)
    assert np.array_equal(layer.theta.value, np.full(3, 1e12))


@pytest.mark.parametrize("act, seed", [(Sigmoid, None), (ReLU, 2)], ids=["sigmoid", "relu-negative-top"])
def test_hessian_matches_dense_finite_difference_hessian(rng, act, seed):
    """A small network with BN: power iteration against the eigenvalues of the full
    Hessian built column by column from central differences of the gradient. The ReLU
    network of seed 2 curves down more steeply than up (top eigenvalue −1.37, largest
    +1.01): λ_max, the stability edge's eigenvalue, comes from the second iteration."""
    if seed is not None:
        rng = np.random.default_rng(seed)
    model = Sequential(
        Linear(3, 4, rng=rng, dtype=F64), BatchNorm1d(4, dtype=F64), act(), Linear(4, 3, rng=rng, dtype=F64)
    )
    batch = (rng.standard_normal((10, 3)), rng.integers(0, 3, 10))
    loss = SoftmaxCrossEntropy()
    params = model.parameters()
    theta = [p.value.copy() for p in params]
    sizes = [p.value.size for p in params]

    def grad(flat):
        offset = 0
        for p, t, n in zip(params, theta, sizes, strict=True):
            p.value[...] = t + flat[offset : offset + n].reshape(t.shape)
            offset += n
        _, d = loss(model.forward(batch[0]), batch[1])
        model.backward(d)
        return np.concatenate([p.grad.ravel() for p in params])

    P, h = sum(sizes), 1e-5
    H = np.array([(grad(h * e) - grad(-h * e)) / (2 * h) for e in np.eye(P)])
    grad(np.zeros(P))  # back to θ
    eig = np.linalg.eigvalsh((H + H.T) / 2)
    top = eig[np.argmax(np.abs(eig))]
    state = model.state_dict()
    res = hessian_top_eigenvalue(model, loss, batch, iters=2000, tol=1e-12)
    np.testing.assert_allclose(res["eigenvalue"], top, rtol=1e-5)
    np.testing.assert_allclose(res["max_eigenvalue"], eig[-1], rtol=1e-5)
    assert (top < 0) == (seed is not None) and (res["max_iterations"] > 0) == (top < 0)
    after = model.state_dict()
    assert all(np.array_equal(after[k], v) for k, v in state.items())


def test_hessian_default_eps_sits_on_the_relu_plateau():
    """A ReLU network's Hessian is piecewise constant; a difference that crosses a
    kink measures a gradient jump. The default ε gives the same eigenvalue as 10×
    smaller and larger ones (no kink crossed); ε = 0.1 crosses kinks, which the
    check at ε/10 finds, and the value is the one at a smaller ε."""
    rng = np.random.default_rng(7)
    model = Sequential(
        Linear(10, 60, rng=rng, dtype=F64),
        BatchNorm1d(60, dtype=F64),
        ReLU(),
        Linear(60, 60, rng=rng, dtype=F64),
        ReLU(),
        Linear(60, 3, rng=rng, dtype=F64),
    )
    X, y = rng.standard_normal((200, 10)), rng.integers(0, 3, 200)
    Trainer(model, SoftmaxCrossEntropy(), SGD(model.parameters(), lr=0.1), batch_size=40, seed=0, verbose=0).fit(
        X, y, steps=40
    )
    batch, loss = (X[:40], y[:40]), SoftmaxCrossEntropy()
    results = {
        eps: hessian_top_eigenvalue(model, loss, batch, iters=300, tol=1e-10, eps=eps)
        for eps in (1e-7, 1e-6, 1e-5, 1e-1)
    }
    values = {eps: r["eigenvalue"] for eps, r in results.items()}
    assert [r["eps"] for r in results.values()][:3] == [1e-7, 1e-6, 1e-5]  # no kink: no retry
    assert values[1e-7] == pytest.approx(values[1e-6], rel=1e-5)
    assert values[1e-5] == pytest.approx(values[1e-6], rel=1e-5)
    assert results[1e-1]["eps"] < 1e-1 and values[1e-1] == pytest.approx(values[1e-6], rel=1e-3)


def test_hessian_without_a_stable_eps_returns_the_best_checked_value_and_warns():
    """A float32 ReLU network where no ε agrees with ε/10 (the float64 network: 1.2995
    at every ε): the value whose check agreed best, with a warning, not the one at the
    smallest ε, whose rounding error is largest (it returned 55.5 silently)."""
    rng = np.random.default_rng(7)
    widths = [20, 200, 200, 200, 200, 10]
    layers = []
    for a, b in zip(widths[:-1], widths[1:], strict=True):
        layers += [Linear(a, b, rng=rng, dtype=np.float32), ReLU()]
    model = Sequential(*layers[:-1])
    X, y = rng.standard_normal((60, 20)).astype(np.float32), rng.integers(0, 10, 60)
    with pytest.warns(RuntimeWarning, match="no finite-difference step gave a stable eigenvalue"):
        res = hessian_top_eigenvalue(model, SoftmaxCrossEntropy(), (X, y), iters=50, tol=1e-6, eps=1e-2)
    assert res["eps_agreement"] > 1e-2  # flagged in the record too
    assert abs(res["eigenvalue"]) < 10, res  # not the 55.5 of the smallest step


def test_hessian_a_kink_within_eps_is_detected_and_eps_shrunk():
    """A ReLU pre-activation 1e-7 from its kink: the default ε = 1e-6 crosses it and
    the product measures the gradient's jump / 2ε (λ = −46 061, ‖H‖₂ 20 000× too
    large; the digits MLP of ``landscape`` gave 3671 for 74.4 at step 45 of seed 0).
    The result is checked against the Rayleigh quotient at ε/10 and the iteration
    rerun with the smaller ε until the two agree, so it is the curvature found at
    ε = 1e-7 … 1e-9; a result without a kink is returned as before."""
    rng = np.random.default_rng(3)
    model = Sequential(Linear(4, 6, rng=rng, dtype=F64), ReLU(), Linear(6, 3, rng=rng, dtype=F64))
    X, y = rng.standard_normal((12, 4)), rng.integers(0, 3, 12)
    z = X[0] @ model[0].weight.value[0] + model[0].bias.value[0]
    model[0].bias.value[0] -= z - 1e-7
    batch, loss = (X, y), SoftmaxCrossEntropy()
    truth = hessian_top_eigenvalue(model, loss, batch, iters=200, tol=1e-12, eps=1e-8)["eigenvalue"]
    assert truth == pytest.approx(2.3377, abs=1e-4)
    res = hessian_top_eigenvalue(model, loss, batch, iters=200, tol=1e-12)
    assert res["eigenvalue"] == pytest.approx(truth, rel=1e-6)
    assert res["eps"] == pytest.approx(1e-7) and res["eps_agreement"] <= 1e-2
    # no kink: the ε asked for, the values of the plain iteration
    clean = hessian_top_eigenvalue(model, loss, batch, iters=200, tol=1e-12, eps=1e-8)
    assert clean["eps"] == 1e-8 and clean["eigenvalue"] == truth and clean["eps_agreement"] < 1e-5


def test_hessian_errors(quadratic):
    layer, loss, _, _ = quadratic
    for kwargs in ({"iters": 0}, {"tol": 0.0}, {"eps": -1.0}, {"eps": np.inf}):
        with pytest.raises(ValueError, match=next(iter(kwargs))):
            hessian_top_eigenvalue(layer, loss, (None, None), **kwargs)
    with pytest.raises(ValueError, match="v0"):
        hessian_top_eigenvalue(layer, loss, (None, None), v0=np.zeros(6))
    with pytest.raises(ValueError, match="v0"):
        hessian_top_eigenvalue(layer, loss, (None, None), v0=np.ones(5))


def test_hessian_metric_warm_starts_until_reset():
    model, (X, y) = bn_net(0), data(1)
    batch, loss = (X[:20], y[:20]), SoftmaxCrossEntropy()
    metric = HessianEigenvalue(iters=3, eps=1e-2)
    cold = metric(model, loss, None, batch)
    assert metric(model, loss, None, batch) != cold  # started from the first call's vector
    metric.reset()
    assert metric(model, loss, None, batch) == cold == HessianEigenvalue(iters=3, eps=1e-2)(model, loss, None, batch)


# ------------------------------------------------------------------ internal covariate shift
def test_ics_one_layer_is_exactly_zero(rng):
    model = Sequential(Linear(5, 3, rng=rng, dtype=F64))
    x, y = rng.standard_normal((8, 5)), rng.integers(0, 3, 8)
    opt = SGD(model.parameters(), lr=0.5, momentum=0.9)
    res = internal_covariate_shift(model, SoftmaxCrossEntropy(), opt, (x, y))
    g = gradient_norm(model, SoftmaxCrossEntropy(), (x, y))["0.weight"]
    assert res == {0: {"l2": 0.0, "cosine": pytest.approx(1.0, abs=1e-15), "grad_norm": pytest.approx(g, rel=1e-15)}}


def _mse_grads(W1, b1, W2, b2, x, t):
    """Hand-written backward of out = (x W1ᵀ + b1) W2ᵀ + b2, L = mean((out − t)²)."""
    h = x @ W1.T + b1
    out = h @ W2.T + b2
    dout = 2 * (out - t) / out.size
    dh = dout @ W2
    return {"W1": dh.T @ x, "b1": dh.sum(0), "W2": dout.T @ h}


@pytest.mark.parametrize(
    "make_opt",
    [lambda p: SGD(p, lr=0.3, momentum=0.9, weight_decay=0.01), lambda p: Adam(p, lr=0.05)],
    ids=["sgd-momentum", "adam"],
)
def test_ics_two_layer_linear_by_hand(rng, make_opt):
    model = two_layer(rng)
    loss = MSELoss()
    opt = make_opt(model.parameters())
    x, t = rng.standard_normal((7, 3)), rng.standard_normal((7, 2))
    # one real step first, so the optimizer has momentum / moments to use
    x0, t0 = rng.standard_normal((7, 3)), rng.standard_normal((7, 2))
    _, d = loss(model.forward(x0), t0)
    model.backward(d)
    opt.step()

    W1, b1 = model[0].weight.value.copy(), model[0].bias.value.copy()
    W2, b2 = model[1].weight.value.copy(), model[1].bias.value.copy()
    g = _mse_grads(W1, b1, W2, b2, x, t)
    # the optimizer's real update of layer 0 (W1, b1), computed on a copy of it
    shadow = Sequential(Linear(3, 4, dtype=F64))
    shadow_opt = make_opt(shadow.parameters())
    state = opt.state_dict()
    shadow_opt.load_state_dict({"hyperparameters": state["hyperparameters"], "state": state["state"][:2]})
    shadow[0].weight.value[...], shadow[0].bias.value[...] = W1, b1
    shadow[0].weight.grad, shadow[0].bias.grad = g["W1"], g["b1"]
    shadow_opt.step()
    G = g["W2"]
    G2 = _mse_grads(shadow[0].weight.value, shadow[0].bias.value, W2, b2, x, t)["W2"]

    res = internal_covariate_shift(model, loss, opt, (x, t), layers=[1, 0])
    np.testing.assert_allclose(res[1]["l2"], np.linalg.norm(G - G2), rtol=1e-10)
    np.testing.assert_allclose(res[1]["cosine"], np.sum(G * G2) / np.linalg.norm(G) / np.linalg.norm(G2), rtol=1e-12)
    np.testing.assert_allclose(res[1]["grad_norm"], np.linalg.norm(G), rtol=1e-12)
    assert res[1]["l2"] > 1e-3  # a real shift, not a trivial zero
    assert res[0]["l2"] == 0.0


def test_ics_bad_layers(rng):
    model = two_layer(rng)
    opt = SGD(model.parameters(), lr=0.1)
    batch = (rng.standard_normal((4, 3)), rng.standard_normal((4, 2)))
    with pytest.raises(ValueError, match="unknown layer index 2: the model has 2 parameterized"):
        internal_covariate_shift(model, MSELoss(), opt, batch, layers=[2])
    with pytest.raises(ValueError, match="unknown layer index -1"):
        internal_covariate_shift(model, MSELoss(), opt, batch, layers=-1)
    with pytest.raises(TypeError, match="ints"):
        internal_covariate_shift(model, MSELoss(), opt, batch, layers=["0"])
    with pytest.raises(ValueError, match="distinct"):
        internal_covariate_shift(model, MSELoss(), opt, batch, layers=[1, 1])
    with pytest.raises(ValueError, match="no parameterized layer"):
        internal_covariate_shift(Sequential(ReLU()), MSELoss(), opt, batch)
    other = SGD(Sequential(Linear(3, 4)).parameters(), lr=0.1)  # does not manage the model's parameters
    with pytest.raises(ValueError, match="not managed"):
        internal_covariate_shift(model, MSELoss(), other, batch, layers=[1])


def test_layer_addressing(rng):
    inner = Sequential(Linear(2, 3, rng=rng), BatchNorm1d(3))
    model = Sequential(inner, ReLU(), Sequential(Linear(3, 2, rng=rng)))
    assert [type(leaf).__name__ for leaf in leaf_layers(model)] == ["Linear", "BatchNorm1d", "ReLU", "Linear"]
    assert [pos for pos, _ in weight_layers(model)] == [0, 3]


# ------------------------------------------------------------------ activation percentiles
def test_percentiles_match_numpy(rng):
    model = Sequential(Linear(5, 4, rng=rng, dtype=F64), Sigmoid(), Linear(4, 2, rng=rng, dtype=F64))
    x = rng.standard_normal((50, 5))
    h = x @ model[0].weight.value.T + model[0].bias.value
    q = (15, 50, 85)
    np.testing.assert_array_equal(activation_percentiles(model, 1, (x, None)), np.percentile(h, q, axis=0))
    np.testing.assert_array_equal(
        activation_percentiles(model, model[1], x, q=(5, 95), unit=2), np.percentile(h[:, 2], (5, 95))
    )
    np.testing.assert_array_equal(activation_percentiles(model, 0, x), np.percentile(x, q, axis=0))


def test_percentiles_conv_bn_training_mode(rng):
    model = Sequential(Conv2d(2, 3, 3, padding=1, rng=rng, dtype=F64), BatchNorm2d(3, dtype=F64), ReLU())
    model.eval()  # the probe runs in training mode regardless, and restores the flag
    x = rng.standard_normal((6, 2, 5, 5)) * 3 + 1
    c = model[0].forward(x)
    xhat = (c - c.mean(axis=(0, 2, 3), keepdims=True)) / np.sqrt(c.var(axis=(0, 2, 3), keepdims=True) + 1e-5)
    expected = np.percentile(np.moveaxis(xhat, 1, -1).reshape(-1, 3), (15, 50, 85), axis=0)
    np.testing.assert_allclose(activation_percentiles(model, 2, x), expected, atol=1e-12)
    assert not model.training and not model[1].training


def test_percentiles_errors(rng):
    model = Sequential(Linear(3, 2, rng=rng, dtype=F64), Sigmoid())
    x = rng.standard_normal((4, 3))
    with pytest.raises(ValueError, match="unknown layer position 2"):
        activation_percentiles(model, 2, x)
    with pytest.raises(ValueError, match="not one of the model's leaf layers"):
        activation_percentiles(model, Sigmoid(), x)
    with pytest.raises(ValueError, match=r"unit must be an int in \[0, 2\)"):
        activation_percentiles(model, 1, x, unit=2)
    with pytest.raises(ValueError, match="q must be"):
        activation_percentiles(model, 1, x, q=(50, 101))


def test_gradient_and_weight_norm(rng):
    model = two_layer(rng)
    x, t = rng.standard_normal((7, 3)), rng.standard_normal((7, 2))
    g = _mse_grads(model[0].weight.value, model[0].bias.value, model[1].weight.value, model[1].bias.value, x, t)
    norms = gradient_norm(model, MSELoss(), (x, t))
    assert list(norms) == ["0.weight", "0.bias", "1.weight", "1.bias"]
    np.testing.assert_allclose(
        [norms["0.weight"], norms["0.bias"], norms["1.weight"]],
        [np.linalg.norm(g["W1"]), np.linalg.norm(g["b1"]), np.linalg.norm(g["W2"])],
        rtol=1e-12,
    )
    assert weight_norm(model)["1.weight"] == pytest.approx(np.linalg.norm(model[1].weight.value), rel=1e-15)


# ------------------------------------------------------------------ nothing is touched
@pytest.mark.parametrize("dtype", [np.float32, F64])
@pytest.mark.parametrize(
    "make_opt", [lambda p: SGD(p, lr=0.1, momentum=0.9), lambda p: Adam(p, lr=0.01)], ids=["sgd", "adam"]
)
def test_metrics_leave_everything_untouched(dtype, make_opt):
    model, (X, y) = bn_net(0, dtype), data(1)
    X = X.astype(dtype)
    loss = SoftmaxCrossEntropy()
    opt = make_opt(model.parameters())
    for k in range(2):  # optimizer state and running statistics become non-trivial
        _, d = loss(model.forward(X[k * 20 : (k + 1) * 20]), y[k * 20 : (k + 1) * 20])
        opt.zero_grad()
        model.backward(d)
        opt.step()
    model.eval().train()
    batch = (X[40:60], y[40:60])
    _, d = loss(model.forward(batch[0]), batch[1])  # a pending backward: caches must survive
    model.backward(d)
    grads = {name: p.grad.copy() for name, p in model.named_parameters()}
    state, opt_state = model.state_dict(), opt.state_dict()
    noise = model[1].rng
    rng_state = noise.bit_generator.state
    cached = {id(layer): dict(vars(layer)) for layer in leaf_layers(model)}

    for metric in all_metrics():
        metric(model, loss, opt, batch)
        assert noise.bit_generator.state == rng_state, metric
        after = model.state_dict()
        assert all(np.array_equal(after[k], v) and after[k].dtype == v.dtype for k, v in state.items()), metric
        assert int(after["1.num_batches_tracked"]) == 3  # 2 steps + the pending forward
        assert all(np.array_equal(p.grad, grads[n]) for n, p in model.named_parameters()), metric
        now = opt.state_dict()
        assert now["hyperparameters"] == opt_state["hyperparameters"]
        assert all(
            s.keys() == t.keys() and all(np.array_equal(s[k], t[k]) for k in s)
            for s, t in zip(now["state"], opt_state["state"], strict=True)
        ), metric
        for layer in leaf_layers(model):
            assert all(vars(layer)[k] is v for k, v in cached[id(layer)].items()), (metric, layer)
        assert model.training
    model.backward(d)  # the caches of the pending forward are intact
    assert all(np.array_equal(p.grad, grads[n]) for n, p in model.named_parameters())


def test_metrics_keep_the_hyperparameters_a_loss_sets_per_batch():
    """The scikit-learn estimators' loss sets the optimizer's weight decay for its
    batch (alpha / the batch's size) right before the step. Every metric puts it back,
    and ICS replays the update with the value the real step of the probed batch uses,
    whatever the weight decay was before (0 on a fresh optimizer, a previous batch's)
    and whichever metric ran first (it replayed the value found on entry)."""
    from numbabn.sklearn._weighted import WeightedCrossEntropy

    model, (X, y) = bn_net(0), data(1)
    opt = SGD(model.parameters(), lr=0.5, momentum=0.9)
    batch = (X[:20], y[:20])
    opt.weight_decay = 40.0 / 20  # what the real step of this batch uses
    expected = internal_covariate_shift(model, SoftmaxCrossEntropy(), opt, batch)
    for before in (0.0, 0.7):
        opt.weight_decay = before
        for metric in all_metrics():
            result = metric(model, WeightedCrossEntropy(opt, alpha=40.0), opt, batch)
            assert opt.weight_decay == before, metric
            if isinstance(metric, InternalCovariateShift):
                assert result == expected


@pytest.mark.parametrize(
    "make, message",
    [
        (
            lambda: ActivationPercentiles(1, q=50),
            "ActivationPercentiles: q must be a non-empty 1-D sequence of percentiles in [0, 100], got int 50",
        ),
        (
            lambda: ActivationPercentiles(1, q=[[50]]),
            "ActivationPercentiles: q must be a non-empty 1-D sequence of percentiles in [0, 100], got list [[50]]",
        ),
        (lambda: HessianEigenvalue(iters=0), "HessianEigenvalue: iters must be a positive int, got 0"),
        (lambda: HessianEigenvalue(tol=-1.0), "HessianEigenvalue: tol must be a finite number > 0, got -1.0"),
        (lambda: LandscapeProbe(lr=0), "LandscapeProbe: lr must be a finite number > 0, got 0"),
        (lambda: LandscapeProbe(num=0), "LandscapeProbe: num must be a positive int, got 0"),
        (
            lambda: landscape_probe(two_layer(np.random.default_rng(0)), MSELoss(), (None, None), 0),
            "landscape_probe: lr must be a finite number > 0, got 0",
        ),
        (
            lambda: landscape_probe(two_layer(np.random.default_rng(0)), MSELoss(), (None, None), 0, etas=[0.1]),
            "landscape_probe: lr must be a finite number > 0, got 0",
        ),
    ],
)
def test_metric_arguments_are_checked_when_given(make, message):
    """Each bad argument is refused where it is given (not at the first probe, not as
    an error of a helper such as eta_grid), naming the class or function, the
    argument, what it must be and what came."""
    with pytest.raises(ValueError) as info:
        make()
    assert str(info.value) == message
