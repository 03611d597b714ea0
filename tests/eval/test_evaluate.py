"""fisherscan.evaluate and ``fisherscan eval`` / ``predict``.

Oracles, all independent of fisherscan.evaluate's code: window positions as {0, s, 2s, ...} <= H - crop plus the
border position; slide inference as a plain python loop that runs the model on one padded window at a time and
averages the windows' logits pixel by pixel in numpy; whole-image inference as one model call on the image padded
to the patch size; confusion matrices with ``np.add.at`` and IoU = TP / (TP + FP + FN) written out here; the
normalisation constants are written out (timm's vit_tiny_patch16_224 uses mean = std = 0.5).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import invoke, ok, tiny_segmenter
from PIL import Image
from safetensors.torch import save_file

from fisherscan.data.synthetic import write_dataset
from fisherscan.errors import FisherscanError
from fisherscan.eval.evaluate import evaluate_datasets
from fisherscan.eval.inference import (
    infer_logits,
    normalisation,
    parse_resize,
    resized_shape,
    slide_logits,
    window_starts,
)
from fisherscan.eval.predict import CITYSCAPES_PALETTE
from fisherscan.eval.runs import load_run
from fisherscan.recipes.config import TuneConfig
from fisherscan.recipes.tune import run_tune
from fisherscan.scores.file import save_scores

MODEL = "timm:vit_tiny_patch16_224"
VIT_TINY_MEAN = VIT_TINY_STD = (0.5, 0.5, 0.5)  # timm's pretrained_cfg of vit_tiny_patch16_224
TINY_MEAN, TINY_STD = (0.3, 0.4, 0.5), (0.2, 0.25, 0.3)  # given to the tiny test models' pretrained_cfg
PALETTE = {  # Cityscapes colours, from cityscapesScripts' labels.py
    0: (128, 64, 128), 1: (244, 35, 232), 2: (70, 70, 70), 3: (102, 102, 156), 4: (190, 153, 153),
    5: (153, 153, 153), 6: (250, 170, 30), 7: (220, 220, 0), 8: (107, 142, 35), 9: (152, 251, 152),
    10: (70, 130, 180), 11: (220, 20, 60), 12: (255, 0, 0), 13: (0, 0, 142), 14: (0, 0, 70), 15: (0, 60, 100),
    16: (0, 80, 100), 17: (0, 0, 230), 18: (119, 11, 32),
}



# ----------------------------------------------------------------------------------------------------------
# oracles


def oracle_positions(size: int, window: int, stride: int) -> list[int]:
    return sorted(set(range(0, size - window + 1, stride)) | {size - window})


def oracle_window(segmenter, window: torch.Tensor) -> np.ndarray:
    """Logits (C, h, w) of one normalised window (3, h, w): zero-pad to the patch size, model, upsample, crop."""
    patch = segmenter.patch_size
    h, w = window.shape[-2:]
    ph, pw = math.ceil(h / patch) * patch, math.ceil(w / patch) * patch
    padded = torch.zeros(1, 3, ph, pw)
    padded[0, :, :h, :w] = window
    with torch.no_grad():
        logits = segmenter(padded)
    logits = F.interpolate(logits, size=(ph, pw), mode="bilinear", align_corners=False)
    return logits[0, :, :h, :w].numpy().astype(np.float64)


def oracle_slide(segmenter, image: torch.Tensor, crop: int, stride: int) -> np.ndarray:
    """(C, H, W): each window's logits summed pixel by pixel, divided by how many windows cover the pixel."""
    _, _, H, W = image.shape
    wh, ww = min(crop, H), min(crop, W)
    total, count = None, np.zeros((H, W))
    for y in oracle_positions(H, wh, stride):
        for x in oracle_positions(W, ww, stride):
            logits = oracle_window(segmenter, image[0, :, y:y + wh, x:x + ww])
            if total is None:
                total = np.zeros((logits.shape[0], H, W))
            for c in range(logits.shape[0]):
                total[c, y:y + wh, x:x + ww] += logits[c]
            count[y:y + wh, x:x + ww] += 1
    return total / count


