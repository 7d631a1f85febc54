"""convert_batchnorm, fold_batchnorm, fuse_residual and SyncBatchNorm as a PyTorch
user combines them. A test whose docstring says what happened before failed before
its fix; the last parity test covers convolutions the other files do not (1-D and
3-D, groups, dilation, padding modes, float64)."""

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
from torch import nn  # noqa: E402

import numbabn.torch as nbt  # noqa: E402
from numbabn.torch.resnet import fuse_residual, resnet18  # noqa: E402


def _trained_resnet():
    """numbabn's ResNet-18, converted with fuse_relu, with running statistics of a
    few batches, in eval mode."""
    torch.manual_seed(0)
    model = nbt.convert_batchnorm(resnet18(num_classes=5), fuse_relu=True)
    with torch.no_grad():
        for _ in range(2):
            model(torch.randn(4, 3, 8, 8) * 2 + 1)
    return model.eval()


def test_sync_conversion_keeps_a_fused_residual():
    """convert_batchnorm(sync=True) built the SyncBatchNorm without ``fuses_residual``
    but with ``activation="relu"``: the block then computed relu(relu(bn(x)) + shortcut)."""
    model = fuse_residual(_trained_resnet())
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    synced = nbt.convert_batchnorm(model, sync=True)
    last = [block.branch[-1] for block in synced.modules() if hasattr(block, "shortcut")]
    assert len(last) == 8 and all(type(bn) is nbt.SyncBatchNorm and bn.fuses_residual for bn in last)
    torch.testing.assert_close(synced(x), expected, rtol=0, atol=0)


def test_fold_batchnorm_after_fuse_residual_gives_the_same_outputs():
    """A fused-residual batch norm (activation="relu") was folded into a ``ReLU``
    inside the block's branch, and the block added the shortcut after it:
    relu(relu(conv(x)) + shortcut)."""
    model = fuse_residual(_trained_resnet())
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    nbt.fold_batchnorm(model)
    assert not any(isinstance(m, nn.modules.batchnorm._BatchNorm) for m in model.modules())
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


def test_fold_batchnorm_keeps_the_models_mode():
    """The Identity and ReLU put in the batch norms' places were in training mode in
    an eval-mode model (torch.ao.quantization.fuse_modules keeps the mode)."""
    model = nn.Sequential(
        nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU(), nn.Flatten(), nn.Linear(4, 4), nn.BatchNorm1d(4)
    )
    model = nbt.convert_batchnorm(model, fuse_relu=True).eval()
    nbt.fold_batchnorm(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.ReLU, nn.Identity, nn.Flatten, nn.Linear, nn.Identity]
    assert not any(m.training for m in model.modules())


@pytest.mark.parametrize("frozen", [True, False])
def test_fold_batchnorm_gives_a_new_bias_the_weights_requires_grad(frozen):
    """A layer without bias got a new bias that required grad even when the layer's
    weight was frozen: an optimizer over ``p.requires_grad`` then trained it."""
    model = nn.Sequential(nn.Conv2d(3, 4, 1, bias=False), nn.BatchNorm2d(4)).eval()
    model[0].weight.requires_grad_(not frozen)
    nbt.fold_batchnorm(model)
    assert isinstance(model[0].bias, nn.Parameter) and model[0].bias.requires_grad is not frozen


def test_fold_batchnorm_refuses_what_is_not_a_module():
    """It raised AttributeError: 'int' object has no attribute 'modules'."""
    with pytest.raises(TypeError, match="fold_batchnorm: module must be a torch.nn.Module, got int"):
        nbt.fold_batchnorm(3)


def test_convert_refuses_an_invalid_activation_before_changing_anything():
    """A numbabn batch norm whose activation was set to something else after
    construction raised from the middle of the model, the batch norms before it
    already replaced."""
    first, second = nn.BatchNorm2d(4), nbt.BatchNorm2d(4)
    second.activation = "gelu"
    model = nn.Sequential(first, nn.ReLU(), second)
    with pytest.raises(ValueError, match="'2' has activation 'gelu'; expected None or 'relu'.*nothing was converted"):
        nbt.convert_batchnorm(model, sync=True)
    assert model[0] is first and model[2] is second


def test_fuse_residual_twice_changes_nothing_more():
    """A second call raised TypeError advising to run convert_batchnorm first."""
    model = fuse_residual(_trained_resnet())
    x = torch.randn(2, 3, 8, 8)
    expected = model(x)
    assert fuse_residual(model) is model
    torch.testing.assert_close(model(x), expected, rtol=0, atol=0)


def test_sync_batch_norm_refuses_zero_channels_and_changes_nothing():
    """PyTorch's op raised IndexError after the batch count had been incremented;
    torch.nn.SyncBatchNorm raises this ValueError first."""
    bn = nbt.SyncBatchNorm(0)
    with pytest.raises(ValueError, match="SyncBatchNorm: number of input channels should be non-zero"):
        bn(torch.randn(4, 0, 3))
    assert int(bn.num_batches_tracked) == 0


