"""The ``score`` recipe: Algorithm 1 steps 1-2 with the diagonal estimator, written out top to bottom.

1. Build the backbone and a decoder; warm the decoder up with the backbone frozen (step 1), or load ``--head``.
2. For every batch of source images: F(x) and F(x') (Eq. 9) on the same images, x' by Eq. 6 at the input of
   block ``perturb_at``; labels sampled per image from a generator keyed on (seed, image index).
3. Combine into Delta F (Eq. 5) and DR-FIM (Eq. 7) with the decisions of FISHERTUNE.md; save all four kinds,
   the metadata and the warmed head.

Robustness (diagonal estimator): every ``save_every`` batches the accumulated state, the warmed head and the
options go to ``<name>.partial.safetensors`` beside the output (atomically); ``--resume`` (or a plain rerun with
the same options) continues from it, and the final file is the same, byte for byte, as an uninterrupted run's.
A batch whose squared-gradient sums are not finite is skipped and counted (``bad_batches``). The variational
estimator saves its fit (Lambda, the noise stream, the step) the same way, every ``save_every`` steps.
``skip_bad`` leaves unreadable or invalid image/label pairs out (decided once, before the run; listed in the
metadata).
"""

from __future__ import annotations

import contextlib
import dataclasses
import itertools
import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from . import __version__, distributed
from .data import (NUM_CLASSES, IGNORE_INDEX, SegmentationDataset, check_pairs, find_pairs, make_loader, padded_size,
                   select_images, skipped_note)
from .config import RunConfig
from .errors import FisherscanError
from .fisher import (LABEL_MODES, FisherAccumulator, dr_fim_terms, shift_weight,
                     squared_gradient_sum, trainable_parameters)
from .groups import candidate_names, parameter_groups
from .models import build_backbone
from .perturb import TokenShift, block_input, channel_statistics, draw_eps, shift_statistics, statistic_spread
from .rng import keyed_generator
from .scores import atomic_target, save_scores
from .segmenter import Segmenter, float_features, head_path_for, load_head, save_head
from .faults import injected_delay
from .variational import VariationalResult, fit_precision, precision_to_fisher, segmentation_losses

ESTIMATORS = ("diagonal", "variational")


@dataclass(kw_only=True)
class ScoreConfig(RunConfig):
    """Every option of ``fisherscan score`` (the shared ones in ``config.RunConfig``); the metadata records them all."""

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
    chunk_size: int = 8


# options that may change between a stopped run and its continuation: none of them changes the scores
FREE_OPTIONS = ("workers", "device", "overwrite", "resume", "stop_after", "save_every", "max_bad_frac")
# run control, left out of the scores file's options so a continued run writes the same file as an uninterrupted one
RUN_CONTROL = ("resume", "stop_after", "save_every")
PARTIAL_KEY = "fisherscan_partial"


@dataclass
class ScoringState:
    """Everything a run accumulates: both Fisher sums, the applied shift, how far it got (image index) and how
    many batches were skipped for non-finite gradients."""

    clean: FisherAccumulator
    shifted: FisherAccumulator
    shift_magnitude_sum: float = 0.0
    next_image: int = 0
    bad_batches: int = 0

    def state_dict(self) -> dict:
        return {"clean": self.clean.state_dict(), "shifted": self.shifted.state_dict(),
                "shift_magnitude_sum": self.shift_magnitude_sum, "next_image": self.next_image,
                "bad_batches": self.bad_batches}

    def load_state_dict(self, state: dict) -> None:
        self.clean.load_state_dict(state["clean"])
        self.shifted.load_state_dict(state["shifted"])
        self.shift_magnitude_sum = float(state["shift_magnitude_sum"])
        self.next_image = int(state["next_image"])
        self.bad_batches = int(state.get("bad_batches", 0))


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
    if config.save_every < 1:
        raise FisherscanError(f"--save-every {config.save_every}: must be at least 1")
    if config.stop_after is not None and config.stop_after < 1:
        raise FisherscanError(f"--stop-after {config.stop_after}: must be at least 1")
    if not (math.isfinite(config.max_bad_frac) and 0 <= config.max_bad_frac <= 1):
        raise FisherscanError(f"--max-bad-frac {config.max_bad_frac}: must lie in [0, 1]")
    if Path(config.out).exists() and not config.overwrite:
        raise FisherscanError(f"--out {config.out} exists; pass --overwrite to replace it or choose another --out")
    if str(config.out).endswith((".head.safetensors", ".partial.safetensors")) or not str(config.out).endswith(".safetensors"):
        raise FisherscanError(f"--out {config.out}: name the scores file <name>.safetensors")
    if not Path(config.out).resolve().parent.is_dir():
        raise FisherscanError(f"--out {config.out}: folder {Path(config.out).parent} does not exist; create it first")
    if not os.access(Path(config.out).resolve().parent, os.W_OK):
        raise FisherscanError(f"--out {config.out}: folder {Path(config.out).parent} is not writable; choose another "
                              "--out or fix its permissions")


