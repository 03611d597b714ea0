"""The ``tune`` recipe: Algorithm 1 step 3, masked segmentation fine-tuning from a scores file, written out plainly.

1. Rebuild the backbone the scores were computed on, load the head ``score`` saved (or warm one up).
2. Order the candidate elements by the strategy (``fisherscan.select``); at step t the first
   floor(f(t) * total) of them are selected (Eq. 16 as decided), a set that only grows.
3. Train the selected elements and the decoder with the decoder's training loss (Eq. 1, mean pixel
   cross-entropy; Mask2Former's matched set loss), AdamW with poly decay; every other backbone element keeps its pretrained bits (``fisherscan.optim``).
4. Save the run: ``model.safetensors`` (head + changed backbone parameters + their masks), ``manifest.json``
   (every option, the base weights and their sha256), ``log.csv`` (loss, lr, selected fraction per step), and a
   resumable ``checkpoint.safetensors`` every ``save_every`` steps; a rerun of the same command continues from it
   (or ``--resume``), to the same bits as an uninterrupted run.

A step whose loss or gradients are not finite is skipped (no optimizer update; counted as ``bad_steps``); more than
``max_bad_frac`` of the steps bad stops the run with an error. ``skip_bad`` leaves unreadable or invalid pairs out.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from rich.console import Console
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from . import __version__, distributed
from .augment import AUGMENTATIONS
from .data import NUM_CLASSES, EpochSampler, SegmentationDataset, check_pairs, find_pairs, select_images, skipped_note
from .config import RunConfig
from .errors import FisherscanError
from .evaluate import evaluate_datasets, prepare_datasets, save_results
from .faults import injected_delay
from .groups import CANDIDATE_GROUPS, GROUPS
from .models import build_backbone, sha256_of
from .optim import MaskedAdamW, poly_lr
from .rng import keyed_seed
from .scores import atomic_target, load_scores
from .scoring import progress_bar, resolve_device, warm_up_decoder
from .segmenter import Segmenter, load_head
from .select import STRATEGIES, selected_count, selection_order

@dataclass(kw_only=True)
class TuneConfig(RunConfig):
    """Every option of ``fisherscan tune`` (the shared ones in ``config.RunConfig``); the manifest records them all."""

    scores: Path
    steps: int = 1000
    accumulate: int = 1
    augment: str = "crop"
    recipe: str | None = None
    strategy: str = "scores"
    score_kind: str = "drfim"
    candidates: tuple[str, ...] = CANDIDATE_GROUPS
    delta_min: float = 0.01
    delta_max: float = 0.05
    schedule_t: float | None = None
    lr: float = 1e-4
    weight_decay: float = 0.05
    power: float = 0.9
    full_checkpoint: bool = False
    eval: tuple[Path, ...] = ()
    eval_every: int = 0
    eval_layout: str = "auto"
    eval_split: str = "val"
    eval_crop: int | None = None
    eval_stride: int | None = None
    workers: int = 2  # (RunConfig's defaults differ for tune)
    save_every: int = 100


# run control: not recorded in the manifest, so a continued run writes the same files as an uninterrupted one
RUN_CONTROL = ("resume", "stop_after")


@dataclass
class TuneResult:
    run_dir: Path
    manifest: dict
    selected: int
    total: int
    log: list[dict] = field(default_factory=list)
    finished: bool = True
    evaluation: object | None = None  # fisherscan.evaluate.EvalResult of the final model, with --eval
    notes: list[str] = field(default_factory=list)
    main: bool = True  # False on torchrun ranks other than 0: they write and print nothing


def as_json(value):
    """Options as JSON values: paths as strings, tuples as lists."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [as_json(v) for v in value]
    return value


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
        raise FisherscanError(f"--out {out} holds a finished run; pass --overwrite to replace it or choose another --out")
    if config.resume and not (out / "checkpoint.safetensors").exists():
        raise FisherscanError(f"--resume: {out} has no checkpoint.safetensors; start without --resume")
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


def save_tensors(path: Path, tensors: dict[str, torch.Tensor], info: dict) -> None:
    with atomic_target(path) as tmp:
        save_file({k: v.detach().cpu().contiguous() for k, v in tensors.items()}, str(tmp),
                  metadata={"fisherscan_run": json.dumps(info, sort_keys=True)})


