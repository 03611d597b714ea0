"""CUDA check and benchmark of the diagonal Fisher engine (one prepared script for a lent GPU).

1. Correctness on CUDA: per-image squared gradients of a tiny ViT segmenter on the GPU (fp32) equal the CPU
   result; under bf16 autocast they stay close (relative error reported).
2. Speed and memory at the issue's setting (DINOv2 ViT-L/14 architecture, 518x518, batch 8, bf16 autocast,
   one sampled label map per image), all measured in this one run on this one card, as ratios to a plain
   forward+backward of the same batch: the vmap engine (fisherscan's) and the per-image loop.
3. The ``fisherscan score`` CLI end to end on CUDA on generated scenes.

    python benchmarks/score_cuda.py --out results.json [--small]   (--small: a CPU smoke run of the script)
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

from fisherscan.fisher.diagonal import squared_gradient_sum  # noqa: E402
from fisherscan.fisher.loss import image_loss, sample_labels  # noqa: E402
from fisherscan.models.backbone import build_backbone  # noqa: E402
from fisherscan.models.logits import upsample_logits  # noqa: E402
from fisherscan.models.segmenter import Segmenter  # noqa: E402


def timed(fn, device, repeats):
    fn()  # warm-up
    sync(device)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        fn()
    sync(device)
    seconds = (time.perf_counter() - start) / repeats
    peak = torch.cuda.max_memory_allocated() / 2**30 if device.type == "cuda" else float("nan")
    return seconds, peak


def correctness(device) -> dict:
    from timm.models.vision_transformer import VisionTransformer

    torch.manual_seed(0)
    vit = VisionTransformer(img_size=32, patch_size=8, embed_dim=64, depth=2, num_heads=4, init_values=0.5,
                            num_classes=0, dynamic_img_size=True)
    model = Segmenter(vit, 19).eval()
    x, y = torch.randn(4, 3, 32, 32), torch.randint(0, 19, (4, 32, 32))
    u = torch.rand(y.shape, generator=torch.Generator().manual_seed(0))
    cpu = squared_gradient_sum(model, x, y, u)
    model.to(device)
    gpu = squared_gradient_sum(model, x.to(device), y.to(device), u)
    bf16 = squared_gradient_sum(model, x.to(device), y.to(device), u, autocast_dtype=torch.bfloat16)

    def worst(a):
        return max(float((a[n].cpu() - cpu[n]).abs().max() / cpu[n].abs().max().clamp_min(1e-30)) for n in cpu)

    return {"fp32_cuda_vs_cpu_max_rel_err": worst(gpu), "bf16_cuda_vs_fp32_cpu_max_rel_err": worst(bf16),
            "fp32_ok": worst(gpu) < 1e-3, "bf16_finite": all(bool(torch.isfinite(v).all()) for v in bf16.values())}


def speed(device, model_spec, crop, batch, repeats) -> dict:
    backbone = build_backbone(model_spec, random_init=True)
    model = Segmenter(backbone.model, 19).to(device).eval()
    x = torch.randn(batch, 3, crop, crop, device=device)
    y = torch.randint(0, 19, (batch, crop, crop), device=device)
    u = torch.rand(y.shape, generator=torch.Generator().manual_seed(0))
    autocast = torch.bfloat16 if device.type == "cuda" else None

    def plain():
        plain_training_step(model, x, y, u, autocast)

    def vmap_engine():
        squared_gradient_sum(model, x, y, u, chunk_size=batch, autocast_dtype=autocast, engine="vmap")

    def loop():
        sums = None
        for i in range(batch):
            model.zero_grad(set_to_none=True)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast is not None):
                logits = model(x[i:i + 1])
            logits = upsample_logits(logits.float(), (crop, crop))
            image_loss(logits, sample_labels(logits, u[i:i + 1].to(device), y[i:i + 1] != 255)).backward()
            squares = [p.grad.float().square() for p in model.parameters()]
            sums = squares if sums is None else [s + q for s, q in zip(sums, squares)]

    results = {}
    for name, fn in (("plain_fwd_bwd", plain), ("vmap_engine", vmap_engine), ("per_image_loop", loop)):
        try:
            seconds, peak = timed(fn, device, repeats)
            results[name] = {"seconds_per_batch": seconds, "peak_gib": peak}
        except torch.OutOfMemoryError as error:
            results[name] = {"error": f"out of memory: {str(error)[:120]}"}
        model.zero_grad(set_to_none=True)
        if device.type == "cuda":
            torch.cuda.empty_cache()
    base = results["plain_fwd_bwd"]["seconds_per_batch"]
    for name in results:
        if "seconds_per_batch" in results[name]:
            results[name]["time_vs_plain"] = results[name]["seconds_per_batch"] / base
    return {"model": model_spec, "crop": crop, "batch": batch, "autocast": str(autocast), "repeats": repeats,
            **results}


def cli_end_to_end(device, small) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        from fisherscan.data.synthetic import write_dataset

        data = write_dataset(Path(tmp) / "data", domains=("source",), images_per_domain=16, size=(256, 256))["source"]
        out = Path(tmp) / "scores.safetensors"
        command = [sys.executable, "-m", "fisherscan", "score", "--model",
                   "dinov2_vits14" if small else "dinov2_vitl14", "--random-init", "--data", str(data),
                   "--crop", "112" if small else "224", "--batch-size", "8", "--warmup-steps", "5",
                   "--device", device.type, "--workers", "2", "--out", str(out)]
        start = time.perf_counter()
        run = subprocess.run(command, capture_output=True, text=True)
        seconds = time.perf_counter() - start
        result = {"command": " ".join(command[1:]), "returncode": run.returncode, "seconds": seconds,
                  "stdout_tail": run.stdout[-1500:], "stderr_tail": run.stderr[-800:]}
        if run.returncode == 0:
            from fisherscan.scores.file import load_scores

            scores, meta = load_scores(out)
            result["all_finite_nonnegative"] = all(bool(torch.isfinite(t).all() and (t >= 0).all())
                                                   for kind in scores.values() for t in kind.values())
            result["metadata_device"], result["metadata_autocast"] = meta["device"], meta["autocast"]
        return result


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--small", action="store_true", help="CPU smoke run with a small model")
    args = parser.parse_args()
    device = pick_device(args.small)
    report = new_report(device)
    report["correctness"] = correctness(device)
    print(json.dumps(report["correctness"]), flush=True)
    if args.small:
        report["speed"] = [speed(device, "dinov2_vits14", 56, 2, 1)]
    else:
        report["speed"] = [speed(device, "dinov2_vitl14", 518, 8, 3)]
    print(json.dumps(report["speed"], indent=1), flush=True)
    report["cli"] = cli_end_to_end(device, args.small)
    print(json.dumps({k: v for k, v in report["cli"].items() if "tail" not in k}), flush=True)
    save_report(args.out, report)


if __name__ == "__main__":
    main()
