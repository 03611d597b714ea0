"""``fisherscan demo``: score -> tune -> eval on a clean machine, no downloads, a few CPU minutes.

It writes procedural street scenes in five visual domains (``fisherscan.data.synthetic``), scores a small
DINOv2-architecture ViT (ViT-S/14, randomly initialised: no weights can be downloaded; its LayerScale starts at 1,
since at DINOv2's training init of 1e-5 an untrained block is an identity and nothing it holds can matter) on the
source domain, then
fine-tunes it from the DR-FIM scores and, as the baseline, with the backbone frozen (decoder only, same steps), and
evaluates both on held-out scenes of every domain.
"""

from __future__ import annotations

from pathlib import Path

from rich.console import Console

from ..data.synthetic import DOMAINS, write_dataset
from ..recipes.config import ScoreConfig, TuneConfig
from ..recipes.score import ScoreResult, run_score
from ..recipes.tune import TuneResult, run_tune

DEMO_STRATEGIES = ("drfim", "freeze")

DEMO_MODEL = "timm:vit_small_patch14_dinov2?init_values=1.0"  # untrained: LayerScale 1, not DINOv2's 1e-5

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


def tune_and_evaluate(out: Path, scores_path: Path, steps: int = 30, seed: int = 0, device: str = "auto",
                      console: Console | None = None, val_images: int = 8) -> dict[str, TuneResult]:
    """Tune from the demo's scores with each of DEMO_STRATEGIES (same head, steps and data), evaluating on held-out
    scenes (another seed) of all five domains."""
    out = Path(out)
    val = write_dataset(out / "data_val", domains=DOMAINS, images_per_domain=val_images, size=DEMO_SIZE, seed=seed + 1)
    results = {}
    for strategy in DEMO_STRATEGIES:
        config = TuneConfig(scores=scores_path, model=DEMO_MODEL, random_init=True, data=out / "data" / "source",
                            out=out / f"run_{strategy}", layout="generic", strategy=strategy, steps=steps,
                            batch_size=8, crop=112, lr=1e-3, save_every=max(steps, 1), eval=tuple(val.values()),
                            eval_layout="generic", eval_crop=112, eval_stride=112, seed=seed, device=device,
                            workers=0, overwrite=True)
        results[strategy] = run_tune(config, console)
    return results
