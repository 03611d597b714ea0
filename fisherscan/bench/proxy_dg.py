"""``fisherscan bench``: a domain-generalisation benchmark of the whole method that runs on a laptop CPU.

Does DR-FIM selection (Eq. 7) generalise better than FIM (Eq. 9), Delta F (Eq. 5) or a random selection at the
same budget? Real DGSS data and VFM weights are large downloads, so everything here is built on the spot from the
procedural scenes of ``fisherscan.data.synthetic`` (8 classes, 5 visual domains with the same layouts).

Protocol (fixed before any unseen-domain number was looked at; hyperparameters were set from run time and the
source-domain mIoU alone):

1. **Foundation model.** A small ViT (``MODEL``: width 64, depth 6, 4 heads, patch 8, LayerScale, 64x64 input,
   8x8 tokens; 218k parameters) is pretrained by the benchmark itself on scenes of ALL five domains (a pool of
   scenes drawn with ``PRETRAIN_SEED``, never used below), supervised on a COARSER label set (:data:`COARSE`:
   ground, structure, nature, sky, movable; road/sidewalk, building/pole and person/car are merged), with a
   throw-away linear head. So its features are domain-robust for what pretraining asked, and the downstream task
   (the 8 fine classes) must tune them: fine-tuning on one domain can keep or destroy that robustness, as with a
   real VFM that has seen night and fog photos but never these labels. Pretraining is deterministic in its
   :class:`PretrainConfig` and cached as ``<cache>/<hash of the config>.safetensors`` (atomic write); its time
   is reported separately.
2. **Data per seed.** Source (train): ``source_images`` scenes of the ``source`` domain drawn with seed
   ``SOURCE_SEED + seed``. Evaluation: ``val_images`` held-out scenes (seed ``VAL_SEED``, the same for every
   seed and strategy) rendered in every domain: ``source`` (seen) and fog, night, colour, blur (unseen).
3. **Score** (Algorithm 1 steps 1-2, ``fisherscan.recipes.score.run_score``): warm up a linear decoder with the backbone
   frozen (``warmup_steps``), then the diagonal estimator on ``score_images`` source images (F(x), F(x') with
   Eq. 6 at block 0, sampled labels, the normalisation of ``docs/method.md``), and the variational estimator (Eq. 10-15,
   its defaults: ``var_steps`` steps per precision) from the same warmed head.
4. **Tune** (Algorithm 1 step 3, ``fisherscan.recipes.tune.run_tune``) from that head on the source data only, every
   strategy with the same steps, batch, learning rate and data order: ``full`` (all backbone parameters),
   ``freeze`` (decoder only), and at the paper's budget (selected fraction of all backbone parameters growing
   from 1% to 5%, Eq. 16) ``random``, ``fim``, ``delta``, ``drfim`` (diagonal scores) and ``drfim-var`` (DR-FIM
   from the variational scores).
5. **Evaluate** every tuned model on the held-out scenes of every domain: one confusion matrix per domain, mIoU
   over the classes present (``fisherscan.eval.evaluate``), whole-image inference.
6. **Seeds** 0, 1, 2: each changes the source scenes, the decoder's initialisation, the label and shift draws,
   the random selection and the data order; the pretrained model and the evaluation scenes are shared. Reported:
   the mean and the sample standard deviation (ddof 1) over seeds of each domain's mIoU and of the mean over the
   four unseen domains, and per-seed paired differences of the unseen mean (DR-FIM minus FIM / random).

``--quick`` runs the same steps at a smaller scale (one seed, a shorter pretraining, fewer steps and images) in
about a minute for CI; its numbers show the pipeline works, not how the strategies rank.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import platform
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from rich import box
from rich.console import Console
from rich.markup import escape
from rich.table import Table

from .. import __version__
from ..data.synthetic import DOMAINS, write_dataset
from ..errors import FisherscanError
from ..fisher.variational import DEFAULT_STEPS
from ..io import atomic_target
from ..recipes.config import ScoreConfig, TuneConfig
from ..recipes.score import run_score
from ..recipes.tune import run_tune
from ..runtime import progress_bar, resolve_device
from .pretrain import PretrainConfig, Pretrained, pretrained_weights

#: Scene seeds of the three scene sets (the generator keys every scene on (seed, index)): disjoint sets.
SOURCE_SEED, VAL_SEED = 100, 999  # (pretraining's: pretrain.PRETRAIN_SEED)

SEEN = "source"
UNSEEN = tuple(d for d in DOMAINS if d != SEEN)
#: Strategies in table order; ``drfim-var`` is ``drfim`` ranked by the variational estimator's scores.
STRATEGIES = ("full", "freeze", "random", "fim", "delta", "drfim", "drfim-var")
TUNED = tuple(s for s in STRATEGIES if s != "freeze")


@dataclass(frozen=True)
class BenchConfig:
    """Every setting of one benchmark run (see the module docstring for what each step does)."""

    out: Path
    work: Path | None = None  # data, scores and run folders; default <out>/work
    quick: bool = False
    seeds: tuple[int, ...] = (0, 1, 2)
    strategies: tuple[str, ...] = STRATEGIES
    pretrain: PretrainConfig = PretrainConfig()
    cache: Path | None = None
    source_images: int = 128
    score_images: int = 32
    val_images: int = 32
    warmup_steps: int = 200
    warmup_lr: float = 3e-3
    var_steps: int = DEFAULT_STEPS  # the estimator's one default (60 before the VOGN curvature)
    tune_steps: int = 160
    batch_size: int = 8
    lr: float = 1e-3
    delta_min: float = 0.01
    delta_max: float = 0.05
    device: str = "cpu"

    @property
    def work_dir(self) -> Path:
        return Path(self.work) if self.work is not None else Path(self.out) / "work"


QUICK_PRETRAIN = PretrainConfig(scenes=64, steps=100, batch_size=16)


def benchmark_config(out: Path, *, quick: bool = False, seeds: int | None = None, cache: Path | None = None,
                     work: Path | None = None, device: str = "cpu") -> BenchConfig:
    """The full benchmark's settings, or ``--quick``'s (one seed, shorter pretraining, fewer steps and images)."""
    if seeds is not None and seeds < 1:
        raise FisherscanError(f"--seeds {seeds}: must be at least 1")
    if quick:
        config = BenchConfig(out=Path(out), work=work, quick=True, seeds=(0,), pretrain=QUICK_PRETRAIN, cache=cache,
                             source_images=32, score_images=16, val_images=8, warmup_steps=60, var_steps=6,
                             tune_steps=30, device=device)
    else:
        config = BenchConfig(out=Path(out), work=work, cache=cache, device=device)
    if seeds is not None:
        config = dataclasses.replace(config, seeds=tuple(range(seeds)))
    return config


# ---------------------------------------------------------------------------------------------------------
# The benchmark


@dataclass
class BenchResult:
    config: BenchConfig
    pretrained: Pretrained
    rows: list[dict]  # one per (seed, strategy, domain): mIoU in percent
    summary: dict  # strategy -> {domain: {"mean", "std"}, "unseen": {...}, "tuned_fraction": ...}
    paired: dict  # "drfim - fim" etc. -> per-seed differences of the unseen mean, their mean and std
    seconds: float  # the benchmark without pretraining (wall clock)
    cpu_seconds: float  # ... CPU time of this process (all threads)
    stage_seconds: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)


def check_config(config: BenchConfig) -> None:
    unknown = [s for s in config.strategies if s not in STRATEGIES]
    if unknown:
        raise FisherscanError(f"unknown strategy {', '.join(unknown)}: use some of {', '.join(STRATEGIES)}")
    if not config.seeds:
        raise FisherscanError("the benchmark needs at least one seed")
    resolve_device(config.device)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise FisherscanError(f"--out {out} is a file; pass a folder for the benchmark's results")


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of ``values``."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": int(array.size)}


def summarise(rows: list[dict], strategies: tuple[str, ...], seeds: tuple[int, ...]) -> tuple[dict, dict]:
    """Per strategy: mean/std over seeds of each domain's mIoU and of the per-seed mean over the unseen domains;
    per pair of strategies: the per-seed paired differences of that unseen mean."""
    value = {(r["seed"], r["strategy"], r["domain"]): r["miou"] for r in rows}
    unseen = {(seed, s): float(np.mean([value[seed, s, d] for d in UNSEEN])) for seed in seeds for s in strategies}
    summary = {}
    for s in strategies:
        entry = {d: mean_std([value[seed, s, d] for seed in seeds]) for d in DOMAINS}
        entry["unseen"] = mean_std([unseen[seed, s] for seed in seeds])
        entry["unseen_per_seed"] = [unseen[seed, s] for seed in seeds]
        summary[s] = entry
    paired = {}
    for a, b in (("drfim", "fim"), ("drfim", "random"), ("drfim", "delta"), ("drfim", "freeze"), ("drfim", "full"),
                 ("drfim-var", "drfim")):
        if a in strategies and b in strategies:
            diffs = [unseen[seed, a] - unseen[seed, b] for seed in seeds]
            paired[f"{a} - {b}"] = {**mean_std(diffs), "per_seed": diffs,
                                    "wins": int(sum(d > 0 for d in diffs))}
    return summary, paired


def run_benchmark(config: BenchConfig, console: Console | None = None) -> BenchResult:
    """Pretrain (or load) the foundation model, then score, tune and evaluate every strategy for every seed;
    write ``proxy_dg.json``, ``proxy_dg.csv`` (one row per seed, strategy and domain), ``proxy_dg.summary.csv``
    and ``proxy_dg.png`` into ``config.out`` (atomically)."""
    check_config(config)
    out, work = Path(config.out), config.work_dir
    out.mkdir(parents=True, exist_ok=True)
    work.mkdir(parents=True, exist_ok=True)
    pretrained = pretrained_weights(config.pretrain, config.cache, console)
    start, start_cpu = time.perf_counter(), time.process_time()
    size = (config.pretrain.size, config.pretrain.size)
    val = write_dataset(work / "data" / "val", domains=DOMAINS, images_per_domain=config.val_images, size=size,
                        seed=VAL_SEED)
    stage_seconds: dict[str, tuple[float, float]] = {}  # stage -> (wall, CPU time of this process)
    rows, selected = [], {}
    need_var = "drfim-var" in config.strategies
    jobs = len(config.seeds) * (1 + need_var + len(config.strategies))
    with progress_bar(console) as progress:
        task = progress.add_task("proxy-DG benchmark", total=jobs, rate="")
        for seed in config.seeds:
            here = work / f"seed{seed}"
            here.mkdir(parents=True, exist_ok=True)
            source = write_dataset(work / "data" / f"source_seed{seed}", domains=(SEEN,),
                                   images_per_domain=config.source_images, size=size, seed=SOURCE_SEED + seed)[SEEN]
            common = dict(model=config.pretrain.model, weights=pretrained.path, data=source, layout="generic",
                          crop=config.pretrain.size, batch_size=config.batch_size, seed=seed, device=config.device,
                          workers=0)

            def timed(stage, fn):
                progress.update(task, rate=f"seed {seed}: {stage}")
                t0, c0 = time.perf_counter(), time.process_time()
                value = fn()
                wall, cpu = stage_seconds.get(stage, (0.0, 0.0))
                stage_seconds[stage] = (wall + time.perf_counter() - t0, cpu + time.process_time() - c0)
                progress.update(task, advance=1)
                return value

            diagonal = here / "scores.safetensors"
            timed("score diagonal", lambda: run_score(ScoreConfig(
                **common, out=diagonal, images=config.score_images, warmup_steps=config.warmup_steps,
                warmup_lr=config.warmup_lr, overwrite=True)))
            variational = here / "scores_var.safetensors"
            if need_var:
                timed("score variational", lambda: run_score(ScoreConfig(
                    **common, out=variational, images=config.score_images, estimator="variational",
                    var_steps=config.var_steps, head=here / "scores.head.safetensors", overwrite=True)))
            for strategy in config.strategies:
                run = timed(f"tune {strategy}", lambda: run_tune(TuneConfig(
                    **common, scores=variational if strategy == "drfim-var" else diagonal, out=here / f"run_{strategy}",
                    strategy="drfim" if strategy == "drfim-var" else strategy, steps=config.tune_steps, lr=config.lr,
                    delta_min=config.delta_min, delta_max=config.delta_max, save_every=config.tune_steps,
                    eval=tuple(val[d] for d in DOMAINS), eval_layout="generic", eval_crop=config.pretrain.size,
                    eval_stride=config.pretrain.size, overwrite=True)))
                by_domain = run.evaluation.miou_by_dataset()
                selected[strategy] = run.selected / run.total
                for domain in DOMAINS:
                    rows.append({"seed": seed, "strategy": strategy, "domain": domain,
                                 "miou": 100.0 * by_domain[domain]})
    seconds, cpu_seconds = time.perf_counter() - start, time.process_time() - start_cpu
    summary, paired = summarise(rows, tuple(config.strategies), tuple(config.seeds))
    for strategy, fraction in selected.items():
        summary[strategy]["tuned_fraction"] = fraction
    result = BenchResult(config, pretrained, rows, summary, paired, seconds, cpu_seconds,
                         {stage: {"wall": w, "cpu": c} for stage, (w, c) in stage_seconds.items()})
    result.paths = write_results(result)
    return result


# ---------------------------------------------------------------------------------------------------------
# Output


def result_dict(result: BenchResult) -> dict:
    config = result.config
    return {
        "fisherscan_version": __version__, "torch": torch.__version__,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "device": config.device},
        "protocol": (__doc__ or "").split("Protocol", 1)[-1].strip(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()
                   if k not in ("out", "work", "cache")},
        "model": config.pretrain.model,
        "pretraining": {"cached": result.pretrained.cached, "seconds": result.pretrained.seconds,
                        "file": result.pretrained.path.name, **{k: v for k, v in result.pretrained.info.items()
                                                                 if k not in ("config",)}},
        "benchmark_seconds": result.seconds, "benchmark_cpu_seconds": result.cpu_seconds,
        "stage_seconds": result.stage_seconds,
        "domains": {"seen": SEEN, "unseen": list(UNSEEN)},
        "summary": result.summary, "paired_unseen_differences": result.paired,
        "rows": result.rows,
    }


def write_results(result: BenchResult) -> dict[str, Path]:
    out = Path(result.config.out)
    paths = {"json": out / "proxy_dg.json", "csv": out / "proxy_dg.csv", "summary": out / "proxy_dg.summary.csv",
             "plot": out / "proxy_dg.png"}
    with atomic_target(paths["json"]) as tmp:
        tmp.write_text(json.dumps(result_dict(result), indent=1))
    with atomic_target(paths["csv"]) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["seed", "strategy", "domain", "miou"])
            writer.writeheader()
            writer.writerows({**r, "miou": f"{r['miou']:.4f}"} for r in result.rows)
    with atomic_target(paths["summary"]) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["strategy", "tuned_fraction", "column", "mean", "std", "n"])
            for strategy, entry in result.summary.items():
                for column in (*DOMAINS, "unseen"):
                    cell = entry[column]
                    writer.writerow([strategy, f"{entry.get('tuned_fraction', float('nan')):.4f}", column,
                                     f"{cell['mean']:.4f}", f"{cell['std']:.4f}", cell["n"]])
    plot_results(result, paths["plot"])
    return paths


def plot_results(result: BenchResult, path: Path) -> None:
    """Grouped bars: one group per domain (and the unseen mean), one bar per strategy, seed std as error bars."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = (*DOMAINS, "unseen")
    strategies = list(result.summary)
    width = 0.8 / max(len(strategies), 1)
    fig, ax = plt.subplots(figsize=(10, 4))
    for i, strategy in enumerate(strategies):
        means = [result.summary[strategy][c]["mean"] for c in columns]
        stds = [result.summary[strategy][c]["std"] for c in columns]
        xs = np.arange(len(columns)) + (i - (len(strategies) - 1) / 2) * width
        ax.bar(xs, means, width, yerr=stds, capsize=2, label=strategy)
    ax.set_xticks(np.arange(len(columns)), [c if c != "unseen" else "unseen mean" for c in columns])
    ax.set_ylabel("mIoU (%)")
    seeds = len(result.config.seeds)
    ax.set_title(f"proxy DG benchmark: tuned on '{SEEN}' only, {seeds} seed{'s' if seeds > 1 else ''} "
                 f"(mean, error bar = std)" + (" -- quick" if result.config.quick else ""))
    ax.legend(ncol=len(strategies), fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.1))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=120)
    plt.close(fig)
    with atomic_target(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def results_table(result: BenchResult) -> Table:
    """Strategy x domain mIoU (%), mean +- std over seeds, and the unseen domains' mean."""
    seeds = len(result.config.seeds)
    table = Table(title=f"mIoU (%) on held-out scenes, tuned on '{SEEN}' only: mean±std over {seeds} seed"
                        f"{'s' if seeds > 1 else ''}" + (" (--quick)" if result.config.quick else ""),
                  box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True)
    table.caption = f"unseen: the mean over {', '.join(UNSEEN)}; tuned: backbone elements updated at the end"
    table.add_column("strategy", no_wrap=True, min_width=max(len(s) for s in result.summary))
    table.add_column("tuned", justify="right")
    for column in (*DOMAINS, "unseen"):
        table.add_column(column, justify="right")
    for strategy, entry in result.summary.items():
        cells = [f"{entry[c]['mean']:.1f}±{entry[c]['std']:.1f}" for c in (*DOMAINS, "unseen")]
        table.add_row(escape(strategy), f"{100 * entry.get('tuned_fraction', float('nan')):.0f}%", *cells)
    return table


def verdict(result: BenchResult) -> list[str]:
    """Plain sentences: does DR-FIM beat FIM and random on the unseen domains, by how much vs the seed spread."""
    lines = []
    for other in ("fim", "random"):
        key = f"drfim - {other}"
        if key not in result.paired:
            continue
        diff = result.paired[key]
        spread = max(result.summary["drfim"]["unseen"]["std"], result.summary[other]["unseen"]["std"])
        word = "beats" if diff["mean"] > 0 else "does not beat"
        lines.append(f"DR-FIM {word} {other.upper() if other == 'fim' else other} on the unseen domains: "
                     f"{diff['mean']:+.2f} mIoU points (paired over seeds: std {diff['std']:.2f}, DR-FIM ahead in "
                     f"{diff['wins']} of {diff['n']} seeds); seed std of the unseen means up to {spread:.2f}")
    return lines
