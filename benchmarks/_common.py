"""What the GPU benchmark scripts share: the device, the report header, synchronised timing, the JSON file and
the plain training step every ratio is measured against."""

from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.nn.functional as F

from fisherscan.fisher.loss import sample_labels
from fisherscan.models.logits import upsample_logits


def pick_device(small: bool) -> torch.device:
    """CUDA when present, unless ``--small`` asks for a CPU smoke run."""
    return torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")


def new_report(device: torch.device) -> dict:
    """The card (or cpu) and torch version: every number in the report was measured on them."""
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def save_report(path: Path, report: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(report, indent=1))


def plain_training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, u: torch.Tensor,
                        autocast: torch.dtype | None) -> None:
    """The reference: one forward and backward of the whole batch, summed pixel cross-entropy on sampled labels."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=autocast is not None):
        logits = model(x)
    logits = upsample_logits(logits.float(), tuple(y.shape[-2:]))
    F.cross_entropy(logits, sample_labels(logits, u.to(x.device), y != 255), reduction="sum").backward()
