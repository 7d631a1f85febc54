"""The ``numbabn`` command line: ``numbabn info | bench | layers | experiment | warmup``.

Each command lives in its own module (``numbabn/cli/<command>.py``) and is
registered in :data:`COMMANDS`. Command modules import only click at module level;
NumPy, Numba, PyTorch and matplotlib are imported inside the command functions, so
``numbabn --help`` stays fast and never compiles or loads a kernel.
"""

import click

from numbabn import __version__

from ._common import RootGroup, Settings

COMMANDS = {
    "info": "numbabn.cli.info:info",
    "bench": "numbabn.cli.bench:bench",
    "layers": "numbabn.cli.layers:layers",
    "experiment": "numbabn.cli.experiment:experiment",
    "warmup": "numbabn.cli.warmup:warmup",
}


@click.group(cls=RootGroup, lazy_subcommands=COMMANDS, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(__version__, "--version", prog_name="numbabn")
@click.option("-v", "--verbose", count=True, help="More detail (repeatable).")
@click.option("-q", "--quiet", is_flag=True, help="No progress bars or notes on stderr.")
@click.pass_context
def main(ctx: click.Context, verbose: int, quiet: bool) -> None:
    """Batch normalization for NumPy on Numba kernels: inspect, benchmark, experiment."""
    if verbose and quiet:
        raise click.UsageError("-v/--verbose and -q/--quiet exclude each other")
    ctx.obj = Settings(verbose=verbose, quiet=quiet)
    if quiet:
        # the compile notice is printed by the kernels' JIT layer, not by a command:
        # its switch silences it for every command (numbabn.config is only os and glob)
        from numbabn import config

        config.QUIET = True
