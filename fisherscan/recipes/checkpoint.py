"""What a stopped run leaves so the same command continues it: score's partial file, tune's checkpoint, and
the finished run folder of tune. Every file is a safetensors file in ``fisherscan.io``'s one format.

- ``<scores stem>.partial.safetensors`` (``score``): the diagonal estimator's two squared-gradient sums
  (``clean/``, ``shifted/``) and counters, or the variational estimator's finished and running fits, with the
  warmed head (``head/``), the options and the context (warm-up, skipped pairs).
- ``RUN_DIR/checkpoint.safetensors`` (``tune``): the touched backbone parameters, the decoder, both optimizers'
  moments, update counts and skipped steps (``optimizer_missed``; a checkpoint without them predates the
  per-element bias correction and is refused), the log and the options.
- ``RUN_DIR/model.safetensors`` + ``manifest.json`` + ``log.csv``: the finished run.

A continued run refuses options that changed since it stopped, except ``config.RESUME_SAFE``.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

import torch

from .. import __version__
from ..errors import FisherscanError
from ..fisher.variational import VariationalResult, data_to_fisher, precision_to_fisher
from ..io import atomic_target, options_json, read_info, read_tensors, recorded_base, write_tensors
from ..models.segmenter import Segmenter
from .config import ScoreConfig, changed_options
from .optim import MaskedAdamW

FRESH = "delete it or pass --overwrite to start afresh"


# ----------------------------------------------------------------------------------------------------------
# score: the partial file


def partial_path_for(scores_path: Path) -> Path:
    """Where ``score`` keeps its resumable state: beside the scores, ``<stem>.partial.safetensors``."""
    scores_path = Path(scores_path)
    return scores_path.with_name(scores_path.name.removesuffix(".safetensors") + ".partial.safetensors")


def write_partial(path: Path, tensors: dict[str, torch.Tensor], info: dict, segmenter: Segmenter,
                  config: ScoreConfig, context: dict) -> None:
    """A stopped run's tensors, the warmed head (``head/``), its options and ``context`` (warm-up, skipped pairs)."""
    tensors = dict(tensors)
    tensors.update({f"head/{n}": v.detach().cpu().clone() for n, v in segmenter.decoder.state_dict().items()})
    info = {**info, **context, "estimator": config.estimator, "options": options_json(config),
            "fisherscan_version": __version__}
    write_tensors(path, tensors, "partial", info)


def _part_prefix(kind: str, part: int) -> str:
    """Tensor-name prefix of a replicate's sums: ``clean/`` for the first (as files with one part always had),
    ``clean1/`` for the second."""
    return f"{kind}{part if part else ''}/"


def save_diagonal_partial(path: Path, parts: list, counters: dict, segmenter: Segmenter, config: ScoreConfig,
                          context: dict) -> None:
    """The diagonal estimator's state: each replicate's two sums (``clean/``, ``shifted/``; ``clean1/``, ... for
    the second half) and the counters."""
    tensors, extra_parts = {}, []
    for k, part in enumerate(parts):
        tensors.update({_part_prefix("clean", k) + n: v for n, v in part.clean.sums.items()})
        tensors.update({_part_prefix("shifted", k) + n: v for n, v in part.shifted.sums.items()})
        if k:
            extra_parts.append({"clean_images": part.clean.images, "shifted_images": part.shifted.images,
                                "shift_magnitude_sum": part.shift_magnitude_sum})
    first = parts[0]
    info = {"next_image": counters["next_image"], "clean_images": first.clean.images,
            "shifted_images": first.shifted.images, "shift_magnitude_sum": first.shift_magnitude_sum,
            "bad_batches": counters["bad_batches"]}
    if extra_parts:
        info["parts"] = extra_parts
    write_partial(path, tensors, info, segmenter, config, context)


def save_variational_partial(path: Path, run: dict, segmenter: Segmenter, config: ScoreConfig, context: dict) -> None:
    """The variational estimator's state: finished fits (``done_<kind>_data/``: D; legacy ``done_<kind>/``: Lambda)
    with their record, the fit in progress (``fit_data/`` or legacy ``fit_precision/``, ``fit_snapshot/``,
    ``fit_noise``: the xi generator; its counters and pilot in the metadata) and the shift magnitudes so far."""
    tensors, fits = {}, {}
    for kind, fit in run["fits"].items():
        if config.var_legacy:
            tensors.update({f"done_{kind}/{n}": v for n, v in fit.precision.items()})
        else:
            tensors.update({f"done_{kind}_data/{n}": v for n, v in fit.data.items()})
        fits[kind] = {"terms": fit.terms, "relative_change": fit.relative_change, "converged": fit.converged}
        if not config.var_legacy:
            fits[kind].update(tau=fit.tau, scale=fit.scale, prior=fit.prior, bad_steps=fit.bad_steps,
                              passes=fit.passes)
    fit_info = None
    if run["fit"] is not None:
        stored = "precision" if config.var_legacy else "data"
        tensors.update({f"fit_{stored}/{n}": v for n, v in run["fit"][stored].items()})
        tensors.update({f"fit_snapshot/{n}": v for n, v in run["fit"]["snapshot"].items()})
        tensors["fit_noise"] = run["fit"]["noise"]
        fit_info = {k: v for k, v in run["fit"].items() if k not in (stored, "snapshot", "noise")}
    info = {"phase": run["phase"], "global_step": run["global_step"], "magnitudes": run["magnitudes"],
            "fits": fits, "fit": fit_info}
    write_partial(path, tensors, info, segmenter, config, context)


