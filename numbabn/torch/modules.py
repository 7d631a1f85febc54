"""Drop-in ``torch.nn.BatchNorm1d/2d/3d`` running numbabn's kernels.

Each class subclasses its torch.nn counterpart, so constructor arguments,
parameters, buffers, ``state_dict`` keys, ``reset_parameters``, ``train()/eval()``
and ``isinstance(m, torch.nn.BatchNorm2d)`` are PyTorch's own; only ``forward``
differs, going through :class:`~numbabn.torch.function.BatchNormFunction`. One
keyword is added: ``activation=None | "relu"`` fuses a ReLU into the same pass over
memory (forward and backward). ``forward(input, residual=None)`` optionally adds a
residual before the activation: ``relu(bn(input) + residual)``, a ResNet block's tail,
in one pass forward and one backward (the residual's gradient is dy times the mask).

Semantics are ``torch.nn.BatchNorm*``'s (batch statistics in training mode and when
``track_running_stats=False``; running statistics in eval mode)::

    running_mean <- (1 - f)*running_mean + f*mean
    running_var  <- (1 - f)*running_var  + f*var*m/(m - 1)
    f = momentum, or 1/num_batches_tracked when momentum=None (cumulative average)

Where numbabn differs from PyTorch:

* A call that raises changes nothing: PyTorch increments ``num_batches_tracked``
  before it looks at the input; numbabn checks the input first and increments it
  together with the running statistics (also when the recomputation of
  ``torch.utils.checkpoint(use_reentrant=False)`` stops inside the layer's op, so
  the count is torch.nn's there too).
* ``momentum`` must be None or a number in [0, 1] (checked at every call, whatever
  the input's size); PyTorch takes any number (outside [0, 1] an extrapolating
  average, almost surely a mistake).
* An (N, C, L) input stored as (N, L, C) (``x.transpose(1, 2)`` of sequence data)
  is read in place, and the output has the input's strides; torch.nn's
  ``BatchNorm1d`` returns a contiguous (N, C, L) tensor there (PyTorch has no
  channels-last format for 3-D tensors). Same values; ``y.view(N, -1)`` then needs
  ``y.reshape``. Copying to PyTorch's layout was measured and not kept: forward plus
  backward of the idiom ``bn(x.transpose(1, 2)).transpose(1, 2)`` at (64, 1024, 256)
  took 189 ms instead of 47-56 ms (torch.nn: 553-557 ms); used as (N, C, L), with a
  contiguous gradient (which is then copied once), 153 ms against 138 ms now
  (torch.nn: 402-411 ms; 2 threads).
* Statistics accumulate in float64 (PyTorch's CPU kernels: float32 sums for float32
  input), so results agree with PyTorch to float32 rounding, not bit for bit.
* A CPU input of fewer than ``numbabn.config.TORCH_NATIVE_BELOW`` values (default
  2**20; ``NUMBABN_TORCH_NATIVE_BELOW``) runs PyTorch's own ``batch_norm`` (then the
  residual addition and ReLU), after numbabn's input checks: below about that size
  what numbabn adds around its kernels per call (~0.2 ms forward + backward on a
  2-vCPU VM) costs more than the kernels save, so the layer is exactly torch.nn's
  there (README, "Small inputs"). Not SyncBatchNorm while it synchronizes processes.
* A CPU input laid out channels-last (4-D or 5-D) runs PyTorch's own ``batch_norm``
  below 8x that threshold (2**23 values by default; 2x with a fused ReLU or
  residual): PyTorch's channels-last kernel outran numbabn's there (0.59-0.91x in
  training from 1 M to 6.4 M values; README, "Small inputs"). Decided under
  torch.compile too (PyTorch's op then goes into the graph, see below).
* Plain inference (no autograd graph to record, running statistics, no fused ReLU or
  residual) of a CPU input of fewer than ``numbabn.config.TORCH_NATIVE_EVAL_BELOW``
  values (default 2**23; ``NUMBABN_TORCH_NATIVE_EVAL_BELOW``) runs PyTorch's own
  ``batch_norm`` too: both read x and write y once, and numbabn was 0.45-0.89x of
  PyTorch there; above, PyTorch's fresh output pages make the kernels 5-7x faster.
  Decided under torch.compile too.
* A tensor on another device than the CPU or a CUDA GPU (MPS, XPU, ...), or a oneDNN
  tensor (``x.to_mkldnn()``, layout ``torch._mkldnn``, which torch.nn's layers take
  and give back), runs PyTorch's own ``batch_norm``, after numbabn's input checks:
  numbabn has no kernels for it. (A residual must then have the input's layout, as
  ``bn(x) + residual`` needs in torch.nn.) Other layouts (sparse) are refused with an
  :class:`UnsupportedLayoutError`, a TypeError and torch.nn's NotImplementedError.
* A CUDA tensor runs PyTorch's own ``batch_norm`` (cuDNN's kernels; then the
  residual addition and ReLU), after numbabn's input checks: on the first GPU they
  were measured on (an H200, README "On a GPU"), numbabn's CUDA kernels took 2.3 to
  33 times as long per call as cuDNN's, since launching them from Python costs more
  than the kernels. ``NUMBABN_TORCH_CUDA_KERNELS=1``
  (``numbabn.config.TORCH_CUDA_KERNELS``) runs numbabn's kernels instead. Not
  SyncBatchNorm while it synchronizes processes.
* An input with no values (N = 0) takes PyTorch's own path (nothing to compute),
  as does one on the ``meta`` device (shapes only),
  a tensor subclass (``FakeTensor``, ``DTensor``, ...), and every call while
  ``torch.jit.trace``, ``torch.export`` (and so ``torch.onnx.export``) or
  ``torch.fx.symbolic_trace`` of the layer itself record a graph (inside a traced
  model ``torch.fx`` records the layer as one call, as it does torch.nn's): the
  recorded graph holds PyTorch's
  ``batch_norm`` as torch.nn's layer calls it (then the residual
  addition and ReLU), so a traced module can be saved and an exported one runs
  anywhere PyTorch's ops do (PyTorch's op also checks such input, with its own
  errors, as torch.nn's layers do). SyncBatchNorm cannot be recorded while it would
  synchronize (training mode, several processes): it raises, on every rank that
  records. While it synchronizes, a meta input exchanges no statistics (shapes only,
  when every rank's input is meta; every rank raises otherwise) and a tensor subclass
  input is refused on every rank (:mod:`numbabn.torch.sync`).
* Under ``torch.func`` transforms (``grad``, ``vmap``, ``jacrev``, ...) the layers
  run PyTorch's ``batch_norm`` too (the transforms' wrapped tensors have no memory
  numbabn may view). TorchScript scripting is not supported: ``torch.jit.script``
  raises a RuntimeError that names the layer and the alternatives (tracing, export).
  ``torch.autograd.grad`` and
  the first-order functions of ``torch.autograd.functional`` run the kernels;
  forward-mode AD (dual tensors), an ``eps`` the kernels refuse (``eps=0``) and
  ``torch.func`` transforms run PyTorch's op (a SyncBatchNorm in training mode
  refuses such an ``eps`` before anything changes, see :mod:`numbabn.torch.sync`).
* Under ``torch.compile`` the layer is traced into the graph without a break, so
  ``fullgraph=True`` works, as with torch.nn's layers. It decides what the eager
  path decides, from what Dynamo guards on (shapes, strides, dtype, device, grad
  mode, the module's mode and attributes, ``numbabn.config``'s thresholds): where
  the eager layer runs the CPU kernels, the graph runs them as the custom
  operator ``numbabn::batch_norm`` and its backward (:mod:`numbabn.torch.ops`),
  giving the eager layer's outputs, gradients, running statistics and batch count
  bit for bit (``momentum=None`` included: the operator reads the count when it
  runs, so the graph is not recompiled each step); where the eager layer hands
  the input to PyTorch's op (the thresholds above, plain inference, a CUDA tensor,
  ``eps=0``, ...), PyTorch's ops go into the graph, which the compiler may fuse
  (PyTorch's op checks such input, as under torch.fx). One opaque call instead --
  one graph break, the layer running as it does eagerly, and Dynamo's
  ``Unsupported`` under ``fullgraph=True`` -- for a SyncBatchNorm (its exchange
  between processes is no operator), ``momentum=None`` in training where
  PyTorch's op computes (its factor would be a graph constant: torch.nn's layer
  fails ``fullgraph=True`` there too), numbabn's CUDA kernels
  (``NUMBABN_TORCH_CUDA_KERNELS=1``), an input numbabn's checks refuse (the
  eager call raises their error), or a momentum given as a NumPy scalar (Dynamo
  traces it as an array; a Python float does not break the graph). Not checked
  under torch.compile: inference tensors (Dynamo cannot trace
  ``Tensor.is_inference``). A training call on inference-tensor buffers (a layer
  made under ``torch.inference_mode()``) then raises PyTorch's error from the
  graph's copy into them, after ``running_mean`` was written and before the call
  is counted (torch.nn's compiled layer counts it and leaves the statistics; the
  eager layers of both refuse it before anything changes). A :class:`FusedReLU`
  is a plain ReLU in the graph.

Dtypes: float32 and float64 run natively, and so do float16 and bfloat16 on the
CPU: the kernels read and write their 16 bits and compute in float32 with float32
parameters, as PyTorch's CPU kernels do (``numbabn.kernels.storage``; bfloat16,
which NumPy lacks, travels as its bit patterns). The backward keeps the 16-bit
input itself, as PyTorch does. On a GPU, bfloat16 is converted to float32 with a
torch op around numbabn's CUDA kernels. Parameters and buffers
may be float32 or the input's 16-bit dtype (``module.half()``); they are used in
float32.

Memory formats: contiguous and ``channels_last``/``channels_last_3d`` inputs are
read in place and the output has the input's format. CUDA tensors go to PyTorch's own
batch norm (cuDNN's) unless ``NUMBABN_TORCH_CUDA_KERNELS=1``, which runs them on
numbabn's CUDA backend through ``__cuda_array_interface__`` (zero copy; see
``numbabn.torch._bridge``).
Double backward raises a clear error where the kernels run (an input handed to
PyTorch's op, below the threshold above, has PyTorch's double backward), whether
the second derivative goes through the input, the weight or the incoming gradient.
"""

