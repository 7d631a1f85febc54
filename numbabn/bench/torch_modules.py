"""numbabn.torch against PyTorch's own batch norm inside autograd (``numbabn bench torch``).

Two measurements, both in one process with the same thread count for PyTorch and
numbabn (``torch.set_num_threads`` and ``numbabn.set_num_threads``):

``bn``
    Per case of ``numbabn.bench.cases.SUITES["default"]``: one training-mode forward
    plus backward through autograd (``y = m(x); y.backward(dy)``), native
    ``torch.nn.BatchNorm*`` against :mod:`numbabn.torch`'s, then native BN followed by
    ``torch.relu`` against numbabn's fused ``activation="relu"``. Channels-last cases
    use channels_last tensors, (N, C) cases BatchNorm1d. Residual fusion: native
    ``torch.relu(bn(x) + r)`` against numbabn's ``bn(x, residual=r)`` with fused ReLU
    (``r`` of x's shape, also requiring its gradient). Input dtype float32 by
    default; float16/bfloat16 (parameters float32) show what 16-bit input costs.
    The numbabn columns time the kernels on every case: inputs below
    ``numbabn.config.TORCH_NATIVE_BELOW`` elements (channels-last ones below 8 times
    that), which the modules hand to PyTorch's own batch norm by default, run the
    kernels here too; the ``default`` column says which path the plain module takes
    by default.
``step``
    One training step of ResNet-18 at 32x32 (:mod:`numbabn.torch.resnet`), batch 64,
    float32, cross-entropy, SGD(lr=0.05, momentum=0.9): zero_grad, forward, loss, backward,
    optimizer step. Variants from the same initial weights and batch: native BN,
    numbabn BN (``convert_batchnorm``), numbabn BN with fused ReLU
    (``fuse_relu=True``), and that plus the residual addition and its ReLU fused into
    each block's last BN (:func:`~numbabn.torch.resnet.fuse_residual`). The final loss of each variant is reported as a
    check that
    all three trained the same network.

Timing: warm-up calls first (JIT compile excluded), then ``repeat`` rounds in which
every variant runs one sample, interleaved, so that machine noise hits them alike (a
sample is one call, or several back-to-back calls of a fast one:
:func:`numbabn.bench.harness.interleaved`); the median per call is reported, and ratios
are native time / numbabn time from the same rounds.
"""

import contextlib
import copy
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import torch

from .. import config
from ..torch.convert import convert_batchnorm
from ..torch.resnet import fuse_residual, resnet18
from .cases import SUITES
from .harness import interleaved
from .report import text_table


def _set_threads(threads: int | None) -> tuple[int, int]:
    import numbabn

    if threads is not None:
        torch.set_num_threads(threads)
        numbabn.set_num_threads(threads)
    return torch.get_num_threads(), numbabn.get_num_threads()


def _interleaved(fns: dict[str, Callable[[], Any]], repeat: int, warmup: int = 2) -> dict[str, float]:
    """Median seconds per call of each function over ``repeat`` interleaved rounds
    (:func:`numbabn.bench.harness.interleaved`), after ``warmup`` untimed calls each."""
    for fn in fns.values():
        for _ in range(warmup):
            fn()
    return interleaved(fns, repeat)


def _bn_case(case: Any, dtype: Any = torch.float32) -> tuple[Any, ...]:
    """(torch.nn module class name, input tensor, gradient) of ``dtype`` for a harness case."""
    g = torch.Generator().manual_seed(0)
    shape = list(case.shape)
    channels_last = case.axis in (-1, len(shape) - 1) and len(shape) > 2
    if channels_last:  # numbabn's NHWC case = a channels_last NCHW tensor
        shape = [shape[0], shape[-1], *shape[1:-1]]
    x = (torch.randn(shape, generator=g) * 2 + 1).to(dtype)
    dy = torch.randn(shape, generator=g).to(dtype)
    if channels_last:
        x, dy = x.to(memory_format=torch.channels_last), dy.to(memory_format=torch.channels_last)
    return f"BatchNorm{max(1, len(shape) - 2)}d", x.requires_grad_(), dy