def run_tune(config: TuneConfig, console: Console | None = None) -> TuneResult:
    """Run the whole ``tune`` job into ``config.out`` (a folder)."""
    check_config(config)
    resuming = continues(config)
    ranks, device = distributed.setup(resolve_device(config.device))
    console = console if ranks.main else None
    torch.manual_seed(config.seed)
    scores, score_meta = load_scores(config.scores)
    check_scored_model(score_meta, config.model, config.scores)
    layout, pairs = find_pairs(config.data, config.layout, config.split)
    pairs = select_images(pairs, config.images, config.seed)
    pairs, skipped = check_pairs(pairs, config.skip_bad)
    notes = [skipped_note(skipped, len(pairs) + len(skipped))] if skipped else []
    backbone = build_backbone(config.model, weights=config.weights, random_init=config.random_init,
                              strict=config.strict)
    segmenter = Segmenter(backbone.model, NUM_CLASSES, config.decoder, config.feature_blocks).to(device).eval()
    check_scores_match(scores, score_meta, segmenter.backbone, config.scores)
    targets = (prepare_datasets(list(config.eval), config.eval_layout, config.eval_split, skip_bad=config.skip_bad)
               if config.eval else [])
    out = Path(config.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise FisherscanError(f"--out {out}: cannot create the run folder ({error.strerror}); choose another --out") from None
    if not os.access(out, os.W_OK):
        raise FisherscanError(f"--out {out}: folder is not writable; choose another --out or fix its permissions")

    mean, std = backbone.model.pretrained_cfg.get("mean"), backbone.model.pretrained_cfg.get("std")
    dataset = SegmentationDataset(pairs, config.crop, pad_multiple=backbone.patch_size, seed=config.seed,
                                  augmentation=AUGMENTATIONS[config.augment],
                                  **({"mean": mean, "std": std} if mean and std else {}))
    autocast = device.type == "cuda"

    # selection order, the flat mask whose prefix grows, and per-parameter views into it
    try:
        names, order = selection_order(scores, config.strategy, config.candidates, config.seed, config.score_kind)
    except ValueError as error:
        raise FisherscanError(f"--strategy {config.strategy} / --score-kind {config.score_kind}: {error}") from None
    params = dict(segmenter.backbone.named_parameters())
    total = sum(p.numel() for p in params.values())
    sizes = [params[n].numel() for n in names]
    flat_mask = torch.zeros(total, dtype=torch.bool, device=device)
    masks = dict(zip(names, (piece.view(params[n].shape) for n, piece in zip(names, flat_mask.split(sizes)))))

    def count_at(step: int) -> int:
        if config.strategy == "full":
            return order.numel()
        if config.strategy == "freeze":
            return 0
        # updates 0 .. steps-1: the first uses delta_min, the last delta_max exactly
        return min(order.numel(), selected_count(step, config.steps - 1, total, config.delta_min, config.delta_max,
                                                 config.schedule_t))

    final_count = count_at(config.steps - 1)
    final_mask = torch.zeros(total, dtype=torch.bool)
    final_mask[order[:final_count]] = True
    touched = [n for n, piece in zip(names, final_mask.split(sizes)) if piece.any()]
    for name, p in params.items():
        p.requires_grad_(name in touched)
    backbone_opt = MaskedAdamW({n: params[n] for n in touched}, masks, weight_decay=config.weight_decay)
    decoder_params = dict(segmenter.decoder.named_parameters())
    decoder_opt = MaskedAdamW(decoder_params, {n: torch.ones_like(p, dtype=torch.bool) for n, p in decoder_params.items()},
                              weight_decay=config.weight_decay)

    manifest = {
        "fisherscan_version": __version__, "kind": "tune-run",
        "model": config.model, "timm_architecture": backbone.timm_name, "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256, "random_init": backbone.random_init,
        "scores": str(config.scores), "scores_model": score_meta.get("model"),
        "data": {"path": str(config.data), "layout": layout, "split": config.split, "images": len(pairs)},
        "skipped_pairs": skipped,
        "selection": {"strategy": config.strategy, "score_kind": config.score_kind, "candidates": list(config.candidates),
                      "total_backbone_elements": total, "final_selected": final_count,
                      "schedule": "f(t) = dmin + (dmax - dmin) (1 - exp(-t/T)) / (1 - exp(-T3/T)), T = T3/3 default"},
        "optimizer": {"name": "AdamW, masked (unselected elements bit-identical)", "lr": config.lr,
                      "weight_decay": config.weight_decay, "poly_power": config.power},
        "decoder": config.decoder, "num_classes": NUM_CLASSES, "crop": config.crop, "world_size": ranks.world,
        "options": {k: as_json(v) for k, v in dataclasses.asdict(config).items() if k not in RUN_CONTROL},
    }

    start_step, log_rows, bad_steps = 0, [], 0
    checkpoint_path = out / "checkpoint.safetensors"
    with progress_bar(console) as progress:
        if resuming:
            start_step, log_rows, info = restore_checkpoint(checkpoint_path, segmenter, backbone_opt, decoder_opt,
                                                            touched, manifest)
            bad_steps = int(info.get("bad_steps", 0))
            if info.get("head") is not None:
                manifest["head"] = info["head"]
            if not config.resume:
                notes.append(f"continued the stopped run in {out} from step {start_step} of {config.steps} "
                             "(pass --overwrite to start afresh)")
        else:
            if checkpoint_path.exists() and ranks.main:  # --overwrite: a stale checkpoint must not be continued
                checkpoint_path.unlink()
            head_path = config.head or (Path(score_meta["head"]) if score_meta.get("head") else None)
            if head_path is not None and Path(head_path).is_file():
                load_head(head_path, segmenter)
                manifest["head"] = str(head_path)
            else:
                warm_loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, shuffle=False,
                                                          num_workers=config.workers)
                frozen = [p for p in segmenter.backbone.parameters() if p.requires_grad]
                for p in frozen:
                    p.requires_grad_(False)
                warm_up_decoder(segmenter, warm_loader, config.warmup_steps, 1e-3, device, autocast, progress)
                for p in frozen:
                    p.requires_grad_(True)
                manifest["head"] = f"warmed up for {config.warmup_steps} steps"
        flat_mask[order[:count_at(start_step)]] = True

        draws_per_step = config.batch_size * config.accumulate * ranks.world  # the global batch of one step
        sampler = EpochSampler(len(dataset), config.seed, start=start_step * draws_per_step,
                               total=config.steps * draws_per_step, shard=(ranks.rank, ranks.world))
        loader = torch.utils.data.DataLoader(dataset, batch_size=config.batch_size, sampler=sampler,
                                             num_workers=config.workers)
        forward = segmenter
        if ranks.world > 1:  # gradients averaged over ranks; masks and optimizer steps are the same on every rank
            forward = torch.nn.parallel.DistributedDataParallel(
                segmenter, device_ids=[device.index] if device.type == "cuda" else None)
        task = progress.add_task("tune", total=config.steps, completed=start_step, rate="")
        step, micro, running = start_step, 0, 0.0
        for x, y, _ in loader:
            x, y = x.to(device), y.to(device)
            # the global RNG (the matched loss's random points) keyed on the step: a resumed run draws the same
            torch.manual_seed(keyed_seed(config.seed, step, "points", ranks.rank * config.accumulate + micro))
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = forward(x, y)  # the decoder's training loss (Segmenter.loss), fp32
            (loss / config.accumulate).backward()  # on every rank, also when not finite: DDP must all-reduce
            running += loss.item() / config.accumulate
            micro += 1
            if micro < config.accumulate:
                continue
            lr = poly_lr(config.lr, step, config.steps, config.power)
            flat_mask[order[:count_at(step)]] = True  # Eq. 16: the selection for this step (only grows)
            running = distributed.mean_over_ranks(running, ranks, device)
            finite = math.isfinite(running) and grads_finite(segmenter)  # all-reduced: the same on every rank
            if finite:
                backbone_opt.step(lr)
                decoder_opt.step(lr)
            else:  # skipped: no update, moments and step counts untouched
                bad_steps += 1
                if console is not None:
                    console.print(f"[yellow]warning:[/] step {step + 1}: non-finite loss or gradients, skipped "
                                  f"({bad_steps} bad of {config.steps} steps)", highlight=False)
                if bad_steps > config.max_bad_frac * config.steps:
                    raise FisherscanError(f"{bad_steps} of {config.steps} steps had non-finite losses or gradients "
                                          f"(more than --max-bad-frac {config.max_bad_frac}); check the weights, "
                                          f"the data and --lr")
            backbone_opt.zero_grad()
            decoder_opt.zero_grad()
            selected = int(flat_mask.sum())
            log_rows.append({"step": step + 1, "loss": running if finite else None, "lr": lr, "selected": selected,
                             "selected_fraction": selected / total})
            step, micro, running = step + 1, 0, 0.0
            shown = log_rows[-1]["loss"] if finite else float("nan")
            progress.update(task, advance=1, rate=f"loss {shown:.3f} sel {selected / total:.2%}")
            injected_delay()
            stopping = step == config.stop_after and step < config.steps  # a planned stop: resumable, unfinished
            if ranks.main and (stopping or (step % config.save_every == 0 and step < config.steps)):
                save_checkpoint(checkpoint_path, step, segmenter, backbone_opt, decoder_opt, touched, log_rows,
                                manifest, bad_steps)
            if targets and ranks.main and config.eval_every and step % config.eval_every == 0 and step < config.steps:
                evaluate_run(segmenter, targets, config, device, progress, out, f"step{step}")
            if stopping:
                distributed.barrier(ranks)
                distributed.teardown(ranks)
                return TuneResult(run_dir=out, manifest=manifest, selected=int(flat_mask.sum()), total=total,
                                  log=log_rows, finished=False, notes=notes, main=ranks.main)

    selected = int(flat_mask.sum())
    manifest["bad_steps"] = bad_steps
    if bad_steps:
        notes.append(f"{bad_steps} of {config.steps} steps had non-finite losses or gradients and were skipped")
    manifest["trainable"] = {"backbone_elements": selected, "backbone_fraction": selected / total,
                             "decoder_parameters": sum(p.numel() for p in decoder_params.values())}
    evaluation = None
    if ranks.main:  # one writer
        write_log(out / "log.csv", log_rows)
        save_run(out, segmenter, masks, touched, manifest, config.full_checkpoint)
        save_checkpoint(checkpoint_path, step, segmenter, backbone_opt, decoder_opt, touched, log_rows, manifest,
                        bad_steps)
        if targets:
            with progress_bar(console) as progress:
                evaluation = evaluate_run(segmenter, targets, config, device, progress, out, "eval")
    distributed.barrier(ranks)
    distributed.teardown(ranks)
    return TuneResult(run_dir=out, manifest=manifest, selected=selected, total=total, log=log_rows,
                      evaluation=evaluation, notes=notes, main=ranks.main)


