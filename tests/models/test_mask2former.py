"""fisherscan.mask2former: the neck's strides (hand-computed sizes; bilinear x1 = identity, x0.5 = 2x2 means), the
targets (hand-written), the semantic scores (a float64 loop over queries and pixels), training lowers the matched
loss, per-image Fisher gradients through the head (vmap engine vs a plain autograd loop), tune keeps unselected
elements bit-identical and resumes to the bit, head and run round trips, and score end to end."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from safetensors.torch import load_file
from timm.models.vision_transformer import VisionTransformer

pytest.importorskip("transformers")

from conftest import invoke, write_random_scores

from fisherscan.data.synthetic import write_dataset  # noqa: E402
from fisherscan.errors import FisherscanError  # noqa: E402
from fisherscan.eval.runs import load_run  # noqa: E402
from fisherscan.fisher.diagonal import squared_gradient_sum  # noqa: E402
from fisherscan.models.backbone import build_backbone  # noqa: E402
from fisherscan.models.decoders.blocks import rein_blocks as feature_blocks  # noqa: E402
from fisherscan.models.decoders.mask2former import ViTNeck, semantic_log_probs, semantic_scores, semantic_targets  # noqa: E402
from fisherscan.models.heads import load_head, save_head  # noqa: E402
from fisherscan.models.segmenter import Segmenter  # noqa: E402
from fisherscan.recipes.config import TuneConfig  # noqa: E402
from fisherscan.recipes.tune import run_tune  # noqa: E402
from fisherscan.scores.file import load_scores  # noqa: E402

TINY = "mask2former?num_queries=4&train_num_points=64&encoder_layers=1&decoder_layers=2&hidden_dim=64"
MODEL = "timm:vit_tiny_patch16_224?depth=4&embed_dim=64&num_heads=2"


def vit(patch: int, depth: int = 4, width: int = 32) -> VisionTransformer:
    return VisionTransformer(img_size=4 * patch, patch_size=patch, embed_dim=width, depth=depth, num_heads=2,
                             mlp_ratio=2.0, num_classes=0, dynamic_img_size=True)


def tiny(patch: int = 16, classes: int = 5, seed: int = 0, **kwargs) -> Segmenter:
    torch.manual_seed(seed)
    return Segmenter(vit(patch, **kwargs), classes, TINY).eval()


@pytest.mark.parametrize("patch, side, grid", [(14, 56, 4), (16, 64, 4), (14, 70, 5)])
def test_neck_strides_and_shapes(patch, side, grid):
    segmenter = tiny(patch)
    x = torch.randn(2, 3, side, side)
    maps, size = segmenter.features(x)
    assert size == (side, side) and all(m.shape == (2, 32, grid, grid) for m in maps)
    levels = ViTNeck(32)(torch.cat(maps, dim=1)).feature_maps
    assert [tuple(m.shape[-2:]) for m in levels] == [(4 * grid,) * 2, (2 * grid,) * 2, (grid,) * 2, (grid // 2,) * 2]
    strides = [side / m.shape[-1] for m in levels[:3]]
    assert strides == [patch / 4, patch / 2, patch]  # 4/8/16 for patch 16, 3.5/7/14 for patch 14
    assert torch.equal(levels[2], maps[2])  # x1: the block's map itself
    m = maps[3][..., : grid // 2 * 2, : grid // 2 * 2]  # x0.5 (align_corners=False) samples between 2x2 pixels
    means = m.unflatten(-1, (grid // 2, 2)).unflatten(-3, (grid // 2, 2)).mean(dim=(-1, -3))
    if grid % 2 == 0:
        torch.testing.assert_close(levels[3], means)
    with torch.no_grad():
        out = segmenter.decoder.outputs(maps)
        assert out.masks_queries_logits.shape == (2, 4, 4 * grid, 4 * grid)  # masks at the x4 level
        assert out.class_queries_logits.shape == (2, 4, 6)  # 5 classes + no-object
        assert segmenter(x).shape == (2, 5, side, side)  # log-likelihoods at the input size


def test_feature_blocks_rein_and_override():
    assert feature_blocks(24) == [7, 11, 15, 23] and feature_blocks(12) == [2, 5, 8, 11]
    assert feature_blocks(4) == [0, 1, 2, 3]
    assert tiny(depth=24, width=32).decoder.blocks == [7, 11, 15, 23]
    torch.manual_seed(0)
    assert Segmenter(vit(16, depth=6), 5, TINY, feature_blocks=[1, 2, 3, 5]).decoder.blocks == [1, 2, 3, 5]
    with pytest.raises(FisherscanError, match="--feature-blocks"):
        Segmenter(vit(16), 5, TINY, feature_blocks=[0, 1, 2, 9])
    with pytest.raises(FisherscanError, match="unknown option"):
        Segmenter(vit(16), 5, "mask2former?queries=4")
    with pytest.raises(FisherscanError, match="only mask2former"):
        Segmenter(vit(16), 5, "linear?num_queries=4")


def test_targets_from_a_label_map_with_ignore():
    y = torch.tensor([[[3, 3, 255], [0, 3, 255]],
                      [[255, 255, 255], [255, 255, 255]]])
    classes, masks = semantic_targets(y)
    assert classes[0].tolist() == [0, 3] and classes[1].tolist() == []
    assert masks[0].tolist() == [[[0, 0, 0], [1, 0, 0]], [[1, 1, 0], [0, 1, 0]]]  # ignore pixels 0 in every mask
    assert masks[0].dtype == torch.float32 and masks[1].shape == (0, 2, 3)


def test_semantic_scores_against_a_loop():
    g = torch.Generator().manual_seed(0)
    cls, masks = torch.randn(2, 3, 5, generator=g), 3 * torch.randn(2, 3, 4, 6, generator=g)
    s = semantic_scores(cls, masks, (4, 6)).double().numpy()
    c, m = cls.double().numpy(), masks.double().numpy()
    expected = np.zeros((2, 4, 4, 6))
    for b in range(2):
        for q in range(3):
            probs = np.exp(c[b, q]) / np.exp(c[b, q]).sum()
            for k in range(4):  # real classes only; index 4 is no-object
                expected[b, k] += probs[k] / (1 + np.exp(-m[b, q]))
    np.testing.assert_allclose(s, expected, rtol=1e-5)
    log_probs = semantic_log_probs(cls, masks, (8, 12))
    assert log_probs.shape == (2, 4, 8, 12)
    torch.testing.assert_close(log_probs.exp().sum(dim=1), torch.ones(2, 8, 12))
    up = semantic_scores(cls, masks, (8, 12))
    torch.testing.assert_close(log_probs, (up / up.sum(dim=1, keepdim=True)).log())


def test_training_lowers_the_matched_loss():
    segmenter = tiny(classes=3)
    x = torch.randn(2, 3, 32, 32)
    y = torch.zeros(2, 32, 32, dtype=torch.long)
    y[:, :, 16:] = 1
    y[0, :8] = 2
    y[1, :4] = 255
    optimizer = torch.optim.AdamW(segmenter.parameters(), lr=3e-3)
    torch.manual_seed(1)
    losses = []
    for _ in range(20):
        loss = segmenter(x, y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert np.mean(losses[-3:]) < 0.8 * np.mean(losses[:3]), losses
    assert all(p.grad is not None for p in segmenter.decoder.parameters())  # every head parameter is trained


def test_per_image_fisher_gradients_through_the_head():
    segmenter = tiny(classes=3)
    x, y = torch.randn(2, 3, 32, 32), torch.randint(0, 3, (2, 32, 32))
    y[0, :5] = 255
    for p in segmenter.decoder.parameters():
        p.requires_grad_(False)
    engine = squared_gradient_sum(segmenter, x, y, chunk_size=2)
    loop = {n: torch.zeros_like(p) for n, p in segmenter.named_parameters() if p.requires_grad}
    for i in range(2):
        segmenter.zero_grad()
        log_probs = segmenter(x[i : i + 1])
        torch.nn.functional.nll_loss(log_probs, y[i : i + 1], ignore_index=255, reduction="sum").backward()
        for n, p in segmenter.named_parameters():
            if p.grad is not None:  # the final norm is unused: no gradient, zero in the engine
                loop[n] += p.grad.square()
    assert set(engine) == set(loop)
    for n in loop:
        torch.testing.assert_close(engine[n], loop[n], rtol=1e-3, atol=1e-9 + 1e-4 * loop[n].abs().max().item())


def test_missing_transformers_is_one_line(monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "transformers.models.mask2former", None)  # import fails as if not installed
    with pytest.raises(FisherscanError, match=r"pip install 'fisherscan\[mask2former\]'"):
        Segmenter(vit(16), 5, "mask2former")


def test_head_round_trip(tmp_path):
    a, b = tiny(seed=0), tiny(seed=1)
    x = torch.randn(1, 3, 32, 32)
    save_head(tmp_path / "head.safetensors", a, {"model": "tiny"})
    info = load_head(tmp_path / "head.safetensors", b)
    assert info["decoder_spec"] == TINY and info["feature_blocks"] == [0, 1, 2, 3]
    with torch.no_grad():
        b.backbone.load_state_dict(a.backbone.state_dict())
        assert torch.equal(a(x), b(x))
    with pytest.raises(FisherscanError, match="does not fit"):
        load_head(tmp_path / "head.safetensors", Segmenter(vit(16), 5, "linear"))
    with pytest.raises(FisherscanError, match="--feature-blocks 0,1,2,3"):  # same shapes, other blocks
        load_head(tmp_path / "head.safetensors", Segmenter(vit(16), 5, TINY, feature_blocks=[0, 0, 1, 3]))


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_dataset(tmp_path_factory.mktemp("data"), domains=("source",), images_per_domain=3, size=(40,
                                                                                                          40))["source"]


@pytest.fixture(scope="module")
def scores_file(tmp_path_factory):
    return write_random_scores(tmp_path_factory.mktemp("scores") / "scores.safetensors", MODEL, 3, seed=123)


def tune_config(scores_file, source, out, **overrides) -> TuneConfig:
    options = dict(scores=scores_file, model=MODEL, random_init=True, data=source, out=out, crop=32, batch_size=2,
                   steps=3, lr=1e-3, decoder=TINY, warmup_steps=1, workers=0, seed=7, save_every=100)
    return TuneConfig(**{**options, **overrides})


def test_tune_keeps_unselected_elements_and_resumes_exactly(scores_file, source, tmp_path):
    result = run_tune(tune_config(scores_file, source, tmp_path / "full", eval=(source,), eval_stride=16))
    miou = result.evaluation.miou_by_dataset()  # slide evaluation runs unchanged on the log-likelihoods
    assert "source" in miou and all(0 <= v <= 1 for v in miou.values())
    torch.manual_seed(7)  # how run_tune builds an untrained base
    base = {n: p.detach().clone() for n, p in build_backbone(MODEL, random_init=True).model.named_parameters()}
    tuned, manifest = load_run(tmp_path / "full")
    saved = load_file(str(tmp_path / "full" / "model.safetensors"))
    masks = {k[len("mask/"):]: v.bool() for k, v in saved.items() if k.startswith("mask/")}
    moved = 0
    for name, p in tuned.backbone.named_parameters():
        changed = p.detach() != base[name]
        assert not (changed & ~masks.get(name, torch.zeros_like(changed))).any(), f"{name} moved outside its mask"
        moved += int(changed.sum())
    assert moved > 0 and manifest["decoder"] == TINY
    decoder = {k[len("decoder/"):]: v for k, v in saved.items() if k.startswith("decoder/")}  # run round trip
    assert all(torch.equal(tuned.decoder.state_dict()[k], v) for k, v in decoder.items())

    run_tune(tune_config(scores_file, source, tmp_path / "split", stop_after=2))
    run_tune(tune_config(scores_file, source, tmp_path / "split", resume=True))
    again = load_file(str(tmp_path / "split" / "model.safetensors"))
    assert set(again) == set(saved) and all(torch.equal(again[k], saved[k]) for k in saved)


def test_score_runs_with_the_mask2former_decoder(source, tmp_path):
    out = tmp_path / "scores.safetensors"
    result = invoke(*["score", "--model", MODEL, "--random-init", "--data", str(source), "--out",
                                      str(out), "--crop", "32", "--batch-size", "2", "--warmup-steps", "2",
                                      "--workers", "0", "--decoder", TINY, "--feature-blocks", "0,1,2,3"])
    assert result.exit_code == 0, result.output
    scores, meta = load_scores(out)
    assert meta["decoder"] == TINY and meta["options"]["feature_blocks"] == [0, 1, 2, 3]
    fim = torch.cat([t.flatten() for t in scores["fim"].values()])
    assert torch.isfinite(fim).all() and (fim > 0).any()
    head = json.loads(json.dumps(load_head(out.with_name("scores.head.safetensors"),
                                           Segmenter(build_backbone(MODEL, random_init=True).model, 19, TINY))))
    assert head["decoder"] == "mask2former"
