"""torch.nn behaviours of the layers that need no PyTorch to check (issue 12):
``track_running_stats`` switched after construction in every batch-norm variant,
empty batches, BatchNorm3d, InstanceNorm, LayerNorm shapes, reset methods and
pickles. (Against PyTorch itself: tests/test_torch_semantics.py; for every
registered layer: tests/test_layer_contract.py.)"""

import copy
import io
import pickle

import joblib
import numpy as np
import pytest
from numbabn_plugins.batch_renorm import BatchRenorm
from numbabn_plugins.ghost_batch_norm import GhostBatchNorm
from numbabn_plugins.instance_norm import InstanceNorm1d, InstanceNorm2d
from numbabn_plugins.lp_batch_norm import LpBatchNorm
from numbabn_plugins.noisy_batch_norm import NoisyBatchNorm
from numbabn_plugins.per_sample_norm import GroupNorm, LayerNorm

import numbabn
from numbabn.distributed import SyncBatchNorm1d
from numbabn.layers import BatchNorm1d, BatchNorm3d, Linear, Sequential

F64 = dict(rtol=1e-10, atol=1e-12)


class MirrorComm:
    """Two ranks holding identical data (Allgather repeats this rank's buffer)."""

    def Get_rank(self):
        return 0

    def Get_size(self):
        return 2

    def Allgather(self, send, recv):
        recv[...] = send


def buffers(layer):
    return {k: v.copy() for k, v in layer.named_buffers()}


def assert_buffers(layer, saved):
    for key, value in layer.named_buffers():
        np.testing.assert_array_equal(value, saved[key], err_msg=key)


def test_issue_example_eval_with_tracking_switched_off_changes_nothing(rng):
    x = rng.standard_normal((8, 4)).astype(np.float32) * 2 + 1
    bn = BatchNorm1d(4)
    bn.forward(x)
    saved = buffers(bn)
    bn.track_running_stats = False
    bn.eval()
    y = bn.forward(x)
    assert_buffers(bn, saved)
    expected = (x - bn.running_mean) / np.sqrt(bn.running_var + 1e-5)
    np.testing.assert_allclose(y, expected, rtol=1e-5, atol=1e-6)


VARIANTS = [
    lambda: BatchNorm1d(3, dtype=np.float64),
    lambda: GhostBatchNorm(3, virtual_batch_size=4, dtype=np.float64),
    lambda: BatchRenorm(3, dtype=np.float64, relax_from=0, rmax_until=0, dmax_until=0),
    lambda: LpBatchNorm(3, p=1, dtype=np.float64),
    lambda: NoisyBatchNorm(3, dtype=np.float64, rng=np.random.default_rng(0)),
    lambda: InstanceNorm1d(3, affine=True, track_running_stats=True, dtype=np.float64),
    lambda: SyncBatchNorm1d(3, dtype=np.float64, comm=MirrorComm()),
]


@pytest.mark.parametrize("make", VARIANTS)
def test_switching_tracking_off_freezes_the_running_statistics(rng, make):
    """Every variant: off -> training leaves buffers and counter alone, eval reads the
    frozen buffers and changes nothing; on again -> training moves them again."""
    layer = make()
    x = rng.standard_normal((8, 3, 2)) * 2 + 1
    layer.forward(x)
    reference = copy.deepcopy(layer).eval()
    if isinstance(layer, InstanceNorm1d):  # torch.nn.InstanceNorm: flag off -> instance statistics
        reference.track_running_stats = False
    saved = buffers(layer)
    layer.track_running_stats = False
    layer.forward(x + 1)
    assert_buffers(layer, saved)
    y = layer.eval().forward(x)
    assert_buffers(layer, saved)
    np.testing.assert_allclose(y, reference.forward(x), **F64)  # BN: the frozen running statistics
    layer.track_running_stats = True
    layer.train().forward(x)
    assert any(not np.array_equal(v, saved[k]) for k, v in layer.named_buffers())


@pytest.mark.parametrize("make", VARIANTS)
def test_empty_batches_keep_the_running_statistics_and_count_once(rng, make):
    layer = make()
    layer.forward(rng.standard_normal((6, 3, 2)))
    saved = buffers(layer)
    x0 = np.zeros((0, 3, 2))
    y = layer.forward(x0)
    assert y.shape == x0.shape
    assert layer.backward(np.zeros_like(y)).shape == x0.shape
    assert all(np.all(p.grad == 0) for p in layer.parameters())
    for key, value in layer.named_buffers():
        expected = saved[key] + 1 if key == "num_batches_tracked" else saved[key]
        np.testing.assert_array_equal(value, expected, err_msg=key)
    layer.eval().forward(x0)
    assert int(layer.num_batches_tracked) == int(saved["num_batches_tracked"]) + 1


