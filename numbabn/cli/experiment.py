"""``numbabn experiment NAME``: one subcommand per experiment of :mod:`numbabn.train.experiments`.

The seam. ``numbabn.train.experiments`` defines a registry::

    EXPERIMENTS = {"ioffe": ioffe, ...}                  # command name -> function

    def ioffe(*, steps=None, seeds=None, lr=None, full=False, out=None, progress=True):
        '''First paragraph: the short help in ``numbabn experiment --help``.

        The whole docstring is the help of ``numbabn experiment ioffe``.
        '''
        ...
        return {"lr=0.2": {...}, ...}                    # JSON-serialisable summary

Every experiment gets the same options, passed as keyword arguments: ``steps``
(None: its own set-up), ``lr`` (``--lr``, repeatable: a tuple of rates, or None),
``seeds`` (``--seeds N``: seeds 0..N−1; ``--seed S``, repeatable: exactly those;
None: the experiment's default), ``full`` (the longer preset), ``out`` (a
``pathlib.Path`` to an existing, empty directory for its figures and JSON, or None:
write nothing) and, when the function takes it, ``progress`` (False with
``numbabn -q``). An experiment whose function takes ``depth`` also gets ``--depth``.
The returned dict is printed as indented text
(:func:`numbabn.train.summary.format_summary`), or as JSON with ``--json``.
Adding an experiment is therefore one entry in ``EXPERIMENTS``; nothing here changes.

``--out DIR`` follows the command line's output rule (:mod:`numbabn.cli._common`): the
parent of DIR must exist, DIR is created if missing, and this is checked before the
experiment starts. The experiment writes into a temporary directory beside DIR whose
files move into DIR only when it succeeds (paths in the summary name DIR), so a run
that fails leaves DIR as it was.

The module is imported only when the experiments are listed or run (it imports the
layers and Numba), never for ``numbabn --help``. Without it the group lists none.
"""

import inspect
import json
from collections.abc import Callable
from importlib import import_module
from typing import Any

import click

from ._common import Settings, check_output_dir, staged_output_dir, whole_short_help

EXPERIMENTS_MODULE = "numbabn.train.experiments"


def registry() -> dict[str, Callable[..., dict[str, Any]]]:
    """The ``EXPERIMENTS`` dict, or ``{}`` while :mod:`numbabn.train.experiments` does not exist."""
    try:
        module = import_module(EXPERIMENTS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name not in ("numbabn.train", EXPERIMENTS_MODULE):
            raise  # the module exists but one of its own imports is broken: show it
        return {}
    return module.EXPERIMENTS


def _command(name: str, fn: Callable[..., dict[str, Any]]) -> click.Command:
    """Wrap one experiment function as a click command with the common options."""
    parameters = inspect.signature(fn).parameters
    takes_depth, takes_progress = "depth" in parameters, "progress" in parameters

    @click.pass_context
    def run(
        ctx: click.Context,
        steps: int | None,
        seeds: int | None,
        seed: tuple[int, ...],
        lr: tuple[float, ...],
        full: bool,
        out: str | None,
        as_json: bool,
        depth: int | None = None,
    ) -> None:
        if seeds is not None and seed:
            raise click.UsageError("give --seeds N or --seed S (repeatable), not both")
        settings = ctx.find_object(Settings) or Settings()
        kwargs: dict[str, Any] = {"depth": depth} if takes_depth else {}
        if takes_progress:
            kwargs["progress"] = not settings.quiet
        kwargs.update(steps=steps, seeds=list(seed) if seed else seeds, lr=tuple(lr) or None, full=full)
        if out is None:
            summary = fn(out=None, **kwargs)
        else:
            with staged_output_dir(out) as (stage, publish):
                summary = fn(out=stage, **kwargs)
            summary = publish(summary)
        if as_json:
            click.echo(json.dumps(summary, indent=2, default=str))
        else:
            from ..train.summary import format_summary  # imported with the experiments, not for --help

            click.echo(format_summary(summary))

    options = [
        click.option(
            "--steps",
            type=click.IntRange(min=1),
            default=None,
            help="Training steps [default: the experiment's set-up].",
        ),
        click.option(
            "--seeds",
            type=click.IntRange(min=1),
            default=None,
            help="Run seeds 0..N-1 [default: 3 (maxlr: 2); with --full: 5].",
        ),
        click.option("--seed", type=int, multiple=True, help="Run exactly this seed (repeatable)."),
        click.option(
            "--lr",
            type=click.FloatRange(min=0, min_open=True),
            multiple=True,
            help="Learning rate (repeatable: a sweep) [default: the experiment's set-up].",
        ),
        click.option("--full", is_flag=True, help="The longer preset (more steps, seeds and rates) used for the docs."),
        click.option(
            "--out",
            type=click.Path(file_okay=False),
            default=None,
            callback=lambda ctx, param, value: check_output_dir(value, None),
            help="Directory for the raw series (JSON) and the figures (PNG); its parent must "
            "exist. Nothing is written without it.",
        ),
        click.option("--json", "as_json", is_flag=True, help="Print the summary as JSON."),
    ]
    if takes_depth:
        options.append(
            click.option(
                "--depth",
                type=click.IntRange(min=1),
                default=None,
                help="Network depth [default: the experiment's set-up].",
            )
        )
    for option in reversed(options):
        run = option(run)
    command = click.command(name=name, help=fn.__doc__)(run)
    command.short_help = whole_short_help(command) or None
    return command


class ExperimentGroup(click.Group):
    """Subcommands built on demand from the experiment registry."""

    def list_commands(self, ctx: click.Context) -> list[str]:
        return sorted(registry())

    def get_command(self, ctx: click.Context, cmd_name: str) -> click.Command | None:
        fn = registry().get(cmd_name)
        return None if fn is None else _command(cmd_name, fn)

    def format_commands(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        if registry():
            super().format_commands(ctx, formatter)
        else:
            with formatter.section("Experiments"):
                formatter.write_text(f"none installed ({EXPERIMENTS_MODULE} is not available)")


@click.group(cls=ExperimentGroup, short_help="Reproduce the batch-norm papers' experiments at small scale.")
def experiment() -> None:
    """Reproduce the batch-norm papers' experiments at small scale (one subcommand each)."""
