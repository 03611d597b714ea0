"""The built-in demo, run once for real through the CLI (``fisherscan demo --out DIR --images 8``).

The CLI calls ``fisherscan.bench.demo.run_demo``; a pass-through spy records its arguments and return value, so one
run (the demo is the slowest thing in the test suite) checks both the function and the command.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from conftest import invoke

import fisherscan.bench.demo
from fisherscan.bench.demo import DEMO_MODEL
from fisherscan.data.synthetic import DOMAINS
from fisherscan.recipes.score import ScoreResult
from fisherscan.scores.file import load_scores

IMAGES = 8



@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("demo") / "out"
    calls = []
    real = fisherscan.bench.demo.run_demo

    def spy(*args, **kwargs):
        returned = real(*args, **kwargs)
        calls.append((args, kwargs, returned))
        return returned

    patch = pytest.MonkeyPatch()
    patch.setattr(fisherscan.bench.demo, "run_demo", spy)
    try:
        result = invoke(*["demo", "--out", str(out), "--images", str(IMAGES), "--tune-steps", "2"])
    finally:
        patch.undo()
    return {"out": out, "result": result, "calls": calls}


@pytest.mark.slow
def test_demo_command_exits_0_and_prints_the_output_paths(demo_run):
    result, out = demo_run["result"], demo_run["out"]
    assert result.exit_code == 0, f"{result.exception!r}\n{result.stderr}"
    lines = result.stdout.splitlines()
    for label, path in (("scores:", out / "scores.safetensors"), ("head:", out / "scores.head.safetensors"),
                        ("table:", out / "scores.groups.csv"), ("data:", out / "data")):
        line = next((row for row in lines if row.startswith(label)), None)
        assert line is not None, result.stdout
        assert line.split()[1] == str(path), line


@pytest.mark.slow
def test_run_demo_returns_the_result_and_the_scores_path(demo_run):
    out = demo_run["out"]
    assert len(demo_run["calls"]) == 1
    args, kwargs, (result, scores_path) = demo_run["calls"][0]
    assert Path(args[0]) == out and kwargs["images"] == IMAGES
    assert isinstance(result, ScoreResult)
    assert scores_path == out / "scores.safetensors"
    assert result.head_path == out / "scores.head.safetensors"
    assert result.metadata["images"] == IMAGES


@pytest.mark.slow
def test_demo_writes_scores_head_and_all_five_domains(demo_run):
    out = demo_run["out"]
    scores, meta = load_scores(out / "scores.safetensors")
    assert set(scores) == {"fim", "fim_shift", "delta", "drfim"}
    assert meta["model"] == DEMO_MODEL and meta["random_init"] is True
    assert meta["images"] == IMAGES
    assert Path(meta["data"]["path"]) == out / "data" / "source"
    for kind, by_name in scores.items():
        assert "blocks.11.attn.qkv.weight" in by_name and "blocks.12.attn.qkv.weight" not in by_name  # ViT-S: 12
        for name, tensor in by_name.items():
            assert torch.isfinite(tensor).all() and (tensor >= 0).all(), f"{kind}/{name}"
    assert (out / "scores.head.safetensors").is_file()
    assert (out / "scores.groups.csv").is_file()

    assert set(DOMAINS) == {"source", "fog", "night", "colour", "blur"}
    first_label = None
    for domain in DOMAINS:
        images = sorted((out / "data" / domain / "images").glob("*.png"))
        labels = sorted((out / "data" / domain / "labels").glob("*.png"))
        assert len(images) == IMAGES and [p.name for p in images] == [p.name for p in labels], domain
        label = labels[0].read_bytes()
        first_label = first_label or label
        assert label == first_label, f"{domain}: scene 0 must have the same label map in every domain"



@pytest.mark.slow
def test_demo_tunes_both_strategies_and_evaluates_every_domain(demo_run):
    out = demo_run["out"]
    assert "mIoU (%) on held-out scenes" in demo_run["result"].stdout
    for strategy in ("drfim", "freeze"):
        run = out / f"run_{strategy}"
        assert (run / "model.safetensors").is_file() and (run / "log.csv").is_file()
        evaluation = json.loads((run / "eval" / "eval.json").read_text())
        assert [d["name"] for d in evaluation["datasets"]] == list(DOMAINS)
    manifest = json.loads((out / "run_freeze" / "manifest.json").read_text())
    assert manifest["trainable"]["backbone_elements"] == 0
