"""Model surgery: swap PyTorch's batch norm for numbabn's, and fold batch norm away
for inference.

``convert_batchnorm`` works like ``torch.nn.SyncBatchNorm.convert_sync_batchnorm``:
the new modules take over the old ones' Parameter and buffer objects (not copies),
so an optimizer built before the conversion keeps updating the right tensors and
``state_dict`` keys do not change.
"""

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.nn.modules.batchnorm import _BatchNorm, _LazyNormBase

from .modules import BatchNorm1d, BatchNorm2d, BatchNorm3d, FusedReLU, NumbabnBatchNorm
from .sync import SyncBatchNorm

# torch class -> the numbabn.torch class replacing it (isinstance order: numbabn's are subclasses).
_LOCAL = ((torch.nn.BatchNorm1d, BatchNorm1d), (torch.nn.BatchNorm2d, BatchNorm2d), (torch.nn.BatchNorm3d, BatchNorm3d))
_FOLDABLE = (torch.nn.Conv1d, torch.nn.Conv2d, torch.nn.Conv3d, torch.nn.Linear)


def _target(module: torch.nn.Module, sync: bool) -> type[torch.nn.Module] | None:
    """The numbabn.torch class that replaces ``module``, or None to leave it alone."""
    if not isinstance(module, _BatchNorm) or isinstance(module, _LazyNormBase):
        return None
    if sync or isinstance(module, (torch.nn.SyncBatchNorm, SyncBatchNorm)):
        return SyncBatchNorm
    return next((ours for theirs, ours in _LOCAL if isinstance(module, theirs)), None)


def _convert_one(module: torch.nn.Module, sync: bool, process_group: Any) -> torch.nn.Module:
    cls = _target(module, sync)
    if cls is None:
        return module
    if type(module) is cls:
        if cls is SyncBatchNorm and process_group is not None:
            module.process_group = process_group  # regrouped, as PyTorch's converter does
        return module
    kwargs = dict(bias=module.bias is not None) if module.affine else {}
    if cls is SyncBatchNorm:
        kwargs["process_group"] = process_group or getattr(module, "process_group", None)
    new = cls(
        module.num_features,
        module.eps,
        module.momentum,
        module.affine,
        module.track_running_stats,
        activation=getattr(module, "activation", None),
        **kwargs,
    )
    for name in ("weight", "bias"):
        if getattr(module, name) is not None:
            setattr(new, name, getattr(module, name))
    for name in ("running_mean", "running_var", "num_batches_tracked"):
        new.register_buffer(name, getattr(module, name))
    new.train(module.training)
    new._feeds_fused_relu = getattr(module, "_feeds_fused_relu", False)
    if getattr(module, "fuses_residual", False):
        # resnet.fuse_residual's mark: its block calls the layer with residual=, and
        # without the mark would add the residual after the fused ReLU instead.
        new.fuses_residual = True
    if hasattr(module, "qconfig"):
        new.qconfig = module.qconfig
    return new


