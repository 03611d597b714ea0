"""The ``tune`` recipe: Algorithm 1 step 3, masked segmentation fine-tuning from a scores file, written out as
set-up -> selection -> head -> loop -> save.

1. ``set_up``: the scores, the source pairs, the backbone the scores were computed on, the evaluation targets, the
   run folder and the (augmented) dataset.
2. ``Selection``: the candidate elements in the strategy's order (``fisherscan.scores.select``); at step t the
   first floor(f(t) * total) of them are selected (Eq. 16 as decided), a set that only grows; the masked AdamW
   optimizers (``optim``) for the touched backbone parameters and the decoder.
3. ``start``: continue the run folder's checkpoint, or load the head ``score`` saved (or warm one up).
4. ``train``: the selected elements and the decoder with the decoder's training loss (Eq. 1, mean pixel
   cross-entropy; Mask2Former's matched set loss), AdamW with poly decay; every other backbone element keeps its
   pretrained bits. A step whose loss or gradients are not finite is skipped (no update; ``bad_steps``); more than
   ``max_bad_frac`` of the steps bad stops the run. Every ``save_every`` steps a resumable checkpoint.
5. ``save``: ``model.safetensors`` (head + changed backbone parameters + their masks), ``manifest.json`` (every
   option, the base weights and their sha256), ``log.csv`` (loss, lr, selected fraction per step); a rerun of the
   same command continues a stopped run (or ``--resume``) to the same bits as an uninterrupted run.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from .. import __version__
from ..data.augment import AUGMENTATIONS
from ..data.datasets import EpochSampler, SegmentationDataset, check_pairs, make_loader, skipped_note
from ..data.labels import NUM_CLASSES
from ..data.layouts import find_pairs, select_images
from ..errors import FisherscanError
from ..eval.evaluate import evaluate_datasets, prepare_datasets, save_results
from ..io import options_json, recorded_base, resolve_recorded
from ..models.backbone import Backbone, build_backbone
from ..models.groups import GROUPS
from ..models.heads import load_head
from ..models.segmenter import Segmenter
from ..rng import keyed_seed
from ..runtime import progress_bar, resolve_device, step_done
from ..scores.file import load_scores
from ..scores.select import STRATEGIES, entry_steps, selected_count, selection_order
from . import distributed
from .checkpoint import restore_checkpoint, save_checkpoint, save_run, write_log
from .config import TuneConfig, absolute_paths
from .distributed import Ranks
from .inherit import fitting_head
from .optim import MaskedAdamW, poly_lr
from .warmup import warm_up_decoder

# run control: not recorded in the manifest, so a continued run writes the same files as an uninterrupted one
RUN_CONTROL = ("resume", "stop_after")
BIAS_CORRECTIONS = ("selection", "global")  # MaskedAdamW's per-element count, or the run's (before it existed)
WARMUP_LR = 1e-3  # the decoder warm-up's learning rate when no head is found beside the scores


@dataclass
class TuneResult:
    run_dir: Path
    manifest: dict
    selected: int
    total: int
    log: list[dict] = field(default_factory=list)
    finished: bool = True
    evaluation: object | None = None  # fisherscan.eval.evaluate.EvalResult of the final model, with --eval
    notes: list[str] = field(default_factory=list)
    main: bool = True  # False on torchrun ranks other than 0: they write and print nothing


@dataclass
class TuneRun:
    """What ``set_up`` prepares for the later steps."""

    config: TuneConfig
    ranks: Ranks
    device: torch.device
    backbone: Backbone
    segmenter: Segmenter
    dataset: SegmentationDataset
    scores: dict
    score_meta: dict
    layout: str
    skipped: list[dict]
    targets: list
    out: Path
    notes: list[str] = field(default_factory=list)
    scores_head: Path | None = None  # the head ``score`` saved beside the scores (absolute)

    @property
    def autocast(self) -> bool:
        return self.device.type == "cuda"


def check_config(config: TuneConfig) -> None:
    if config.augment not in AUGMENTATIONS:
        raise FisherscanError(f"--augment {config.augment}: use one of {', '.join(AUGMENTATIONS)}")
    if config.strategy not in STRATEGIES:
        raise FisherscanError(f"--strategy {config.strategy}: use one of {', '.join(STRATEGIES)}")
    unknown = [g for g in config.candidates if g not in GROUPS]
    if unknown:
        raise FisherscanError(f"--candidates {','.join(unknown)}: unknown group; use some of {', '.join(GROUPS)}")
    if not 0 <= config.delta_min <= config.delta_max <= 1:
        raise FisherscanError("--delta-min and --delta-max must satisfy 0 <= delta-min <= delta-max <= 1")
    for option, value in (("--steps", config.steps), ("--batch-size", config.batch_size),
                          ("--accumulate", config.accumulate), ("--save-every", config.save_every)):
        if value < 1:
            raise FisherscanError(f"{option} {value}: must be at least 1")
    out = Path(config.out)
    if out.exists() and not out.is_dir():
        raise FisherscanError(f"--out {out} is a file; pass a folder for the run")
    finished = (out / "model.safetensors").exists()
    if finished and not config.overwrite and not config.resume:
        raise FisherscanError(f"--out {out} holds a finished run; pass --overwrite to replace it or choose another "
                              "--out")
    if config.resume and not (out / "checkpoint.safetensors").exists():
        raise FisherscanError(f"--resume: {out} has no checkpoint.safetensors; start without --resume")
    if config.adam_bias_correction not in BIAS_CORRECTIONS:
        raise FisherscanError(f"--adam-bias-correction {config.adam_bias_correction}: use one of "
                              f"{', '.join(BIAS_CORRECTIONS)}")
    if config.decoder_lr is not None and not (math.isfinite(config.decoder_lr) and config.decoder_lr > 0):
        raise FisherscanError(f"--decoder-lr {config.decoder_lr}: must be a positive number")
    if not (math.isfinite(config.max_bad_frac) and 0 <= config.max_bad_frac <= 1):
        raise FisherscanError(f"--max-bad-frac {config.max_bad_frac}: must lie in [0, 1]")


def continues(config: TuneConfig) -> bool:
    """Whether this run continues a stopped one: ``--resume``, or a checkpoint without a finished model in
    ``--out`` (a killed or stopped run of the same command) and no ``--overwrite``."""
    out = Path(config.out)
    if config.resume:
        return True
    stopped = (out / "checkpoint.safetensors").is_file() and not (out / "model.safetensors").exists()
    return stopped and not config.overwrite


def grads_finite(module: torch.nn.Module) -> bool:
    """True when every gradient of ``module`` is finite (one device sync)."""
    grads = [p.grad.isfinite().all() for p in module.parameters() if p.grad is not None]
    return bool(torch.stack(grads).all()) if grads else True


def check_scores_match(scores: dict, metadata: dict, backbone: torch.nn.Module, path: Path) -> None:
    """The scores must hold every backbone parameter with its shape."""
    kind = next(iter(scores.values()))
    own = {name: p.shape for name, p in backbone.named_parameters()}
    missing = sorted(set(own) - set(kind))
    wrong = sorted(n for n in set(own) & set(kind) if kind[n].shape != own[n])
    if missing or wrong:
        listed = ", ".join((missing + wrong)[:3])
        raise FisherscanError(f"--scores {path} does not match --model (scored: {metadata.get('model')}; "
                              f"{len(missing)} missing, {len(wrong)} wrong shapes: {listed}); score this model first")


def check_scored_model(metadata: dict, model: str, path: Path) -> None:
    """The scores' metadata must name the model being tuned (same shapes can still be another model)."""
    scored = metadata.get("model")
    if scored is not None and scored != model:
        raise FisherscanError(f"--scores {path} does not match --model: it was computed on {scored}, not {model}; "
                              f"pass --model {scored} or score {model} first")