import math
import weakref
from collections.abc import Mapping
from typing import Any, NoReturn

import torch
from torch.autograd import forward_ad as fwAD
from torch.nn import functional as F

from numbabn import config
from numbabn._checks import is_real

from . import _bridge as B
from .function import BatchNormFunction, normalize

try:  # the custom operators torch.compile traces the kernels as
    from . import ops as _ops
except (AttributeError, TypeError, ValueError, RuntimeError):  # a PyTorch whose torch.library lacks what they use
    _ops = None  # the layers then break the graph under torch.compile, as before

_INPUT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_activation(owner: str, activation: str | None) -> str | None:
    """``activation`` validated: None or "relu"."""
    if activation not in (None, "relu"):
        raise ValueError(f"{owner}: activation must be None or 'relu', got {activation!r}")
    return activation


class InputMismatchError(ValueError, RuntimeError):
    """An input whose channel count or device does not fit the layer (or a parameter or
    buffer of the wrong size or device): a ValueError,
    as numbabn's checks raise it, and a RuntimeError, as torch.nn's layers raise it,
    so that code written against either catches it (as NumPy's ``AxisError`` is both
    a ValueError and an IndexError)."""


class InputDtypeError(TypeError, RuntimeError):
    """An input whose dtype does not fit the layer's parameters and buffers (or
    parameters and buffers of different dtypes): a TypeError and, as torch.nn raises
    it, a RuntimeError."""


class UnsupportedDtypeError(TypeError, NotImplementedError):
    """An input dtype batch norm does not compute in (integers, complex): a TypeError
    and, as torch.nn raises it, a NotImplementedError."""


class UnsupportedLayoutError(TypeError, NotImplementedError):
    """An input in a layout batch norm has no kernels for (``torch.sparse_coo``,
    ``torch.sparse_csr``, ...): a TypeError and, as torch.nn raises it (PyTorch's op
    has no sparse kernel), a NotImplementedError (so also a RuntimeError)."""


# Layouts PyTorch's batch norm takes that numbabn's kernels do not read: handed to
# PyTorch's op (see NumbabnBatchNorm._check_input).
_TORCH_ONLY_LAYOUTS = (torch._mkldnn,)

_STATE_NAMES = ("weight", "bias", "running_mean", "running_var")

# Tensors with memory of their own: a Parameter (learned embeddings normalised as
# input) is one; subclasses in general are not (FakeTensor, DTensor).
_PLAIN = (torch.Tensor, torch.nn.Parameter)


