"""A tuned model rebuilt from its run folder (``model.safetensors`` + ``manifest.json`` of ``fisherscan tune``), and
what else the run folder knows: the folders it evaluated (``--eval``) and its evaluation window.

Manifests record absolute paths; an older one's relative paths are read against the folder its run ran in
(``fisherscan.io.recorded_base``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import FisherscanError
from ..io import read_tensors, recorded_base, resolve_recorded
from ..models.backbone import build_backbone
from ..models.checkpoints import weights_sha256
from ..models.segmenter import Segmenter


def read_manifest(run_dir: Path) -> dict:
    """The manifest of the run folder ``run_dir`` (one-line errors for a folder that is not a finished run)."""
    run_dir = Path(run_dir)
    if not run_dir.is_dir():
        raise FisherscanError(f"--checkpoint {run_dir}: folder not found; pass a run folder written by "
                              "'fisherscan tune'")
    if not (run_dir / "model.safetensors").is_file():
        raise FisherscanError(f"--checkpoint {run_dir}: no model.safetensors; pass a folder written by "
                              "'fisherscan tune'")
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise FisherscanError(f"--checkpoint {run_dir}: manifest.json is missing or damaged; tune the run "
                              "again") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("options"), dict):
        raise FisherscanError(f"--checkpoint {run_dir}: manifest.json records no options; tune the run again")
    return manifest


def _base(run_dir: Path, manifest: dict) -> Path:
    return recorded_base(run_dir, manifest["options"].get("out"))


def recorded_targets(run_dir: Path, manifest: dict) -> tuple[list[Path], str, str]:
    """(the folders the run evaluated with ``--eval``, their layout, their split); a one-line error naming the option
    to give when it recorded none or one no longer exists."""
    options = manifest["options"]
    folders = [resolve_recorded(p, _base(run_dir, manifest)) for p in options.get("eval") or []]
    if not folders:
        raise FisherscanError(f"--data: missing, and the run {run_dir} was tuned without --eval folders; pass --data "
                              "FOLDER (repeat for several)")
    for folder in folders:
        if not folder.exists():
            raise FisherscanError(f"the --eval folder {folder} recorded in {Path(run_dir) / 'manifest.json'} no "
                                  "longer exists; pass --data FOLDER")
    return folders, options.get("eval_layout", "auto"), options.get("eval_split", "val")


def recorded_window(manifest: dict) -> tuple[int, int]:
    """(slide window, stride) the run evaluated with: ``--eval-crop`` (default its ``--crop``), ``--eval-stride``
    (default 2/3 of the window)."""
    options = manifest["options"]
    crop = options.get("eval_crop") or options.get("crop") or manifest.get("crop") or 512
    stride = options.get("eval_stride") or max(1, (crop * 2) // 3)
    return int(crop), int(stride)


def base_weights(run_dir: Path, manifest: dict, weights: Path | None) -> Path | None:
    """The base weights to rebuild the run on: ``weights`` when given, else the manifest's (checked by sha256)."""
    if weights is not None and not Path(weights).exists():
        raise FisherscanError(f"--weights {weights}: no such file or folder; pass the base weights the run was "
                              "tuned from")
    recorded = manifest.get("weights")
    base = weights if weights is not None else (resolve_recorded(recorded, _base(run_dir, manifest))
                                                if recorded and recorded != "timm-pretrained" else None)
    if base is not None and not Path(base).exists():
        raise FisherscanError(f"the run's base weights {base} are missing; pass --weights FILE")
    if base is not None and manifest.get("weights_sha256") and weights_sha256(Path(base)) != manifest["weights_sha256"]:
        raise FisherscanError(f"--weights {base}: sha256 differs from the weights the run was tuned from "
                              f"({manifest['weights_sha256'][:12]}...); pass the original file")
    return base


def load_run(run_dir: Path, weights: Path | None = None, device: str | torch.device = "cpu") -> tuple[Segmenter, dict]:
    """Rebuild a tuned model from a run folder: the base backbone (its weights checked by sha256), the changed
    backbone parameters and the head."""
    run_dir = Path(run_dir)
    manifest = read_manifest(run_dir)
    base = base_weights(run_dir, manifest, weights)
    with torch.random.fork_rng(devices=[]):  # an untrained base is rebuilt from the run's seed
        torch.manual_seed(manifest["options"]["seed"])
        backbone = build_backbone(manifest["model"], weights=base, random_init=manifest.get("random_init", False),
                                  strict=manifest["options"].get("strict", True))
    segmenter = Segmenter(backbone.model, manifest["num_classes"], manifest["decoder"],
                          manifest["options"].get("feature_blocks"))
    tensors, _ = read_tensors(run_dir / "model.safetensors", "model", "tune the run again")
    own = dict(segmenter.backbone.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            kind, _, name = key.partition("/")
            if kind == "backbone":
                own[name].copy_(value)
        segmenter.decoder.load_state_dict({k[len("decoder/"):]: v for k,
                                           v in tensors.items() if k.startswith("decoder/")})
    return segmenter.to(device).eval(), manifest