def read_partial_info(path: Path) -> dict:
    info = read_info(path, "partial", FRESH)
    if not isinstance(info.get("options"), dict):
        raise FisherscanError(f"{path}: not a readable partial scoring file (no options); {FRESH}")
    return info


def restore_head(tensors: dict, segmenter: Segmenter, path: Path) -> None:
    head = {n[len("head/"):]: v for n, v in tensors.items() if n.startswith("head/")}
    if set(head) != set(segmenter.decoder.state_dict()):
        raise FisherscanError(f"{path}: does not fit this model; {FRESH}")
    with torch.no_grad():
        segmenter.decoder.load_state_dict(head)


def _part(tensors: dict, prefix: str, order: list[str]) -> dict:
    """The tensors under ``prefix/``, in ``order`` (the model's parameter order, as an uninterrupted run holds
    them) when they are a subset of it."""
    found = {n[len(prefix):]: v for n, v in tensors.items() if n.startswith(prefix)}
    return {n: found[n] for n in order if n in found} if set(found) <= set(order) else found


def restore_diagonal_partial(path: Path, info: dict, segmenter: Segmenter, parts: list) -> dict:
    """Load each replicate's sums into ``parts`` and the head into ``segmenter.decoder``; return the counters."""
    tensors, _ = read_tensors(path, "partial", FRESH)
    records = [info, *info.get("parts", [])]
    if len(records) != len(parts):
        raise FisherscanError(f"{path}: does not fit this run ({len(records)} replicates); {FRESH}")
    for k, (part, record) in enumerate(zip(parts, records)):
        order = list(part.clean.sums)
        clean, shifted = _part(tensors, _part_prefix("clean", k), order), _part(tensors, _part_prefix("shifted", k),
                                                                               order)
        if (set(clean) != set(part.clean.sums) or set(shifted) != set(part.shifted.sums)
                or any(clean[n].shape != part.clean.sums[n].shape for n in clean)):
            raise FisherscanError(f"{path}: does not fit this model; {FRESH}")
        part.clean.load_state_dict({"sums": clean, "images": record["clean_images"]})
        part.shifted.load_state_dict({"sums": shifted, "images": record["shifted_images"]})
        part.shift_magnitude_sum = float(record["shift_magnitude_sum"])
    restore_head(tensors, segmenter, path)
    return {"next_image": int(info["next_image"]), "bad_batches": int(info.get("bad_batches", 0))}


def restore_variational_partial(path: Path, info: dict, segmenter: Segmenter, config: ScoreConfig,
                                scale: float) -> dict:
    """The ``resume`` argument of ``run_variational`` (and the head) from ``save_variational_partial``'s file
    (``scale``: the likelihood scale of a legacy run; a newer file records each fit's own)."""
    tensors, _ = read_tensors(path, "partial", FRESH)
    means = {f"backbone.{n}": p for n, p in segmenter.backbone.named_parameters()}  # what run_variational fits
    order = list(means)

    def stored(prefix: str) -> dict:
        found = _part(tensors, prefix, order)
        if set(found) != set(means) or any(found[n].shape != means[n].shape for n in means):
            raise FisherscanError(f"{path}: does not fit this model; {FRESH}")
        return found

    fits = {}
    for kind, record in info["fits"].items():
        common = dict(relative_change=record["relative_change"], terms=record["terms"], converged=record["converged"])
        if config.var_legacy:
            precision = stored(f"done_{kind}/")
            fits[kind] = VariationalResult(precision=precision, tau=config.tau, scale=scale, **common,
                                           fisher=precision_to_fisher(precision, config.gamma, config.tau, scale))
        else:
            data, tau, scale = stored(f"done_{kind}_data/"), record["tau"], record["scale"]
            fits[kind] = VariationalResult(precision={n: v + tau**-2 for n, v in data.items()}, data=data, tau=tau,
                                           scale=scale, fisher=data_to_fisher(data, config.gamma, scale),
                                           prior=record["prior"], bad_steps=record["bad_steps"],
                                           passes=record["passes"], **common)
    fit = None
    if info["fit"] is not None:
        kept = "precision" if config.var_legacy else "data"
        fit = {**info["fit"], kept: stored(f"fit_{kept}/"), "snapshot": _part(tensors, "fit_snapshot/", order),
               "noise": tensors["fit_noise"]}
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
    changed = changed_options(info["options"], options_json(config),
                              recorded_base(path, info["options"].get("out")))
    if changed:
        shown = ", ".join(changed[:4]) + (", ..." if len(changed) > 4 else "")
        if config.resume:
            raise FisherscanError(f"--resume: the partial file {path} was made with other options ({shown}); "
                                  "use the same options, or delete it or pass --overwrite to start afresh")
        raise FisherscanError(f"{path} holds a stopped run with other options ({shown}); continue it with the same "
                              "options and --resume, or delete it or pass --overwrite to start afresh")
    return path, info