def test_sync_batch_norm_in_one_process_names_itself_for_one_value_per_channel():
    """The error came from the kernel, named batch_norm_forward, where the plain
    layers name themselves."""
    bn = nbt.SyncBatchNorm(3)
    with pytest.raises(ValueError, match="^SyncBatchNorm: Expected more than 1 value per channel when training"):
        bn(torch.randn(1, 3))
    assert int(bn.num_batches_tracked) == 0


@pytest.mark.parametrize(
    "make, shape",
    [
        (lambda: nn.Conv1d(4, 6, 3, stride=2, dilation=2, padding=2, padding_mode="reflect"), (2, 4, 20)),
        (lambda: nn.Conv2d(4, 6, 3, groups=2, bias=False), (2, 4, 7, 7)),
        (lambda: nn.Conv3d(4, 6, 3, padding=1, padding_mode="circular"), (2, 4, 4, 4, 4)),
        (lambda: nn.Linear(4, 6, dtype=torch.float64), (5, 4)),
    ],
)
def test_fold_batchnorm_matches_the_unfused_model(make, shape):
    torch.manual_seed(9)
    layer = make()
    dtype = layer.weight.dtype
    bn = {2: nn.BatchNorm1d, 3: nn.BatchNorm1d, 4: nn.BatchNorm2d, 5: nn.BatchNorm3d}[len(shape)](6, dtype=dtype)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2)
        bn.weight.uniform_(0.5, 1.5), bn.bias.uniform_(-1, 1)
    model = nbt.convert_batchnorm(nn.Sequential(layer, bn)).eval()
    x = torch.randn(shape, dtype=dtype)
    expected = model(x)
    nbt.fold_batchnorm(model)
    assert type(model[1]) is nn.Identity
    torch.testing.assert_close(model(x), expected)


def test_fold_batchnorm_with_an_uninitialized_lazy_module_in_the_model():
    """Looking for tied weights read the size of every parameter of the model: an
    uninitialized LazyLinear elsewhere, or a LazyBatchNorm2d after a conv, made the
    fold raise PyTorch's "Attempted to use an uninitialized parameter"."""
    torch.manual_seed(10)
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.Flatten(), nn.LazyLinear(5)).eval()
    with torch.no_grad():
        model[1].running_mean.uniform_(-1, 1), model[1].running_var.uniform_(0.5, 2)
    x = torch.randn(2, 3, 1, 1)
    expected = model[:2](x)
    nbt.fold_batchnorm(model)
    assert type(model[1]) is nn.Identity
    torch.testing.assert_close(model[:2](x), expected)
    lazy = nn.Sequential(nn.Conv2d(3, 4, 1), nn.LazyBatchNorm2d()).eval()
    weight = lazy[0].weight.detach().clone()
    nbt.fold_batchnorm(lazy)  # no statistics yet: left as it is, as convert_batchnorm leaves it
    assert type(lazy[1]) is nn.LazyBatchNorm2d and torch.equal(lazy[0].weight, weight)


def test_fold_batchnorm_errors_say_where_the_batch_norm_is():
    """They said "at index 1 of a Sequential", which in a ResNet matches twenty."""
    model = _trained_resnet()
    model[4].branch[4].train()
    with pytest.raises(ValueError, match=r"at index 4 of a Sequential \('4.branch.4'\) must be in eval mode"):
        nbt.fold_batchnorm(model)


def test_sync_batchnorm_has_torchs_convert_classmethod() -> None:
    """``nbt.SyncBatchNorm.convert_sync_batchnorm(model)``, the call PyTorch users make,
    converts as ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does (same places,
    same parameter objects, mode kept), to numbabn's layer."""
    torch.manual_seed(0)

    def model() -> torch.nn.Module:
        torch.manual_seed(0)
        inner = torch.nn.Sequential(torch.nn.Conv2d(4, 4, 1), torch.nn.BatchNorm2d(4))
        return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(), inner)

    ours, theirs = model(), model()
    ours.eval()
    theirs.eval()
    weight = ours[1].weight
    out = nbt.SyncBatchNorm.convert_sync_batchnorm(ours, process_group=None)
    ref = torch.nn.SyncBatchNorm.convert_sync_batchnorm(theirs)
    assert out is ours
    kinds = [type(m).__name__ for m in out.modules()]
    assert kinds == [type(m).__name__ for m in ref.modules()]
    assert [type(m) for m in out.modules() if "Norm" in type(m).__name__] == [nbt.SyncBatchNorm] * 2
    assert out[1].weight is weight and not out[1].training
    x = torch.randn(2, 3, 8, 8)
    torch.testing.assert_close(out(x), ref(x))
    assert isinstance(nbt.SyncBatchNorm.convert_sync_batchnorm(torch.nn.BatchNorm1d(3)), nbt.SyncBatchNorm)
