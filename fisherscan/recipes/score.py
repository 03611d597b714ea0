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

import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from rich.progress import Progress

from .. import __version__
from ..data.datasets import SegmentationDataset, check_pairs, make_loader, padded_size, skipped_note
from ..data.labels import NUM_CLASSES
from ..data.layouts import find_pairs, select_images
from ..errors import FisherscanError
from ..fisher.diagonal import make_engine
from ..fisher.drfim import default_delta_eps, dr_fim_terms, eq15_pseudocount, shift_weight, variational_dr_fim_terms
from ..fisher.loss import LABEL_MODES
from ..fisher.variational import CURVATURES
from ..io import options_json
from ..models.backbone import Backbone, build_backbone
from ..models.groups import candidate_names, parameter_groups
from ..models.heads import head_path_for, load_head, save_head
from ..models.segmenter import Segmenter
from ..runtime import progress_bar, resolve_device
from ..scores.file import save_scores
from . import checkpoint, distributed
from .config import ScoreConfig
from .distributed import Ranks
from .score_loop import Estimate, all_finite, new_state, run_diagonal
from .score_variational import run_variational, total_steps
from .warmup import warm_up_decoder

ESTIMATORS = ("diagonal", "variational")
EQ15_MODES = ("printed", "substituted")
# run control, left out of the scores file's options so a continued run writes the same file as an uninterrupted one
RUN_CONTROL = ("resume", "stop_after", "save_every")


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
    notes: list[str] = field(default_factory=list)  # saved in the metadata
    run_notes: list[str] = field(default_factory=list)  # about this invocation only (printed, not saved)

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return torch.bfloat16 if self.device.type == "cuda" else None


def check_config(config: ScoreConfig) -> None:
    """Option mistakes, found before any work is done."""
    if config.estimator not in ESTIMATORS:
        raise FisherscanError(f"--estimator {config.estimator}: use one of {', '.join(ESTIMATORS)}")
    check_variational(config)
    if config.labels not in LABEL_MODES:
        raise FisherscanError(f"--labels {config.labels}: use one of {', '.join(LABEL_MODES)}")
    for option, value in (("--batch-size", config.batch_size), ("--crop", config.crop), ("--chunk-size",
                                                                                         config.chunk_size)):
        if value < 1:
            raise FisherscanError(f"{option} {value}: must be at least 1")
    if config.warmup_steps < 0:
        raise FisherscanError(f"--warmup-steps {config.warmup_steps}: must be 0 or more")
    warmup_lr_ok = math.isfinite(config.warmup_lr) and config.warmup_lr > 0
    if config.head is None and config.warmup_steps > 0 and not warmup_lr_ok:
        raise FisherscanError(f"--warmup-lr {config.warmup_lr}: must be a finite number > 0")
    if config.shift_weight is not None and not (math.isfinite(config.shift_weight) and config.shift_weight >= 0):
        raise FisherscanError(f"--shift-weight {config.shift_weight}: must be a finite number >= 0")
    if config.delta_eps is not None and not (math.isfinite(config.delta_eps) and config.delta_eps > 0):
        raise FisherscanError(f"--delta-eps {config.delta_eps}: must be a finite number > 0")
    if config.images is not None and config.images < 1:
        raise FisherscanError(f"--images {config.images}: must be at least 1 (leave it out to score every image)")
    if config.save_every < 1:
        raise FisherscanError(f"--save-every {config.save_every}: must be at least 1")
    if config.stop_after is not None and config.stop_after < 1:
        raise FisherscanError(f"--stop-after {config.stop_after}: must be at least 1")
    if not (math.isfinite(config.max_bad_frac) and 0 <= config.max_bad_frac <= 1):
        raise FisherscanError(f"--max-bad-frac {config.max_bad_frac}: must lie in [0, 1]")
    if Path(config.out).exists() and not config.overwrite:
        raise FisherscanError(f"--out {config.out} exists; pass --overwrite to replace it or choose another --out")
    if str(config.out).endswith((".head.safetensors",
                                 ".partial.safetensors")) or not str(config.out).endswith(".safetensors"):
        raise FisherscanError(f"--out {config.out}: name the scores file <name>.safetensors")
    if not Path(config.out).resolve().parent.is_dir():
        raise FisherscanError(f"--out {config.out}: folder {Path(config.out).parent} does not exist; create it first")
    if not os.access(Path(config.out).resolve().parent, os.W_OK):
        raise FisherscanError(f"--out {config.out}: folder {Path(config.out).parent} is not writable; choose another "
                              "--out or fix its permissions")


