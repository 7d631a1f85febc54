"""``numbabn bench``: time the kernels with the shared harness (:mod:`numbabn.benchmark`).

``numbabn bench`` itself runs a suite; further benchmarks are subcommands
(``numbabn bench NAME``), registered in :data:`SUBCOMMANDS` in one line each.
"""
import itertools
import json
import math
import sys

import click

from ._common import CLIError, LazyGroup, Settings, check_threads

# name -> "module:attribute" of a click command, imported only when it is run.
SUBCOMMANDS = {"sklearn": "numbabn.cli.bench_sklearn:sklearn", "torch": "numbabn.cli.bench_torch:torch"}

# numbabn.benchmark.OPS, spelled out because importing the harness imports NumPy, and
# --help must not (tests/test_cli.py checks that the two agree).
_OPS = ("forward", "eval", "backward")
_COMPARE = ("numpy", "torch")


def _split(values):
    """Repeatable options that also take comma lists: ('a,b', 'c') -> ['a', 'b', 'c']."""
    return [v.strip().lower() for value in values for v in value.split(",") if v.strip()]


def _ops_option(ctx, param, values):
    ops = _split(values) or ["all"]
    unknown = sorted(set(ops) - {*_OPS, "all"})
    if unknown:
        raise click.BadParameter(f"unknown op {unknown[0]!r}; choose from {', '.join(_OPS)} or all")
    # Harness order, whatever order they were given in.
    return _OPS if "all" in ops else tuple(op for op in _OPS if op in ops)


def _shapes_option(ctx, param, values):
    from numbabn.benchmark import parse_shape

    try:
        return tuple((text, parse_shape(text)) for text in values)
    except ValueError as exc:
        raise click.BadParameter(str(exc)) from None


def _suite_option(ctx, param, value):
    from numbabn.benchmark import SUITES

    if value not in (*SUITES, "all"):
        raise click.BadParameter(f"unknown suite {value!r}; choose from {', '.join([*SUITES, 'all'])}")
    return value


def _compare_option(ctx, param, value):
    """None (the default: decided once the backend is known) or a tuple of names."""
    if value is None:
        return None
    names = _split([value])
    if names == ["none"]:
        return ()
    unknown = sorted(set(names) - set(_COMPARE))
    if unknown or not names:
        raise click.BadParameter(f"expected a comma list of {', '.join(_COMPARE)}, or none; got {value!r}")
    return tuple(n for n in _COMPARE if n in names)


def _output_option(ctx, param, value):
    """Check an output path before the (long) run instead of failing after it."""
    from pathlib import Path

    if value is None or value == "-":
        return value
    path = Path(value)
    if not path.parent.is_dir():
        raise click.BadParameter(f"directory {str(path.parent)!r} does not exist")
    if param.name == "plot_path" and path.suffix.lower() not in (".png", ".svg", ".pdf"):
        raise click.BadParameter(f"expected a .png, .svg or .pdf file name, got {value!r}")
    return value


def _torch_installed():
    from importlib.util import find_spec

    return find_spec("torch") is not None


def _resolve_compare(compare, backend):
    """The comparisons to time: explicit ones must be possible; the default takes what is there."""
    torch_usable = _torch_installed()
    reason = "PyTorch is not installed"
    if torch_usable and backend == "cuda":
        import torch

        torch_usable = torch.cuda.is_available()
        reason = f"this PyTorch ({torch.__version__}) does not see a GPU"
    if compare is None:
        return ("numpy", "torch") if torch_usable else ("numpy",)
    if "torch" in compare and not torch_usable:
        raise CLIError(f"--compare torch: {reason}; use --compare numpy or none")
    return compare