# ----------------------------------------------------------------------------------------------------------
# tune: the checkpoint and the finished run


def _optimizers(backbone_opt: MaskedAdamW, decoder_opt: MaskedAdamW) -> tuple:
    return ("opt_backbone", backbone_opt), ("opt_decoder", decoder_opt)


def save_checkpoint(path: Path, step: int, segmenter: Segmenter, backbone_opt: MaskedAdamW, decoder_opt: MaskedAdamW,
                    touched: list[str], log_rows: list[dict], manifest: dict, bad_steps: int = 0) -> None:
    """Everything a resumed run needs, in one safetensors file (tensors) with JSON metadata (scalars)."""
    backbone = dict(segmenter.backbone.named_parameters())
    tensors = {f"backbone/{n}": backbone[n] for n in touched}
    tensors.update({f"decoder/{n}": p for n, p in segmenter.decoder.state_dict().items()})
    for prefix, optimizer in _optimizers(backbone_opt, decoder_opt):
        for name in optimizer.params:
            tensors[f"{prefix}_m/{name}"] = optimizer.exp_avg[name]
            tensors[f"{prefix}_v/{name}"] = optimizer.exp_avg_sq[name]
    write_tensors(path, tensors, "checkpoint", {"step": step, "log": log_rows, "options": manifest["options"],
                                                 "optimizer_steps": [backbone_opt.step_count, decoder_opt.step_count],
                                                 "optimizer_missed": [backbone_opt.missed, decoder_opt.missed],
                                                 "bad_steps": bad_steps, "head": manifest.get("head")})


def restore_checkpoint(path: Path, segmenter: Segmenter, backbone_opt: MaskedAdamW, decoder_opt: MaskedAdamW,
                       touched: list[str], manifest: dict) -> tuple[int, list[dict], dict]:
    """(step, log rows, the checkpoint's metadata) of ``save_checkpoint``'s file, its tensors loaded in place."""
    tensors, info = read_tensors(path, "checkpoint", FRESH)
    if "optimizer_missed" not in info:
        raise FisherscanError(f"{path}: written before Adam's bias correction counted per element (no "
                              f"optimizer_missed); it cannot be continued: {FRESH}")
    expected = {f"backbone/{n}" for n in touched} | {f"decoder/{n}" for n in segmenter.decoder.state_dict()}
    for prefix, optimizer in _optimizers(backbone_opt, decoder_opt):
        expected |= {f"{prefix}_{moment}/{n}" for n in optimizer.params for moment in ("m", "v")}
    if set(tensors) != expected:
        odd = sorted(set(tensors) ^ expected)
        raise FisherscanError(f"{path}: {len(set(tensors) - expected)} unexpected and {len(expected - set(tensors))} "
                              f"missing tensors ({', '.join(odd[:3])}); it is not this run's checkpoint: {FRESH}")
    changed = changed_options(info["options"], manifest["options"],
                              recorded_base(path.parent, info["options"].get("out")))
    if changed:
        raise FisherscanError(f"the checkpoint in {path.parent} was made with other options "
                              f"({', '.join(changed[:4])}); use the same options, or pass --overwrite to start afresh")
    backbone = dict(segmenter.backbone.named_parameters())
    with torch.no_grad():
        for name in touched:
            backbone[name].copy_(tensors[f"backbone/{name}"])
        segmenter.decoder.load_state_dict({n[len("decoder/"):]: v for n, v in tensors.items()
                                           if n.startswith("decoder/")})
    for (prefix, optimizer), steps, missed in zip(_optimizers(backbone_opt, decoder_opt), info["optimizer_steps"],
                                                  info["optimizer_missed"]):
        optimizer.load_state_dict({"exp_avg": {n: tensors[f"{prefix}_m/{n}"] for n in optimizer.params},
                                   "exp_avg_sq": {n: tensors[f"{prefix}_v/{n}"] for n in optimizer.params},
                                   "step": steps, "missed": missed})
    return int(info["step"]), list(info["log"]), info


def write_log(path: Path, rows: list[dict]) -> None:
    with atomic_target(path) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["step", "loss", "lr", "selected", "selected_fraction"])
            writer.writeheader()
            writer.writerows(rows)


def save_run(out: Path, segmenter: Segmenter, masks: dict, touched: list[str], manifest: dict, full: bool) -> None:
    """model.safetensors: decoder/*, backbone/* (touched parameters, or all with ``full``), mask/* (uint8); and
    manifest.json."""
    backbone = dict(segmenter.backbone.named_parameters())
    tensors = {f"decoder/{n}": p for n, p in segmenter.decoder.state_dict().items()}
    for name in (backbone if full else touched):
        tensors[f"backbone/{name}"] = backbone[name]
    for name in touched:
        tensors[f"mask/{name}"] = masks[name].to(torch.uint8)
    write_tensors(out / "model.safetensors", tensors, "model", manifest)
    with atomic_target(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=1, sort_keys=True))
