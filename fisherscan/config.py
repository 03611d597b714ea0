"""The options ``score`` and ``tune`` share: the backbone, the data, the head, the seed and run control.

``scoring.ScoreConfig`` and ``tuning.TuneConfig`` add their own; both are keyword-only plain dataclasses.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(kw_only=True)
class RunConfig:
    model: str
    data: Path
    out: Path
    weights: Path | None = None
    random_init: bool = False
    strict: bool = True  # --no-strict: load the checkpoint keys that match, leave the rest
    layout: str = "auto"
    split: str = "train"
    images: int | None = None
    batch_size: int = 8
    crop: int = 512
    decoder: str = "linear"
    feature_blocks: tuple[int, ...] | None = None
    head: Path | None = None
    warmup_steps: int = 200
    seed: int = 0
    device: str = "auto"
    workers: int = 0
    overwrite: bool = False
    save_every: int = 50
    resume: bool = False
    stop_after: int | None = None
    max_bad_frac: float = 0.1
    skip_bad: bool = False
