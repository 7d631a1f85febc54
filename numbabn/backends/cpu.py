"""The CPU backend: NumPy arrays, kernels of ``numbabn.kernels.cpu`` run by
``numbabn.kernels.cpu_driver`` on numbabn's thread pool.

Operations as listed in :mod:`numbabn.backends`; arrays are host arrays throughout
(``host`` arguments are ignored). Buffers are allocated in the canonical shape and
the kernels' storage dtype (the caller's dtype; float16 and bfloat16 as their 16-bit
integer view, ``numbabn._layout.storage_view``); ``deliver`` returns them in the
caller's shape and dtype, without a copy.
"""

from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any

import numpy as np
from numpy.typing import NDArray

from .. import _buffers, config
from .._layout import Canonical, canonical_host, check_out, check_param, may_share, storage_view
from .._typing import AnyArray
from ..kernels import cpu_driver

if TYPE_CHECKING:
    from .._context import BatchNormContext

NAME = "cpu"
canonical = canonical_host
param = check_param


def check_apart(fn: str, a: AnyArray, b: AnyArray, message: str) -> None:
    """Raise ``message`` when NumPy arrays ``a`` and ``b`` share memory (anything
    else, None included, is skipped)."""
    if isinstance(a, np.ndarray) and isinstance(b, np.ndarray) and may_share(a, (b,)):
        raise ValueError(f"{fn}: {message}")


def output(
    fn: str,
    out: AnyArray | None,
    cx: Canonical,
    host: bool,
    inputs: Sequence[Any],
    overlap_msg: str,
    name: str = "out",
) -> AnyArray:
    """Check ``out`` (a NumPy array of the caller's shape and dtype, apart from
    ``inputs``; called ``name`` in the errors) and return the buffer (canonical shape, storage dtype) the kernels
    write: a view of ``out`` when given."""
    if out is not None:
        check_out(fn, name, out, cx.shape, cx.dtype)
        if any(np.may_share_memory(out, a) for a in inputs):
            raise ValueError(f"{fn}: {overlap_msg}")
        return storage_view(out).reshape(cx.array.shape)
    return _buffers.empty(cx.array.shape, cx.array.dtype)


def deliver(buf: AnyArray, shape: tuple[int, ...], dtype: Any, out: AnyArray | None, host: bool) -> AnyArray:
    """The buffer as the caller's result: shape ``shape``, dtype ``dtype`` (a 16-bit
    storage buffer viewed as float16/bfloat16 again), or ``out`` itself when given
    (the buffer is a view of it)."""
    if out is not None:
        return out
    if buf.dtype != dtype:
        buf = buf.view(dtype)
    return buf if buf.shape == shape else buf.reshape(shape)


def moments(cx: Canonical) -> NDArray[np.float64]:
    """(2, C) float64 [mean, M2] of the canonical input (at least one value per channel)."""
    return cpu_driver.batch_moments(cx.array, cx.layout, config.CHUNK)


def zero_stats(C: int, dtype: Any) -> tuple[Any, Any, Any]:
    """(mean, invstd, coef) of a batch without values: zeros (zero gradients follow)."""
    return np.zeros(C), np.zeros(C), np.zeros((4, C), dtype)


def forward(
    cx: Canonical,
    gamma: AnyArray,
    beta: AnyArray,
    running_mean: AnyArray,
    running_var: AnyArray,
    momentum: float,
    eps: float,
    training: bool,
    relu: bool,
    stats: Any,
    count: int,
    y: AnyArray,
    given_running: Any,
    residual: AnyArray | None = None,
) -> tuple[Any, Any, Any]:
    """Normalise ``cx`` into ``y`` -> (mean, invstd, coef); see :func:`cpu_driver.forward`.
    ``given_running`` (the caller's running statistics) is for backends that copy them;
    ``residual`` (canonical, like ``cx.array``, or None) is added before the ReLU."""
    return cpu_driver.forward(
        cx.array,
        cx.layout,
        gamma,
        beta,
        running_mean,
        running_var,
        momentum,
        eps,
        training,
        relu,
        stats,
        count,
        y,
        config.CHUNK,
        residual,
    )


def grad_sums(cdy: Canonical, ctx: "BatchNormContext") -> Any:
    return cpu_driver.grad_sums(cdy.array, ctx.x, ctx.layout, ctx.coef, ctx.relu, config.CHUNK, ctx.residual)


def copy(src: AnyArray, dst: AnyArray) -> None:
    """dst[...] = src (canonical buffers of one shape and dtype)."""
    np.copyto(dst, src)


pack_grad_sums = cpu_driver.pack_grad_sums
unpack_grad_sums = cpu_driver.unpack_grad_sums


def grad_apply(
    cdy: Canonical, ctx: "BatchNormContext", partials: Any, dx: AnyArray, host: bool, dres: AnyArray | None = None
) -> tuple[Any, Any]:
    """dx into ``dx`` (canonical buffer) -> (dgamma, dbeta), NumPy arrays of the compute dtype.
    With a fused residual and ReLU, its gradient into ``dres`` (canonical buffer)."""
    return cpu_driver.grad_apply(
        cdy.array,
        ctx.x,
        ctx.layout,
        ctx.coef,
        ctx.invstd,
        ctx.gamma,
        ctx.training,
        ctx.relu,
        ctx.count,
        partials,
        dx,
        config.CHUNK,
        ctx.residual,
        dres,
    )


def warmup_plan(
    dtypes: Sequence[str] = ("float32", "float64"), layouts: Sequence[str] = ("ncl", "mc"), residual: bool = False
) -> list[tuple[str, Callable[..., Any]]]:
    """[(label, compile callable)] for every CPU kernel specialisation of ``dtypes`` x
    ``layouts``, the fused-residual ones only if ``residual`` (what ``numbabn warmup``
    runs, one step each)."""
    return cpu_driver.warmup_plan(dtypes, layouts, residual)
