"""torch.nn semantics numbabn follows (issue 12), checked against PyTorch on the same
inputs: ``track_running_stats`` switched after construction, empty batches, LayerNorm
shapes, BatchNorm3d, InstanceNorm1d/2d, GroupNorm/LayerNorm without affine, float16
input into float32 layers, the reset methods and ``load_state_dict(strict=False)``.

Every comparison runs several training steps on both sides -- forward, backward, an
SGD step on the parameters -- and eval steps, comparing outputs, input and parameter
gradients and every state-dict entry after every step, in float64 and float32 (and
float16 input for the mixed-precision cases). The layer, the functional API and the
plugin layers (InstanceNorm, LayerNorm, GroupNorm) are all driven this way.
"""

import numpy as np
import pytest
from numbabn_plugins.instance_norm import InstanceNorm1d, InstanceNorm2d
from numbabn_plugins.per_sample_norm import GroupNorm, LayerNorm

from numbabn import batch_norm_backward, batch_norm_forward
from numbabn.layers import BatchNorm1d, BatchNorm2d, BatchNorm3d
from numbabn.optim import SGD
from numbabn.registry import get_layer

torch = pytest.importorskip("torch", reason="PyTorch is not installed: no reference layers to compare with")

TOL = {
    np.dtype(np.float64): dict(rtol=1e-10, atol=1e-10),
    np.dtype(np.float32): dict(rtol=1e-4, atol=1e-5),
    np.dtype(np.float16): dict(rtol=1e-2, atol=1e-2),
}
DTYPES = [np.float64, np.float32]


def _np(a):
    return a.detach().numpy() if isinstance(a, torch.Tensor) else np.asarray(a)


def close(ours, theirs, what, dtype=None, tol=None):
    ours, theirs = np.asarray(ours), _np(theirs)
    assert ours.shape == theirs.shape, f"{what}: shape {ours.shape} vs {theirs.shape}"
    if dtype is not None:
        assert ours.dtype == dtype, f"{what}: dtype {ours.dtype}, expected {dtype}"
    if ours.dtype.kind != "f":
        tol = dict(rtol=0, atol=0)
    tol = tol or TOL[np.dtype(ours.dtype)]
    np.testing.assert_allclose(ours.astype(np.float64), theirs.astype(np.float64), **tol, err_msg=what)


def torch_twin(ours, theirs):
    """Copy our parameters into the torch module (random inits differ)."""
    with torch.no_grad():
        for name, p in ours.named_parameters():
            dict(theirs.named_parameters())[name].copy_(torch.from_numpy(p.value.copy()))


def run_steps(ours, theirs, steps, *, perm=None, compare_counter=True, compare_state=True, tol=None):
    """Drive both layers through ``steps`` = [(x, dy, settings)], ``settings`` applied to
    both first ({"training": bool, "track_running_stats": bool}); compare after each.
    float16 inputs compare everything at float16's tolerance (PyTorch rounds some
    float32 results, e.g. LayerNorm's weight gradient, through float16)."""

    def to_t(a):
        return np.ascontiguousarray(a.transpose(perm)) if perm else a

    torch_twin(ours, theirs)
    params = ours.parameters()
    opt = SGD(params, lr=0.1, momentum=0.9) if params else None
    topt = torch.optim.SGD(theirs.parameters(), lr=0.1, momentum=0.9) if params else None
    tparams = dict(theirs.named_parameters())
    for i, (x, dy, settings) in enumerate(steps):
        for layer in (ours, theirs):
            if "training" in settings:
                layer.train(settings["training"])
            if "track_running_stats" in settings:
                layer.track_running_stats = settings["track_running_stats"]
        what = f"step {i} ({settings}, input {x.shape} {x.dtype})"
        t = tol or (TOL[np.dtype(np.float16)] if x.dtype == np.float16 else None)
        xt = torch.tensor(to_t(x), requires_grad=True)
        yt = theirs(xt)
        yt.backward(torch.tensor(to_t(dy)))
        y = ours.forward(x)
        dx = ours.backward(dy)
        close(to_t(y), yt, f"output, {what}", x.dtype, t)
        close(to_t(dx), xt.grad, f"input gradient, {what}", x.dtype, t)
        for name, p in ours.named_parameters():
            close(p.grad, tparams[name].grad, f"{name} gradient, {what}", p.value.dtype, t)
        sd, tsd = ours.state_dict(), theirs.state_dict()
        assert sd.keys() == tsd.keys(), what
        for key in sd:
            if compare_state and (compare_counter or not key.endswith("num_batches_tracked")):
                close(sd[key], tsd[key], f"{key}, {what}", tol=t)
        if opt is not None:
            opt.step()
            topt.step()
            topt.zero_grad()