def convert_batchnorm(
    module: torch.nn.Module, *, sync: bool = False, fuse_relu: bool = False, process_group: Any = None
) -> torch.nn.Module:
    """Replace every batch norm in ``module`` by numbabn.torch's, in place.

    ``torch.nn.BatchNorm1d/2d/3d`` become :class:`numbabn.torch.BatchNorm1d` (2d, 3d); with
    ``sync=True`` every batch norm (numbabn's included) becomes a
    :class:`SyncBatchNorm` over ``process_group`` (None: the default group).
    ``torch.nn.SyncBatchNorm`` always becomes numbabn's ``SyncBatchNorm`` (keeping its
    process group). Parameters and buffers are the same objects as before; train/eval
    mode is kept, and so is a residual fused by :func:`numbabn.torch.resnet.fuse_residual`.
    With ``fuse_relu=True``, a ``torch.nn.ReLU`` that directly follows a converted batch
    norm inside a ``torch.nn.Sequential`` is folded into it
    (``activation="relu"``) and replaced by a :class:`~numbabn.torch.modules.FusedReLU`
    (indices and state_dict keys stay), which passes that batch norm's output through
    and rectifies anything else: if a later tool swaps the batch norm for one without
    the fused ReLU (``torch.nn.SyncBatchNorm.convert_sync_batchnorm``), the model keeps
    its ReLU. ReLUs called in a ``forward`` (torchvision's BasicBlock) cannot be seen
    and stay as they are. A fused batch norm's own output is rectified: hooks or
    feature extractors reading it get ``relu(bn(x))``, not ``bn(x)``; do not fuse
    where pre-activation features are read.

    A batch norm used in several places (twice in one ``Sequential``, or in two
    parents) becomes one module used in the same places, and its ReLU is fused only
    when a ReLU follows it in every place ``module`` uses it.

    As ``torch.nn.SyncBatchNorm.convert_sync_batchnorm`` does, a subclass of a torch
    batch norm becomes numbabn's plain layer (its own ``forward`` is not kept) and
    hooks registered on a replaced batch norm or ReLU do not carry over: convert
    first, then register hooks. A parametrized batch norm is refused (TypeError)
    before anything is replaced.

    Returns ``module`` itself, or its replacement when ``module`` is a batch norm.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"convert_batchnorm: module must be a torch.nn.Module, got {type(module).__name__}")
    for flag, value in (("sync", sync), ("fuse_relu", fuse_relu)):
        if not isinstance(value, (bool, np.bool_)):  # sync="no" made every batch norm a SyncBatchNorm
            raise TypeError(f"convert_batchnorm: {flag} must be a bool, got {type(value).__name__} {value!r}")
    # Checked before any replacement: a call that raises leaves the model as it was.
    for name, m in module.named_modules():
        cls = _target(m, sync)
        if cls is not None and torch.nn.utils.parametrize.is_parametrized(m):
            raise TypeError(
                f"convert_batchnorm: the {type(m).__name__} at {name or 'the top'!r} has parametrized "
                "parameters (torch.nn.utils.parametrize), which numbabn's layers do not carry over; "
                "remove the parametrization first; nothing was converted"
            )
        activation = getattr(m, "activation", None)
        if cls is not None and type(m) is not cls and activation not in (None, "relu"):
            # Set after construction: the replacement's constructor would refuse it.
            raise ValueError(
                f"convert_batchnorm: the {type(m).__name__} at {name or 'the top'!r} has activation "
                f"{activation!r}; expected None or 'relu'; nothing was converted"
            )
    converted = _convert_tree(module, sync, process_group, {})
    if fuse_relu:
        _fuse_relus(converted)
    return converted


def _convert_tree(module: torch.nn.Module, sync: bool, process_group: Any, memo: dict[int, Any]) -> torch.nn.Module:
    """:func:`convert_batchnorm` without the ReLU fusion; ``memo``: id(old) -> new for
    every module seen, so that a shared batch norm is converted once."""
    converted = _convert_one(module, sync, process_group)
    if converted is not module:
        return converted
    # _modules, not named_children(): that skips a module's second entry in the same
    # parent, which stayed torch.nn's batch norm.
    for name, child in list(module._modules.items()):
        if child is None:
            continue
        if id(child) not in memo:
            memo[id(child)] = _convert_tree(child, sync, process_group, memo)
        if memo[id(child)] is not child:
            setattr(module, name, memo[id(child)])
    return module


def _fuse_relus(root: torch.nn.Module) -> None:
    """``activation="relu"`` on every numbabn batch norm of ``root`` that a
    ``torch.nn.ReLU`` directly follows, in a Sequential, in each place it is used;
    those ReLUs become :class:`FusedReLU`. A batch norm also used where no ReLU
    follows keeps its activation: fusing would rectify its output there too."""
    # id(bn) -> (bn, [(parent, name of the ReLU after it) or None, for each place it is used])
    places: dict[int, tuple[Any, list[tuple[torch.nn.Module, str] | None]]] = {}
    for parent in root.modules():
        items = list(parent._modules.items())
        for i, (_, bn) in enumerate(items):
            if isinstance(bn, NumbabnBatchNorm) and bn.activation is None:
                nxt = items[i + 1] if isinstance(parent, torch.nn.Sequential) and i + 1 < len(items) else None
                places.setdefault(id(bn), (bn, []))[1].append(
                    (parent, nxt[0]) if nxt is not None and type(nxt[1]) is torch.nn.ReLU else None
                )
    for bn, where in places.values():
        if all(place is not None for place in where):
            bn.activation = "relu"
            bn._feeds_fused_relu = True
            for parent, name in where:
                relu = getattr(parent, name)
                setattr(parent, name, FusedReLU(relu.inplace).train(relu.training))


def _fold_pairs(module: torch.nn.Module) -> Iterator[tuple[torch.nn.Sequential, int]]:
    """(sequential, index) of every Conv/Linear directly followed by a batch norm, for
    the layers that the same batch norm follows in every place ``module`` uses them:
    folding changes the layer's weights, so a layer also used without that batch
    norm after it is left alone (and one used twice with it is folded once)."""
    uses: dict[int, list[tuple[torch.nn.Module, int, Any]]] = {}  # id(layer) -> [(parent, index, next)]
    for parent in module.modules():
        children = list(parent._modules.values())
        for i, layer in enumerate(children):
            if type(layer) in _FOLDABLE:
                nxt = children[i + 1] if isinstance(parent, torch.nn.Sequential) and i + 1 < len(children) else None
                uses.setdefault(id(layer), []).append((parent, i, nxt))
    for places in uses.values():
        bn = places[0][2]
        # A lazy batch norm not yet run has no statistics (once run, it is a BatchNorm*d).
        foldable = isinstance(bn, _BatchNorm) and not isinstance(bn, _LazyNormBase)
        if foldable and all(nxt is bn for _, _, nxt in places):
            yield from ((seq, i) for seq, i, _ in places)


@torch.no_grad()
def fold_batchnorm(module: torch.nn.Module) -> torch.nn.Module:
    """Fold every eval-mode batch norm that directly follows a ``Conv1d/2d/3d`` or
    ``Linear`` inside a ``torch.nn.Sequential`` into that layer, in place, for
    inference. Per output channel c (float64, then cast to the layer's dtype)::

        a_c = gamma_c / sqrt(running_var_c + eps)
        W'[c] = a_c * W[c];   b'_c = a_c * (b_c - running_mean_c) + beta_c

    The batch norm is replaced by ``torch.nn.Identity`` (``torch.nn.ReLU`` when it
    had a fused ReLU, and the :class:`~numbabn.torch.modules.FusedReLU` after it by
    ``torch.nn.Identity``). A layer used in several places is folded only when that
    batch norm follows it in each of them (once, however many they are): folding
    changes its weights for every use. Raises ValueError, changing nothing, when such
    a batch norm is in training mode or has no running statistics, when the layer's
    weight or bias is tied to another module's inside ``module`` (it would be rescaled
    there too; ``torch.nn.utils.fusion.fuse_conv_bn_eval`` builds a new layer instead;
    a tie to a module outside ``module`` cannot be seen: fold the whole model), or when the layer
    or the batch norm has forward hooks or a computed weight (the hook-based
    ``weight_norm`` and ``spectral_norm``, ``parametrize`` on the batch norm; a layer
    parametrized with ``torch.nn.utils.parametrize`` is of another class and left
    unfolded). A ``Linear`` is folded with the batch norm
    normalising its output features, as for (N, features) input: on (N, C, L) input
    a ``BatchNorm1d`` normalises C, not the Linear's features, and the fold would be
    wrong (the module cannot see the input's shape; ``torch.nn.utils.fusion``
    assumes the same). A batch norm that :func:`numbabn.torch.resnet.fuse_residual`
    fused becomes ``torch.nn.Identity``: its block then adds the residual and applies
    the ReLU itself. The modules put in the batch norms' places take their mode
    (eval), and a bias the layer lacked is a new Parameter that requires grad as the
    layer's weight does. Returns ``module``.
    """
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"fold_batchnorm: module must be a torch.nn.Module, got {type(module).__name__}")
    pairs = list(_fold_pairs(module))
    holders = _holders(module) if pairs else {}
    for seq, i in pairs:
        bn = seq[i + 1]
        if bn.training:
            raise ValueError(
                f"fold_batchnorm: {type(bn).__name__} at {_at(module, seq, i + 1)} must be in "
                "eval mode (call model.eval() first); nothing was folded"
            )
        if bn.running_mean is None or bn.running_var is None:
            raise ValueError(
                f"fold_batchnorm: {type(bn).__name__} at {_at(module, seq, i + 1)} has no running "
                "statistics (track_running_stats=False): it normalises with each batch's own statistics, "
                "which no fixed weights can reproduce; nothing was folded"
            )
        layer = seq[i]
        for label in ("weight", "bias"):
            t = getattr(layer, label)
            if t is not None and t.numel() > 0 and holders.get(_memory(t), set()) - {id(layer)}:
                raise ValueError(
                    f"fold_batchnorm: the {label} of the {type(layer).__name__} at {_at(module, seq, i)} shares "
                    "its memory with another module's parameter or buffer (tied weights); folding would rescale "
                    "it there too; nothing was folded"
                )
        if _computed_or_hooked(layer) or _computed_or_hooked(bn):
            raise ValueError(
                f"fold_batchnorm: the {type(layer).__name__} at {_at(module, seq, i)} or the "
                f"{type(bn).__name__} after it has forward hooks or a computed weight (weight_norm, "
                "spectral_norm, parametrize), which would undo the folded weights or be lost; nothing was folded"
            )
        if bn.num_features != seq[i].weight.shape[0]:
            raise ValueError(
                f"fold_batchnorm: {type(bn).__name__}({bn.num_features}) at {_at(module, seq, i + 1)} follows "
                f"a layer with {seq[i].weight.shape[0]} outputs; nothing was folded"
            )
    folded: set[int] = set()
    for seq, i in pairs:
        layer, bn = seq[i], seq[i + 1]
        if id(layer) not in folded:  # a layer used twice with its batch norm is folded once
            folded.add(id(layer))
            _fold_into(layer, bn)
        # A fused residual's ReLU comes after the addition, which its block then does
        # itself (resnet.BasicBlock: relu(branch(x) + shortcut)): no ReLU in its place.
        fused = getattr(bn, "activation", None) == "relu" and not getattr(bn, "fuses_residual", False)
        # In the mode of what they replace, as torch.ao.quantization.fuse_modules does.
        seq[i + 1] = (torch.nn.ReLU() if fused else torch.nn.Identity()).train(bn.training)
        if fused and i + 2 < len(seq) and isinstance(seq[i + 2], FusedReLU):
            # the ReLU is back in the batch norm's place
            seq[i + 2] = torch.nn.Identity().train(seq[i + 2].training)
    return module


def _at(module: torch.nn.Module, seq: torch.nn.Sequential, i: int) -> str:
    """Where entry ``i`` of ``seq`` is in ``module``, for an error: its index and its
    name as ``module.named_modules()`` gives it (the first, if ``seq`` has several)."""
    path = next(name for name, m in module.named_modules() if m is seq)
    return f"index {i} of a Sequential ({f'{path}.{i}' if path else str(i)!r})"


def _memory(t: torch.Tensor) -> tuple[Any, ...]:
    """Where ``t``'s values live: its device and storage address, or, for a tensor
    without memory (the meta device, fake tensors: address 0), the tensor itself."""
    address = t.untyped_storage().data_ptr()
    return (t.device, address) if address else ("tensor", id(t))


def _holders(module: torch.nn.Module) -> dict[tuple[Any, ...], set[int]]:
    """:func:`_memory` -> ids of the modules of ``module`` holding a parameter or
    buffer there (the same tensor, or a view of it). Only modules inside ``module``
    are seen: a tie to a module outside it goes undetected. An uninitialized lazy
    parameter or buffer (``LazyLinear`` not yet run) has no memory to share, and its
    ``numel()`` raises: skipped."""
    holders: dict[tuple[Any, ...], set[int]] = {}
    for m in module.modules():
        for t in (*m._parameters.values(), *m._buffers.values()):
            if t is not None and not torch.nn.parameter.is_lazy(t) and t.numel() > 0:
                holders.setdefault(_memory(t), set()).add(id(m))
    return holders


def _computed_or_hooked(m: torch.nn.Module) -> bool:
    """Whether ``m`` has forward (pre-)hooks -- the hook-based ``weight_norm`` and
    ``spectral_norm`` recompute the weight in one -- or parametrized parameters."""
    return bool(m._forward_hooks or m._forward_pre_hooks) or torch.nn.utils.parametrize.is_parametrized(m)


def _fold_into(layer: torch.nn.Module, bn: Any) -> None:
    """``bn``'s running statistics and affine parameters into ``layer``'s weight and
    bias (see :func:`fold_batchnorm`; under no_grad)."""
    w = layer.weight.double()
    C = w.shape[0]
    mean, var = bn.running_mean.double(), bn.running_var.double()
    gamma = bn.weight.double() if bn.weight is not None else torch.ones_like(mean)
    beta = bn.bias.double() if bn.bias is not None else torch.zeros_like(mean)
    bias = layer.bias.double() if layer.bias is not None else torch.zeros_like(mean)
    a = gamma / torch.sqrt(var + bn.eps)
    layer.weight.copy_(w * a.reshape(C, *[1] * (w.dim() - 1)))
    new_bias = a * (bias - mean) + beta
    if layer.bias is None:
        # Trained as the weight is: a frozen layer's new bias stays out of an optimizer
        # built over the parameters that require grad.
        layer.bias = torch.nn.Parameter(new_bias.to(layer.weight.dtype), layer.weight.requires_grad)
    else:
        layer.bias.copy_(new_bias)
