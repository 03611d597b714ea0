"""Time of one training step (forward, training loss, backward) of the FULL default Mask2Former head (100 queries,
6 encoder + 9 decoder layers, 256 channels, 12544 points; Rein's settings) against the linear head, on the same
backbone, crop and batch. Backbone and head both receive gradients, as in tune with a full selection.

    python benchmarks/mask2former_step.py                       # CPU: ViT-S/16, crop 512, batch 1
    python benchmarks/mask2former_step.py --model timm:vit_large_patch14_dinov2 --batch 4   # CUDA: bf16 autocast

Writes benchmarks/results/mask2former_step_<device>.json.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from benchmarks._common import new_report, pick_device, save_report, sync  # noqa: E402
from fisherscan.models.backbone import build_backbone  # noqa: E402
from fisherscan.models.segmenter import Segmenter  # noqa: E402


def step_seconds(segmenter: Segmenter, x: torch.Tensor, y: torch.Tensor, repeats: int) -> tuple[list, list]:
    """Wall-clock and process CPU seconds per step (CPU time is what a busy shared machine does not inflate)."""
    times, cpu = [], []
    for i in range(repeats + 1):  # the first is a warm-up
        sync(x.device)
        start, start_cpu = time.perf_counter(), time.process_time()
        torch.manual_seed(i)
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=x.device.type == "cuda"):
            loss = segmenter(x, y)
        loss.backward()
        segmenter.zero_grad(set_to_none=True)
        sync(x.device)
        times.append(time.perf_counter() - start)
        cpu.append(time.process_time() - start_cpu)
    return times[1:], cpu[1:]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="timm:vit_small_patch16_224")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--small", action="store_true", help="CPU even where CUDA is present")
    args = parser.parse_args()
    device = pick_device(args.small)
    torch.manual_seed(0)
    backbone = build_backbone(args.model, random_init=True)
    side = -(-args.crop // backbone.patch_size) * backbone.patch_size
    x = torch.randn(args.batch, 3, side, side, device=device)
    y = torch.randint(0, 19, (args.batch, side, side), device=device)
    y[:, : side // 4] = 255
    report = {**new_report(device), "model": args.model, "crop": args.crop, "input": side, "batch": args.batch,
              "threads": torch.get_num_threads(), "autocast": "bfloat16" if device.type == "cuda" else None,
              "step": "forward + training loss + backward (no optimizer)", "decoders": {}}
    for decoder in ("linear", "mask2former"):
        segmenter = Segmenter(build_backbone(args.model, random_init=True).model, 19, decoder).to(device).eval()
        times, cpu = step_seconds(segmenter, x, y, args.repeats)
        head = sum(p.numel() for p in segmenter.decoder.parameters())
        report["decoders"][decoder] = {"seconds": times, "median_s": statistics.median(times), "cpu_seconds": cpu,
                                       "median_cpu_s": statistics.median(cpu), "head_parameters": head}
        print(f"{decoder:12s} {statistics.median(times):7.2f} s per step ({statistics.median(cpu):.2f} s of CPU time; "
              f"median of {len(times)}), head {head:,} parameters", flush=True)
        del segmenter
    ratio = report["decoders"]["mask2former"]["median_s"] / report["decoders"]["linear"]["median_s"]
    cpu_ratio = report["decoders"]["mask2former"]["median_cpu_s"] / report["decoders"]["linear"]["median_cpu_s"]
    report["mask2former_over_linear"] = {"wall": ratio, "cpu": cpu_ratio}
    print(f"mask2former / linear: {ratio:.2f}x wall, {cpu_ratio:.2f}x CPU time")
    save_report(Path(__file__).parent / "results" / f"mask2former_step_{device.type}.json", report)


if __name__ == "__main__":
    main()
