"""``fisherscan score`` and ``fisherscan demo``."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .app import app, console, parse_blocks, print_paths, stdout, user_errors


def report_scores(result, out: Path) -> None:
    """Print the group table and save it as CSV beside the scores."""
    from ..scores.summary import group_summary, summary_table

    frame = group_summary(result.scores)
    csv_path = out.with_name(out.name.removesuffix(".safetensors") + ".groups.csv")
    frame.to_csv(csv_path, index=False)
    meta = result.metadata
    stdout.print(summary_table(frame, escape(f"{meta['model']}: {meta['images']} images, shift weight "
                                             f"{meta['shift']['weight']:.3f}")))
    for note in result.notes:
        stdout.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
    print_paths(("scores", out), ("head", result.head_path), ("table", csv_path))


VARIATIONAL_HELP = {  # the same texts as the ScoreConfig fields' (tests/recipes/test_config.py)
    "tau": "variational: prior std tau around the pretrained weights (Eq. 10); default: picked by a pilot of 4 "
           "probes, tau^-2 = 0.1 * s * (mean curvature) / gamma",
    "var_steps": "variational: natural-gradient steps T2 per precision (the pilot's come on top)",
    "var_curvature": "variational: vogn (per-image squared gradients at perturbed weights: a diagonal Fisher at "
                     "perturbed weights, one pass per step) or reparam (the antithetic reparameterized Hessian of "
                     "Eq. 12, two passes per step)",
    "var_control": "variational, reparam: subtract the control variate (xi^2 - 1) * D from each step's curvature "
                   "(zero mean, removes the xi^2 noise)",
    "var_scale": "variational: likelihood scale s (default: picked by the pilot so that the posterior stays narrow, "
                 "at least the number of images; with --tau, the number of images)",
    "var_tolerance": "variational: converged when the data part D = Lambda - tau^-2 moved less than this "
                     "(sum |D_T - D_T/2| / sum |D_T|) over the second half of the steps",
    "var_legacy": "the variational estimator before the data part was kept apart (Lambda stored with its prior, "
                  "10%-window test, reparam without control variate): reproduces old score files",
    "eq15": "variational DR-FIM: printed (Eq. 15's pseudocount gamma tau^-2 / s in Delta F's denominator, gamma "
            "times the domain term) or substituted (Eq. 14 into Eq. 5/7)",
}


@app.command()
def score(
    model: str = typer.Option(..., "--model", help="a short name (see fisherscan models), or timm:<name>; "
                                                    "?key=value&... passes create_model arguments"),
    data: Path = typer.Option(..., "--data", help="folder of labelled source images"),
    out: Path = typer.Option(Path("scores.safetensors"), "--out", help="scores file to write"),
    weights: Optional[Path] = typer.Option(None, "--weights", help="checkpoint (.pth official or .safetensors)"),
    random_init: bool = typer.Option(False, "--random-init", help="allow an untrained backbone"),
    strict: bool = typer.Option(True, "--strict/--no-strict",
                                help="checkpoint keys missing or unexpected after conversion are an error"),
    layout: str = typer.Option("auto", "--layout", help="auto|gta5|cityscapes|bdd100k|mapillary|acdc|generic"),
    split: str = typer.Option("train", "--split", help="dataset split where the layout has splits"),
    images: Optional[int] = typer.Option(None, "--images", help="score a seeded random subset of N images"),
    batch_size: int = typer.Option(8, "--batch-size", help="images per batch (Eq. 6's batch spread); under "
                                                          "torchrun the global batch, split across the ranks"),
    crop: int = typer.Option(512, "--crop", help="square crop; padded to a multiple of the patch size"),
    decoder: str = typer.Option("linear", "--decoder", help="linear, multilevel or mask2former[?option=value&...]"),
    feature_blocks: Optional[str] = typer.Option(None, "--feature-blocks",
                                                 help="multilevel/mask2former: 4 block indices (default: Rein's "
                                                      "7,11,15,23 at depth 24, else evenly spaced)"),
    head: Optional[Path] = typer.Option(None, "--head", help="load a warmed-up head instead of warming up"),
    warmup_steps: int = typer.Option(200, "--warmup-steps", help="decoder warm-up steps (Algorithm 1, step 1)"),
    warmup_lr: float = typer.Option(1e-3, "--warmup-lr"),
    labels: str = typer.Option("sampled", "--labels", help="sampled (true Fisher) or given (empirical)"),
    estimator: str = typer.Option("diagonal", "--estimator", help="diagonal (exact Eq. 9) or variational (Eq. 10-15)"),
    gamma: float = typer.Option(1.0, "--gamma", help="variational: KL weight (Eq. 11)"),
    tau: Optional[float] = typer.Option(None, "--tau", help=VARIATIONAL_HELP["tau"]),
    var_steps: int = typer.Option(200, "--var-steps", help=VARIATIONAL_HELP["var_steps"]),
    var_curvature: str = typer.Option("vogn", "--var-curvature", help=VARIATIONAL_HELP["var_curvature"]),
    var_control: bool = typer.Option(True, "--var-control/--no-var-control", help=VARIATIONAL_HELP["var_control"]),
    var_lr: float = typer.Option(0.0, "--var-lr", help="variational: step size (0: running average)"),
    var_scale: Optional[float] = typer.Option(None, "--var-scale", help=VARIATIONAL_HELP["var_scale"]),
    var_tolerance: float = typer.Option(0.05, "--var-tolerance", help=VARIATIONAL_HELP["var_tolerance"]),
    var_legacy: bool = typer.Option(False, "--var-legacy", hidden=True, help=VARIATIONAL_HELP["var_legacy"]),
    eq15: str = typer.Option("printed", "--eq15", help=VARIATIONAL_HELP["eq15"]),
    perturb_at: int = typer.Option(0, "--perturb-at", help="block whose input tokens get Eq. 6"),
    normalize: bool = typer.Option(True, "--normalize/--literal",
                                   help="docs/method.md normalisation or the literal Eq. 7"),
    delta_eps: Optional[float] = typer.Option(None, "--delta-eps",
                                              help="Eq. 5 eps (default 1e-3 normalised, 1e-8 literal)"),
    shift_weight: Optional[float] = typer.Option(None, "--shift-weight", help="fixed weight of the domain term"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device", help="auto|cpu|cuda"),
    workers: int = typer.Option(2, "--workers", help="DataLoader worker processes"),
    chunk_size: int = typer.Option(8, "--chunk-size",
                                   help="images per chunk of per-image gradient work (bounds memory)"),
    overwrite: bool = typer.Option(False, "--overwrite", help="replace an existing --out (and discard a partial file)"),
    save_every: int = typer.Option(50, "--save-every",
                                   help="save the resumable state every N batches (variational: steps)"),
    resume: bool = typer.Option(False, "--resume", help="continue from <out stem>.partial.safetensors"),
    stop_after: Optional[int] = typer.Option(None, "--stop-after",
                                             help="stop resumably after N batches of this run (no scores file yet)"),
    max_bad_frac: float = typer.Option(0.1, "--max-bad-frac",
                                       help="stop with an error when more than this fraction of batches has "
                                            "non-finite losses or gradients (such batches are skipped)"),
    skip_bad: bool = typer.Option(False, "--skip-bad", help="skip unreadable or invalid image/label pairs "
                                                            "(checked before the run, listed in the metadata) "
                                                            "instead of stopping"),
) -> None:
    """Per-parameter Fisher (Eq. 9) and DR-FIM (Eq. 7) scores of a ViT backbone -> safetensors."""
    options = dict(locals())  # every parameter is a ScoreConfig field of the same name
    from ..recipes.config import ScoreConfig
    from ..recipes.score import run_score

    with user_errors():
        config = ScoreConfig(**{**options, "feature_blocks": parse_blocks(feature_blocks)})
        result = run_score(config, console)
        if not result.main:  # torchrun: rank 0 reports
            return
        if not result.finished:
            for note in result.notes:
                stdout.print(f"[yellow]note:[/] {escape(note)}", highlight=False)
            print_paths(("partial", result.partial_path))
            return
        report_scores(result, out)


@app.command()
def demo(
    out: Path = typer.Option(Path("fisherscan-demo"), "--out", help="folder for the generated data and outputs"),
    images: int = typer.Option(32, "--images", help="source images to score"),
    seed: int = typer.Option(0, "--seed"),
    device: str = typer.Option("auto", "--device"),
    tune_steps: int = typer.Option(30, "--tune-steps", help="fine-tuning steps per strategy (0: score only)"),
) -> None:
    """The built-in default job: procedural scenes in 5 domains; score a small ViT on the source, tune it from the
    DR-FIM scores and with a frozen backbone, evaluate both on every domain."""
    from ..bench.demo import run_demo, tune_and_evaluate
    from ..scores.plot import plot_scores

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
