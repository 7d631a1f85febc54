"""The explicit (no autograd) layer contract: :class:`Parameter` and :class:`Layer`.

A layer is a small object with a hand-written backward pass::

    y  = layer.forward(x)      # caches what backward needs (the last input only)
    dx = layer.backward(dy)    # dy has y's shape; sets every Parameter's .grad
    layer.parameters()         # [Parameter(name, value, grad), ...], children included
    layer.train() / .eval()    # both return the layer; .training tells the mode
    layer.state_dict()         # {"0.weight": array, "1.running_mean": array, ...}
    layer.load_state_dict(d)   # validated first, then copied in place; strict=False
                               # loads the keys both sides have -> (missing, unexpected)
    layer.reset_parameters()   # parameters re-initialised, buffers back to their start
    layer.reset_running_stats()   # buffers only (running statistics, counters)

``backward`` *sets* ``.grad`` (it does not accumulate): one forward, one backward,
one gradient. What ``forward`` caches is the input itself, by reference, not a copy
(a copy per layer and step would double the memory traffic of a batch norm): do not
modify ``x`` in place between ``forward`` and ``backward``, or the gradients are
computed from the modified values. PyTorch detects this with version counters;
NumPy arrays have none, so here nothing can.

``optim.Optimizer.zero_grad`` sets grads to None so that a parameter a backward pass
did not reach is skipped by the next step, as in PyTorch.

State (parameters and buffers such as running statistics) lives in NumPy arrays that
are updated in place and never replaced, so optimizers and callers can hold on to
them. ``load_state_dict`` copies into those arrays.

Pickles (and ``copy.deepcopy``) hold the state and the settings, not what the last
forward cached for its backward (each class names those attributes in
``_transient``): a pickled layer is as small after a forward as before one, and
its ``backward`` needs a new ``forward``.

Normalisation layers (``_accepts_float16``) of dtype float32 also take float16
input, as PyTorch's CPU kernels do: statistics and arithmetic in float32, output
and input gradient float16, parameter gradients float32. Every other dtype
mismatch is refused. Big-endian input is converted to the native byte order, and
a masked array with masked values is refused (see ``numbabn._layout``).
"""

from collections import namedtuple
from collections.abc import Callable, Mapping
from typing import Any

import numpy as np
from numpy.typing import DTypeLike

from .. import _checks as V
from .._layout import host_array, is_device_array
from .._typing import FloatArray

IncompatibleKeys = namedtuple("IncompatibleKeys", ["missing_keys", "unexpected_keys"])
IncompatibleKeys.__doc__ = """What :meth:`Layer.load_state_dict` returns, as in PyTorch: the layer's keys
absent from the state dict and the state dict's keys the layer does not have
(both empty after a strict load)."""


class Parameter:
    """A trainable array and its gradient.

    ``name`` is the name inside its layer ("weight", "bias"); qualified names
    ("0.weight") come from :meth:`Layer.named_parameters`. ``value`` is updated in
    place by optimizers; ``grad`` is None until a backward pass sets it (same shape
    and dtype as ``value``).
    """

    __slots__ = ("name", "value", "grad")

    def __init__(self, name: str, value: FloatArray, grad: FloatArray | None = None) -> None:
        self.name = name
        self.value = value
        self.grad = grad

    def __repr__(self) -> str:
        grad = "None" if self.grad is None else "set"
        return f"Parameter(name={self.name!r}, shape={self.value.shape}, dtype={self.value.dtype}, grad={grad})"


def _all_layers(layer: "Layer") -> list["Layer"]:
    out = [layer]
    for child in layer._children.values():
        out.extend(_all_layers(child))
    return out


def saved_modes(layer: "Layer") -> Callable[[], None]:
    """A callable that sets the training flag of ``layer`` and of every layer inside it
    back to what it is now, and those of the modules a layer wraps (a layer with a
    ``snapshot_modes()`` method, such as ``numbabn.train.torch_adapter.TorchLayer``): for a
    call that switches modes for a while and must leave a layer the user put in eval
    mode inside a training model as it was."""
    flags = [(lay, lay.training) for lay in _all_layers(layer)]
    inner = [lay.snapshot_modes() for lay, _ in flags if hasattr(lay, "snapshot_modes")]

    def put_back() -> None:
        for lay, mode in flags:
            lay.training = mode
        for restore_inner in inner:
            restore_inner()

    return put_back


