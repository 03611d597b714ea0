"""The ``score`` recipe: Algorithm 1 steps 1-2, written out as set-up -> head -> estimate -> save.

1. ``set_up``: the source pairs (``--skip-bad`` decided once), the backbone and a decoder, the dataset, and what to
   do with a partial file beside ``--out``.
2. ``prepare_head``: continue a partial file's head, load ``--head``, or warm the decoder up with the backbone
   frozen (Algorithm 1 step 1; rank 0 under torchrun, which then broadcasts it).
3. ``estimate``: F(x) and F(x') (Eq. 9) on the same images, x' by Eq. 6 at the input of block ``perturb_at``, by
   the exact diagonal estimator (``score_loop``: one loop, one process or many) or the variational one
   (``score_variational``, Eq. 10-14); labels sampled per image from a generator keyed on (seed, image index).
4. ``finish`` + ``write``: Delta F (Eq. 5) and DR-FIM (Eq. 7) with the decided normalisation (``combine``); all
   kinds, the metadata and the warmed head saved.

Robustness: every ``save_every`` batches (variational: steps) the state, the warmed head and the options go to
``<name>.partial.safetensors`` beside the output (``checkpoint``); ``--resume`` (or a plain rerun with the same
options) continues from it, and the final file is the same, byte for byte, as an uninterrupted run's. A batch
whose squared-gradient sums are not finite is skipped and counted (``bad_batches``).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from ..data.datasets import SegmentationDataset, check_pairs, make_loader, skipped_note
from ..data.labels import NUM_CLASSES
from ..data.layouts import find_pairs, select_images
from ..data.shift_data import ShiftedDataset, find_shift_images
from ..errors import FisherscanError
from ..fisher.diagonal import make_engine
from ..io import resolve_recorded
from ..models.backbone import Backbone, build_backbone
from ..models.groups import candidate_names, parameter_groups
from ..models.heads import head_path_for, load_head, save_head
from ..models.segmenter import Segmenter
from ..runtime import progress_bar, resolve_device
from ..scores.file import save_scores
from . import checkpoint, distributed
from .config import ScoreConfig, absolute_paths
from .distributed import Ranks
from .score_checks import check_config
from .score_loop import Estimate, all_finite, new_state, run_diagonal
from .score_record import combine, convergence_notes, reliability, score_metadata
from .score_variational import run_variational, total_steps
from .shifts import make_shift
from .warmup import warm_up_decoder


@dataclass
class ScoreResult:
    scores: dict[str, dict[str, torch.Tensor]]
    metadata: dict
    head_path: Path
    notes: list[str] = field(default_factory=list)
    finished: bool = True  # False: stopped by --stop-after; the partial file holds the state
    partial_path: Path | None = None
    batches_done: int = 0  # batches scored so far (all runs together), of ``batches_total``
    batches_total: int = 0
    main: bool = True  # False on torchrun ranks other than 0: they write and print nothing
    timing: dict = field(default_factory=dict)  # the diagonal loop's wall time and data wait (never saved)


@dataclass
class ScoreRun:
    """What ``set_up`` prepares for the later steps."""

    config: ScoreConfig
    ranks: Ranks
    device: torch.device
    backbone: Backbone
    segmenter: Segmenter
    dataset: SegmentationDataset
    layout: str
    skipped: list[dict]
    partial_path: Path | None
    partial: dict | None
    shift_mode: str  # "eq6", "pixel", "paired" or "unpaired" (--shift-data)
    notes: list[str] = field(default_factory=list)  # saved in the metadata
    run_notes: list[str] = field(default_factory=list)  # about this invocation only (printed, not saved)

    @property
    def source(self) -> SegmentationDataset:
        """The source images alone (the dataset may also carry their --shift-data partners)."""
        return self.dataset.source if isinstance(self.dataset, ShiftedDataset) else self.dataset

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.device.type == "cuda" else None


def skipped_files(skipped: list[dict], recorded_in: Path | None = None) -> list[tuple[str, str]]:
    """The (image, label) files of ``--skip-bad``'s list, absolute (a partial file written before paths were recorded
    absolute lists them relative to the folder it lies in)."""
    base = Path(recorded_in).parent if recorded_in is not None else Path.cwd()
    return [(str(resolve_recorded(s["image"], base)), str(resolve_recorded(s["label"], base))) for s in skipped]


def set_up(config: ScoreConfig, ranks: Ranks, device: torch.device) -> ScoreRun:
    """The partial-file plan, the data (pairs found, subset drawn, bad pairs decided), the model and the notes."""
    sharded = ranks.world > 1
    if sharded and (config.estimator != "diagonal" or config.resume or config.stop_after is not None):
        raise FisherscanError("under torchrun, score runs --estimator diagonal without --resume/--stop-after; "
                              "run those in one process")
    partial_path, partial = checkpoint.plan_partial(config) if not sharded else (None, None)
    torch.manual_seed(config.seed)
    layout, pairs = find_pairs(config.data, config.layout, config.split)
    pairs, skipped = check_pairs(select_images(pairs, config.images, config.seed), config.skip_bad)
    if partial is not None and skipped_files(partial.get("skipped", []), partial_path) != skipped_files(skipped):
        raise FisherscanError(f"{partial_path}: the data set changed since the run stopped (other pairs skipped by "
                              "--skip-bad); restore it, or delete the partial file or pass --overwrite")
    backbone = build_backbone(config.model, weights=config.weights, random_init=config.random_init,
                              strict=config.strict)
    segmenter = Segmenter(backbone.model, NUM_CLASSES, config.decoder, config.feature_blocks).to(device).eval()
    depth = len(segmenter.backbone.blocks)
    if max(config.perturb_at) >= depth:
        raise FisherscanError(f"--perturb-at {','.join(map(str, config.perturb_at))}: the model has blocks "
                              f"0..{depth - 1}")
    mean, std = backbone.model.pretrained_cfg.get("mean"), backbone.model.pretrained_cfg.get("std")
    dataset = SegmentationDataset(pairs, config.crop, pad_multiple=backbone.patch_size, seed=config.seed,
                                  **({"mean": mean, "std": std} if mean and std else {}))
    mode = config.shift
    if config.shift_data is not None:
        shift_images = find_shift_images(config.shift_data, config.data, pairs, config.seed)
        if shift_images.mode == "unpaired" and config.labels == "given":
            raise FisherscanError(f"--shift-data {config.shift_data}: its images are not the source scenes "
                                  "(unpaired), so they have no labels; use --labels sampled")
        dataset, mode = ShiftedDataset(dataset, shift_images), shift_images.mode
    run = ScoreRun(config, ranks, device, backbone, segmenter, dataset, layout, skipped, partial_path, partial, mode)
    if backbone.random_init:
        run.notes.append("the backbone is randomly initialised (--random-init): these scores describe no "
                         "pretrained model")
    if skipped:
        run.notes.append(skipped_note(skipped, len(pairs) + len(skipped)))
    if mode == "eq6" and config.spread == "batch" and (len(pairs) == 1 or config.batch_size == 1):
        run.notes.append("batches of one image have no batch spread: Eq. 6 applies no shift, so F(x') = F(x)")
    if mode == "unpaired":
        run.notes.append(f"--shift-data {config.shift_data}: unpaired (no image shares a source image's path): "
                         f"F(x') from {len(pairs)} crops of its {shift_images.count} images, labels sampled")
    return run


def prepare_head(run: ScoreRun, progress: Progress) -> tuple[dict, object]:
    """(the warm-up record, the estimator state a partial file holds or None): the decoder from the partial file,
    from ``--head``, or warmed up (Algorithm 1 step 1); every rank ends with rank 0's head."""
    config, segmenter = run.config, run.segmenter
    for p in segmenter.parameters():
        p.requires_grad_(False)
    state, warmup = None, {}
    if run.partial is not None:
        state = resume_estimator(run)
        warmup = run.partial["warmup"]
    elif config.head is not None:
        warmup = {"source": str(config.head), "loaded": load_head(config.head, segmenter)}
    else:  # under torchrun rank 0 warms up; the others receive its head below
        warmup = distributed.collectively(run.ranks, run.device, lambda: warm_up(run, progress)) or {}
    distributed.broadcast_module(segmenter, run.ranks)  # every rank scores the same model (head, random init)
    for p in segmenter.backbone.parameters():
        p.requires_grad_(True)
    return warmup, state


