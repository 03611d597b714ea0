"""Every option of ``score`` and ``tune`` as plain keyword-only dataclasses, and which of them a stopped run may
change when it continues.

``RunConfig`` holds what both share (the backbone, the data, the head, the seed, run control); ``ScoreConfig``
and ``TuneConfig`` add their own. The scores metadata and the run manifest record them (``fisherscan.io``'s
``options_json``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..models.groups import CANDIDATE_GROUPS

# options that may change between a stopped run and its continuation: none of them changes a result
RESUME_SAFE = ("workers", "device", "overwrite", "resume", "stop_after", "save_every", "max_bad_frac", "eval",
               "eval_every", "eval_layout", "eval_split", "eval_crop", "eval_stride")


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


@dataclass(kw_only=True)
class ScoreConfig(RunConfig):
    """Every option of ``fisherscan score``; the metadata records them all."""

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


@dataclass(kw_only=True)
class TuneConfig(RunConfig):
    """Every option of ``fisherscan tune``; the manifest records them all."""

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


def changed_options(saved: dict, now: dict) -> list[str]:
    """The recorded options (JSON) of a stopped run that differ from this run's, ``RESUME_SAFE`` left out."""
    keys = (set(saved) | set(now)) - set(RESUME_SAFE)
    return sorted(k for k in keys if saved.get(k) != now.get(k))
