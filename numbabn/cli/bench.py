"""``numbabn bench``: time the kernels with the shared harness (:mod:`numbabn.bench.harness`).

``numbabn bench`` itself runs a suite; further benchmarks are subcommands
(``numbabn bench NAME``), registered in :data:`SUBCOMMANDS` in one line each.
"""

import itertools
import math
import sys
from collections.abc import Iterable, Sequence

import click

from numbabn.bench.cases import COMPARE, OPS, SUITES, Case, parse_shape

from ._common import (
    CLIError,
    LazyGroup,
    Settings,
    check_distinct_outputs,
    check_output_file,
    check_threads,
    torch_import_error,
    write_output,
)

# name -> "module:attribute" of a click command, imported only when it is run.
SUBCOMMANDS = {"sklearn": "numbabn.cli.bench_sklearn:sklearn", "torch": "numbabn.cli.bench_torch:torch"}


def _split(values: Iterable[str]) -> list[str]:
    """Repeatable options that also take comma lists: ('a,b', 'c') -> ['a', 'b', 'c']."""
    return [v.strip().lower() for value in values for v in value.split(",") if v.strip()]


def _ops_option(ctx: click.Context, param: click.Parameter, values: tuple[str, ...]) -> tuple[str, ...]:
    ops = _split(values) or ["all"]
    unknown = sorted(set(ops) - {*OPS, "all"})
    if unknown:
        raise click.BadParameter(f"unknown op {unknown[0]!r}; choose from {', '.join(OPS)} or all")
    # Harness order, whatever order they were given in.
    return OPS if "all" in ops else tuple(op for op in OPS if op in ops)


