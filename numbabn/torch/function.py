"""The autograd Function behind every numbabn.torch module: numbabn's kernels
forward and backward, on tensors viewed without copying (``numbabn.torch._bridge``).

Formulas (numbabn.functional), per channel over its m values, g = dy (times the
ReLU mask when fused)::

    y  = gamma*(x - mean)*invstd + beta (+ residual)   (then max(y, 0) if relu)
    dx = gamma*invstd/m * (m*g - sum g - xhat*sum(g*xhat))      (batch statistics)
    dx = gamma*invstd_running * g                               (running statistics)
    dgamma = sum g*xhat;  dbeta = sum g;  dresidual = g

Synchronized statistics enter through two optional arguments: ``moments``, the
merged :class:`numbabn.Moments` of all ranks to normalise with, and ``allreduce``,
which turns this rank's (2, C) float64 sums ``[sum g, sum g*(x - mean)]`` into the
sums over all ranks for ``dx``. Then ``dgamma``/``dbeta`` are this rank's own share
(``sum g*xhat`` and ``sum g`` over the local batch), as in
``torch.nn.SyncBatchNorm``, so that DistributedDataParallel's gradient averaging
completes them like every other parameter's.
"""

import contextlib
import copy
from typing import Any

import numpy as np
import torch

import numbabn
from numbabn import config
from numbabn._layout import storage_view

from . import _bridge as B
from . import _openmp


