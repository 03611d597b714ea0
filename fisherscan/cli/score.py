"""``fisherscan score`` and ``fisherscan demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from ..recipes.config import ScoreConfig
from .app import app, console, print_paths, stdout, user_errors
from .options import config_options, given


def report_scores(result, out: Path) -> None:
    """Print the group table and save it as CSV beside the scores."""
    from ..scores.compare import reliability_table
    from ..scores.summary import group_summary, summary_table

    frame = group_summary(result.scores)
    csv_path = out.with_name(out.name.removesuffix(".safetensors") + ".groups.csv")
    frame.to_csv(csv_path, index=False)
    meta = result.metadata
    stdout.print(summary_table(frame, escape(f"{meta['model']}: {meta['images']} images, shift weight "
                                             f"{meta['shift']['weight']:.3f}")))
    if "reliability" in meta:
        stdout.print(reliability_table(meta["reliability"]))
    for note in result.notes:
        stdout.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    if result.timing:
        stdout.print(timing_line(result.timing), markup=False, highlight=False, soft_wrap=True)
    print_paths(("scores", out), ("head", result.head_path), ("table", csv_path))


def timing_line(timing: dict) -> str:
    """The scoring loop's speed and the share of it spent waiting for images (raise --workers when it is large)."""
    return (f"timing: {timing['images']} images in {timing['loop_seconds']:.2f} s ({timing['images_per_second']:.2f} "
            f"images/s); waiting for data {timing['data_wait_share']:.1%} of it "
            f"({timing['data_wait_seconds']:.2f} s, {timing['first_batch_wait_seconds']:.2f} s before the first batch)")


CONFIG_HELP = ("TOML or JSON file of options, keys = the option names with underscores (batch_size = 4); a run's "
               "manifest.json or a scores file repeats that run; options given here win")


@app.command()
@config_options(ScoreConfig, notes=dict.fromkeys(("model", "data"), "required, here or in --config"))
def score(
    ctx: typer.Context,
    config_file: Optional[Path] = typer.Option(None, "--config", help=CONFIG_HELP, rich_help_panel="Run control"),
    **options,
) -> None:
    """Per-parameter Fisher (Eq. 9) and DR-FIM (Eq. 7) scores of a ViT backbone -> safetensors."""
    from ..recipes.layers import score_config
    from ..recipes.score import run_score

    with user_errors():
        config = score_config(given(ctx, ScoreConfig, options), config_file).config
        result = run_score(config, console)
        if not result.main:  # torchrun: rank 0 reports
            return
        if not result.finished:
            for note in result.notes:
                stdout.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
            print_paths(("partial", result.partial_path))
            return
        report_scores(result, config.out)


@app.command()
def demo(
    out: Optional[Path] = typer.Option(None, "--out", show_default=False,
                                       help="folder for the generated data and outputs (default "
                                            "$XDG_CACHE_HOME/fisherscan/demo, i.e. ~/.cache/fisherscan/demo)"),
    images: int = typer.Option(32, "--images", help="source images to score"),
    seed: int = typer.Option(0, "--seed", help="seed of the scenes, the scoring and the tuning"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda"),
    tune_steps: int = typer.Option(30, "--tune-steps", help="fine-tuning steps per strategy (0: score only)"),
) -> None:
    """The built-in default job: procedural scenes in 5 domains; score a small ViT on the source, tune it from the
    DR-FIM scores and with a frozen backbone, evaluate both on every domain."""
    from ..bench.demo import run_demo, tune_and_evaluate
    from ..io import cache_folder
    from ..scores.plot import plot_scores

    out = out if out is not None else cache_folder("demo")
    with user_errors():
        result, scores_path = run_demo(out, images=images, seed=seed, device=device, console=console)
        report_scores(result, scores_path)
        figures = plot_scores(scores_path).paths  # the Fig. 6 heatmap (FIM, DR-FIM) and the other figures
        print_paths(*((label, figures[label]) for label in ("heatmap", "histogram", "blocks")))
        stdout.print(f"data:   {out / 'data'} (domains: source, fog, night, colour, blur)", markup=False,
                     highlight=False, soft_wrap=True)
        if tune_steps > 0:
            runs = tune_and_evaluate(out, scores_path, steps=tune_steps, seed=seed, device=device, console=console)
            stdout.print(comparison_table(runs, tune_steps))
            print_paths(*((f"run {name}", run.run_dir) for name, run in runs.items()))


def comparison_table(runs: dict, steps: int):
    """Strategy x domain mIoU (%) of the demo's runs, with the mean over the unseen domains."""
    from rich.table import Table

    table = Table(title=f"mIoU (%) on held-out scenes after {steps} steps")
    first = next(iter(runs.values())).evaluation
    domains = [d.name for d in first.datasets]
    table.add_column("strategy")
    table.add_column("tuned", justify="right")
    for domain in domains:
        table.add_column(domain, justify="right")
    table.add_column("unseen mean", justify="right")
    for name, run in runs.items():
        by_domain = run.evaluation.miou_by_dataset()
        unseen = [by_domain[d] for d in domains if d != "source"]
        table.add_row(name, f"{run.selected / run.total:.1%}", *(f"{100 * by_domain[d]:.1f}" for d in domains),
                      f"{100 * sum(unseen) / max(len(unseen), 1):.1f}")
    return table
