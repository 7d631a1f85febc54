"""numbabn's CPU kernels as PyTorch custom operators, for ``torch.compile``.

While Dynamo traces a model (``torch.compile``), the layers of
:mod:`numbabn.torch.modules` call their kernels through these operators instead of
running as one opaque call behind a graph break, so that
``torch.compile(model, fullgraph=True)`` works and the graph around a layer stays
whole. The eager path does not use them (it calls
:class:`~numbabn.torch.function.BatchNormFunction`, at no extra cost per call).

* ``numbabn::batch_norm(x, weight, bias, running_mean, running_var,
  num_batches_tracked, residual, training, momentum, eps, relu)
  -> (y, mean, invstd, coef, new_running_mean, new_running_var)``: the forward of
  :func:`~numbabn.torch.function.normalize`, the same kernels on the same
  arguments. ``mean``/``invstd`` (float64, (C,)) and ``coef`` (the kernels'
  per-channel coefficients) are what the backward needs of numbabn's context.
  ``momentum=None`` means the cumulative average: the factor
  ``1/(num_batches_tracked + 1)`` is read from the counter when the operator runs,
  not held by the graph as a constant (which would recompile it every step).
* ``numbabn::batch_norm_backward(dy, x, weight, residual, mean, invstd, coef,
  training, relu) -> (dx, dweight, dbias, dresidual)``: numbabn's backward on a
  context rebuilt from those tensors (the same arrays the eager backward reads).

The forward operator is functional: it does not update the running statistics in
place but returns them updated (``new_running_mean``/``new_running_var``, empty
when nothing is updated), and :func:`batch_norm` copies them into the buffers and
counts the batch inside the graph -- as PyTorch's own batch norm is traced
(``_native_batch_norm_legit_functional`` and a copy back). An operator that declares
its mutated inputs (``mutates_args``) cannot have an autograd formula:
``register_autograd`` refuses it ("Cannot register autograd formula for
non-functional operator"). The copies are of C values.

Outputs are laid out as the eager layer's are (channels-last for a channels-last
input), and the operators are tagged ``flexible_layout``: inductor may hand them its
own layout of an input (it lays its CPU convolutions' outputs out channels-last), which
the kernels read as they are, and takes the outputs' strides from the fake operators
run on that layout. Nothing the graphs keep between the forward and the backward may
depend on the layout, so ``coef`` holds one column per channel and the backward
repeats it for the (M, C) kernels' runs (``_folded``). Kept as the kernels keep
them ((4, C*F) for channels-last input), the coefficients broke this: inductor fed a
channels-last convolution output to a backward graph traced with (4, 16) coefficients,
and the operator returned (4, 256); with those and the tag ``needs_exact_strides``
instead, inductor copied each convolution's output to the traced layout before the
operator and back after it. An operator whose outputs change needs a new name:
inductor's on-disk cache keys a compiled graph by its code, which names the operator
but not its fake (graphs compiled with the (4, C*F) coefficients, found in the cache,
asserted that shape against the new operator). CPU only: the layers reach the operators only for CPU
input (``device_types="cpu"``). Double backward is not supported (the backward
operator has no derivative), nor is it by ``torch.compile``'s AOT autograd.
"""

from typing import Any

import numpy as np
import torch
from torch import Tensor

import numbabn
from numbabn._context import BatchNormContext
from numbabn._layout import canonical_host, check_param, compute_dtype, storage_view

from . import _bridge as B
from .function import _team, normalize

_FN = "numbabn.torch batch norm"
# See the module docstring; a PyTorch without the tag keeps its default (fixed stride order).
_TAGS: dict[str, Any] = {"tags": (torch.Tag.flexible_layout,)} if hasattr(torch.Tag, "flexible_layout") else {}


def _folded(coef: Any, layout: str) -> Any:
    """The kernels' coefficients (4, C*F) from the operator's (4, C): repeated F times
    along a row for the (M, C) layout's runs of F rows (see
    ``numbabn.kernels.cpu._tile``), as is for the (N, C, L) one (F = 1)."""
    if layout != "mc":
        return coef
    from numbabn.kernels import cpu  # the kernels' module; its _fold sizes the runs

    fold = getattr(cpu._fold, "py_func", cpu._fold)(coef.shape[1])
    return np.tile(coef, (1, fold)) if fold > 1 else coef


