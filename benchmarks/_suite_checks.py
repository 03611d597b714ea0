"""The checks of ``gpu_suite.py`` that are not timings: the hook engine against the per-image autograd loop on small
DINOv2-, EVA02- and SAM-architecture models (fp32, and bf16 autocast against fp32), the commands end to end on the
device (score, tune with the linear and the Mask2Former decoder, eval), and the end-to-end ``score`` on generated
GTA5-sized PNGs with its images/s and data-wait share.
"""

from __future__ import annotations

import collections
import concurrent.futures
import contextlib
import re
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

from fisherscan.fisher import fused
from fisherscan.fisher.diagonal import make_engine
from fisherscan.fisher.loss import image_loss, sample_labels
from fisherscan.models.backbone import build_backbone
from fisherscan.models.logits import upsample_logits
from fisherscan.models.segmenter import Segmenter

ROOT = Path(__file__).resolve().parents[1]
# tiny versions of the architectures (as tests/fisher/test_engine.py builds them): depth 2, width 32
TINY_FAMILIES = {
    "dinov2": ("timm:vit_small_patch14_reg4_dinov2?img_size=56&init_values=0.5&depth=2&embed_dim=32&num_heads=2", 56),
    "eva02": ("timm:eva02_tiny_patch14_224?img_size=56&depth=2&embed_dim=32&num_heads=2", 56),
    "sam": ("timm:samvit_base_patch16?img_size=64&window_size=2&global_attn_indexes=(1,)&neck_chans=16&depth=2"
            "&embed_dim=32&num_heads=2", 64),
}
RTOL = 1e-4
TOP = 0.05
GTA_SIZE = (1914, 1052)  # GTA5's images, width x height


@contextlib.contextmanager
def exact_fp32():
    """No TF32 in matmuls and convolutions (cuDNN allows it by default): fp32 means fp32 for the comparison."""
    saved = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    try:
        yield
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = saved


def tiny_segmenter(spec: str, device: torch.device) -> Segmenter:
    """The backbone of ``spec`` (random init) + the linear decoder, weights moved off their init values (zero
    biases, unit norms) so every gradient is non-trivial; backbone scored, decoder frozen (as in score)."""
    torch.manual_seed(0)
    model = Segmenter(build_backbone(spec, random_init=True).model, 19).to(device).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    for p in model.decoder.parameters():
        p.requires_grad_(False)
    return model


def per_image_loop(model: Segmenter, params: dict, x, y, u) -> dict[str, torch.Tensor]:
    """The oracle: per image, one forward and plain autograd to ``params``; the squares summed (Eq. 9)."""
    sums = {n: torch.zeros_like(p, dtype=torch.float32) for n, p in params.items()}
    for i in range(x.shape[0]):
        logits = upsample_logits(model(x[i:i + 1]).float(), tuple(y.shape[-2:]))
        loss = image_loss(logits, sample_labels(logits, u[i:i + 1].to(x.device), y[i:i + 1] != 255))
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
        for (n, p), g in zip(params.items(), grads):
            if g is not None:
                sums[n] += g.float().square()
    return sums


def rank_agreement(a: dict, b: dict, top: float = TOP) -> dict:
    """Top-``top`` Jaccard and Spearman correlation of two score sets over all their elements."""
    fa = torch.cat([a[n].flatten().double().cpu() for n in sorted(a)])
    fb = torch.cat([b[n].flatten().double().cpu() for n in sorted(a)])
    k = max(1, int(top * fa.numel()))
    sa, sb = set(fa.topk(k).indices.tolist()), set(fb.topk(k).indices.tolist())
    ranks = torch.stack([fa.argsort().argsort().double(), fb.argsort().argsort().double()])
    return {f"jaccard_top{round(top * 100)}": len(sa & sb) / len(sa | sb),
            "spearman": float(torch.corrcoef(ranks)[0, 1])}


