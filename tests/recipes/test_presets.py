"""fisherscan.recipes: --recipe rein-512 sets FISHERTUNE.md's protocol (values written out here from the document)
and options given on the command line win (read back from the run's manifest)."""

from __future__ import annotations

import json

import pytest
from conftest import invoke

from fisherscan.errors import FisherscanError
from fisherscan.recipes.config import TuneConfig
from fisherscan.recipes.presets import apply_recipe

MODEL = "timm:vit_tiny_patch16_224?depth=2"
PROTOCOL = {"decoder": "mask2former", "crop": 512, "batch_size": 4, "lr": 1e-4, "weight_decay": 0.05, "power": 0.9,
            "steps": 40000, "augment": "rein", "eval_crop": 512, "eval_stride": 341}


def test_rein_512_values_and_overrides(tmp_path):
    base = TuneConfig(scores=tmp_path, model="m", data=tmp_path, out=tmp_path, recipe="rein-512", steps=10)
    preset = apply_recipe(base)
    assert {k: getattr(preset, k) for k in PROTOCOL} == PROTOCOL
    kept = apply_recipe(base, explicit={"steps"})
    assert kept.steps == 10 and kept.crop == 512
    assert apply_recipe(TuneConfig(scores=tmp_path, model="m", data=tmp_path, out=tmp_path)).augment == "crop"
    with pytest.raises(FisherscanError, match="--recipe"):
        apply_recipe(TuneConfig(scores=tmp_path, model="m", data=tmp_path, out=tmp_path, recipe="rein-1024"))


def test_cli_applies_the_recipe_under_explicit_options(tmp_path):
    import torch

    from fisherscan.data.synthetic import write_dataset
    from fisherscan.models.backbone import build_backbone
    from fisherscan.scores.file import save_scores

    data = write_dataset(tmp_path / "data", domains=("source",), images_per_domain=2, size=(40, 40))["source"]
    torch.manual_seed(0)
    backbone = build_backbone(MODEL, random_init=True).model
    scores = tmp_path / "scores.safetensors"
    save_scores(scores, {k: {n: torch.rand(p.shape) for n, p in backbone.named_parameters()}
                         for k in ("fim", "fim_shift", "delta", "drfim")}, {"model": MODEL, "images": 2, "head": None})
    out = tmp_path / "run"
    result = invoke(*["tune", "--recipe", "rein-512", "--scores", str(scores), "--model", MODEL,
                                      "--random-init", "--data", str(data), "--out", str(out), "--steps", "1",
                                      "--crop", "32", "--batch-size", "2", "--decoder", "linear", "--warmup-steps", "1",
                                      "--workers", "0"])
    assert result.exit_code == 0, result.output
    options = json.loads((out / "manifest.json").read_text())["options"]
    assert options["recipe"] == "rein-512" and (options["steps"], options["crop"], options["batch_size"]) == (1, 32, 2)
    assert options["decoder"] == "linear"
    assert {k: options[k] for k in ("lr", "weight_decay", "power", "augment", "eval_crop", "eval_stride")} == \
        {k: PROTOCOL[k] for k in ("lr", "weight_decay", "power", "augment", "eval_crop", "eval_stride")}
