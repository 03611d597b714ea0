"""Per-image squared gradients (Eq. 9) four ways, in one run on one device, against a plain training step.

Methods, all on the same batch with one sampled label map per image (the true Fisher):
  plain   forward + backward of the batch, parameters requiring grad (the cost of one training step; the floor)
  loop    one forward + backward per image, squares of .grad added up (the brute-force oracle)
  vmap    torch.func vmap(grad), fisherscan's reference engine (``engine="vmap"``)
  engine  the hook engine (``engine="hooks"``, fisherscan.fisher.engine), the default

The CPU regression check of the hook engine (the GPU measurements are benchmarks/gpu_suite.py's). Time: all
methods in this process, interleaved round by round (``--repeats`` rounds after one warm-up each), so a busy
machine slows them alike; the median per method and its ratio to ``plain`` (the ratio of the minima, and of the
median process CPU times, which a busy machine inflates less, are stored too). Memory: each method in its own
subprocess (fresh allocator): the peak resident set (VmHWM, reset through /proc/self/clear_refs after building the
model and the batch) over the resident set at that point -- it counts the allocator's cached pages too, so it is
coarse. The JSON names the machine and the CPU.

CPU run with a tiny ViT (what benchmarks/results/bench_fisher_cpu.json holds; the engine's ratio should stay
<= 1.30):

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

from _common import cpu_name, new_report, proc_status_bytes, reset_peak_rss, save_report  # noqa: E402

METHODS = ("plain", "loop", "vmap", "engine")
SMALL = dict(arch="vit_small_patch16_224", crop=96, batch=8,
             kwargs={"depth": 4, "embed_dim": 128, "num_heads": 4, "patch_size": 8, "init_values": 1e-2})


DEVICE = torch.device("cpu")


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
    from fisherscan.fisher.diagonal import make_engine
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
    else:  # built once, as a score run does (``make_engine``)
        engine = make_engine(model, "vmap" if name == "vmap" else "hooks", chunk_size=x.shape[0])

        def run():
            engine.squared_gradient_sum(x, y, u, autocast_dtype=autocast)
    return run


def worker(args) -> dict:
    """One method in this process: {seconds: [...], peak_gib, peak_over_model_gib}."""
    model, x, y, u = build(args, DEVICE)
    run = method(args.worker, model, x, y, u, None)
    base = reset_peak_rss()
    run()  # warm-up
    seconds = []
    for _ in range(args.repeats):
        start = time.perf_counter()
        run()
        seconds.append(time.perf_counter() - start)
    peak = proc_status_bytes("VmHWM")
    return {"seconds": seconds, "peak_gib": peak / 2**30, "peak_over_model_gib": (peak - base) / 2**30}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--arch", default=SMALL["arch"], help="timm architecture (random init)")
    parser.add_argument("--kwargs", default=json.dumps(SMALL["kwargs"]), help="timm create_model arguments, JSON")
    parser.add_argument("--crop", type=int, default=SMALL["crop"])
    parser.add_argument("--batch", type=int, default=SMALL["batch"])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--small", action="store_true", help="the tiny ViT setting (the default; overrides "
                                                             "--arch/--kwargs/--crop/--batch)")
    parser.add_argument("--note", default="", help="free text stored in the JSON (e.g. machine load)")
    parser.add_argument("--out", type=Path)
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.small:
        args.arch, args.crop, args.batch = SMALL["arch"], SMALL["crop"], SMALL["batch"]
        args.kwargs = json.dumps(SMALL["kwargs"])
    return args


def interleaved_times(args, names: list[str]) -> dict:
    """Seconds per batch of every method, one warm-up each, then ``repeats`` rounds of all methods in turn."""
    model, x, y, u = build(args, DEVICE)
    runs = {name: method(name, model, x, y, u, None) for name in names}
    for run in runs.values():
        run()  # warm-up
    times = {name: [] for name in runs}
    cpu = {name: [] for name in runs}
    for _ in range(args.repeats):
        for name, run in runs.items():
            start, start_cpu = time.perf_counter(), time.process_time()
            run()
            times[name].append(time.perf_counter() - start)
            cpu[name].append(time.process_time() - start_cpu)  # not inflated while other jobs hold the core
    return {name: {"seconds": seconds, "median_seconds": statistics.median(seconds), "min_seconds": min(seconds),
                   "cpu_seconds": cpu[name], "median_cpu_seconds": statistics.median(cpu[name])}
            for name, seconds in times.items()}


def memory_in_own_processes(args, results: dict) -> None:
    """Each method's peak resident set in a fresh process (``--worker``), into ``results``."""
    forwarded = ["--arch", args.arch, "--kwargs", args.kwargs, "--crop", str(args.crop), "--batch", str(args.batch),
                 "--repeats", "2"]
    for name in results:
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


def add_ratios(results: dict) -> None:
    base = results.get("plain", {})
    for value in results.values():
        if "median_seconds" in value and "median_seconds" in base:
            value["time_vs_plain"] = value["median_seconds"] / base["median_seconds"]
            value["time_vs_plain_of_minima"] = value["min_seconds"] / base["min_seconds"]  # less load-sensitive
            value["cpu_time_vs_plain"] = value["median_cpu_seconds"] / base["median_cpu_seconds"]
        if value.get("peak_over_model_gib") and base.get("peak_over_model_gib", 0) > 0:
            value["memory_vs_plain"] = value["peak_over_model_gib"] / base["peak_over_model_gib"]


def main():
    args = parse_args()
    if args.worker:
        print(json.dumps(worker(args)))
        return
    report = new_report(DEVICE)
    report.update(machine=platform.node(), cpu=cpu_name(), cpu_count=os.cpu_count(),
                  threads=int(os.environ.get("OMP_NUM_THREADS", "0")) or torch.get_num_threads(),
                  load_average_at_start=os.getloadavg(), arch=args.arch, kwargs=json.loads(args.kwargs),
                  crop=args.crop, batch=args.batch, autocast=None, repeats=args.repeats,
                  labels="sampled, one map per image", note=args.note,
                  engines="built once per run (make_engine), as score does",
                  memory="peak resident set (VmHWM, reset after building model and batch) minus the resident set "
                         "then, fresh process",
                  timing="median seconds per batch after one warm-up, methods interleaved round by round in one "
                         "process")
    results = interleaved_times(args, args.methods.split(","))
    print("times", json.dumps({n: r.get("median_seconds") for n, r in results.items()}), flush=True)
    memory_in_own_processes(args, results)
    report["load_average_at_end"] = os.getloadavg()
    add_ratios(results)
    report["results"] = results
    print(f"{'method':8s} {'s/batch':>9s} {'x plain':>8s} {'cpu x plain':>11s} {'peak GiB':>9s} {'mem x plain':>11s}")
    for name, value in results.items():
        print(f"{name:8s} {value['median_seconds']:9.4f} {value.get('time_vs_plain', float('nan')):8.2f} "
              f"{value.get('cpu_time_vs_plain', float('nan')):11.2f} "
              f"{value.get('peak_over_model_gib', float('nan')):9.3f} "
              f"{value.get('memory_vs_plain', float('nan')):11.2f}")
    if args.out:
        save_report(args.out, report)


if __name__ == "__main__":
    main()