def _native_only(x: torch.Tensor, residual: torch.Tensor | None) -> bool:
    """Whether PyTorch's own ops must stand in for numbabn's kernels: for tensors with
    no memory of their own (``meta``, whose shapes PyTorch works out; tensor subclasses
    such as ``FakeTensor`` or ``DTensor``), under ``torch.func`` transforms (whose
    wrapped tensors have no memory numbabn may view either) and while
    ``torch.jit.trace`` or ``torch.export`` record a graph (``torch.fx.symbolic_trace``, whose input is a
    Proxy, is caught before). A recorded graph then holds PyTorch's batch norm (plus
    the residual addition and ReLU), which TorchScript, ONNX, FX and
    ``torch.export`` consumers can run; numbabn's kernels are Python calls that no
    recorded graph can hold. ``torch.compile`` is not recording in this sense: its
    graph runs the kernels as a custom operator (:mod:`numbabn.torch.ops`)."""
    if x.is_meta or type(x) not in _PLAIN or (isinstance(residual, torch.Tensor) and type(residual) not in _PLAIN):
        return True
    return torch.jit.is_tracing() or _is_exporting() or _functorch_active()


# PyTorch 2.4 and 2.5 (the oldest the extra allows) have no torch.compiler.is_exporting;
# their torch.export hands FakeTensors (a subclass, caught above) to non-strict tracing.
_is_exporting = getattr(torch.compiler, "is_exporting", lambda: False)
_is_compiling = torch.compiler.is_compiling  # True while Dynamo traces (torch.compile, strict torch.export)


def _hand_to_torch(x: torch.Tensor) -> bool:
    """Whether the layers hand ``x`` to PyTorch's op: a CPU tensor of fewer than
    ``config.TORCH_NATIVE_BELOW`` values, or a CUDA tensor unless
    ``config.TORCH_CUDA_KERNELS`` (and, decided after numbabn's input checks, a tensor
    on a device numbabn has no kernels for: :func:`_no_kernels_for`). (The size is tested
    first: under torch.compile, Dynamo records reading ``.is_cpu`` as a graph of its
    own; reading ``.is_cuda`` records none.)"""
    if x.numel() < config.TORCH_NATIVE_BELOW and x.is_cpu:
        return True
    return not config.TORCH_CUDA_KERNELS and x.is_cuda


def _channels_last_below(x: torch.Tensor, fused: bool) -> bool:
    """Whether a CPU input laid out channels-last (4-D or 5-D) is small enough that
    PyTorch's channels-last batch norm outruns numbabn's: fewer than 8x
    ``config.TORCH_NATIVE_BELOW`` values (2**23 by default), or 2x with a fused ReLU or
    residual, which saves PyTorch's separate passes. Measured with
    ``python bench/torch_small.py --channels-last`` (README, "Small inputs"): training
    0.59-0.91x from 1 M to 6.4 M values, 2.1-3.8x from 8.4 M; fused ReLU 0.88-1.16x at
    1-1.6 M, 1.05-1.77x from 2.1 M. Decided after numbabn's input checks (see
    :func:`_hand_to_torch`)."""
    factor = config.TORCH_CHANNELS_LAST_FUSED_FACTOR if fused else config.TORCH_CHANNELS_LAST_FACTOR
    limit = config.TORCH_NATIVE_BELOW * factor
    return x.numel() < limit and x.is_cpu and x.dim() in (4, 5) and B.channels_last_perm(x) is not None


def _no_kernels_for(x: torch.Tensor) -> bool:
    """Whether ``x`` is on a device other than the CPU and CUDA GPUs (MPS, XPU, ...),
    for which numbabn has no kernels. Decided after numbabn's input checks (see
    :func:`_hand_to_torch`)."""
    return not (x.is_cpu or x.is_cuda)


def _needs_graph(*tensors: torch.Tensor | None) -> bool:
    """Whether autograd must record the call: grad mode on (and not inference mode, in
    which ``enable_grad`` records nothing either) and some input requires grad."""
    return (
        torch.is_grad_enabled()
        and any(t is not None and t.requires_grad for t in tensors)
        # Dynamo cannot trace this query (a graph break, an error with fullgraph=True);
        # a compiled graph's own inference-mode handling covers that case
        and (_is_compiling() or not torch.is_inference_mode_enabled())
    )


def _torch_semantics(eps: Any, x: torch.Tensor, state: tuple[Any, ...]) -> bool:
    """Whether only PyTorch's op gives torch.nn's answer to this call: an ``eps``
    numbabn's kernels refuse (not a finite number > 0; torch.nn takes ``eps=0`` and
    divides by the variance alone); forward-mode AD (``torch.autograd.forward_ad``
    dual tensors, for which the kernels' autograd Function has no ``jvp``)."""
    if not (type(eps) is float and 0.0 < eps < math.inf) and not (is_real(eps) and 0.0 < float(eps) < math.inf):
        return True
    return _has_tangent(x, *state[:2])


def _has_tangent(*tensors: torch.Tensor | None) -> bool:
    """Whether a forward-AD level is open and one of ``tensors`` is a dual tensor."""
    if _forward_ad_level() < 0:  # no dual level open: no per-tensor check
        return False
    return any(t is not None and fwAD.unpack_dual(t).tangent is not None for t in tensors)


def _forward_ad_level() -> int:
    """The innermost open forward-AD level, -1 for none (``torch.autograd.forward_ad``
    keeps it as a module global; read so that calls outside forward AD pay no
    per-tensor check), or -1 always if a release drops the name."""
    return getattr(fwAD, "_current_level", -1)


# torch.func transforms wrap tensors in C++ wrappers of type torch.Tensor that no
# public API tells apart; PyTorch's own check, or (if a release drops it) never, in
# which case torch.func raises its own error about the kernels' autograd.Function.
_functorch_active = getattr(torch._C, "_are_functorch_transforms_active", lambda: False)

# The latest output of a batch norm whose ReLU ``convert_batchnorm(fuse_relu=True)``
# folded in: (weak reference, version counter). The :class:`FusedReLU` right after it
# passes exactly that tensor through; one slot suffices, as the FusedReLU is the next
# module, and a mismatch (another thread's call in between) only costs a ReLU pass.
_rectified: list[Any] = [None, -1]


