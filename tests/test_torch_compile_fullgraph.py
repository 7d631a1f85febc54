"""``torch.compile(..., fullgraph=True)`` of numbabn's layers: the kernels as the custom
operators of ``numbabn.torch.ops``, traced into the graph without a break.

Before these operators the layer was one opaque call behind a graph break
(``torch.compiler.disable``), and ``fullgraph=True`` raised Dynamo's ``Unsupported``
("Attempted to call function marked as skipped"), while torch.nn's layers compiled.
Every comparison with the eager layer here is bit for bit: the operators run the
same kernels on the same arguments. Tiny shapes, ``backend="aot_eager"`` but for one
inductor test (compiles are slow on two cores).
"""

import copy

import pytest

torch = pytest.importorskip("torch", reason="PyTorch is not installed")
pytest.importorskip("torch._dynamo")
from torch._dynamo.utils import counters  # noqa: E402

import numbabn.torch as nbt  # noqa: E402
from numbabn import config  # noqa: E402
from numbabn.torch import ops  # noqa: E402


class _WithResidual(torch.nn.Module):
    """A layer called with a residual (the tail of a ResNet block)."""

    def __init__(self, bn: torch.nn.Module) -> None:
        super().__init__()
        self.bn = bn

    def forward(self, x: torch.Tensor, residual: torch.Tensor) -> torch.Tensor:
        return self.bn(x, residual=residual)


# (label, layer factory, input shape, residual, channels_last, dtype, modes per step)
_T, _F = True, False
_CASES = [
    ("2d", lambda: nbt.BatchNorm2d(4), (4, 4, 5, 5), _F, _F, torch.float32, (_T, _T, _T, _F)),
    ("cumulative", lambda: nbt.BatchNorm2d(4, momentum=None), (4, 4, 5, 5), _F, _F, torch.float32, (_T, _T, _T, _F)),
    (
        "relu-residual-cl",
        lambda: nbt.BatchNorm2d(4, activation="relu"),
        (4, 4, 5, 5),
        _T,
        _T,
        torch.float32,
        (_T, _T, _F),
    ),
    ("residual", lambda: nbt.BatchNorm2d(4), (4, 4, 5, 5), _T, _F, torch.float32, (_T, _T, _F)),
    (
        "no-affine-relu",
        lambda: nbt.BatchNorm2d(4, affine=False, activation="relu"),
        (4, 4, 3, 3),
        _F,
        _F,
        torch.float32,
        (_T, _T, _F),
    ),
    (
        "untracked",
        lambda: nbt.BatchNorm2d(4, track_running_stats=False),
        (4, 4, 3, 3),
        _F,
        _F,
        torch.float32,
        (_T, _T, _F),
    ),
    ("1d-nc", lambda: nbt.BatchNorm1d(4), (8, 4), _F, _F, torch.float32, (_T, _T, _F)),
    ("1d-ncl", lambda: nbt.BatchNorm1d(4, activation="relu"), (4, 4, 6), _F, _F, torch.float32, (_T, _T, _F)),
    ("3d-float64", lambda: nbt.BatchNorm3d(3).double(), (2, 3, 2, 3, 3), _F, _F, torch.float64, (_T, _T, _F)),
    ("bfloat16", lambda: nbt.BatchNorm2d(4), (4, 4, 3, 3), _F, _F, torch.bfloat16, (_T, _T, _F)),
    ("half-module", lambda: nbt.BatchNorm2d(4).half(), (4, 4, 3, 3), _F, _F, torch.float16, (_T, _T, _F)),
]


def _steps(make, shape, residual, channels_last, dtype, modes, backend="aot_eager", layout=None):
    """Train/eval ``modes`` steps of the eager layer and of its compiled copy
    (``fullgraph=True``) on the same inputs: outputs (values and strides), input,
    residual and parameter gradients, buffers equal bit for bit. Returns the eager
    layer and the graph count."""
    torch.manual_seed(0)
    eager = make()
    if residual:
        eager = _WithResidual(eager)
    ours = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(ours, backend=backend, fullgraph=True)
    for step, training in enumerate(modes):
        eager.train(training), ours.train(training)
        x = (torch.randn(shape) * (step + 1) + step).to(dtype)
        if channels_last:
            x = x.to(memory_format=torch.channels_last)
        if layout is not None:
            x = layout(x)
        args = [x] + ([torch.randn(shape).to(dtype)] if residual else [])
        a = [t.detach().clone().requires_grad_() for t in args]  # clone keeps the layout
        b = [t.detach().clone().requires_grad_() for t in args]
        ya, yb = eager(*a), compiled(*b)
        assert torch.equal(ya, yb), step
        assert ya.stride() == yb.stride()
        dy = torch.randn_like(ya)
        ya.backward(dy)
        yb.backward(dy)
        for ta, tb in zip(a, b, strict=True):
            assert torch.equal(ta.grad, tb.grad), step
        for (name, pa), pb in zip(eager.named_parameters(), ours.parameters(), strict=True):
            assert torch.equal(pa.grad, pb.grad), (step, name)
            pa.grad = pb.grad = None
        for (name, ba), bb in zip(eager.named_buffers(), ours.buffers(), strict=True):
            assert torch.equal(ba, bb), (step, name)
    graphs = counters["stats"]["unique_graphs"]
    if not residual:  # and plain inference (no autograd graph), also the kernels in this suite
        eager.eval(), ours.eval()
        with torch.no_grad():
            assert torch.equal(eager(x), compiled(x))
    return eager, graphs