def _fwd_bwd(module: Any, x: Any, dy: Any, after: Any = None, residual: Any = None) -> Callable[[], None]:
    def run() -> None:
        if residual is None:
            y = module(x)
        elif after is None:  # numbabn: the residual fused into the BN
            y = module(x, residual=residual)
        else:
            y = module(x) + residual
        (after(y) if after else y).backward(dy)
        x.grad = None
        if residual is not None:
            residual.grad = None

    return run


def run_bn(
    cases: Sequence[Any] | None = None, threads: int | None = None, repeat: int = 20, dtype: str = "float32"
) -> list[dict[str, Any]]:
    """Rows (dicts) of the ``bn`` measurement; see the module docstring."""
    from ..torch import modules

    torch_threads, numbabn_threads = _set_threads(threads)
    rows = []
    for case in cases or SUITES["default"]:
        name, x, dy = _bn_case(case, getattr(torch, dtype))
        below = modules._hand_to_torch(x) or modules._channels_last_below(x, fused=False)  # the plain module's path
        C = x.shape[1]
        native, ours = getattr(torch.nn, name)(C), getattr(modules, name)(C)
        fused = getattr(modules, name)(C, activation="relu")
        r = torch.randn(x.shape, generator=torch.Generator().manual_seed(1)).to(x.dtype)
        r = r.to(memory_format=torch.channels_last) if not x.is_contiguous() else r
        r.requires_grad_()
        with _kernels_always():
            t = _interleaved(
                {
                    "native": _fwd_bwd(native, x, dy),
                    "numbabn": _fwd_bwd(ours, x, dy),
                    "native+relu": _fwd_bwd(native, x, dy, torch.relu),
                    "numbabn fused": _fwd_bwd(fused, x, dy),
                    "native+add+relu": _fwd_bwd(native, x, dy, torch.relu, r),
                    "numbabn residual": _fwd_bwd(fused, x, dy, None, r),
                },
                repeat,
            )
        rows.append(
            dict(
                case=case.name,
                shape="x".join(map(str, x.shape)),
                dtype=dtype,
                layout="channels_last" if not x.is_contiguous() else "contiguous",
                native_ms=t["native"] * 1e3,
                numbabn_ms=t["numbabn"] * 1e3,
                speedup=t["native"] / t["numbabn"],
                native_relu_ms=t["native+relu"] * 1e3,
                fused_ms=t["numbabn fused"] * 1e3,
                relu_speedup=t["native+relu"] / t["numbabn fused"],
                native_res_ms=t["native+add+relu"] * 1e3,
                res_fused_ms=t["numbabn residual"] * 1e3,
                res_speedup=t["native+add+relu"] / t["numbabn residual"],
                default="torch" if below else "kernels",
                threads=torch_threads,
                numbabn_threads=numbabn_threads,
            )
        )
    return rows


@contextlib.contextmanager
def _kernels_always() -> Iterator[None]:
    """numbabn.torch's modules run the kernels on inputs of every size meanwhile."""
    below = config.TORCH_NATIVE_BELOW
    config.TORCH_NATIVE_BELOW = 0
    try:
        yield
    finally:
        config.TORCH_NATIVE_BELOW = below


def run_step(threads: int | None = None, repeat: int = 10, batch: int = 64, seed: int = 0) -> list[dict[str, Any]]:
    """Rows (dicts) of the ``step`` measurement; see the module docstring."""
    torch_threads, numbabn_threads = _set_threads(threads)
    torch.manual_seed(seed)
    base = resnet18()
    x = torch.randn(batch, 3, 32, 32)
    labels = torch.randint(0, 10, (batch,))
    models = {
        "native BN": copy.deepcopy(base),
        "numbabn BN": convert_batchnorm(copy.deepcopy(base)),
        "numbabn BN + fused ReLU": convert_batchnorm(copy.deepcopy(base), fuse_relu=True),
        "numbabn BN + fused ReLU + residual": fuse_residual(convert_batchnorm(copy.deepcopy(base), fuse_relu=True)),
    }
    losses = {}
    bn_calls: dict[str, tuple[int, int]] = {}  # variant -> (kernel calls, numbabn BN calls) of its first step

    def stepper(name: str, model: Any) -> Callable[[], None]:
        opt = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9)

        def step() -> None:
            opt.zero_grad(set_to_none=True)
            loss = torch.nn.functional.cross_entropy(model(x), labels)
            loss.backward()
            opt.step()
            losses[name] = loss.item()

        def first_step_counted() -> None:
            if name in bn_calls or name == "native BN":
                return step()
            with _counting_bn_calls() as counts:
                step()
            bn_calls[name] = (counts["calls"] - counts["torch"], counts["calls"])

        return first_step_counted

    t = _interleaved({name: stepper(name, m) for name, m in models.items()}, repeat)
    native = t["native BN"]
    return [
        dict(
            variant=name,
            step_ms=sec * 1e3,
            speedup=native / sec,
            final_loss=losses[name],
            kernel_bn_calls=bn_calls[name][0] if name in bn_calls else None,
            bn_calls=bn_calls[name][1] if name in bn_calls else None,
            batch=batch,
            threads=torch_threads,
            numbabn_threads=numbabn_threads,
        )
        for name, sec in t.items()
    ]


