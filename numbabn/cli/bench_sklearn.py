"""``numbabn bench sklearn``: the scikit-learn estimators against scikit-learn's own
(:mod:`numbabn.bench.sklearn_estimators`)."""

import json
from typing import IO

import click

from numbabn.bench.cases import SKLEARN_PARTS

from ._common import Settings, check_output_file, check_threads, write_output


@click.command(short_help="BatchNormTransformer vs StandardScaler, BNMLPClassifier vs MLPClassifier.")
@click.option(
    "--part",
    "parts",
    multiple=True,
    type=click.Choice(SKLEARN_PARTS),
    help="transformer or mlp; repeatable [default: both].",
)
@click.option(
    "--samples", type=click.IntRange(min=2), default=1_000_000, show_default=True, help="transformer: rows of X."
)
@click.option(
    "--features", type=click.IntRange(min=1), default=64, show_default=True, help="transformer: columns of X."
)
@click.option(
    "--dtype",
    "dtypes",
    multiple=True,
    type=click.Choice(["float32", "float64"]),
    help="transformer: repeatable [default: float32 and float64].",
)
@click.option(
    "--repeat",
    type=click.IntRange(min=1),
    default=5,
    show_default=True,
    help="transformer: timed calls per side; the median is reported.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=1),
    default=50,
    show_default=True,
    help="mlp: epochs (partial_fit calls) per run.",
)
@click.option(
    "--seed",
    "seeds",
    multiple=True,
    type=click.IntRange(0, 2**32 - 1),  # the seeds NumPy's RandomState (the random_state of both MLPs) takes
    help="mlp: random_state of a run; repeatable [default: 0 1 2].",
)
@click.option(
    "--threads",
    type=click.IntRange(min=1),
    default=None,
    help="Cap numbabn's kernel threads and BLAS threads for both sides [default: the libraries' own].",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, allow_dash=True),
    callback=lambda ctx, param, value: check_output_file(value, None),
    help="Write the rows as JSON; '-' writes them to stdout and the tables to stderr.",
)
@click.pass_context
def sklearn(
    ctx: click.Context,
    parts: tuple[str, ...],
    samples: int,
    features: int,
    dtypes: tuple[str, ...],
    repeat: int,
    epochs: int,
    seeds: tuple[int, ...],
    threads: int | None,
    json_path: str | None,
) -> None:
    """BatchNormTransformer vs StandardScaler (fit + transform, median time) and
    BNMLPClassifier vs MLPClassifier on digits (test accuracy, training time, epochs
    to 95% test accuracy at the same budget), measured in the same run."""
    from numbabn.bench.sklearn_estimators import format_table, run_sklearn_bench

    settings = ctx.find_object(Settings) or Settings()
    if threads is not None:
        check_threads(ctx, threads)
    if settings.verbose:
        click.echo(f"running: {', '.join(parts or SKLEARN_PARTS)}", err=True)
    rows = run_sklearn_bench(
        parts or SKLEARN_PARTS,
        n_samples=samples,
        n_features=features,
        dtypes=dtypes or ("float32", "float64"),
        repeat=repeat,
        epochs=epochs,
        seeds=seeds or (0, 1, 2),
        threads=threads,
    )
    click.echo(format_table(rows), err=json_path == "-")
    if json_path is not None:

        def write(f: IO[str]) -> None:
            json.dump(rows, f, indent=2)
            f.write("\n")

        write_output(json_path, write, "the JSON rows")