def check_variational(config: ScoreConfig) -> None:
    """The variational options' mistakes (checked for every estimator: they are recorded either way)."""
    def positive(value) -> bool:
        return math.isfinite(value) and value > 0

    if not positive(config.gamma):
        raise FisherscanError(f"--gamma {config.gamma}: must be a finite number > 0")
    if config.tau is not None and not positive(config.tau):
        raise FisherscanError(f"--tau {config.tau}: must be a finite number > 0 (leave it out to pick it by a pilot)")
    if config.var_steps < 1:
        raise FisherscanError(f"--var-steps {config.var_steps}: must be at least 1")
    if not 0 <= config.var_lr < 1:
        raise FisherscanError(f"--var-lr {config.var_lr}: must lie in [0, 1)")
    if config.var_scale is not None and not positive(config.var_scale):
        raise FisherscanError(f"--var-scale {config.var_scale}: must be a finite number > 0")
    if not positive(config.var_tolerance):
        raise FisherscanError(f"--var-tolerance {config.var_tolerance}: must be a finite number > 0")
    if config.var_curvature not in CURVATURES:
        raise FisherscanError(f"--var-curvature {config.var_curvature}: use one of {', '.join(CURVATURES)}")
    if config.eq15 not in EQ15_MODES:
        raise FisherscanError(f"--eq15 {config.eq15}: use one of {', '.join(EQ15_MODES)}")
    if config.var_legacy and (config.var_curvature != "reparam" or config.tau is None):
        raise FisherscanError("--var-legacy reproduces the old estimator: pass --var-curvature reparam and a --tau")


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
    if partial is not None and partial.get("skipped", []) != skipped:
        raise FisherscanError(f"{partial_path}: the data set changed since the run stopped (other pairs skipped by "
                              "--skip-bad); restore it, or delete the partial file or pass --overwrite")
    backbone = build_backbone(config.model, weights=config.weights, random_init=config.random_init,
                              strict=config.strict)
    segmenter = Segmenter(backbone.model, NUM_CLASSES, config.decoder, config.feature_blocks).to(device).eval()
    depth = len(segmenter.backbone.blocks)
    if not 0 <= config.perturb_at < depth:
        raise FisherscanError(f"--perturb-at {config.perturb_at}: the model has blocks 0..{depth - 1}")
    mean, std = backbone.model.pretrained_cfg.get("mean"), backbone.model.pretrained_cfg.get("std")
    dataset = SegmentationDataset(pairs, config.crop, pad_multiple=backbone.patch_size, seed=config.seed,
                                  **({"mean": mean, "std": std} if mean and std else {}))
    run = ScoreRun(config, ranks, device, backbone, segmenter, dataset, layout, skipped, partial_path, partial)
    if backbone.random_init:
        run.notes.append("the backbone is randomly initialised (--random-init): these scores describe no "
                         "pretrained model")
    if skipped:
        run.notes.append(skipped_note(skipped, len(pairs) + len(skipped)))
    if len(pairs) == 1 or config.batch_size == 1:
        run.notes.append("batches of one image have no batch spread: Eq. 6 applies no shift, so F(x') = F(x)")
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
    loader = make_loader(run.dataset, config.batch_size, config.workers)
    final_loss = warm_up_decoder(run.segmenter, loader, config.warmup_steps, config.warmup_lr, run.device,
                                 run.device.type == "cuda", progress)
    return {"steps": config.warmup_steps, "lr": config.warmup_lr, "final_loss": final_loss}


