"""``fisherscan models``: the short names, their timm architectures and official checkpoint files."""

from __future__ import annotations

import typer
from rich.markup import escape
from rich.table import Table

from .app import app, stdout, user_errors


def millions(count: int | None) -> str:
    return "" if count is None else f"{count / 1e6:,.1f}M"


@app.command("models")
def models_command(
    counts: bool = typer.Option(False, "--counts", help="add parameter and candidate (Q, K, V, FFN) counts, "
                                                         "computed on the meta device"),
) -> None:
    """List the backbones --model accepts, with the official file each loads and where to put it."""
    from ..models.backbone import registry_rows
    from ..models.registry import hub_checkpoint_dir

    with user_errors():
        rows = registry_rows(counts=counts)
    table = Table(title="backbones (--model NAME; any timm ViT as timm:<name>)",
                  caption=escape(f"Put a file in {hub_checkpoint_dir()} (found by name) or pass it with "
                                 "--weights FILE; NAME?key=value&... passes timm.create_model arguments"))
    for column in ("short name", "family", "timm architecture", "official file", "in hub cache"):
        table.add_column(column)
    if counts:
        table.add_column("parameters", justify="right")
        table.add_column("candidates", justify="right")
    for row in rows:
        cells = [row.entry.name, row.entry.family_label, row.entry.timm_name, row.entry.official_file,
                 "found" if row.cached else "-"]
        if counts:
            cells += [millions(row.parameters), millions(row.candidates)]
        table.add_row(*(escape(cell) for cell in cells))
    stdout.print(table)