def normalised(rgb: np.ndarray, mean, std) -> torch.Tensor:
    x = (rgb.astype(np.float64) / 255.0 - np.array(mean)) / np.array(std)
    return torch.from_numpy(x.transpose(2, 0, 1)[None].astype(np.float32))


def oracle_confusion(pred: np.ndarray, label: np.ndarray) -> np.ndarray:
    conf = np.zeros((19, 19), dtype=np.int64)
    keep = label != 255
    np.add.at(conf, (label[keep], pred[keep]), 1)
    return conf


def oracle_iou(conf: np.ndarray) -> list[float]:
    out = []
    for k in range(19):
        tp, fp, fn = conf[k, k], conf[:, k].sum() - conf[k, k], conf[k, :].sum() - conf[k, k]
        out.append(tp / (tp + fp + fn) if tp + fp + fn else math.nan)
    return out


def oracle_miou(conf: np.ndarray) -> float:
    present = [v for v in oracle_iou(conf) if not math.isnan(v)]
    return sum(present) / len(present)


def seg19(seed: int = 0):
    model = tiny_segmenter(num_classes=19, seed=seed)
    model.backbone.pretrained_cfg = {"mean": TINY_MEAN, "std": TINY_STD}
    return model


# ----------------------------------------------------------------------------------------------------------
# windows and slide inference


@pytest.mark.parametrize("size,window,stride", [(48, 32, 16), (50, 32, 16), (1024, 512, 341), (2048, 512, 341),
                                                (512, 512, 341), (30, 12, 8), (12, 12, 5), (7, 7, 1)])
def test_window_starts(size, window, stride):
    assert window_starts(size, window, stride) == oracle_positions(size, window, stride)


