"""The golden configurations: three tiny runs of score -> partial -> tune -> mask -> eval, recorded once from the
code before the package layout changed (``make_golden.py``) and compared by ``test_golden.py`` ever since.

Every command runs in one working folder with relative paths, one torch thread, on the CPU, so the files it writes
do not depend on where the folder lies. The fixture files under ``tests/golden/<name>/`` are never edited.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

COMMON = ["--random-init", "--layout", "generic", "--seed", "0", "--device", "cpu", "--workers", "0"]

# score's options that reproduce the recordings' defaults, changed since: F(x') from Eq. 6 (now the pixel family),
# DR-FIM as the sum of the normalised terms (now their ranks), one label draw per image (now two), and the
# variational estimator and its Eq. 15 reading (now tau picked by a pilot, 200 steps, the data part kept apart, the
# VOGN curvature, Eq. 15 as printed)
SCORE_AS_RECORDED = ["--shift", "eq6", "--combine", "sum", "--label-draws", "1", "--tau", "0.001", "--var-legacy",
                     "--var-curvature", "reparam", "--no-var-control", "--eq15", "substituted"]

# name -> the model spec, the crop, and the extra options of score, tune and mask
CONFIGS = {
    # DINOv2 block design with 4 registers and LayerScale; multilevel head; diagonal estimator, sampled labels
    "dinov2": {
        "model": "timm:vit_small_patch14_reg4_dinov2?embed_dim=16&depth=2&num_heads=2&img_size=42&mlp_ratio=2.0"
                 "&init_values=1.0",
        "crop": 42,
        "score": ["--batch-size", "4", "--decoder", "multilevel", "--var-steps", "500"],
        "partial": ["--stop-after", "1"],
        "tune": ["--batch-size", "4", "--steps", "4", "--save-every", "2", "--lr", "1e-3", "--decoder", "multilevel"],
        "mask": ["--budget", "5%"],
    },
    # plain ViT, patch 8; linear head; variational estimator, given labels, Eq. 6 at block 1; Rein augmentation
    "variational": {
        "model": "timm:vit_tiny_patch16_224?embed_dim=16&depth=4&num_heads=2&patch_size=8&img_size=32"
                 "&mlp_ratio=2.0&init_values=1.0",
        "crop": 32,
        "score": ["--batch-size", "4", "--estimator", "variational", "--var-steps", "4",
                  "--labels", "given", "--perturb-at", "1", "--save-every", "2"],
        "partial": ["--stop-after", "5"],
        "tune": ["--batch-size", "2", "--accumulate", "2", "--steps", "4", "--save-every", "2", "--lr", "1e-3",
                 "--strategy", "fim", "--augment", "rein"],
        "mask": ["--budget", "10%", "--strategy", "random", "--seed", "3"],
    },
    # SAM (windowed + global attention with relative positions); --skip-bad over one corrupt pair
    "sam": {
        "model": "sam_vitb16?depth=2&embed_dim=16&num_heads=2&img_size=32&window_size=1&global_attn_indexes=(1,)",
        "crop": 32,
        "score": ["--batch-size", "3", "--skip-bad", "--var-steps", "500"],
        "partial": ["--stop-after", "2"],
        "tune": ["--batch-size", "4", "--steps", "4", "--save-every", "2", "--lr", "1e-3", "--strategy", "drfim",
                 "--delta-min", "2%", "--delta-max", "10%", "--skip-bad"],
        "mask": ["--budget", "5%", "--strategy", "scores", "--score-kind", "delta"],
    },
}


def make_data(work: Path) -> None:
    """Generated scenes: 8 source images (one of them unreadable, for --skip-bad) and 4 held-out scenes per
    domain in source and fog."""
    from fisherscan.data.synthetic import write_dataset

    write_dataset(work / "data", domains=("source",), images_per_domain=8, size=(64, 64), seed=0)
    write_dataset(work / "val", domains=("source", "fog"), images_per_domain=4, size=(64, 64), seed=1)
    bad = work / "data_bad"
    write_dataset(bad, domains=("source",), images_per_domain=9, size=(64, 64), seed=0)
    images = sorted((bad / "source" / "images").rglob("*.png"))
    images[4].write_bytes(np.random.default_rng(0).bytes(64))  # not an image: --skip-bad leaves it out


def commands(name: str) -> list[list[str]]:
    """The CLI calls of one configuration, in order, relative to the working folder."""
    config = CONFIGS[name]
    data = "data_bad/source" if name == "sam" else "data/source"
    crop = ["--crop", str(config["crop"])]
    model = ["--model", config["model"]]
    base = [*model, "--data", data, *crop, *COMMON]
    score = [*config["score"], *SCORE_AS_RECORDED]
    return [
        ["score", *base, "--images", "8", "--warmup-steps", "5", "--out", "scores.safetensors", *score],
        ["score", *base, "--images", "8", "--warmup-steps", "5", "--out", "partial.safetensors", *score,
         *config["partial"]],
        # recorded before Adam's bias correction counted per element: the earlier behaviour is --adam-bias-correction
        # global (the recorded manifests lack the option; keys added since are allowed)
        ["tune", *base, "--scores", "scores.safetensors", "--out", "run", *config["tune"],
         "--adam-bias-correction", "global"],
        ["mask", "--scores", "scores.safetensors", "--out", "mask.safetensors", *config["mask"]],
        ["eval", "--checkpoint", "run", "--data", "val/source", "--data", "val/fog", "--layout", "generic",
         *crop, "--stride", str(config["crop"]), "--device", "cpu", "--workers", "0"],
    ]


# the files each configuration records: path in the working folder -> path under tests/golden/<name>/
RECORDED = {
    "scores.safetensors": "scores.safetensors",
    "scores.head.safetensors": "scores.head.safetensors",
    "partial.partial.safetensors": "partial.partial.safetensors",
    "run/model.safetensors": "model.safetensors",
    "run/checkpoint.safetensors": "checkpoint.safetensors",
    "run/manifest.json": "manifest.json",
    "mask.safetensors": "mask.safetensors",
    "run/eval/eval.json": "eval.json",
}