@pytest.mark.parametrize(
    ("make", "shape", "residual", "channels_last", "dtype", "modes"),
    [case[1:] for case in _CASES],
    ids=[case[0] for case in _CASES],
)
def test_fullgraph_matches_the_eager_layer_bit_for_bit(make, shape, residual, channels_last, dtype, modes):
    """Outputs, gradients, running statistics and the batch count of the compiled layer
    are the eager layer's, in training and eval mode, without a recompilation per
    step: one graph per mode (for momentum=None the factor 1/(count + 1) is read
    from the counter inside the operator, not held as a constant)."""
    eager, graphs = _steps(make, shape, residual, channels_last, dtype, modes)
    assert graphs == len(set(modes))
    bn = eager.bn if residual else eager
    if bn.track_running_stats:
        assert int(bn.num_batches_tracked) == sum(modes)


def test_fullgraph_reads_an_n_l_c_input_in_place():
    """An (N, C, L) view of (N, L, C) data (``x.transpose(1, 2)``) is read in place and
    the output keeps its strides, compiled as eagerly (the (M, C) kernels)."""
    _steps(
        lambda: nbt.BatchNorm1d(4), (4, 6, 4), False, False, torch.float32, (True, True, False),
        layout=lambda x: x.transpose(1, 2),
    )  # fmt: skip


def test_fullgraph_with_changing_batch_sizes():
    """A batch size that changes recompiles once, to a graph of dynamic shapes (as
    for any model), which sizes the operators' outputs symbolically: channels-last,
    momentum=None, bit for bit the eager layer."""
    torch.manual_seed(0)
    eager = nbt.BatchNorm2d(4, activation="relu", momentum=None)
    ours = copy.deepcopy(eager)
    torch._dynamo.reset()
    counters.clear()
    compiled = torch.compile(ours, backend="aot_eager", fullgraph=True)
    for n in (4, 6, 3, 5):
        x = torch.randn(n, 4, 3, 3).to(memory_format=torch.channels_last)
        a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
        ya, yb = eager(a), compiled(b)
        assert torch.equal(ya, yb) and ya.stride() == yb.stride()
        dy = torch.randn_like(ya)
        ya.backward(dy), yb.backward(dy)
        assert torch.equal(a.grad, b.grad) and torch.equal(eager.weight.grad, ours.weight.grad)
    for (name, ba), bb in zip(eager.named_buffers(), ours.buffers(), strict=True):
        assert torch.equal(ba, bb), name
    assert counters["stats"]["unique_graphs"] == 2
    torch._dynamo.reset()


def _trains_alike(fa, fb, ref, ours, inputs):
    """Steps of ``fa`` (a model of ``ref``'s parameters) and ``fb`` (of ``ours``') on
    ``inputs``, loss the mean square of the output: outputs, parameter gradients and
    buffers equal to float32 rounding."""
    for x in inputs:
        ya, yb = fa(x), fb(x)
        torch.testing.assert_close(yb, ya, rtol=1e-4, atol=1e-4)
        ya.square().mean().backward()
        yb.square().mean().backward()
    for (name, pa), pb in zip(ref.named_parameters(), ours.parameters(), strict=True):
        torch.testing.assert_close(pb.grad, pa.grad, rtol=1e-3, atol=1e-4, msg=name)
    for (name, ba), bb in zip(ref.named_buffers(), ours.buffers(), strict=True):
        torch.testing.assert_close(bb, ba, rtol=1e-5, atol=1e-5, msg=name)


