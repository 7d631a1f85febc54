"""``numbabn layers``: the layer registry, built-in layers and plugins."""

import json

import click

from ._common import Settings


@click.command()
@click.option("--json", "as_json", is_flag=True, help="Print a JSON list instead of a table.")
@click.pass_context
def layers(ctx: click.Context, as_json: bool) -> None:
    """List the registered layers and where each comes from.

    Origins: "builtin" (numbabn itself), "<distribution> <version> (<module>:<class>)"
    for a plugin package's ``numbabn.layers`` entry point, or the module that
    registered the layer in-process. A plugin that fails to load is skipped with a
    warning on stderr.
    """
    from numbabn import registry

    rows = []
    for name, origin in registry.available_layers().items():
        cls = registry.layer_class(name)
        rows.append({"name": name, "origin": origin, "class": f"{cls.__module__}.{cls.__qualname__}"})
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    settings = ctx.find_object(Settings) or Settings()
    columns = ("name", "origin", "class") if settings.verbose else ("name", "origin")
    widths = [max(len(col), *(len(r[col]) for r in rows)) for col in columns]
    for cells in [columns, ["-" * w for w in widths]] + [[r[c] for c in columns] for r in rows]:
        click.echo("  ".join(c.ljust(w) for c, w in zip(cells, widths, strict=True)).rstrip())
