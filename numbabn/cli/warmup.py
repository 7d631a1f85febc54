"""``numbabn warmup``: compile (or load from the cache) every CPU kernel ahead of time."""

import sys
import time

import click

from ._common import CLIError, Settings


@click.command()
@click.option(
    "--dtype",
    "dtypes",
    multiple=True,
    type=click.Choice(["float32", "float64", "float16", "bfloat16"]),
    help="Only these dtypes (repeatable; default float32 and float64). float16 and "
    "bfloat16 (numbabn.torch) have their own data kernels and share float32's others.",
)
@click.option(
    "--layout",
    "layouts",
    multiple=True,
    type=click.Choice(["ncl", "mc"]),
    help="Only these layouts (repeatable; default both): ncl = channels not last "
    "(NCHW, NCL), mc = channels last or (N, C).",
)
@click.option(
    "--residual",
    is_flag=True,
    help="Also the fused residual variants (batch_norm_forward(residual=...), "
    "numbabn.torch's fused ResNet blocks): 3 more kernels per dtype and layout (6 for ncl alone: its "
    "short rows' gradient sums and channels-last passes).",
)
@click.pass_context
def warmup(ctx: click.Context, dtypes: tuple[str, ...], layouts: tuple[str, ...], residual: bool) -> None:
    """Compile the CPU kernels now, so that later calls only load them.

    By default the float32 and float64 kernels of both layouts, without the fused
    residual (the options add float16, bfloat16 and the residual variants).
    Compiled kernels are cached on disk (see `numbabn info`): run this once after
    installing, e.g. in a Docker image build, and every later process only loads them.
    Exits with code 2 when a variant it compiled could not be cached (no writable
    cache location, a read-only one, a failed write): later processes would compile it.
    """
    from numbabn import config
    from numbabn.backends import cpu

    settings = ctx.find_object(Settings) or Settings()
    config.QUIET = True  # the progress bar says what is happening
    plan = cpu.warmup_plan(dtypes or ("float32", "float64"), layouts or ("ncl", "mc"), residual)
    t0 = time.perf_counter()
    with click.progressbar(
        plan,
        label="compiling kernels",
        file=sys.stderr,
        hidden=settings.quiet or sys.stderr is None or not sys.stderr.isatty(),  # None: fd 2 closed
        item_show_func=lambda item: item[0] if item else None,
    ) as bar:
        for _, compile_one in bar:
            compile_one()
    from numbabn import _jit

    entries, writable, read_only = _jit.cache_locations()
    lost = _jit.unsaved()
    if lost or not entries:
        # The command's point is the cache: a Docker build step that cached nothing, or
        # left some variants uncached, must fail, not leave later processes to compile.
        if writable:
            why = f"writing to {writable} failed"
        elif read_only:
            why = f"the cache in {read_only[0]} is read-only"
        else:
            why = "no writable cache location"
        raise CLIError(
            f"{len(plan)} kernel variants ready, but {lost or 'all'} compiled ones could not be cached ({why}), "
            "so later processes compile them again; set NUMBA_CACHE_DIR to a writable directory"
        )
    if not settings.quiet:
        # entries: what a call can load, from the writable directory and the read-only
        # ones together (a signature is one compiled specialisation of one kernel)
        if not read_only:
            where = f"cached in {writable}"
        else:
            where = "loadable from " + " and ".join(
                ([writable] if writable else []) + [f"read-only {', '.join(read_only)}"]
            )
            where += f"; new ones go to {writable}" if writable else "; none could be added"
        click.echo(
            f"{len(plan)} kernel variants ready in {time.perf_counter() - t0:.1f} s "
            f"({entries} compiled signatures {where})",
            err=True,
        )
