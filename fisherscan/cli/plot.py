"""``fisherscan plot`` (heatmap, histogram and per-block figures) and ``fisherscan inspect`` (tables, compare)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.measure import Measurement

from ..errors import FisherscanError
from .app import app, parse_fraction, print_paths, stdout, user_errors

PATH_LABELS = {"heatmap-csv": "heatmap table", "histogram-csv": "histogram table", "blocks-csv": "blocks table"}


def parse_top(text: str) -> float:
    """``--top``: '5%' or '0.05' -> 0.05; must lie in (0, 1]."""
    return parse_fraction(text, "--top", allow_zero=False)


def print_whole(table) -> None:
    """Print a table at its natural width even past the terminal's (the terminal wraps it), never cutting numbers."""
    needed = Measurement.get(stdout, stdout.options.update_width(10_000), table).maximum
    (stdout if needed <= stdout.width else Console(width=needed)).print(table)


@app.command()
def plot(
    scores: Path = typer.Option(..., "--scores", help="scores file from 'fisherscan score'"),
    kind: Optional[str] = typer.Option(None, "--kind", help="kinds, comma-separated (default fim,drfim)"),
    out: Optional[Path] = typer.Option(None, "--out", help="heatmap .png/.pdf/.svg (default: <scores>.png)"),
    stat: str = typer.Option("mean", "--stat", help="mean (cell's mean score) or share (its fraction in the top-k)"),
    top: str = typer.Option("5%", "--top", help="top-k of the candidate elements (Q, K, V, FFN): 5% or 0.05"),
    all_groups: bool = typer.Option(False, "--all-groups", help="add attn-proj and norm rows to the heatmap"),
    scale: str = typer.Option("auto", "--scale", help="auto (log for mean, linear for share), log or linear"),
) -> None:
    """Heatmap of sensitivity per block x group (Fig. 6), log10 histograms per group, per-block top-k fractions."""
    from ..scores.plot import plot_scores

    with user_errors():
        result = plot_scores(scores, kind=kind, out=out, stat=stat, top=parse_top(top), all_groups=all_groups,
                             scale=scale)
        print_paths(*((PATH_LABELS.get(label, label), path) for label, path in result.paths.items()))


@app.command(context_settings={"allow_extra_args": True})  # the old spelling 'inspect FILE'
def inspect(
    ctx: typer.Context,
    scores: Optional[Path] = typer.Option(None, "--scores", help="scores file from 'fisherscan score'"),
    csv: Optional[Path] = typer.Option(None, "--csv", help="also write the table as CSV"),
    compare: Optional[Path] = typer.Option(None, "--compare", help="a second scores file: rank agreement with it"),
    kind: Optional[str] = typer.Option(None, "--kind", help="kinds, comma-separated (default fim,drfim)"),
    top: str = typer.Option("5%", "--top", help="top-k of the candidate elements (Q, K, V, FFN): 5% or 0.05"),
) -> None:
    """Metadata and a block x group table of a scores file; with --compare, Spearman and top-k Jaccard vs another."""
    from ..scores.compare import run_inspect

    with user_errors():
        if len(ctx.args) > 1 or (ctx.args and scores is not None):
            raise FisherscanError(f"inspect {' '.join(ctx.args)}: pass one scores file, as --scores FILE")
        scores = scores if scores is not None else (Path(ctx.args[0]) if ctx.args else None)
        if scores is None:
            raise FisherscanError("--scores: missing; pass the scores file written by 'fisherscan score'")
        tables, _ = run_inspect(scores, kind=kind, top=parse_top(top), compare=compare, csv=csv)
        for table in tables:
            print_whole(table)
        if csv is not None:
            print_paths(("table", csv))
