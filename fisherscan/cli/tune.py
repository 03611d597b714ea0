"""``fisherscan tune`` (masked fine-tuning from scores) and ``fisherscan mask`` (a selection for other trainers)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..models.groups import CANDIDATE_GROUPS
from ..recipes.config import TuneConfig
from ..recipes.inherit import INHERITED
from .app import app, console, parse_fraction, print_paths, stdout, user_errors
from .options import config_options, field_help, given
from .score import CONFIG_HELP


@app.command()
@config_options(TuneConfig, notes={**{name: "from --scores" for name in INHERITED if name != "head"},
                                   "out": "<scores name>-run beside --scores"})
def tune(
    ctx: typer.Context,
    config_file: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP, rich_help_panel="Run control"),
    **options,
) -> None:
    """Fine-tune only the backbone elements the scores select (Algorithm 1 step 3), plus the decoder. The model,
    its weights, the data, the crop, the decoder and the head come from --scores unless given."""
    from ..recipes.layers import tune_config
    from ..recipes.tune import run_tune

    with user_errors():
        resolved = tune_config(given(ctx, TuneConfig, options), config_file)
        report_tune(run_tune(resolved.config, console, resolved.sources), resolved.config)


def report_tune(result, config) -> None:
    """The notes, the trainable summary, the evaluation table and the paths of a tune run (rank 0 only)."""
    from ..eval.evaluate import results_table
    from ..recipes.tune import trainable_summary

    if not result.main:  # torchrun: rank 0 reports
        return
    out = config.out
    for note in result.notes:
        stdout.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if not result.finished:
        stdout.print(f"stopped after step {len(result.log)} as asked; continue with --resume", markup=False)
        print_paths(("checkpoint", out / "checkpoint.safetensors"))
        return
    stdout.print(trainable_summary(result), markup=False)
    if result.evaluation is not None:
        stdout.print(results_table(result.evaluation, f"mIoU after {config.steps} steps"))
    print_paths(("model", out / "model.safetensors"), ("manifest", out / "manifest.json"), ("log", out / "log.csv"),
                *((("eval", out / "eval" / "eval.json"),) if result.evaluation is not None else ()))


def parse_groups(text: str) -> tuple[str, ...]:
    """'Q,K,V,FFN' -> ('Q', 'K', 'V', 'FFN') for --candidates."""
    return tuple(c.strip() for c in text.split(",") if c.strip())


@app.command()
def mask(
    scores: Path = typer.Option(..., "--scores", help="scores file from 'fisherscan score'"),
    out: Path = typer.Option(..., "--out", help="mask file (.safetensors), tensors mask/<param> as uint8"),
    budget: str = typer.Option("5%", "--budget", help="fraction of all backbone parameters to select: 0.05 or 5%"),
    strategy: str = typer.Option("scores", "--strategy", help=field_help(TuneConfig, "strategy")),
    score_kind: str = typer.Option("drfim", "--score-kind", help=field_help(TuneConfig, "score_kind")),
    candidates: str = typer.Option(",".join(CANDIDATE_GROUPS), "--candidates",
                                   help=field_help(TuneConfig, "candidates")),
    seed: int = typer.Option(0, "--seed", help="seed of the random strategies"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out"),
    names: str = typer.Option("timm", "--format", help="parameter names of the mask: timm (the scores' own) or hf "
                                                        "(the transformers checkpoint's: q/k/v split, its prefix)"),
) -> None:
    """Write the selection for a budget as a safetensors mask, for use in other trainers."""
    from ..scores.select import write_mask

    with user_errors():
        selected, total = write_mask(scores, out, parse_fraction(budget, "--budget"), strategy, score_kind,
                                     parse_groups(candidates), seed, overwrite, names)
        stdout.print(f"{selected:,} of {total:,} backbone elements selected ({selected / max(total, 1):.2%})",
                     markup=False)
        print_paths(("mask", out))