def test_slide_equals_whole_image_when_the_crop_covers_it():
    seg = seg19()
    torch.manual_seed(1)
    image = torch.randn(1, 3, 18, 22)  # not a multiple of the patch (4): the padded path
    whole = oracle_window(seg, image[0])
    for crop in (22, 32, 0):
        out = slide_logits(seg, image, crop, 8)
        assert out.shape == (1, 19, 18, 22)
        np.testing.assert_allclose(out[0].numpy(), whole, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,crop,stride", [((21, 30), 12, 8), ((21, 30), 10, 7), ((10, 30), 12, 5)])
def test_slide_with_overlapping_windows_equals_a_python_loop(shape, crop, stride):
    seg = seg19()
    torch.manual_seed(2)
    image = torch.randn(1, 3, *shape)
    expected = oracle_slide(seg, image, crop, stride)
    for batch_size in (1, 3):
        out = slide_logits(seg, image, crop, stride, batch_size=batch_size)
        np.testing.assert_allclose(out[0].numpy(), expected, rtol=1e-5, atol=1e-5)


def test_infer_logits_resizes_normalises_and_returns_the_original_size():
    seg = seg19()
    rgb = np.random.default_rng(0).integers(0, 256, (18, 26, 3), dtype=np.uint8)
    out = infer_logits(seg, rgb, crop=0, stride=1, resize=(20, 12))  # (width, height)
    x = torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255
    x = F.interpolate(x, size=(12, 20), mode="bilinear", align_corners=False)
    x = (x - torch.tensor(TINY_MEAN).view(1, 3, 1, 1)) / torch.tensor(TINY_STD).view(1, 3, 1, 1)
    expected = F.interpolate(torch.from_numpy(oracle_window(seg, x[0])).float()[None], size=(18, 26),
                             mode="bilinear", align_corners=False)
    assert out.shape == (1, 19, 18, 26)
    np.testing.assert_allclose(out.numpy(), expected.numpy(), rtol=1e-4, atol=1e-4)


def test_normalisation_is_the_backbones_else_imagenets():
    assert normalisation(seg19()) == (TINY_MEAN, TINY_STD)
    assert normalisation(tiny_segmenter(num_classes=19)) == ((0.485, 0.456, 0.406), (0.229, 0.224, 0.225))


def test_parse_resize_and_shapes():
    assert parse_resize("1024x512") == (1024, 512) and parse_resize("0.5") == 0.5 and parse_resize(None) is None
    assert parse_resize("2") == 2.0  # a bare number is a scale factor
    for bad in ("x512", "0x5", "-1", "10by5", "nan", "1024x"):
        with pytest.raises(FisherscanError, match="--resize"):
            parse_resize(bad)
    assert resized_shape(1024, 2048, "1024x512") == (512, 1024)
    assert resized_shape(1080, 1920, 0.5) == (540, 960)
    # mmcv keep_ratio: a (2048, 1024) bound on a 3000x4000 image -> scale min(2048/4000, 1024/3000)
    assert resized_shape(3000, 4000, (2048, 1024), keep_ratio=True) == (1024, int(4000 * 1024 / 3000 + 0.5))


# ----------------------------------------------------------------------------------------------------------
# evaluate_datasets


def write_acdc(root: Path, conditions=("fog", "night"), per=2, size=(20, 24)) -> Path:
    rng = np.random.default_rng(5)
    for cond in conditions:
        for i in range(per):
            rgb_dir = root / "rgb_anon" / cond / "val" / "GOPR0001"
            gt_dir = root / "gt" / cond / "val" / "GOPR0001"
            rgb_dir.mkdir(parents=True, exist_ok=True)
            gt_dir.mkdir(parents=True, exist_ok=True)
            label = rng.choice([0, 1, 2, 8, 10, 13, 255], size=size).astype(np.uint8)
            Image.fromarray(rng.integers(0, 256, (*size, 3), dtype=np.uint8)).save(rgb_dir / f"f{i}_rgb_anon.png")
            Image.fromarray(label).save(gt_dir / f"f{i}_gt_labelTrainIds.png")
    return root


def test_acdc_is_reported_per_condition_and_as_their_mean(tmp_path):
    root = write_acdc(tmp_path / "acdc")
    seg = seg19()
    result = evaluate_datasets(seg, [root], crop=16, stride=8, split="val")
    (acdc,) = result.datasets
    assert [c.name for c in acdc.conditions] == ["acdc/fog", "acdc/night"]
    expected = {}
    for cond in ("fog", "night"):
        conf = np.zeros((19, 19), dtype=np.int64)
        for i in range(2):
            rgb = np.asarray(Image.open(root / "rgb_anon" / cond / "val" / "GOPR0001" / f"f{i}_rgb_anon.png"))
            label = np.asarray(Image.open(root / "gt" / cond / "val" / "GOPR0001" / f"f{i}_gt_labelTrainIds.png"))
            pred = oracle_slide(seg, normalised(rgb, TINY_MEAN, TINY_STD), 16, 8).argmax(0)
            conf += oracle_confusion(pred, label.astype(np.int64))
        expected[cond] = conf
    for part, cond in zip(acdc.conditions, ("fog", "night")):
        np.testing.assert_array_equal(part.confusion, expected[cond])
        assert part.miou == pytest.approx(oracle_miou(expected[cond]), abs=1e-12)
        assert part.images == 2
    assert acdc.miou == pytest.approx((oracle_miou(expected["fog"]) + oracle_miou(expected["night"])) / 2, abs=1e-12)
    assert result.miou == pytest.approx(acdc.miou)
    assert list(result.frame().columns) == ["acdc/fog", "acdc/night", "acdc", "mean"]
    assert set(result.miou_by_dataset()) == {"acdc/fog", "acdc/night", "acdc", "mean"}


def test_resize_scores_at_the_original_label_or_the_resized_one(tmp_path):
    root = write_dataset(tmp_path / "d", domains=("source",), images_per_domain=2, size=(32, 40))["source"]
    seg = seg19(seed=3)
    was = seg.train()
    for score_at in ("original", "resized"):
        result = evaluate_datasets(seg, [root], crop=0, stride=1, resize=0.5, score_at=score_at, layout="generic")
        assert seg.training  # the caller's mode is restored
        conf = np.zeros((19, 19), dtype=np.int64)
        for name in ("scene_00000.png", "scene_00001.png"):
            rgb = np.array(Image.open(root / "images" / name).convert("RGB"))
            label = torch.from_numpy(np.asarray(Image.open(root / "labels" / name)).astype(np.int64))
            x = F.interpolate(torch.from_numpy(rgb).permute(2, 0, 1)[None].float() / 255, size=(16, 20),
                              mode="bilinear", align_corners=False)
            x = (x - torch.tensor(TINY_MEAN).view(1, 3, 1, 1)) / torch.tensor(TINY_STD).view(1, 3, 1, 1)
            logits = torch.from_numpy(oracle_window(seg.eval(), x[0])).float()[None]
            seg.train()
            if score_at == "original":
                logits = F.interpolate(logits, size=(32, 40), mode="bilinear", align_corners=False)
            else:
                label = label[::2, ::2]  # nearest downscale by 2 takes every second pixel
            conf += oracle_confusion(logits[0].argmax(0).numpy(), label.numpy())
        np.testing.assert_array_equal(result.datasets[0].confusion, conf)
    assert was is seg


# ----------------------------------------------------------------------------------------------------------
# the command line on a real (tiny) tune run


@pytest.fixture(scope="module")
def domains(tmp_path_factory) -> dict[str, Path]:
    return write_dataset(tmp_path_factory.mktemp("data"), domains=("source", "fog"), images_per_domain=4,
                         size=(48, 48))


def tiny_scores(path: Path) -> Path:
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    g = torch.Generator().manual_seed(0)
    kinds = {kind: {n: torch.rand(p.shape, generator=g) for n, p in backbone.named_parameters()}
             for kind in ("fim", "fim_shift", "delta", "drfim")}
    save_scores(path, kinds, {"model": MODEL, "images": 4})
    return path


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, domains) -> Path:
    folder = tmp_path_factory.mktemp("run")
    scores = tiny_scores(folder / "scores.safetensors")
    run_tune(TuneConfig(scores=scores, model=MODEL, data=domains["source"], out=folder / "run", random_init=True,
                        crop=32, batch_size=2, steps=2, workers=0, warmup_steps=1))
    return folder / "run"