def test_empty_batches_in_the_functional_api_run_no_pass_over_data(rng, monkeypatch):
    from numbabn.kernels import cpu_driver

    def boom(*args):
        raise AssertionError("a pass over data ran on an empty input")

    monkeypatch.setattr(cpu_driver._threads, "parallel_for", boom)  # every data pass goes through it
    rm, rv, nbt = np.zeros(3), np.ones(3), np.zeros((), np.int64)
    for shape in [(0, 3), (0, 3, 4), (4, 3, 0), (2, 0, 5, 3)]:
        axis = 1 if shape[1] == 3 else -1
        x = np.zeros(shape)
        for training in (True, False):
            y, ctx = numbabn.batch_norm_forward(
                x,
                np.ones(3),
                np.zeros(3),
                running_mean=rm,
                running_var=rv,
                num_batches_tracked=nbt,
                training=training,
                axis=axis,
            )
            dx, dg, db = numbabn.batch_norm_backward(np.zeros(shape), ctx)
            assert y.shape == dx.shape == shape and np.all(dg == 0) and np.all(db == 0)
        assert numbabn.moments(x, axis=axis).count == 0
    assert int(nbt) == 4 and np.all(rm == 0) and np.all(rv == 1)


def test_synchronized_empty_rank_updates_running_stats_like_the_kernels(rng):
    """A rank without rows (moments= of the other ranks' data) moves the running
    statistics bit for bit as a rank with rows does."""
    x = rng.standard_normal((6, 3, 4)) * 3 + 40
    for dtype in (np.float64, np.float32):
        merged = numbabn.moments(x.astype(dtype))
        states = []
        for local in (x.astype(dtype), x[:0].astype(dtype)):
            rm, rv, nbt = np.full(3, 0.5, dtype), np.full(3, 2.0, dtype), np.zeros((), np.int64)
            _, ctx = numbabn.batch_norm_forward(
                local, np.ones(3, dtype), running_mean=rm, running_var=rv, num_batches_tracked=nbt, moments=merged
            )
            _, dg, _ = numbabn.batch_norm_backward(np.ones_like(local), ctx, allreduce=lambda s: s + 1)
            states.append((rm, rv, ctx.mean, ctx.invstd, int(nbt)))
        for a, b in zip(*states, strict=True):
            np.testing.assert_array_equal(a, b)
    with pytest.raises(ValueError, match="Expected more than 1 value per channel"):
        numbabn.batch_norm_forward(x[:0], moments=numbabn.Moments(1, np.zeros(3), np.zeros(3)))
    y, ctx = numbabn.batch_norm_forward(x[:0], moments=numbabn.Moments.empty(3))  # empty everywhere
    assert y.shape == (0, 3, 4)


def test_one_value_per_channel_still_raises_in_training():
    for layer in (BatchNorm1d(3), GhostBatchNorm(3), BatchRenorm(3), LpBatchNorm(3), NoisyBatchNorm(3)):
        with pytest.raises(ValueError, match="more than 1"):
            layer.forward(np.ones((1, 3), np.float32))
    with pytest.raises(ValueError, match="Expected more than 1 spatial element when training"):
        InstanceNorm1d(3).forward(np.ones((4, 3, 1), np.float32))


# ---------------------------------------------------------------- BatchNorm3d, InstanceNorm, LayerNorm
def test_batchnorm3d_channels_last_equals_ncdhw(rng):
    x, dy = rng.standard_normal((3, 2, 3, 2, 4)), rng.standard_normal((3, 2, 3, 2, 4))
    ncdhw = BatchNorm3d(4, dtype=np.float64)._randomize_state(rng)
    ndhwc = BatchNorm3d(4, dtype=np.float64, channels_last=True)
    ndhwc.load_state_dict(ncdhw.state_dict())
    to_first = (0, 4, 1, 2, 3)
    np.testing.assert_allclose(ndhwc.forward(x).transpose(to_first), ncdhw.forward(x.transpose(to_first)), **F64)
    np.testing.assert_allclose(ndhwc.backward(dy).transpose(to_first), ncdhw.backward(dy.transpose(to_first)), **F64)
    np.testing.assert_allclose(ndhwc.weight.grad, ncdhw.weight.grad, **F64)
    np.testing.assert_allclose(ndhwc.running_var, ncdhw.running_var, **F64)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, D, H, W, 4\) \(channels_last\)"):
        ndhwc.forward(x[..., 0])
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 4, D, H, W\)"):
        ncdhw.forward(x)
    assert "channels_last=True" in repr(ndhwc) and isinstance(
        numbabn.registry.get_layer("batch_norm3d", 2), BatchNorm3d
    )