def _cases(ctx, shapes, layout, suite):
    """--shape cases (channel axis from --layout), plus --suite when it was given too."""
    from numbabn.benchmark import SUITES, Case

    cases = []
    for text, shape in shapes:
        case = Case(text, shape, -1 if layout == "nhwc" else 1)
        if math.prod(shape) // case.channels < 2:
            raise click.BadParameter(f"{text!r} has {case.channels} channels but fewer than 2 values per "
                                     f"channel ({case.layout}); training batch norm needs at least 2",
                                     ctx=ctx, param_hint="'--shape'")
        cases.append(case)
    if not shapes or ctx.get_parameter_source("suite") is not click.core.ParameterSource.DEFAULT:
        names = SUITES if suite == "all" else (suite,)
        cases += [case for name in names for case in SUITES[name]]
    return list(dict.fromkeys(cases))   # "all" repeats cases that several suites share


def _footer(report):
    slowest = max(report.rows, key=lambda r: r.first_s)
    total = sum(r.first_s for r in report.rows)
    return (f"first calls (JIT compile or Numba cache load; not in the timings): {total:.2f} s in all, "
            f"slowest {slowest.first_s:.2f} s ({slowest.op} {slowest.case})")


def _write_json(report, path):
    with click.open_file(path, "w") as f:
        json.dump(report.to_dict(), f, indent=2)
        f.write("\n")


def _write_csv(report, path):
    import csv
    from dataclasses import asdict, fields

    from numbabn.benchmark import Row

    with click.open_file(path, "w") as f:
        writer = csv.DictWriter(f, [fld.name for fld in fields(Row)], lineterminator="\n")
        writer.writeheader()
        for row in report.rows:
            writer.writerow({**asdict(row), "shape": "x".join(map(str, row.shape))})


def _plot(report, path):
    """Roofline-style bars: numbabn's (and PyTorch's) GB/s per case/op under the copy bandwidth."""
    import numpy as np
    from matplotlib.figure import Figure   # Agg through Figure.savefig: no pyplot, no GUI backend

    rows, meta = report.rows, report.meta
    torch_gbps = [r.gbps * r.ms / r.torch_ms if r.torch_ms else 0.0 for r in rows]
    with_torch = any(torch_gbps)
    pos = np.arange(len(rows))
    width = 0.4 if with_torch else 0.8
    fig = Figure(figsize=(max(6.0, 0.7 * len(rows) + 2), 4.5), layout="constrained")
    ax = fig.add_subplot()
    ax.bar(pos - (width / 2 if with_torch else 0), [r.gbps for r in rows], width, label="numbabn")
    if with_torch:
        ax.bar(pos + width / 2, torch_gbps, width, label=f"PyTorch {meta['torch']}")
    ax.axhline(meta["copy_gbps"], color="black", linestyle="--",
               label=f"{'device ' if meta['backend'] == 'cuda' else ''}copy bandwidth {meta['copy_gbps']:.1f} GB/s")
    ax.set_xticks(pos, [f"{r.case}\n{r.op}" for r in rows], rotation=90 if len(rows) > 8 else 0, fontsize=8)
    ax.set_xlabel("case / op")
    ax.set_ylabel("effective bandwidth, GB/s (bytes moved / time)")
    ax.set_title(f"numbabn {meta['backend']} batch norm ({meta['dtype']}) vs the copy-bandwidth limit", fontsize=10)
    ax.legend()
    fig.savefig(path, dpi=120)


@click.group(cls=LazyGroup, lazy_subcommands=SUBCOMMANDS, invoke_without_command=True)
@click.option("--op", "ops", multiple=True, metavar="OP[,OP]", callback=_ops_option,
              help="forward, eval, backward or all; repeatable or a comma list [default: all].")
@click.option("--shape", "shapes", multiple=True, metavar="NxCxHxW", callback=_shapes_option,
              help="Time this shape instead of the suite (repeatable), e.g. 64x64x56x56.")
@click.option("--layout", type=click.Choice(["nchw", "nhwc"]), default="nchw", show_default=True,
              help="Channel axis of --shape: 1 (nchw) or the last one (nhwc).")
@click.option("--suite", default="default", show_default=True, callback=_suite_option,
              help="default, resnet, mlp, tiny or all (with --shape: only when given).")
