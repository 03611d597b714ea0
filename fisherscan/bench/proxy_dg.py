"""``fisherscan bench``: a domain-generalisation benchmark of the whole method that runs on a laptop CPU (version 2).

Does DR-FIM selection (Eq. 7) generalise better than FIM (Eq. 9), Delta F (Eq. 5) or a random selection at the
same budget? Real DGSS data and VFM weights are large downloads, so everything here is built on the spot from the
procedural scenes of ``fisherscan.data.synthetic`` (8 classes, several visual styles with the same layouts). The
protocol's constants and the roles of the styles are in ``fisherscan.bench.protocol``; the steps:

1. **Foundation model** (``pretrain``): a small ViT (width 64, depth 6, patch 4 at 64 px: 16x16 tokens)
   pretrained on a coarse label set in the pretraining styles (clean, fog, colour, blur), cached by its config's
   hash.
2. **Data**: per seed, labelled source scenes in ``toon`` (and the same scenes in ``rain``, for the ``oracle-*``
   strategies);
   shared validation scenes in ``toon`` and ``rain``; shared test scenes in the seen and novel test styles.
3. **Score** (Algorithm 1 steps 1-2, ``fisherscan.recipes.score.run_score``) on the source scenes: the decoder warmed
   up on the frozen backbone, the diagonal estimator (F(x), F(x') by score's defaults), the variational one
   (``drfim-var``) and, for ``oracle-delta`` and ``oracle-drfim``, F(x') from the same scenes rendered in ``rain``
   (paired ``--shift-data``).
4. **Tune** (Algorithm 1 step 3, ``fisherscan.recipes.tune.run_tune``) every strategy from that head on the source
   data only, with the same steps, batch and data order: backbone lr 1e-4, decoder lr 1e-3, poly decay; the
   selected fraction of all backbone parameters grows from budget / 5 to the budget (Eq. 16).
5. **Validate first**: every run is evaluated on the validation columns (source-style validation scenes, ``rain``);
   the sanity check ``full - freeze`` on the source validation scenes must reach ``sanity_min`` mIoU points, else
   the benchmark stops before any test style is evaluated (the task would not need tuning).
6. **Test**: every run on the test styles; per seed the mean over each group (``seen``, ``novel``); over seeds
   mean and sample std; paired per-seed differences (``protocol.PAIRS``). Output: ``report``.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from rich.console import Console

from ..data.synthetic import write_dataset
from ..errors import FisherscanError
from ..eval.evaluate import EvalDataset, evaluate_datasets, prepare_datasets
from ..eval.runs import load_run
from ..recipes.config import ScoreConfig, TuneConfig
from ..recipes.score import run_score
from ..recipes.score_record import rebalance
from ..recipes.tune import run_tune
from ..runtime import progress_bar, resolve_device
from ..scores.file import load_scores, save_scores
from .pretrain import Pretrained, pretrained_weights
from .protocol import (
    GROUPS,
    RENDERED_AS,
    SOURCE_SEED,
    SOURCE_STYLE,
    SOURCE_VAL,
    TEST_SEED,
    VAL_SEED,
    VALIDATION_STYLE,
    BenchConfig,
)
from .report import finish

#: How each benchmark strategy is tuned: (tune --strategy, the scores file it ranks by).
TUNE_AS = {"drfim-var": ("drfim", "variational"), "oracle-delta": ("delta", "oracle"),
           "oracle-drfim": ("drfim", "oracle"), "anti-drfim": ("drfim", "anti")}
ORACLE = ("oracle-delta", "oracle-drfim")  # the strategies that rank by the real-shift scores


def uses_oracle(config: BenchConfig) -> bool:
    """Whether a strategy of the run ranks by the real-shift (paired rain) scores."""
    return any(strategy in ORACLE for strategy in config.strategies)


@dataclass
class BenchResult:
    config: BenchConfig
    pretrained: Pretrained
    rows: list[dict]  # one per (seed, strategy, column): mIoU in percent
    sanity: dict
    summary: dict = field(default_factory=dict)  # strategy -> column or group -> mean/std/n
    paired: dict = field(default_factory=dict)  # "<a>_vs_<b>" -> group -> per-seed differences, mean, std
    seconds: float = 0.0  # the benchmark without pretraining (wall clock)
    cpu_seconds: float = 0.0  # ... CPU time of this process (all threads)
    stage_seconds: dict = field(default_factory=dict)
    tuned_fraction: dict = field(default_factory=dict)
    paths: dict = field(default_factory=dict)


def check_config(config: BenchConfig) -> None:
    if not config.seeds:
        raise FisherscanError("the benchmark needs at least one seed")
    resolve_device(config.device)
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise FisherscanError(f"--out {out} is a file; pass a folder for the benchmark's results")


class Stages:
    """Wall and CPU seconds per stage (summed over seeds), and the progress bar's task."""

    def __init__(self, progress, total: int):
        self.progress, self.seconds = progress, {}
        self.task = progress.add_task("proxy-DG benchmark v2", total=total, rate="")

    def run(self, stage: str, label: str, fn):
        self.progress.update(self.task, rate=label)
        t0, c0 = time.perf_counter(), time.process_time()
        value = fn()
        wall, cpu = self.seconds.get(stage, (0.0, 0.0))
        self.seconds[stage] = (wall + time.perf_counter() - t0, cpu + time.process_time() - c0)
        self.progress.update(self.task, advance=1)
        return value