def evaluate_run(segmenter: Segmenter, targets: list, config: TuneConfig, device: torch.device, progress,
                 out: Path, stem: str):
    """``--eval``: mIoU on each target (``fisherscan.evaluate``), saved as RUN_DIR/eval/<stem>.json and .csv."""
    crop = config.eval_crop if config.eval_crop is not None else config.crop
    stride = config.eval_stride if config.eval_stride is not None else max(1, (crop * 2) // 3)
    result = evaluate_datasets(segmenter, targets, crop=crop, stride=stride, device=device, progress=progress)
    save_results(result, out / "eval", stem=stem)
    segmenter.eval()
    return result


def write_log(path: Path, rows: list[dict]) -> None:
    with atomic_target(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", "loss", "lr", "selected", "selected_fraction"])
            writer.writeheader()
            writer.writerows(rows)


def save_run(out: Path, segmenter: Segmenter, masks: dict, touched: list[str], manifest: dict, full: bool) -> None:
    """model.safetensors: decoder/*, backbone/* (touched parameters, or all with ``full``), mask/* (uint8)."""
    backbone = dict(segmenter.backbone.named_parameters())
    tensors = {f"decoder/{n}": p for n, p in segmenter.decoder.state_dict().items()}
    for name in (backbone if full else touched):
        tensors[f"backbone/{name}"] = backbone[name]
    for name in touched:
        tensors[f"mask/{name}"] = masks[name].to(torch.uint8)
    save_tensors(out / "model.safetensors", tensors, manifest)
    with atomic_target(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))


def save_checkpoint(path: Path, step: int, segmenter: Segmenter, backbone_opt: MaskedAdamW, decoder_opt: MaskedAdamW,
                    touched: list[str], log_rows: list[dict], manifest: dict, bad_steps: int = 0) -> None:
    """Everything a resumed run needs, in one safetensors file (tensors) with JSON metadata (scalars)."""
    backbone = dict(segmenter.backbone.named_parameters())
    tensors = {f"backbone/{n}": backbone[n] for n in touched}
    tensors.update({f"decoder/{n}": p for n, p in segmenter.decoder.state_dict().items()})
    for prefix, optimizer in (("opt_backbone", backbone_opt), ("opt_decoder", decoder_opt)):
        for name in optimizer.params:
            tensors[f"{prefix}_m/{name}"] = optimizer.exp_avg[name]
            tensors[f"{prefix}_v/{name}"] = optimizer.exp_avg_sq[name]
    save_tensors(path, tensors, {"step": step, "log": log_rows, "options": manifest["options"],
                                 "optimizer_steps": [backbone_opt.step_count, decoder_opt.step_count],
                                 "bad_steps": bad_steps, "head": manifest.get("head")})


def restore_checkpoint(path: Path, segmenter: Segmenter, backbone_opt: MaskedAdamW, decoder_opt: MaskedAdamW,
                       touched: list[str], manifest: dict) -> tuple[int, list[dict], dict]:
    """(step, log rows, the checkpoint's metadata) of ``save_checkpoint``'s file, its tensors loaded in place."""
    try:
        with safe_open(str(path), "pt") as handle:
            info = json.loads(handle.metadata()["fisherscan_run"])
            names = set(handle.keys())
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file is the user's to remove
        raise FisherscanError(f"{path}: not a readable tune checkpoint ({type(error).__name__}); delete it or pass "
                              "--overwrite to start afresh") from None
    expected = {f"backbone/{n}" for n in touched} | {f"decoder/{n}" for n in segmenter.decoder.state_dict()}
    for prefix, optimizer in (("opt_backbone", backbone_opt), ("opt_decoder", decoder_opt)):
        expected |= {f"{prefix}_{moment}/{n}" for n in optimizer.params for moment in ("m", "v")}
    if names != expected:
        odd = sorted(names ^ expected)
        raise FisherscanError(f"{path}: {len(names - expected)} unexpected and {len(expected - names)} missing tensors "
                              f"({', '.join(odd[:3])}); it is not this run's checkpoint: delete it or pass --overwrite")
    free = ("resume", "overwrite", "workers", "device", "stop_after", "eval", "eval_every", "eval_layout",
            "eval_split", "eval_crop", "eval_stride", "max_bad_frac")  # may change between runs: no effect on weights
    same = {k: v for k, v in info["options"].items() if k not in free}
    now = {k: v for k, v in manifest["options"].items() if k not in free}
    if same != now:
        changed = sorted(k for k in set(now) | set(same) if same.get(k) != now.get(k))
        raise FisherscanError(f"the checkpoint in {path.parent} was made with other options "
                              f"({', '.join(changed[:4])}); use the same options, or pass --overwrite to start afresh")
    tensors = load_file(str(path))
    backbone = dict(segmenter.backbone.named_parameters())
    with torch.no_grad():
        for name in touched:
            backbone[name].copy_(tensors[f"backbone/{name}"])
        segmenter.decoder.load_state_dict({n[len("decoder/"):]: v for n, v in tensors.items() if n.startswith("decoder/")})
    for prefix, optimizer, steps in (("opt_backbone", backbone_opt, info["optimizer_steps"][0]),
                                     ("opt_decoder", decoder_opt, info["optimizer_steps"][1])):
        optimizer.load_state_dict({"exp_avg": {n: tensors[f"{prefix}_m/{n}"] for n in optimizer.params},
                                   "exp_avg_sq": {n: tensors[f"{prefix}_v/{n}"] for n in optimizer.params},
                                   "step": steps})
    return int(info["step"]), list(info["log"]), info


def load_run(run_dir: Path, weights: Path | None = None, device: str | torch.device = "cpu") -> tuple[Segmenter, dict]:
    """Rebuild a tuned model from a run folder: the base backbone (its weights checked by sha256), the changed
    backbone parameters and the head."""
    run_dir = Path(run_dir)
    model_path = run_dir / "model.safetensors"
    if not run_dir.is_dir():
        raise FisherscanError(f"--checkpoint {run_dir}: folder not found; pass a run folder written by 'fisherscan tune'")
    if not model_path.is_file():
        raise FisherscanError(f"--checkpoint {run_dir}: no model.safetensors; pass a folder written by 'fisherscan tune'")
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise FisherscanError(f"--checkpoint {run_dir}: manifest.json is missing or damaged; tune the run again") from None
    if weights is not None and not Path(weights).is_file():
        raise FisherscanError(f"--weights {weights}: no such file; pass the base weights the run was tuned from")
    base = weights if weights is not None else (Path(manifest["weights"]) if manifest.get("weights") and
                                                 manifest["weights"] != "timm-pretrained" else None)
    if base is not None and not Path(base).is_file():
        raise FisherscanError(f"the run's base weights {base} are missing; pass --weights FILE")
    if base is not None and manifest.get("weights_sha256") and sha256_of(Path(base)) != manifest["weights_sha256"]:
        raise FisherscanError(f"--weights {base}: sha256 differs from the weights the run was tuned from "
                              f"({manifest['weights_sha256'][:12]}...); pass the original file")
    with torch.random.fork_rng(devices=[]):  # an untrained base is rebuilt from the run's seed
        torch.manual_seed(manifest["options"]["seed"])
        backbone = build_backbone(manifest["model"], weights=base, random_init=manifest.get("random_init", False),
                                  strict=manifest["options"].get("strict", True))
    segmenter = Segmenter(backbone.model, manifest["num_classes"], manifest["decoder"],
                          manifest["options"].get("feature_blocks"))
    tensors = load_file(str(model_path))
    own = dict(segmenter.backbone.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            kind, _, name = key.partition("/")
            if kind == "backbone":
                own[name].copy_(value)
        segmenter.decoder.load_state_dict({k[len("decoder/"):]: v for k, v in tensors.items() if k.startswith("decoder/")})
    return segmenter.to(device).eval(), manifest


def write_mask(scores_path: Path, out: Path, budget: float, strategy: str, score_kind: str,
               candidates: tuple[str, ...], seed: int, overwrite: bool) -> tuple[int, int]:
    """``fisherscan mask``: the selection of ``budget`` x all backbone elements as uint8 tensors ``mask/<param>``."""
    from .select import mask_from_order

    out = Path(out)
    if out.exists() and not overwrite:
        raise FisherscanError(f"--out {out} exists; pass --overwrite to replace it")
    if not str(out).endswith(".safetensors"):
        raise FisherscanError(f"--out {out}: name the mask file <name>.safetensors")
    unknown = [g for g in candidates if g not in GROUPS]
    if unknown or strategy not in STRATEGIES:
        raise FisherscanError(f"--candidates/--strategy: unknown {', '.join(unknown) or strategy}; groups are "
                              f"{', '.join(GROUPS)}, strategies {', '.join(STRATEGIES)}")
    scores, metadata = load_scores(scores_path)
    try:
        names, order = selection_order(scores, strategy, candidates, seed, score_kind)
    except ValueError as error:
        raise FisherscanError(f"--score-kind {score_kind}: {error}") from None
    shapes = {n: t.shape for n, t in next(iter(scores.values())).items()}
    total = sum(math.prod(s) for s in shapes.values())
    count = order.numel() if strategy == "full" else min(order.numel(), math.floor(budget * total))
    masks = mask_from_order(names, shapes, order, count)
    info = {"scores": str(scores_path), "model": metadata.get("model"), "budget": budget, "strategy": strategy,
            "score_kind": score_kind, "candidates": list(candidates), "seed": seed, "selected": count, "total": total}
    save_tensors(out, {f"mask/{n}": m.to(torch.uint8) for n, m in masks.items()}, info)
    return count, total


def trainable_summary(result: TuneResult) -> str:
    return (f"{result.selected:,} of {result.total:,} backbone elements tuned "
            f"({result.selected / max(result.total, 1):.2%}), decoder "
            f"{result.manifest['trainable']['decoder_parameters']:,} parameters")
