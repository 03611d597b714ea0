"""Published training protocols as presets of ``fisherscan tune`` options (``--recipe``); options given explicitly
on the command line override them."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from ..errors import FisherscanError


@dataclass(frozen=True)
class Rein512:
    """Rein's protocol, which the paper follows (``docs/method.md``): Mask2Former head on 4 blocks, crop 512, batch 4,
    AdamW lr 1e-4 wd 0.05, poly decay 0.9, 40k steps, resize 0.5-2.0 + class-balanced crop + flip + photometric
    distortion (``fisherscan.data.augment``), slide evaluation with 512 windows every 341 pixels."""

    decoder: str = "mask2former"
    crop: int = 512
    batch_size: int = 4
    lr: float = 1e-4
    weight_decay: float = 0.05
    power: float = 0.9
    steps: int = 40000
    augment: str = "rein"
    eval_crop: int = 512
    eval_stride: int = 341


RECIPES = {"rein-512": Rein512}


def recipe_values(name: str | None) -> dict:
    """The option values the recipe ``name`` sets (none for None)."""
    if name is None:
        return {}
    if name not in RECIPES:
        raise FisherscanError(f"--recipe {name}: unknown recipe; use one of {', '.join(RECIPES)}")
    return dataclasses.asdict(RECIPES[name]())


def apply_recipe(config, explicit: set[str] = frozenset()):
    """``config`` (a TuneConfig) with its recipe's values, except for the options in ``explicit``."""
    values = recipe_values(config.recipe)
    return dataclasses.replace(config, **{k: v for k, v in values.items() if k not in explicit})