def test_fullgraph_against_torch_nn():
    """A small block (conv, BN, ReLU, conv, BN with a fused residual ReLU) compiled with
    numbabn's layers trains as the compiled block with torch.nn's (to float32
    rounding: numbabn sums in float64), in one graph; torch.nn's layer itself
    breaks the graph with momentum=None (its factor 1/count is a Python float)."""

    class Block(torch.nn.Module):
        def __init__(self, bn):
            super().__init__()
            self.c1, self.b1 = torch.nn.Conv2d(3, 4, 3, padding=1), bn(4)
            self.c2, self.b2 = torch.nn.Conv2d(4, 4, 3, padding=1), bn(4)

        def forward(self, x):
            h = self.c1(x)
            return torch.relu(self.b2(self.c2(torch.relu(self.b1(h)))) + h)

    class Ours(Block):
        def forward(self, x):
            h = self.c1(x)
            return self.b2(self.c2(torch.relu(self.b1(h))), residual=h)

    torch.manual_seed(1)
    ref = Block(torch.nn.BatchNorm2d)
    ours = Ours(nbt.BatchNorm2d)
    ours.load_state_dict(ref.state_dict())
    ours.b2.activation = "relu"
    torch._dynamo.reset()
    explained = torch._dynamo.explain(copy.deepcopy(ours))(torch.randn(2, 3, 6, 6))  # it runs the model
    assert (explained.graph_count, explained.graph_break_count) == (1, 0)
    assert "numbabn.batch_norm" in str(explained.graphs[0].graph)
    torch._dynamo.reset()
    fa = torch.compile(ref, backend="aot_eager", fullgraph=True)
    fb = torch.compile(ours, backend="aot_eager", fullgraph=True)
    _trains_alike(fa, fb, ref, ours, [torch.randn(4, 3, 6, 6) + step for step in range(3)])
    torch._dynamo.reset()
    # torch.nn, momentum=None (PyTorch 2.4: an Unsupported, "data dependent operator")
    error, words = (
        (torch._dynamo.exc.UserError, "data-dependent")
        if torch.__version__ >= "2.13"
        else (torch._dynamo.exc.Unsupported, "data dependent")
    )
    with pytest.raises(error, match=words):
        torch.compile(torch.nn.BatchNorm2d(4, momentum=None), backend="aot_eager", fullgraph=True)(
            torch.randn(2, 4, 3, 3)
        )
    torch._dynamo.reset()


def test_fullgraph_with_inductor():
    """inductor: a channels-last input with a fused residual ReLU, bit for bit the
    eager layer; and after convolutions, whose outputs inductor lays out
    channels-last where the graph was traced with NCHW ones (``flexible_layout``: the
    operators read them as they come). That second model failed when the
    coefficients' shape followed the layout ((4, C) traced, (4, F*C) returned)."""
    _steps(
        lambda: nbt.BatchNorm2d(4, activation="relu"), (4, 4, 5, 5), True, True, torch.float32, (True, True),
        backend="inductor",
    )  # fmt: skip
    torch.manual_seed(0)
    eager = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, padding=1), nbt.BatchNorm2d(16, activation="relu"),
        torch.nn.Conv2d(16, 16, 3, padding=1), nbt.BatchNorm2d(16),
    )  # fmt: skip
    ours = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="inductor", fullgraph=True)
    # inductor's convolutions round otherwise than eager ones: close, not equal
    _trains_alike(eager, compiled, eager, ours, [torch.randn(8, 3, 8, 8) + step for step in range(2)])
    torch._dynamo.reset()


_OPCHECK_ARGS = [
    # x, weight, bias, running_mean, running_var, num_batches_tracked, residual, training, momentum, eps, relu
    lambda x, p, s, r: (x, p(), p(), s(), s().abs(), torch.tensor(3), None, True, None, 1e-5, False),
    lambda x, p, s, r: (x, p(), p(), s(), s().abs(), None, r, True, 0.1, 1e-5, True),
    lambda x, p, s, r: (x, None, None, None, None, None, None, True, 0.1, 1e-5, False),
    lambda x, p, s, r: (x, p(), None, s(), s().abs(), None, r, False, 0.0, 1e-3, False),
    lambda x, p, s, r: (x, p(), p(), s(), s().abs(), None, r, False, 0.0, 1e-5, True),
]


