"""The ``score`` recipe: Algorithm 1 steps 1-2 with the diagonal estimator, written out top to bottom.

1. Build the backbone and a decoder; warm the decoder up with the backbone frozen (step 1), or load ``--head``.
2. For every batch of source images: F(x) and F(x') (Eq. 9) on the same images, x' by Eq. 6 at the input of
   block ``perturb_at``; labels sampled per image from a generator keyed on (seed, image index).
3. Combine into Delta F (Eq. 5) and DR-FIM (Eq. 7) with the decisions of FISHERTUNE.md; save all four kinds,
   the metadata and the warmed head.
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import math
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import __version__
from .data import NUM_CLASSES, IGNORE_INDEX, SegmentationDataset, find_pairs, make_loader, padded_size, select_images, validate_pairs
from .errors import FisherscanError
from .fisher import (LABEL_MODES, FisherAccumulator, delta_fisher, dr_fim, fisher_scale, shift_weight,
                     squared_gradient_sum, trainable_parameters, upsample_logits)
from .groups import candidate_names, parameter_groups
from .models import build_backbone
from .perturb import TokenShift, block_input, channel_statistics, draw_eps, shift_statistics, statistic_spread
from .rng import keyed_generator
from .scores import save_scores
from .segmenter import Segmenter, head_path_for, load_head, save_head
from .variational import fit_precision, segmentation_losses

ESTIMATORS = ("diagonal", "variational")


@dataclass
class ScoreConfig:
    """Every option of ``fisherscan score``; the metadata records them all."""

    model: str
    data: Path
    out: Path
    weights: Path | None = None
    random_init: bool = False
    layout: str = "auto"
    split: str = "train"
    images: int | None = None
    batch_size: int = 8
    crop: int = 512
    decoder: str = "linear"
    head: Path | None = None
    warmup_steps: int = 200
    warmup_lr: float = 1e-3
    labels: str = "sampled"
    estimator: str = "diagonal"
    gamma: float = 1.0
    tau: float = 1e-3
    var_steps: int = 500
    var_lr: float = 0.0
    var_scale: float | None = None
    var_tolerance: float = 0.05
    perturb_at: int = 0
    normalize: bool = True
    delta_eps: float | None = None
    shift_weight: float | None = None
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    chunk_size: int = 8
    overwrite: bool = False


@dataclass
class ScoringState:
    """Everything a run accumulates: both Fisher sums, the applied shift, and how far it got (image index)."""

    clean: FisherAccumulator
    shifted: FisherAccumulator
    shift_magnitude_sum: float = 0.0
    next_image: int = 0

    def state_dict(self) -> dict:
        return {"clean": self.clean.state_dict(), "shifted": self.shifted.state_dict(),
                "shift_magnitude_sum": self.shift_magnitude_sum, "next_image": self.next_image}

    def load_state_dict(self, state: dict) -> None:
        self.clean.load_state_dict(state["clean"])
        self.shifted.load_state_dict(state["shifted"])
        self.shift_magnitude_sum = float(state["shift_magnitude_sum"])
        self.next_image = int(state["next_image"])


@dataclass
class ScoreResult:
    scores: dict[str, dict[str, torch.Tensor]]
    metadata: dict
    head_path: Path
    notes: list[str] = field(default_factory=list)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FisherscanError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise FisherscanError(f"--device {name}: use auto, cpu or cuda")
    return torch.device(name)


def check_config(config: ScoreConfig) -> None:
    """Option mistakes, found before any work is done."""
    if config.estimator not in ESTIMATORS:
        raise FisherscanError(f"--estimator {config.estimator}: use one of {', '.join(ESTIMATORS)}")
    if config.gamma <= 0 or config.tau <= 0 or config.var_steps < 1 or not 0 <= config.var_lr < 1:
        raise FisherscanError("--gamma and --tau must be > 0, --var-steps >= 1 and 0 <= --var-lr < 1")
    if config.labels not in LABEL_MODES:
        raise FisherscanError(f"--labels {config.labels}: use one of {', '.join(LABEL_MODES)}")
    for option, value in (("--batch-size", config.batch_size), ("--crop", config.crop), ("--chunk-size", config.chunk_size)):
        if value < 1:
            raise FisherscanError(f"{option} {value}: must be at least 1")
    if config.warmup_steps < 0:
        raise FisherscanError(f"--warmup-steps {config.warmup_steps}: must be 0 or more")
    if config.head is None and config.warmup_steps > 0 and not (math.isfinite(config.warmup_lr) and config.warmup_lr > 0):
        raise FisherscanError(f"--warmup-lr {config.warmup_lr}: must be a finite number > 0")
    if config.shift_weight is not None and not (math.isfinite(config.shift_weight) and config.shift_weight >= 0):
        raise FisherscanError(f"--shift-weight {config.shift_weight}: must be a finite number >= 0")
    if config.delta_eps is not None and not (math.isfinite(config.delta_eps) and config.delta_eps > 0):
        raise FisherscanError(f"--delta-eps {config.delta_eps}: must be a finite number > 0")
    if config.images is not None and config.images < 1:
        raise FisherscanError(f"--images {config.images}: must be at least 1 (leave it out to score every image)")
    if Path(config.out).exists() and not config.overwrite:
        raise FisherscanError(f"--out {config.out} exists; pass --overwrite to replace it or choose another --out")
    if str(config.out).endswith(".head.safetensors") or not str(config.out).endswith(".safetensors"):
        raise FisherscanError(f"--out {config.out}: name the scores file <name>.safetensors")
    if not Path(config.out).resolve().parent.is_dir():
        raise FisherscanError(f"--out {config.out}: folder {Path(config.out).parent} does not exist; create it first")


def progress_bar(console: Console | None) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, disable=console is None, transient=False)


def warm_up_decoder(segmenter: Segmenter, loader, steps: int, lr: float, device: torch.device,
                    autocast: bool, progress: Progress, reuse_limit: int = 256) -> float:
    """Algorithm 1 step 1: train the decoder with the backbone frozen (mean pixel cross-entropy, Eq. 1).

    The crops are the same on every pass and the backbone is frozen, so when the warm-up passes over a small
    data set (at most ``reuse_limit`` images) more than once, the backbone features of the first pass are kept.
    """
    optimizer = torch.optim.AdamW(segmenter.decoder.parameters(), lr=lr, weight_decay=0.0)
    task = progress.add_task("warm-up decoder", total=steps, rate="")
    loss_value = float("nan")
    per_pass = len(loader)
    reuse = steps > per_pass and len(loader.dataset) <= reuse_limit
    kept: list[tuple[tuple, torch.Tensor]] = []
    batches = itertools.chain.from_iterable(itertools.repeat(loader))
    for step in range(steps):
        if reuse and step >= per_pass:
            features, y = kept[step % per_pass]
        else:
            x, y, _ = next(batches)
            x, y = x.to(device), y.to(device)
            with torch.no_grad(), torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                features = segmenter.features(x)
            if reuse:
                kept.append((features, y))
        logits = upsample_logits(segmenter.decode(features), tuple(y.shape[-2:]))
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
        loss_value = loss.item()
        progress.update(task, advance=1, rate=f"loss {loss_value:.3f}")
    return loss_value


def label_uniforms(config: ScoreConfig, y: torch.Tensor, indices: list[int], visit: int = 0) -> torch.Tensor | None:
    """Each image's uniforms for sampled labels, keyed on (seed, image index, visit); None for given labels."""
    if config.labels != "sampled":
        return None
    return torch.stack([torch.rand(y.shape[-2:], generator=keyed_generator(config.seed, i, "labels", visit))
                        for i in indices])


