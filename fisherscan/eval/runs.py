"""A tuned model rebuilt from its run folder (``model.safetensors`` + ``manifest.json`` of ``fisherscan tune``)."""

from __future__ import annotations

import json
from pathlib import Path

import torch

from ..errors import FisherscanError
from ..io import read_tensors
from ..models.backbone import build_backbone
from ..models.checkpoints import weights_sha256
from ..models.segmenter import Segmenter


def load_run(run_dir: Path, weights: Path | None = None, device: str | torch.device = "cpu") -> tuple[Segmenter, dict]:
    """Rebuild a tuned model from a run folder: the base backbone (its weights checked by sha256), the changed
    backbone parameters and the head."""
    run_dir = Path(run_dir)
    model_path = run_dir / "model.safetensors"
    if not run_dir.is_dir():
        raise FisherscanError(f"--checkpoint {run_dir}: folder not found; pass a run folder written by "
                              "'fisherscan tune'")
    if not model_path.is_file():
        raise FisherscanError(f"--checkpoint {run_dir}: no model.safetensors; pass a folder written by "
                              "'fisherscan tune'")
    try:
        manifest = json.loads((run_dir / "manifest.json").read_text())
    except (OSError, ValueError, UnicodeDecodeError):
        raise FisherscanError(f"--checkpoint {run_dir}: manifest.json is missing or damaged; tune the run "
                              "again") from None
    if weights is not None and not Path(weights).exists():
        raise FisherscanError(f"--weights {weights}: no such file or folder; pass the base weights the run was "
                              "tuned from")
    base = weights if weights is not None else (Path(manifest["weights"]) if manifest.get("weights") and
                                                 manifest["weights"] != "timm-pretrained" else None)
    if base is not None and not Path(base).exists():
        raise FisherscanError(f"the run's base weights {base} are missing; pass --weights FILE")
    if base is not None and manifest.get("weights_sha256") and weights_sha256(Path(base)) != manifest["weights_sha256"]:
        raise FisherscanError(f"--weights {base}: sha256 differs from the weights the run was tuned from "
                              f"({manifest['weights_sha256'][:12]}...); pass the original file")
    with torch.random.fork_rng(devices=[]):  # an untrained base is rebuilt from the run's seed
        torch.manual_seed(manifest["options"]["seed"])
        backbone = build_backbone(manifest["model"], weights=base, random_init=manifest.get("random_init", False),
                                  strict=manifest["options"].get("strict", True))
    segmenter = Segmenter(backbone.model, manifest["num_classes"], manifest["decoder"],
                          manifest["options"].get("feature_blocks"))
    tensors, _ = read_tensors(model_path, "model", "tune the run again")
    own = dict(segmenter.backbone.named_parameters())
    with torch.no_grad():
        for key, value in tensors.items():
            kind, _, name = key.partition("/")
            if kind == "backbone":
                own[name].copy_(value)
        segmenter.decoder.load_state_dict({k[len("decoder/"):]: v for k,
                                           v in tensors.items() if k.startswith("decoder/")})
    return segmenter.to(device).eval(), manifest
