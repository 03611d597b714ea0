"""GPU check of the variational estimator and the tune recipe (one prepared script for a lent GPU).

1. Time of one variational step (reparam: an antithetic pair, two forward+backward passes at theta_hat +/- sigma*xi;
   vogn, the default: one pass of the per-image engine at theta_hat + sigma*xi; plus the update) relative to one
   plain training step on the same batch, and peak memory: DINOv2 ViT-L/14
   architecture, 518x518, batch 8, bf16 autocast (the issue's "ViT-L on one 80 GB GPU at batch 8, bf16").
2. bf16 vs fp32: Spearman correlation of the variational Fisher of a small ViT computed both ways (the antithetic
   difference of gradients is where bf16 rounding could hurt).
3. ``fisherscan tune`` end to end on CUDA on generated scenes.

    python benchmarks/variational_cuda.py --out results.json [--small]
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import new_report, pick_device, plain_training_step, save_report, sync  # noqa: E402

from fisherscan.fisher.loss import trainable_parameters  # noqa: E402
from fisherscan.fisher.variational import fit_precision  # noqa: E402
from fisherscan.fisher.variational_segmentation import segmentation_losses, segmentation_squares  # noqa: E402
from fisherscan.models.backbone import build_backbone  # noqa: E402
from fisherscan.models.segmenter import Segmenter  # noqa: E402


def step_timing(device, spec, crop, batch, repeats) -> dict:
    model = Segmenter(build_backbone(spec, random_init=True).model, 19).to(device).eval()
    for p in model.decoder.parameters():
        p.requires_grad_(False)
    x = torch.randn(batch, 3, crop, crop, device=device)
    y = torch.randint(0, 19, (batch, crop, crop), device=device)
    u = torch.rand(y.shape, device=device)
    autocast = torch.bfloat16 if device.type == "cuda" else None

    def plain():
        plain_training_step(model, x, y, u, autocast)

    losses = segmentation_losses(model, lambda step: (x, y, u), autocast_dtype=autocast)
    squares = segmentation_squares(model, lambda step: (x, y, u), autocast_dtype=autocast)
    params = trainable_parameters(model)

    def variational(steps):
        fit_precision(losses, params, gamma=1.0, tau=1e-3, steps=steps, scale=1000.0)

    def vogn(steps):
        fit_precision(squares, params, gamma=1.0, tau=1e-3, steps=steps, scale=1000.0, curvature="vogn")

    out = {}
    for name, fn in (("plain_training_step", plain),):
        fn()
        sync(device)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        sync(device)
        out[name] = {"seconds": (time.perf_counter() - start) / repeats,
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
    model.zero_grad(set_to_none=True)
    first = out["plain_training_step"]["seconds"]
    for name, fit, passes in (("variational_step", variational, 2), ("vogn_step", vogn, 1)):
        fit(1)
        sync(device)
        if device.type == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
        start = time.perf_counter()
        fit(1 + repeats)
        sync(device)
        out[name] = {"seconds": (time.perf_counter() - start) / (1 + repeats),
                     "peak_gib": torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else None}
        out[f"{name}_vs_plain"] = out[name]["seconds"] / first
        out[f"{name}_per_pass_vs_plain"] = out[f"{name}_vs_plain"] / passes
    out["per_pass_vs_plain"] = out["variational_step_per_pass_vs_plain"]
    return {"model": spec, "crop": crop, "batch": batch, "autocast": str(autocast), **out}


def bf16_agreement(device) -> dict:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=64, patch_size=8, embed_dim=128, depth=4, num_heads=4, init_values=1.0,
                            num_classes=0, dynamic_img_size=True)
    model = Segmenter(vit, 19).to(device).eval()
    for p in model.decoder.parameters():
        p.requires_grad_(False)
    x, y = torch.randn(8, 3, 64, 64, device=device), torch.randint(0, 19, (8, 64, 64), device=device)
    estimates = {}
    for name, dtype in (("fp32", None), ("bf16", torch.bfloat16)):
        g = torch.Generator().manual_seed(0)
        uniforms = [torch.rand(y.shape, generator=g).to(device) for _ in range(300)]
        losses = segmentation_losses(model, lambda step: (x, y, uniforms[step]), autocast_dtype=dtype)
        result = fit_precision(losses, trainable_parameters(model), gamma=1.0, tau=1e-3, steps=300, scale=8.0,
                               generator=torch.Generator().manual_seed(1))
        estimates[name] = torch.cat([v.flatten().cpu() for v in result.fisher.values()])
    a, b = estimates["fp32"], estimates["bf16"]
    ranks = torch.stack([a.argsort().argsort().double(), b.argsort().argsort().double()])
    k = a.numel() // 20
    top_a, top_b = set(a.topk(k).indices.tolist()), set(b.topk(k).indices.tolist())
    return {"spearman_bf16_vs_fp32": float(torch.corrcoef(ranks)[0, 1]),
            "jaccard_top5_bf16_vs_fp32": len(top_a & top_b) / len(top_a | top_b),
            "median_relative_difference": float(((a - b).abs() / a.abs().clamp_min(1e-30)).median())}


def tune_end_to_end(device, small) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        from fisherscan.data.synthetic import write_dataset

        data = write_dataset(Path(tmp) / "data", domains=("source",), images_per_domain=16, size=(128, 128))["source"]
        scores = Path(tmp) / "scores.safetensors"
        spec = "dinov2_vits14"
        common = ["--model", spec, "--random-init", "--data", str(data), "--crop", "112", "--batch-size", "8",
                  "--device", device.type, "--workers", "2"]
        first = subprocess.run([sys.executable, "-m", "fisherscan", "score", *common, "--warmup-steps", "5",
                                "--estimator", "variational", "--var-steps", "20", "--out", str(scores)],
                               capture_output=True, text=True)
        start = time.perf_counter()
        run = subprocess.run([sys.executable, "-m", "fisherscan", "tune", *common, "--scores", str(scores), "--steps",
                              "20", "--out", str(Path(tmp) / "run")], capture_output=True, text=True)
        return {"score_returncode": first.returncode, "score_stderr_tail": first.stderr[-600:],
                "tune_returncode": run.returncode, "tune_seconds": time.perf_counter() - start,
                "tune_stdout_tail": run.stdout[-600:], "tune_stderr_tail": run.stderr[-600:]}


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--small", action="store_true", help="CPU smoke run")
    args = parser.parse_args()
    device = pick_device(args.small)
    report = new_report(device)
    if args.small:
        report["step_timing"] = step_timing(device, "dinov2_vits14", 56, 2, 1)
    else:
        report["step_timing"] = step_timing(device, "dinov2_vitl14", 518, 8, 3)
    print(json.dumps(report["step_timing"]), flush=True)
    if device.type == "cuda":
        report["bf16"] = bf16_agreement(device)
        print(json.dumps(report["bf16"]), flush=True)
    report["tune"] = tune_end_to_end(device, args.small)
    print(json.dumps({k: v for k, v in report["tune"].items() if "tail" not in k}), flush=True)
    save_report(args.out, report)


if __name__ == "__main__":
    main()