class BatchNormFunction(torch.autograd.Function):
    """``apply(x, weight, bias, running_mean, running_var, training, momentum, eps,
    relu[, moments[, allreduce[, residual[, num_batches_tracked]]]]) -> y`` (the last
    four default to None).

    ``x``: (N, C, ...) float16/32/64 tensor (any memory format); ``weight``/``bias``:
    (C,) tensors of the compute dtype (float32 for float16 input) or None;
    ``running_mean``/``running_var``: (C,) buffers updated in place when
    ``training`` (pass None not to track), read when not; ``momentum``: the update
    factor of this step (the module resolves ``momentum=None`` to 1/num_batches).
    ``residual``: None, or a tensor of x's shape, dtype and device added before the
    ReLU (``relu(bn(x) + residual)`` in one pass); its gradient is dy times the
    ReLU mask (dy itself without ReLU). ``num_batches_tracked``: None, or the
    module's counter, incremented right after the running statistics were updated.
    Backward is first-order only: differentiating the gradients raises.
    """

    @staticmethod
    def forward(ctx: Any, *args: Any) -> torch.Tensor:
        """Normalise ``x`` on the numbabn kernels (:func:`normalize`; the arguments of
        ``apply``, see the class docstring); saves what backward needs. Returns y, of
        ``x``'s shape and dtype."""
        x, weight, bias, running_mean, running_var, training, momentum, eps, relu, moments, allreduce, residual, nbt = (
            args + (None,) * (13 - len(args))  # moments, allreduce, residual, nbt are optional
        )
        y, bn, perm = normalize(
            x, weight, bias, running_mean, running_var, training, momentum, eps, relu, moments, residual, nbt
        )
        ctx.perm, ctx.allreduce = perm, allreduce
        # numbabn's context reads x and weight by reference (and the residual, for the
        # ReLU mask, when fused with one): saving them lets autograd refuse a backward
        # after one was modified in place. Without ReLU the residual's gradient is dy
        # and backward never reads it: it is not saved, so changing it after the
        # forward is allowed, as for torch's ``bn(x) + residual``.
        ctx.relu, ctx.has_residual = relu, residual is not None
        mask = residual is not None and relu
        ctx.save_for_backward(x, weight, *((residual,) if mask else ()))
        ctx.bn, ctx.dropped = _detached(bn, x, residual if mask else None, perm)
        return y

    @staticmethod
    def backward(ctx: Any, dy: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        """Gradients of x, weight and bias (None for the other inputs), from ``dy``."""
        saved = ctx.saved_tensors
        perm = ctx.perm
        bn = _attached(ctx.bn, ctx.dropped, saved, perm)
        local = []
        allreduce = None
        if ctx.allreduce is not None:

            def allreduce(sums: np.ndarray) -> np.ndarray:
                local.append(sums)
                return ctx.allreduce(sums)

        x = saved[0]
        try:
            dy_array = B.to_array(dy, perm)
        except RuntimeError as exc:  # e.g. a vmap-batched gradient: no memory to view
            raise RuntimeError(
                "numbabn.torch batch norm: the incoming gradient cannot be read as memory "
                f"({exc}); vmap-style transforms of the backward, such as "
                "torch.autograd.functional.jacobian/hessian(vectorize=True), are not supported by "
                "numbabn's kernels: use vectorize=False, or torch.nn.BatchNorm* for this module"
            ) from exc
        dx, out = B.empty_like(x, perm)
        dres = None
        with _team(x):
            if ctx.has_residual and ctx.relu:  # the masked gradient, from the same pass as dx
                dres, res_out = B.empty_like(x, perm)
                _, dgamma, dbeta, _ = numbabn.batch_norm_backward(
                    dy_array, bn, allreduce=allreduce, out=out, residual_out=res_out
                )
            else:  # without ReLU the context holds no residual (see _detached)
                _, dgamma, dbeta = numbabn.batch_norm_backward(dy_array, bn, allreduce=allreduce, out=out)
                if ctx.has_residual:  # no mask: the residual's gradient is dy (as for an add)
                    dres = dy
        if local:  # this rank's share of the parameter gradients (see the module docstring)
            sums = local[0]
            dgamma = (sums[1] * bn.invstd).astype(bn.gamma.dtype) if dgamma is not None else None
            dbeta = sums[0].astype(bn.gamma.dtype) if dbeta is not None else None
        grads = [
            dx if ctx.needs_input_grad[0] else None,
            B.to_tensor(dgamma, x) if dgamma is not None and ctx.needs_input_grad[1] else None,
            B.to_tensor(dbeta, x) if dbeta is not None and ctx.needs_input_grad[2] else None,
        ]
        grads.append(dres if ctx.has_residual and ctx.needs_input_grad[11] else None)
        if torch.is_grad_enabled():  # backward(create_graph=True): no second derivative here
            # Linked to dy too: a second derivative through the incoming gradient (a
            # skip connection around the layer, torch.autograd.functional.jvp) must
            # raise, not silently count as zero.
            grads = [None if g is None else _FirstOrderOnly.apply(g, dy, *saved) for g in grads]
        return (*grads[:3], None, None, None, None, None, None, None, None, grads[3], None)


def normalize(
    x: torch.Tensor,
    weight: torch.Tensor | None,
    bias: torch.Tensor | None,
    running_mean: torch.Tensor | None,
    running_var: torch.Tensor | None,
    training: bool,
    momentum: float,
    eps: float,
    relu: bool,
    moments: Any = None,
    residual: torch.Tensor | None = None,
    num_batches_tracked: torch.Tensor | None = None,
) -> tuple[torch.Tensor, Any, tuple[int, ...] | None]:
    """The forward of :class:`BatchNormFunction` (its arguments but ``allreduce``, which
    only the backward uses) without autograd:
    ``(y, numbabn's context, channels-last permutation or None)``. The modules call
    it directly when no gradient can flow (``torch.no_grad()``, inference mode, no
    input requiring grad), which saves ``Function.apply``'s ~20 us a call.

    ``num_batches_tracked`` (the module's counter, or None) is incremented as soon as
    the running statistics are, before autograd saves anything: the recomputation
    of ``torch.utils.checkpoint(use_reentrant=False)`` stops by raising from the
    save of its last needed tensor, and the call must have been counted by then, as
    torch.nn's layers count it (they increment before their op)."""
    perm = B.channels_last_perm(x)
    cdt = B.COMPUTE_DTYPE[x.dtype]
    # Buffers of another dtype (a float16 module) or not contiguous (a strided view,
    # which the kernels would update a copy of) are updated through contiguous
    # compute-dtype copies, written back only once the forward has succeeded.
    staged = [(buf, _staged(buf, cdt)) for buf in (running_mean, running_var)]
    if training:
        for buf, staging in staged:
            if buf is not None and staging is not buf and buf.numel() > 1 and 0 in buf.stride():
                # Channels sharing one memory location (an expanded tensor) cannot take
                # the write-back: refused now, before the kernels update the other
                # buffer in place (a call that raises changes nothing).
                raise RuntimeError(
                    "numbabn.torch batch norm: unsupported operation: more than one element of the "
                    "running statistic to update refers to a single memory location; clone() it first"
                )
    y, out = B.empty_like(x, perm)
    with _team(x):  # PyTorch's OpenMP threads (see _openmp)
        _, bn = numbabn.batch_norm_forward(
            B.to_array(x, perm),
            B.optional_array(weight),
            B.optional_array(bias),
            running_mean=B.optional_array(staged[0][1]),
            running_var=B.optional_array(staged[1][1]),
            training=training,
            momentum=momentum,
            eps=eps,
            axis=1 if perm is None else -1,
            activation="relu" if relu else None,
            moments=moments,
            out=out,
            residual=None if residual is None else B.to_array(residual, perm),
        )
    for buf, staging in staged:
        if staging is not buf and training:
            buf.copy_(staging)
    if num_batches_tracked is not None:
        num_batches_tracked.add_(1)
    return y, bn, perm


def _staged(buf: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """``buf`` itself when the kernels can update it in place (contiguous, of
    ``dtype``), else a contiguous copy of that dtype; None stays None."""
    if buf is None or (buf.dtype == dtype and buf.is_contiguous()):
        return buf
    return buf.to(dtype).contiguous()


def _team(x: torch.Tensor) -> Any:
    """The context the kernels run in: PyTorch's thread count and OpenMP team
    (:func:`._openmp.use_torch_threads`) for inputs large enough to run in parallel;
    a no-op context for small ones, which run on the calling thread anyway
    (entering the team's context costs ~2 us)."""
    if x.numel() <= config.SERIAL_MAX:
        return contextlib.nullcontext()
    return _openmp.use_torch_threads()


def _dense(t: torch.Tensor, perm: tuple[int, ...] | None) -> bool:
    """Whether :func:`._bridge.to_array` views the CPU tensor ``t`` (permuted by
    ``perm``) without copying it."""
    return t.is_cpu and (t if perm is None else t.permute(perm)).is_contiguous()


# What :func:`_detached` dropped from a context: (canonical shape, x dropped,
# residual dropped), or None for nothing.
_Dropped = tuple[tuple[int, ...], bool, bool] | None


def _detached(
    bn: Any, x: torch.Tensor, residual: torch.Tensor | None, perm: tuple[int, ...] | None
) -> tuple[Any, _Dropped]:
    """numbabn's context ``bn`` as autograd keeps it, and what was dropped from it:
    its views of ``x`` and of the residual (``residual``: the saved one, or None
    when backward does not read it) where those view the saved tensors themselves.
    The tensors autograd saved then decide what backward reads (:func:`_attached`):
    ``torch.utils.checkpoint(use_reentrant=False)`` can free the input until its
    recomputation, and what a ``saved_tensors_hooks`` unpack returns (offloaded,
    packed, copied) is what backward reads, as for torch.nn's layers. A copy
    numbabn made (an input neither contiguous nor channels-last, or on a GPU)
    stays in the context."""
    drop_x = _dense(x, perm)
    drop_res = bn.residual is not None and (residual is None or _dense(residual, perm))
    if not drop_x and not drop_res:
        return bn, None
    shape = bn.x.shape
    bn = copy.copy(bn)  # not numbabn's object: the caller's views stay as they were
    if drop_x:
        bn.x = None
    if drop_res:
        bn.residual = None
    return bn, (shape, drop_x, drop_res and residual is not None)


def _attached(bn: Any, dropped: _Dropped, saved: tuple[torch.Tensor, ...], perm: tuple[int, ...] | None) -> Any:
    """The context backward runs with: ``bn`` with the views :func:`_detached`
    dropped (``dropped``) made again, of the tensors autograd unpacked (``saved``:
    x, weight[, residual]). A residual that backward does not read stays None."""
    if dropped is None:
        return bn
    shape, x, residual = dropped
    bn = copy.copy(bn)  # the retained graph's context stays without them
    if x:
        bn.x = _canonical(saved[0], perm, shape)
    if residual:
        bn.residual = _canonical(saved[2], perm, shape)
    return bn


def _canonical(t: torch.Tensor, perm: tuple[int, ...] | None, shape: tuple[int, ...]) -> Any:
    """The kernels' view (``shape``, 16-bit data as its integer storage) of tensor
    ``t`` as the forward handed it over (permuted by ``perm``); a copy if ``t`` is
    no longer laid out so (an unpack hook's choice)."""
    return storage_view(B.to_array(t, perm).reshape(shape))


class _FirstOrderOnly(torch.autograd.Function):
    """Passes a gradient through; differentiating it raises a clear error (numbabn's
    backward is not itself differentiable). Used only under ``create_graph=True``."""

    @staticmethod
    def forward(ctx: Any, grad: torch.Tensor, *inputs: Any) -> torch.Tensor:
        return grad.clone()

    @staticmethod
    def backward(ctx: Any, *_: Any) -> Any:
        raise RuntimeError(
            "numbabn.torch batch norm: double backward (differentiating the gradients, e.g. a "
            "gradient penalty) is not supported by numbabn's kernels; use torch.nn.BatchNorm* "
            "for this module (its state_dict loads unchanged)"
        )