@click.option("--dtype", type=click.Choice(["float32", "float64"]), default="float32", show_default=True)
@click.option("--backend", type=click.Choice(["cpu", "cuda"]), default="cpu", show_default=True)
@click.option("--threads", type=click.IntRange(min=1), default=None,
              help="CPU threads for Numba and PyTorch [default: Numba's].")
@click.option("--repeat", type=click.IntRange(min=1), default=10, show_default=True,
              help="Timed calls per case and op; the median is reported.")
@click.option("--compare", metavar="numpy,torch|none", callback=_compare_option,
              help="Also time these on the same data [default: numpy, and torch when installed].")
@click.option("--json", "json_path", type=click.Path(dir_okay=False, allow_dash=True), callback=_output_option,
              help="Write the report as JSON; '-' writes it to stdout and the table to stderr.")
@click.option("--csv", "csv_path", type=click.Path(dir_okay=False, allow_dash=True), callback=_output_option,
              help="Write one CSV row per case and op; '-' as for --json.")
@click.option("--plot", "plot_path", type=click.Path(dir_okay=False), callback=_output_option,
              help="Draw GB/s per case/op against the copy bandwidth (.png, .svg or .pdf).")
@click.pass_context
def bench(ctx, ops, shapes, layout, suite, dtype, backend, threads, repeat, compare, json_path, csv_path,
          plot_path):
    """Time batch norm forward (training), eval and backward per case.

    Each case/op: one untimed first call (JIT compile or cache load, summed in the
    footer), then the median of --repeat calls; GB/s from the bytes moved (3x, 2x and
    5x the input for forward, eval and backward) and as % of the copy bandwidth
    measured in the same run; the NumPy reference and PyTorch are timed on the same
    data ("x numpy", "x torch": how many times faster numbabn is).
    """
    if ctx.invoked_subcommand is not None:
        return
    from numbabn import benchmark

    settings = ctx.find_object(Settings) or Settings()
    if json_path == "-" and csv_path == "-":
        raise click.UsageError("--json and --csv cannot both write to stdout ('-')")
    cases = _cases(ctx, shapes, layout, suite)
    if backend == "cuda":
        if threads is not None:
            raise click.UsageError("--threads sets CPU threads; it does not apply to --backend cuda")
        import numbabn

        if not numbabn.cuda_available():
            raise CLIError("CUDA backend requested but no GPU is available (simulator timings are refused)")
    elif threads is not None:
        check_threads(ctx, threads)
    compare = _resolve_compare(compare, backend)
    if settings.verbose:
        click.echo(f"timing {len(cases)} cases x {len(ops)} ops on {backend} ({dtype}), median of {repeat}, "
                   f"compare: {', '.join(compare) or 'none'}", err=True)

    with click.progressbar(length=len(cases), label=f"bench {backend}", file=sys.stderr,
                           hidden=settings.quiet or not sys.stderr.isatty(),
                           item_show_func=lambda name: name, update_min_steps=0) as bar:
        calls = itertools.count()

        # Called as each case starts, so the previous one is done; the first call's
        # 0-step update still renders (update_min_steps=0), showing the first case's name.
        def progress(name):
            bar.update(1 if next(calls) else 0, name)

        if backend == "cuda":
            report = benchmark.run_cuda(cases, ops, dtype, repeat, compare, progress)
        else:
            report = benchmark.run(cases, ops, dtype, "cpu", repeat, compare, threads, progress)
        bar.update(1)

    data_on_stdout = "-" in (json_path, csv_path)
    click.echo(benchmark.format_table(report) + "\n" + _footer(report), err=data_on_stdout)
    if json_path is not None:
        _write_json(report, json_path)
    if csv_path is not None:
        _write_csv(report, csv_path)
    if plot_path is not None:
        _plot(report, plot_path)
        if not settings.quiet:
            click.echo(f"plot written to {plot_path}", err=True)
