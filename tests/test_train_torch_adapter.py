"""numbabn.train.torch_adapter: the probes on a PyTorch model give the known answers
of the quadratic case, the same numbers as on the identical numbabn network, and a
probed training run stays bit-identical to an unprobed one."""

import numpy as np
import pytest

from numbabn.layers import BatchNorm1d, Linear, ReLU, Sequential, SoftmaxCrossEntropy
from numbabn.optim import SGD
from numbabn.train import (
    ActivationPercentiles,
    HessianEigenvalue,
    InternalCovariateShift,
    LandscapeProbe,
    Trainer,
    activation_percentiles,
    hessian_top_eigenvalue,
    internal_covariate_shift,
    landscape_probe,
    weight_layers,
)

torch = pytest.importorskip("torch")
from numbabn.train.torch_adapter import TorchLayer, from_torch  # noqa: E402


class ThetaModule(torch.nn.Module):
    """Outputs its parameter θ as a (1, d) row whatever the input."""

    def __init__(self, theta):
        super().__init__()
        self.theta = torch.nn.Parameter(torch.tensor(theta, dtype=torch.float64))

    def forward(self, x):
        return self.theta[None, :] + 0 * x.sum()


def quadratic_loss(A):
    def loss(prediction, target):
        p = prediction[0]
        return 0.5 * float(p @ A @ p), (A @ p)[None, :]

    return loss


def test_quadratic_known_answers(rng):
    d = 5
    M = rng.standard_normal((d, d))
    A = M @ M.T + np.eye(d)
    theta = rng.standard_normal(d)
    model = from_torch(ThetaModule(theta))
    batch, lr = (np.zeros((1, 1)), None), 0.01
    res = landscape_probe(model, quadratic_loss(A), batch, lr)
    g = A @ theta
    np.testing.assert_allclose(res["grad_diffs"], np.array(res["etas"]) * np.linalg.norm(A @ g), rtol=1e-10)
    np.testing.assert_allclose(res["beta_smoothness"], np.linalg.norm(A @ g) / np.linalg.norm(g), rtol=1e-10)
    top = hessian_top_eigenvalue(model, quadratic_loss(A), batch, iters=500, tol=1e-13)
    np.testing.assert_allclose(top["eigenvalue"], np.linalg.eigvalsh(A)[-1], rtol=1e-9)
    np.testing.assert_array_equal(model.module.theta.detach().numpy(), theta)  # restored, in the torch model


def _pair(seed):
    """The same MLP with BN as a torch nn.Sequential (wrapped) and as numbabn layers."""
    torch.manual_seed(seed)
    net = torch.nn.Sequential(
        torch.nn.Linear(5, 8), torch.nn.BatchNorm1d(8), torch.nn.ReLU(), torch.nn.Linear(8, 3)
    ).double()
    ours = Sequential(
        Linear(5, 8, dtype=np.float64), BatchNorm1d(8, dtype=np.float64), ReLU(), Linear(8, 3, dtype=np.float64)
    )
    for (_, p), q in zip(net.named_parameters(), ours.parameters(), strict=True):
        q.value[...] = p.detach().numpy()
    return from_torch(net), ours


def test_probes_match_the_identical_numbabn_network(rng):
    wrapped, ours = _pair(0)
    X, y = rng.standard_normal((32, 5)), rng.integers(0, 3, 32)
    batch, loss = (X, y), SoftmaxCrossEntropy()
    assert [pos for pos, _ in weight_layers(wrapped)] == [pos for pos, _ in weight_layers(ours)] == [0, 3]
    a, b = (landscape_probe(m, loss, batch, 0.1) for m in (wrapped, ours))
    np.testing.assert_allclose(a["losses"], b["losses"], rtol=1e-10)
    np.testing.assert_allclose(a["grad_diffs"], b["grad_diffs"], rtol=1e-7, atol=1e-12)
    ics = [internal_covariate_shift(m, loss, SGD(m.parameters(), lr=0.3, momentum=0.9), batch) for m in (wrapped, ours)]
    for i in (0, 1):
        assert ics[0][i]["l2"] == pytest.approx(ics[1][i]["l2"], rel=1e-7, abs=1e-14)
        assert ics[0][i]["cosine"] == pytest.approx(ics[1][i]["cosine"], rel=1e-10)
    np.testing.assert_allclose(
        activation_percentiles(wrapped, 2, batch), activation_percentiles(ours, 2, batch), rtol=1e-10, atol=1e-12
    )
    h = [hessian_top_eigenvalue(m, loss, batch, iters=100, tol=1e-9)["eigenvalue"] for m in (wrapped, ours)]
    assert h[0] == pytest.approx(h[1], rel=1e-5)


def _train(metrics, seed=1):
    wrapped, _ = _pair(seed)
    rng = np.random.default_rng(seed)
    X, y = rng.standard_normal((96, 5)), rng.integers(0, 3, 96)
    trainer = Trainer(
        wrapped,
        SoftmaxCrossEntropy(),
        SGD(wrapped.parameters(), lr=0.2, momentum=0.9),
        batch_size=16,
        seed=seed,
        metrics=metrics,
        record_every=2,
        verbose=0,
    )
    return wrapped, trainer.fit(X, y, steps=12)


def test_probed_torch_run_is_bit_identical():
    plain_model, plain = _train([])
    model, probed = _train(
        [InternalCovariateShift(), LandscapeProbe(), HessianEigenvalue(iters=3), ActivationPercentiles(2, unit=1)]
    )
    assert probed.loss == plain.loss and probed.accuracy == plain.accuracy
    a, b = plain_model.state_dict(), model.state_dict()
    assert a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)
    assert int(b["1.num_batches_tracked"]) == 12  # torch's own counter: the probes' passes were undone
    assert set(probed.metrics) == {"ics", "landscape", "hessian", "percentiles"}


