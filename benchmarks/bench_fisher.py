"""Per-image squared gradients (Eq. 9) four ways, in one run on one device, against a plain training step.

Methods, all on the same batch with one sampled label map per image (the true Fisher):
  plain   forward + backward of the batch, parameters requiring grad (the cost of one training step; the floor)
  loop    one forward + backward per image, squares of .grad added up (the brute-force oracle)
  vmap    torch.func vmap(grad), fisherscan's reference engine (``engine="vmap"``)
  engine  the hook engine (``engine="hooks"``, fisherscan.fisher.engine), the default

Time: all methods in this process, interleaved round by round (``--repeats`` rounds after one warm-up each), so
a busy machine slows them alike; the median per method and its ratio to ``plain`` (the ratio of the minima is
stored too). Memory: each method in its own subprocess (fresh allocator) -- CUDA: torch.cuda.max_memory_allocated;
CPU: the peak resident set (VmHWM, reset through /proc/self/clear_refs after building the model and the batch) over
the resident set at that point -- it counts the allocator's cached pages too, so it is coarser. The JSON names the
machine, the CPU and the card.

GPU run of the issue (ViT-L/16, batch 8, crop 512, bf16 autocast; about 2 minutes on an H200):

    python benchmarks/bench_fisher.py --arch vit_large_patch16_224 --crop 512 --batch 8 --bf16 --repeats 5 \\
        --out benchmarks/results/bench_fisher_h200.json

CPU run with a tiny ViT (what benchmarks/results/bench_fisher_cpu.json holds):

    OMP_NUM_THREADS=1 python benchmarks/bench_fisher.py --small --repeats 7 \
        --out benchmarks/results/bench_fisher_cpu.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from _common import new_report, save_report, sync  # noqa: E402

METHODS = ("plain", "loop", "vmap", "engine")
SMALL = dict(arch="vit_small_patch16_224", crop=96, batch=8,
             kwargs={"depth": 4, "embed_dim": 128, "num_heads": 4, "patch_size": 8, "init_values": 1e-2})


def build(args, device):
    import timm

    from fisherscan.models.segmenter import Segmenter

    torch.manual_seed(0)
    backbone = timm.create_model(args.arch, pretrained=False, num_classes=0, img_size=args.crop,
                                 dynamic_img_size=True, **json.loads(args.kwargs))
    model = Segmenter(backbone, 19).to(device).eval()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.batch, 3, args.crop, args.crop, generator=g).to(device)
    y = torch.randint(0, 19, (args.batch, args.crop, args.crop), generator=g).to(device)
    u = torch.rand(y.shape, generator=g)
    return model, x, y, u


def method(name, model, x, y, u, autocast):
    from fisherscan.fisher.diagonal import squared_gradient_sum
    from fisherscan.fisher.loss import image_loss, sample_labels
    from fisherscan.models.logits import upsample_logits

    device = x.device
    size = tuple(y.shape[-2:])

    def logits_of(inputs):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast is not None):
            return upsample_logits(model(inputs).float(), size)

    if name == "plain":
        def run():
            model.zero_grad(set_to_none=True)
            logits = logits_of(x)
            image_loss(logits, sample_labels(logits, u.to(device), y != 255)).backward()
    elif name == "loop":
        def run():
            sums = [torch.zeros_like(p, dtype=torch.float32) for p in model.parameters()]
            for i in range(x.shape[0]):
                model.zero_grad(set_to_none=True)
                logits = logits_of(x[i:i + 1])
                image_loss(logits, sample_labels(logits, u[i:i + 1].to(device), y[i:i + 1] != 255)).backward()
                for s, p in zip(sums, model.parameters()):
                    s += p.grad.float().square()
    else:
        engine = "vmap" if name == "vmap" else "hooks"

        def run():
            squared_gradient_sum(model, x, y, u, chunk_size=x.shape[0], autocast_dtype=autocast, engine=engine)
    return run


def worker(args) -> dict:
    """One method in this process: {seconds: [...], peak_gib}."""
    device = torch.device(args.device)
    model, x, y, u = build(args, device)
    autocast = torch.bfloat16 if args.bf16 else None
    run = method(args.worker, model, x, y, u, autocast)
    sync(device)
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = reset_peak_rss()
    run()  # warm-up
    sync(device)
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        sync(device)
        seconds.append(time.perf_counter() - start)
    if device.type == "cuda":
        peak, extra = torch.cuda.max_memory_allocated(), torch.cuda.max_memory_allocated() - base
    else:
        peak = proc_status_bytes("VmHWM")
        extra = peak - base
    return {"seconds": seconds, "peak_gib": peak / 2**30, "peak_over_model_gib": extra / 2**30}


def proc_status_bytes(key: str) -> int:
    """VmRSS (resident now) or VmHWM (peak resident since the last reset) of this process, from /proc."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(key + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {key} in /proc/self/status")