def warm_up(run: ScoreRun, progress: Progress) -> dict | None:
    """Algorithm 1 step 1 on rank 0 (None elsewhere): the decoder trained on the frozen backbone; its record."""
    if not run.ranks.main:
        return None
    config = run.config
    loader = make_loader(run.source, config.batch_size, config.workers)
    final_loss = warm_up_decoder(run.segmenter, loader, config.warmup_steps, config.warmup_lr, run.device,
                                 run.device.type == "cuda", progress)
    return {"steps": config.warmup_steps, "lr": config.warmup_lr, "final_loss": final_loss}


def resume_estimator(run: ScoreRun):
    """The estimator's state in the partial file (the head loaded into the segmenter too)."""
    if run.config.estimator == "diagonal":
        state = new_state(run.segmenter, run.config.replicates)
        counters = checkpoint.restore_diagonal_partial(run.partial_path, run.partial, run.segmenter, state.parts)
        state.next_image, state.bad_batches = counters["next_image"], counters["bad_batches"]
        run.run_notes.append(f"continued the stopped run in {run.partial_path} from image {state.next_image} of "
                             f"{len(run.dataset)} (its head and sums; no new warm-up)")
        return state
    state = checkpoint.restore_variational_partial(run.partial_path, run.partial, run.segmenter, run.config,
                                                   likelihood_scale(run))
    run.run_notes.append(f"continued the stopped run in {run.partial_path} from variational step "
                         f"{state['global_step']} of {total_steps(run.config)} (its head and fits; no new warm-up)")
    return state


