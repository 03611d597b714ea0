"""torchrun scale-out of score and tune (``fisherscan.recipes.distributed``), on 2 CPU processes (gloo).

score: the shards cover every image once; the global Eq. 6 spread equals ``statistic_spread`` of the whole batch
(oracle: the single-process formula); 2 ranks give the scores of 1 process with the same options (oracle: the
one-process run); a bad image that only rank 1 reads stops both ranks with the same one-line error, within a timeout
(no rank waits in a collective for the other). tune: 2 processes with batch 1 each equal 1 process with batch 2
(same draws, gradients averaged by DistributedDataParallel), and only rank 0 writes.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist
from conftest import write_random_scores
from safetensors.torch import load_file

import fisherscan
from fisherscan.data.synthetic import write_dataset
from fisherscan.fisher.perturb import channel_statistics, statistic_spread
from fisherscan.models.backbone import build_backbone
from fisherscan.recipes.config import ScoreConfig
from fisherscan.recipes.distributed import Ranks, global_spread, rank_parts, shard_bounds
from fisherscan.recipes.score import run_score
from fisherscan.scores.file import load_scores, save_scores

MODEL = "timm:vit_tiny_patch16_224"
SCORE_MODEL = "timm:vit_small_patch16_224?depth=2&embed_dim=32&num_heads=2"


@pytest.mark.parametrize("total,batch,world", [(5, 4, 2), (7, 3, 3), (2, 4, 4), (8, 8, 1)])
def test_rank_parts_cover_every_image_once_in_order(total, batch, world):
    parts = [rank_parts(total, batch, Ranks(r, world)) for r in range(world)]
    for g in range(len(parts[0])):  # batch g: the ranks' parts, in rank order, are that batch's images
        joined = [i for r in range(world) for i in parts[r][g]]
        assert joined == list(range(g * batch, min((g + 1) * batch, total)))
    sizes = [shard_bounds(10, r, 3) for r in range(3)]
    assert sizes == [(0, 3), (3, 6), (6, 10)]


def test_global_spread_equals_the_single_process_spread(tmp_path):
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        tokens = 2 + 3 * torch.randn(5, 7, 4, generator=torch.Generator().manual_seed(0))
        got = global_spread(tokens, 4, torch.device("cpu"))
        expected = statistic_spread(*channel_statistics(tokens))
        for a, b in zip(got, expected):
            torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
        single = global_spread(tokens[:1], 4, torch.device("cpu"))  # one image: no spread
        assert all(float(s.abs().max()) == 0 for s in single)
        empty = global_spread(None, 4, torch.device("cpu"))
        assert all(float(s.abs().max()) == 0 for s in empty)
    finally:
        dist.destroy_process_group()


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def start_ranks(command: list[str], world: int = 2) -> list[subprocess.Popen]:
    """The ranks started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment), without
    the launcher process."""
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(fisherscan.__file__).parents[1]),
           "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    return [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True) for r in range(world)]


def finish(ranks: list[subprocess.Popen], timeout: float) -> list[tuple[str, str]]:
    """(stdout, stderr) of every rank; a rank still running after ``timeout`` seconds fails the test (killed)."""
    outputs = []
    for rank in ranks:
        try:
            outputs.append(rank.communicate(timeout=timeout))
        except subprocess.TimeoutExpired:
            for other in ranks:
                other.kill()
            pytest.fail(f"a rank still ran after {timeout} s: a collective waited for a rank that had stopped")
    return outputs


def score_command(source: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "fisherscan", "score", "--model", SCORE_MODEL, "--random-init", "--data",
            str(source), "--crop", "32", "--batch-size", "4", "--warmup-steps", "2", "--workers", "0", "--device",
            "cpu", "--out", str(out)]


@pytest.mark.slow
def test_two_ranks_give_the_scores_of_one_process(tmp_path):
    """The one-process run is in this process."""
    source = write_dataset(tmp_path / "data", domains=("source",), images_per_domain=5, size=(40, 40))["source"]
    options = dict(model=SCORE_MODEL, random_init=True, data=source, crop=32, batch_size=4, warmup_steps=2,
                   workers=0, device="cpu")
    run_score(ScoreConfig(out=tmp_path / "one.safetensors", **options))
    ranks = start_ranks(score_command(source, tmp_path / "two.safetensors"))
    outputs = finish(ranks, timeout=300)
    for rank, (_, err) in zip(ranks, outputs):
        assert rank.returncode == 0, err[-2000:]
    (a, meta_a), (b, meta_b) = load_scores(tmp_path / "one.safetensors"), load_scores(tmp_path / "two.safetensors")
    assert meta_a["images"] == meta_b["images"] == 5 and meta_b["world_size"] == 2
    assert meta_a["shift"]["magnitude"] == pytest.approx(meta_b["shift"]["magnitude"], rel=1e-5)
    for kind in ("fim", "fim_shift"):
        assert set(a[kind]) == set(b[kind])
        for name in a[kind]:  # sums in another order (per rank, then all-reduced): float rounding only
            scale = a[kind][name].abs().max().clamp_min(1e-30)
            assert float((b[kind][name] - a[kind][name]).abs().max() / scale) < 1e-5, name
    # rank 0 printed the table once; rank 1 printed nothing
    assert "scores:" in outputs[0][0] and "scores:" not in outputs[1][0]


@pytest.mark.slow
def test_a_bad_image_on_one_rank_stops_every_rank_with_the_same_error(tmp_path):
    """5 images, batch 4: rank 0 reads images 0-1 and 4, rank 1 images 2-3. Image 2 has a valid header (so the
    up-front check passes) and corrupt pixels, so only rank 1 fails to decode it, in the middle of the loop."""
    source = write_dataset(tmp_path / "data", domains=("source",), images_per_domain=5, size=(40, 40))["source"]
    bad = sorted((source / "images").glob("*.png"))[2]
    bad.write_bytes(bad.read_bytes()[:80])
    ranks = start_ranks(score_command(source, tmp_path / "two.safetensors"))
    outputs = finish(ranks, timeout=300)
    errors = []
    for rank, (_, err) in zip(ranks, outputs):
        assert rank.returncode == 2, err[-2000:]
        assert "Traceback" not in err, err[-2000:]
        lines = [line for line in err.splitlines() if line.strip()]
        assert lines[-1].startswith("error:") and bad.name in lines[-1], err[-2000:]
        errors.append(lines[-1])
    assert errors[0] == errors[1]
    assert not (tmp_path / "two.safetensors").exists()


@pytest.mark.slow
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


@pytest.mark.slow
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
