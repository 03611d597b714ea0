"""What the benchmark scripts share: the device, the report header, synchronised timing, the JSON file (written
atomically, so a killed run keeps the last complete report), peak memory on CPU and the plain training step every
ratio is measured against."""

from __future__ import annotations

import json
import platform
import re
from pathlib import Path

import torch
import torch.nn.functional as F

from fisherscan.fisher.loss import sample_labels
from fisherscan.io import write_text
from fisherscan.models.logits import upsample_logits


def pick_device(small: bool) -> torch.device:
    """CUDA when present, unless ``--small`` asks for a CPU smoke run."""
    return torch.device("cuda" if torch.cuda.is_available() and not small else "cpu")


def new_report(device: torch.device) -> dict:
    """The card (or cpu) and torch version: every number in the report was measured on them."""
    return {"device": torch.cuda.get_device_name() if device.type == "cuda" else "cpu", "torch": torch.__version__}


def card_slug(device: torch.device) -> str:
    """A file-name tag for the card: 'NVIDIA H100 80GB HBM3' -> 'h100_80gb_hbm3'; 'cpu' on the CPU."""
    if device.type != "cuda":
        return "cpu"
    name = torch.cuda.get_device_name(device).lower().replace("nvidia", "")
    return re.sub(r"[^a-z0-9]+", "_", name).strip("_") or "cuda"


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def save_report(path: Path, report: dict) -> None:
    """The report as JSON, atomically (a temporary file renamed over ``path``)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    write_text(path, json.dumps(report, indent=1, default=str))


def proc_status_bytes(key: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the peak resident set (Linux: '5' into /proc/self/clear_refs) and return the resident set now."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_bytes("VmRSS")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def plain_training_step(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, u: torch.Tensor,
                        autocast: torch.dtype | None) -> None:
    """The reference: one forward and backward of the whole batch, summed pixel cross-entropy on sampled labels."""
    model.zero_grad(set_to_none=True)
    with torch.autocast(x.device.type, dtype=autocast or torch.bfloat16, enabled=autocast is not None):
        logits = model(x)
    logits = upsample_logits(logits.float(), tuple(y.shape[-2:]))
    F.cross_entropy(logits, sample_labels(logits, u.to(x.device), y != 255), reduction="sum").backward()