def progress_bar(console: Console | None) -> Progress:
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, disable=console is None, transient=False)


def warm_up_decoder(segmenter: Segmenter, loader, steps: int, lr: float, device: torch.device,
                    autocast: bool, progress: Progress, reuse_limit: int = 256) -> float:
    """Algorithm 1 step 1: train the decoder with the backbone frozen (its training loss: mean pixel
    cross-entropy, Eq. 1, or Mask2Former's matched set loss).

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
        loss = segmenter.loss(float_features(features), y)
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
                  config: ScoreConfig, spread: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """Set Eq. 6's batch spread on ``shift`` (``spread`` when given: that of the global batch under torchrun);
    return each image's eps draws (keyed on (seed, image index)) and the sum over images of the mean relative
    shift s they apply."""
    tokens = block_input(segmenter, x, config.perturb_at)[:, getattr(segmenter.backbone, 'num_prefix_tokens', 0):].float()
    shift.spread = spread if spread is not None else statistic_spread(*channel_statistics(tokens))
    draws = [draw_eps(1, tokens.shape[-1], keyed_generator(config.seed, i, "shift")) for i in indices]
    eps = (torch.cat([d[0] for d in draws]).to(x.device), torch.cat([d[1] for d in draws]).to(x.device))
    _, magnitude = shift_statistics(tokens, *eps, *shift.spread)
    return eps, float(magnitude.mean(dim=1).sum())


def all_finite(sums: dict[str, torch.Tensor]) -> bool:
    """True when every element of every tensor is finite (one device sync)."""
    if not sums:
        return True
    return bool(torch.stack([v.isfinite().all() for v in sums.values()]).all())


def score_batch(segmenter: Segmenter, state: ScoringState, shift: TokenShift, x: torch.Tensor, y: torch.Tensor,
                indices: list[int], config: ScoreConfig, autocast_dtype: torch.dtype | None,
                spread: tuple[torch.Tensor, torch.Tensor] | None = None) -> bool:
    """F(x) and F(x') (Eq. 9) of one batch into ``state``; all draws keyed on (seed, image index); ``spread``:
    Eq. 6's batch spread when computed elsewhere (``fisherscan.sharding``).

    Returns False, and adds nothing, when the batch's squared-gradient sums (or its shift) are not finite.
    """
    uniforms = label_uniforms(config, y, indices)
    common = dict(ignore_index=IGNORE_INDEX, chunk_size=config.chunk_size, autocast_dtype=autocast_dtype)
    clean = squared_gradient_sum(segmenter, x, y, uniforms, **common)
    if not all_finite(clean):
        return False
    eps, magnitude = prepare_shift(segmenter, shift, x, indices, config, spread)
    if not math.isfinite(magnitude):
        return False
    shifted = squared_gradient_sum(segmenter, x, y, uniforms, shift=shift, shift_eps=eps, **common)
    if not all_finite(shifted):
        return False
    state.clean.add(clean, len(indices))
    state.shift_magnitude_sum += magnitude
    state.shifted.add(shifted, len(indices))
    return True


def new_state(segmenter: Segmenter) -> ScoringState:
    shapes = {f"backbone.{n}": p.shape for n, p in segmenter.backbone.named_parameters()}
    return ScoringState(FisherAccumulator(shapes), FisherAccumulator(shapes))


def run_diagonal(segmenter: Segmenter, loader, config: ScoreConfig, device: torch.device,
                 autocast_dtype: torch.dtype | None, progress: Progress, state: ScoringState | None = None,
                 save=None) -> tuple[dict | None, dict | None, float, dict]:
    """The exact diagonal estimator over every image once: (F(x), F(x'), mean shift s, extra metadata).

    It starts at ``state.next_image`` (a continued run; the order is fixed, so the remaining batches are the
    ones an uninterrupted run would see) and calls ``save(state)`` every ``config.save_every`` batches. After
    ``config.stop_after`` batches of this run it stops: F(x) and F(x') are None and ``extra["stopped"]`` is True.
    """
    state = state if state is not None else new_state(segmenter)
    dataset = loader.dataset
    total = len(dataset)
    batches_total = math.ceil(total / config.batch_size)
    allowed_bad = config.max_bad_frac * batches_total
    if state.next_image % config.batch_size:
        raise FisherscanError(f"the partial file stopped at image {state.next_image}, not at a batch boundary of "
                              f"--batch-size {config.batch_size}; delete it or pass --overwrite")
    if state.next_image > 0:
        rest = torch.utils.data.Subset(dataset, range(state.next_image, total))
        loader = make_loader(rest, config.batch_size, config.workers)
    shift = TokenShift(segmenter, config.perturb_at)
    task = progress.add_task("score F(x), F(x')", total=total, completed=state.next_image, rate="")
    started, done_here, images_here = time.perf_counter(), 0, 0
    extra = {"batches_total": batches_total, "stopped": False}
    for x, y, indices in loader:
        indices = [int(i) for i in indices]
        if not score_batch(segmenter, state, shift, x.to(device), y.to(device), indices, config, autocast_dtype):
            state.bad_batches += 1
            message = (f"batch of images {indices[0]}..{indices[-1]}: non-finite loss or gradient, skipped "
                       f"({state.bad_batches} bad of {batches_total} batches)")
            if not progress.disable:
                progress.console.print(f"[yellow]warning:[/] {message}", highlight=False)
            if state.bad_batches > allowed_bad:
                raise FisherscanError(f"{state.bad_batches} of {batches_total} batches had non-finite losses or "
                                      f"gradients (more than --max-bad-frac {config.max_bad_frac}); check the "
                                      f"weights, the data and --warmup-lr")
        state.next_image += len(indices)
        injected_delay()
        done_here, images_here = done_here + 1, images_here + len(indices)
        rate = images_here / max(time.perf_counter() - started, 1e-9)
        progress.update(task, advance=len(indices), rate=f"{rate:.2f} img/s")
        unfinished = state.next_image < total
        stopping = unfinished and config.stop_after is not None and done_here >= config.stop_after
        batches_done = state.next_image // config.batch_size
        if save is not None and (stopping or (unfinished and batches_done % config.save_every == 0)):
            save(state)
        if stopping:
            extra.update(stopped=True, batches_done=batches_done, images=state.clean.images,
                         bad_batches=state.bad_batches)
            return None, None, 0.0, extra
    if state.clean.images == 0:
        raise FisherscanError(f"every batch ({state.bad_batches} of {batches_total}) had non-finite losses or "
                              "gradients; check the weights, the data and --warmup-lr")
    magnitude = state.shift_magnitude_sum / max(state.shifted.images, 1)
    extra.update(images=state.clean.images, bad_batches=state.bad_batches, batches_done=batches_total)
    return state.clean.fisher(), state.shifted.fisher(), magnitude, extra


def partial_path_for(scores_path: Path) -> Path:
    """Where ``score`` keeps its resumable state: beside the scores, ``<stem>.partial.safetensors``."""
    scores_path = Path(scores_path)
    return scores_path.with_name(scores_path.name.removesuffix(".safetensors") + ".partial.safetensors")


def config_options(config: ScoreConfig) -> dict:
    """Every option as a JSON value (paths as strings, tuples as lists)."""
    return {k: (str(v) if isinstance(v, Path) else list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(config).items()}


def write_partial(path: Path, tensors: dict[str, torch.Tensor], info: dict, segmenter: Segmenter,
                  config: ScoreConfig, context: dict) -> None:
    """A stopped run's tensors, the warmed head (``head/``), its options and ``context`` (warm-up, skipped pairs)
    in one safetensors file with JSON metadata, written atomically."""
    tensors = {name: v.detach().cpu().contiguous() for name, v in tensors.items()}
    tensors.update({f"head/{n}": v.detach().cpu().contiguous().clone() for n, v in segmenter.decoder.state_dict().items()})
    info = {**info, **context, "estimator": config.estimator, "options": config_options(config),
            "fisherscan_version": __version__}
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata={PARTIAL_KEY: json.dumps(info, sort_keys=True)})


def save_partial(path: Path, state: ScoringState, segmenter: Segmenter, config: ScoreConfig, context: dict) -> None:
    """The diagonal estimator's state: both sums (``clean/``, ``shifted/``) and the counters."""
    tensors = {f"clean/{n}": v for n, v in state.clean.sums.items()}
    tensors.update({f"shifted/{n}": v for n, v in state.shifted.sums.items()})
    info = {"next_image": state.next_image, "clean_images": state.clean.images, "shifted_images": state.shifted.images,
            "shift_magnitude_sum": state.shift_magnitude_sum, "bad_batches": state.bad_batches}
    write_partial(path, tensors, info, segmenter, config, context)


def save_variational_partial(path: Path, run: dict, segmenter: Segmenter, config: ScoreConfig, context: dict) -> None:
    """The variational estimator's state: finished fits (``done_<kind>/``: Lambda), the fit in progress
    (``fit_precision/``, ``fit_snapshot/``, ``fit_noise``: the xi generator) and the shift magnitudes so far."""
    tensors, fits = {}, {}
    for kind, fit in run["fits"].items():
        tensors.update({f"done_{kind}/{n}": v for n, v in fit.precision.items()})
        fits[kind] = {"terms": fit.terms, "relative_change": fit.relative_change, "converged": fit.converged}
    fit_info = None
    if run["fit"] is not None:
        tensors.update({f"fit_precision/{n}": v for n, v in run["fit"]["precision"].items()})
        tensors.update({f"fit_snapshot/{n}": v for n, v in run["fit"]["snapshot"].items()})
        tensors["fit_noise"] = run["fit"]["noise"]
        fit_info = {k: run["fit"][k] for k in ("step", "kl", "history")}
    info = {"phase": run["phase"], "global_step": run["global_step"], "magnitudes": run["magnitudes"],
            "fits": fits, "fit": fit_info}
    write_partial(path, tensors, info, segmenter, config, context)


def read_partial_info(path: Path) -> dict:
    try:
        with safe_open(str(path), "pt") as handle:
            info = json.loads((handle.metadata() or {})[PARTIAL_KEY])
        if not isinstance(info, dict) or not isinstance(info.get("options"), dict):
            raise ValueError("no options")
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file is the user's to remove
        raise FisherscanError(f"{path}: not a readable partial scoring file ({type(error).__name__}); delete it or "
                              "pass --overwrite") from None
    return info


def changed_options(saved: dict, config: ScoreConfig) -> list[str]:
    now = {k: v for k, v in config_options(config).items() if k not in FREE_OPTIONS}
    before = {k: v for k, v in saved.items() if k not in FREE_OPTIONS}
    return sorted(k for k in set(now) | set(before) if before.get(k, None) != now.get(k, None))


def restore_head(tensors: dict, segmenter: Segmenter, path: Path) -> None:
    head = {n[len("head/"):]: v for n, v in tensors.items() if n.startswith("head/")}
    if set(head) != set(segmenter.decoder.state_dict()):
        raise FisherscanError(f"{path}: does not fit this model; delete it or pass --overwrite")
    with torch.no_grad():
        segmenter.decoder.load_state_dict(head)


def restore_partial(path: Path, info: dict, segmenter: Segmenter) -> ScoringState:
    """The diagonal state and the head (into ``segmenter.decoder``) saved by ``save_partial``."""
    tensors = load_file(str(path))
    state = new_state(segmenter)
    clean = {n[len("clean/"):]: v for n, v in tensors.items() if n.startswith("clean/")}
    shifted = {n[len("shifted/"):]: v for n, v in tensors.items() if n.startswith("shifted/")}
    if (set(clean) != set(state.clean.sums) or set(shifted) != set(state.shifted.sums)
            or any(clean[n].shape != state.clean.sums[n].shape for n in clean)):
        raise FisherscanError(f"{path}: does not fit this model; delete it or pass --overwrite")
    # in the model's parameter order, as an uninterrupted run holds them (the group table sums in this order)
    state.load_state_dict({"clean": {"sums": {n: clean[n] for n in state.clean.sums}, "images": info["clean_images"]},
                           "shifted": {"sums": {n: shifted[n] for n in state.shifted.sums},
                                       "images": info["shifted_images"]},
                           "shift_magnitude_sum": info["shift_magnitude_sum"], "next_image": info["next_image"],
                           "bad_batches": info.get("bad_batches", 0)})
    restore_head(tensors, segmenter, path)
    return state


def restore_variational_partial(path: Path, info: dict, segmenter: Segmenter, config: ScoreConfig,
                                scale: float) -> dict:
    """The ``resume`` argument of ``run_variational`` (and the head) from ``save_variational_partial``'s file."""
    tensors = load_file(str(path))
    means = {f"backbone.{n}": p for n, p in segmenter.backbone.named_parameters()}  # what run_variational fits

    def part(prefix: str) -> dict:  # in the model's parameter order, as an uninterrupted run holds them
        found = {n[len(prefix):]: v for n, v in tensors.items() if n.startswith(prefix)}
        return {n: found[n] for n in means if n in found} if set(found) <= set(means) else found

    fits = {}
    for kind, record in info["fits"].items():
        precision = part(f"done_{kind}/")
        if set(precision) != set(means):
            raise FisherscanError(f"{path}: does not fit this model; delete it or pass --overwrite")
        fits[kind] = VariationalResult(precision=precision, relative_change=record["relative_change"],
                                       fisher=precision_to_fisher(precision, config.gamma, config.tau, scale),
                                       terms=record["terms"], converged=record["converged"])
    fit = None
    if info["fit"] is not None:
        precision = part("fit_precision/")
        if set(precision) != set(means) or any(precision[n].shape != means[n].shape for n in means):
            raise FisherscanError(f"{path}: does not fit this model; delete it or pass --overwrite")
        fit = {**info["fit"], "precision": precision, "snapshot": part("fit_snapshot/"), "noise": tensors["fit_noise"]}
    restore_head(tensors, segmenter, path)
    return {"phase": info["phase"], "global_step": info["global_step"], "magnitudes": info["magnitudes"],
            "fits": fits, "fit": fit}


def plan_partial(config: ScoreConfig) -> tuple[Path, dict | None]:
    """Decide what to do with a partial file beside ``config.out``: (its path, its metadata when continuing)."""
    path = partial_path_for(config.out)
    exists = path.is_file()
    if config.resume:
        if not exists:
            raise FisherscanError(f"--resume: no partial file {path}; start without --resume")
    elif not exists:
        return path, None
    elif config.overwrite:
        path.unlink()
        return path, None
    info = read_partial_info(path)
    changed = changed_options(info["options"], config)
    if changed:
        shown = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
        if config.resume:
            raise FisherscanError(f"--resume: the partial file {path} was made with other options ({shown}); "
                                  "use the same options, or delete it or pass --overwrite to start afresh")
        raise FisherscanError(f"{path} holds a stopped run with other options ({shown}); continue it with the same "
                              "options and --resume, or delete it or pass --overwrite to start afresh")
    return path, info


def cycle(dataset, batch_size: int, workers: int, start: int = 0) -> Iterator[tuple[int, torch.Tensor, torch.Tensor, list[int]]]:
    """(visit, x, y, indices) for ever in dataset order from batch ``start`` on (no batch is held in memory)."""
    visit, skip = divmod(start, math.ceil(len(dataset) / batch_size))
    while True:
        part = torch.utils.data.Subset(dataset, range(skip * batch_size, len(dataset))) if skip else dataset
        for x, y, indices in make_loader(part, batch_size, workers):
            yield visit, x, y, [int(i) for i in indices]
        visit, skip = visit + 1, 0


VARIATIONAL_PHASES = ("clean", "shift")


def run_variational(segmenter: Segmenter, dataset, config: ScoreConfig, device: torch.device,
                    autocast_dtype: torch.dtype | None, progress: Progress, resume: dict | None = None,
                    save=None) -> tuple[dict | None, dict | None, float, dict]:
    """Eq. 10-14 on source batches (Lambda_x) and on the same batches with Eq. 6 applied (Lambda_x').

    The two fits take ``var_steps`` steps each, 2 x var_steps in all (the "global" steps). Every
    ``config.save_every`` global steps, and when ``config.stop_after`` steps of this run are done (then F is None
    and ``extra["stopped"]`` True), ``save(run)`` gets the state; ``resume`` (that state) continues it.
    """
    means = trainable_parameters(segmenter)
    scale = float(config.var_scale if config.var_scale is not None else len(dataset))
    shift = TokenShift(segmenter, config.perturb_at)
    resume = resume or {"phase": "clean", "global_step": 0, "magnitudes": [], "fits": {}, "fit": None}
    fits, magnitudes = dict(resume["fits"]), list(resume["magnitudes"])
    total_steps = 2 * config.var_steps
    stop_at = resume["global_step"] + config.stop_after if config.stop_after is not None else None

    def stopped(global_step: int):
        return None, None, 0.0, {"stopped": True, "batches_done": global_step, "batches_total": total_steps}

    for phase, kind in enumerate(VARIATIONAL_PHASES):
        if kind in fits:
            continue
        shifted, offset = kind == "shift", phase * config.var_steps
        fit_state = resume["fit"] if resume["phase"] == kind else None
        first = int(fit_state["step"]) if fit_state is not None else 0
        batches = cycle(dataset, config.batch_size, config.workers, first)
        task = progress.add_task(f"variational Lambda_x{chr(39) if shifted else ''}", total=config.var_steps,
                                 completed=first, rate="")

        def next_batch(step, batches=batches, shifted=shifted):
            visit, x, y, indices = next(batches)
            x, y = x.to(device), y.to(device)
            if shifted:
                shift.eps, magnitude = prepare_shift(segmenter, shift, x, indices, config)
                magnitudes.append(magnitude / len(indices))
            return x, y, label_uniforms(config, y, indices, visit)

        def on_step(step, terms, task=task):
            progress.update(task, advance=1, rate=f"E[loss] {terms['expected_loss']:.3g} KL {terms['kl']:.3g}")
            injected_delay()

        def checkpoint(done, get_state, kind=kind, offset=offset):
            stopping = stop_at is not None and offset + done >= stop_at
            if save is not None and (stopping or (offset + done) % config.save_every == 0):
                save({"phase": kind, "global_step": offset + done, "magnitudes": magnitudes, "fits": fits,
                      "fit": get_state()})
            return stopping

        losses = segmentation_losses(segmenter, next_batch, ignore_index=IGNORE_INDEX, autocast_dtype=autocast_dtype)
        with shift if shifted else contextlib.nullcontext():
            fit = fit_precision(losses, means, gamma=config.gamma, tau=config.tau, steps=config.var_steps,
                                lr=config.var_lr, scale=scale, tolerance=config.var_tolerance,
                                generator=torch.Generator().manual_seed(config.seed), on_step=on_step,
                                state=fit_state, checkpoint=checkpoint)
        if fit is None:
            return stopped(stop_at)
        fits[kind] = fit
        done = offset + config.var_steps
        stopping = stop_at is not None and done >= stop_at
        if done < total_steps and save is not None and (stopping or done % config.save_every == 0):
            save({"phase": VARIATIONAL_PHASES[phase + 1], "global_step": done, "magnitudes": magnitudes,
                  "fits": fits, "fit": None})
        if done < total_steps and stopping:
            return stopped(done)
    extra = {
        "precision": fits["clean"].precision, "precision_shift": fits["shift"].precision,
        "variational": {"gamma": config.gamma, "tau": config.tau, "steps": config.var_steps, "lr": config.var_lr,
                        "likelihood_scale": scale,
                        "final_terms": {kind: fit.terms for kind, fit in fits.items()},
                        "relative_change_last_10pct": {kind: fit.relative_change for kind, fit in fits.items()},
                        "converged": {kind: fit.converged for kind, fit in fits.items()},
                        "update": "natural-gradient steps of Eq. 11 in the precision, antithetic reparameterized "
                                  "curvature; F = gamma * (Lambda - tau^-2) / s (Eq. 14), clamped at 0"},
        "images": len(dataset),
    }
    magnitude = sum(magnitudes) / max(len(magnitudes), 1)
    return fits["clean"].fisher, fits["shift"].fisher, magnitude, extra


def combine(f_clean: dict, f_shift: dict, magnitude: float, config: ScoreConfig,
            candidates: list[str]) -> tuple[dict, dict]:
    """Eq. 5 and Eq. 7 with FISHERTUNE.md's normalisation, relative eps and shift weight."""
    weight = config.shift_weight if config.shift_weight is not None else shift_weight(magnitude)
    eps = config.delta_eps if config.delta_eps is not None else (1e-3 if config.normalize else 1e-8)
    try:
        delta, drfim, scale = dr_fim_terms(f_clean, f_shift, weight, config.normalize, candidates, eps)
    except ValueError:
        raise FisherscanError("F(x) is zero on every candidate parameter; check the labels and --warmup-steps") from None
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
    ranks, device = distributed.setup(resolve_device(config.device))
    if ranks.world > 1 and (config.estimator != "diagonal" or config.resume or config.stop_after is not None):
        distributed.teardown(ranks)
        raise FisherscanError("under torchrun, score runs --estimator diagonal without --resume/--stop-after; "
                              "run those in one process")
    console = console if ranks.main else None
    sharded = ranks.world > 1
    partial_path, partial = plan_partial(config) if not sharded else (None, None)
    torch.manual_seed(config.seed)
    layout, pairs = find_pairs(config.data, config.layout, config.split)
    pairs = select_images(pairs, config.images, config.seed)
    pairs, skipped = check_pairs(pairs, config.skip_bad)
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
    loader = make_loader(dataset, config.batch_size, config.workers)
    autocast = device.type == "cuda"
    notes = []
    if backbone.random_init:
        notes.append("the backbone is randomly initialised (--random-init): these scores describe no pretrained model")
    if skipped:
        notes.append(skipped_note(skipped, len(pairs) + len(skipped)))
    if len(pairs) == 1 or config.batch_size == 1:
        notes.append("batches of one image have no batch spread: Eq. 6 applies no shift, so F(x') = F(x)")

    head_out = head_path_for(config.out)
    run_notes = []  # about this invocation only (printed, not saved: a continued run writes the same file)
    state = None
    scale = float(config.var_scale if config.var_scale is not None else len(dataset))
    with progress_bar(console) as progress:
        for p in segmenter.parameters():
            p.requires_grad_(False)
        if partial is not None and config.estimator == "diagonal":  # head and sums from the partial file
            state = restore_partial(partial_path, partial, segmenter)
            warmup = partial["warmup"]
            run_notes.append(f"continued the stopped run in {partial_path} from image {state.next_image} of "
                             f"{len(dataset)} (its head and sums; no new warm-up)")
        elif partial is not None:  # the head and the fits so far
            state = restore_variational_partial(partial_path, partial, segmenter, config, scale)
            warmup = partial["warmup"]
            run_notes.append(f"continued the stopped run in {partial_path} from variational step "
                             f"{state['global_step']} of {2 * config.var_steps} (its head and fits; no new warm-up)")
        elif config.head is not None:
            head_info = load_head(config.head, segmenter)
            warmup = {"source": str(config.head), "loaded": head_info}
        elif ranks.main:  # under torchrun rank 0 warms up; the others receive its head below
            for p in segmenter.decoder.parameters():
                p.requires_grad_(True)
            final_loss = warm_up_decoder(segmenter, loader, config.warmup_steps, config.warmup_lr, device, autocast, progress)
            for p in segmenter.decoder.parameters():
                p.requires_grad_(False)
            warmup = {"steps": config.warmup_steps, "lr": config.warmup_lr, "final_loss": final_loss}
        else:
            warmup = {}
        if sharded:  # every rank scores the same model: rank 0's head (and initialisation)
            from .sharding import broadcast_module

            broadcast_module(segmenter, ranks)

        for p in segmenter.backbone.parameters():
            p.requires_grad_(True)
        autocast_dtype = torch.bfloat16 if autocast else None
        context = {"warmup": warmup, "skipped": skipped}
        if sharded:
            from .sharding import run_diagonal_sharded

            f_clean, f_shift, magnitude, extra = run_diagonal_sharded(segmenter, dataset, config, device,
                                                                      autocast_dtype, progress, ranks)
        elif config.estimator == "diagonal":
            def save(current: ScoringState) -> None:
                save_partial(partial_path, current, segmenter, config, context)

            f_clean, f_shift, magnitude, extra = run_diagonal(segmenter, loader, config, device, autocast_dtype,
                                                              progress, state=state, save=save)
        else:
            def save(current: dict) -> None:
                save_variational_partial(partial_path, current, segmenter, config, context)

            f_clean, f_shift, magnitude, extra = run_variational(segmenter, dataset, config, device, autocast_dtype,
                                                                 progress, resume=state, save=save)
    if extra.get("stopped"):
        unit = "batch" if config.estimator == "diagonal" else "variational step"
        plural = "es" if unit == "batch" else "s"
        run_notes.append(f"stopped after {config.stop_after} {unit}{plural if config.stop_after != 1 else ''} "
                         f"(--stop-after): {extra['batches_done']} of {extra['batches_total']} {unit}{plural} done; "
                         "continue with --resume")
        return ScoreResult(scores={}, metadata={}, head_path=head_out, notes=notes + run_notes, finished=False,
                           partial_path=partial_path, batches_done=extra["batches_done"],
                           batches_total=extra["batches_total"])
    if extra.get("bad_batches"):
        notes.append(f"{extra['bad_batches']} of {extra['batches_total']} batches had non-finite losses or gradients "
                     "and were skipped (their images are not in the scores)")

    groups = parameter_groups(segmenter.backbone.named_parameters())
    candidates = candidate_names(groups)

    def strip(by_name: dict) -> dict:  # backbone names, on the CPU
        return {name.removeprefix("backbone."): value.cpu() for name, value in by_name.items()}

    scores, terms = combine(strip(f_clean), strip(f_shift), magnitude, config, candidates)
    for kind, by_name in scores.items():  # finite batches can still overflow float32 when summed
        if not all_finite(by_name):
            raise FisherscanError(f"the {kind} scores are not finite (float32 overflow of the gradient sums); "
                                  "check the weights and --warmup-lr")
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
        "bad_batches": extra.get("bad_batches"),
        "skipped_pairs": skipped,
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
        "world_size": ranks.world,
        "autocast": "bfloat16" if autocast else None,
        "options": {k: v for k, v in config_options(config).items() if k not in RUN_CONTROL},
        "notes": notes,
    }
    if ranks.main:  # one writer
        save_scores(config.out, scores, metadata)
        save_head(head_out, segmenter, {"model": config.model, "num_classes": NUM_CLASSES, "scores": str(config.out)})
    if partial_path is not None and partial_path.exists():
        partial_path.unlink()
    distributed.barrier(ranks)
    distributed.teardown(ranks)
    return ScoreResult(scores=scores, metadata=metadata, head_path=head_out, notes=notes + run_notes,
                       partial_path=partial_path, batches_done=extra.get("batches_done", 0),
                       batches_total=extra.get("batches_total", 0), main=ranks.main)