def batches(rng, shapes, dtype, settings, loc=0.0):
    return [
        ((rng.standard_normal(s) * (1 + i % 3) + loc + i).astype(dtype), rng.standard_normal(s).astype(dtype), st)
        for i, (s, st) in enumerate(zip(shapes, settings, strict=True))
    ]


TRAIN, EVAL = {"training": True}, {"training": False}

# (our class, torch class, kwargs, input shape for N samples, permutation to torch's NC... layout)
BN_CASES = [
    (BatchNorm1d, "BatchNorm1d", {}, lambda n: (n, 3), None),
    (BatchNorm1d, "BatchNorm1d", dict(momentum=None), lambda n: (n, 3, 4), None),
    (BatchNorm2d, "BatchNorm2d", {}, lambda n: (n, 3, 2, 3), None),
    (BatchNorm2d, "BatchNorm2d", dict(channels_last=True, momentum=None), lambda n: (n, 2, 3, 3), (0, 3, 1, 2)),
    (BatchNorm3d, "BatchNorm3d", {}, lambda n: (n, 2, 2, 2, 3), None),
    (BatchNorm3d, "BatchNorm3d", dict(channels_last=True), lambda n: (n, 2, 3, 2, 2), (0, 4, 1, 2, 3)),
]
BN_IDS = ["bn1d", "bn1d-ncl-cumulative", "bn2d", "bn2d-nhwc-cumulative", "bn3d", "bn3d-ndhwc"]


def bn_pair(cls, tname, kwargs, dtype, C, **extra):
    ours = cls(C, dtype=dtype, **kwargs, **extra)
    theirs = getattr(torch.nn, tname)(
        C,
        dtype=getattr(torch, np.dtype(dtype).name),
        **{k: v for k, v in kwargs.items() if k != "channels_last"},
        **extra,
    )
    return ours, theirs


def channels(shape, perm):
    return shape[perm[1]] if perm else shape[1]


