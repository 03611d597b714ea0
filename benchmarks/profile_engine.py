"""Where the hook engine's time goes on the CPU, against a plain training step (bench_fisher.py --small's shapes).

The tiny ViT of ``bench_fisher.py --small`` (ViT-S/16 layout, depth 4, width 128, patch 8, 96x96, batch 8, one
sampled label map per image), built at its input size and, as a second setting, at timm's native 224 so that the
position table is resampled per forward (what ViT-L/16 at 512 or any model off its native size does). The engine
is built once (``make_engine``), as ``score`` does. Wrappers installed here (the library is not changed) time:

  forward       the engine's batched forward and loss (``HookEngine._loss``; its hooks keep the layer inputs)
  backward      autograd.grad to the input: activation gradients only (the parameters do not require grad),
                minus the time spent in the hooks below
  rules         the per-layer rules (``fisherscan.fisher.rules``), per rule: the per-image weight gradients
  squares       the hooks' square-and-accumulate of the rules' output (hook time minus rule time)
  tokens        the cls/register/position-token rule (``rules.token_gradients``: per-image autograd)
  unused probe  the one-image probe for parameters without a path to the loss (cached per engine)
  other         the rest of the call (accumulators, hook set-up and removal)

and splits the plain step (parameters requiring grad) into its forward and its backward. Times are the process's
CPU time (``time.process_time``: other jobs on a shared machine inflate it less than wall time), the median per part
over ``--repeats`` interleaved rounds; then one torch.profiler pass each for the engine and the plain step (the top
aten ops by self CPU time), and the Linear rule's memory traffic (``linear_traffic``) for this model and ViT-L/14.

    OMP_NUM_THREADS=1 python benchmarks/profile_engine.py --out benchmarks/results/engine_profile_cpu.json
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
sys.path.insert(0, str(HERE))

import _common as common  # noqa: E402

from fisherscan.fisher.diagonal import make_engine  # noqa: E402
from fisherscan.fisher.loss import image_loss, sample_labels  # noqa: E402
from fisherscan.models.logits import upsample_logits  # noqa: E402
from fisherscan.models.segmenter import Segmenter  # noqa: E402

SMALL = dict(arch="vit_small_patch16_224", side=96, batch=8,
             kwargs={"depth": 4, "embed_dim": 128, "num_heads": 4, "patch_size": 8, "init_values": 1e-2})
SETTINGS = {"native_96": 96, "resampled_224_table": 224}  # name -> the img_size the model is built at


class Clock:
    """Seconds per labelled part of one engine call, and the moments the backward starts and ends."""

    def __init__(self):
        self.parts: dict[str, float] = {}
        self.marks: dict[str, float] = {}

    def add(self, label: str, seconds: float) -> None:
        self.parts[label] = self.parts.get(label, 0.0) + seconds

    def timed(self, label: str, fn, mark: str | None = None):
        @functools.wraps(fn)
        def wrapper(*args, **kwargs):
            start = time.process_time()
            if mark is not None:
                self.marks.setdefault(mark, start)
            with torch.profiler.record_function(label):
                try:
                    return fn(*args, **kwargs)
                finally:
                    end = time.process_time()
                    self.add(label, end - start)
                    if label == "forward":
                        self.marks["forward_end"] = end
        return wrapper


def instrument(engine, clock: Clock) -> None:
    """Wrap the engine's parts, on this engine object and its sites only (the library's classes are left alone).
    The vmap fallback is not wrapped: ``visits`` says whether any parameter took it (none does here)."""
    engine._loss = clock.timed("forward", engine._loss)
    engine._unused = clock.timed("unused probe", engine._unused)
    for site in engine.sites:
        if callable(site.rule):
            site.rule = clock.timed(f"rule:{site.rule.__name__}", site.rule)
        site.apply = clock.timed("hooks", site.apply)
    for token in engine.token_sites:
        token.finish = clock.timed("tokens", token.finish, mark="backward_end")


def engine_parts(clock: Clock, total: float) -> dict[str, float]:
    """The engine call's seconds by part (the categories of the module docstring)."""
    parts = dict(clock.parts)
    hooks = parts.pop("hooks", 0.0)
    rules = {k: v for k, v in parts.items() if k.startswith("rule:")}
    out = {"forward": parts.get("forward", 0.0), **rules, "squares": hooks - sum(rules.values()),
           "tokens": parts.get("tokens", 0.0), "unused probe": parts.get("unused probe", 0.0)}
    if "backward_end" in clock.marks and "forward_end" in clock.marks:
        out["backward"] = clock.marks["backward_end"] - clock.marks["forward_end"] - hooks
    out["other"] = total - sum(out.values()) - (hooks if "backward" not in out else 0.0)
    return out


def build(img_size: int):
    import timm

    torch.manual_seed(0)
    backbone = timm.create_model(SMALL["arch"], pretrained=False, num_classes=0, img_size=img_size,
                                 dynamic_img_size=True, **SMALL["kwargs"])
    model = Segmenter(backbone, 19).eval()
    g = torch.Generator().manual_seed(0)
    side, batch = SMALL["side"], SMALL["batch"]
    x = torch.randn(batch, 3, side, side, generator=g)
    y = torch.randint(0, 19, (batch, side, side), generator=g)
    return model, x, y, torch.rand(y.shape, generator=g)


