"""Mistakes in the options of ``fisherscan score``, found before any work is done: one line naming the option and
the fix (``FisherscanError``, exit code 2)."""

from __future__ import annotations

import math
import os
from pathlib import Path

from ..errors import FisherscanError
from ..fisher.drfim import COMBINE_MODES
from ..fisher.loss import LABEL_MODES
from ..fisher.variational import CURVATURES
from .config import ScoreConfig

ESTIMATORS = ("diagonal", "variational")
EQ15_MODES = ("printed", "substituted")
SHIFTS = ("eq6", "pixel")
SPREADS = ("batch", "pool")


def check_method(config: ScoreConfig) -> None:
    """The estimator, the labels, the shift and the DR-FIM balance."""
    if config.label_draws < 1:
        raise FisherscanError(f"--label-draws {config.label_draws}: must be at least 1")
    if config.replicates not in (1, 2):
        raise FisherscanError(f"--replicates {config.replicates}: use 1 or 2 (two halves of the images)")
    if config.estimator != "diagonal" and (config.label_draws > 1 or config.replicates > 1):
        raise FisherscanError("--label-draws and --replicates apply to --estimator diagonal; drop them for the "
                              "variational estimator")
    if config.shift not in SHIFTS:
        raise FisherscanError(f"--shift {config.shift}: use one of {', '.join(SHIFTS)}")
    sites = list(config.perturb_at)
    if not sites or any(k < 0 for k in sites) or sites != sorted(set(sites)):
        shown = ",".join(map(str, sites))
        raise FisherscanError(f"--perturb-at {shown}: give block indices in increasing order, e.g. 0,2,4")
    if not (math.isfinite(config.perturb_prob) and 0 < config.perturb_prob <= 1):
        raise FisherscanError(f"--perturb-prob {config.perturb_prob}: must lie in (0, 1]")
    if not (math.isfinite(config.perturb_strength) and config.perturb_strength >= 0):
        raise FisherscanError(f"--perturb-strength {config.perturb_strength}: must be a finite number >= 0")
    if config.spread not in SPREADS:
        raise FisherscanError(f"--spread {config.spread}: use one of {', '.join(SPREADS)}")
    if config.spread_pool < 2:
        raise FisherscanError(f"--spread-pool {config.spread_pool}: must be at least 2 images")
    if not (math.isfinite(config.drfim_weight) and config.drfim_weight >= 0):
        raise FisherscanError(f"--drfim-weight {config.drfim_weight}: must be a finite number >= 0")
    if config.combine not in COMBINE_MODES:
        raise FisherscanError(f"--combine {config.combine}: use one of {', '.join(COMBINE_MODES)}")
    if not config.normalize and (config.drfim_weight != 1 or config.combine != "sum"):
        raise FisherscanError("--literal is the printed Eq. 7: drop --drfim-weight and --combine, or drop --literal")


def check_variational(config: ScoreConfig) -> None:
    """The variational options' mistakes (checked for every estimator: they are recorded either way)."""
    def positive(value) -> bool:
        return math.isfinite(value) and value > 0

    if not positive(config.gamma):
        raise FisherscanError(f"--gamma {config.gamma}: must be a finite number > 0")
    if config.tau is not None and not positive(config.tau):
        raise FisherscanError(f"--tau {config.tau}: must be a finite number > 0 (leave it out to pick it by a pilot)")
    if config.var_steps < 1:
        raise FisherscanError(f"--var-steps {config.var_steps}: must be at least 1")
    if not 0 <= config.var_lr < 1:
        raise FisherscanError(f"--var-lr {config.var_lr}: must lie in [0, 1)")
    if config.var_scale is not None and not positive(config.var_scale):
        raise FisherscanError(f"--var-scale {config.var_scale}: must be a finite number > 0")
    if not positive(config.var_tolerance):
        raise FisherscanError(f"--var-tolerance {config.var_tolerance}: must be a finite number > 0")
    if config.var_curvature not in CURVATURES:
        raise FisherscanError(f"--var-curvature {config.var_curvature}: use one of {', '.join(CURVATURES)}")
    if config.eq15 not in EQ15_MODES:
        raise FisherscanError(f"--eq15 {config.eq15}: use one of {', '.join(EQ15_MODES)}")
    if config.var_legacy and (config.var_curvature != "reparam" or config.tau is None):
        raise FisherscanError("--var-legacy reproduces the old estimator: pass --var-curvature reparam and a --tau")


def check_config(config: ScoreConfig) -> None:
    """Option mistakes, found before any work is done."""
    if config.estimator not in ESTIMATORS:
        raise FisherscanError(f"--estimator {config.estimator}: use one of {', '.join(ESTIMATORS)}")
    check_variational(config)
    if config.labels not in LABEL_MODES:
        raise FisherscanError(f"--labels {config.labels}: use one of {', '.join(LABEL_MODES)}")
    for option, value in (("--batch-size", config.batch_size), ("--crop", config.crop), ("--chunk-size",
                                                                                         config.chunk_size)):
        if value < 1:
            raise FisherscanError(f"{option} {value}: must be at least 1")
    if config.warmup_steps < 0:
        raise FisherscanError(f"--warmup-steps {config.warmup_steps}: must be 0 or more")
    warmup_lr_ok = math.isfinite(config.warmup_lr) and config.warmup_lr > 0
    if config.head is None and config.warmup_steps > 0 and not warmup_lr_ok:
        raise FisherscanError(f"--warmup-lr {config.warmup_lr}: must be a finite number > 0")
    check_method(config)
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
    if str(config.out).endswith((".head.safetensors",
                                 ".partial.safetensors")) or not str(config.out).endswith(".safetensors"):
        raise FisherscanError(f"--out {config.out}: name the scores file <name>.safetensors")
    if not Path(config.out).resolve().parent.is_dir():
        raise FisherscanError(f"--out {config.out}: folder {Path(config.out).parent} does not exist; create it first")
    if not os.access(Path(config.out).resolve().parent, os.W_OK):
        raise FisherscanError(f"--out {config.out}: folder {Path(config.out).parent} is not writable; choose another "
                              "--out or fix its permissions")
