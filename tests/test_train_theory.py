"""Santurkar et al. 2018, §4, checked numerically with numbabn's explicit backward on
random small networks over many seeds.

Set-up of the theorems: y_j (m values, one channel over the batch) enters a BN layer,
z_j = γ ŷ_j + β with ŷ_j = (y_j − μ_j)/σ_j, and the rest of the network and the loss
make L(z). L̂(y) = L(BN(y)) is the BN network's loss as a function of y;
g_j = ∂L/∂z_j is "the gradient of the identical standard network", and
H_jj = ∂²L/∂z_j∂z_j. With σ² = var + ε and ε → 0, the BN backward gives exactly

    ∂L̂/∂y_j = (γ/σ) P g_j,     P = I − 11ᵀ/m − ŷŷᵀ/m   (a projection: ‖ŷ‖² = m)

so Theorem 4.1 holds with equality when its last term is ⟨g, ŷ⟩²/m, and its printed
1/√m form (which subtracts more) fails whenever ⟨g, ŷ⟩ ≠ 0. Theorem 4.2 is an
equality too (second directional derivative of ŷ along v ⊥ {1, ŷ} is −ŷ‖v‖²/(mσ²)).
"""

import numpy as np
import pytest
from scipy.optimize import minimize_scalar

from numbabn.layers import BatchNorm1d, Linear, Sequential, SoftmaxCrossEntropy, Tanh

F64 = np.float64
TINY_EPS = 1e-14  # ε → 0 of the theorems (y has variance ~1, so ε/σ² ~ 1e-14)
SEEDS = range(25)


def _setup(seed, eps=TINY_EPS, m=None):
    """A batch y (m, C) entering BN(γ, β random), then tanh → Linear → softmax CE."""
    rng = np.random.default_rng(seed)
    m = m or int(rng.integers(4, 40))
    C, K = 3, 4
    bn = BatchNorm1d(C, eps=eps, dtype=F64)
    bn.weight.value[...] = rng.uniform(0.5, 2.0, C) * rng.choice([-1, 1], C)
    bn.bias.value[...] = rng.standard_normal(C)
    head = Sequential(Tanh(), Linear(C, K, rng=rng, dtype=F64))
    y = rng.standard_normal((m, C)) * rng.uniform(0.3, 3.0, C) + rng.standard_normal(C)
    target = rng.integers(0, K, m)
    return bn, head, y, target


def _loss_z(head, z, target):
    """L(z) and ∂L/∂z."""
    value, d = SoftmaxCrossEntropy()(head.forward(z), target)
    return value, head.backward(d)


def _loss_y(bn, head, y, target):
    """L̂(y), ∂L̂/∂y, and g = ∂L/∂z at z = BN(y)."""
    z = bn.forward(y)
    value, g = _loss_z(head, z, target)
    return value, bn.backward(g), g


def _stats(y, eps=TINY_EPS):
    mean, var = y.mean(0), y.var(0)
    sigma = np.sqrt(var + eps)
    return (y - mean) / sigma, sigma


@pytest.mark.parametrize("seed", SEEDS)
def test_theorem_4_1_gradient_norm_last_term_is_one_over_m(seed):
    bn, head, y, target = _setup(seed)
    _, dy, g = _loss_y(bn, head, y, target)
    yhat, sigma = _stats(y)
    m, gamma = len(y), bn.weight.value
    ones_term = g.sum(0) ** 2 / m
    yhat_term = (g * yhat).sum(0) ** 2
    lhs = (dy**2).sum(0)
    bound_1_over_m = gamma**2 / sigma**2 * ((g**2).sum(0) - ones_term - yhat_term / m)
    bound_1_over_sqrt_m = gamma**2 / sigma**2 * ((g**2).sum(0) - ones_term - yhat_term / np.sqrt(m))
    np.testing.assert_allclose(lhs, bound_1_over_m, rtol=1e-9)  # equality at ε → 0
    assert np.all(lhs > bound_1_over_sqrt_m)  # the printed 1/√m form fails
    # the reduction from the standard network's gradient: ‖∂L̂/∂y‖ <= (|γ|/σ) ‖g‖
    assert np.all(np.sqrt(lhs) <= np.abs(gamma) / sigma * np.linalg.norm(g, axis=0) * (1 + 1e-12))