def engine_check(family: str, device: torch.device) -> dict:
    """The hook engine (fp32) against the per-image loop, and its bf16-autocast scores against its fp32 ones."""
    spec, size = TINY_FAMILIES[family]
    model = tiny_segmenter(spec, device)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(4, 3, size, size, generator=g).to(device)
    y = torch.randint(0, 19, (4, size, size), generator=g)
    y[0, :size // 4] = 255
    y, u = y.to(device), torch.rand(y.shape, generator=g)
    engine = make_engine(model, "hooks", chunk_size=3)  # chunks of 3 images: 3 + 1
    with exact_fp32():
        got = engine.squared_gradient_sum(x, y, u)
        want = per_image_loop(model, engine.params, x, y, u)
    errors = {n: float((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-30)) for n in want}
    worst = max(errors, key=errors.get)
    visits = dict(collections.Counter(engine.visits.values()))
    bf16 = engine.squared_gradient_sum(x, y, u, autocast_dtype=torch.bfloat16)
    finite = all(bool(v.isfinite().all()) for v in bf16.values())
    agreement = rank_agreement(got, bf16)
    return {"spec": spec, "input": size, "images": 4, "parameters": len(want), "max_rel_err": errors[worst],
            "worst_parameter": worst, "visits": visits, "rtol": RTOL,
            "passed": errors[worst] < RTOL and "fallback" not in visits,
            "bf16": {"finite": finite, **agreement, "passed": finite and agreement["spearman"] > 0.9},
            "fused": fused_check(model, x, y, u, want, bf16) if fused.available(x) else "not available here"}


def fused_check(model: Segmenter, x, y, u, want: dict, bf16_rule: dict) -> dict:
    """The engine with the fused Triton kernel: fp32 against the per-image loop, bf16 against the rule's bf16."""
    engine = make_engine(model, "hooks", chunk_size=3, fused=True)
    with exact_fp32():
        got = engine.squared_gradient_sum(x, y, u)
    errors = {n: float((got[n] - want[n]).abs().max() / want[n].abs().max().clamp_min(1e-30)) for n in want}
    fused_names = [n for n, how in engine.visits.items() if how == "linear_fused"]
    bf16 = engine.squared_gradient_sum(x, y, u, autocast_dtype=torch.bfloat16)
    bf16_errors = {n: float((bf16[n] - bf16_rule[n]).abs().max() / bf16_rule[n].abs().max().clamp_min(1e-30))
                   for n in fused_names}
    worst = max(errors.values())
    return {"fused_parameters": len(fused_names), "max_rel_err": worst,
            "bf16_max_rel_err_vs_rule": max(bf16_errors.values(), default=None),
            "bf16_vs_rule": rank_agreement(bf16_rule, bf16),
            "passed": worst < RTOL and bool(fused_names)}


def correctness(device: torch.device) -> dict:
    out = {}
    for family in TINY_FAMILIES:
        try:
            out[family] = engine_check(family, device)
        except Exception as error:  # noqa: BLE001 - recorded, the suite goes on
            out[family] = {"passed": False, "error": f"{type(error).__name__}: {error}"[:500]}
        print("correctness", family, out[family], flush=True)
    return out


def fisherscan_command(args: list, timeout: float, in_process: bool = False) -> dict:
    """``python -m fisherscan ARGS`` in a subprocess (``in_process``: through typer's CliRunner in this process, to
    spare the smoke run the interpreter start-ups): its exit code, time, timing line and the ends of its output."""
    args, start = [str(a) for a in args], time.perf_counter()
    record = {"command": "fisherscan " + " ".join(args), "how": "in process" if in_process else "subprocess"}
    if in_process:
        from typer.testing import CliRunner

        from fisherscan.cli import app

        run = CliRunner().invoke(app, args)
        code, stdout, stderr = run.exit_code, run.stdout, run.stderr + (repr(run.exception) if run.exit_code else "")
    else:
        try:
            run = subprocess.run([sys.executable, "-m", "fisherscan", *args], capture_output=True, text=True, cwd=ROOT,
                                 timeout=max(timeout, 1))
        except subprocess.TimeoutExpired:
            return {**record, "returncode": None, "passed": False, "error": f"timed out after {timeout:.0f} s"}
        code, stdout, stderr = run.returncode, run.stdout, run.stderr
    return {**record, "returncode": code, "seconds": time.perf_counter() - start, "timing": parse_timing(stdout),
            "stdout_tail": stdout[-1200:], "stderr_tail": stderr[-1200:], "passed": code == 0}


def scores_finite(path: Path) -> bool:
    from fisherscan.scores.file import load_scores

    scores, _ = load_scores(path)
    return all(bool(t.isfinite().all()) for kind in scores.values() for t in kind.values())


def commands_end_to_end(device: torch.device, small: bool, work: Path, seconds_left) -> dict:
    """score -> tune (linear) -> tune (Mask2Former) -> eval of both runs, on generated scenes, on ``device``."""
    from fisherscan.data.synthetic import write_dataset

    data = write_dataset(work / "scenes", domains=("source",), images_per_domain=4 if small else 8,
                         size=(64, 64) if small else (256, 256), seed=0)["source"]
    model = "timm:vit_tiny_patch16_224?depth=4&embed_dim=64&num_heads=2" if small else "dinov2_vits14"
    decoder = ("mask2former?num_queries=4&train_num_points=64&encoder_layers=1&decoder_layers=2&hidden_dim=64"
               if small else "mask2former")
    crop = "32" if small else "224"
    common = ["--data", data, "--crop", crop, "--batch-size", "4", "--workers", "2", "--device", device.type]
    scores = work / "scores.safetensors"
    steps = [("score", ["score", "--model", model, "--random-init", *common, "--warmup-steps", "3", "--out", scores]),
             ("tune_linear", ["tune", "--scores", scores, *common, "--steps", "4", "--out", work / "run_linear"]),
             ("tune_mask2former", ["tune", "--scores", scores, *common, "--steps", "4", "--decoder", decoder,
                                   "--warmup-steps", "2", "--out", work / "run_mask2former"]),
             ("eval_linear", ["eval", "--checkpoint", work / "run_linear", "--data", data, "--device", device.type,
                              "--workers", "2"]),
             ("eval_mask2former", ["eval", "--checkpoint", work / "run_mask2former", "--data", data, "--device",
                                   device.type, "--workers", "2"])]
    out = {}
    for name, args in steps:
        out[name] = fisherscan_command(args, seconds_left(), in_process=small)
        if name == "score" and out[name]["passed"]:
            out[name]["finite"] = scores_finite(scores)
            out[name]["passed"] = out[name]["finite"]
        if name.startswith("tune") and out[name]["passed"]:
            out[name]["passed"] = (work / f"run_{name[5:]}" / "model.safetensors").is_file()
        if name.startswith("eval") and out[name]["passed"]:
            out[name]["passed"] = (work / f"run_{name[5:]}" / "eval" / "eval.json").is_file()
        print(name, {k: v for k, v in out[name].items() if "tail" not in k}, flush=True)
    return out


def _write_pair(job: tuple[Path, int, tuple[int, int]]) -> None:
    """One image (smooth colour fields plus noise: PNG-compressible like a rendered frame) and its trainId map."""
    from PIL import Image

    folder, index, (width, height) = job
    rng = np.random.default_rng(index)
    coarse = rng.integers(0, 256, (height // 32 + 1, width // 32 + 1, 3), dtype=np.uint8)
    image = np.asarray(Image.fromarray(coarse).resize((width, height), Image.BILINEAR), dtype=np.int16)
    image = np.clip(image + rng.integers(-6, 7, image.shape), 0, 255).astype(np.uint8)
    labels = rng.integers(0, 19, (height // 64 + 1, width // 64 + 1), dtype=np.uint8)
    label = Image.fromarray(labels).resize((width, height), Image.NEAREST)
    Image.fromarray(image).save(folder / "images" / f"frame_{index:05d}.png", compress_level=1)  # fast to write
    label.save(folder / "labels" / f"frame_{index:05d}.png")


def write_generic_pngs(folder: Path, count: int, size: tuple[int, int], threads: int) -> float:
    """``count`` image/label PNG pairs of ``size`` in the generic layout (images/ + labels/); mean image MB."""
    for sub in ("images", "labels"):
        (folder / sub).mkdir(parents=True, exist_ok=True)
    jobs = [(folder, i, size) for i in range(count)]
    # threads: PIL's encoder and numpy release the GIL, and nothing is forked from a process holding CUDA
    with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
        list(pool.map(_write_pair, jobs))
    files = list((folder / "images").glob("*.png"))
    return sum(f.stat().st_size for f in files) / max(len(files), 1) / 2**20


TIMING = re.compile(r"timing: (\d+) images in ([\d.]+) s \(([\d.]+) images/s\); waiting for data ([\d.]+)% of it "
                    r"\(([\d.]+) s, ([\d.]+) s before the first batch\)")


def parse_timing(stdout: str) -> dict | None:
    match = TIMING.search(stdout)
    if match is None:
        return None
    images, loop, rate, share, waited, first = match.groups()
    loop, waited, first = float(loop), float(waited), float(first)
    return {"images": int(images), "loop_seconds": loop, "images_per_second": float(rate),
            "data_wait_share": float(share) / 100, "data_wait_seconds": waited, "first_batch_wait_seconds": first,
            "data_wait_share_after_first_batch": (waited - first) / max(loop - first, 1e-9)}


def score_on_gta_sized_pngs(device: torch.device, small: bool, work: Path, workers: int, seconds_left) -> dict:
    """``fisherscan score --random-init --images N`` on generated PNGs of GTA5's size (``--small``: tiny ones and a
    tiny model), ``--workers`` = the cores here: images/s and the share of the loop spent waiting for data."""
    count, size = (8, (160, 96)) if small else (64, GTA_SIZE)
    data = work / "gta_sized"
    start = time.perf_counter()
    megabytes = write_generic_pngs(data, count, size, workers)
    written = time.perf_counter() - start
    model = "timm:vit_small_patch14_dinov2?depth=2&embed_dim=64&num_heads=2" if small else \
        "timm:vit_large_patch14_dinov2"
    args = ["score", "--model", model, "--random-init", "--images", count, "--data", data, "--layout", "generic",
            "--workers", workers, "--device", device.type, "--warmup-steps", 2 if small else 10,
            "--out", work / "gta_scores.safetensors"]
    if small:
        args += ["--crop", 64]
    record = fisherscan_command(args, seconds_left(), in_process=small)
    record.update(images=count, image_size=list(size), mean_png_mb=megabytes, seconds_writing_pngs=written,
                  workers=workers)
    record["passed"] = record["passed"] and record.get("timing") is not None
    print("score_on_gta_sized_pngs", {k: v for k, v in record.items() if "tail" not in k}, flush=True)
    return record
