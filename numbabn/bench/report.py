"""What a benchmark run shows: the text table, JSON, CSV and plot of a harness
:class:`~numbabn.bench.harness.Report`, and :func:`text_table`, the one table formatter
of every benchmark.

Writers take an open file (the CLI decides where it goes: a path, written atomically,
or stdout). Why a hand-written :func:`text_table` rather than a table library:
the tables need right-aligned, preformatted cells separated by two spaces under a
dashed rule, which is six lines; ``tabulate``, the obvious library, pads every header
by a fixed two spaces (a module-global setting), which would widen the published
tables, and would add a dependency and about 0.1 s of import time for those six lines.
"""

import csv
import json
import os
from collections.abc import Sequence
from dataclasses import asdict, fields
from math import prod
from typing import IO, Any

import numpy as np

from .._buffers import MIN_BYTES
from .harness import Report, Row

TABLE_COLUMNS = (
    "op",
    "case",
    "shape",
    "layout",
    "ms",
    "GB/s",
    "%copy",
    "first s",
    "numpy ms",
    "x numpy",
    "torch ms",
    "x torch",
)


def text_table(head: Sequence[str], body: Sequence[Sequence[str]], rule: bool = True) -> str:
    """Right-aligned columns of the strings ``head`` and rows ``body``, two spaces
    apart, with a dashed rule under the header when ``rule``."""
    widths = [max(len(c) for c in col) for col in zip(head, *body, strict=True)]
    line = lambda cells: "  ".join(c.rjust(w) for c, w in zip(cells, widths, strict=True))  # noqa: E731
    return "\n".join([line(head)] + ([line(["-" * w for w in widths])] if rule else []) + [line(b) for b in body])


def _cell(v: Any, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(report: Report) -> str:
    """The title line and table of a harness report: per (case, op) numbabn's median
    ms, GB/s, % of the copy bandwidth and first-call seconds, then the NumPy
    reference's and PyTorch's median ms with "x numpy"/"x torch" = their ms / ours."""
    body = [
        [
            r.op,
            r.case,
            "x".join(map(str, r.shape)),
            r.layout,
            _cell(r.ms, ".3f"),
            _cell(r.gbps, ".1f"),
            _cell(r.pct_copy, ".0f"),
            _cell(r.first_s, ".2f"),
            _cell(r.numpy_ms, ".2f"),
            _cell(r.vs_numpy, ".1f"),
            _cell(r.torch_ms, ".3f"),
            _cell(r.vs_torch, ".2f"),
        ]
        for r in report.rows
    ]
    m = report.meta
    where = (
        f"{m['device']}, {m['threads']} threads/block, device"
        if m["backend"] == "cuda"
        else f"{m['threads']} thread{'' if m['threads'] == 1 else 's'} ({m['threading_layer']}),"
    )
    title = (
        f"numbabn {m['backend']} bench: {m['dtype']}, {where} "
        f"copy bandwidth {m['copy_gbps']:.1f} GB/s, torch {m['torch'] or 'not compared'}, median of {m['repeat']}"
    )
    return title + "\n" + text_table(TABLE_COLUMNS, body)


def footer(report: Report) -> str:
    """The first calls' total and slowest (compile or cache load); and, where PyTorch
    was timed on the CPU with outputs of at least ``numbabn._buffers.MIN_BYTES`` while
    glibc was not told to reuse such blocks, a line saying that those ratios compare
    PyTorch's fresh output pages with numbabn's reused buffers."""
    slowest = max(report.rows, key=lambda r: r.first_s)
    total = sum(r.first_s for r in report.rows)
    text = (
        f"first calls (JIT compile or Numba cache load; not in the timings): {total:.2f} s in all, "
        f"slowest {slowest.first_s:.2f} s ({slowest.op} {slowest.case})"
    )
    large = [
        r
        for r in report.rows
        if r.backend == "cpu" and r.torch_ms is not None and prod(r.shape) * np.dtype(r.dtype).itemsize >= MIN_BYTES
    ]
    if large and "MALLOC_MMAP_THRESHOLD_" not in os.environ:
        text += (
            f"\n{len({r.case for r in large})} case(s) of {MIN_BYTES >> 20} MiB and more: PyTorch's outputs come as "
            "fresh pages, numbabn's from reused buffers, which is most of the ratio there; "
            "MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=4294967296 lets PyTorch reuse memory too "
            '(README, "What the large ratios measure")'
        )
    return text


def write_json(report: Report, f: IO[str]) -> None:
    """``{"meta": ..., "rows": [...]}``, indented."""
    json.dump(report.to_dict(), f, indent=2)
    f.write("\n")


def write_csv(report: Report, f: IO[str]) -> None:
    """One row per (case, op), the :class:`~numbabn.bench.harness.Row` fields as
    columns, the shape as ``NxCxHxW``."""
    writer = csv.DictWriter(f, [fld.name for fld in fields(Row)], lineterminator="\n")
    writer.writeheader()
    for row in report.rows:
        writer.writerow({**asdict(row), "shape": "x".join(map(str, row.shape))})


def plot(report: Report, f: Any, fmt: str) -> None:
    """Roofline-style bars into the binary file ``f`` (``fmt``: png, svg or pdf):
    numbabn's (and PyTorch's) GB/s per case/op under the copy bandwidth."""
    import numpy as np
    from matplotlib.figure import Figure  # Agg through Figure.savefig: no pyplot, no GUI backend

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
    ax.axhline(
        meta["copy_gbps"],
        color="black",
        linestyle="--",
        label=f"{'device ' if meta['backend'] == 'cuda' else ''}copy bandwidth {meta['copy_gbps']:.1f} GB/s",
    )
    ax.set_xticks(pos, [f"{r.case}\n{r.op}" for r in rows], rotation=90 if len(rows) > 8 else 0, fontsize=8)
    ax.set_xlabel("case / op")
    ax.set_ylabel("effective bandwidth, GB/s (bytes moved / time)")
    ax.set_title(f"numbabn {meta['backend']} batch norm ({meta['dtype']}) vs the copy-bandwidth limit", fontsize=10)
    ax.legend()
    fig.savefig(f, dpi=120, format=fmt)
