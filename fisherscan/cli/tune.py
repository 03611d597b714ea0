"""``fisherscan tune`` (masked fine-tuning from scores) and ``fisherscan mask`` (a selection for other trainers)."""

from __future__ import annotations

from pathlib import Path
from typing import List, Optional

import typer
from rich.markup import escape

from ..models.groups import CANDIDATE_GROUPS
from .app import app, console, parse_blocks, parse_fraction, print_paths, stdout, user_errors


@app.command()
def tune(
    ctx: typer.Context,
    scores: Path = typer.Option(..., "--scores", help="scores file from 'fisherscan score'"),
    model: str = typer.Option(..., "--model", help="the model the scores were computed on"),
    data: Path = typer.Option(..., "--data", help="folder of labelled source images"),
    out: Path = typer.Option(..., "--out", help="run folder to write"),
    weights: Optional[Path] = typer.Option(None, "--weights"),
    random_init: bool = typer.Option(False, "--random-init"),
    strict: bool = typer.Option(True, "--strict/--no-strict",
                                help="checkpoint keys missing or unexpected after conversion are an error"),
    layout: str = typer.Option("auto", "--layout"),
    split: str = typer.Option("train", "--split"),
    images: Optional[int] = typer.Option(None, "--images"),
    steps: int = typer.Option(1000, "--steps", help="fine-tuning steps T3"),
    batch_size: int = typer.Option(8, "--batch-size"),
    accumulate: int = typer.Option(1, "--accumulate", help="gradient accumulation: batches per step"),
    crop: int = typer.Option(512, "--crop"),
    augment: str = typer.Option("crop", "--augment", help="crop (random crop + flip) or rein (resize 0.5-2.0, "
                                "class-balanced crop, flip, photometric distortion)"),
    recipe: Optional[str] = typer.Option(None, "--recipe", help="preset of a published protocol: rein-512 "
                                         "(options given explicitly override it)"),
    strategy: str = typer.Option("scores", "--strategy",
                                 help="scores (by --score-kind), fim, delta, drfim, random, random-q/k/v, full, "
                                      "freeze"),
    score_kind: str = typer.Option("drfim", "--score-kind", help="score kind that ranks elements"),
    candidates: str = typer.Option(",".join(CANDIDATE_GROUPS), "--candidates", help="groups to select from"),
    delta_min: str = typer.Option("1%", "--delta-min",
                                  help="selected fraction of all backbone parameters at the start"),
    delta_max: str = typer.Option("5%", "--delta-max", help="... at the end (Eq. 16)"),
    schedule_t: Optional[float] = typer.Option(None, "--schedule-T", help="Eq. 16 time constant (default steps/3)"),
    lr: float = typer.Option(1e-4, "--lr", help="AdamW learning rate (poly decay)"),
    decoder_lr: Optional[float] = typer.Option(None, "--decoder-lr",
                                               help="the decoder's AdamW learning rate (poly decay; default --lr)"),
    adam_bias_correction: str = typer.Option(
        "selection", "--adam-bias-correction",
        help="selection: an element's Adam bias correction counts from the step it was first selected (its first "
             "update is a normal first Adam step); global: from the run's first step (fisherscan before per-element "
             "counts)"),
    weight_decay: float = typer.Option(0.05, "--weight-decay"),
    decoder: str = typer.Option("linear", "--decoder", help="linear, multilevel or mask2former[?option=value&...]"),
    feature_blocks: Optional[str] = typer.Option(None, "--feature-blocks", help="4 block indices for the decoder"),
    head: Optional[Path] = typer.Option(None, "--head", help="head to start from (default: the one beside the scores)"),
    warmup_steps: int = typer.Option(200, "--warmup-steps", help="decoder warm-up when no head is found"),
    full_checkpoint: bool = typer.Option(False, "--full-checkpoint", help="save the whole backbone"),
    resume: bool = typer.Option(False, "--resume", help="continue from the run folder's checkpoint"),
    save_every: int = typer.Option(100, "--save-every", help="steps between resumable checkpoints"),
    stop_after: Optional[int] = typer.Option(None, "--stop-after", help="stop after N steps, resumable"),
    eval: Optional[List[Path]] = typer.Option(None, "--eval", help="target domain folder(s) to evaluate at the end"),
    eval_every: int = typer.Option(0, "--eval-every", help="also evaluate every N steps"),
    eval_layout: str = typer.Option("auto", "--eval-layout"),
    eval_split: str = typer.Option("val", "--eval-split"),
    eval_crop: Optional[int] = typer.Option(None, "--eval-crop", help="slide window (default --crop)"),
    eval_stride: Optional[int] = typer.Option(None, "--eval-stride", help="slide stride (default 2/3 of the window)"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    workers: int = typer.Option(2, "--workers"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace a finished run (or a stopped one) in --out"),
    max_bad_frac: float = typer.Option(0.1, "--max-bad-frac",
                                       help="stop with an error when more than this fraction of steps has non-finite "
                                            "losses or gradients (such steps are skipped)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip unreadable or invalid image/label pairs "
                                                            "(checked before the run, listed in the manifest) "
                                                            "instead of stopping"),
) -> None:
    """Fine-tune only the backbone elements the scores select (Algorithm 1 step 3), plus the decoder."""
    from ..recipes.config import TuneConfig
    from ..recipes.presets import apply_recipe
    from ..recipes.tune import run_tune

    with user_errors():
        config = TuneConfig(**{**ctx.params, "candidates": parse_groups(candidates), "eval": tuple(eval or ()),
                               "delta_min": parse_fraction(delta_min, "--delta-min"),
                               "delta_max": parse_fraction(delta_max, "--delta-max"),
                               "feature_blocks": parse_blocks(feature_blocks)})
        explicit = {name for name in ctx.params  # (by name: typer may carry its own copy of click)
                    if getattr(ctx.get_parameter_source(name), "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")}
        config = apply_recipe(config, explicit)
        report_tune(run_tune(config, console), config)


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
    scores: Path = typer.Option(..., "--scores"),
    out: Path = typer.Option(..., "--out", help="mask file (.safetensors), tensors mask/<param> as uint8"),
    budget: str = typer.Option("5%", "--budget", help="fraction of all backbone parameters to select"),
    strategy: str = typer.Option("scores", "--strategy"),
    score_kind: str = typer.Option("drfim", "--score-kind"),
    candidates: str = typer.Option(",".join(CANDIDATE_GROUPS), "--candidates"),
    seed: int = typer.Option(0, "--seed"),
    overwrite: bool = typer.Option(False, "--overwrite"),
) -> None:
    """Write the selection for a budget as a safetensors mask, for use in other trainers."""
    from ..scores.select import write_mask

    with user_errors():
        selected, total = write_mask(scores, out, parse_fraction(budget, "--budget"), strategy, score_kind,
                                     parse_groups(candidates), seed, overwrite)
        stdout.print(f"{selected:,} of {total:,} backbone elements selected ({selected / max(total, 1):.2%})",
                     markup=False)
        print_paths(("mask", out))