def reset_peak_rss() -> int:
    """Reset the peak resident set (Linux: '5' into /proc/self/clear_refs) and return the resident set now."""
    Path("/proc/self/clear_refs").write_text("5")
    return proc_status_bytes("VmRSS")


def cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default="vit_large_patch16_224", help="timm architecture (random init)")
    parser.add_argument("--kwargs", default="{}", help="extra timm create_model arguments, JSON")
    parser.add_argument("--crop", type=int, default=512)
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--bf16", action="store_true", help="bf16 autocast (squares still summed in fp32)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--small", action="store_true", help="the tiny CPU setting (overrides arch/crop/batch)")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.arch, args.crop, args.batch = SMALL["arch"], SMALL["crop"], SMALL["batch"]
        args.kwargs = json.dumps(SMALL["kwargs"])
    if args.worker:
        print(json.dumps(worker(args)))
        return

    device = torch.device(args.device)
    report = new_report(device)
    report.update(machine=platform.node(), cpu=cpu_name(), cpu_count=os.cpu_count(),
                  threads=int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads(),
                  load_average_at_start=os.getloadavg(), arch=args.arch, kwargs=json.loads(args.kwargs),
                  crop=args.crop, batch=args.batch, autocast="bfloat16" if args.bf16 else None, repeats=args.repeats,
                  labels="sampled, one map per image", note=args.note,
                  memory=("torch.cuda.max_memory_allocated" if device.type == "cuda" else
                          "peak resident set (VmHWM, reset after building model and batch) minus the resident set "
                          "then, fresh process"),
                  timing="median seconds per batch after one warm-up, methods interleaved round by round in one "
                         "process")
    results = {name: {} for name in args.methods.split(",")}
    model, x, y, u = build(args, device)
    runs = {name: method(name, model, x, y, u, torch.bfloat16 if args.bf16 else None) for name in results}
    for name, run in runs.items():
        try:
            run()  # warm-up
        except torch.OutOfMemoryError as error:
            results[name]["error"] = f"out of memory: {str(error)[:200]}"
        if device.type == "cuda":
            torch.cuda.empty_cache()
    times = {name: [] for name in runs if "error" not in results[name]}
    for _ in range(args.repeats):
        for name in times:
            sync(device)
            start = time.perf_counter()
            runs[name]()
            sync(device)
            times[name].append(time.perf_counter() - start)
    for name, seconds in times.items():
        results[name].update(seconds=seconds, median_seconds=statistics.median(seconds), min_seconds=min(seconds))
    print("times", json.dumps({n: r.get("median_seconds") for n, r in results.items()}), flush=True)
    del model, x, y, u, runs
    forwarded = ["--arch", args.arch, "--kwargs", args.kwargs, "--crop", str(args.crop), "--batch", str(args.batch),
                 "--repeats", "2", "--device", args.device] + (["--bf16"] if args.bf16 else [])
    for name in results:  # memory: one fresh process per method
        run = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--worker", name, *forwarded],
                             capture_output=True, text=True)
        if run.returncode != 0:
            tail = run.stderr.strip().splitlines()[-1:] or ["failed"]
            results[name]["memory_error"] = tail[0][:300]
        else:
            measured = json.loads(run.stdout.strip().splitlines()[-1])
            results[name].update(peak_gib=measured["peak_gib"], peak_over_model_gib=measured["peak_over_model_gib"],
                                 seconds_in_own_process=measured["seconds"])
        print(name, json.dumps(results[name]), flush=True)
    report["load_average_at_end"] = os.getloadavg()
    base = results.get("plain", {})
    for name, value in results.items():
        if "median_seconds" in value and "median_seconds" in base:
            value["time_vs_plain"] = value["median_seconds"] / base["median_seconds"]
            value["time_vs_plain_of_minima"] = value["min_seconds"] / base["min_seconds"]  # less load-sensitive
        if value.get("peak_over_model_gib") and base.get("peak_over_model_gib", 0) > 0:
            value["memory_vs_plain"] = value["peak_over_model_gib"] / base["peak_over_model_gib"]
    report["results"] = results
    print(f"{'method':8s} {'s/batch':>9s} {'x plain':>8s} {'peak GiB':>9s} {'mem x plain':>11s}")
    for name, value in results.items():
        if "error" in value:
            print(f"{name:8s} {value['error']}")
            continue
        print(f"{name:8s} {value['median_seconds']:9.4f} {value.get('time_vs_plain', float('nan')):8.2f} "
              f"{value.get('peak_over_model_gib', float('nan')):9.3f} "
              f"{value.get('memory_vs_plain', float('nan')):11.2f}")
    if args.out:
        save_report(args.out, report)


if __name__ == "__main__":
    main()
