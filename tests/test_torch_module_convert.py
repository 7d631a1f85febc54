"""convert_batchnorm and fold_batchnorm on ResNets built here (no weights download).

``TorchvisionResNet`` copies torchvision's BasicBlock structure (attributes conv1,
bn1, relu, conv2, bn2, downsample; the ReLU called in ``forward``) at a small size;
:func:`numbabn.torch.resnet.resnet18` has its conv-BN-ReLU in Sequentials, which is
what ``fuse_relu`` can fold.
"""

import copy

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
from torch import nn  # noqa: E402

import numbabn.torch as nbt  # noqa: E402
from numbabn.torch.resnet import resnet18  # noqa: E402


class BasicBlock(nn.Module):
    def __init__(self, cin, cout, stride=1):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(cout)
        self.downsample = None
        if stride != 1 or cin != cout:
            self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        return self.relu(self.bn2(self.conv2(out)) + identity)


class TorchvisionResNet(nn.Module):
    def __init__(self, widths=(8, 16), num_classes=5):
        super().__init__()
        self.conv1 = nn.Conv2d(3, widths[0], 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(widths[0])
        self.relu = nn.ReLU(inplace=True)
        blocks, cin = [], widths[0]
        for i, w in enumerate(widths):
            blocks.append(nn.Sequential(BasicBlock(cin, w, 2 if i else 1), BasicBlock(w, w)))
            cin = w
        self.layers = nn.Sequential(*blocks)
        self.fc = nn.Linear(cin, num_classes)

    def forward(self, x):
        x = self.layers(self.relu(self.bn1(self.conv1(x))))
        return self.fc(torch.flatten(nn.functional.adaptive_avg_pool2d(x, 1), 1))


def bn_types(model):
    return [type(m) for m in model.modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]


def train_side_by_side(a, b, steps=3, shape=(6, 3, 12, 12), fmt=None):
    """SGD steps on both models with the same batches; per step compare the loss, every
    gradient and the state after the update (parameters, running statistics), then
    give ``a`` b's state and momentum, so that the next step again compares the two at
    one point; finally the eval outputs.

    Why the resynchronisation: a deep network at random initialisation amplifies
    float32 rounding. On ResNet-18 at batch 4, 16x16 after one SGD step (lr 0.05,
    momentum 0.9), torch.nn against itself with its parameters perturbed by 3e-6 of
    their scale (the spread of two correct float32 implementations after a step) gave
    step-1 gradients up to 87x outside the tolerances below, so free-running
    trajectories pass or fail with the machine's rounding, not with the code."""
    oa = torch.optim.SGD(a.parameters(), lr=0.05, momentum=0.9)
    ob = torch.optim.SGD(b.parameters(), lr=0.05, momentum=0.9)
    g = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randn(shape, generator=g)
        x = x.to(memory_format=fmt) if fmt else x
        t = torch.randint(0, 5, (shape[0],), generator=g)
        la = nn.functional.cross_entropy(a(x), t)
        lb = nn.functional.cross_entropy(b(x), t)
        torch.testing.assert_close(la, lb, rtol=1e-4, atol=1e-5)
        la.backward(), lb.backward()
        for (name, p), q in zip(a.named_parameters(), b.parameters(), strict=True):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-3, atol=1e-4, msg=f"{name}.grad step {step}")
        oa.step(), ob.step(), oa.zero_grad(), ob.zero_grad()
        for (name, v), w in zip(a.state_dict().items(), b.state_dict().values(), strict=True):
            torch.testing.assert_close(v, w, rtol=1e-3, atol=1e-4, msg=f"{name} step {step}")
        a.load_state_dict(b.state_dict())
        for p, q in zip(a.parameters(), b.parameters(), strict=True):
            oa.state[p]["momentum_buffer"].copy_(ob.state[q]["momentum_buffer"])
    a.eval(), b.eval()
    x = torch.randn(shape, generator=g)
    torch.testing.assert_close(a(x), b(x), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("fmt", [None, torch.channels_last])
def test_converted_torchvision_resnet_trains_like_the_original(fmt):
    torch.manual_seed(0)
    original = TorchvisionResNet()
    if fmt:
        original = original.to(memory_format=fmt)
    converted = copy.deepcopy(original)
    params_before = [id(p) for p in converted.parameters()]
    keys_before = list(converted.state_dict())
    assert nbt.convert_batchnorm(converted) is converted
    assert bn_types(converted) == [nbt.BatchNorm2d] * len(bn_types(original)) == [nbt.BatchNorm2d] * 10
    assert [id(p) for p in converted.parameters()] == params_before  # same Parameter objects
    assert list(converted.state_dict()) == keys_before
    assert converted.relu.__class__ is nn.ReLU  # called in forward: cannot be fused, left alone
    train_side_by_side(converted, original, fmt=fmt)


def test_optimizer_built_before_conversion_keeps_working():
    torch.manual_seed(1)
    model = TorchvisionResNet()
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    nbt.convert_batchnorm(model)
    before = model.bn1.weight.detach().clone()
    nn.functional.cross_entropy(model(torch.randn(4, 3, 8, 8)), torch.tensor([0, 1, 2, 3])).backward()
    opt.step()
    assert not torch.equal(model.bn1.weight, before)


def test_fuse_relu_folds_the_sequential_relus_and_changes_nothing_else():
    torch.manual_seed(2)
    original = resnet18(num_classes=5)
    fused = nbt.convert_batchnorm(copy.deepcopy(original), fuse_relu=True)
    assert sum(getattr(m, "activation", None) == "relu" for m in fused.modules()) == 9
    assert not any(type(m) is nn.ReLU for m in fused.modules())
    assert list(fused.state_dict()) == list(original.state_dict())
    train_side_by_side(fused, original, steps=2, shape=(4, 3, 16, 16))


def _fused_pair():
    """A conv/BN/ReLU Sequential with trained running statistics, and its copy after
    convert_batchnorm(fuse_relu=True)."""
    torch.manual_seed(6)
    original = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.ReLU(inplace=True), nn.Conv2d(4, 2, 1))
    original(torch.randn(8, 3, 6, 6))
    fused = nbt.convert_batchnorm(copy.deepcopy(original), fuse_relu=True)
    assert type(fused[2]) is nbt.FusedReLU and fused[2].inplace and fused[1].activation == "relu"
    return original, fused