def plain_parts(model, x, y, u) -> dict[str, float]:
    """The plain step (bench_fisher's ``plain``) split into forward + loss and backward."""
    model.zero_grad(set_to_none=True)
    start = time.process_time()
    logits = upsample_logits(model(x).float(), tuple(y.shape[-2:]))
    loss = image_loss(logits, sample_labels(logits, u, y != 255))
    middle = time.process_time()
    loss.backward()
    return {"forward": middle - start, "backward": time.process_time() - middle}


def top_ops(fn, rows: int = 15) -> list[dict]:
    """The ``rows`` aten ops (and labelled parts) with the most self CPU time in one profiled call of ``fn``."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    events = sorted(prof.key_averages(), key=lambda e: e.self_cpu_time_total, reverse=True)
    return [{"name": e.key, "self_ms": e.self_cpu_time_total / 1e3, "total_ms": e.cpu_time_total / 1e3,
             "calls": e.count} for e in events[:rows]]


def profile_setting(img_size: int, repeats: int) -> dict:
    model, x, y, u = build(img_size)
    engine = make_engine(model, "hooks", chunk_size=x.shape[0])
    clock = Clock()
    instrument(engine, clock)
    rows_engine, rows_plain, totals = [], [], {"engine": [], "plain": []}
    for round_ in range(repeats + 1):  # round 0 is the warm-up
        clock.parts, clock.marks = {}, {}
        start = time.process_time()
        engine.squared_gradient_sum(x, y, u)
        total = time.process_time() - start
        parts = engine_parts(clock, total)
        start = time.process_time()
        plain = plain_parts(model, x, y, u)
        plain_total = time.process_time() - start
        if round_:
            rows_engine.append(parts)
            rows_plain.append(plain)
            totals["engine"].append(total)
            totals["plain"].append(plain_total)
    median = {k: statistics.median(v) for k, v in totals.items()}
    engine_median = {k: statistics.median(r[k] for r in rows_engine) for k in rows_engine[0]}
    plain_median = {k: statistics.median(r[k] for r in rows_plain) for k in rows_plain[0]}
    visits: dict[str, int] = {}
    for how in engine.visits.values():
        visits[how] = visits.get(how, 0) + 1
    return {"img_size_built": img_size, "engine_seconds": median["engine"], "plain_seconds": median["plain"],
            "engine_vs_plain": median["engine"] / median["plain"],
            "engine_parts_seconds": engine_median,
            "engine_parts_share_of_plain": {k: v / median["plain"] for k, v in engine_median.items()},
            "plain_parts_seconds": plain_median, "visits": visits,
            "top_ops_engine": top_ops(lambda: engine.squared_gradient_sum(x, y, u)),
            "top_ops_plain": top_ops(lambda: plain_parts(model, x, y, u))}


def linear_traffic(model: torch.nn.Module, images: int) -> dict:
    """Bytes the Linear rule moves per batch that a training step does not, CPU-independent: every image's fp32
    weight gradient written (bmm), read and written again (square_), read once more (sum over images) -- against
    the one fp32 weight gradient a training step writes."""
    weights = sum(m.weight.numel() for m in model.modules() if type(m) is torch.nn.Linear)
    rule = 4 * images * weights * 4
    return {"linear_weight_elements": weights, "images": images, "rule_gib": rule / 2**30,
            "weight_gradient_gib": 4 * weights / 2**30, "ratio": rule / (4 * weights)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--out", type=Path)
    args = parser.parse_args()
    report = {**common.new_report(torch.device("cpu")), "cpu": common.cpu_name(), "cpu_count": os.cpu_count(),
              "threads": torch.get_num_threads(), "load_average_at_start": os.getloadavg(), "model": SMALL,
              "repeats": args.repeats, "timing": "median over interleaved rounds (engine, then plain) after one "
                                                  "warm-up; parts timed by wrappers around the engine's steps"}
    report["settings"] = {name: profile_setting(size, args.repeats) for name, size in SETTINGS.items()}
    from fisherscan.models.backbone import meta_architecture

    report["linear_rule_traffic"] = {"tiny_vit": linear_traffic(build(96)[0], SMALL["batch"]),
                                     "vit_l14_batch8": linear_traffic(meta_architecture("dinov2_vitl14"), 8)}
    report["load_average_at_end"] = os.getloadavg()
    for name, setting in report["settings"].items():
        print(f"{name}: engine {setting['engine_seconds']:.4f} s, plain {setting['plain_seconds']:.4f} s "
              f"({setting['engine_vs_plain']:.2f}x)")
        print("  plain  " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in setting["plain_parts_seconds"].items()))
        print("  engine " + ", ".join(f"{k} {v * 1e3:.1f} ms" for k, v in setting["engine_parts_seconds"].items()))
    if args.out:
        common.save_report(args.out, report)


if __name__ == "__main__":
    main()