def oracle_dataset(segmenter, folder: Path) -> np.ndarray:
    conf = np.zeros((19, 19), dtype=np.int64)
    for image in sorted((folder / "images").glob("*.png")):
        rgb = np.asarray(Image.open(image).convert("RGB"))
        label = np.asarray(Image.open(folder / "labels" / image.name)).astype(np.int64)
        pred = oracle_slide(segmenter, normalised(rgb, VIT_TINY_MEAN, VIT_TINY_STD), 32, 16).argmax(0)
        conf += oracle_confusion(pred, label)
    return conf


def test_eval_cli_end_to_end(run_dir, domains):
    result = ok(invoke("eval", "--checkpoint", run_dir, "--data", domains["source"], "--data", domains["fog"],
                       "--layout", "generic", "--split", "train", "--crop", 32, "--stride", 16, "--workers", 0,
                       "--device", "cpu"))
    assert "road" in result.stdout and "mIoU" in result.stdout and "source" in result.stdout
    saved = json.loads((run_dir / "eval" / "eval.json").read_text())
    table = pd.read_csv(run_dir / "eval" / "eval.csv", index_col="class")
    assert f"json:  {run_dir / 'eval' / 'eval.json'}" in result.stdout

    segmenter, _ = load_run(run_dir)
    mious = []
    for entry, name in zip(saved["datasets"], ("source", "fog")):
        conf = oracle_dataset(segmenter, domains[name])
        assert entry["name"] == name and entry["images"] == 4
        np.testing.assert_array_equal(np.array(entry["confusion"]), conf)
        iou = oracle_iou(conf)
        for k, cls in enumerate(table.index[:19]):
            got_json, got_csv = entry["iou"][cls], table.loc[cls, name]
            if math.isnan(iou[k]):
                assert got_json is None and math.isnan(got_csv)
            else:
                assert got_json == pytest.approx(100 * iou[k], abs=1e-9)
                assert got_csv == pytest.approx(100 * iou[k], abs=1e-3)
        mious.append(oracle_miou(conf))
        assert entry["miou"] == pytest.approx(100 * mious[-1], abs=1e-9)
        assert table.loc["mIoU", name] == pytest.approx(100 * mious[-1], abs=1e-3)
    assert saved["miou"] == pytest.approx(100 * sum(mious) / 2, abs=1e-9)
    assert table.loc["mIoU", "mean"] == pytest.approx(100 * sum(mious) / 2, abs=1e-3)
    assert f"{100 * sum(mious) / 2:.2f}" in result.stdout