@pytest.mark.parametrize("seed", SEEDS)
def test_theorem_4_1_with_positive_eps_is_an_inequality(seed):
    """With ε > 0 (σ² = var + ε, ‖ŷ‖² = m·var/(var+ε) < m) the 1/m bound still holds,
    now strictly: the exact value has (2 − var/(var+ε)) ≥ 1 in front of ⟨g, ŷ⟩²/m."""
    bn, head, y, target = _setup(seed, eps=0.1)
    _, dy, g = _loss_y(bn, head, y, target)
    yhat, sigma = _stats(y, eps=0.1)
    m, gamma = len(y), bn.weight.value
    r = y.var(0) / (y.var(0) + 0.1)
    a, b = g.sum(0), (g * yhat).sum(0)
    exact = gamma**2 / sigma**2 * ((g**2).sum(0) - a**2 / m - (2 - r) * b**2 / m)
    np.testing.assert_allclose((dy**2).sum(0), exact, rtol=1e-9)
    assert np.all((dy**2).sum(0) <= gamma**2 / sigma**2 * ((g**2).sum(0) - a**2 / m - b**2 / m) * (1 + 1e-12))


def _directional_curvature(grad_fn, x, column, v, h=1e-4):
    """vᵀ ∇²f v for f restricted to one column of x, from central differences of the
    gradient along the unit direction v/‖v‖ (then scaled by ‖v‖²)."""
    u = v / np.linalg.norm(v)
    step = np.zeros_like(x)
    step[:, column] = h * u
    diff = (grad_fn(x + step)[:, column] - grad_fn(x - step)[:, column]) / (2 * h)
    return float(u @ diff) * float(v @ v)


@pytest.mark.parametrize("seed", SEEDS)
def test_theorem_4_2_quadratic_form_of_the_hessian(seed):
    """(∂L̂/∂y_j)ᵀ Ĥ_jj (∂L̂/∂y_j) = (γ²/σ²) [vᵀ H_jj v − ⟨g_j, ŷ_j⟩ ‖v‖² / (mγ)], v = ∂L̂/∂y_j:
    the paper's bound holds with equality at ε → 0."""
    bn, head, y, target = _setup(seed)
    _, dy, g = _loss_y(bn, head, y, target)
    z = bn.forward(y)
    yhat, sigma = _stats(y)
    m = len(y)
    for j in range(y.shape[1]):
        v, gamma = dy[:, j], bn.weight.value[j]
        lhs = _directional_curvature(lambda yy: _loss_y(bn, head, yy, target)[1], y, j, v)
        vHv = _directional_curvature(lambda zz: _loss_z(head, zz, target)[1], z, j, v)
        rhs = gamma**2 / sigma[j] ** 2 * (vHv - (g[:, j] @ yhat[:, j]) * (v @ v) / (m * gamma))
        np.testing.assert_allclose(lhs, rhs, rtol=1e-5, atol=1e-9 * abs(vHv) * gamma**2 / sigma[j] ** 2)


@pytest.mark.parametrize("seed", range(10))
def test_lemma_4_5_bn_optima_form_rays_closer_to_the_initialisation(seed):
    """Lemma 4.5: the weights W feeding a BN layer only matter up to a positive scale,
    so with W* an optimum every cW* (c > 0) is one, and the closest of them to any W₀
    with ⟨W₀, W*⟩ > 0 is at squared distance
    ‖W₀ − W*‖² − (‖W*‖² − ⟨W*, W₀⟩)² / ‖W*‖² <= ‖W₀ − W*‖²."""
    rng = np.random.default_rng(seed)
    net = Sequential(
        Linear(5, 6, bias=False, rng=rng, dtype=F64),
        BatchNorm1d(6, eps=TINY_EPS, dtype=F64),
        Tanh(),
        Linear(6, 3, rng=rng, dtype=F64),
    )
    x, t = rng.standard_normal((30, 5)), rng.integers(0, 3, 30)
    loss = SoftmaxCrossEntropy()
    W0 = net[0].weight.value.copy()
    for _ in range(200):  # W* = where gradient descent gets to
        _, d = loss(net.forward(x), t)
        net.backward(d)
        for p in net.parameters():
            p.value -= 0.5 * p.grad
    W_star = net[0].weight.value.copy()
    base = loss(net.forward(x), t)[0]
    for c in (0.05, 0.7, 3.0, 40.0):  # the ray of optima: the loss does not move
        net[0].weight.value[...] = c * W_star
        assert loss(net.forward(x), t)[0] == pytest.approx(base, rel=1e-9)
    inner, norm2 = float(np.sum(W0 * W_star)), float(np.sum(W_star**2))
    if inner <= 0:
        W0 = -W0  # the lemma assumes ⟨W₀, W*⟩ > 0
        inner = -inner
    lemma = np.sum((W0 - W_star) ** 2) - (norm2 - inner) ** 2 / norm2
    closest = minimize_scalar(
        lambda c: np.sum((W0 - c * W_star) ** 2), bounds=(0, 1e3), method="bounded", options={"xatol": 1e-12}
    )
    assert closest.fun == pytest.approx(lemma, rel=1e-7)
    assert lemma <= np.sum((W0 - W_star) ** 2)