def train_for_fit(model: "Layer") -> None:
    """The modes a training step runs in: a model in eval mode (its own flag off, as
    ``model.eval()`` leaves it) is put in training mode, every layer of it; a model in
    training mode is left as it is, so a layer the user put in eval mode inside it (a
    frozen batch norm for fine-tuning) stays in eval mode, as with PyTorch's
    ``model.train(); model.bn.eval()``."""
    if not model.training:
        model.train()


_TRANSIENT: dict[type, tuple[str, ...]] = {}  # per class: every Sequential forward asks, for every layer


def _transient_names(cls: type) -> tuple[str, ...]:
    """The forward-cache attributes of ``cls`` and its bases (``_transient``)."""
    names = _TRANSIENT.get(cls)
    if names is None:
        names = _TRANSIENT[cls] = tuple(name for c in cls.__mro__ for name in vars(c).get("_transient", ()))
    return names


def forget_caches(saved: dict[str, Any], drop_live_but: "Layer | None" = None) -> None:
    """Forget the forward caches that :func:`capture` ``saved`` holds: :func:`restore`
    then sets them to None, as a pickled layer has them (a backward needs a new
    forward). Kept, they would live as long as ``saved``, next to the caches of every
    forward since. ``drop_live_but``: also set the captured layers' own caches to
    None, but for that layer and its sub-layers (a forward's first layer, which
    already holds its new ones)."""
    keep = set() if drop_live_but is None else {id(lay) for lay in _all_layers(drop_live_but)}
    for lay, attrs in saved["attrs"]:
        for name in _transient_names(type(lay)):
            if name in attrs:
                attrs[name] = None
                if drop_live_but is not None and id(lay) not in keep:
                    setattr(lay, name, None)


def capture(
    layer: "Layer", parameters: bool = False, optimizer: Any = None, forward: bool = True, backward: bool = True
) -> dict[str, Any]:
    """Everything a call on ``layer`` may change, saved so that :func:`restore` puts it
    back exactly: every sub-layer's attributes (forward caches, training flag), buffers
    (copied), random generators' states and parameter gradients (references; layers
    rebind ``.grad`` rather than writing into it), plus, with ``parameters``, copies of
    the parameter values and, with ``optimizer``, its state. Buffers are small (C values
    per layer); parameter copies are for calls that update them (a training run).
    ``forward``/``backward`` False leave out what only the other pass changes (the
    buffers and generators, or the gradients), which makes a capture cheaper."""
    layers = _all_layers(layer)
    attrs: list[Any] = []
    buffers: list[Any] = []
    rngs: list[Any] = []
    grads: list[Any] = []
    for lay in layers:
        d = vars(lay)
        attrs.append((lay, d.copy()))
        if forward:  # what a forward pass changes: running statistics, generators
            buffers.extend((b, b.copy()) for b in lay._buffers.values())
            rngs.extend((g, g.bit_generator.state) for g in d.values() if type(g) is np.random.Generator)
        if backward:  # what a backward pass changes: gradients
            grads.extend((p, p.grad) for p in lay._parameters.values())
    saved: dict[str, Any] = {"attrs": attrs, "buffers": buffers, "rngs": rngs, "grads": grads}
    if parameters:
        saved["values"] = [(p.value, p.value.copy()) for p in layer.parameters()]
    if optimizer is not None:
        has_state = callable(getattr(optimizer, "state_dict", None)) and callable(
            getattr(optimizer, "load_state_dict", None)
        )
        saved["optimizer"] = (
            optimizer,
            dict(vars(optimizer)) if hasattr(optimizer, "__dict__") else None,
            optimizer.state_dict() if has_state else None,
        )
    return saved


