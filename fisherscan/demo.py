"""``fisherscan demo``: the whole ``score`` job on a clean machine, no downloads, a few CPU minutes.

It writes procedural street scenes in five visual domains (``fisherscan.synthetic``), then scores a small
DINOv2-architecture ViT (ViT-S/14, randomly initialised: no weights can be downloaded) on the source domain.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from .scoring import ScoreConfig, ScoreResult, run_score
from .synthetic import DOMAINS, write_dataset

DEMO_MODEL = "dinov2_vits14"
DEMO_SIZE = (128, 128)


def demo_config(out: Path, images: int = 32, seed: int = 0, device: str = "auto") -> ScoreConfig:
    """The demo's score options: ViT-S/14 at a 112 crop (8x8 patches), 32 source images, short warm-up."""
    return ScoreConfig(model=DEMO_MODEL, random_init=True, data=Path(out) / "data" / "source",
                       out=Path(out) / "scores.safetensors", layout="generic", images=images, batch_size=8,
                       crop=112, warmup_steps=20, warmup_lr=3e-3, seed=seed, device=device, workers=0, overwrite=True)


def run_demo(out: Path, images: int = 32, seed: int = 0, device: str = "auto",
             console: Console | None = None) -> tuple[ScoreResult, Path]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    write_dataset(out / "data", domains=DOMAINS, images_per_domain=max(images, 8), size=DEMO_SIZE, seed=seed)
    config = demo_config(out, images, seed, device)
    return run_score(config, console), config.out