@contextlib.contextmanager
def _counting_bn_calls() -> Iterator[dict[str, int]]:
    """Count numbabn.torch's BN calls meanwhile: ``calls`` in all, ``torch`` of them
    handed to PyTorch's own op (inputs below ``config.TORCH_NATIVE_BELOW`` values, ...);
    the rest ran the kernels. The counters wrap the modules' methods, restored after."""
    from ..torch.modules import NumbabnBatchNorm

    counts = {"calls": 0, "torch": 0}
    forward, torch_forward = NumbabnBatchNorm.forward, NumbabnBatchNorm._torch_forward

    def counted_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["calls"] += 1
        return forward(self, *args, **kwargs)

    def counted_torch_forward(self: Any, *args: Any, **kwargs: Any) -> Any:
        counts["torch"] += 1
        return torch_forward(self, *args, **kwargs)

    NumbabnBatchNorm.forward = counted_forward  # type: ignore[method-assign]
    NumbabnBatchNorm._torch_forward = counted_torch_forward  # type: ignore[method-assign]
    try:
        yield counts
    finally:
        NumbabnBatchNorm.forward = forward  # type: ignore[method-assign]
        NumbabnBatchNorm._torch_forward = torch_forward  # type: ignore[method-assign]


def _table(rows: Sequence[dict[str, Any]], columns: dict[str, tuple[str, str]]) -> str:
    """Aligned text table; ``columns`` maps a row key to (header, format)."""
    return text_table(
        [h for h, _ in columns.values()], [[format(r[k], f) for k, (_, f) in columns.items()] for r in rows]
    )


def format_bn(rows: Sequence[dict[str, Any]]) -> str:
    return _table(
        rows,
        {
            "case": ("case", "s"),
            "shape": ("shape", "s"),
            "dtype": ("dtype", "s"),
            "layout": ("layout", "s"),
            "native_ms": ("native ms", ".2f"),
            "numbabn_ms": ("numbabn ms", ".2f"),
            "speedup": ("x", ".2f"),
            "native_relu_ms": ("native+ReLU ms", ".2f"),
            "fused_ms": ("fused ms", ".2f"),
            "relu_speedup": ("x", ".2f"),
            "native_res_ms": ("native+add+ReLU ms", ".2f"),
            "res_fused_ms": ("fused res ms", ".2f"),
            "res_speedup": ("x", ".2f"),
            "default": ("default", "s"),
        },
    )


def format_step(rows: Sequence[dict[str, Any]]) -> str:
    """The step table; "kernel BN calls" = how many of a step's BN calls ran numbabn's
    kernels, with a note under the table when some ran PyTorch's op instead."""
    rows = [
        {
            **r,
            "kernels": "-" if r.get("bn_calls") is None else f"{r['kernel_bn_calls']} of {r['bn_calls']}",
        }
        for r in rows
    ]
    table = _table(
        rows,
        {
            "variant": ("ResNet-18 step", "s"),
            "step_ms": ("ms", ".1f"),
            "speedup": ("x native", ".3f"),
            "final_loss": ("final loss", ".4f"),
            "kernels": ("kernel BN calls", "s"),
        },
    )
    if any(r.get("bn_calls") is not None and r["kernel_bn_calls"] < r["bn_calls"] for r in rows):
        table += (
            "\nnote: the other BN calls ran PyTorch's own batch norm: numbabn.torch hands CPU inputs of fewer "
            f"than NUMBABN_TORCH_NATIVE_BELOW values (now {config.TORCH_NATIVE_BELOW}) to it"
        )
    return table
