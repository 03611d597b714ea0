"""torchrun scale-out of score (fisherscan.sharding): 2 CPU processes (gloo) give the scores of 1 process with the
same options (oracle: the single-process run); the shards cover every image once; the global Eq. 6 spread equals
perturb.statistic_spread of the whole batch (oracle: the single-process formula)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.distributed as dist

import fisherscan
from fisherscan.data.synthetic import write_dataset
from fisherscan.fisher.perturb import channel_statistics, statistic_spread
from fisherscan.recipes.config import ScoreConfig
from fisherscan.recipes.distributed import Ranks, global_spread, rank_parts, shard_bounds
from fisherscan.recipes.score import run_score
from fisherscan.scores.file import load_scores


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


def test_two_ranks_give_the_scores_of_one_process(tmp_path):
    """The two ranks are started as torchrun starts them (RANK, WORLD_SIZE, MASTER_ADDR/PORT in the environment),
    without the launcher process; the one-process run is in this process."""
    source = write_dataset(tmp_path / "data", domains=("source",), images_per_domain=5, size=(40, 40))["source"]
    model = "timm:vit_small_patch16_224?depth=2&embed_dim=32&num_heads=2"
    options = dict(model=model, random_init=True, data=source, crop=32, batch_size=4, warmup_steps=2, workers=0,
                   device="cpu")
    run_score(ScoreConfig(out=tmp_path / "one.safetensors", **options))

    command = [sys.executable, "-m", "fisherscan", "score", "--model", model, "--random-init", "--data", str(source),
               "--crop", "32", "--batch-size", "4", "--warmup-steps", "2", "--workers", "0", "--device", "cpu",
               "--out", str(tmp_path / "two.safetensors")]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(fisherscan.__file__).parents[1]),
           "WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(free_port())}
    ranks = [subprocess.Popen(command, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True) for r in range(2)]
    outputs = [rank.communicate(timeout=300) for rank in ranks]
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
