"""``fisherscan score``'s DR-FIM options: label draws, the shift families, real shift data, the balance and the
reliability report.

Oracles: a per-image autograd loop written here (its own inverse-CDF label sampling) for F(x), F(x') with K label
draws and both image halves, with the reliability numbers recomputed from them by numpy sets and scipy's Spearman;
exact zeros for a paired --shift-data that is a copy of the source; one process for two ranks; an uninterrupted
run for a stopped and continued one.
"""

from __future__ import annotations

import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from conftest import invoke, ok, one_error_line
from scipy.stats import spearmanr

import fisherscan
from fisherscan.data.datasets import SegmentationDataset
from fisherscan.data.layouts import find_pairs
from fisherscan.data.synthetic import write_dataset
from fisherscan.fisher.drfim import dr_fim_terms
from fisherscan.fisher.pixel_shift import PixelShift, shift_pixels
from fisherscan.models.backbone import build_backbone
from fisherscan.models.groups import candidate_names, parameter_groups
from fisherscan.models.segmenter import Segmenter
from fisherscan.recipes.config import ScoreConfig
from fisherscan.recipes.score import run_score
from fisherscan.rng import keyed_generator
from fisherscan.scores.file import load_scores

MODEL = "timm:vit_tiny_patch16_224?embed_dim=16&depth=2&num_heads=2&img_size=32"
COMMON = ["--model", MODEL, "--random-init", "--crop", "32", "--workers", "0", "--warmup-steps", "2",
          "--batch-size", "3", "--seed", "0", "--device", "cpu"]


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return write_dataset(root, domains=("source",), images_per_domain=6, size=(48, 48), seed=5)["source"]


# ----------------------------------------------------------------------------------------------------------
# the oracle: per-image autograd


def image_squares(model, x, y, uniforms):
    """One image's squared gradient of the summed pixel loss w.r.t. the backbone, labels drawn from the model by
    inverse CDF with ``uniforms`` (searchsorted, valid pixels only)."""
    params = [p for p in model.backbone.parameters()]
    logits = F.interpolate(model(x[None]), size=y.shape, mode="bilinear", align_corners=False)[0]
    valid = y != 255
    cdf = torch.softmax(logits.detach(), 0).cumsum(0).permute(1, 2, 0).contiguous()
    target = torch.searchsorted(cdf, uniforms.unsqueeze(-1).contiguous()).squeeze(-1).clamp(max=logits.shape[0] - 1)
    target[~valid] = 0
    loss = (F.cross_entropy(logits[None], target[None], reduction="none")[0] * valid).sum()
    return [g.detach() ** 2 for g in torch.autograd.grad(loss, params)]