def prepare_shift(segmenter: Segmenter, shift: TokenShift, x: torch.Tensor, indices: list[int],
                  config: ScoreConfig) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """Set Eq. 6's batch spread on ``shift``; return each image's eps draws (keyed on (seed, image index)) and
    the sum over images of the mean relative shift s they apply."""
    tokens = block_input(segmenter, x, config.perturb_at)[:, segmenter.backbone.num_prefix_tokens:].float()
    shift.spread = statistic_spread(*channel_statistics(tokens))
    draws = [draw_eps(1, tokens.shape[-1], keyed_generator(config.seed, i, "shift")) for i in indices]
    eps = (torch.cat([d[0] for d in draws]).to(x.device), torch.cat([d[1] for d in draws]).to(x.device))
    _, magnitude = shift_statistics(tokens, *eps, *shift.spread)
    return eps, float(magnitude.mean(dim=1).sum())


def score_batch(segmenter: Segmenter, state: ScoringState, shift: TokenShift, x: torch.Tensor, y: torch.Tensor,
                indices: list[int], config: ScoreConfig, autocast_dtype: torch.dtype | None) -> None:
    """F(x) and F(x') (Eq. 9) of one batch into ``state``; all draws keyed on (seed, image index)."""
    uniforms = label_uniforms(config, y, indices)
    common = dict(ignore_index=IGNORE_INDEX, chunk_size=config.chunk_size, autocast_dtype=autocast_dtype)
    state.clean.add(squared_gradient_sum(segmenter, x, y, uniforms, **common), len(indices))
    eps, magnitude = prepare_shift(segmenter, shift, x, indices, config)
    state.shift_magnitude_sum += magnitude
    state.shifted.add(squared_gradient_sum(segmenter, x, y, uniforms, shift=shift, shift_eps=eps, **common),
                      len(indices))