def write_data(config: BenchConfig) -> dict:
    """The scene folders: ``columns`` (evaluation column -> folder) and ``source`` (seed -> style -> folder)."""
    data, size = config.work_dir / "data", (config.pretrain.size, config.pretrain.size)
    val = write_dataset(data / "val", domains=(SOURCE_STYLE, VALIDATION_STYLE), images_per_domain=config.val_images,
                        size=size, seed=VAL_SEED)
    rendered = {column: RENDERED_AS.get(column, column) for column in config.styles}
    test = write_dataset(data / "test", domains=tuple(rendered.values()), images_per_domain=config.test_images,
                         size=size, seed=TEST_SEED)
    test = {column: test[style] for column, style in rendered.items()}
    shifted = (VALIDATION_STYLE,) if uses_oracle(config) else ()
    source = {seed: write_dataset(data / f"source_seed{seed}", domains=(SOURCE_STYLE, *shifted),
                                  images_per_domain=config.source_images, size=size, seed=SOURCE_SEED + seed)
              for seed in config.seeds}
    columns = {SOURCE_VAL: val[SOURCE_STYLE], VALIDATION_STYLE: val[VALIDATION_STYLE], **test}
    return {"columns": columns, "source": source}


def common_options(config: BenchConfig, pretrained: Pretrained, seed: int, data: Path) -> dict:
    return dict(model=config.pretrain.model, weights=pretrained.path, data=data, layout="generic",
                crop=config.pretrain.size, batch_size=config.batch_size, seed=seed, device=config.device, workers=0,
                decoder=config.decoder)


def score_seed(config: BenchConfig, pretrained: Pretrained, seed: int, source: dict, stages: Stages) -> dict:
    """Algorithm 1 steps 1-2 on this seed's source scenes: the scores files by estimator."""
    here = config.work_dir / f"seed{seed}"
    here.mkdir(parents=True, exist_ok=True)
    common = common_options(config, pretrained, seed, source[SOURCE_STYLE])
    files = {"diagonal": here / "scores.safetensors"}
    head = here / "scores.head.safetensors"
    stages.run("score diagonal", f"seed {seed}: score", lambda: run_score(ScoreConfig(
        **common, out=files["diagonal"], images=config.score_images, warmup_steps=config.warmup_steps,
        warmup_lr=config.warmup_lr, overwrite=True)))
    if "drfim-var" in config.strategies:
        files["variational"] = here / "scores_var.safetensors"
        stages.run("score variational", f"seed {seed}: variational", lambda: run_score(ScoreConfig(
            **common, out=files["variational"], images=config.score_images, estimator="variational",
            var_steps=config.var_steps, head=head, overwrite=True)))
    if "anti-drfim" in config.strategies:  # the diagonal scores with lambda = -1 (no extra pass)
        files["anti"] = here / "scores_anti.safetensors"
        save_scores(files["anti"], *rebalance(*load_scores(files["diagonal"]), -1.0, "rank"))
    if uses_oracle(config):  # F(x') from the same scenes rendered in rain (paired --shift-data)
        files["oracle"] = here / "scores_oracle.safetensors"
        stages.run("score oracle", f"seed {seed}: oracle", lambda: run_score(ScoreConfig(
            **common, out=files["oracle"], images=config.score_images, shift_data=source[VALIDATION_STYLE],
            head=head, overwrite=True)))
    return files


def tune_one(config: BenchConfig, pretrained: Pretrained, seed: int, strategy: str, source: dict, scores: dict):
    """Algorithm 1 step 3 for one strategy: the run folder and the tuned fraction."""
    tune_as, estimator = TUNE_AS.get(strategy, (strategy, "diagonal"))
    out = config.work_dir / f"seed{seed}" / f"run_{strategy}"
    result = run_tune(TuneConfig(
        **common_options(config, pretrained, seed, source[SOURCE_STYLE]), scores=scores[estimator], out=out,
        strategy=tune_as, steps=config.tune_steps, lr=config.lr, decoder_lr=config.decoder_lr,
        delta_min=config.delta_min, delta_max=config.budget, save_every=config.tune_steps, overwrite=True))
    return out, result.selected / result.total