def _not_scriptable(name: str) -> RuntimeError:
    """The error ``torch.jit.script`` raises for a numbabn module, instead of
    TorchScript's own message about the first Python construct it cannot compile.
    Raised from ``__prepare_scriptable__``, which scripting calls on every submodule
    before it compiles anything. Returning a torch.nn stand-in instead would not do:
    scripting puts what that hook returns into the caller's own model."""
    return RuntimeError(
        f"torch.jit.script cannot compile numbabn.torch.{name}: its forward calls numbabn's "
        "kernels from Python, which TorchScript cannot hold. torch.jit.trace, torch.export "
        "(and torch.onnx.export) record PyTorch's batch_norm in its place; torch.compile traces it "
        "(the kernels as a custom operator)"
    )


def _momentum_ok(momentum: Any) -> bool:
    """Whether ``momentum`` is None or a number in [0, 1], a 0-d tensor too (a Python float tested first:
    the common call pays ~0.1 us). Under torch.compile a NumPy scalar fails this
    (Dynamo traces it as an array), and the call runs behind a graph break."""
    if momentum is None or type(momentum) is float and 0.0 <= momentum <= 1.0:
        return True
    if isinstance(momentum, torch.Tensor):  # a 0-d real tensor, as torch.nn takes (a schedule's)
        if momentum.ndim or momentum.is_complex() or momentum.dtype == torch.bool:
            return False
        momentum = momentum.item()
    return is_real(momentum) and 0.0 <= momentum <= 1.0


class FusedReLU(torch.nn.ReLU):
    """What ``convert_batchnorm(fuse_relu=True)`` leaves where it took a ``ReLU`` out.

    It passes the output of the batch norm that took over its ReLU through unchanged
    (the very tensor, not modified since), and rectifies anything else: so a tool that
    swaps that batch norm for one without the fused ReLU (PyTorch's
    ``SyncBatchNorm.convert_sync_batchnorm`` or ``fuse_conv_bn_eval``, which know
    nothing of ``activation=``), a hook that returns a new tensor, or an in-place
    change in between still gets its ReLU. ReLU is idempotent, so the check can cost
    a pass but never change a result. Not seen: a change through ``tensor.data``,
    which bumps no version counter (a hook that must shift the output in place can
    write to the tensor itself, or the model can keep ``fuse_relu`` off)."""

    def forward(self, input: torch.Tensor) -> torch.Tensor:
        if _is_compiling():
            # torch.compile: a plain ReLU the graph can hold (and fuse); applied to the
            # batch norm's rectified output it changes neither values nor gradients.
            return super().forward(input)
        ref, version = _rectified
        if ref is not None and ref() is input and input._version == version:
            return input
        return super().forward(input)

    def __prepare_scriptable__(self) -> NoReturn:
        raise _not_scriptable(type(self).__name__)


