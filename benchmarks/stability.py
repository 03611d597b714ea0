"""How stable are Fisher estimates from few images? Diagonal (Eq. 9) vs variational (Eq. 10-14), across seeds.

Two studies. ``--proxy`` (``benchmarks/stability_proxy.py``; ``benchmarks/results/variational_stability.json``): on
the proxy benchmark's pretrained backbone, the variational DR-FIM (``fisherscan score --estimator variational``, Eq. 15
as printed) against the diagonal DR-FIM with as many label draws as make the same number of forward+backward passes,
3 seeds, and the cost of a pass. Without it, the original study below (the estimators as they were before the data
part of the precision was kept apart; ``--tau`` and ``--var-steps`` select the variational run):

A small ViT (depth 4, width 64, patch 8) is first trained briefly on procedural scenes of all five domains, so
that it is a (tiny) pretrained model rather than a random one. Then, for each of 5 seeds, a different subset of
8 source images and fresh label draws give one estimate per estimator; we report, across the seeds, the mean
pairwise Jaccard overlap of the top-5% candidate selections (Q, K, V, FFN elements) and the mean pairwise
Spearman correlation of the candidate scores. "diagonal x R" repeats the diagonal estimator with R fresh label
draws per image, so that it costs about as many forward+backward passes as the variational estimator.
Also measured: time of one estimation step relative to one plain training step on the same batch (CPU).

    python benchmarks/stability.py [--out benchmarks/results/stability_cpu.json] [--var-steps 500]
    python benchmarks/stability.py --proxy [--seeds 3] [--images 32] [--var-steps 200] [--variants vogn,reparam]
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from timm.models.vision_transformer import VisionTransformer  # noqa: E402

from fisherscan.data.labels import IMAGENET_MEAN, IMAGENET_STD  # noqa: E402
from fisherscan.data.synthetic import DOMAINS, make_scene  # noqa: E402
from fisherscan.fisher.diagonal import diagonal_fisher, squared_gradient_sum  # noqa: E402
from fisherscan.fisher.variational_segmentation import variational_fisher  # noqa: E402
from fisherscan.models.groups import CANDIDATE_GROUPS, parameter_groups  # noqa: E402
from fisherscan.models.segmenter import Segmenter  # noqa: E402

SIZE = 64


def scenes(indices, domain="source"):
    images, labels = zip(*(make_scene(0, int(i), domain, (SIZE, SIZE)) for i in indices))
    x = torch.from_numpy(np.stack(images)).float().permute(0, 3, 1, 2) / 255.0
    x = (x - torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)) / torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return x, torch.from_numpy(np.stack(labels)).long()


def pretrained_model(steps: int) -> Segmenter:
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=64, depth=4, num_heads=4, mlp_ratio=2.0,
                            init_values=1.0, num_classes=0, dynamic_img_size=True)
    model = Segmenter(vit, 19)
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    for step in range(steps):
        domain = DOMAINS[step % len(DOMAINS)]
        x, y = scenes(range(1000 + 16 * step, 1000 + 16 * step + 16), domain)
        logits = F.interpolate(model(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y, ignore_index=255)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    print(f"pretraining: {steps} steps, final loss {loss.item():.3f}", flush=True)
    return model.eval()


def candidate_vector(scores, groups) -> torch.Tensor:
    parts = [scores[name][piece.rows].reshape(-1) for name in sorted(scores) for piece in groups[name]
             if piece.group in CANDIDATE_GROUPS]
    return torch.cat(parts)


def top_set(values: torch.Tensor, fraction=0.05) -> set[int]:
    k = max(1, int(fraction * values.numel()))
    return set(torch.topk(values, k).indices.tolist())


def spearman(a, b) -> float:
    ra, rb = a.argsort().argsort().double(), b.argsort().argsort().double()
    return float(torch.corrcoef(torch.stack([ra, rb]))[0, 1])


def agreement(vectors) -> dict:
    pairs = list(itertools.combinations(range(len(vectors)), 2))
    tops = [top_set(v) for v in vectors]
    jaccard = [len(tops[i] & tops[j]) / len(tops[i] | tops[j]) for i, j in pairs]
    rho = [spearman(vectors[i], vectors[j]) for i, j in pairs]
    return {"jaccard_top5_mean": float(np.mean(jaccard)), "jaccard_top5_std": float(np.std(jaccard)),
            "spearman_mean": float(np.mean(rho)), "spearman_std": float(np.std(rho))}


def step_times(model, x, y, repeats=5) -> dict:
    """Seconds of one plain training step, one diagonal batch, one variational step (2 passes), same batch."""
    params = [p for p in model.parameters() if p.requires_grad]

    def plain():
        model.zero_grad()
        logits = F.interpolate(model(x), size=y.shape[-2:], mode="bilinear", align_corners=False)
        F.cross_entropy(logits, y, reduction="sum").backward()

    def diagonal():
        squared_gradient_sum(model, x, y, torch.rand(y.shape))

    def variational():
        variational_fisher(model, [(x, y)], gamma=1.0, tau=1e-3, steps=1, curvature="reparam", control=False,
                           legacy=True)

    out = {}
    for name, fn in (("plain_training_step", plain), ("diagonal_batch", diagonal), ("variational_step", variational)):
        fn()
        start = time.perf_counter()
        for _ in range(repeats):
            fn()
        out[name] = (time.perf_counter() - start) / repeats
    del params
    return {**{f"{k}_s": v for k, v in out.items()},
            **{f"{k}_vs_plain": v / out["plain_training_step"] for k, v in out.items()}}


def main():
    if "--proxy" in sys.argv[1:]:
        from stability_proxy import main as proxy_main

        return proxy_main([a for a in sys.argv[1:] if a != "--proxy"])
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/stability_cpu.json"))
    parser.add_argument("--seeds", type=int, default=5)
    parser.add_argument("--images", type=int, default=8)
    parser.add_argument("--pretrain-steps", type=int, default=300)
    parser.add_argument("--var-steps", type=int, default=500)
    parser.add_argument("--tau", type=float, default=1e-3)
    parser.add_argument("--gamma", type=float, default=1.0)
    args = parser.parse_args()
    torch.set_num_threads(max(1, torch.get_num_threads()))
    model = pretrained_model(args.pretrain_steps)
    for p in model.decoder.parameters():
        p.requires_grad_(False)
    groups = parameter_groups(model.backbone.named_parameters())
    repeats = max(1, round(2 * args.var_steps * 4 / (args.images * 3)))  # ~ equal forward+backward passes
    estimates = {"diagonal": [], f"diagonal x {repeats}": [], "variational": []}
    seconds = {k: 0.0 for k in estimates}
    for seed in range(args.seeds):
        rng = np.random.default_rng(seed)
        x, y = scenes(rng.choice(10_000, size=args.images, replace=False))
        batches = [(x[i:i + 4], y[i:i + 4]) for i in range(0, args.images, 4)]
        strip = len("backbone.")
        for name, run in (
            ("diagonal", lambda: diagonal_fisher(model, batches, generator=torch.Generator().manual_seed(seed))),
            (f"diagonal x {repeats}", lambda: diagonal_fisher(model, batches * repeats,
                                                             generator=torch.Generator().manual_seed(seed))),
            ("variational", lambda: variational_fisher(model, batches, gamma=args.gamma, tau=args.tau,
                                                       steps=args.var_steps, curvature="reparam", control=False,
                                                       legacy=True, generator=torch.Generator().manual_seed(seed))),
        ):
            start = time.perf_counter()
            fisher = {k[strip:]: v for k, v in run().items()}
            seconds[name] += time.perf_counter() - start
            estimates[name].append(candidate_vector(fisher, groups))
        print(f"seed {seed} done", flush=True)
    table = {name: {**agreement(vectors), "seconds_per_estimate": seconds[name] / args.seeds}
             for name, vectors in estimates.items()}
    cross = {f"{a} vs {b}": float(np.mean([spearman(u, v) for u, v in zip(estimates[a], estimates[b])]))
             for a, b in itertools.combinations(estimates, 2)}
    x, y = scenes(range(4))
    report = {"machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads",
              "torch": torch.__version__, "settings": vars(args) | {"out": str(args.out), "diagonal_repeats": repeats},
              "stability_across_seeds": table, "mean_spearman_between_estimators_same_seed": cross,
              "step_time_cpu_batch4": step_times(model, x, y)}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print("| estimator | Jaccard top-5% (mean +- std) | Spearman (mean +- std) | s per estimate |")
    print("|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['jaccard_top5_mean']:.3f} +- {row['jaccard_top5_std']:.3f} | "
              f"{row['spearman_mean']:.3f} +- {row['spearman_std']:.3f} | {row['seconds_per_estimate']:.1f} |")
    print(json.dumps(cross, indent=1))
    print(json.dumps(report["step_time_cpu_batch4"], indent=1))


if __name__ == "__main__":
    main()
