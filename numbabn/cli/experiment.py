"""``numbabn experiment NAME``: one subcommand per experiment of :mod:`numbabn.train.experiments`.

The seam. ``numbabn.train.experiments`` defines a registry::

    EXPERIMENTS = {"ioffe-digits": ioffe_digits, ...}     # command name -> function

    def ioffe_digits(*, steps=None, seed=0, lr=None, out=None):
        '''First docstring line: the short help in ``numbabn experiment --help``.

        The whole docstring is the help of ``numbabn experiment ioffe-digits``.
        '''
        ...
        return {"test_accuracy": 0.97, ...}              # JSON-serialisable summary

Every experiment gets the same options, passed as keyword arguments:
``steps`` and ``lr`` (None: the experiment's own default set-up), ``seed`` (int) and
``out`` (a ``pathlib.Path`` to an existing directory for figures/CSV, created by the
CLI, or None: write nothing). The returned dict is printed as ``key: value`` lines, or
as JSON with ``--json``. Adding an experiment is therefore one entry in
``EXPERIMENTS``; nothing here changes.

The module is imported only when the experiments are listed or run (it imports the
layers and Numba), never for ``numbabn --help``. Without it the group lists none.
"""
import json
from importlib import import_module
from pathlib import Path

import click

EXPERIMENTS_MODULE = "numbabn.train.experiments"


def registry():
    """The ``EXPERIMENTS`` dict, or ``{}`` while :mod:`numbabn.train.experiments` does not exist."""
    try:
        module = import_module(EXPERIMENTS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name not in ("numbabn.train", EXPERIMENTS_MODULE):
            raise   # the module exists but one of its own imports is broken: show it
        return {}
    return module.EXPERIMENTS


def _command(name, fn):
    """Wrap one experiment function as a click command with the common options."""

    @click.command(name=name, help=fn.__doc__, short_help=(fn.__doc__ or "").strip().split("\n")[0] or None)
    @click.option("--steps", type=click.IntRange(min=1), default=None,
                  help="Training steps [default: the experiment's set-up].")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed for data order and initialisation.")
    @click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="Learning rate [default: the experiment's set-up].")
    @click.option("--out", type=click.Path(file_okay=False, path_type=Path), default=None,
                  help="Directory for figures and CSV (created); nothing is written without it.")
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
    def run(steps, seed, lr, out, as_json):
        if out is not None:
            out.mkdir(parents=True, exist_ok=True)
        summary = fn(steps=steps, seed=seed, lr=lr, out=out)
        if as_json:
            click.echo(json.dumps(summary, indent=2, default=str))
        else:
            click.echo("\n".join(f"{key}: {value}" for key, value in summary.items()))

    return run


class ExperimentGroup(click.Group):
    """Subcommands built on demand from the experiment registry."""

    def list_commands(self, ctx):
        return sorted(registry())

    def get_command(self, ctx, cmd_name):
        fn = registry().get(cmd_name)
        return None if fn is None else _command(cmd_name, fn)

    def format_commands(self, ctx, formatter):
        if registry():
            super().format_commands(ctx, formatter)
        else:
            with formatter.section("Experiments"):
                formatter.write_text(f"none installed ({EXPERIMENTS_MODULE} is not available)")


@click.group(cls=ExperimentGroup)
def experiment():
    """Reproduce the batch-norm papers' experiments at small scale (one subcommand each)."""
