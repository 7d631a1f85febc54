"""numbabn.torch's BatchNorm1d/2d/3d against torch.nn's where an audit found them apart.

Each test runs both modules on the same call: input layouts other than dense
(``torch.sparse_*``, ``torch._mkldnn``) and a layer without channels, comparing
results, exception types and what a refused call leaves behind (numbabn's rule: a
call that raises changes nothing).
"""

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")

import numbabn.torch as nbt  # noqa: E402
from numbabn import config  # noqa: E402

# The kernels (0), and PyTorch's op for small inputs (a threshold above every input here).
NATIVE_BELOW = [0, 1 << 30]


def _snapshot(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _assert_unchanged(module, before):
    for k, v in module.state_dict().items():
        assert torch.equal(v, before[k]), k


@pytest.mark.filterwarnings("ignore:Sparse CSR tensor support is in beta")
@pytest.mark.parametrize("native_below", NATIVE_BELOW)
@pytest.mark.parametrize("training", [True, False])
@pytest.mark.parametrize("name, shape", [("BatchNorm1d", (4, 3)), ("BatchNorm2d", (4, 3, 3, 3))])
def test_sparse_input_raises_torch_nns_exception_type(monkeypatch, native_below, training, name, shape):
    """torch.nn raises NotImplementedError for a sparse COO input (no sparse batch
    norm kernel; a RuntimeError for CSR): numbabn's refusal is that type too, as well
    as the TypeError it was, and changes nothing."""
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", native_below)
    x = torch.randn(shape).to_sparse()
    theirs = getattr(torch.nn, name)(3).train(training)
    with pytest.raises(NotImplementedError):
        theirs(x)
    ours = getattr(nbt, name)(3).train(training)
    before = _snapshot(ours)
    with pytest.raises(NotImplementedError) as caught:
        ours(x)
    assert isinstance(caught.value, TypeError)
    for word in (name, "dense", "sparse_coo"):
        assert word in str(caught.value)
    _assert_unchanged(ours, before)
    csr = torch.randn(4, 3).to_sparse_csr()
    with pytest.raises(RuntimeError):
        torch.nn.BatchNorm1d(3).train(training)(csr)
    with pytest.raises(RuntimeError):
        nbt.BatchNorm1d(3).train(training)(csr)


mkldnn = pytest.mark.skipif(not torch.backends.mkldnn.is_available(), reason="PyTorch built without oneDNN")


@mkldnn
@pytest.mark.parametrize("native_below", NATIVE_BELOW)
@pytest.mark.parametrize("momentum", [0.1, None])
def test_mkldnn_input_is_normalised_as_torch_nn_does(monkeypatch, native_below, momentum):
    """torch.nn's BatchNorm2d takes an oneDNN (``x.to_mkldnn()``) input, in training and
    eval mode, and gives one back (autograd included); numbabn refused it as not dense.
    Its layers hand it to PyTorch's op, as they do a device they have no kernels for."""
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", native_below)
    torch.manual_seed(0)
    ours, theirs = nbt.BatchNorm2d(3, momentum=momentum), torch.nn.BatchNorm2d(3, momentum=momentum)
    for step in range(3):
        x = torch.randn(4, 3, 5, 5) * (step + 1) + step
        xa = x.to_mkldnn().requires_grad_()
        xb = x.to_mkldnn().requires_grad_()
        ya, yb = ours(xa), theirs(xb)
        assert ya.layout == yb.layout == torch._mkldnn
        torch.testing.assert_close(ya.to_dense(), yb.to_dense())
        ya.to_dense().square().sum().backward()
        yb.to_dense().square().sum().backward()
        torch.testing.assert_close(xa.grad.to_dense(), xb.grad.to_dense())
        for (n, a), b in zip(ours.state_dict().items(), theirs.state_dict().values(), strict=True):
            torch.testing.assert_close(a, b, msg=n)
        torch.testing.assert_close(ours.weight.grad, theirs.weight.grad)
    ours.eval(), theirs.eval()
    x = torch.randn(4, 3, 5, 5).to_mkldnn()
    torch.testing.assert_close(ours(x).to_dense(), theirs(x).to_dense())


@mkldnn
def test_mkldnn_input_with_a_residual():
    """A residual of the input's layout is added as ``bn(x) + residual`` is in torch.nn
    (oneDNN adds two oneDNN tensors); a dense residual to an oneDNN input, which that
    addition would refuse after the running statistics were updated, is refused
    before anything changes."""
    torch.manual_seed(1)
    ours, theirs = nbt.BatchNorm2d(3, activation="relu"), torch.nn.BatchNorm2d(3)
    x, r = torch.randn(4, 3, 5, 5), torch.randn(4, 3, 5, 5)
    y = ours(x.to_mkldnn(), r.to_mkldnn())
    torch.testing.assert_close(y.to_dense(), torch.relu(theirs(x) + r))
    before = _snapshot(ours)
    with pytest.raises(TypeError, match="layout"):
        ours(x.to_mkldnn(), r)
    _assert_unchanged(ours, before)


@pytest.mark.parametrize("name, shape", [("BatchNorm1d", (2, 0)), ("BatchNorm2d", (2, 0, 3, 3))])
def test_a_layer_without_channels_raises_torch_nns_error_and_changes_nothing(name, shape):
    """``num_features=0``: torch.nn's op raises an IndexError (after torch.nn counted
    the batch); numbabn raises the same and, by its rule, leaves the counter alone."""
    x = torch.zeros(shape)
    with pytest.raises(IndexError):
        getattr(torch.nn, name)(0)(x)
    ours = getattr(nbt, name)(0)
    with pytest.raises(IndexError):
        ours(x)
    assert int(ours.num_batches_tracked) == 0