def test_errors():
    with pytest.raises(TypeError, match="torch.nn.Module"):
        TorchLayer(np.zeros(3))
    layer = from_torch(torch.nn.Linear(2, 2).double())
    with pytest.raises(RuntimeError, match="forward first"):
        layer.backward(np.zeros((1, 2)))


def test_probes_leave_the_torch_modules_modes_as_found(rng):
    """The probes run in training mode (``train()`` reaches into the wrapped module)
    and must hand back every torch submodule's own flag: an eval-mode model left in
    training mode used batch statistics and moved its running statistics on its next
    forward (0.67 off). A block with a frozen (eval) BN inside a training model keeps
    that mix."""
    wrapped, _ = _pair(1)
    block = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5)).double()
    block[1].eval()  # frozen BN in a training block: the probes' train() sets it too
    mixed = Sequential(TorchLayer(block), TorchLayer(torch.nn.Linear(5, 3).double()))
    X, y = rng.standard_normal((16, 5)), rng.integers(0, 3, 16)
    loss = SoftmaxCrossEntropy()
    for model, x in ((wrapped.eval(), X), (mixed, X[:, :3])):
        before = [m.training for layer in model.children() for m in layer.module.modules()]
        flags = [layer.training for layer in model.children()]
        out = model.forward(x).copy()
        landscape_probe(model, loss, (x, y), 0.1)
        internal_covariate_shift(model, loss, SGD(model.parameters(), lr=0.1), (x, y))
        activation_percentiles(model, 0, (x, y))
        assert [m.training for layer in model.children() for m in layer.module.modules()] == before
        assert [layer.training for layer in model.children()] == flags
        np.testing.assert_array_equal(model.forward(x), out)


def test_backward_sets_gradients_and_checks_dy_like_every_layer():
    """Layer contract: backward *sets* the gradients (a second backward of one forward
    gives the same dx and parameter gradients, autograd would add them up), and a dy
    of the wrong dtype or shape is a TypeError / ValueError, not a cast or torch's error."""
    torch.manual_seed(0)
    model = from_torch(torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.BatchNorm1d(4), torch.nn.Linear(4, 2)))
    y = model.forward(np.random.default_rng(0).standard_normal((5, 3)).astype(np.float32))
    dy = np.ones_like(y)
    dx = model.backward(dy).copy()
    grads = [p.grad.copy() for p in model.parameters()]
    np.testing.assert_array_equal(model.backward(dy), dx)
    for p, grad in zip(model.parameters(), grads, strict=True):
        np.testing.assert_array_equal(p.grad, grad)
    with pytest.raises(TypeError, match="dtype float32"):
        model.backward(dy.astype(np.float64))
    with pytest.raises(ValueError, match=r"shape \(5, 2\)"):
        model.backward(dy[:2])


def test_trainer_checkpoints_keep_no_torch_graph():
    """A TorchLayer's autograd graph is a forward cache like a numbabn layer's: with
    exact_resume, each step's checkpoint held the previous step's graph alive."""
    import gc
    import weakref

    torch.manual_seed(0)
    model = from_torch(torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.ReLU(), torch.nn.Linear(8, 3)))
    rng = np.random.default_rng(0)
    X, y = rng.standard_normal((64, 4)).astype(np.float32), rng.integers(0, 3, 64)
    opt = SGD(model.parameters(), lr=0.1)
    trainer = Trainer(model, SoftmaxCrossEntropy(), opt, batch_size=16, seed=0, verbose=0, exact_resume=True)
    trainer.fit(X, y, steps=1)
    last = model.layers[2]
    previous, alive = [weakref.ref(last._graph[1])], []
    original = last.forward

    def spy(v):
        gc.collect()
        alive.append(previous[0]() is not None)
        out = original(v)
        previous[0] = weakref.ref(last._graph[1])
        return out

    last.forward = spy
    trainer.fit(X, y, steps=4)
    assert alive == [False] * 4


def test_fit_and_evaluate_keep_a_frozen_torch_batch_norm_frozen(rng):
    """A torch BN put in eval mode inside a wrapped training model (fine-tuning with
    frozen statistics) keeps its mode and running statistics through Trainer.fit and
    the evaluations in it, while the rest trains."""
    torch.manual_seed(0)
    block = torch.nn.Sequential(torch.nn.Linear(3, 5), torch.nn.BatchNorm1d(5), torch.nn.Linear(5, 3)).double()
    block[1].eval()
    model = Sequential(TorchLayer(block))
    X, y = rng.standard_normal((64, 3)), rng.integers(0, 3, 64)
    stats = [t.clone() for t in (block[1].running_mean, block[1].running_var, block[1].num_batches_tracked)]
    weight = block[0].weight.detach().clone()
    trainer = Trainer(
        model,
        SoftmaxCrossEntropy(),
        SGD(model.parameters(), lr=0.1),
        batch_size=16,
        seed=0,
        verbose=0,
        eval_data=(X[:16], y[:16]),
        eval_every=2,
    )
    trainer.fit(X, y, steps=5)
    assert [m.training for m in block.modules()] == [True, True, False, True]
    after = (block[1].running_mean, block[1].running_var, block[1].num_batches_tracked)
    for a, b in zip(stats, after, strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(weight, block[0].weight.detach())