@pytest.mark.parametrize("layout", ["contiguous", "channels_last", "nc", "nlc"])
@pytest.mark.parametrize("case", range(len(_OPCHECK_ARGS)))
def test_opcheck(layout, case):
    """``torch.library.opcheck`` on the forward operator (schema: no input changed,
    fake tensors: shapes, dtypes and strides as the real outputs', autograd
    registration, AOT dispatch) for the layouts the kernels read."""
    torch.manual_seed(case)
    shape = {"contiguous": (3, 4, 5, 5), "channels_last": (3, 4, 5, 5), "nc": (6, 4), "nlc": (3, 7, 4)}[layout]
    x = torch.randn(shape)
    if layout == "channels_last":
        x = x.to(memory_format=torch.channels_last)
    elif layout == "nlc":
        x = x.transpose(1, 2)
    residual = torch.randn_like(x).requires_grad_()
    args = _OPCHECK_ARGS[case](
        x.requires_grad_(), lambda: torch.randn(4).requires_grad_(), lambda: torch.randn(4), residual
    )
    torch.library.opcheck(ops.batch_norm_op, args)


def test_opcheck_backward():
    """``torch.library.opcheck`` on the backward operator."""
    torch.manual_seed(0)
    x = torch.randn(3, 4, 5, 5).to(memory_format=torch.channels_last)
    w, r = torch.randn(4), torch.randn_like(x)
    for residual, relu, training in ((None, False, True), (r, True, True), (r, True, False)):
        _, mean, invstd, coef, _, _ = ops.batch_norm_op(
            x, w, None, torch.zeros(4), torch.ones(4), None, residual, training, 0.1, 1e-5, relu
        )
        args = (torch.randn_like(x), x, w, residual, mean, invstd, coef, training, relu)
        torch.library.opcheck(ops.batch_norm_backward_op, args, test_utils=("test_schema", "test_faketensor"))


def test_coefficients_have_one_column_per_channel_in_every_layout():
    """What the forward graph hands the backward graph does not depend on the input's
    layout (the operators are ``flexible_layout``): (4, C) coefficients, which the
    backward repeats for the channels-last kernels' runs, with the dx of the eager
    layer's context."""
    torch.manual_seed(0)
    for x in (
        torch.randn(6, 4),
        torch.randn(6, 1),
        torch.randn(3, 40, 2),
        torch.randn(3, 4, 1, 1),
        torch.randn(3, 40, 2, 2).to(memory_format=torch.channels_last),
    ):
        C = x.shape[1]
        _, mean, invstd, coef, _, _ = ops.batch_norm_op(x, None, None, None, None, None, None, True, 0.1, 1e-5, False)
        assert coef.shape == (4, C), x.shape
        dy = torch.randn_like(x)
        dx = ops.batch_norm_backward_op(dy, x, None, None, mean, invstd, coef, True, False)[0]
        xe = x.clone().requires_grad_()
        bn = nbt.BatchNorm1d(C, affine=False) if x.dim() < 4 else nbt.BatchNorm2d(C, affine=False)
        bn(xe).backward(dy)
        assert torch.equal(dx, xe.grad), x.shape


def test_refused_input_raises_numbabns_error_and_changes_nothing():
    """An input the layer's checks refuse runs eagerly behind a break, which raises
    the eager layer's error before anything changes (``fullgraph=True`` raises
    Dynamo's error there, as it does for torch.nn's layer)."""
    bn = nbt.BatchNorm2d(4)
    before = copy.deepcopy(bn.state_dict())
    torch._dynamo.reset()
    with pytest.raises(ValueError, match="expected input with 4 channels"):
        torch.compile(bn, backend="aot_eager")(torch.randn(2, 5, 3, 3))
    for name, value in bn.state_dict().items():
        assert torch.equal(value, before[name]), name
    torch._dynamo.reset()


def test_inputs_handed_to_pytorch_stay_in_the_graph(monkeypatch):
    """Plain inference below ``TORCH_NATIVE_EVAL_BELOW``, which the eager layer hands to
    PyTorch's op, is traced into the graph as PyTorch's op (no break; it used to be
    one); in training with momentum=None such an input (channels-last, below its
    threshold) still breaks the graph: PyTorch's op would hold the factor as a
    constant."""
    monkeypatch.setattr(config, "TORCH_NATIVE_EVAL_BELOW", 1 << 23)
    monkeypatch.setattr(config, "TORCH_NATIVE_BELOW", 16)  # channels-last: below 8 * 16
    bn, ref = nbt.BatchNorm2d(4).eval(), torch.nn.BatchNorm2d(4).eval()
    torch._dynamo.reset()
    with torch.no_grad():
        x = torch.randn(2, 4, 3, 3)
        explained = torch._dynamo.explain(bn)(x)
        assert "batch_norm" in str(explained.graphs[0].graph)
        assert "numbabn" not in str(explained.graphs[0].graph)
        torch.testing.assert_close(torch.compile(bn, backend="aot_eager", fullgraph=True)(x), ref(x))
    cumulative = nbt.BatchNorm2d(4, momentum=None)
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(cumulative, backend="aot_eager", fullgraph=True)(
            torch.randn(2, 4, 3, 3).to(memory_format=torch.channels_last)
        )
    torch._dynamo.reset()