def run_diagonal(segmenter: Segmenter, loader, config: ScoreConfig, device: torch.device,
                 autocast_dtype: torch.dtype | None, progress: Progress) -> tuple[dict, dict, float, dict]:
    """The exact diagonal estimator over every image once: (F(x), F(x'), mean shift s, extra metadata)."""
    shapes = {name: p.shape for name, p in segmenter.backbone.named_parameters()}
    state = ScoringState(FisherAccumulator({f"backbone.{n}": s for n, s in shapes.items()}),
                         FisherAccumulator({f"backbone.{n}": s for n, s in shapes.items()}))
    shift = TokenShift(segmenter, config.perturb_at)
    task = progress.add_task("score F(x), F(x')", total=len(loader.dataset), rate="")
    started = time.perf_counter()
    for x, y, indices in loader:
        score_batch(segmenter, state, shift, x.to(device), y.to(device), [int(i) for i in indices], config,
                    autocast_dtype)
        state.next_image += len(indices)
        rate = state.next_image / max(time.perf_counter() - started, 1e-9)
        progress.update(task, advance=len(indices), rate=f"{rate:.2f} img/s")
    magnitude = state.shift_magnitude_sum / max(state.shifted.images, 1)
    return state.clean.fisher(), state.shifted.fisher(), magnitude, {"images": state.clean.images}


def cycle(loader) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, list[int]]]:
    """(visit, x, y, indices) for ever, re-iterating the loader (so no batch is held in memory)."""
    visit = 0
    while True:
        for x, y, indices in loader:
            yield visit, x, y, [int(i) for i in indices]
        visit += 1