@pytest.mark.parametrize("training", [True, False])
def test_fused_relu_survives_torch_sync_batchnorm_conversion(training):
    """PyTorch's convert_sync_batchnorm swaps the fused batch norm for its own, which
    knows nothing of activation=: the FusedReLU left in the ReLU's place then
    rectifies again. Before, the ReLU was an Identity and silently vanished."""
    original, fused = _fused_pair()
    torch_synced = nn.SyncBatchNorm.convert_sync_batchnorm(copy.deepcopy(fused))
    assert type(torch_synced[1]) is nn.SyncBatchNorm  # one process: plain batch norm
    for model in (original, torch_synced):
        model.train(training)
    x = torch.randn(4, 3, 6, 6)
    torch.testing.assert_close(torch_synced(x), original(x), rtol=0, atol=0)


def test_fused_relu_passes_exactly_the_fused_output_through():
    original, fused = _fused_pair()
    x = torch.randn(4, 3, 6, 6)
    y = fused[1](fused[0](x))
    assert fused[2](y) is y  # the batch norm's own output: no second pass
    assert torch.equal(fused[2](y.clone()), y)  # a copy is rectified again: the same values
    z = y.clone() - 1
    assert torch.equal(fused[2](z.clone()), torch.relu(z))  # anything else is rectified
    y.sub_(1)  # changed in place since the batch norm wrote it
    assert torch.equal(fused[2](y), torch.relu(z))
    torch.testing.assert_close(fused(x), original(x), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("training", [False, True])
def test_fused_model_runs_under_inference_mode(training):
    """``torch.inference_mode()`` outputs have no version counter: the fused batch
    norm used to raise reading it ("Inference tensors do not track version
    counter"); now the FusedReLU rectifies them again, with torch's results."""
    original, fused = _fused_pair()
    original.train(training), fused.train(training)
    x = torch.randn(4, 3, 6, 6)
    with torch.inference_mode():
        y, expected = fused(x), original(x)
    assert y.is_inference()
    torch.testing.assert_close(y, expected, rtol=1e-5, atol=1e-5)
    for (name, a), b in zip(fused.state_dict().items(), original.state_dict().values(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7, msg=name)
    y = fused[1](fused[0](x))  # outside inference mode the pass-through works again
    assert fused[2](y) is y


def test_fused_model_pickles_copies_and_compiles(tmp_path):
    original, fused = _fused_pair()
    torch.save(fused, tmp_path / "fused.pt")
    for model in (torch.load(tmp_path / "fused.pt", weights_only=False), copy.deepcopy(fused)):
        assert type(model[2]) is nbt.FusedReLU and model[1]._feeds_fused_relu
        x = torch.randn(4, 3, 6, 6)
        y = model[1](model[0](x))
        assert model[2](y) is y
        assert torch.equal(model(x), fused(x))
    compiled = torch.compile(fused, backend="eager")
    x = torch.randn(4, 3, 6, 6)
    assert torch.equal(compiled(x), fused(x))


def test_sync_conversion_and_back_from_torch_sync_batch_norm():
    torch.manual_seed(3)
    model = TorchvisionResNet()
    synced = nbt.convert_batchnorm(copy.deepcopy(model), sync=True)
    assert set(bn_types(synced)) == {nbt.SyncBatchNorm}
    train_side_by_side(synced, model, steps=2)  # one process: plain batch norm
    group = object()
    torch_sync = nn.SyncBatchNorm.convert_sync_batchnorm(TorchvisionResNet(), process_group=group)
    ours = nbt.convert_batchnorm(torch_sync)
    assert set(bn_types(ours)) == {nbt.SyncBatchNorm}
    assert all(m.process_group is group for m in ours.modules() if isinstance(m, nbt.SyncBatchNorm))
    # sync=True with a process_group regroups numbabn's own SyncBatchNorms too, as
    # torch.nn.SyncBatchNorm.convert_sync_batchnorm regroups its own (they kept theirs)
    other = object()
    regrouped = nbt.convert_batchnorm(ours, sync=True, process_group=other)
    layers = [m for m in regrouped.modules() if isinstance(m, nbt.SyncBatchNorm)]
    assert layers and all(m.process_group is other for m in layers)
    assert nn.SyncBatchNorm.convert_sync_batchnorm(torch_sync, process_group=other) is not None
    assert all(m.process_group is other for m in torch_sync.modules() if isinstance(m, nn.SyncBatchNorm))


def test_a_batch_norm_root_is_returned_converted():
    bn = nn.BatchNorm1d(4, momentum=None, affine=False).eval()
    new = nbt.convert_batchnorm(bn, fuse_relu=True)
    assert type(new) is nbt.BatchNorm1d and not new.training and new.momentum is None and new.weight is None
    assert new.running_mean is bn.running_mean
    with pytest.raises(TypeError, match="convert_batchnorm: module must be a torch.nn.Module, got int"):
        nbt.convert_batchnorm(3)


@pytest.mark.parametrize("activation", [None, "relu"])
def test_fold_batchnorm_gives_the_same_outputs(activation):
    torch.manual_seed(4)
    model = nn.Sequential(
        nn.Conv2d(3, 6, 3, bias=False),
        nbt.BatchNorm2d(6, activation=activation),
        nn.Flatten(),
        nn.Linear(6 * 4 * 4, 5),
        nn.BatchNorm1d(5),
    )
    for _ in range(3):
        model(torch.randn(8, 3, 6, 6) * 2 + 1)
    with torch.no_grad():
        model[1].weight.uniform_(0.5, 1.5), model[4].bias.uniform_(-1, 1)
    model.eval()
    x = torch.randn(4, 3, 6, 6)
    expected = model(x)
    nbt.fold_batchnorm(model)
    assert type(model[1]) is (nn.ReLU if activation else nn.Identity) and type(model[4]) is nn.Identity
    torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


def test_fold_batchnorm_refuses_training_mode_and_changes_nothing():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4), nn.Linear(4, 2), nn.BatchNorm1d(2))
    model[1].eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="index 3 .* eval mode"):
        nbt.fold_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm1d
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fold_batchnorm_refuses_a_batch_norm_without_running_statistics():
    model = nn.Sequential(nn.Linear(3, 4), nn.BatchNorm1d(4, track_running_stats=False)).eval()
    with pytest.raises(ValueError, match="index 1 .* no running statistics .*track_running_stats=False") as info:
        nbt.fold_batchnorm(model)
    assert "eval()" not in str(info.value)  # already in eval mode: not the advice to give
    assert type(model[1]) is nn.BatchNorm1d


