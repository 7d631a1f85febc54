"""Tensors to and from the arrays numbabn's functional API takes, without copying.

* CPU tensors become NumPy views (``tensor.numpy()``): numbabn reads the tensor's
  memory directly, and its in-place updates of the running statistics land in the
  module's buffers. Outputs are allocated by NumPy (see :func:`empty_like`), wrapped
  as tensors and filled by numbabn through ``out=``; per-channel results are
  wrapped with ``torch.from_numpy``.
* CUDA tensors are handed over as they are: they expose ``__cuda_array_interface__``,
  so numbabn's CUDA backend views them on the device (zero copy), writes outputs
  into torch CUDA tensors (``out=``) and returns per-channel results as numba device
  arrays, which ``torch.as_tensor`` wraps on the same device (zero copy).

Memory format: numbabn views an input as ``(N, C, L)`` when it is C-contiguous, or as
``(M, C)`` when the channels are its last, contiguous axis. A ``channels_last``
(NHWC) or ``channels_last_3d`` tensor is therefore handed over as its permuted,
contiguous N...C view with ``axis=-1``, and the results are written into tensors of
the input's memory format (as ``torch.nn.BatchNorm2d``'s are). Other strides are
copied once (by numbabn on the CPU, here on the GPU, whose kernels need contiguous
input).
"""

from typing import Any

import numpy as np
import torch
from numpy.typing import ArrayLike

from numbabn import _buffers
from numbabn._layout import BFLOAT16

# Input dtype -> the dtype numbabn computes in (and wants parameters in).
COMPUTE_DTYPE = {
    torch.float16: torch.float32,
    torch.bfloat16: torch.float32,
    torch.float32: torch.float32,
    torch.float64: torch.float64,
}
# bfloat16 has no NumPy dtype: its 16-bit patterns travel as numbabn's BFLOAT16 view.
NUMPY_DTYPE: dict[torch.dtype, np.dtype[Any]] = {
    torch.float16: np.dtype(np.float16),
    torch.bfloat16: BFLOAT16,
    torch.float32: np.dtype(np.float32),
    torch.float64: np.dtype(np.float64),
}


def channels_last_perm(t: torch.Tensor) -> tuple[int, ...] | None:
    """The permutation (0, 2, ..., ndim-1, 1) when ``t`` is laid out channels-last,
    else None: its permuted view is C-contiguous while ``t`` itself is not, or (a
    view into channels-last data: a batch stride, a channel split) the permuted
    view's strides fall from the first axis to the last, whose stride is 1, which
    is the layout PyTorch keeps for such views' outputs too (its batch norm
    suggests channels-last then). A non-dense one is copied densely by
    :func:`to_array`."""
    if t.dim() < 3 or t.is_contiguous():
        return None
    perm = (0, *range(2, t.dim()), 1)
    if t.permute(perm).is_contiguous():
        return perm
    # PyTorch's memory formats are 4-D and 5-D: a 3-D output is contiguous unless the
    # input is dense (N, L, C) data, read in place (module docstring).
    if t.dim() in (4, 5) and t.shape[1] > 1 and _strides_like_channels_last(t.shape, t.stride()):
        return perm
    return None


def _strides_like_channels_last(shape: Any, strides: Any) -> bool:
    """PyTorch's rule for the memory format its ops give a strided input's output
    (c10's ``is_channels_last_strides_2d_s4``/``_3d_s5``): taken in the
    order C, the last spatial axis, ..., the first, N, every stride is at least the
    extent of the axes before it (so a channel step ``x[:, ::2]`` qualifies, an
    overlapping view does not)."""
    if strides[1] == 0:
        return False
    least = 0
    for d in (1, *range(len(shape) - 1, 1, -1), 0):
        if shape[d] == 0 or strides[d] < least or (d == 0 and least == strides[1]):
            return False
        least = strides[d] * shape[d] if shape[d] > 1 else strides[d]
    return True


def to_array(t: torch.Tensor, perm: tuple[int, ...] | None = None) -> Any:
    """What numbabn is given for tensor ``t`` (permuted by ``perm`` first): a NumPy
    view on the CPU, the (contiguous) tensor itself on a CUDA device."""
    if perm is not None:
        t = t.permute(perm)
    if t.is_cpu:
        # .numpy() refuses a tensor that requires grad; detach only those (a parameter),
        # since every tensor op costs ~1 us, a noticeable share of a small batch's call.
        t = t.detach() if t.requires_grad else t
        if t.is_neg():  # a lazy negation (torch._neg_view) NumPy cannot see: apply it
            t = t.resolve_neg()
        if not t.is_contiguous():
            # numbabn would copy it with NumPy, on one thread: a gradient laid out
            # (N, C, L) for a forward input stored (N, L, C) took 167 ms at
            # (64, 256, 1024), PyTorch's parallel copy 31-44 ms.
            t = t.contiguous()
        if t.dtype == torch.bfloat16:  # no NumPy bfloat16: hand over the bit patterns
            return t.view(torch.int16).numpy().view(BFLOAT16)
        return t.numpy()
    return t.detach().resolve_neg().contiguous()


def empty_like(t: torch.Tensor, perm: tuple[int, ...] | None = None) -> tuple[torch.Tensor, Any]:
    """A new tensor of ``t``'s shape, dtype and device laid out like numbabn's view of
    ``t`` (C-contiguous, or channels-last when ``perm`` is given), and the array
    numbabn writes into it (``out=``). Not a view, so callers may modify the result
    in place (``ReLU(inplace=True)``).

    On the CPU the memory comes from NumPy and the tensor wraps it
    (``torch.from_numpy``): NumPy asks the kernel for transparent huge pages on
    large arrays (``madvise``), so filling a fresh 51 MB output takes 512 times
    fewer page faults than torch's own allocation, which costs about as much as
    the batch norm itself (measured in the README's "Use it from PyTorch"), and
    outputs of 32 MiB and more reuse a block of an output that is gone
    (``numbabn._buffers``; the tensor keeps its block while it lives). Such a
    tensor cannot be resized in place (``resize_``); everything else is as usual.
    """
    shape = tuple(t.shape)
    if t.is_cpu:
        arr = _buffers.empty(tuple(shape if perm is None else [shape[axis] for axis in perm]), NUMPY_DTYPE[t.dtype])
        wrapped = arr if perm is None else arr.transpose([perm.index(axis) for axis in range(len(perm))])
        if t.dtype == torch.bfloat16:
            return torch.from_numpy(wrapped.view(np.int16)).view(torch.bfloat16), arr
        return torch.from_numpy(wrapped), arr
    order = perm or tuple(range(len(shape)))
    strides = [0] * len(shape)
    step = 1
    for axis in reversed(order):  # innermost axis of numbabn's view gets stride 1
        strides[axis] = step
        step *= shape[axis]
    out = torch.empty_strided(shape, strides, dtype=t.dtype, device=t.device)
    return out, to_array(out, perm)


def to_tensor(a: ArrayLike, like: torch.Tensor) -> torch.Tensor:
    """A per-channel numbabn result ``a`` as a tensor on ``like``'s device."""
    return torch.from_numpy(a) if isinstance(a, np.ndarray) else torch.as_tensor(a, device=like.device)


def optional_array(t: torch.Tensor | None) -> Any:
    """:func:`to_array` for an optional per-channel tensor (None stays None)."""
    return None if t is None else to_array(t)
