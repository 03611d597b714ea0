"""torchrun scale-out of tune: 2 CPU processes (gloo) with batch 1 each equal 1 process with batch 2 (same draws,
gradients averaged by DistributedDataParallel), and only rank 0 writes."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from conftest import write_random_scores
from safetensors.torch import load_file

from fisherscan.data.synthetic import write_dataset
from fisherscan.models.backbone import build_backbone
from fisherscan.scores.file import save_scores

MODEL = "timm:vit_tiny_patch16_224"


def test_two_ranks_equal_one_process_with_the_global_batch(tmp_path):
    source = write_dataset(tmp_path / "data", domains=("source",), images_per_domain=4, size=(48, 48))["source"]
    torch.manual_seed(0)
    backbone = build_backbone(MODEL, random_init=True).model
    g = torch.Generator().manual_seed(0)
    scores = {kind: {n: torch.rand(p.shape, generator=g) for n, p in backbone.named_parameters()}
              for kind in ("fim", "fim_shift", "delta", "drfim")}
    save_scores(tmp_path / "scores.safetensors", scores, {"model": MODEL, "images": 4, "head": None})
    common = ["-m", "fisherscan", "tune", "--scores", str(tmp_path / "scores.safetensors"), "--model", MODEL,
              "--random-init", "--data", str(source), "--crop", "32", "--steps", "3", "--lr", "1e-3",
              "--warmup-steps", "0", "--workers", "0", "--device", "cpu"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    single = subprocess.run([sys.executable, *common, "--batch-size", "2", "--out", str(tmp_path / "one")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert single.returncode == 0, single.stderr[-2000:]
    double = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             *common, "--batch-size", "1", "--out", str(tmp_path / "two")],
                            capture_output=True, text=True, env=env, timeout=300)
    assert double.returncode == 0, double.stderr[-2000:]
    assert double.stdout.count("model:") == 1, double.stdout  # rank 0 reports, once
    one = load_file(str(tmp_path / "one" / "model.safetensors"))
    two = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert set(one) == set(two)
    # Adam divides by sqrt(v): elements with near-zero gradients amplify float rounding of the all-reduce, so allow
    # a tenth of one lr step anywhere and 1e-5 almost everywhere; wrong sharding or averaging moves most elements
    # by about one lr step (1e-3).
    differences = torch.cat([(one[k].float() - two[k].float()).abs().flatten() for k in one])
    assert differences.max() < 1e-4
    assert (differences > 1e-5).float().mean() < 1e-4
    assert not list((tmp_path / "two").glob(".*.tmp"))


def test_two_ranks_tune_the_mask2former_head(tmp_path):
    """DistributedDataParallel over the Mask2Former head (every parameter must take part in each step, or DDP
    stops at the second one): 2 CPU ranks run 3 steps, rank 0 writes a finite model and reports once."""
    pytest.importorskip("transformers")
    model = "timm:vit_tiny_patch16_224?depth=4&embed_dim=64&num_heads=2"
    head = "mask2former?num_queries=4&train_num_points=64&encoder_layers=1&decoder_layers=2&hidden_dim=64"
    source = write_dataset(tmp_path / "data", domains=("source",), images_per_domain=4, size=(48, 48))["source"]
    write_random_scores(tmp_path / "scores.safetensors", model, 4)
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                          "-m", "fisherscan", "tune", "--scores", str(tmp_path / "scores.safetensors"), "--model",
                          model,
                          "--random-init", "--data", str(source), "--decoder", head, "--crop", "32", "--steps", "3",
                          "--batch-size", "1", "--warmup-steps", "0", "--workers", "0", "--device", "cpu",
                          "--out", str(tmp_path / "two")],
                         capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert run.stdout.count("model:") == 1, run.stdout
    tensors = load_file(str(tmp_path / "two" / "model.safetensors"))
    assert any(name.startswith("decoder/") for name in tensors)
    assert all(torch.isfinite(t).all() for t in tensors.values())