def _empty_like(x: Tensor, perm: tuple[int, ...] | None) -> Tensor:
    """An uninitialised tensor laid out as :func:`._bridge.empty_like` lays it out."""
    if perm is None:
        return torch.empty_like(x, memory_format=torch.contiguous_format)
    inverse = [perm.index(axis) for axis in range(len(perm))]
    return x.new_empty([x.shape[axis] for axis in perm]).permute(inverse)


@torch.library.custom_op("numbabn::batch_norm", mutates_args=(), device_types="cpu", **_TAGS)
def batch_norm_op(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    residual: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    """See the module docstring. ``weight``/``bias`` of the compute dtype (float32 for
    16-bit input), as :class:`~numbabn.torch.function.BatchNormFunction` takes them."""
    cdt = B.COMPUTE_DTYPE[x.dtype]
    new_mean = new_var = None
    if training and running_mean is not None and running_var is not None:
        # Updated in copies, returned: the operator changes none of its inputs.
        running_mean = new_mean = running_mean.clone(memory_format=torch.contiguous_format)
        running_var = new_var = running_var.clone(memory_format=torch.contiguous_format)
    if momentum is None:  # cumulative average: 1/(batches so far + 1), as the eager layer
        momentum = 1.0 / (int(num_batches_tracked) + 1) if num_batches_tracked is not None else 0.0
    y, bn, _ = normalize(x, weight, bias, running_mean, running_var, training, momentum, eps, relu, None, residual)
    return (
        y,
        torch.from_numpy(bn.mean),
        torch.from_numpy(bn.invstd),
        torch.from_numpy(np.ascontiguousarray(bn.coef[:, : x.shape[1]])),  # one column a channel
        x.new_empty((0,), dtype=cdt) if new_mean is None else new_mean,
        x.new_empty((0,), dtype=cdt) if new_var is None else new_var,
    )


@batch_norm_op.register_fake
def _batch_norm_fake(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    residual: Tensor | None,
    training: bool,
    *_: Any,  # momentum, eps, relu: no output depends on them
) -> tuple[Tensor, Tensor, Tensor, Tensor, Tensor, Tensor]:
    perm = B.channels_last_perm(x)
    C = x.shape[1]
    cdt = B.COMPUTE_DTYPE[x.dtype]
    if training and running_mean is not None and running_var is not None:
        new_mean, new_var = running_mean.new_empty((C,)), running_var.new_empty((C,))
    else:
        new_mean, new_var = x.new_empty((0,), dtype=cdt), x.new_empty((0,), dtype=cdt)
    return (
        _empty_like(x, perm),
        x.new_empty((C,), dtype=torch.float64),
        x.new_empty((C,), dtype=torch.float64),
        x.new_empty((4, C), dtype=cdt),
        new_mean,
        new_var,
    )


@torch.library.custom_op("numbabn::batch_norm_backward", mutates_args=(), device_types="cpu", **_TAGS)
def batch_norm_backward_op(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    residual: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    coef: Tensor,
    training: bool,
    relu: bool,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """See the module docstring. ``residual``: the forward's, given only with ``relu``
    (its mask); ``dresidual`` is then returned, else an empty tensor (without ReLU
    the residual's gradient is ``dy`` itself). ``dweight``/``dbias`` are returned
    whether or not the forward had them (computed anyway; the caller drops them)."""
    perm = B.channels_last_perm(x)
    cx = canonical_host(_FN, "x", B.to_array(x, perm), 1 if perm is None else -1)
    # gamma as the forward's checks hand it to the kernels (numbabn.functional)
    gamma = check_param(_FN, "gamma", B.optional_array(weight), cx.channels, compute_dtype(cx.dtype))
    bn = BatchNormContext(
        "cpu",
        cx.layout,
        cx.shape,
        cx.axis,
        cx.dtype,
        cx.array,
        mean.numpy(),
        invstd.numpy(),
        gamma,
        gamma,  # beta: not read by the CPU backward
        True,
        True,
        training,
        relu,
        cx.count,
        _folded(coef.numpy(), cx.layout),
        None if residual is None else storage_view(B.to_array(residual, perm).reshape(cx.array.shape)),
    )
    dy_array = B.to_array(dy, perm)
    dx, out = B.empty_like(x, perm)
    with _team(x):
        if residual is not None:
            dres, res_out = B.empty_like(x, perm)
            _, dgamma, dbeta, _ = numbabn.batch_norm_backward(dy_array, bn, out=out, residual_out=res_out)
        else:
            dres = x.new_empty((0,))
            _, dgamma, dbeta = numbabn.batch_norm_backward(dy_array, bn, out=out)
    return dx, torch.from_numpy(dgamma), torch.from_numpy(dbeta), dres


@batch_norm_backward_op.register_fake
def _batch_norm_backward_fake(
    dy: Tensor,
    x: Tensor,
    weight: Tensor | None,
    residual: Tensor | None,
    mean: Tensor,
    invstd: Tensor,
    coef: Tensor,
    *_: Any,
) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    perm = B.channels_last_perm(x)
    C = x.shape[1]
    return (
        _empty_like(x, perm),
        x.new_empty((C,), dtype=coef.dtype),
        x.new_empty((C,), dtype=coef.dtype),
        _empty_like(x, perm) if residual is not None else x.new_empty((0,)),
    )


def _setup_context(ctx: Any, inputs: tuple[Any, ...], output: tuple[Tensor, ...]) -> None:
    x, weight, bias, _, _, _, residual, training, _, _, relu = inputs
    _, mean, invstd, coef, new_mean, new_var = output
    # Statistics, not functions of the input autograd differentiates: copying the
    # new running statistics into the buffers must not make them require grad.
    ctx.mark_non_differentiable(mean, invstd, coef, new_mean, new_var)
    ctx.training, ctx.relu = training, relu
    ctx.has_weight, ctx.has_bias, ctx.has_residual = weight is not None, bias is not None, residual is not None
    # The residual only for its ReLU mask: without ReLU its gradient is dy.
    ctx.save_for_backward(x, weight, residual if relu else None, mean, invstd, coef)


def _backward(ctx: Any, dy: Tensor, *_: Any) -> tuple[Tensor | None, ...]:
    x, weight, residual, mean, invstd, coef = ctx.saved_tensors
    dx, dweight, dbias, dres = batch_norm_backward_op(
        dy, x, weight, residual, mean, invstd, coef, ctx.training, ctx.relu
    )
    if not ctx.has_residual:
        dres = None
    elif not ctx.relu:
        dres = dy
    return (
        dx,
        dweight if ctx.has_weight else None,
        dbias if ctx.has_bias else None,
        None,
        None,
        None,
        dres,
        None,
        None,
        None,
        None,
    )


batch_norm_op.register_autograd(_backward, setup_context=_setup_context)


def batch_norm(
    x: Tensor,
    weight: Tensor | None,
    bias: Tensor | None,
    running_mean: Tensor | None,
    running_var: Tensor | None,
    num_batches_tracked: Tensor | None,
    residual: Tensor | None,
    training: bool,
    momentum: float | None,
    eps: float,
    relu: bool,
) -> Tensor:
    """``numbabn::batch_norm`` with the module's buffers updated as the eager layer
    updates them: the running statistics (in training, when given) from the
    operator's results, then ``num_batches_tracked`` (when given) counted. Traced by
    Dynamo into the graph (the copies and the count as graph ops)."""
    y, _, _, _, new_mean, new_var = batch_norm_op(
        x, weight, bias, running_mean, running_var, num_batches_tracked, residual, training, momentum, eps, relu
    )
    if training and running_mean is not None and running_var is not None:
        running_mean.copy_(new_mean)
        running_var.copy_(new_var)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return y