@pytest.mark.parametrize("tie", ["weight", "bias", "weight view"])
def test_fold_batchnorm_refuses_weights_tied_to_another_module_and_changes_nothing(tie):
    """Folding rescales the layer's weight in place: a weight tied to a layer that no
    batch norm follows was rescaled there too (outputs 0.07 off at 0.8), and one tied
    between two folded layers was rescaled twice."""
    torch.manual_seed(3)
    c1, c2 = nn.Conv2d(4, 4, 1), nn.Conv2d(4, 4, 1)
    if tie == "weight":
        c2.weight = c1.weight
    elif tie == "bias":
        c2.bias = c1.bias
    else:
        c2.weight = nn.Parameter(c1.weight.detach()[:, :])  # another Parameter on the same memory
    model = nn.Sequential(c1, nn.BatchNorm2d(4), nn.ReLU(), c2)
    model(torch.randn(8, 4, 3, 3))
    model.eval()
    before = copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match=f"the {tie.split()[0]} of the Conv2d at index 0 .*tied"):
        nbt.fold_batchnorm(model)
    assert type(model[1]) is nn.BatchNorm2d
    for k, v in model.state_dict().items():
        assert torch.equal(v, before[k]), k


def test_fold_batchnorm_on_the_meta_device_folds_and_still_sees_ties():
    """Meta tensors have no memory (address 0): keyed by address, every parameter
    looked tied to every other, and no meta model could be folded."""
    with torch.device("meta"):
        model = nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4), nn.Conv2d(4, 5, 3), nn.BatchNorm2d(5)).eval()
        tied = nn.Sequential(nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4), nn.Conv2d(4, 4, 1)).eval()
    tied[2].weight = tied[0].weight
    nbt.fold_batchnorm(model)
    assert [type(m) for m in model] == [nn.Conv2d, nn.Identity, nn.Conv2d, nn.Identity]
    with pytest.raises(ValueError, match="tied"):
        nbt.fold_batchnorm(tied)