def test_instance_norm_formulas_and_running_statistics(rng):
    x = rng.standard_normal((4, 3, 6)) * 2 + 1
    layer = InstanceNorm1d(3, momentum=None, track_running_stats=True, dtype=np.float64)
    y = layer.forward(x)
    mu, var = x.mean(2, keepdims=True), x.var(2, keepdims=True)
    np.testing.assert_allclose(y, (x - mu) / np.sqrt(var + 1e-5), **F64)
    x2 = rng.standard_normal((2, 3, 5)) - 3
    layer.forward(x2)
    # cumulative average over the two steps of the per-step mean over samples
    np.testing.assert_allclose(layer.running_mean, (x.mean(2).mean(0) + x2.mean(2).mean(0)) / 2, **F64)
    np.testing.assert_allclose(layer.running_var, (x.var(2, ddof=1).mean(0) + x2.var(2, ddof=1).mean(0)) / 2, **F64)
    assert int(layer.num_batches_tracked) == 2
    saved = buffers(layer)
    layer.forward(np.zeros((0, 3, 5)))  # empty: kept, counted
    assert_buffers(layer, {**saved, "num_batches_tracked": saved["num_batches_tracked"] + 1})
    layer.eval()
    np.testing.assert_allclose(
        layer.forward(x), (x - layer.running_mean[:, None]) / np.sqrt(layer.running_var[:, None] + 1e-5), **F64
    )
    unbatched = InstanceNorm2d(2, dtype=np.float64)
    z = rng.standard_normal((2, 3, 4))
    np.testing.assert_allclose(unbatched.forward(z), unbatched.forward(z[None])[0], **F64)
    with pytest.raises(ValueError, match=r"expected input of shape \(N, 2, H, W\) or \(2, H, W\)"):
        unbatched.forward(z[None, None])
    assert InstanceNorm1d(3).state_dict() == {}


def test_layer_norm_on_an_empty_middle_dimension_and_single_values(rng):
    layer = LayerNorm(10)
    y = layer.forward(np.zeros((1, 0, 10), np.float32))  # was: "x has no channels"
    assert y.shape == (1, 0, 10)
    one = LayerNorm(1, dtype=np.float64)
    one.bias.value[...] = 0.25
    x = rng.standard_normal((5, 1))
    np.testing.assert_array_equal(one.forward(x), np.full((5, 1), 0.25))
    np.testing.assert_array_equal(one.backward(np.ones((5, 1))), np.zeros((5, 1)))
    assert one.bias.grad[0] == 5 and one.weight.grad[0] == 0
    single = GroupNorm(4, 4, dtype=np.float64)
    np.testing.assert_array_equal(single.forward(x.repeat(4, 1)), np.zeros((5, 4)))
    nobias = LayerNorm(3, bias=False)
    assert list(nobias.state_dict()) == ["weight"] and "bias=False" in repr(nobias)


# ---------------------------------------------------------------- reset methods
def test_reset_parameters_redraws_random_weights_from_the_layer_generator():
    a = Linear(30, 20, rng=np.random.default_rng(4), dtype=np.float64)
    w = a.weight.value
    first = w.copy()
    a.bias.value[...] = 3
    a.reset_parameters()
    assert a.weight.value is w and not np.array_equal(w, first) and np.all(a.bias.value == 0)
    np.testing.assert_allclose(w.std(), first.std(), rtol=0.15)
    b = Linear(30, 20, rng=np.random.default_rng(4), dtype=np.float64)
    b.reset_parameters()
    np.testing.assert_array_equal(b.weight.value, w)  # reproducible from the same generator


def test_reset_on_a_model_resets_every_layer(rng):
    model = Sequential(Linear(3, 4, rng=rng), BatchNorm1d(4), Linear(4, 2, rng=rng))
    model.forward(rng.standard_normal((6, 3)).astype(np.float32))
    model[1].weight.value[...] = 7
    model.reset_running_stats()
    assert np.all(model[1].running_mean == 0) and int(model[1].num_batches_tracked) == 0
    assert np.all(model[1].weight.value == 7)
    model.reset_parameters()
    assert np.all(model[1].weight.value == 1) and np.all(model[1].bias.value == 0)


# ---------------------------------------------------------------- pickles
def test_pickles_hold_no_forward_caches():
    bn = BatchNorm1d(16)
    before = len(pickle.dumps(bn))
    bn.forward(np.random.default_rng(0).standard_normal((10_000, 16)).astype(np.float32))
    assert len(pickle.dumps(bn)) == before  # the issue measured 971 -> 641 559 bytes
    lp = LpBatchNorm(4, p=np.inf)
    y = lp.forward(np.random.default_rng(1).standard_normal((50, 4)).astype(np.float32))
    lp.backward(np.ones_like(y))
    buf = io.BytesIO()
    joblib.dump(Sequential(lp, BatchNorm1d(4)), buf)  # was: a local function in the state
    buf.seek(0)
    clone = joblib.load(buf)
    np.testing.assert_array_equal(clone[0].running_norm, lp.running_norm)
    with pytest.raises(RuntimeError, match="before forward"):
        clone.backward(np.ones((50, 4), np.float32))