def run_variational(segmenter: Segmenter, loader, config: ScoreConfig, device: torch.device,
                    autocast_dtype: torch.dtype | None, progress: Progress) -> tuple[dict, dict, float, dict]:
    """Eq. 10-14 on source batches (Lambda_x) and on the same batches with Eq. 6 applied (Lambda_x')."""
    means = trainable_parameters(segmenter)
    scale = float(config.var_scale if config.var_scale is not None else len(loader.dataset))
    shift = TokenShift(segmenter, config.perturb_at)
    fits, magnitudes = {}, []
    for kind, shifted in (("clean", False), ("shift", True)):
        batches = cycle(loader)
        task = progress.add_task(f"variational Lambda_x{chr(39) if shifted else ''}", total=config.var_steps, rate="")

        def next_batch(step, batches=batches, shifted=shifted):
            visit, x, y, indices = next(batches)
            x, y = x.to(device), y.to(device)
            if shifted:
                shift.eps, magnitude = prepare_shift(segmenter, shift, x, indices, config)
                magnitudes.append(magnitude / len(indices))
            return x, y, label_uniforms(config, y, indices, visit)

        def on_step(step, terms, task=task):
            progress.update(task, advance=1, rate=f"E[loss] {terms['expected_loss']:.3g} KL {terms['kl']:.3g}")

        losses = segmentation_losses(segmenter, next_batch, ignore_index=IGNORE_INDEX, autocast_dtype=autocast_dtype)
        with shift if shifted else contextlib.nullcontext():
            fits[kind] = fit_precision(losses, means, gamma=config.gamma, tau=config.tau, steps=config.var_steps,
                                       lr=config.var_lr, scale=scale, tolerance=config.var_tolerance,
                                       generator=torch.Generator().manual_seed(config.seed), on_step=on_step)
    extra = {
        "precision": fits["clean"].precision, "precision_shift": fits["shift"].precision,
        "variational": {"gamma": config.gamma, "tau": config.tau, "steps": config.var_steps, "lr": config.var_lr,
                        "likelihood_scale": scale,
                        "final_terms": {kind: fit.terms for kind, fit in fits.items()},
                        "relative_change_last_10pct": {kind: fit.relative_change for kind, fit in fits.items()},
                        "converged": {kind: fit.converged for kind, fit in fits.items()},
                        "update": "natural-gradient steps of Eq. 11 in the precision, antithetic reparameterized "
                                  "curvature; F = gamma * (Lambda - tau^-2) / s (Eq. 14), clamped at 0"},
        "images": len(loader.dataset),
    }
    magnitude = sum(magnitudes) / max(len(magnitudes), 1)
    return fits["clean"].fisher, fits["shift"].fisher, magnitude, extra


def combine(f_clean: dict, f_shift: dict, magnitude: float, config: ScoreConfig,
            candidates: list[str]) -> tuple[dict, dict]:
    """Eq. 5 and Eq. 7 with FISHERTUNE.md's normalisation, relative eps and shift weight."""
    weight = config.shift_weight if config.shift_weight is not None else shift_weight(magnitude)
    eps = config.delta_eps if config.delta_eps is not None else (1e-3 if config.normalize else 1e-8)
    scale = fisher_scale(f_clean, candidates) if config.normalize else 1.0
    if scale <= 0:
        raise FisherscanError("F(x) is zero on every candidate parameter; check the labels and --warmup-steps")
    delta = delta_fisher({n: v / scale for n, v in f_clean.items()}, {n: v / scale for n, v in f_shift.items()}, eps)
    drfim = dr_fim(f_clean, f_shift, weight, normalize=config.normalize, candidates=candidates, eps=eps)
    scores = {"fim": f_clean, "fim_shift": f_shift, "delta": delta, "drfim": drfim}
    terms = {"normalization": {"mode": "candidate-mean" if config.normalize else "none", "scale": scale},
             "delta_eps": eps,
             "shift": {"magnitude": magnitude, "weight": weight, "weight_overridden": config.shift_weight is not None,
                       "definition": "s = mean over images and channels of (|alpha-mu| + |beta-sigma|) / sigma; "
                                     "weight = exp(-s)"}}
    return scores, terms