def oracle_fishers(data: Path, draws: int):
    """Per half (even, odd image index) and in all: (F(x), F(x')) of the pixel family, averaged over ``draws`` label
    draws, each with its own pixel shift."""
    torch.manual_seed(0)
    backbone = build_backbone(MODEL, random_init=True)
    model = Segmenter(backbone.model, 19, "linear").eval()
    names = [n for n, _ in model.backbone.named_parameters()]
    mean, std = backbone.model.pretrained_cfg["mean"], backbone.model.pretrained_cfg["std"]
    _, pairs = find_pairs(data, "generic")
    dataset = SegmentationDataset(pairs, 32, pad_multiple=16, seed=0, mean=mean, std=std)
    sums = {h: [[torch.zeros_like(p) for p in model.backbone.parameters()] for _ in range(2)] for h in (0, 1)}
    for i in range(len(dataset)):
        x, y, _ = dataset[i]
        for d in range(draws):  # each label draw with a pixel shift of its own
            pixel_draws = PixelShift(strength=3.0).draw(keyed_generator(0, i, "pixel", d))  # the default strength
            shifted = shift_pixels(x[None], pixel_draws[None], mean, std)[0]
            u = torch.rand(y.shape, generator=keyed_generator(0, i, "labels", d))
            for k, image in enumerate((x, shifted)):
                for total, square in zip(sums[i % 2][k], image_squares(model, image, y, u)):
                    total += square / draws

    def fisher(halves, k, count):
        return {n: sum(sums[h][k][j] for h in halves) / count for j, n in enumerate(names)}

    n = len(dataset)
    return ({"all": (fisher((0, 1), 0, n), fisher((0, 1), 1, n))}
            | {h: (fisher((h,), 0, (n + 1 - h) // 2), fisher((h,), 1, (n + 1 - h) // 2)) for h in (0, 1)})


def oracle_agreement(a: dict, b: dict, kind: str, names: list[str], k: int) -> tuple[float, float]:
    va = np.concatenate([a[kind][n].numpy().ravel() for n in sorted(names)])
    vb = np.concatenate([b[kind][n].numpy().ravel() for n in sorted(names)])
    top_a, top_b = set(np.argsort(-va, kind="stable")[:k]), set(np.argsort(-vb, kind="stable")[:k])
    return len(top_a & top_b) / len(top_a | top_b), spearmanr(va, vb).statistic


def test_label_draws_and_halves_equal_a_per_image_loop(tmp_path, data):
    config = ScoreConfig(model=MODEL, random_init=True, data=data, out=tmp_path / "s.safetensors", crop=32,
                         batch_size=3, warmup_steps=0, workers=0, device="cpu", shift="pixel", shift_weight=0.5,
                         label_draws=2, replicates=2)
    result = run_score(config)
    expected = oracle_fishers(data, draws=2)
    for kind, k in (("fim", 0), ("fim_shift", 1)):
        for name, value in expected["all"][k].items():
            scale = value.abs().max().clamp_min(1e-30)
            assert float((result.scores[kind][name] - value).abs().max() / scale) < 1e-4, (kind, name)
    # the reliability record: Eq. 5/7 on each half, then their agreement, recomputed here
    names = [n for n, _ in build_backbone(MODEL, random_init=True).model.named_parameters()]
    candidates = candidate_names(parameter_groups((n, result.scores["fim"][n].shape) for n in names))
    halves = []
    for h in (0, 1):
        f, f_shift = expected[h]
        delta, drfim, _ = dr_fim_terms(f, f_shift, 0.5, True, candidates, combine="rank")  # the default
        halves.append({"fim": f, "fim_shift": f_shift, "delta": delta, "drfim": drfim})
    record = result.metadata["reliability"]
    k = math.floor(0.05 * sum(t.numel() for t in result.scores["fim"].values()))
    for kind in ("fim", "delta", "drfim"):
        jaccard, rho = oracle_agreement(*halves, kind, candidates, k)
        assert record[kind]["k"] == k
        assert abs(record[kind]["jaccard_top"] - jaccard) < 0.01, kind  # near-ties at the cut may swap
        assert abs(record[kind]["spearman_halves"] - rho) < 1e-3, kind
        assert math.isclose(record[kind]["spearman_brown"], 2 * record[kind]["spearman_halves"] /
                            (1 + record[kind]["spearman_halves"]))
    assert result.metadata["label_draws"] == 2 and result.metadata["perturbation"]["family"] == "pixel"


def test_a_paired_copy_of_the_source_changes_nothing(tmp_path, data):
    copy = tmp_path / "copy"
    shutil.copytree(data, copy)
    ok(invoke("score", *COMMON, "--data", data, "--shift-data", copy, "--out", tmp_path / "s.safetensors"))
    scores, meta = load_scores(tmp_path / "s.safetensors")
    assert meta["perturbation"]["family"] == "paired"
    for name, value in scores["fim"].items():
        assert torch.equal(scores["fim_shift"][name], value), name
        assert not scores["delta"][name].any(), name
    assert meta["shift"]["magnitude"] == 0.0


def test_unpaired_shift_data_samples_its_labels(tmp_path, data):
    rain = write_dataset(tmp_path / "other", domains=("rain",), images_per_domain=4, size=(40, 56), seed=9)["rain"]
    result = ok(invoke("score", *COMMON, "--data", data, "--shift-data", rain / "images", "--out",
                       tmp_path / "s.safetensors"))
    scores, meta = load_scores(tmp_path / "s.safetensors")
    assert meta["perturbation"]["family"] == "unpaired" and "unpaired" in result.stdout
    assert any(bool(v.any()) for v in scores["delta"].values())
    one_error_line(invoke("score", *COMMON, "--data", data, "--shift-data", rain / "images", "--labels", "given",
                          "--out", tmp_path / "g.safetensors"), "--shift-data", "--labels sampled")


@pytest.mark.parametrize("options", [
    ["--shift", "eq6", "--label-draws", "2", "--replicates", "2", "--perturb-at", "0,1", "--perturb-prob", "0.5",
     "--spread", "pool", "--spread-pool", "4", "--perturb-strength", "2"],
    ["--label-draws", "2", "--drfim-weight", "3"],  # the defaults: pixel, rank
], ids=["eq6-sites-draws-halves", "pixel-rank"])
def test_stop_and_continue_gives_the_bytes_of_one_run(tmp_path, data, options):
    args = ["score", *COMMON, "--data", data, *options]
    ok(invoke(*args, "--out", "whole.safetensors", cwd=tmp_path))
    ok(invoke(*args, "--out", "pause.safetensors", "--stop-after", "1", cwd=tmp_path))
    assert (tmp_path / "pause.partial.safetensors").exists()
    ok(invoke(*args, "--out", "pause.safetensors", "--resume", cwd=tmp_path))
    whole, paused = (tmp_path / "whole.safetensors").read_bytes(), (tmp_path / "pause.safetensors").read_bytes()
    assert whole.replace(b"whole", b"-") == paused.replace(b"pause", b"-")  # the names of the files aside


def start_ranks(args: list, world: int = 2) -> list[tuple[int, str]]:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(Path(fisherscan.__file__).parents[1]),
           "WORLD_SIZE": str(world), "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    ranks = [subprocess.Popen([sys.executable, "-m", "fisherscan", *map(str, args)], env={**env, "RANK": str(r),
                              "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for r in range(world)]
    return [(rank.wait(timeout=300), rank.communicate()[1]) for rank in ranks]


@pytest.mark.slow
@pytest.mark.parametrize("options", [
    ["--shift", "eq6", "--label-draws", "2", "--replicates", "2", "--perturb-at", "0,1", "--perturb-prob", "0.5",
     "--perturb-strength", "2", "--combine", "sum"],
    ["--shift-data", "COPY", "--drfim-weight", "3", "--spread", "pool"],
], ids=["eq6-sites-global-spread", "shift-data"])
def test_two_ranks_equal_one_process(tmp_path, data, options):
    shutil.copytree(data, tmp_path / "copy")
    (tmp_path / "copy" / "images" / "scene_00001.png").write_bytes((data / "images" / "scene_00004.png").read_bytes())
    options = [str(tmp_path / "copy") if o == "COPY" else o for o in options]
    args = ["score", *COMMON, "--batch-size", "4", "--data", data, *options]
    ok(invoke(*args, "--out", tmp_path / "one.safetensors"))
    for code, err in start_ranks([*args, "--out", tmp_path / "two.safetensors"]):
        assert code == 0, err[-2000:]
    (a, meta_a), (b, meta_b) = load_scores(tmp_path / "one.safetensors"), load_scores(tmp_path / "two.safetensors")
    assert meta_b["world_size"] == 2 and meta_a["images"] == meta_b["images"]
    assert meta_a["shift"]["magnitude"] == pytest.approx(meta_b["shift"]["magnitude"], rel=1e-5)
    ranked = meta_a["balance"]["combine"] == "rank"  # float rounding may swap two near-equal elements' ranks
    candidates = sum(a["fim"][n].numel() for n in a["fim"] if ".attn.qkv." in n or ".mlp." in n)
    for kind in ("fim", "fim_shift", "delta", "drfim"):
        for name in a[kind]:
            difference = (b[kind][name] - a[kind][name]).abs().max()
            if kind == "drfim" and ranked:
                assert float(difference) <= 4.0 / candidates, name  # two rank steps of each term at most
            else:
                assert float(difference / a[kind][name].abs().max().clamp_min(1e-30)) < 1e-5, (kind, name)
    if "reliability" in meta_a:
        assert meta_a["reliability"]["fim"]["spearman_halves"] == pytest.approx(
            meta_b["reliability"]["fim"]["spearman_halves"], abs=1e-4)


@pytest.mark.parametrize("options, needles", [
    (["--shift-data", "MISSING"], ["--shift-data", "not found"]),
    (["--shift-data", "EMPTY"], ["--shift-data", "no png/jpg"]),
    (["--perturb-at", "0,9"], ["--perturb-at", "0..1"]),
    (["--perturb-at", "1,0"], ["--perturb-at", "increasing"]),
    (["--drfim-weight", "-1"], ["--drfim-weight", ">= 0"]),
    (["--label-draws", "0"], ["--label-draws", "at least 1"]),
    (["--literal", "--combine", "rank"], ["--literal", "--combine"]),
    (["--literal", "--drfim-weight", "2"], ["--literal", "--drfim-weight"]),
    (["--perturb-prob", "0"], ["--perturb-prob"]),
    (["--shift", "snow"], ["--shift snow", "eq6"]),
], ids=lambda v: v if isinstance(v, str) else None)
def test_bad_options_are_one_line_before_any_work(tmp_path, data, options, needles):
    (tmp_path / "empty").mkdir()
    options = [str(tmp_path / "missing") if o == "MISSING" else str(tmp_path / "empty") if o == "EMPTY" else o
               for o in options]
    result = invoke("score", *COMMON, "--data", data, *options, "--out", tmp_path / "s.safetensors")
    one_error_line(result, *needles)
    assert "warm-up" not in result.stderr  # refused before the decoder's warm-up