def evaluate(config: BenchConfig, run_dir: Path, datasets: dict[str, EvalDataset]) -> dict[str, float]:
    """mIoU (percent) of the tuned model on each column's scenes: whole-image inference, one confusion matrix per
    column over the classes present (``fisherscan.eval``)."""
    segmenter, _ = load_run(run_dir, device=config.device)
    result = evaluate_datasets(segmenter, list(datasets.values()), crop=config.pretrain.size,
                               stride=config.pretrain.size, device=config.device)
    return {column: 100.0 * part.miou for column, part in zip(datasets, result.datasets)}


def sanity_check(config: BenchConfig, rows: list[dict]) -> dict:
    """full - freeze on the source validation scenes, per seed and their mean (mIoU points)."""
    value = {(r["seed"], r["strategy"]): r["miou"] for r in rows if r["column"] == SOURCE_VAL}
    per_seed = [value[seed, "full"] - value[seed, "freeze"] for seed in config.seeds]
    mean = float(np.mean(per_seed))
    passed = config.sanity_min is None or mean >= config.sanity_min
    return {"full_minus_freeze_source_val": mean, "per_seed": per_seed, "min": config.sanity_min,
            "enforced": config.sanity_min is not None, "passed": bool(passed)}


def run_benchmark(config: BenchConfig, console: Console | None = None) -> BenchResult:
    """Pretrain (or load) the foundation model; per seed score and tune every strategy and evaluate it on the
    validation columns; the sanity check; then every run on the test styles. Writes ``report``'s files into
    ``config.out`` (also when the sanity check fails, without test columns, before the one-line error)."""
    check_config(config)
    Path(config.out).mkdir(parents=True, exist_ok=True)
    config.work_dir.mkdir(parents=True, exist_ok=True)
    pretrained = pretrained_weights(config.pretrain, config.cache, console)
    start, start_cpu = time.perf_counter(), time.process_time()
    data = write_data(config)
    validation = prepare_datasets([data["columns"][c] for c in (SOURCE_VAL, VALIDATION_STYLE)], "generic")
    test = prepare_datasets([data["columns"][s] for s in config.styles], "generic")
    runs, rows, fractions = {}, [], {}
    score_jobs = 1 + ("drfim-var" in config.strategies) + uses_oracle(config)
    jobs = len(config.seeds) * (score_jobs + 3 * len(config.strategies))  # tune, validate, test
    with progress_bar(console) as progress:
        stages = Stages(progress, jobs)
        for seed in config.seeds:
            scores = score_seed(config, pretrained, seed, data["source"][seed], stages)
            for strategy in config.strategies:
                runs[seed, strategy], fractions[strategy] = stages.run(
                    f"tune {strategy}", f"seed {seed}: tune {strategy}",
                    lambda: tune_one(config, pretrained, seed, strategy, data["source"][seed], scores))
                found = stages.run("evaluate validation", f"seed {seed}: validate {strategy}", lambda: evaluate(
                    config, runs[seed, strategy], dict(zip((SOURCE_VAL, VALIDATION_STYLE), validation))))
                rows += [row(seed, strategy, column, miou) for column, miou in found.items()]
        sanity = sanity_check(config, rows)
        if sanity["passed"]:
            for (seed, strategy), run_dir in runs.items():
                found = stages.run("evaluate test", f"seed {seed}: test {strategy}",
                                   lambda: evaluate(config, run_dir, dict(zip(config.styles, test))))
                rows += [row(seed, strategy, column, miou) for column, miou in found.items()]
    result = BenchResult(config, pretrained, rows, sanity, seconds=time.perf_counter() - start,
                         cpu_seconds=time.process_time() - start_cpu,
                         stage_seconds={s: {"wall": w, "cpu": c} for s, (w, c) in stages.seconds.items()},
                         tuned_fraction=fractions)
    finish(result)
    if not sanity["passed"]:
        raise FisherscanError(f"sanity check failed: full - freeze on the source validation scenes is "
                              f"{sanity['full_minus_freeze_source_val']:.1f} < {config.sanity_min} mIoU points (the "
                              f"task does not need tuning); no test style was evaluated (validation results in "
                              f"{result.paths['json']})")
    return result


def row(seed: int, strategy: str, column: str, miou: float) -> dict:
    group = next((g for g, styles in GROUPS.items() if column in styles), "validation")
    return {"seed": seed, "strategy": strategy, "column": column, "group": group, "miou": miou}