def test_numpy_scalar_momentum_compiles_behind_a_break():
    """A momentum given as a NumPy scalar, which Dynamo traces as an array: the layer
    runs behind a graph break (documented), as the eager layer does, bit for bit;
    ``fullgraph=True`` refuses the break."""
    import numpy as np

    torch.manual_seed(0)
    eager = nbt.BatchNorm2d(4, momentum=np.float32(0.25))
    ours = copy.deepcopy(eager)
    torch._dynamo.reset()
    compiled = torch.compile(ours, backend="aot_eager")
    for step in range(2):
        x = torch.randn(4, 4, 3, 3) + step
        assert torch.equal(eager(x), compiled(x))
    for (name, a), b in zip(eager.named_buffers(), ours.buffers(), strict=True):
        assert torch.equal(a, b), name
    torch._dynamo.reset()
    with pytest.raises(torch._dynamo.exc.Unsupported):
        torch.compile(copy.deepcopy(eager), backend="aot_eager", fullgraph=True)(torch.randn(4, 4, 3, 3))
    torch._dynamo.reset()


def test_eval_with_autograd_recording_compiles_without_a_break(monkeypatch):
    """An eval-mode layer whose input requires grad (a validation loop without no_grad,
    a frozen BN during fine-tuning, saliency maps) below the plain-inference threshold:
    the layer asked torch.is_inference_mode_enabled(), which Dynamo cannot trace (a
    graph break, an error with fullgraph=True); torch.nn's layer compiled."""
    monkeypatch.setattr(config, "TORCH_NATIVE_EVAL_BELOW", 1 << 23)  # the default (the suite sets 0)
    torch.manual_seed(0)
    ours, theirs = nbt.BatchNorm2d(4).eval(), torch.nn.BatchNorm2d(4).eval()
    x = torch.randn(2, 4, 3, 3, requires_grad=True)
    torch._dynamo.reset()
    y = torch.compile(ours, backend="aot_eager", fullgraph=True)(x)
    torch.testing.assert_close(y, theirs(x))
    (g,) = torch.autograd.grad(y.sum(), x)
    (h,) = torch.autograd.grad(theirs(x).sum(), x)
    torch.testing.assert_close(g, h)


def test_compiled_torch_func_transforms_take_pytorchs_op():
    """torch.compile(grad(functional_call(bn, ...))): the layer sent the input to
    numbabn's operator, whose autograd registration functorch cannot run ("must
    override the setup_context staticmethod"); eagerly it hands torch.func to
    PyTorch's op, and so it does compiled. torch.nn's results, buffers updated alike."""
    from torch.func import functional_call, grad

    torch.manual_seed(0)
    x = torch.randn(4, 4, 3, 3)
    results = []
    for bn in (nbt.BatchNorm2d(4), torch.nn.BatchNorm2d(4)):
        params = {k: v.detach() for k, v in bn.named_parameters()}
        buffers = {k: v.clone() for k, v in bn.named_buffers()}
        f = grad(lambda p, b, bn=bn: functional_call(bn, (p, b), (x,)).pow(3).sum())  # noqa: B023
        torch._dynamo.reset()
        results.append((torch.compile(f, backend="aot_eager")(params, buffers), buffers))
    (ours, our_buffers), (theirs, their_buffers) = results
    for k in theirs:
        torch.testing.assert_close(ours[k], theirs[k])
    for k in their_buffers:
        torch.testing.assert_close(our_buffers[k], their_buffers[k])


def test_strict_export_of_a_fused_relu_model():
    """torch.export(strict=True) (the default before PyTorch 2.7; PT2E quantization
    sets it) traces the layer with Dynamo, which cannot trace Tensor.is_inference in
    the fused ReLU's bookkeeping: the export failed on convert_batchnorm(fuse_relu=True)."""
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU()).eval()
    fused = nbt.convert_batchnorm(copy.deepcopy(model), fuse_relu=True).eval()
    x = torch.randn(2, 3, 6, 6)
    program = torch.export.export(fused, (x,), strict=True)
    torch.testing.assert_close(program.module()(x), model(x))
