"""``numbabn bench torch``: numbabn.torch against PyTorch's batch norm inside autograd
(:mod:`numbabn.bench.torch_modules`)."""

import json
from typing import IO, Any

import click

from numbabn.bench.cases import TORCH_PARTS

from ._common import CLIError, Settings, check_output_file, check_threads, torch_import_error, write_output


@click.command(short_help="numbabn.torch vs PyTorch's batch norm through autograd, and a ResNet-18 step.")
@click.option(
    "--part",
    "parts",
    multiple=True,
    type=click.Choice(TORCH_PARTS),
    help="bn (BN forward+backward per default-suite case) or step (ResNet-18 training "
    "step); repeatable [default: both].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="CPU threads for both PyTorch and numbabn [default: numbabn's].",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=None,
    help="Interleaved rounds per measurement; medians are reported [default: bn 20, step 10].",
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "float16", "bfloat16"]),
    default="float32",
    show_default=True,
    help="bn: input dtype (parameters float32).",
)
@click.option("--batch", type=click.IntRange(min=2), default=64, show_default=True, help="step: batch size.")
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, allow_dash=True),
    callback=lambda ctx, param, value: check_output_file(value, None),
    help="Write the rows as JSON; '-' writes them to stdout and the tables to stderr.",
)
@click.pass_context
def torch(
    ctx: click.Context,
    parts: tuple[str, ...],
    threads: int | None,
    repeat: int,
    dtype: str,
    batch: int,
    json_path: str | None,
) -> None:
    """BatchNorm forward+backward through autograd, native vs numbabn (also with
    ReLU: native BN then ReLU vs numbabn's fused one; and relu(BN(x) + r) vs numbabn's
    fused residual), and a ResNet-18 CPU training step (32x32, SGD) with native BN,
    numbabn BN, numbabn BN + fused ReLU and + fused residual; same threads for both
    libraries, variants interleaved, medians, ratios from the same run."""
    reason = torch_import_error()
    if reason == "PyTorch is not installed":
        raise CLIError("numbabn bench torch needs PyTorch: pip install torch (numbabn's 'torch' extra)")
    if reason is not None:
        raise CLIError(f"numbabn bench torch needs PyTorch: {reason}")
    settings = ctx.find_object(Settings) or Settings()
    if threads is not None:
        check_threads(ctx, threads)
    from numbabn.bench import torch_modules as benchmark

    out = {}
    extra: dict[str, Any] = {"repeat": repeat} if repeat else {}
    for part in parts or TORCH_PARTS:
        if settings.verbose:
            click.echo(f"running {part}", err=True)
        if part == "bn":
            out[part] = benchmark.run_bn(threads=threads, dtype=dtype, **extra)
            table = benchmark.format_bn(out[part])
        else:
            out[part] = benchmark.run_step(threads=threads, batch=batch, **extra)
            table = benchmark.format_step(out[part])
        first = out[part][0]
        click.echo(
            f"{part}: torch threads {first['threads']}, numbabn threads {first['numbabn_threads']}\n{table}\n",
            err=json_path == "-",
        )
    if json_path is not None:

        def write(f: IO[str]) -> None:
            json.dump(out, f, indent=2)
            f.write("\n")

        write_output(json_path, write, "the JSON rows")
