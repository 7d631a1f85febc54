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
(:func:`numbabn.train.summary.format_summary`), or as JSON with ``--json`` (strict
JSON: NaN and infinities, a summary over no finite value, are written as null).
Adding an experiment is therefore one entry in ``EXPERIMENTS``; nothing here changes.

Option values are checked before any work, as click's one-line usage errors (exit 2):
the option types hold what every experiment needs (``--lr`` finite and > 0, ``--seed``
a distinct seed in [0, 2**32 - 1], the range scikit-learn's data split takes), and
what only the experiment knows (the least ``--depth``: 2 for dln, 1 for the others)
comes from its own argument check, the first thing it does: a
``ValueError("experiment NAME: ARG must ...")`` for one of the keyword arguments
becomes ``Invalid value for '--ARG'``.

``--out DIR`` follows the command line's output rule (:mod:`numbabn.cli._common`): the
parent of DIR must exist, DIR is created if missing, and this is checked before the
experiment starts. The experiment writes into a temporary directory (inside DIR, or
beside it while DIR does not exist) whose files move into DIR only when it succeeds,
all of them or none (:func:`~numbabn.cli._common.staged_output_dir`), so a run that
fails leaves DIR as it was. A run that finished but whose files cannot move into DIR
(a directory there named like one of them) prints its summary, then the error naming
the staging directory that keeps its files. Paths in the printed summary name DIR; the JSON names its
figures relative to DIR (their file names), so its bytes do not depend on where it
was written.

The module is imported only when the experiments are listed or run (it imports the
layers and Numba), never for ``numbabn --help``. Without it the group lists none.
"""

import inspect
import json
import math
import re
from collections.abc import Callable
from importlib import import_module
from pathlib import Path
from typing import Any

import click

from ._common import OutputsKept, Settings, check_output_dir, staged_output_dir, whole_short_help

EXPERIMENTS_MODULE = "numbabn.train.experiments"


def _echo_summary(summary: Any, as_json: bool) -> None:
    """Print an experiment's summary: as JSON (non-finite values as null), or as text."""
    if as_json:
        click.echo(json.dumps(_finite_or_null(summary), indent=2, default=str, allow_nan=False))
    else:
        from ..train.summary import format_summary  # imported with the experiments, not for --help

        click.echo(format_summary(summary))


SEED_MAX = 2**32 - 1  # the largest random_state of scikit-learn's train_test_split (the experiments' data split)


def registry() -> dict[str, Callable[..., dict[str, Any]]]:
    """The ``EXPERIMENTS`` dict, or ``{}`` while :mod:`numbabn.train.experiments` does not exist."""
    try:
        module = import_module(EXPERIMENTS_MODULE)
    except ModuleNotFoundError as exc:
        if exc.name not in ("numbabn.train", EXPERIMENTS_MODULE):
            raise  # the module exists but one of its own imports is broken: show it
        return {}
    return module.EXPERIMENTS


class Rate(click.FloatRange):
    """A learning rate: a float in (0, inf). FloatRange alone lets NaN through (it
    compares false with every bound)."""

    def __init__(self) -> None:
        super().__init__(min=0, max=math.inf, min_open=True, max_open=True)

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        rate = super().convert(value, param, ctx)
        if math.isnan(rate):
            self.fail(f"{rate} is not in the range 0<x<inf.", param, ctx)
        return rate


def _distinct(ctx: click.Context, param: click.Parameter, seeds: tuple[int, ...]) -> tuple[int, ...]:
    """``--seed`` callback: each seed once (a repeated seed would count twice in the summaries)."""
    for i, seed in enumerate(seeds):
        if seed in seeds[:i]:
            raise click.BadParameter(f"{seed} is given twice (seeds must be distinct)", ctx=ctx, param=param)
    return seeds


def _option_error(ctx: click.Context, name: str, exc: ValueError) -> click.BadParameter | None:
    """The experiment's own check of an argument (``ValueError("experiment NAME: ARG must
    ...")``) as click's error on that argument's option; None for any other ValueError."""
    match = re.match(rf"experiment {re.escape(name)}: (\w+) must ", str(exc))
    if match is None:
        return None
    option = "seed" if match[1] == "seeds" and ctx.params["seed"] else match[1]
    param = next((p for p in ctx.command.params if p.name == option), None)
    return None if param is None else click.BadParameter(str(exc).split(": ", 1)[1], ctx=ctx, param=param)


def _finite_or_null(value: Any) -> Any:
    """``value`` with every NaN or infinite float as None: JSON has no NaN or Infinity."""
    if isinstance(value, float):
        return value if math.isfinite(value) else None
    if isinstance(value, dict):
        return {k: _finite_or_null(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite_or_null(v) for v in value]
    return value


def _check_names_free(name: str, out: str | Path | None) -> None:
    """Refuse, before any training, an ``--out`` holding something other than a file
    where the experiment writes one: ``NAME.json`` and its figures ``NAME_*.png`` (a
    directory of such a name was found only when the finished run was moved in)."""
    if out is None or not Path(out).is_dir():
        return
    for entry in Path(out).iterdir():
        mine = entry.name == f"{name}.json" or (entry.name.startswith(f"{name}_") and entry.name.endswith(".png"))
        if mine and (entry.is_dir() or not entry.is_file()):
            raise click.BadParameter(
                f"{str(entry)!r} is not a file, and the experiment writes a file of that name there",
                param_hint="'--out'",
            )


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
        _check_names_free(name, out)
        summary = None
        try:
            if out is None:
                summary = fn(out=None, **kwargs)
            else:
                with staged_output_dir(out) as (stage, publish):
                    summary = fn(out=stage, **kwargs)
                summary = publish(summary)
        except OutputsKept:
            if summary is not None:  # the run finished: its summary, naming the kept files, then the error
                _echo_summary(summary, as_json)
            raise
        except ValueError as exc:
            error = _option_error(ctx, name, exc)
            if error is None:
                raise
            raise error from None
        _echo_summary(summary, as_json)

    options = [
        click.option(
            "--steps",
            type=click.IntRange(min=1),
            default=None,
            help="Training steps (maxlr: of each search run, at least 2) [default: the experiment's set-up].",
        ),
        click.option(
            "--seeds",
            type=click.IntRange(1, SEED_MAX + 1),
            default=None,
            help="Run seeds 0..N-1 [default: 3 (maxlr: 2); with --full: 5].",
        ),
        click.option(
            "--seed",
            type=click.IntRange(0, SEED_MAX),
            multiple=True,
            callback=_distinct,
            help="Run exactly this seed (repeatable, each seed once).",
        ),
        click.option(
            "--lr",
            type=Rate(),
            multiple=True,
            help="Learning rate (repeatable: a sweep; maxlr takes one, the start of its search) "
            "[default: the experiment's set-up].",
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
                type=int,
                default=None,
                help="Network depth (at least 1; dln: 2) [default: the experiment's set-up].",
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