def resume_estimator(run: ScoreRun):
    """The estimator's state in the partial file (the head loaded into the segmenter too)."""
    if run.config.estimator == "diagonal":
        state = new_state(run.segmenter)
        counters = checkpoint.restore_diagonal_partial(run.partial_path, run.partial, run.segmenter, state.clean,
                                                       state.shifted)
        state.next_image, state.bad_batches = counters["next_image"], counters["bad_batches"]
        state.shift_magnitude_sum = counters["shift_magnitude_sum"]
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
            checkpoint.save_diagonal_partial(run.partial_path, current.clean, current.shifted, current.counters(),
                                             run.segmenter, config, context)

        engine = make_engine(run.segmenter, chunk_size=config.chunk_size)  # once per run
        return run_diagonal(run.segmenter, engine, run.dataset, config, run.device, run.autocast_dtype, progress,
                            run.ranks, state=state, save=save if run.partial_path is not None else None)

    def save_fit(current: dict) -> None:
        checkpoint.save_variational_partial(run.partial_path, current, run.segmenter, config, context)

    return run_variational(run.segmenter, run.dataset, config, run.device, run.autocast_dtype, progress,
                           resume=state, save=save_fit)


def combine(f_clean: dict, f_shift: dict, magnitude: float, config: ScoreConfig, candidates: list[str],
            prior: dict | None = None) -> tuple[dict, dict]:
    """Eq. 5 and Eq. 7 with the decided normalisation, relative eps and shift weight (``fisherscan.fisher.drfim``);
    with ``prior`` (the variational fit's gamma, tau and likelihood scale) and ``--eq15 printed``, Eq. 15."""
    weight = config.shift_weight if config.shift_weight is not None else shift_weight(magnitude)
    eps = config.delta_eps if config.delta_eps is not None else default_delta_eps(config.normalize)
    printed = prior is not None and config.eq15 == "printed"
    try:
        if printed:
            delta, drfim, scale = variational_dr_fim_terms(f_clean, f_shift, weight, normalize=config.normalize,
                                                           candidates=candidates, eps=eps, **prior)
        else:
            delta, drfim, scale = dr_fim_terms(f_clean, f_shift, weight, config.normalize, candidates, eps)
    except ValueError:
        raise FisherscanError("F(x) is zero on every candidate parameter; check the labels and --warmup-steps") \
            from None
    scores = {"fim": f_clean, "fim_shift": f_shift, "delta": delta, "drfim": drfim}
    terms = {"normalization": {"mode": "candidate-mean" if config.normalize else "none", "scale": scale},
             "delta_eps": eps,
             "shift": {"magnitude": magnitude, "weight": weight, "weight_overridden": config.shift_weight is not None,
                       "definition": "s = mean over images and channels of (|alpha-mu| + |beta-sigma|) / sigma; "
                                     "weight = exp(-s)"}}
    if prior is not None:
        terms["eq15"] = {"mode": config.eq15}
        if printed:
            pseudocount = eq15_pseudocount(**prior)
            terms["eq15"].update(pseudocount=pseudocount, pseudocount_normalized=pseudocount / scale,
                                 domain_factor=prior["gamma"],
                                 formula="Delta F = |F(x) - F(x')| / (min(F(x), F(x')) + gamma tau^-2 / s + eps), "
                                         "DRF = F(x) + w * gamma * Delta F; F and the pseudocount divided by the "
                                         "normalisation scale alike")
        else:
            terms["eq15"]["formula"] = "Eq. 14 substituted into Eq. 5/7 (no pseudocount)"
    return scores, terms