def likelihood_scale(run: ScoreRun) -> float:
    return float(run.config.var_scale if run.config.var_scale is not None else len(run.dataset))


def estimate(run: ScoreRun, state, warmup: dict, progress: Progress) -> Estimate:
    """F(x) and F(x') by the configured estimator, saving the partial file as it goes (one process)."""
    config, context = run.config, {"warmup": warmup, "skipped": run.skipped}
    if config.estimator == "diagonal":
        def save(current) -> None:
            checkpoint.save_diagonal_partial(run.partial_path, current.parts, current.counters(),
                                             run.segmenter, config, context)

        engine = make_engine(run.segmenter, chunk_size=config.chunk_size)  # once per run
        return run_diagonal(run.segmenter, engine, shift_family(run), run.dataset, config, run.device,
                            run.autocast_dtype, progress, run.ranks, state=state,
                            save=save if run.partial_path is not None else None)

    def save_fit(current: dict) -> None:
        checkpoint.save_variational_partial(run.partial_path, current, run.segmenter, config, context)

    return run_variational(run.segmenter, shift_family(run), run.dataset, config, run.device, run.autocast_dtype,
                           progress, resume=state, save=save_fit)


def shift_family(run: ScoreRun):
    """The run's source of F(x') (``shifts``), with the source dataset's normalisation."""
    return make_shift(run.segmenter, run.config, run.dataset, run.ranks, run.device, run.source.mean, run.source.std)