def make_run_folder(out: Path) -> Path:
    out = Path(out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FisherscanError(f"--out {out}: cannot create the run folder ({error.strerror}); choose another "
                              "--out") from None
    if not os.access(out, os.W_OK):
        raise FisherscanError(f"--out {out}: folder is not writable; choose another --out or fix its permissions")
    return out


def set_up(config: TuneConfig, ranks: Ranks, device: torch.device) -> TuneRun:
    """The scores (checked against the model), the data, the model, the evaluation targets and the run folder."""
    torch.manual_seed(config.seed)
    scores, score_meta = load_scores(config.scores)
    check_scored_model(score_meta, config.model, config.scores)
    layout, pairs = find_pairs(config.data, config.layout, config.split)
    pairs, skipped = check_pairs(select_images(pairs, config.images, config.seed), config.skip_bad)
    backbone = build_backbone(config.model, weights=config.weights, random_init=config.random_init,
                              strict=config.strict)
    segmenter = Segmenter(backbone.model, NUM_CLASSES, config.decoder, config.feature_blocks).to(device).eval()
    check_scores_match(scores, score_meta, segmenter.backbone, config.scores)
    targets = (prepare_datasets(list(config.eval), config.eval_layout, config.eval_split, skip_bad=config.skip_bad)
               if config.eval else [])
    out = make_run_folder(config.out)
    mean, std = backbone.model.pretrained_cfg.get("mean"), backbone.model.pretrained_cfg.get("std")
    dataset = SegmentationDataset(pairs, config.crop, pad_multiple=backbone.patch_size, seed=config.seed,
                                  augmentation=AUGMENTATIONS[config.augment],
                                  **({"mean": mean, "std": std} if mean and std else {}))
    notes = [skipped_note(skipped, len(pairs) + len(skipped))] if skipped else []
    base = recorded_base(config.scores, (score_meta.get("options") or {}).get("out"))
    return TuneRun(config, ranks, device, backbone, segmenter, dataset, scores, score_meta, layout, skipped, targets,
                   out, notes, resolve_recorded(score_meta.get("head"), base))


class Selection:
    """The candidate elements in the strategy's order, the flat mask whose prefix grows (Eq. 16), per-parameter
    views into it, the parameters it ever touches, and the masked optimizers."""

    def __init__(self, run: TuneRun):
        config = run.config
        try:
            self.names, self.order = selection_order(run.scores, config.strategy, config.candidates, config.seed,
                                                     config.score_kind)
        except ValueError as error:
            raise FisherscanError(f"--strategy {config.strategy} / --score-kind {config.score_kind}: {error}") \
                from None
        self.config = config
        params = dict(run.segmenter.backbone.named_parameters())
        self.total = sum(p.numel() for p in params.values())
        sizes = [params[n].numel() for n in self.names]
        self.flat = torch.zeros(self.total, dtype=torch.bool, device=run.device)
        self.masks = dict(zip(self.names, (piece.view(params[n].shape)
                                           for n, piece in zip(self.names, self.flat.split(sizes)))))
        self.final_count = self.count_at(config.steps - 1)
        final = torch.zeros(self.total, dtype=torch.bool)
        final[self.order[:self.final_count]] = True
        self.touched = [n for n, piece in zip(self.names, final.split(sizes)) if piece.any()]
        for name, p in params.items():
            p.requires_grad_(name in self.touched)
        entries = self.late_entries(sizes) if config.adam_bias_correction == "selection" else None
        self.backbone_opt = MaskedAdamW({n: params[n] for n in self.touched}, self.masks, entries=entries,
                                        weight_decay=config.weight_decay)
        self.decoder_params = dict(run.segmenter.decoder.named_parameters())
        self.decoder_opt = MaskedAdamW(self.decoder_params, {n: torch.ones_like(p, dtype=torch.bool)
                                                             for n, p in self.decoder_params.items()},
                                       weight_decay=config.weight_decay)

    def count_at(self, step: int) -> int:
        """How many elements are selected at update ``step`` (0 .. steps-1: the first uses delta_min, the last
        delta_max exactly)."""
        config = self.config
        if config.strategy == "full":
            return self.order.numel()
        if config.strategy == "freeze":
            return 0
        return min(self.order.numel(), selected_count(step, config.steps - 1, self.total, config.delta_min,
                                                      config.delta_max, config.schedule_t))

    def late_entries(self, sizes: list[int]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """Per touched parameter, the elements that join after the first step (ranks count_at(0) .. final - 1 of
        the order): their flat positions in the parameter and the step each joins (Eq. 16's counts), int32 and
        in the order they join, for the optimizer's per-element bias correction. Two int32 per late element,
        nothing for the others: derived from the order and the schedule, so nothing extra to checkpoint."""
        counts = torch.tensor([self.count_at(t) for t in range(self.config.steps)], dtype=torch.long)
        first = int(counts[0])
        if self.final_count <= first:
            return {}
        ranks = torch.arange(first, self.final_count)
        steps, late = entry_steps(counts, ranks), self.order[first:self.final_count]
        ends = torch.tensor(sizes, dtype=torch.long).cumsum(0)
        owner = torch.searchsorted(ends, late, right=True)  # index into self.names
        grouped = torch.argsort(owner, stable=True)  # by parameter, join order kept inside each
        late, steps, owner = late[grouped], steps[grouped], owner[grouped]
        per_param = torch.bincount(owner, minlength=len(sizes)).tolist()
        entries, start = {}, 0
        for index, (name, count) in enumerate(zip(self.names, per_param)):
            if count:
                offset = int(ends[index]) - sizes[index]
                entries[name] = ((late[start:start + count] - offset).to(torch.int32),
                                 steps[start:start + count].to(torch.int32))
            start += count
        return entries

    def grow_to(self, step: int) -> int:
        """Select the elements of update ``step`` (the set only grows); the number selected."""
        self.flat[self.order[:self.count_at(step)]] = True
        return int(self.flat.sum())


def tune_manifest(run: TuneRun, selection: Selection, sources: dict | None = None) -> dict:
    config, backbone = run.config, run.backbone
    return {
        "fisherscan_version": __version__, "kind": "tune-run",
        "model": config.model, "timm_architecture": backbone.timm_name, "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256, "weights_source": backbone.source,
        "random_init": backbone.random_init, "scores": str(config.scores), "scores_model": run.score_meta.get("model"),
        "data": {"path": str(config.data), "layout": run.layout, "split": config.split,
                 "images": len(run.dataset)},
        "skipped_pairs": run.skipped,
        "selection": {"strategy": config.strategy, "score_kind": config.score_kind,
                      "candidates": list(config.candidates), "total_backbone_elements": selection.total,
                      "final_selected": selection.final_count,
                      "schedule": "f(t) = dmin + (dmax - dmin) (1 - exp(-t/T)) / (1 - exp(-T3/T)), T = T3/3 default"},
        "optimizer": {"name": "AdamW, masked (unselected elements bit-identical)", "lr": config.lr,
                      "decoder_lr": decoder_lr(config), "weight_decay": config.weight_decay,
                      "poly_power": config.power, "bias_correction": config.adam_bias_correction},
        "decoder": config.decoder, "num_classes": NUM_CLASSES, "crop": config.crop, "world_size": run.ranks.world,
        "options": options_json(config, exclude=RUN_CONTROL),
        **({"option_sources": {k: v for k, v in sources.items() if k not in RUN_CONTROL}} if sources else {}),
    }


@dataclass
class TrainState:
    """Where the loop stands: the next step, the log rows and the skipped steps."""

    step: int = 0
    log: list[dict] = field(default_factory=list)
    bad_steps: int = 0


def start(run: TuneRun, selection: Selection, manifest: dict, resuming: bool, progress: Progress) -> TrainState:
    """Continue the checkpoint in the run folder, or start from the head beside the scores (``--head``), else a
    decoder warmed up on the frozen backbone."""
    config, path = run.config, run.out / "checkpoint.safetensors"
    if resuming:
        step, log, info = restore_checkpoint(path, run.segmenter, selection.backbone_opt, selection.decoder_opt,
                                             selection.touched, manifest)
        if info.get("head") is not None:
            manifest["head"] = info["head"]
        if not config.resume:
            run.notes.append(f"continued the stopped run in {run.out} from step {step} of {config.steps} "
                             "(pass --overwrite to start afresh)")
        return TrainState(step, log, int(info.get("bad_steps", 0)))
    if path.exists() and run.ranks.main:  # --overwrite: a stale checkpoint must not be continued
        path.unlink()
    head = config.head or fitting_head(run.scores_head, config.decoder, config.feature_blocks)
    if head is not None:
        load_head(head, run.segmenter)
        manifest["head"] = str(head)
    else:  # no head beside the scores, or one for another decoder
        warm_up_decoder(run.segmenter, make_loader(run.dataset, config.batch_size, config.workers),
                        config.warmup_steps, WARMUP_LR, run.device, run.autocast, progress)
        manifest["head"] = f"warmed up for {config.warmup_steps} steps"
    return TrainState()


def training_batches(run: TuneRun, first_step: int):
    """The training loader from update ``first_step`` on: one seeded permutation per epoch, this rank's share of
    each global batch (``EpochSampler``), so a resumed run sees exactly the remaining draws."""
    config = run.config
    draws_per_step = config.batch_size * config.accumulate * run.ranks.world  # the global batch of one step
    sampler = EpochSampler(len(run.dataset), config.seed, start=first_step * draws_per_step,
                           total=config.steps * draws_per_step, shard=(run.ranks.rank, run.ranks.world))
    return torch.utils.data.DataLoader(run.dataset, batch_size=config.batch_size, sampler=sampler,
                                       num_workers=config.workers)


def decoder_lr(config: TuneConfig) -> float:
    return config.decoder_lr if config.decoder_lr is not None else config.lr


def update(run: TuneRun, selection: Selection, state: TrainState, running: float, progress: Progress) -> dict:
    """One optimizer step (or a skipped one) at ``state.step`` with the gradients accumulated; its log row."""
    config, step = run.config, state.step
    lr = poly_lr(config.lr, step, config.steps, config.power)
    selected = selection.grow_to(step)  # Eq. 16: the selection for this step (only grows)
    running = distributed.mean_over_ranks(running, run.ranks, run.device)
    finite = math.isfinite(running) and grads_finite(run.segmenter)  # all-reduced: the same on every rank
    if finite:
        selection.backbone_opt.step(lr)
        selection.decoder_opt.step(poly_lr(decoder_lr(config), step, config.steps, config.power))
    else:  # skipped: no update, moments and update counts untouched
        selection.backbone_opt.skip()
        selection.decoder_opt.skip()
        state.bad_steps += 1
        if not progress.disable:
            progress.console.print(f"[yellow]warning:[/] step {step + 1}: non-finite loss or gradients, skipped "
                                   f"({state.bad_steps} bad of {config.steps} steps)", highlight=False)
        if state.bad_steps > config.max_bad_frac * config.steps:
            raise FisherscanError(f"{state.bad_steps} of {config.steps} steps had non-finite losses or gradients "
                                  f"(more than --max-bad-frac {config.max_bad_frac}); check the weights, the data "
                                  "and --lr")
    selection.backbone_opt.zero_grad()
    selection.decoder_opt.zero_grad()
    return {"step": step + 1, "loss": running if finite else None, "lr": lr, "selected": selected,
            "selected_fraction": selected / selection.total}


def train(run: TuneRun, selection: Selection, state: TrainState, manifest: dict, progress: Progress) -> bool:
    """Algorithm 1 step 3 from ``state.step`` to the end (True) or to ``--stop-after`` (False)."""
    config, ranks, device = run.config, run.ranks, run.device
    forward = run.segmenter
    if ranks.world > 1:  # gradients averaged over ranks; masks and optimizer steps are the same on every rank
        forward = torch.nn.parallel.DistributedDataParallel(
            run.segmenter, device_ids=[device.index] if device.type == "cuda" else None)
    task = progress.add_task("tune", total=config.steps, completed=state.step, rate="")
    micro, running = 0, 0.0
    for x, y, _ in distributed.agreed(training_batches(run, state.step), ranks, device):
        x, y = x.to(device), y.to(device)
        # the global RNG (the matched loss's random points) keyed on the step: a resumed run draws the same
        torch.manual_seed(keyed_seed(config.seed, state.step, "points", ranks.rank * config.accumulate + micro))
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.autocast):
            loss = forward(x, y)  # the decoder's training loss (Segmenter.loss), fp32
        (loss / config.accumulate).backward()  # on every rank, also when not finite: DDP must all-reduce
        running += loss.item() / config.accumulate
        micro += 1
        if micro < config.accumulate:
            continue
        row = update(run, selection, state, running, progress)
        state.log.append(row)
        state.step, micro, running = state.step + 1, 0, 0.0
        shown = row["loss"] if row["loss"] is not None else float("nan")
        step_done(progress, task, 1, f"loss {shown:.3f} sel {row['selected_fraction']:.2%}")
        if not after_step(run, selection, state, manifest, progress):
            return False
    return True


def after_step(run: TuneRun, selection: Selection, state: TrainState, manifest: dict, progress: Progress) -> bool:
    """Checkpoint and evaluate on schedule; False at a planned stop (``--stop-after``)."""
    config, step = run.config, state.step
    stopping = step == config.stop_after and step < config.steps  # a planned stop: resumable, unfinished
    if run.ranks.main and (stopping or (step % config.save_every == 0 and step < config.steps)):
        save_checkpoint(run.out / "checkpoint.safetensors", step, run.segmenter, selection.backbone_opt,
                        selection.decoder_opt, selection.touched, state.log, manifest, state.bad_steps)
    if run.targets and run.ranks.main and config.eval_every and step % config.eval_every == 0 \
            and step < config.steps:
        evaluate_run(run.segmenter, run.targets, config, run.device, progress, run.out, f"step{step}")
    return not stopping


def save(run: TuneRun, selection: Selection, state: TrainState, manifest: dict, console: Console | None):
    """The finished run's files (rank 0) and, with ``--eval``, its evaluation; the evaluation result or None."""
    selected = int(selection.flat.sum())
    manifest["bad_steps"] = state.bad_steps
    if state.bad_steps:
        run.notes.append(f"{state.bad_steps} of {run.config.steps} steps had non-finite losses or gradients and "
                         "were skipped")
    manifest["trainable"] = {"backbone_elements": selected, "backbone_fraction": selected / selection.total,
                             "decoder_parameters": sum(p.numel() for p in selection.decoder_params.values())}
    if not run.ranks.main:  # one writer
        return None
    write_log(run.out / "log.csv", state.log)
    save_run(run.out, run.segmenter, selection.masks, selection.touched, manifest, run.config.full_checkpoint)
    save_checkpoint(run.out / "checkpoint.safetensors", state.step, run.segmenter, selection.backbone_opt,
                    selection.decoder_opt, selection.touched, state.log, manifest, state.bad_steps)
    if not run.targets:
        return None
    with progress_bar(console) as progress:
        return evaluate_run(run.segmenter, run.targets, run.config, run.device, progress, run.out, "eval")


def run_tune(config: TuneConfig, console: Console | None = None, sources: dict | None = None) -> TuneResult:
    """Run the whole ``tune`` job into ``config.out`` (a folder); ``sources``: where each option came from
    (``layers.tune_config``), recorded in the manifest."""
    config = absolute_paths(config)
    check_config(config)
    resuming = continues(config)
    ranks, device = distributed.setup(resolve_device(config.device))
    console = console if ranks.main else None
    try:
        run = set_up(config, ranks, device)
        selection = Selection(run)
        manifest = tune_manifest(run, selection, sources)
        with progress_bar(console) as progress:
            state = start(run, selection, manifest, resuming, progress)
            selection.grow_to(state.step)
            finished = train(run, selection, state, manifest, progress)
        evaluation = save(run, selection, state, manifest, console) if finished else None
        distributed.barrier(ranks)
    finally:
        distributed.teardown(ranks)
    return TuneResult(run_dir=run.out, manifest=manifest, selected=int(selection.flat.sum()), total=selection.total,
                      log=state.log, finished=finished, evaluation=evaluation, notes=run.notes, main=ranks.main)


def evaluate_run(segmenter: Segmenter, targets: list, config: TuneConfig, device: torch.device, progress,
                 out: Path, stem: str):
    """``--eval``: mIoU on each target (``fisherscan.eval.evaluate``), saved as RUN_DIR/eval/<stem>.json and .csv."""
    crop = config.eval_crop if config.eval_crop is not None else config.crop
    stride = config.eval_stride if config.eval_stride is not None else max(1, (crop * 2) // 3)
    result = evaluate_datasets(segmenter, targets, crop=crop, stride=stride, device=device, progress=progress)
    save_results(result, out / "eval", stem=stem)
    segmenter.eval()
    return result


def trainable_summary(result: TuneResult) -> str:
    return (f"{result.selected:,} of {result.total:,} backbone elements tuned "
            f"({result.selected / max(result.total, 1):.2%}), decoder "
            f"{result.manifest['trainable']['decoder_parameters']:,} parameters")