def finish(run: ScoreRun, result: Estimate, warmup: dict) -> tuple[dict, dict]:
    """(scores by kind, metadata): Eq. 5/7 on the backbone's F(x), F(x'), checked finite, with the record."""
    config, extra, notes = run.config, result.extra, run.notes
    if extra.get("bad_batches"):
        notes.append(f"{extra['bad_batches']} of {extra['batches_total']} batches had non-finite losses or gradients "
                     "and were skipped (their images are not in the scores)")
    candidates = candidate_names(parameter_groups(run.segmenter.backbone.named_parameters()))

    def strip(by_name: dict) -> dict:  # backbone names, on the CPU
        return {name.removeprefix("backbone."): value.cpu() for name, value in by_name.items()}

    prior = None
    if config.estimator == "variational":
        record = extra["variational"]
        prior = {"gamma": record["gamma"], "tau": record["tau"], "likelihood_scale": record["likelihood_scale"]}
    scores, terms = combine(strip(result.f_clean), strip(result.f_shift), result.magnitude, config, candidates, prior)
    for kind, by_name in scores.items():  # finite batches can still overflow float32 when summed
        if not all_finite(by_name):
            raise FisherscanError(f"the {kind} scores are not finite (float32 overflow of the gradient sums); "
                                  "check the weights and --warmup-lr")
    if config.estimator == "variational":
        scores["precision"], scores["precision_shift"] = strip(extra["precision"]), strip(extra["precision_shift"])
        terms["variational"] = extra["variational"]
        notes.extend(convergence_notes(extra["variational"], config))
    return scores, score_metadata(run, extra, terms, warmup)


def convergence_notes(record: dict, config: ScoreConfig) -> list[str]:
    """A warning per fit that has not converged, and per fit with skipped steps."""
    notes = []
    where = "over the last 10% of steps" if config.var_legacy else "of D = Lambda - tau^-2 over the second half"
    for kind, converged in record["converged"].items():
        if not converged:
            notes.append(f"warning: the {kind} precision has not converged (relative change "
                         f"{record['relative_change'][kind]:.3f} {where}; tolerance {config.var_tolerance}"
                         f"{'' if config.var_legacy else ', at least 10 steps'}); raise --var-steps")
    for kind, bad in record["bad_steps"].items():
        if bad:
            notes.append(f"{bad} variational {kind} steps had a non-finite loss or curvature and were skipped")
    return notes


def score_metadata(run: ScoreRun, extra: dict, terms: dict, warmup: dict) -> dict:
    """Every option and decision of the run, as the scores file records it."""
    config, backbone = run.config, run.backbone
    return {
        "fisherscan_version": __version__,
        "model": config.model,
        "timm_architecture": backbone.timm_name,
        "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256,
        "random_init": backbone.random_init,
        "estimator": config.estimator,
        "images": extra["images"],
        "bad_batches": extra.get("bad_batches"),
        "skipped_pairs": run.skipped,
        "seed": config.seed,
        "labels": config.labels,
        "loss_reduction": "per image: sum of pixel cross-entropy over valid pixels (ignore 255 and padding); "
                          "F = mean over images of the squared per-image gradient (Eq. 9)",
        **terms,
        "perturbation": {"site": f"input of block {config.perturb_at}", "block": config.perturb_at,
                         "tokens": "patch tokens; prefix tokens untouched", "variance": "unbiased", "eps": 1e-6,
                         "batch_spread": "detached", "batch_size": config.batch_size},
        "crop": config.crop,
        "padding": {"pad_to_multiple_of": backbone.patch_size,
                    "padded_size": padded_size(config.crop, backbone.patch_size),
                    "rule": "random crop (smaller images padded), then pad bottom/right with 0 (image) and 255 "
                            "(label); native patch size kept, position embeddings interpolated at run time"},
        "decoder": config.decoder,
        "head": str(head_path_for(config.out)),
        "warmup": warmup,
        "data": {"path": str(config.data), "layout": run.layout, "split": config.split},
        "num_classes": NUM_CLASSES,
        "device": run.device.type,
        "world_size": run.ranks.world,
        "autocast": "bfloat16" if run.device.type == "cuda" else None,
        "options": options_json(config, exclude=RUN_CONTROL),
        "notes": run.notes,
    }


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
    """Run the whole ``score`` job and write ``config.out`` (+ the head beside it)."""
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
                       batches_total=result.extra.get("batches_total", 0), main=ranks.main)