def finish(run: ScoreRun, result: Estimate, warmup: dict) -> tuple[dict, dict]:
    """(scores by kind, metadata): Eq. 5/7 on the backbone's F(x), F(x'), checked finite, with the record."""
    config, extra, notes = run.config, result.extra, run.notes
    if extra.get("bad_batches"):
        notes.append(f"{extra['bad_batches']} of {extra['batches_total']} batches had non-finite losses or gradients "
                     "and were skipped (their images are not in the scores)")
    candidates = candidate_names(parameter_groups(run.segmenter.backbone.named_parameters()))

    def strip(by_name: dict) -> dict:  # backbone names, on the CPU
        return {name.removeprefix("backbone."): value.cpu() for name, value in by_name.items()}

    prior = None  # the variational fit's prior: Eq. 15 (--eq15 printed)
    if config.estimator == "variational":
        record = extra["variational"]
        prior = {"gamma": record["gamma"], "tau": record["tau"], "likelihood_scale": record["likelihood_scale"]}
    scores, terms = combine(strip(result.f_clean), strip(result.f_shift), result.magnitude, config, candidates, prior)
    if "replicates" in extra:
        halves = [combine(strip(f), strip(f_shift), s, config, candidates)[0]
                  for f, f_shift, s in extra["replicates"]]
        terms["reliability"] = reliability(halves, config.seed)
    for kind, by_name in scores.items():  # finite batches can still overflow float32 when summed
        if not all_finite(by_name):
            raise FisherscanError(f"the {kind} scores are not finite (float32 overflow of the gradient sums); "
                                  "check the weights and --warmup-lr")
    if config.estimator == "variational":
        scores["precision"], scores["precision_shift"] = strip(extra["precision"]), strip(extra["precision_shift"])
        terms["variational"] = extra["variational"]
        notes.extend(convergence_notes(extra["variational"], config))
    return scores, score_metadata(run, extra, terms, warmup)


def stopped_result(run: ScoreRun, extra: dict) -> ScoreResult:
    config = run.config
    unit = "batch" if config.estimator == "diagonal" else "variational step"
    plural = "es" if unit == "batch" else "s"
    run.run_notes.append(f"stopped after {config.stop_after} {unit}{plural if config.stop_after != 1 else ''} "
                         f"(--stop-after): {extra['batches_done']} of {extra['batches_total']} {unit}{plural} done; "
                         "continue with --resume")
    return ScoreResult(scores={}, metadata={}, head_path=head_path_for(config.out), notes=run.notes + run.run_notes,
                       finished=False, partial_path=run.partial_path, batches_done=extra["batches_done"],
                       batches_total=extra["batches_total"])


def write(run: ScoreRun, scores: dict, metadata: dict) -> None:
    """The scores and the head beside them (rank 0: one writer), then the partial file is no longer needed."""
    config = run.config
    if run.ranks.main:
        save_scores(config.out, scores, metadata)
        save_head(head_path_for(config.out), run.segmenter, {"model": config.model, "num_classes": NUM_CLASSES,
                                                             "scores": str(config.out)})
    if run.partial_path is not None and run.partial_path.exists():
        run.partial_path.unlink()


def run_score(config: ScoreConfig, console: Console | None = None) -> ScoreResult:
    """Run the whole ``score`` job and write ``config.out`` (+ the head beside it); its metadata records absolute
    paths."""
    config = absolute_paths(config)
    check_config(config)
    ranks, device = distributed.setup(resolve_device(config.device))
    try:
        run = set_up(config, ranks, device)
        with progress_bar(console if ranks.main else None) as progress:
            warmup, state = prepare_head(run, progress)
            result = estimate(run, state, warmup, progress)
        if result.extra.get("stopped"):
            return stopped_result(run, result.extra)
        scores, metadata = finish(run, result, warmup)
        head_out = head_path_for(config.out)
        distributed.collectively(ranks, device, lambda: write(run, scores, metadata))  # rank 0 writes
    finally:
        distributed.teardown(ranks)
    return ScoreResult(scores=scores, metadata=metadata, head_path=head_out, notes=run.notes + run.run_notes,
                       partial_path=run.partial_path, batches_done=result.extra.get("batches_done", 0),
                       batches_total=result.extra.get("batches_total", 0), main=ranks.main,
                       timing=result.extra.get("timing", {}))
