"""``numbabn experiment NAME``: one subcommand per experiment of :mod:`numbabn.train.experiments`.

The seam. ``numbabn.train.experiments`` defines a registry::

    EXPERIMENTS = {"ioffe-digits": ioffe_digits, ...}     # command name -> function

    def ioffe_digits(*, steps=None, seed=0, lr=None, out=None, progress=True):
        '''First paragraph: the short help in ``numbabn experiment --help``.

        The whole docstring is the help of ``numbabn experiment ioffe-digits``.
        '''
        ...
        return {"test_accuracy": 0.97, ...}              # JSON-serialisable summary

Every experiment gets the same options, passed as keyword arguments:
``steps`` and ``lr`` (None: the experiment's own default set-up), ``seed`` (int),
``out`` (a ``pathlib.Path`` to an existing, empty directory for its files, or None:
write nothing) and, when the function accepts it, ``progress`` (False with
``numbabn -q``). The returned dict is printed as ``key: value`` lines, or as JSON with
``--json``. Adding an experiment is therefore one entry in ``EXPERIMENTS``; nothing
here changes.

``--out DIR`` follows the command line's output rule (:mod:`numbabn.cli._common`): the
parent of DIR must exist, DIR is created if missing, and everything is checked before
the experiment starts. The experiment writes into a temporary directory beside DIR
whose files are moved into DIR only when it succeeds; paths in the summary name DIR.

The module is imported only when the experiments are listed or run (it imports the
layers and Numba), never for ``numbabn --help``. Without it the group lists none.
"""
import inspect
import json
from importlib import import_module

import click

from ._common import Settings, check_output_dir, staged_output_dir

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


def short_help(doc):
    """A docstring's first paragraph on one line: the listing wraps it, never cuts it."""
    return " ".join((doc or "").strip().split("\n\n")[0].split()) or None


def _out_option(ctx, param, value):
    return check_output_dir(value, None)


def _command(name, fn):
    """Wrap one experiment function as a click command with the common options."""
    takes_progress = "progress" in inspect.signature(fn).parameters

    @click.command(name=name, help=fn.__doc__, short_help=short_help(fn.__doc__))
    @click.option("--steps", type=click.IntRange(min=1), default=None,
                  help="Training steps [default: the experiment's set-up].")
    @click.option("--seed", type=int, default=0, show_default=True, help="Seed for data order and initialisation.")
    @click.option("--lr", type=click.FloatRange(min=0, min_open=True), default=None,
                  help="Learning rate [default: the experiment's set-up].")
    @click.option("--out", type=click.Path(file_okay=False), default=None, callback=_out_option,
                  help="Directory for the raw series (JSON) and the figures (PNG); its parent must exist. "
                       "Nothing is written without it.")
    @click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON.")
    @click.pass_context
    def run(ctx, steps, seed, lr, out, as_json):
        settings = ctx.find_object(Settings) or Settings()
        kwargs = dict(steps=steps, seed=seed, lr=lr)
        if takes_progress:
            kwargs["progress"] = not settings.quiet
        if out is None:
            summary = fn(out=None, **kwargs)
        else:
            with staged_output_dir(out) as (stage, publish):
                summary = fn(out=stage, **kwargs)
            summary = publish(summary)
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


@click.group(cls=ExperimentGroup, short_help="Reproduce the batch-norm papers' experiments at small scale.")
def experiment():
    """Reproduce the batch-norm papers' experiments at small scale (one subcommand each)."""
