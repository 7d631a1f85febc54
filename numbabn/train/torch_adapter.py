"""Run numbabn's probes on a PyTorch model: :func:`from_torch` wraps a CPU
``torch.nn.Module`` as a numbabn :class:`~numbabn.layers.Layer`.

The probes of :mod:`numbabn.train.metrics` (ICS, landscape, Hessian, percentiles)
need a forward, a backward that sets each parameter's ``.grad``, parameters they
can shift in place, and a state dict they can restore. The wrapper provides these
over autograd without copying the model:

- each parameter and buffer is exposed as a NumPy *view* of the tensor's memory
  (``tensor.detach().numpy()``), so an in-place update by a numbabn optimizer, a
  probe's θ − ηg, or ``load_state_dict`` is an update of the torch model itself,
  and torch's in-place running-statistics updates are seen by the probes' snapshot;
- ``forward(x)`` runs the module with autograd on a tensor sharing x's memory and
  keeps the graph; ``backward(dy)`` back-propagates dy through that graph and
  returns dx (the input's gradient);
- an ``nn.Sequential`` becomes a numbabn Sequential of wrapped children, so the
  probes address its layers in forward order (ICS of a layer, percentiles of the
  input to a layer); ``nn.Linear`` and ``nn.Conv*d`` children count as the
  parameterized layers W_i of Definition 2.1 (their ``weight``).

Train it with a numbabn optimizer over ``wrapped.parameters()`` (the ICS probe
replays the optimizer's real update, which needs numbabn's ``step(params)`` and
state dict). The restore guarantee is the same as for numbabn layers, so a probed
run is bit-identical to an unprobed one, with one exception: layers drawing from
torch's global generator (dropout) see different draws in the probes' passes.
Tensors must live on the CPU (NumPy views); CUDA modules are refused.
"""

from collections.abc import Callable
from typing import Any

import numpy as np

from .._typing import FloatArray
from ..layers import Layer, Sequential


class TorchLayer(Layer):
    """One ``torch.nn.Module`` as a numbabn leaf layer (module docstring)."""

    _transient = ("_graph",)  # the last forward's autograd graph: a forward cache

    def __init__(self, module: Any) -> None:
        import torch

        super().__init__()
        if not isinstance(module, torch.nn.Module):
            raise TypeError(f"TorchLayer: module must be a torch.nn.Module, got {type(module).__name__}")
        self.module = module
        self.tensors = {}
        for name, tensor in [*module.named_parameters(), *module.named_buffers()]:
            if tensor.device.type != "cpu":
                raise ValueError(
                    f"TorchLayer: {name!r} is on {tensor.device}; the probes need CPU tensors "
                    f"(NumPy views of their memory)"
                )
            self.tensors[name] = tensor
        for name, p in module.named_parameters():
            self.add_parameter(name, p.detach().numpy())
        for name, b in module.named_buffers():
            self.add_buffer(name, b.detach().numpy())
        self.is_weight_layer = isinstance(module, (torch.nn.Linear, torch.nn.modules.conv._ConvNd))
        self.weight = self._parameters.get("weight")
        self.training = module.training
        self._graph: tuple[Any, Any] | None = None

    def forward(self, x: FloatArray) -> FloatArray:
        import torch

        x_t = torch.from_numpy(np.ascontiguousarray(x))
        if x_t.is_floating_point():
            x_t.requires_grad_(True)
        with torch.enable_grad():
            y = self.module(x_t)
        self._graph = (x_t, y)
        return y.detach().numpy()

    def backward(self, dy: FloatArray) -> FloatArray | None:
        import torch

        if self._graph is None:
            raise RuntimeError(f"{type(self).__name__}.backward: call forward first")
        x_t, y = self._graph
        out = y.detach().numpy()
        # dy of the output's shape (ValueError) and dtype (TypeError), as every layer
        # checks it, instead of a silent cast or torch's shape error.
        dy = self._check_dy(dy, out.shape, out.dtype)
        # autograd accumulates into .grad: without the reset, a second backward of one
        # forward would add its dx to the first one's (layers set gradients, never accumulate).
        x_t.grad = None
        for tensor in self.tensors.values():
            tensor.grad = None
        torch.autograd.backward(y, torch.from_numpy(np.ascontiguousarray(dy)), retain_graph=True)
        for name, p in self._parameters.items():
            grad = self.tensors[name].grad
            p.grad = None if grad is None else grad.detach().numpy().copy()
        return None if x_t.grad is None else x_t.grad.detach().numpy().copy()

    def train(self, mode: bool = True) -> "TorchLayer":
        super().train(mode)
        self.module.train(mode)
        return self

    def snapshot_modes(self) -> Callable[[], None]:
        """A callable that sets every submodule's training flag back to what it is
        now (the probes' snapshot: their ``train()`` reaches into the module, whose
        flags the layer's own attributes do not hold)."""
        modes = [(m, m.training) for m in self.module.modules()]

        def restore() -> None:
            for m, mode in modes:
                m.training = mode

        return restore

    def extra_repr(self) -> str:
        return repr(self.module)


def from_torch(module: Any) -> Layer:
    """A numbabn layer over ``module``: an ``nn.Sequential`` becomes a
    :class:`~numbabn.layers.Sequential` of :class:`TorchLayer` children (nested
    Sequentials flattened by the probes' addressing), anything else one
    :class:`TorchLayer`."""
    import torch

    if isinstance(module, torch.nn.Sequential):
        return Sequential(*[from_torch(child) for child in module])
    return TorchLayer(module)