def run_score(config: ScoreConfig, console: Console | None = None) -> ScoreResult:
    """Run the whole ``score`` job and write ``config.out`` (+ the head beside it)."""
    check_config(config)
    device = resolve_device(config.device)
    torch.manual_seed(config.seed)
    layout, pairs = find_pairs(config.data, config.layout, config.split)
    pairs = select_images(pairs, config.images, config.seed)
    validate_pairs(pairs)

    backbone = build_backbone(config.model, weights=config.weights, random_init=config.random_init)
    segmenter = Segmenter(backbone.model, NUM_CLASSES, config.decoder).to(device).eval()
    depth = len(segmenter.backbone.blocks)
    if not 0 <= config.perturb_at < depth:
        raise FisherscanError(f"--perturb-at {config.perturb_at}: the model has blocks 0..{depth - 1}")
    mean, std = backbone.model.pretrained_cfg.get("mean"), backbone.model.pretrained_cfg.get("std")
    dataset = SegmentationDataset(pairs, config.crop, pad_multiple=backbone.patch_size, seed=config.seed,
                                  **({"mean": mean, "std": std} if mean and std else {}))
    loader = make_loader(dataset, config.batch_size, config.workers)
    autocast = device.type == "cuda"
    notes = []
    if backbone.random_init:
        notes.append("the backbone is randomly initialised (--random-init): these scores describe no pretrained model")
    if len(pairs) == 1 or config.batch_size == 1:
        notes.append("batches of one image have no batch spread: Eq. 6 applies no shift, so F(x') = F(x)")

    head_out = head_path_for(config.out)
    with progress_bar(console) as progress:
        for p in segmenter.parameters():
            p.requires_grad_(False)
        if config.head is not None:
            head_info = load_head(config.head, segmenter)
            warmup = {"source": str(config.head), "loaded": head_info}
        else:
            for p in segmenter.decoder.parameters():
                p.requires_grad_(True)
            final_loss = warm_up_decoder(segmenter, loader, config.warmup_steps, config.warmup_lr, device, autocast, progress)
            for p in segmenter.decoder.parameters():
                p.requires_grad_(False)
            warmup = {"steps": config.warmup_steps, "lr": config.warmup_lr, "final_loss": final_loss}

        for p in segmenter.backbone.parameters():
            p.requires_grad_(True)
        estimate = run_diagonal if config.estimator == "diagonal" else run_variational
        f_clean, f_shift, magnitude, extra = estimate(segmenter, loader, config, device,
                                                      torch.bfloat16 if autocast else None, progress)

    groups = parameter_groups(segmenter.backbone.named_parameters())
    candidates = candidate_names(groups)

    def strip(by_name: dict) -> dict:  # backbone names, on the CPU
        return {name.removeprefix("backbone."): value.cpu() for name, value in by_name.items()}

    scores, terms = combine(strip(f_clean), strip(f_shift), magnitude, config, candidates)
    if config.estimator == "variational":
        scores["precision"], scores["precision_shift"] = strip(extra["precision"]), strip(extra["precision_shift"])
        terms["variational"] = extra["variational"]
        for kind, converged in extra["variational"]["converged"].items():
            if not converged:
                notes.append(f"the {kind} precision has not converged (mean relative change "
                             f"{extra['variational']['relative_change_last_10pct'][kind]:.3f} over the last 10% of "
                             f"steps > {config.var_tolerance}); raise --var-steps")

    metadata = {
        "fisherscan_version": __version__,
        "model": config.model,
        "timm_architecture": backbone.timm_name,
        "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256,
        "random_init": backbone.random_init,
        "estimator": config.estimator,
        "images": extra["images"],
        "seed": config.seed,
        "labels": config.labels,
        "loss_reduction": "per image: sum of pixel cross-entropy over valid pixels (ignore 255 and padding); "
                          "F = mean over images of the squared per-image gradient (Eq. 9)",
        **terms,
        "perturbation": {"site": f"input of block {config.perturb_at}", "block": config.perturb_at,
                         "tokens": "patch tokens; prefix tokens untouched", "variance": "unbiased", "eps": 1e-6,
                         "batch_spread": "detached", "batch_size": config.batch_size},
        "crop": config.crop,
        "padding": {"pad_to_multiple_of": backbone.patch_size, "padded_size": padded_size(config.crop, backbone.patch_size),
                    "rule": "random crop (smaller images padded), then pad bottom/right with 0 (image) and 255 (label); "
                            "native patch size kept, position embeddings interpolated at run time"},
        "decoder": config.decoder,
        "head": str(head_out),
        "warmup": warmup,
        "data": {"path": str(config.data), "layout": layout, "split": config.split},
        "num_classes": NUM_CLASSES,
        "device": device.type,
        "autocast": "bfloat16" if autocast else None,
        "options": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()},
        "notes": notes,
    }
    save_scores(config.out, scores, metadata)
    save_head(head_out, segmenter, {"model": config.model, "num_classes": NUM_CLASSES, "scores": str(config.out)})
    return ScoreResult(scores=scores, metadata=metadata, head_path=head_out, notes=notes)