def restore(saved: dict[str, Any]) -> None:
    """Undo everything since :func:`capture` (arrays are written back in place)."""
    for lay, attrs in saved["attrs"]:
        vars(lay).clear()
        vars(lay).update(attrs)
    for target, copy in saved["buffers"] + saved.get("values", []):
        if target.flags.writeable:
            np.copyto(target, copy)
    for g, state in saved["rngs"]:
        g.bit_generator.state = state
    for p, grad in saved["grads"]:
        p.grad = grad
    if "optimizer" in saved:
        optimizer, attrs, state = saved["optimizer"]
        if attrs is not None:
            vars(optimizer).clear()
            vars(optimizer).update(attrs)
        if state is not None:
            optimizer.load_state_dict(state)


def check_layer_dtype(owner: str, dtype: DTypeLike) -> np.dtype[Any]:
    """The dtype a layer computes in: float32 or float64 (float16 has no layers).
    ``None`` is refused (``np.dtype(None)`` would silently mean float64)."""
    if dtype is None:
        raise TypeError(f"{owner}: dtype must be float32 or float64, got None")
    try:
        dt = np.dtype(dtype)
    except TypeError:
        raise TypeError(f"{owner}: dtype must be float32 or float64, got {dtype!r}") from None
    if dt not in (np.dtype(np.float32), np.dtype(np.float64)):
        raise TypeError(f"{owner}: dtype must be float32 or float64, got {dt}")
    return dt


check_positive_int = V.check_int  # (owner, name, value) -> int >= 1


def check_rng(owner: str, rng: np.random.Generator | int | None) -> np.random.Generator:
    """``None`` (fresh entropy), a seed (an int >= 0: ``numpy.random.default_rng(seed)``)
    or a ``numpy.random.Generator`` (kept, not copied)."""
    if rng is None:
        return np.random.default_rng()
    if V.is_int(rng):
        return np.random.default_rng(V.check_int(owner, "rng", rng, 0))
    if not isinstance(rng, np.random.Generator):
        raise TypeError(
            f"{owner}: rng must be a numpy.random.Generator, an int seed >= 0 or None, got {V.describe(rng)}"
        )
    return rng


