"""What the GPU benchmark scripts share: the device, the report header, synchronised timing, the JSON file."""

from __future__ import annotations

import json
from pathlib import Path

import torch


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