@pytest.mark.parametrize("cls, tname, kwargs, shape, perm", BN_CASES, ids=BN_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_track_running_stats_switched_after_construction(rng, cls, tname, kwargs, shape, perm, dtype):
    """Off: training uses batch statistics and leaves the buffers (and counter) alone;
    eval keeps normalising with the frozen buffers and changes nothing. On again:
    updates resume."""
    ours, theirs = bn_pair(cls, tname, kwargs, dtype, channels(shape(1), perm))
    settings = [
        TRAIN,
        {"training": True, "track_running_stats": False},
        TRAIN,
        EVAL,
        {"training": True, "track_running_stats": True},
        TRAIN,
        EVAL,
    ]
    run_steps(ours, theirs, batches(rng, [shape(5)] * len(settings), dtype, settings), perm=perm)


@pytest.mark.parametrize("dtype", DTYPES)
def test_track_running_stats_switched_on_without_buffers(rng, dtype):
    """Built without running statistics, switching the flag on changes nothing:
    batch statistics in both modes, no buffers appear (as in PyTorch)."""
    ours, theirs = bn_pair(BatchNorm2d, "BatchNorm2d", dict(track_running_stats=False), dtype, 3)
    settings = [{"training": True, "track_running_stats": True}, TRAIN, EVAL]
    run_steps(ours, theirs, batches(rng, [(4, 3, 2, 2)] * 3, dtype, settings))
    assert ours.state_dict().keys() == {"weight", "bias"}


@pytest.mark.parametrize("cls, tname, kwargs, shape, perm", BN_CASES, ids=BN_IDS)
@pytest.mark.parametrize("dtype", DTYPES)
def test_empty_batches_over_training_steps(rng, cls, tname, kwargs, shape, perm, dtype):
    """N = 0 between real batches, in both modes: empty outputs, zero weight/bias
    gradients, running statistics kept, the counter counting the training calls."""
    ours, theirs = bn_pair(cls, tname, kwargs, dtype, channels(shape(1), perm))
    sizes = [6, 0, 5, 0, 4, 0, 3]
    settings = [TRAIN, TRAIN, TRAIN, EVAL, EVAL, TRAIN, EVAL]
    run_steps(ours, theirs, batches(rng, [shape(n) for n in sizes], dtype, settings), perm=perm)


@pytest.mark.parametrize("dtype", DTYPES)
def test_zero_length_spatial_axis(rng, dtype):
    """(N, C, 0) and (N, C, 0, W): no values per channel although N > 0 (eval mode
    used to crash in the kernel grid)."""
    for cls, tname, shapes in [
        (BatchNorm1d, "BatchNorm1d", [(4, 3, 5), (4, 3, 0), (4, 3, 0), (2, 3, 5)]),
        (BatchNorm2d, "BatchNorm2d", [(2, 3, 2, 2), (2, 3, 0, 3), (2, 3, 0, 3), (2, 3, 1, 2)]),
    ]:
        ours, theirs = bn_pair(cls, tname, {}, dtype, 3)
        run_steps(ours, theirs, batches(rng, shapes, dtype, [TRAIN, TRAIN, EVAL, EVAL]))


@pytest.mark.parametrize("dtype", [np.float64, np.float32, np.float16])
@pytest.mark.parametrize("momentum", [0.1, None])
def test_functional_api_over_training_steps(rng, dtype, momentum):
    """batch_norm_forward/backward with caller-held state against torch.nn.BatchNorm1d:
    real and empty batches, then eval (float16 input: float32 parameters and state)."""
    C, pdt = 3, np.float32 if dtype == np.float16 else dtype
    gamma, beta = rng.uniform(0.5, 1.5, C).astype(pdt), rng.standard_normal(C).astype(pdt)
    rm, rv, nbt = np.zeros(C, pdt), np.ones(C, pdt), np.zeros((), np.int64)
    theirs = torch.nn.BatchNorm1d(C, momentum=momentum, dtype=getattr(torch, np.dtype(pdt).name))
    with torch.no_grad():
        theirs.weight.copy_(torch.from_numpy(gamma))
        theirs.bias.copy_(torch.from_numpy(beta))
    steps = [(8, True), (0, True), (5, True), (0, False), (6, False), (4, True)]
    for i, (n, training) in enumerate(steps):
        x = (rng.standard_normal((n, C, 4)) * 2 + i).astype(dtype)
        dy = rng.standard_normal(x.shape).astype(dtype)
        theirs.train(training)
        xt = torch.tensor(x, requires_grad=True)
        yt = theirs(xt)
        yt.backward(torch.tensor(dy))
        y, ctx = batch_norm_forward(
            x,
            gamma,
            beta,
            running_mean=rm,
            running_var=rv,
            num_batches_tracked=nbt,
            training=training,
            momentum=momentum,
        )
        dx, dgamma, dbeta = batch_norm_backward(dy, ctx)
        what = f"step {i}: n={n}, training={training}"
        close(y, yt, f"output, {what}", dtype)
        close(dx, xt.grad, f"input gradient, {what}", dtype)
        close(dgamma, theirs.weight.grad, f"gamma gradient, {what}", pdt)
        close(dbeta, theirs.bias.grad, f"beta gradient, {what}", pdt)
        close(rm, theirs.running_mean, f"running mean, {what}")
        close(rv, theirs.running_var, f"running var, {what}")
        assert int(nbt) == int(theirs.num_batches_tracked), what
        theirs.zero_grad()


INSTANCE_CASES = [  # (class, kwargs, shapes per step, settings per step)
    (InstanceNorm1d, {}, [(4, 3, 6), (0, 3, 6), (2, 3, 5)], [TRAIN, TRAIN, EVAL]),
    # (PyTorch's affine InstanceNorm fails on N = 0 with an IndexError: no empty batch there.)
    (InstanceNorm1d, dict(affine=True), [(4, 3, 6), (3, 3, 2), (2, 3, 5)], [TRAIN, TRAIN, EVAL]),
    (
        InstanceNorm1d,
        dict(affine=True, track_running_stats=True, momentum=0.3),
        [(4, 3, 6), (3, 3, 5), (2, 3, 4)] * 2,
        [TRAIN, TRAIN, TRAIN, EVAL, TRAIN, EVAL],
    ),
    (InstanceNorm1d, dict(track_running_stats=True), [(3, 7), (3, 5), (3, 4)], [TRAIN, TRAIN, EVAL]),  # unbatched
    (
        InstanceNorm2d,
        dict(affine=True, track_running_stats=True),
        [(4, 2, 3, 5), (2, 2, 2, 2), (3, 2, 3, 3)],
        [TRAIN, TRAIN, EVAL],
    ),
    (InstanceNorm2d, {}, [(4, 2, 3, 3), (0, 2, 3, 3), (2, 2, 1, 2)], [TRAIN, EVAL, EVAL]),
    (
        InstanceNorm2d,
        dict(affine=True, track_running_stats=True),  # switched off: instance statistics
        [(3, 2, 2, 3)] * 4,
        [TRAIN, {"training": False, "track_running_stats": False}, TRAIN, EVAL],
    ),
]


@pytest.mark.parametrize("cls, kwargs, shapes, settings", INSTANCE_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_instance_norm_matches_torch(rng, cls, kwargs, shapes, settings, dtype):
    """InstanceNorm1d/2d (plugins on the batch-norm kernels) against torch.nn's, with
    and without running statistics and affine parameters. num_batches_tracked is
    left out: PyTorch's InstanceNorm never counts (a documented difference)."""
    ours = cls(shapes[0][-2 - (cls is InstanceNorm2d)], dtype=dtype, **kwargs)
    theirs = getattr(torch.nn, cls.__name__)(ours.num_features, dtype=getattr(torch, np.dtype(dtype).name), **kwargs)
    if ours.affine:
        ours.weight.value[...] = rng.uniform(0.5, 1.5, ours.num_features)
        ours.bias.value[...] = rng.standard_normal(ours.num_features)
    steps = batches(rng, shapes, dtype, settings)
    if settings[1].get("track_running_stats") is False:
        # Switched off: PyTorch's InstanceNorm keeps moving the buffers (in training and
        # even in eval mode); numbabn freezes them as its batch norm does. Outputs and
        # gradients agree (instance statistics); the buffers stay where they were.
        run_steps(ours, theirs, steps[:1], compare_counter=False)
        frozen = {k: v.copy() for k, v in ours.named_buffers()}
        run_steps(ours, theirs, steps[1:], compare_state=False)
        for key, value in ours.named_buffers():
            np.testing.assert_array_equal(value, frozen[key], err_msg=key)
    else:
        run_steps(ours, theirs, steps, compare_counter=False)


def test_instance_norm_is_registered():
    assert type(get_layer("instance_norm1d", 3)) is InstanceNorm1d
    assert type(get_layer("instance_norm2d", 3)) is InstanceNorm2d


# Groups of one value: numbabn's xhat is exactly 0 (x - mean = 0), PyTorch's float32
# kernels leave rounding noise of a few 1e-5 in the input gradient.
ONE_VALUE_TOL = {(1, np.float32): dict(rtol=1e-4, atol=2e-4), (True, np.float32): dict(rtol=1e-4, atol=2e-4)}

LAYER_NORM_CASES = [  # (normalized_shape, kwargs, input shapes per step)
    ((2, 3), {}, [(2, 3)] * 3),  # no leading dimension
    (1, {}, [(5, 1), (2, 3, 1), (4, 1)]),  # one value per group: output = bias
    (4, {}, [(3, 4), (0, 4), (2, 0, 4), (1, 4)]),  # zero-size leading dimensions
    (3, {}, [(3,), (3,), (3,)]),  # a single vector
    ((2, 2), dict(elementwise_affine=False), [(3, 1, 2, 2), (2, 2, 2)]),
    (5, dict(bias=False), [(4, 5), (2, 3, 5)]),
]


@pytest.mark.parametrize("normalized_shape, kwargs, shapes", LAYER_NORM_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_layer_norm_shapes_match_torch(rng, normalized_shape, kwargs, shapes, dtype):
    ours = LayerNorm(normalized_shape, dtype=dtype, **kwargs)
    theirs = torch.nn.LayerNorm(normalized_shape, dtype=getattr(torch, np.dtype(dtype).name), **kwargs)
    for p in ours.parameters():
        p.value[...] = rng.uniform(0.5, 1.5, p.value.shape)
    settings = [TRAIN] * (len(shapes) - 1) + [EVAL]
    run_steps(
        ours, theirs, batches(rng, shapes, dtype, settings, loc=1.0), tol=ONE_VALUE_TOL.get((shapes[0][-1], dtype))
    )


GROUP_NORM_CASES = [  # (num_groups, num_channels, kwargs, input shapes per step)
    (2, 4, dict(affine=False), [(3, 4, 5), (2, 4, 2, 2)]),
    (4, 4, {}, [(3, 4), (2, 4, 1)]),  # one value per group
    (2, 6, {}, [(2, 6, 2, 2), (0, 6, 2, 2), (1, 6, 3)]),  # an empty batch between
]


@pytest.mark.parametrize("groups, C, kwargs, shapes", GROUP_NORM_CASES)
@pytest.mark.parametrize("dtype", DTYPES)
def test_group_norm_matches_torch(rng, groups, C, kwargs, shapes, dtype):
    ours = GroupNorm(groups, C, dtype=dtype, **kwargs)
    theirs = torch.nn.GroupNorm(groups, C, dtype=getattr(torch, np.dtype(dtype).name), **kwargs)
    for p in ours.parameters():
        p.value[...] = rng.uniform(0.5, 1.5, p.value.shape)
    settings = [TRAIN] * (len(shapes) - 1) + [EVAL]
    tol = ONE_VALUE_TOL.get((groups == C and len(shapes[0]) == 2, dtype))
    run_steps(ours, theirs, batches(rng, shapes, dtype, settings, loc=-1.0), tol=tol)


def test_group_norm_zero_spatial_size_gives_zero_weight_gradient(rng):
    """(N, C, 0): PyTorch 2.13 returns NaN for the weight gradient, numbabn the gradient
    of a sum over no values, 0 (the documented difference); the rest agrees. PyTorch
    2.14 refuses such input ("Expected HxW to be greater than 0"); numbabn still
    takes it."""
    ours, theirs = GroupNorm(2, 4, dtype=np.float64), torch.nn.GroupNorm(2, 4, dtype=torch.float64)
    x = np.zeros((3, 4, 0))
    assert ours.forward(x).shape == x.shape
    assert ours.backward(np.ones(x.shape)).shape == x.shape
    assert np.all(ours.weight.grad == 0) and np.all(ours.bias.grad == 0)
    xt = torch.tensor(x, requires_grad=True)
    try:
        yt = theirs(xt)
    except RuntimeError as exc:  # PyTorch >= 2.14
        assert "HxW" in str(exc)
        return
    yt.sum().backward()
    assert tuple(yt.shape) == x.shape and tuple(xt.grad.shape) == x.shape
    assert bool(torch.all(theirs.bias.grad == 0))
    assert bool(torch.isnan(theirs.weight.grad).all())


FLOAT16_CASES = [  # (our layer, torch layer, input shapes, permutation)
    (lambda: BatchNorm1d(3), lambda: torch.nn.BatchNorm1d(3), [(8, 3), (0, 3), (6, 3, 2)], None),
    (lambda: BatchNorm2d(2, channels_last=True), lambda: torch.nn.BatchNorm2d(2), [(4, 3, 3, 2)] * 2, (0, 3, 1, 2)),
    (lambda: BatchNorm3d(2), lambda: torch.nn.BatchNorm3d(2), [(3, 2, 2, 2, 2)] * 2, None),
    (
        lambda: InstanceNorm1d(3, affine=True, track_running_stats=True),
        lambda: torch.nn.InstanceNorm1d(3, affine=True, track_running_stats=True),
        [(4, 3, 6)] * 2,
        None,
    ),
    (lambda: LayerNorm((2, 3)), lambda: torch.nn.LayerNorm((2, 3)), [(4, 2, 3)] * 2, None),
    (lambda: GroupNorm(2, 4), lambda: torch.nn.GroupNorm(2, 4), [(3, 4, 3)] * 2, None),
]


@pytest.mark.parametrize("make, make_torch, shapes, perm", FLOAT16_CASES)
def test_float16_input_into_float32_layers_matches_torch(rng, make, make_torch, shapes, perm):
    """PyTorch's CPU mixed precision: float32 layer, float16 input -> float16 output and
    input gradient, float32 parameter gradients and running statistics."""
    ours, theirs = make(), make_torch()
    for p in ours.parameters():
        p.value[...] = rng.uniform(0.5, 1.5, p.value.shape)
    settings = [TRAIN] * len(shapes) + [EVAL]
    steps = batches(rng, shapes + shapes[-1:], np.float16, settings)
    is_instance = isinstance(ours, InstanceNorm1d)
    run_steps(ours, theirs, steps, perm=perm, compare_counter=not is_instance)


@pytest.mark.parametrize(
    "make, make_torch",
    [
        (lambda: BatchNorm2d(3, dtype=np.float64), lambda: torch.nn.BatchNorm2d(3, dtype=torch.float64)),
        (
            lambda: InstanceNorm1d(3, affine=True, track_running_stats=True, dtype=np.float64),
            lambda: torch.nn.InstanceNorm1d(3, affine=True, track_running_stats=True, dtype=torch.float64),
        ),
        (lambda: LayerNorm(4, dtype=np.float64), lambda: torch.nn.LayerNorm(4, dtype=torch.float64)),
        (lambda: GroupNorm(2, 4, dtype=np.float64), lambda: torch.nn.GroupNorm(2, 4, dtype=torch.float64)),
    ],
)
def test_reset_methods_match_torch(rng, make, make_torch):
    ours, theirs = make(), make_torch()
    shape = (
        (4, 3, 2, 2)
        if isinstance(ours, BatchNorm2d)
        else (4, 3, 5)
        if isinstance(ours, InstanceNorm1d)
        else (5, 4, 2)
        if isinstance(ours, GroupNorm)
        else (3, 4)
    )
    run_steps(ours, theirs, batches(rng, [shape] * 3, np.float64, [TRAIN] * 3), compare_counter=False)
    if hasattr(theirs, "reset_running_stats"):  # torch.nn has it on the layers with running statistics
        for layer in (ours, theirs):
            layer.reset_running_stats()
        for key, value in ours.state_dict().items():
            close(value, theirs.state_dict()[key], f"{key} after reset_running_stats")
    for layer in (ours, theirs):
        layer.reset_parameters()
    for key, value in ours.state_dict().items():
        close(value, theirs.state_dict()[key], f"{key} after reset_parameters")


@pytest.mark.parametrize(
    "make, make_torch",
    [
        (lambda: BatchNorm1d(3, dtype=np.float64), lambda: torch.nn.BatchNorm1d(3, dtype=torch.float64)),
        (lambda: LayerNorm((2, 3), dtype=np.float64), lambda: torch.nn.LayerNorm((2, 3), dtype=torch.float64)),
    ],
)
def test_load_state_dict_strict_false_matches_torch(rng, make, make_torch):
    ours, theirs = make(), make_torch()
    source = make_torch()
    with torch.no_grad():
        for t in list(source.parameters()) + [b for b in source.buffers() if b.is_floating_point()]:
            t.copy_(torch.tensor(rng.uniform(0.5, 1.5, tuple(t.shape))))
    state = {k: v for k, v in source.state_dict().items() if k != "weight"}
    state["extra.running_mean"] = torch.zeros(3, dtype=torch.float64)
    theirs_result = theirs.load_state_dict(state, strict=False)
    ours_result = ours.load_state_dict({k: v.numpy().copy() for k, v in state.items()}, strict=False)
    assert ours_result.missing_keys == list(theirs_result.missing_keys) == ["weight"]
    assert ours_result.unexpected_keys == list(theirs_result.unexpected_keys) == ["extra.running_mean"]
    for key, value in ours.state_dict().items():
        close(value, theirs.state_dict()[key], f"{key} after load_state_dict(strict=False)")
    with pytest.raises(ValueError, match="missing"):
        ours.load_state_dict({k: v.numpy() for k, v in state.items()})


@pytest.mark.parametrize("dtype, low", [(np.float32, -80.0), (np.float64, -700.0)])
def test_sigmoid_is_as_accurate_as_torchs_in_its_tails(dtype, low):
    """0.5 + 0.5*tanh(x/2) cancelled where the output is tiny: 44 % off at x = -17 in
    float32, and 0 from x = -20 (torch: 2e-9), with the gradient alike."""
    from numbabn.layers import Sigmoid

    x = np.array([[low, -40.0, -20.0, -17.0, -10.0, -1.0, 0.0, 1.0, 10.0, 40.0]], dtype)
    layer = Sigmoid()
    y = layer.forward(x)
    dx = layer.backward(np.full_like(x, 0.5))
    tx = torch.tensor(x, requires_grad=True)
    ty = torch.sigmoid(tx)
    ty.backward(torch.full_like(ty, 0.5))
    rtol = 4 * np.finfo(dtype).eps
    assert y.dtype == dx.dtype == dtype
    np.testing.assert_allclose(y, ty.detach().numpy(), rtol=rtol, atol=0)
    np.testing.assert_allclose(dx, tx.grad.numpy(), rtol=rtol, atol=0)