class Layer:
    """Base class. Subclasses implement ``forward`` and ``backward`` and declare
    their state with :meth:`add_parameter`, :meth:`add_buffer` and :meth:`Layer.add_child`
    (which also gives ``parameters``, ``state_dict``, ``train``/``eval`` and ``repr``
    their order). A layer made for the registry also provides the classmethod
    ``_contract_example(rng, dtype) -> (layer, x)`` used by the contract test.

    Layers holding arrays compute in one ``dtype`` (float32 by default) and reject
    inputs of another dtype instead of silently promoting them.
    """

    dtype: np.dtype[Any] | None = None  # None: the layer follows its input's dtype (activations, containers)
    _accepts_float16 = False  # float16 input into a float32 layer (normalisation layers)
    _transient: tuple[str, ...] = ()  # attributes holding forward caches: not pickled
    _accepts_device = False  # GPU input and dy kept on the device (layers computing only via functional)

    def __init__(self) -> None:
        self.training = True
        self._parameters: dict[str, Parameter] = {}
        self._buffers: dict[str, Any] = {}
        self._buffer_init: dict[str, Any] = {}
        self._buffer_checks: dict[str, Callable[..., Any]] = {}
        self._children: dict[str, Layer] = {}

    # ------------------------------------------------------------ declaring state
    def add_parameter(self, name: str, value: FloatArray) -> Parameter:
        """Register a trainable array; returns its :class:`Parameter`."""
        param = Parameter(name, value)
        self._parameters[name] = param
        return param

    def add_buffer(self, name: str, value: Any, check: Callable[..., Any] | None = None) -> Any:
        """Register a non-trainable array saved in the state dict (running stats).

        Its value now is what :meth:`reset_running_stats` restores. ``check(fn, key,
        value)``, if given, validates a value :meth:`load_state_dict` is about to
        copy in (beyond shape and dtype) and raises on a bad one."""
        self._buffers[name] = value
        self._buffer_init[name] = np.array(value, copy=True)
        if check is not None:
            self._buffer_checks[name] = check
        return value

    def add_child(self, name: str, layer: "Layer") -> "Layer":
        """Register ``layer`` (a :class:`Layer`) as the child ``name``, in order.

        A layer may occur once in a model (ValueError otherwise, also through nested
        containers): its ``forward`` keeps the input that its ``backward`` uses, so a
        second use would overwrite it and give wrong parameter gradients (PyTorch's
        autograd records each use instead)."""
        if not isinstance(layer, Layer):
            raise TypeError(f"{type(self).__name__}: child {name!r} must be a Layer, got {V.describe(layer)}")
        present = {id(x) for x in _all_layers(self)}
        repeated = next((x for x in _all_layers(layer) if id(x) in present), None)
        if repeated is not None:
            raise ValueError(
                f"{type(self).__name__}: child {name!r} would use {repeated._short()} a second time in one model; "
                "a layer keeps the input of its forward for its backward, so each use needs a layer of its own"
            )
        self._children[name] = layer
        return layer

    # ------------------------------------------------------------ computation
    def forward(self, x: FloatArray) -> FloatArray:
        raise NotImplementedError(f"{type(self).__name__} does not implement forward")

    def backward(self, dy: FloatArray) -> FloatArray:
        raise NotImplementedError(f"{type(self).__name__} does not implement backward")

    def __call__(self, x: FloatArray) -> FloatArray:
        return self.forward(x)

    @classmethod
    def _contract_example(cls, rng: np.random.Generator, dtype: Any) -> tuple["Layer", FloatArray]:
        """A small ``(layer, x)`` of ``dtype`` for the layer contract test."""
        raise NotImplementedError(f"{cls.__name__} does not provide _contract_example(rng, dtype)")

    # ------------------------------------------------------------ traversal
    def children(self) -> list["Layer"]:
        return list(self._children.values())

    def named_parameters(self, prefix: str = "") -> list[tuple[str, Parameter]]:
        """``[(qualified_name, Parameter)]``: own parameters first, then children's."""
        out = [(prefix + name, p) for name, p in self._parameters.items()]
        for cname, child in self._children.items():
            out.extend(child.named_parameters(f"{prefix}{cname}."))
        return out

    def parameters(self) -> list[Parameter]:
        return [p for _, p in self.named_parameters()]

    def named_buffers(self, prefix: str = "") -> list[tuple[str, Any]]:
        out = [(prefix + name, b) for name, b in self._buffers.items()]
        for cname, child in self._children.items():
            out.extend(child.named_buffers(f"{prefix}{cname}."))
        return out

    def _named_state(self, prefix: str = "") -> list[tuple[str, Any]]:
        # PyTorch's order: per layer its parameters, then its buffers, then children.
        out = [(prefix + name, p.value) for name, p in self._parameters.items()]
        out += [(prefix + name, b) for name, b in self._buffers.items()]
        for cname, child in self._children.items():
            out.extend(child._named_state(f"{prefix}{cname}."))
        return out

    def _named_buffer_checks(self, prefix: str = "") -> list[tuple[str, Any]]:
        out = [(prefix + name, check) for name, check in self._buffer_checks.items()]
        for cname, child in self._children.items():
            out.extend(child._named_buffer_checks(f"{prefix}{cname}."))
        return out

    def train(self, mode: bool = True) -> "Layer":
        """Set training mode (recursively); returns ``self``."""
        mode = V.check_bool(f"{type(self).__name__}.train", "mode", mode)
        self.training = mode
        for child in self._children.values():
            child.train(mode)
        return self

    def eval(self) -> "Layer":
        """Set evaluation mode (recursively); returns ``self``."""
        return self.train(False)

    # ------------------------------------------------------------ pickling
    def __getstate__(self) -> dict[str, Any]:
        """The instance dict without forward caches (see the module docstring)."""
        state = self.__dict__.copy()
        for name in _transient_names(type(self)):
            if name in state:
                state[name] = None
        return state

    # ------------------------------------------------------------ resetting
    def reset_running_stats(self) -> None:
        """Put every buffer (running statistics, ``num_batches_tracked``) back to its
        value at construction, in place; children too. Parameters are untouched."""
        self._reset_own_buffers()
        for child in self._children.values():
            child.reset_running_stats()

    def reset_parameters(self) -> None:
        """Re-initialise every parameter in place as the constructor did (random
        initialisations draw anew from the layer's generator) and reset the buffers
        (:meth:`reset_running_stats`); children too. As ``torch.nn``'s
        ``reset_parameters``; the arrays keep their identity."""
        if self._parameters:
            self._init_parameters()
        self._reset_own_buffers()
        for child in self._children.values():
            child.reset_parameters()

    def _reset_own_buffers(self) -> None:
        for name, buf in self._buffers.items():
            np.copyto(buf, self._buffer_init[name])

    def _init_parameters(self) -> None:
        """Fill this layer's own parameters with their initial values, in place.
        Every layer that declares parameters implements it."""
        raise NotImplementedError(f"{type(self).__name__} has parameters but does not implement _init_parameters()")

    # ------------------------------------------------------------ state
    def state_dict(self) -> dict[str, Any]:
        """``{qualified name: copy}`` of every parameter and buffer (NumPy arrays)."""
        return {name: np.array(arr, copy=True) for name, arr in self._named_state()}

    def load_state_dict(self, state: Mapping[str, Any], strict: bool = True) -> Any:
        """Copy ``state`` (a dict, or any Mapping of names to arrays: ``np.load`` of an
        ``np.savez(path, **layer.state_dict())`` archive) into the parameters and
        buffers, in place.

        ``strict=True``: the keys must match exactly. ``strict=False``: the keys both
        sides have are loaded, the layer's other entries keep their values and the
        state's other keys are ignored. Either way each loaded value must be a NumPy
        array of the entry's shape and dtype (byte order aside: big-endian arrays
        load), and buffers pass their own checks (``num_batches_tracked`` >= 0).
        Everything is checked before anything is written, so on an error the layer
        is unchanged. Returns ``IncompatibleKeys(missing_keys, unexpected_keys)``
        as PyTorch does.
        """
        fn = f"{type(self).__name__}.load_state_dict"
        if not isinstance(state, Mapping):
            raise TypeError(f"{fn}: state must be a mapping of NumPy arrays, got {V.describe(state)}")
        # Any Mapping, as in PyTorch: np.load's archive of np.savez(**state_dict()) is
        # one. Read once into a dict: an archive reads an entry from disk per lookup.
        state = dict(state)
        strict = V.check_bool(fn, "strict", strict)
        targets = dict(self._named_state())
        missing = [k for k in targets if k not in state]
        unexpected = [k for k in state if k not in targets]
        if strict and (missing or unexpected):
            raise ValueError(f"{fn}: keys do not match the layer (missing: {missing}, unexpected: {unexpected})")
        checks = dict(self._named_buffer_checks())
        for key, target in targets.items():
            if key not in state:
                continue
            value = state[key]
            if not isinstance(value, np.ndarray):
                raise TypeError(f"{fn}: {key!r} must be a NumPy array, got {V.describe(value)}")
            if value.shape != target.shape:
                raise ValueError(f"{fn}: {key!r} must have shape {target.shape}, got {value.shape}")
            if value.dtype != target.dtype and value.dtype.newbyteorder("=") != target.dtype:
                raise TypeError(f"{fn}: {key!r} must have dtype {target.dtype}, got {value.dtype}")
            if np.ma.is_masked(value):  # copyto would load the values under the mask
                raise ValueError(f"{fn}: {key!r} is a masked array with masked values; fill them first")
            if not target.flags.writeable:
                raise ValueError(
                    f"{fn}: the layer's {key!r} is a read-only array (e.g. memory-mapped with "
                    f"mmap_mode='r'); nothing was loaded (make it writeable first)"
                )
            if key in checks:
                checks[key](fn, key, value)
        for key, target in targets.items():
            if key in state:
                np.copyto(target, state[key])
        return IncompatibleKeys(missing, unexpected)

    # ------------------------------------------------------------ input checks
    def _input(self, x: Any) -> FloatArray:
        """``x`` as a floating NumPy array (native byte order); of the layer's dtype
        when it has one, or float16 for a float32 layer that ``_accepts_float16``."""
        if type(x) is not np.ndarray and is_device_array(x):
            if not self._accepts_device:
                # np.asarray would copy it to the host behind the user's back, and the
                # next layers would run there: a misplaced array, not a request.
                raise TypeError(
                    f"{self._short()}: input is a GPU array ({type(x).__name__}), but this layer computes on the "
                    "host (only the batch-norm layers take GPU arrays); copy it to the host first "
                    "(x.copy_to_host(), or .cpu() for a torch tensor)"
                )
            # GPU input stays there: the functional API takes it
        elif type(x) is not np.ndarray or not x.dtype.isnative:
            x = host_array(self._short(), "input", x)
        if np.dtype(x.dtype).kind != "f":
            raise TypeError(f"{self._short()}: input must be a floating-point array, got dtype {x.dtype}")
        if self.dtype is not None and x.dtype != self.dtype and not self._takes_float16(x.dtype):
            hint = (
                " (float16 input is taken by float32 normalisation layers)"
                if x.dtype == np.float16 and self._accepts_float16
                else f" (convert the input, or build the layer with dtype={x.dtype.name})"
            )
            raise TypeError(f"{self._short()}: input must have the layer's dtype {self.dtype}, got {x.dtype}{hint}")
        return x

    def _takes_float16(self, dtype: Any) -> bool:
        return self._accepts_float16 and dtype == np.float16 and self.dtype == np.float32

    def _shape_error(self, expected: Any, x: Any) -> ValueError:
        return ValueError(f"{self._short()}: expected input of shape {expected}, got {tuple(x.shape)}")

    def _cached(self, attr: str) -> Any:
        """What forward cached; a clear error when backward comes first."""
        value = getattr(self, attr, None)
        if value is None:
            raise RuntimeError(f"{self._short()}: backward called before forward")
        return value

    def _check_dy(self, dy: Any, shape: tuple[int, ...], dtype: Any) -> FloatArray:
        """dy of the output's shape (else ValueError) and dtype (else TypeError, as
        the functional API); big-endian dy is converted, masked values refused."""
        if isinstance(dy, np.ndarray) and not dy.dtype.isnative or isinstance(dy, np.ma.MaskedArray):
            dy = host_array(self._short() + ".backward", "dy", dy)
        if not isinstance(dy, np.ndarray) and not (self._accepts_device and is_device_array(dy)):
            raise TypeError(
                f"{self._short()}: backward expects dy as a NumPy array of the output's shape {shape} and "
                f"dtype {dtype}, got {V.describe(dy)}"
            )
        if tuple(dy.shape) != shape:
            raise ValueError(
                f"{self._short()}: backward expects dy of the output's shape {shape} and dtype {dtype}, "
                f"got {V.describe(dy)}"
            )
        if dy.dtype != dtype:
            raise TypeError(
                f"{self._short()}: backward expects dy of the output's dtype {dtype} (shape {shape}), "
                f"got {V.describe(dy)}"
            )
        return dy

    # ------------------------------------------------------------ repr
    def extra_repr(self) -> str:
        """The constructor arguments shown inside ``Name(...)``."""
        return ""

    def _short(self) -> str:
        return f"{type(self).__name__}({self.extra_repr()})"

    def __repr__(self) -> str:
        if not self._children:
            return self._short()
        lines = [f"{type(self).__name__}("]
        for name, child in self._children.items():
            body = repr(child).replace("\n", "\n  ")
            lines.append(f"  ({name}): {body}")
        lines.append(")")
        return "\n".join(lines)