def _shapes_option(
    ctx: click.Context, param: click.Parameter, values: tuple[str, ...]
) -> tuple[tuple[str, tuple[int, ...]], ...]:
    try:
        return tuple((text, parse_shape(text)) for text in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _suite_option(ctx: click.Context, param: click.Parameter, value: str) -> str:
    if value not in (*SUITES, "all"):
        raise click.BadParameter(f"unknown suite {value!r}; choose from {', '.join([*SUITES, 'all'])}")
    return value


def _compare_option(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[str, ...] | None:
    """None (the default: decided once the backend is known) or a tuple of names."""
    if value is None:
        return None
    names = _split([value])
    if names == ["none"]:
        return ()
    unknown = sorted(set(names) - set(COMPARE))
    if unknown or not names:
        raise click.BadParameter(f"expected a comma list of {', '.join(COMPARE)}, or none; got {value!r}")
    return tuple(n for n in COMPARE if n in names)


def _output_option(ctx: click.Context, param: click.Parameter, value: str | None) -> str | None:
    """Check an output path before the (long) run instead of failing after it."""
    if param.name == "plot_path" and value is not None:
        from pathlib import Path

        if Path(value).suffix.lower() not in (".png", ".svg", ".pdf"):
            raise click.BadParameter(f"expected a .png, .svg or .pdf file name, got {value!r}")
    return check_output_file(value, None)


def _available_memory() -> int | None:
    """Bytes of memory available to a new allocation (Linux' MemAvailable), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return None


def case_memory(shape: tuple[int, ...], dtype: str, compare: Sequence[str], backend: str = "cpu") -> int:
    """Host bytes one case needs at its peak, roughly (an estimate, on the high side):
    x, dy, y and dx of ``dtype`` (S each); the NumPy reference works in float64 (about
    five float64 copies); PyTorch holds its own inputs and outputs (about four S).
    On the CUDA backend the device holds numbabn's four arrays, the host only x and dy."""
    itemsize = 4 if dtype == "float32" else 8
    n = math.prod(shape)
    S = n * itemsize
    need = 2 * S if backend == "cuda" else 4 * S
    if "numpy" in compare:
        need += 5 * n * 8
    if "torch" in compare and backend != "cuda":
        need += 4 * S
    return need


def _check_memory(cases: Sequence[Case], dtype: str, compare: Sequence[str], backend: str) -> None:
    """A one-line error before the run when a case cannot fit in the memory available
    (instead of a MemoryError traceback from the copy-bandwidth probe or a kernel)."""
    available = _available_memory()
    if available is None:
        return
    for case in cases:
        need = max(
            case_memory(case.shape, dtype, compare, backend),
            2 * math.prod(case.shape) * (4 if dtype == "float32" else 8),
        )  # the copy probe
        if need > available:
            shape = "x".join(map(str, case.shape))
            raise CLIError(
                f"case {case.name!r} ({shape}, {dtype}) needs about {need / 1e9:.1f} GB of memory "
                f"(inputs and outputs{' and the ' + ', '.join(compare) + ' comparison' if compare else ''}), but only "
                f"{available / 1e9:.1f} GB is available; use a smaller --shape"
                + (" or --compare none" if compare else "")
            )
    if backend == "cuda":
        from numba import cuda

        free, _ = cuda.current_context().get_memory_info()
        for case in cases:
            need = 4 * math.prod(case.shape) * (4 if dtype == "float32" else 8)
            if "torch" in compare:
                need *= 2
            if need > free:
                raise CLIError(
                    f"case {case.name!r} ({'x'.join(map(str, case.shape))}, {dtype}) needs about "
                    f"{need / 1e9:.1f} GB of GPU memory, but only {free / 1e9:.1f} GB is free"
                )


def _resolve_compare(compare: tuple[str, ...] | None, backend: str, quiet: bool = False) -> tuple[str, ...]:
    """The comparisons to time: explicit ones must be possible; the default takes what
    is there (PyTorch when it imports: one that is installed but fails to import is
    left out, with a note on stderr unless ``quiet``)."""
    if compare is not None and "torch" not in compare:
        return compare  # PyTorch not wanted: not imported either
    reason = torch_import_error()
    if reason is None and backend == "cuda":
        import torch

        if not torch.cuda.is_available():
            reason = f"this PyTorch ({torch.__version__}) does not see a GPU"
    if compare is None:
        if reason is not None and reason != "PyTorch is not installed" and not quiet:
            click.echo(f"note: not comparing with PyTorch: {reason}", err=True)
        return ("numpy",) if reason is not None else ("numpy", "torch")
    if reason is not None:
        raise CLIError(f"--compare torch: {reason}; use --compare numpy or none")
    return compare


def _cases(ctx: click.Context, shapes: tuple[tuple[str, tuple[int, ...]], ...], layout: str, suite: str) -> list[Case]:
    """--shape cases (channel axis from --layout), plus --suite when it was given too."""
    if not shapes and ctx.get_parameter_source("layout") is not click.core.ParameterSource.DEFAULT:
        # the suites fix each case's layout: a channels-last request would be timed channels-first
        raise click.UsageError(
            "--layout sets the channel axis of --shape; give --shape too (the suites' cases have their own layouts)"
        )
    cases = []
    for text, shape in shapes:
        case = Case(text, shape, -1 if layout == "nhwc" else 1)
        if math.prod(shape) // case.channels < 2:
            raise click.BadParameter(
                f"{text!r} has {case.channels} channels but fewer than 2 values per "
                f"channel ({case.layout}); training batch norm needs at least 2",
                ctx=ctx,
                param_hint="'--shape'",
            )
        cases.append(case)
    if not shapes or ctx.get_parameter_source("suite") is not click.core.ParameterSource.DEFAULT:
        names = SUITES if suite == "all" else (suite,)
        cases += [case for name in names for case in SUITES[name]]
    return list(dict.fromkeys(cases))  # "all" repeats cases that several suites share


@click.group(
    cls=LazyGroup,
    lazy_subcommands=SUBCOMMANDS,
    invoke_without_command=True,
    short_help="Time the kernels (forward, eval, backward) against NumPy and PyTorch.",
)
@click.option(
    "--op",
    "ops",
    multiple=True,
    metavar="OP[,OP]",
    callback=_ops_option,
    help="forward, eval, backward or all; repeatable or a comma list [default: all].",
)
@click.option(
    "--shape",
    "shapes",
    multiple=True,
    metavar="NxCxHxW",
    callback=_shapes_option,
    help="Time this shape instead of the suite (repeatable), e.g. 64x64x56x56.",
)
@click.option(
    "--layout",
    type=click.Choice(["nchw", "nhwc"]),
    default="nchw",
    show_default=True,
    help="Channel axis of --shape: 1 (nchw) or the last one (nhwc); only with --shape.",
)
@click.option(
    "--suite",
    default="default",
    show_default=True,
    callback=_suite_option,
    help="default, resnet, mlp, tiny or all (with --shape: only when given).",
)
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--backend", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for numbabn's kernels and PyTorch "
    "[default: numbabn's: NUMBABN_NUM_THREADS, else the CPUs this process may use].",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=10,
    show_default=True,
    help="Timed samples per case and op (a sample: at least 1 ms of calls); the median is reported.",
)
@click.option(
    "--compare",
    metavar="numpy,torch|none",
    callback=_compare_option,
    help="Also time these on the same data [default: numpy, and torch when installed].",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, allow_dash=True),
    callback=_output_option,
    help="Write the report as JSON; '-' writes it to stdout and the table to stderr.",
)
@click.option(
    "--csv",
    "csv_path",
    type=click.Path(dir_okay=False, allow_dash=True),
    callback=_output_option,
    help="Write one CSV row per case and op (no metadata: versions, threads and the copy bandwidth are in "
    "--json); '-' as for --json.",
)
@click.option(
    "--plot",
    "plot_path",
    type=click.Path(dir_okay=False),
    callback=_output_option,
    help="Draw GB/s per case/op against the copy bandwidth (.png, .svg or .pdf).",
)
@click.pass_context
def bench(
    ctx: click.Context,
    ops: tuple[str, ...],
    shapes: tuple[tuple[str, tuple[int, ...]], ...],
    layout: str,
    suite: str,
    dtype: str,
    backend: str,
    threads: int | None,
    repeat: int,
    compare: tuple[str, ...] | None,
    json_path: str | None,
    csv_path: str | None,
    plot_path: str | None,
) -> None:
    """Time batch norm forward (training), eval and backward per case.

    Each case: one untimed first call of every op (JIT compile or cache load, summed
    in the footer), then per op the median per call of --repeat samples (a sample: at
    least 1 ms of back-to-back calls, one call on large inputs); GB/s from the bytes
    moved (3x, 2x and 5x the input for forward, eval and backward) and as % of the
    copy bandwidth measured in the same run; the NumPy reference and PyTorch are timed
    on the same data ("x numpy", "x torch": how many times faster numbabn is).
    """
    if ctx.invoked_subcommand is not None:
        return
    from numbabn.bench import harness
    from numbabn.bench import report as output

    settings = ctx.find_object(Settings) or Settings()
    check_distinct_outputs({"--json": json_path, "--csv": csv_path, "--plot": plot_path})
    cases = _cases(ctx, shapes, layout, suite)
    if backend == "cuda":
        if threads is not None:
            raise click.UsageError("--threads sets CPU threads; it does not apply to --backend cuda")
        import numbabn

        if not numbabn.cuda_available():
            raise CLIError("CUDA backend requested but no GPU is available (simulator timings are refused)")
    elif threads is not None:
        check_threads(ctx, threads)
    compare = _resolve_compare(compare, backend, settings.quiet)
    _check_memory(cases, dtype, compare, backend)
    if settings.verbose:
        click.echo(
            f"timing {len(cases)} cases x {len(ops)} ops on {backend} ({dtype}), median of {repeat}, "
            f"compare: {', '.join(compare) or 'none'}",
            err=True,
        )

    with click.progressbar(
        length=len(cases),
        label=f"bench {backend}",
        file=sys.stderr,
        hidden=settings.quiet or sys.stderr is None or not sys.stderr.isatty(),  # None: fd 2 closed
        item_show_func=lambda name: name,
        update_min_steps=0,
    ) as bar:
        calls = itertools.count()

        # Called as each case starts, so the previous one is done; the first call's
        # 0-step update still renders (update_min_steps=0), showing the first case's name.
        def progress(name: str) -> None:
            bar.update(1 if next(calls) else 0, name)

        report = harness.run(cases, ops, dtype, backend, repeat, compare, threads, progress)
        bar.update(1)

    data_on_stdout = "-" in (json_path, csv_path)  # (the options give /dev/stdout as '-')
    click.echo(output.format_table(report) + "\n" + output.footer(report), err=data_on_stdout)
    if json_path is not None:
        write_output(json_path, lambda f: output.write_json(report, f), "the JSON report")
    if csv_path is not None:
        write_output(csv_path, lambda f: output.write_csv(report, f), "the CSV report")
    if plot_path is not None:
        fmt = plot_path.rsplit(".", 1)[-1].lower()
        write_output(plot_path, lambda f: output.plot(report, f, fmt), "the plot", mode="wb")
        if not settings.quiet:
            click.echo(f"plot written to {plot_path}", err=True)