class NumbabnBatchNorm:
    """The ``forward`` shared by every numbabn.torch module (mixed into a subclass
    of ``torch.nn.modules.batchnorm._BatchNorm``).

    Subclasses may override ``_synchronize`` (statistics from several
    processes), ``_input_rejected`` (tell them when the input is refused),
    ``_without_kernels`` (PyTorch's op stands in) and ``_check_call``.
    """

    def __init__(
        self,
        num_features: int,
        eps: float = 1e-5,
        momentum: float | None = 0.1,
        affine: bool = True,
        track_running_stats: bool = True,
        device: Any = None,
        dtype: torch.dtype | None = None,
        *,
        bias: bool = True,
        activation: str | None = None,
    ) -> None:
        # ``bias=`` is new in torch 2.13; older releases accept the call without it.
        # A mixin: super() is the torch.nn.BatchNorm*d class listed after it.
        super().__init__(
            num_features,
            eps,
            momentum,
            affine,
            track_running_stats,
            device,
            dtype,  # type: ignore[call-arg]
            **({} if bias else {"bias": False}),
        )
        self._set_activation(activation)

    def _set_activation(self, activation: str | None) -> None:
        self.activation = check_activation(type(self).__name__, activation)

    def extra_repr(self) -> str:
        text = super().extra_repr()
        return text if self.activation is None else f"{text}, activation={self.activation!r}"

    def _check_input(self, input: torch.Tensor, state: tuple[Any, ...]) -> None:
        """dtype, channel count and device of ``input``: clear errors before anything changes."""
        name = type(self).__name__
        if not isinstance(input, torch.Tensor):
            raise TypeError(f"{name}: input must be a torch.Tensor, got {type(input).__name__}")
        if input.layout != torch.strided and (input.layout not in _TORCH_ONLY_LAYOUTS or self._may_synchronize):
            # A oneDNN tensor goes to PyTorch's op, which torch.nn's layers call on it
            # (not a synchronizing SyncBatchNorm: its exchange reads the input's memory).
            raise UnsupportedLayoutError(
                f"{name}: input must be a dense (torch.strided) tensor, got layout {input.layout}"
            )
        self._check_input_dim(input)
        if input.dtype not in _INPUT_DTYPES:
            raise UnsupportedDtypeError(
                f"{name}: input must be float16, bfloat16, float32 or float64, got {input.dtype}"
            )
        if (state[2] is None) != (state[3] is None):  # torch.nn: a RuntimeError in eval, a ValueError in training
            missing = "running_mean" if state[2] is None else "running_var"
            raise InputMismatchError(
                f"{name}: {missing} is None but the other running statistic is not; both are tensors "
                "(track_running_stats=True) or both None"
            )
        # weight, bias or running_mean, whichever is present first (no next() with a
        # default: Dynamo in PyTorch 2.4 cannot trace it, and this runs under torch.compile)
        first = 0 if state[0] is not None else 1 if state[1] is not None else 2 if state[2] is not None else None
        ref = None if first is None else state[first]
        if ref is None and not self._may_synchronize:
            # No per-channel state (affine=False, track_running_stats=False): any channel
            # count normalises, as in torch.nn. (A SyncBatchNorm keeps num_features: its
            # ranks exchange and check that count before they gather the moments.)
            return
        if input.shape[1] != self.num_features:
            raise InputMismatchError(
                f"{name}: expected input with {self.num_features} channels (dim 1), got shape {tuple(input.shape)}"
            )
        if ref is None:
            return
        if ref.device != input.device:
            raise InputMismatchError(
                f"{name}: input is on {input.device} but the module's parameters/buffers are on {ref.device}"
            )
        if ref.dtype not in (B.COMPUTE_DTYPE[input.dtype], input.dtype):
            raise InputDtypeError(
                f"{name}: input has dtype {input.dtype} but the module's parameters/buffers have "
                f"{ref.dtype}; convert one of them (module.to(dtype) or input.to(dtype))"
            )
        # Each parameter and buffer against the first: torch.nn's op refuses mixed dtypes
        # and wrong sizes, where the kernels' write-back would round (an int64
        # running_mean) or numbabn's checks would name them gamma/beta. (A buffer on
        # another device fails loudly where it is read.) ~1 us on a 2-vCPU VM.
        dtype, shape = ref.dtype, (self.num_features,)
        for i in range(4):
            t = state[i]
            if t is not None and (t.dtype != dtype or t.shape != shape):
                self._bad_state(_STATE_NAMES[i], t, _STATE_NAMES[first], ref)

    def _bad_state(self, label: str, t: torch.Tensor, first: str, ref: torch.Tensor) -> NoReturn:
        """Raise the error for parameter or buffer ``label`` whose dtype is not that of
        ``ref`` (``first``, the first of weight, bias, running_mean) or whose shape is
        not (num_features,)."""
        name = type(self).__name__
        if t.dtype != ref.dtype:
            raise InputDtypeError(
                f"{name}: {label} has dtype {t.dtype} but {first} has {ref.dtype}; the parameters and buffers "
                "must share one dtype (module.to(dtype))"
            )
        raise InputMismatchError(
            f"{name}: {label} must have shape ({self.num_features},) (num_features), got {tuple(t.shape)}"
        )

    def _check_call(self, input: torch.Tensor, residual: torch.Tensor | None, state: tuple[Any, ...]) -> None:
        """The module's momentum, and what autograd would refuse only after the kernels
        had updated the running statistics: checked before anything changes, on every
        path (PyTorch's own op, for small inputs, would accept any momentum). Ordered
        so that the common call pays ~1 us: rare conditions are tested first, the
        costlier ones (``_needs_graph``, ``is_real``) only when they are met."""
        if not _momentum_ok(self.momentum):
            raise ValueError(
                f"{type(self).__name__}: momentum must be None or a number in [0, 1], got {self.momentum!r}"
            )
        if type(self.eps) is not float:
            try:
                float(self.eps)
            except OverflowError:  # 10**400: PyTorch's op raised a bare OverflowError
                raise ValueError(
                    f"{type(self).__name__}: eps must be a number a float can hold, got {self.eps!r}"[:200]
                ) from None
        weight, bias, running_mean, running_var, _ = state
        if (running_mean is not None and running_mean.requires_grad) or (
            running_var is not None and running_var.requires_grad
        ):
            if torch.is_grad_enabled():
                buffer = "running_mean" if running_mean is not None and running_mean.requires_grad else "running_var"
                raise RuntimeError(
                    f"{type(self).__name__}: {buffer} requires grad; batch norm is not differentiable with "
                    "respect to its running statistics (as in torch.nn)"
                )
        if self._may_synchronize and _has_tangent(input, weight, bias, residual):
            # PyTorch's op cannot stand in for a synchronizing layer, and the kernels'
            # autograd Function has no jvp: refused before anything changes (every
            # rank is told, see _input_rejected).
            raise NotImplementedError(
                f"{type(self).__name__}: forward-mode AD (dual tensors) is not supported by a "
                "synchronizing numbabn layer; use reverse mode, or a single process"
            )
        if (
            self.training
            and self.track_running_stats
            and running_mean is not None
            and running_mean.is_inference()
            and not torch.is_inference_mode_enabled()
        ):
            # The kernels would write them through NumPy, which no inference check sees
            # (torch.nn raises from its op, after counting the call).
            raise RuntimeError(
                f"{type(self).__name__}: the running statistics are inference tensors (the layer was made "
                "under torch.inference_mode()); a training call outside inference mode cannot update them "
                "in place (as in torch.nn). Clone the buffers, or train inside torch.inference_mode()"
            )
        if (
            input.is_inference()
            or (weight is not None and weight.is_inference())
            or (residual is not None and residual.is_inference())
        ) and _needs_graph(input, weight, bias, residual):
            raise RuntimeError(
                f"{type(self).__name__}: inference tensors cannot be saved for backward (as in torch.nn): clone "
                "a tensor made under torch.inference_mode() to use it where autograd records, or use torch.no_grad()"
            )
        if self._one_value_per_channel(input, running_mean):
            # the message of torch.nn's op, named by the layer on both paths
            raise ValueError(
                f"{type(self).__name__}: Expected more than 1 value per channel when training, got input size "
                f"{input.size()}"
            )

    def __prepare_scriptable__(self) -> NoReturn:
        raise _not_scriptable(type(self).__name__)

    def load_state_dict(self, state_dict: Mapping[str, Any], strict: bool = True, assign: bool = False) -> Any:
        """torch.nn's ``load_state_dict``, all or nothing: a load that raises (a wrong
        shape, or under ``strict`` a missing or unexpected key) leaves the parameters
        and buffers as they were, where torch.nn's copies every key that fits first."""
        held = self._holding()
        try:
            return super().load_state_dict(state_dict, strict, assign)
        except BaseException:
            self._put_back(held)
            raise

    def _load_from_state_dict(
        self,
        state_dict: dict[str, Any],
        prefix: str,
        local_metadata: dict[str, Any],
        strict: bool,
        missing_keys: list[str],
        unexpected_keys: list[str],
        error_msgs: list[str],
    ) -> None:
        """The same inside a model's load: a key of this module that does not fit (the
        error ``load_state_dict`` raises at the end) leaves this module's parameters and
        buffers as they were. (Whether missing keys are an error is decided by the
        model's ``strict`` after every module loaded; other modules load as in torch.nn.)"""
        errors = len(error_msgs)
        held = self._holding()
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )
        if len(error_msgs) > errors:
            self._put_back(held)

    def _holding(self) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """name -> (parameter or buffer, a copy of its values), for :meth:`_put_back`."""
        return {
            name: (t, t.detach().clone())
            for table in (self._parameters, self._buffers)
            for name, t in table.items()
            if t is not None
        }

    @torch.no_grad()
    def _put_back(self, held: dict[str, tuple[torch.Tensor, torch.Tensor]]) -> None:
        """The parameters and buffers of :meth:`_holding`, objects and values (a load with
        ``assign=True`` replaced the objects, one without it overwrote the values)."""
        for name, (t, value) in held.items():
            t.copy_(value)
            (self._parameters if name in self._parameters else self._buffers)[name] = t

    def _input_rejected(self, error: Exception) -> None:
        """Called with the input's validation error just before it is raised."""

    def _synchronize(self, x: torch.Tensor, batch_stats: bool) -> tuple[Any, Any]:
        """``(moments, allreduce)`` for :class:`BatchNormFunction`: (None, None) here,
        i.e. this process's batch alone."""
        return None, None

    def _without_kernels(self, input: Any, residual: Any, batch_stats: bool) -> None:
        """Called with the call's ``input`` (a tensor, or a ``torch.fx.Proxy``) and
        ``residual`` when PyTorch's own batch norm stands in for the kernels (see
        :func:`_native_only`), before anything changes."""

    def _check_residual(self, input: torch.Tensor, residual: Any) -> None:
        """``residual`` fits ``input``: a dense tensor of its shape, dtype and device.
        A mismatch raises numbabn's checks' ValueError/TypeError that are also the
        RuntimeError ``bn(input) + residual`` raises in torch.nn (a dtype mismatch,
        which torch would promote, is refused: the fused pass writes the input's dtype)."""
        name = type(self).__name__
        if not isinstance(residual, torch.Tensor):
            raise TypeError(f"{name}: residual must be a torch.Tensor or None, got {type(residual).__name__}")
        if residual.shape != input.shape:
            raise InputMismatchError(
                f"{name}: residual must have the input's shape {tuple(input.shape)}, got {tuple(residual.shape)}"
            )
        if residual.layout != input.layout:
            # (a oneDNN input's residual is added by PyTorch, which needs both oneDNN)
            expected = "a dense (torch.strided) tensor" if input.layout == torch.strided else f"a {input.layout} tensor"
            raise InputDtypeError(f"{name}: residual must be {expected}, as the input is, got layout {residual.layout}")
        if residual.dtype != input.dtype:
            raise InputDtypeError(f"{name}: residual must have the input's dtype {input.dtype}, got {residual.dtype}")
        if residual.device != input.device:
            raise InputMismatchError(f"{name}: residual is on {residual.device} but the input is on {input.device}")

    # Set by convert_batchnorm(fuse_relu=True) on the batch norms a FusedReLU follows.
    _feeds_fused_relu = False
    # Whether the layer may exchange statistics with other processes (SyncBatchNorm).
    _may_synchronize = False

    def forward(self, input: torch.Tensor, residual: torch.Tensor | None = None) -> torch.Tensor:
        """``bn(input)``, then ``+ residual`` when given, then the fused activation."""
        if _is_compiling() and not _is_exporting():
            # torch.compile (torch.export records PyTorch's op instead, see _native_only).
            # An input the layer hands to PyTorch anyway (a CPU input below the
            # threshold, a CUDA tensor) goes into the graph as PyTorch's ops, which the
            # compiler may fuse; PyTorch's op checks it, as under torch.fx. Not with
            # momentum=None in training: its factor 1/(count + 1) would reach PyTorch's
            # op as a Python float, which the graph would hold as a constant,
            # recompiled every step. Any other input _traced_forward traces.
            cumulative = self.momentum is None and self.training
            if isinstance(input, torch.Tensor) and not self._may_synchronize:
                # Under torch.func transforms (compiled grad, vmap, vjp), PyTorch's op
                # too, as eagerly (_native_only): numbabn's autograd.Function has no
                # setup_context, which functorch requires.
                if not cumulative and (_hand_to_torch(input) or _functorch_active()):
                    return self._torch_forward(input, residual)
                y = self._traced_forward(input, residual)
                if y is not None:
                    return y
            # What it cannot trace runs as it does eagerly, as one opaque call -- one
            # graph break -- rather than Dynamo tracing numbabn's Python (NumPy views of
            # the tensors, the kernels' thread pool and its locks, weak references),
            # which broke the graph four times per layer, with a warning each time.
            # (anything but a tensor goes to the eager path, whose checks name it)
            return torch.compiler.disable(self._eager_forward)(input, residual)
        return self._eager_forward(input, residual)

    def _traced_forward(self, input: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor | None:
        """The layer as Dynamo traces it into the graph (``torch.compile``), deciding
        what the eager path decides from what Dynamo guards on (shapes, strides,
        dtype, device, grad mode, the module's attributes): the kernels as the
        custom operator ``numbabn::batch_norm`` (:mod:`numbabn.torch.ops`), or
        PyTorch's op where the eager layer hands the input to it. None where the
        call must run eagerly behind a graph break: an input the checks refuse
        (the eager path raises their error), a call only PyTorch's op answers with
        ``momentum=None`` in training (its factor would be a graph constant), the
        kernels on a CUDA device (``NUMBABN_TORCH_CUDA_KERNELS=1``).
        Not SyncBatchNorm while it may synchronize (its exchange between processes
        is not an operator): :meth:`forward` breaks the graph there."""
        try:
            state = self._state()
            self._check_input(input, state)
            if residual is not None:
                self._check_residual(input, residual)
        except (TypeError, ValueError, RuntimeError):
            return None
        if not self._traced_call_ok(input, state):
            return None
        _, _, mean, var, nbt = state
        settings: tuple[bool, float | None, bool, Any, Any]
        if self.momentum is None and self.training and self.track_running_stats and nbt is not None:
            # _settings would read the count (int(nbt)), a graph break: the operator
            # reads it when it runs (momentum None), and PyTorch's op cannot.
            settings = (True, None, True, mean, var)
        else:
            settings = self._settings(state)
        tracking, momentum, batch_stats, running_mean, running_var = settings
        if self._torch_decides(input, residual, state, batch_stats):
            # PyTorch's op, as in the eager path (see _forward), into the graph.
            if momentum is None:
                return None
            return self._torch_forward(input, residual, settings=settings, state=state)
        if not input.is_cpu or _ops is None:
            return None
        cdt = B.COMPUTE_DTYPE[input.dtype]
        weight, bias = state[0], state[1]
        # .to() as in the eager path: autograd (here the graph) carries the gradient back
        if weight is not None and weight.dtype != cdt:
            weight = weight.to(cdt)
        if bias is not None and bias.dtype != cdt:
            bias = bias.to(cdt)
        return _ops.batch_norm(
            input,
            weight,
            bias,
            running_mean,
            running_var,
            nbt if tracking else None,
            residual,
            batch_stats,
            momentum,
            self.eps,
            self.activation == "relu",
        )

    def _traced_call_ok(self, input: torch.Tensor, state: tuple[Any, ...]) -> bool:
        """Whether :meth:`_check_call` would pass, in what Dynamo can trace: momentum,
        running statistics that require grad, one value per channel. Its inference
        tensor checks are left out (Dynamo cannot trace ``Tensor.is_inference``;
        PyTorch's in-place copy into inference buffers raises instead)."""
        if isinstance(self.momentum, torch.Tensor) or not _momentum_ok(self.momentum):
            # A tensor momentum is read (float()) when the call runs: traced, it became an
            # unbacked SymFloat that the operator's float? schema refused (with
            # capture_scalar_outputs): eager, behind a graph break, as torch.nn's too.
            return False
        running_mean, running_var = state[2], state[3]
        if torch.is_grad_enabled() and (
            (running_mean is not None and running_mean.requires_grad)
            or (running_var is not None and running_var.requires_grad)
        ):
            return False
        return not self._one_value_per_channel(input, running_mean)

    def _one_value_per_channel(self, input: torch.Tensor, running_mean: torch.Tensor | None) -> bool:
        """Whether a call that normalises with the batch's statistics has one value per
        channel (the product of the other dimensions is 1), which torch.nn refuses (a
        synchronizing layer counts the other ranks' values too)."""
        return (
            (self.training or running_mean is None)
            and not self._may_synchronize
            and input.numel() == input.shape[1] > 0
        )

    def _eager_forward(self, input: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        y = self._forward(input, residual)
        # Not while Dynamo traces (strict torch.export): it cannot trace is_inference,
        # and the graph's FusedReLU then applies its ReLU again, which changes nothing.
        if self._feeds_fused_relu and self.activation == "relu" and isinstance(y, torch.Tensor) and not _is_compiling():
            # An inference-mode tensor has no version counter to tell an in-place
            # change by: the FusedReLU after it rectifies it again (idempotent).
            _rectified[:] = (None, -1) if y.is_inference() else (weakref.ref(y), y._version)
        return y

    def _forward(self, input: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
        if isinstance(input, torch.fx.Proxy):  # torch.fx.symbolic_trace
            tracer = input.tracer
            if self is not getattr(tracer, "root", None):
                # A submodule: recorded as one call of the layer, as torch.fx keeps
                # torch.nn's layers (its default leaf rule only knows torch.nn's
                # classes), so the GraphModule follows train()/eval(), momentum=None
                # and the batch count; tracing through would fix them as constants.
                try:
                    path = tracer.path_of_module(self)
                except NameError:  # not a submodule of the traced root
                    path = None
                if path:
                    args = (input,) if residual is None else (input, residual)
                    return tracer.create_proxy("call_module", path, args, {})
            # The traced module itself: its graph holds PyTorch's op, as torch.nn's does.
            # The batch counter as a proxy: its add_ then goes into the graph, which counts
            # its calls, instead of counting one batch on the module at trace time.
            weight, bias, mean, var, nbt = self._state()
            if self.momentum is None and self.training and self.track_running_stats and nbt is not None:
                raise TypeError(
                    f"{type(self).__name__}: torch.fx.symbolic_trace of the layer itself in training mode "
                    "with momentum=None: its factor 1/(batches + 1) depends on the batch count, which the "
                    "graph cannot pass to PyTorch's batch_norm; trace a model that contains the layer (it is "
                    "recorded as one call), trace it in eval mode, or give a momentum"
                )
            if nbt is not None:
                nbt = tracer.create_proxy("get_attr", "num_batches_tracked", (), {})
            return self._torch_forward(input, residual, state=(weight, bias, mean, var, nbt))
        if isinstance(input, torch.Tensor) and _native_only(input, residual):
            # PyTorch's op checks its input itself; ours would put data-dependent
            # branches into a traced graph (TracerWarning), as torch.nn's layers do not.
            return self._torch_forward(input, residual)
        try:
            state = self._state()
            self._check_input(input, state)
            if residual is not None:
                self._check_residual(input, residual)
            self._check_call(input, residual, state)
        except (TypeError, ValueError, RuntimeError) as exc:
            self._input_rejected(exc)
            raise
        settings = self._settings(state)
        tracking, momentum, batch_stats, running_mean, running_var = settings
        moments, allreduce = self._synchronize(input, batch_stats)
        if moments is None and self._torch_decides(input, residual, state, batch_stats):
            # Nothing to compute, or too little for the kernels to win: below the
            # crossover, what numbabn adds around them per call (Python, the autograd
            # Function) costs more than they save (README, "Small inputs"); on a GPU,
            # launching them does (README, "On a GPU"). Or a call only PyTorch's op
            # answers as torch.nn does (see _torch_semantics). Decided before any
            # conversion below: PyTorch gets the tensors as they came.
            return self._torch_forward(input, residual, settings=settings, state=state)
        # bfloat16 on a GPU -> float32 as a torch op: numbabn's CUDA kernels read
        # float16/32/64 (on the CPU its 16-bit patterns go to the kernels as they are).
        x = input.float() if input.dtype == torch.bfloat16 and not input.is_cpu else input
        if residual is not None and residual.dtype == torch.bfloat16 and not residual.is_cpu:
            residual = residual.float()
        cdt = B.COMPUTE_DTYPE[x.dtype]
        # .to() only where the dtype differs: each call is a torch op (1-2 us on a small batch)
        weight, bias = (p if p is None or p.dtype == cdt else p.to(cdt) for p in state[:2])
        relu = self.activation == "relu"
        nbt = state[4] if tracking else None  # counted with the running statistics (see normalize)
        args = (x, weight, bias, running_mean, running_var, batch_stats, momentum, self.eps, relu, moments)
        if _needs_graph(x, weight, bias, residual):
            y = BatchNormFunction.apply(*args, allreduce, residual, nbt)
        else:  # no gradient can flow (no_grad, inference mode, nothing requires grad): no autograd node
            y = normalize(*args, residual, nbt)[0]
        return y if y.dtype == input.dtype else y.to(input.dtype)

    def _plain_inference(self, x: torch.Tensor, residual: torch.Tensor | None, state: tuple[Any, ...]) -> bool:
        """Whether this call with running statistics is plain inference that PyTorch's op
        does at least as fast: a CPU input of fewer than ``config.TORCH_NATIVE_EVAL_BELOW``
        values, no fused ReLU, no residual, no autograd graph to record. Both then read x
        and write y once; numbabn's kernels gain nothing there and its threads and Python
        cost (0.45-0.89x of PyTorch from 2**20 to 6.4M values; README, "Small inputs")."""
        return (
            x.numel() < config.TORCH_NATIVE_EVAL_BELOW
            and x.is_cpu
            and self.activation is None
            and residual is None
            and not _needs_graph(x, state[0], state[1])
        )

    def _state(self) -> tuple[Any, Any, Any, Any, Any]:
        """(weight, bias, running_mean, running_var, num_batches_tracked), as
        ``self.weight`` etc. would give them, read from the module's parameter and
        buffer dicts where they live: each ``self.weight`` goes through
        ``Module.__getattr__`` (1.9 us against 0.2 us on a 2-vCPU VM, and a small
        batch's forward read a dozen). A name not in its dict (a parametrization,
        a hook that replaced it) is read as an attribute."""
        p, b = self._parameters, self._buffers
        return (
            p["weight"] if "weight" in p else self.weight,
            p["bias"] if "bias" in p else self.bias,
            b["running_mean"] if "running_mean" in b else self.running_mean,
            b["running_var"] if "running_var" in b else self.running_var,
            b["num_batches_tracked"] if "num_batches_tracked" in b else self.num_batches_tracked,
        )

    def _torch_decides(
        self, input: torch.Tensor, residual: torch.Tensor | None, state: tuple[Any, ...], batch_stats: bool
    ) -> bool:
        """Whether PyTorch's op computes this (checked) call, eagerly and under
        torch.compile alike: an input without values or in oneDNN's layout (which
        ``_check_input`` lets through), one below the thresholds of "Small inputs"
        (see the module docstring), a device without numbabn kernels, or a call
        only PyTorch's op answers as torch.nn does (:func:`_torch_semantics`)."""
        return (
            input.numel() == 0
            or input.layout != torch.strided
            or _hand_to_torch(input)
            or _channels_last_below(input, fused=self.activation is not None or residual is not None)
            or _no_kernels_for(input)
            or _torch_semantics(self.eps, input, state)
            or (not batch_stats and self._plain_inference(input, residual, state))
        )

    def _settings(self, state: tuple[Any, ...]) -> tuple[bool, float, bool, Any, Any]:
        """(tracking, momentum, batch_stats, running_mean, running_var) of this call, as
        torch.nn computes them, from ``state`` (:meth:`_state`): ``tracking`` = count
        the call; momentum=None gives 1/(calls so far + 1); batch statistics in
        training mode and without buffers; the buffers unless training without
        ``track_running_stats``."""
        _, _, mean, var, nbt = state
        tracking = self.training and self.track_running_stats and nbt is not None
        momentum = 0.0 if self.momentum is None else float(self.momentum)  # float(): a 0-d tensor too
        if tracking and self.momentum is None:
            if int(nbt) < 0:  # 1/(count + 1) of -1: a bare ZeroDivisionError (torch.nn's too)
                raise ValueError(
                    f"{type(self).__name__}: num_batches_tracked must be >= 0 for momentum=None (the cumulative "
                    f"average over the calls counted), got {int(nbt)}"
                )
            momentum = 1.0 / (int(nbt) + 1)
        batch_stats = self.training or (mean is None and var is None)
        use_buffers = not self.training or self.track_running_stats
        running_mean, running_var = (mean, var) if use_buffers else (None, None)
        return tracking, momentum, batch_stats, running_mean, running_var

    def _torch_forward(
        self,
        input: torch.Tensor,
        residual: torch.Tensor | None,
        settings: tuple[bool, float, bool, Any, Any] | None = None,
        state: tuple[Any, ...] | None = None,
    ) -> torch.Tensor:
        """PyTorch's ops in place of the kernels (see :func:`_native_only`; an input
        with few or no values): ``F.batch_norm`` as torch.nn's
        layer calls it, then ``+ residual``, then the activation; ``state`` and
        ``settings`` those of :meth:`_state` and :meth:`_settings` when the caller
        has them. No input checks here: under
        ``torch.fx.symbolic_trace`` the input is a Proxy, which cannot answer them."""
        state = state or self._state()
        tracking, momentum, batch_stats, running_mean, running_var = settings or self._settings(state)
        self._without_kernels(input, residual, batch_stats)
        weight, bias, _, _, nbt = state
        # Counted before the op, as torch.nn counts: the recomputation of
        # torch.utils.checkpoint(use_reentrant=False) may stop inside it (by raising,
        # once it saved its last needed tensor) after it updated the running statistics.
        if tracking:
            nbt.add_(1)
        try:
            y = F.batch_norm(input, running_mean, running_var, weight, bias, batch_stats, momentum, self.eps)
        except (RuntimeError, ValueError, TypeError, IndexError, OverflowError):  # PyTorch refused: nothing changes
            # (IndexError: a layer of 0 channels. Not any Exception: the stop of a
            # checkpoint's recomputation, raised from inside the op, must keep the count.)
            if tracking:
                nbt.sub_(1)
            raise
        if isinstance(residual, torch.fx.Proxy):
            # An argument of the traced root, None or a tensor only when the graph runs
            # (its default is None): the graph decides then.
            y = residual.tracer.create_proxy("call_function", _plus_residual, (y, residual), {})
        elif residual is not None:
            y = y + residual
        return F.relu(y) if self.activation == "relu" else y


def _plus_residual(y: torch.Tensor, residual: torch.Tensor | None) -> torch.Tensor:
    """``y + residual``, or ``y`` when there is none: the addition of a traced root
    layer's graph (see :meth:`NumbabnBatchNorm._torch_forward`)."""
    return y if residual is None else y + residual


class BatchNorm1d(NumbabnBatchNorm, torch.nn.BatchNorm1d):
    """``torch.nn.BatchNorm1d`` on numbabn's kernels: (N, C) or (N, C, L) input.
    ``activation="relu"`` fuses a ReLU. See :mod:`numbabn.torch.modules`."""


class BatchNorm2d(NumbabnBatchNorm, torch.nn.BatchNorm2d):
    """``torch.nn.BatchNorm2d`` on numbabn's kernels: (N, C, H, W) input, contiguous
    or channels_last. ``activation="relu"`` fuses a ReLU. See :mod:`numbabn.torch.modules`."""


class BatchNorm3d(NumbabnBatchNorm, torch.nn.BatchNorm3d):
    """``torch.nn.BatchNorm3d`` on numbabn's kernels: (N, C, D, H, W) input, contiguous
    or channels_last_3d. ``activation="relu"`` fuses a ReLU. See :mod:`numbabn.torch.modules`."""