def test_fuse_relu_keeps_the_relus_mode():
    model = nn.Sequential(nn.Conv2d(3, 4, 1), nn.BatchNorm2d(4), nn.ReLU()).eval()
    nbt.convert_batchnorm(model, fuse_relu=True)
    assert type(model[2]) is nbt.FusedReLU
    assert not any(m.training for m in model.modules())


def test_fold_batchnorm_removes_every_batch_norm_of_the_resnet():
    torch.manual_seed(5)
    model = nbt.convert_batchnorm(resnet18(num_classes=5), fuse_relu=True)
    with torch.no_grad():
        for _ in range(3):
            model(torch.randn(8, 3, 16, 16) * 2 + 1)
    model.eval()
    x = torch.randn(4, 3, 16, 16)
    expected = model(x)
    nbt.fold_batchnorm(model)
    assert bn_types(model) == []
    assert sum(type(m) is nn.ReLU for m in model.modules()) == 9  # the fused ReLUs come back
    torch.testing.assert_close(model(x), expected, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("make", [nn.BatchNorm2d, nbt.BatchNorm2d])
def test_a_batch_norm_used_twice_is_converted_everywhere_and_fused_only_where_a_relu_follows(make):
    """A batch norm used twice in one Sequential: its second entry used to stay
    torch.nn's (``named_children`` yields a module once), and a numbabn one, fused for
    the ReLU after its first use, rectified its second use's output too."""
    torch.manual_seed(7)
    bn = make(4)
    with torch.no_grad():
        bn.bias.uniform_(-1, 1)
    head = nn.Sequential(nn.Flatten(), nn.Linear(36, 5))
    original = nn.Sequential(nn.Conv2d(4, 4, 1), bn, nn.ReLU(), nn.Conv2d(4, 4, 1), bn, head)
    other = nn.Sequential(nn.Sequential(nn.Conv2d(4, 4, 1), bn, nn.ReLU()), nn.Sequential(nn.Conv2d(4, 4, 1), bn), head)
    for model in (original, other):
        converted = nbt.convert_batchnorm(copy.deepcopy(model), fuse_relu=True)
        assert set(bn_types(converted)) == {nbt.BatchNorm2d}
        assert all(m.activation is None for m in converted.modules() if isinstance(m, nbt.BatchNorm2d))
        train_side_by_side(converted, model, steps=2, shape=(4, 4, 3, 3))
    shared = nbt.convert_batchnorm(copy.deepcopy(original))
    assert shared[1] is shared[4]  # still one module, as in the original


def test_fold_batchnorm_folds_a_shared_layer_once_and_only_where_its_batch_norm_follows_everywhere():
    """A conv and batch norm used twice in one Sequential were folded twice (the
    weights scaled twice); a conv also used without the batch norm after it had its
    other use changed too."""
    torch.manual_seed(8)
    conv, bn = nn.Conv2d(4, 4, 1), nn.BatchNorm2d(4)
    with torch.no_grad():
        bn.running_mean.uniform_(-1, 1), bn.running_var.uniform_(0.5, 2), bn.weight.uniform_(0.5, 1.5)
    twice = nn.Sequential(conv, bn, nn.ReLU(), conv, bn).eval()
    elsewhere = nn.Sequential(nn.Sequential(conv, bn), nn.Sequential(conv, nn.ReLU())).eval()
    x = torch.randn(2, 4, 3, 3)
    for model, folded_bns in ((twice, 0), (elsewhere, 1)):
        model = copy.deepcopy(model)
        expected = model(x)
        nbt.fold_batchnorm(model)
        assert len(bn_types(model)) == folded_bns
        torch.testing.assert_close(model(x), expected, rtol=1e-5, atol=1e-5)


@pytest.mark.filterwarnings("ignore::FutureWarning")  # torch.nn.utils.weight_norm is deprecated
@pytest.mark.parametrize("how", ["weight_norm", "spectral_norm", "hook on the batch norm"])
def test_fold_refuses_computed_weights_and_hooks_and_changes_nothing(how):
    """The hook-based weight_norm/spectral_norm rebuild the weight before each call,
    which undid the fold's scale and kept its shift (errors of 4 and 2000); a hook on
    the batch norm would be lost with it."""
    torch.manual_seed(0)
    conv = torch.nn.Conv2d(3, 4, 3)
    if how == "weight_norm":
        conv = torch.nn.utils.weight_norm(conv)
    elif how == "spectral_norm":
        conv = torch.nn.utils.spectral_norm(conv)
    model = torch.nn.Sequential(conv, nbt.BatchNorm2d(4))
    if how == "hook on the batch norm":
        model[1].register_forward_hook(lambda m, i, o: o * 2)
    model(torch.randn(8, 3, 6, 6))
    model.eval()
    x = torch.randn(2, 3, 6, 6)
    before, state = model(x), copy.deepcopy(model.state_dict())
    with pytest.raises(ValueError, match="forward hooks or a computed weight .* nothing was folded"):
        nbt.fold_batchnorm(model)
    assert isinstance(model[1], nbt.BatchNorm2d)
    for k, v in model.state_dict().items():
        assert torch.equal(v, state[k]), k
    torch.testing.assert_close(model(x), before, rtol=0, atol=0)


def test_convert_refuses_a_parametrized_batch_norm_before_changing_anything():
    """It raised from the middle of the model, with the batch norms before it already
    replaced."""
    first, second = torch.nn.BatchNorm2d(4), torch.nn.BatchNorm2d(4)

    class Positive(torch.nn.Module):
        def forward(self, w):
            return w.abs()

    torch.nn.utils.parametrize.register_parametrization(second, "weight", Positive())
    model = torch.nn.Sequential(first, torch.nn.ReLU(), second)
    with pytest.raises(TypeError, match="'2' has parametrized parameters .* nothing was converted"):
        nbt.convert_batchnorm(model, fuse_relu=True)
    assert model[0] is first and model[2] is second and isinstance(model[1], torch.nn.ReLU)