def test_predict_cli_writes_palette_pngs_and_overlays(run_dir, domains, tmp_path):
    images = domains["source"] / "images"
    out = tmp_path / "pred"
    ok(invoke("predict", "--checkpoint", run_dir, "--images", images, "--out", out, "--overlay", "--crop", 32,
              "--stride", 16, "--device", "cpu"))
    segmenter, _ = load_run(run_dir)
    inputs = sorted(images.glob("*.png"))
    assert sorted(p.name for p in out.iterdir()) == sorted([p.name for p in inputs] +
                                                           [p.stem + "_overlay.png" for p in inputs])
    for image in inputs:
        rgb = np.asarray(Image.open(image).convert("RGB"))
        pred = oracle_slide(segmenter, normalised(rgb, VIT_TINY_MEAN, VIT_TINY_STD), 32, 16).argmax(0)
        with Image.open(out / image.name) as seg_png:
            assert seg_png.size == (48, 48) and seg_png.mode == "P"
            np.testing.assert_array_equal(np.asarray(seg_png), pred)  # values are the trainIds
            colours = np.asarray(seg_png.convert("RGB"))
        expected_colours = np.array([PALETTE[int(k)] for k in pred.ravel()]).reshape(48, 48, 3)
        np.testing.assert_array_equal(colours, expected_colours)
        overlay = np.asarray(Image.open(out / f"{image.stem}_overlay.png").convert("RGB")).astype(float)
        np.testing.assert_allclose(overlay, 0.5 * expected_colours + 0.5 * rgb, atol=0.51)
    assert tuple(CITYSCAPES_PALETTE) == tuple(PALETTE[k] for k in range(19))


def test_sha256_mismatch_of_the_base_weights_is_an_error(tmp_path, domains):
    backbone = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=0, dynamic_img_size=True)
    base = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in backbone.state_dict().items()}, str(base))
    run_tune(TuneConfig(scores=tiny_scores(tmp_path / "s.safetensors"), model=MODEL, data=domains["source"],
                        out=tmp_path / "run", weights=base, crop=32, batch_size=2, steps=1, workers=0,
                        warmup_steps=1))
    other = tmp_path / "other.safetensors"
    save_file({k: v.contiguous() + 1 for k, v in backbone.state_dict().items()}, str(other))
    args = ["--checkpoint", tmp_path / "run", "--data", domains["source"], "--crop", 32, "--stride", 16,
            "--workers", 0, "--device", "cpu", "--images", 1]
    ok(invoke("eval", *args))  # the manifest's own weights
    result = invoke("eval", *args, "--weights", other)
    assert result.exit_code == 2 and "sha256" in result.stderr and result.stderr.count("\n") == 1


@pytest.mark.parametrize("case", ["missing run", "missing data", "bad resize", "stride over crop", "no images"])
def test_bad_inputs_are_one_line_errors(run_dir, domains, tmp_path, case):
    data = domains["source"]
    args = {
        "missing run": ["eval", "--checkpoint", tmp_path / "nope", "--data", data],
        "missing data": ["eval", "--checkpoint", run_dir, "--data", tmp_path / "nodata"],
        "bad resize": ["eval", "--checkpoint", run_dir, "--data", data, "--resize", "1024by512"],
        "stride over crop": ["eval", "--checkpoint", run_dir, "--data", data, "--crop", 32, "--stride", 48],
        "no images": ["predict", "--checkpoint", run_dir, "--images", tmp_path / "none", "--out", tmp_path / "o"],
    }[case]
    result = invoke(*args)
    assert result.exit_code == 2, result.stdout + result.stderr
    assert result.stderr.startswith("error:") and result.stderr.count("\n") == 1, result.stderr
    assert "Traceback" not in result.stderr
