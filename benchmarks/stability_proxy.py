"""Stability of the variational DR-FIM vs the diagonal DR-FIM at equal compute, on the proxy benchmark's backbone.

Protocol. The foundation model is the proxy benchmark's pretrained ViT (``fisherscan.bench.pretrain``, its
``PretrainConfig``, cached), the scenes in its protocol's source style. One linear head is warmed up once (200
steps, lr 3e-3, on 128 source scenes of seed ``SOURCE_SEED``) and shared. For each seed: ``--images`` new source
scenes (seed ``SOURCE_SEED + 1 + seed``) and fresh draws; on them

- the variational DR-FIM: ``run_score(estimator="variational")`` from the shared head (tau from the pilot,
  ``--var-steps`` steps per precision, Eq. 15 as printed), one run per variant (``--variants``: vogn (the
  default), reparam (``--var-curvature reparam``), vogn-s=images (the likelihood scale s = the number of images
  instead of the pilot's narrow-posterior rule));
- the diagonal DR-FIM with K label draws: ``run_score(label_draws=K)`` (each draw with its own labels and shift,
  keyed on (seed, image, draw)), K chosen so that it makes as many forward+backward passes (of one batch) as the
  variant: K = round(variational passes / (2 * batches)).

Reported per estimator: the mean pairwise Jaccard of the top-5% candidate elements (Q, K, V, FFN) across seeds, of
DR-FIM and of F(x), and Spearman. Extra rows make the comparison transparent: the variational fits combined by
Eq. 14 into Eq. 5/7 (``--eq15 substituted``), and the K-draw diagonal F combined with Eq. 15's pseudocount (the same
normalised pseudocount as the variational run), which separates the pseudocount's effect from the estimator's.
Also the time of one pass of each estimator relative to a plain training step on the same batch (CPU, one run).
"""

from __future__ import annotations

import argparse
import dataclasses
import itertools
import json
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from _common import plain_training_step  # noqa: E402
from stability import spearman, top_set  # noqa: E402  (the first study's; the same rank agreement)

from fisherscan.bench.pretrain import MODEL, PretrainConfig, pretrained_weights  # noqa: E402
from fisherscan.bench.protocol import SOURCE_SEED, SOURCE_STYLE  # noqa: E402
from fisherscan.data.datasets import make_loader  # noqa: E402
from fisherscan.data.synthetic import write_dataset  # noqa: E402
from fisherscan.fisher.diagonal import make_engine  # noqa: E402
from fisherscan.fisher.drfim import fisher_scale  # noqa: E402
from fisherscan.fisher.variational_segmentation import variational_fit  # noqa: E402
from fisherscan.models.groups import CANDIDATE_GROUPS, candidate_names, parameter_groups  # noqa: E402
from fisherscan.recipes import distributed  # noqa: E402
from fisherscan.recipes.config import ScoreConfig  # noqa: E402
from fisherscan.recipes.score import combine, prepare_head, run_score, set_up  # noqa: E402
from fisherscan.runtime import progress_bar  # noqa: E402
from fisherscan.scores.file import load_scores  # noqa: E402

VARIANTS = {"vogn": {}, "reparam": {"var_curvature": "reparam"}, "vogn-s=images": {"var_scale": "images"}}


def candidate_vector(scores: dict, groups: dict) -> torch.Tensor:
    return torch.cat([scores[name][piece.rows].reshape(-1).double() for name in sorted(scores)
                      for piece in groups[name] if piece.group in CANDIDATE_GROUPS])


def agreement(vectors: list[torch.Tensor]) -> dict:
    pairs = list(itertools.combinations(range(len(vectors)), 2))
    tops = [top_set(v) for v in vectors]
    jaccard = [len(tops[i] & tops[j]) / len(tops[i] | tops[j]) for i, j in pairs]
    return {"jaccard_top5": float(np.mean(jaccard)), "jaccard_top5_pairs": jaccard,
            "spearman": float(np.mean([spearman(vectors[i], vectors[j]) for i, j in pairs]))}


def config_for(common: dict, **options) -> ScoreConfig:
    return ScoreConfig(**common, **options)


def diagonal_draws(config: ScoreConfig, draws: int) -> tuple[dict, dict, float]:
    """F(x), F(x') and the mean shift s of the score recipe's diagonal estimator with ``--label-draws draws`` (each
    draw k with its own labels and shift, keyed on (seed, image, k)); the head is the recipe's (``config.head``)."""
    out = config.out.with_name(f"{config.out.stem}_x{draws}.safetensors")
    run_score(dataclasses.replace(config, label_draws=draws, out=out, overwrite=True))
    scores, meta = load_scores(out)
    return scores["fim"], scores["fim_shift"], meta["shift"]["magnitude"]


def pass_costs(segmenter_config: ScoreConfig, repeats: int) -> dict:
    """Seconds of one plain training step, one diagonal engine pass, one VOGN step and one reparam step on the same
    batch of 8 (median of ``repeats`` interleaved rounds), and each per pass relative to the plain step."""
    ranks, device = distributed.setup(torch.device("cpu"))
    run = set_up(segmenter_config, ranks, device)
    with progress_bar(None) as progress:
        prepare_head(run, progress)
    model = run.segmenter
    x, y, _ = next(iter(make_loader(run.dataset, 8, 0)))
    u = torch.rand(y.shape, generator=torch.Generator().manual_seed(0))
    engine = make_engine(model)
    steps = 16  # the fit's set-up (engine, copies) shared by 16 steps

    def vogn():
        variational_fit(model, [(x, y)], tau=1e-3, steps=steps, curvature="vogn")

    def reparam():
        variational_fit(model, [(x, y)], tau=1e-3, steps=steps, curvature="reparam")

    jobs = {"plain_training_step": (lambda: plain_training_step(model, x, y, u, None), 1, 1),
            "diagonal_pass": (lambda: engine.squared_gradient_sum(x, y, u), 1, 1),
            "vogn_step": (vogn, steps, 1), "reparam_step": (reparam, steps, 2)}
    times = {name: [] for name in jobs}
    for _ in range(repeats + 1):  # the first round warms up
        for name, (fn, per, _) in jobs.items():
            start = time.perf_counter()
            fn()
            times[name].append((time.perf_counter() - start) / per)
    seconds = {name: statistics.median(values[1:]) for name, values in times.items()}
    plain = seconds["plain_training_step"]
    return {"seconds": seconds, "passes_per_call": {n: p for n, (_, _, p) in jobs.items()},
            "per_pass_vs_plain": {n: seconds[n] / passes / plain for n, (_, _, passes) in jobs.items()},
            "batch": 8, "note": f"vogn/reparam: a fit of {steps} steps with tau given (set-up and updates included), "
                                f"divided by {steps}; plain: forward+backward of the batch; median of {repeats} "
                                "interleaved rounds"}


def run_seed(seed: int, args, common: dict, head: Path, work: Path, groups: dict, candidates: list[str]) -> dict:
    """Every estimator's F(x) and DR-FIM candidate vectors for one seed, and the passes each made."""
    source = write_dataset(work / f"source{seed}", domains=(SOURCE_STYLE,), images_per_domain=args.images,
                           size=(64, 64), seed=SOURCE_SEED + 1 + seed)[SOURCE_STYLE]
    base = config_for(common, data=source, seed=seed, head=head, out=work / f"diag{seed}.safetensors")
    batches = -(-args.images // base.batch_size)
    out, passes, cache = {}, {}, {}

    def record(name, scores):
        out[name] = {"drfim": candidate_vector(scores["drfim"], groups), "fim": candidate_vector(scores["fim"], groups)}

    for variant in args.variants:
        path = work / f"var_{variant}_{seed}.safetensors"
        options = {k: float(args.images) if v == "images" else v for k, v in VARIANTS[variant].items()}
        run_score(config_for(common, data=source, seed=seed, head=head, out=path, estimator="variational",
                             var_steps=args.var_steps, **options))
        scores, meta = load_scores(path)
        record(f"variational {variant}", scores)
        info = meta["variational"]
        passes[f"variational {variant}"] = sum(info["passes"].values())
        resubstituted, _ = combine(scores["fim"], scores["fim_shift"], meta["shift"]["magnitude"],
                                   config_for(common, data=source, eq15="substituted"), candidates,
                                   {"gamma": info["gamma"], "tau": info["tau"],
                                    "likelihood_scale": info["likelihood_scale"]})
        record(f"variational {variant}, Eq. 14 into Eq. 5/7", resubstituted)
        draws = max(1, round(passes[f"variational {variant}"] / (2 * batches)))
        if draws not in cache:
            cache[draws] = diagonal_draws(base, draws)
        f_clean, f_shift, magnitude = cache[draws]
        name = f"diagonal x {draws}"
        scores, _ = combine(f_clean, f_shift, magnitude, base, candidates)
        record(name, scores)
        passes[name] = 2 * batches * draws
        # the tau whose pseudocount, divided by this F's candidate mean, is the variational run's normalised one
        pseudocount = meta["eq15"]["pseudocount_normalized"] * fisher_scale(f_clean, candidates)
        prior = {"gamma": info["gamma"], "likelihood_scale": info["likelihood_scale"],
                 "tau": (pseudocount * info["likelihood_scale"] / info["gamma"]) ** -0.5}
        pseudo, _ = combine(f_clean, f_shift, magnitude, base, candidates, prior)
        record(f"diagonal x {draws} with Eq. 15's pseudocount of {variant}", pseudo)
    run_score(dataclasses.replace(base, label_draws=1))  # the recipe's diagonal with one draw
    scores, _ = load_scores(base.out)
    record("diagonal x 1", scores)
    passes["diagonal x 1"] = 2 * batches
    return {"vectors": out, "passes": passes}


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("benchmarks/results/variational_stability.json"))
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--var-steps", type=int, default=200)
    parser.add_argument("--variants", type=lambda s: s.split(","), default=["vogn", "reparam", "vogn-s=images"])
    parser.add_argument("--timing-repeats", type=int, default=5)
    parser.add_argument("--work", type=Path, default=None)
    parser.add_argument("--timing-only", action="store_true", help="measure the cost per pass again and replace it "
                                                                    "in --out (the stability rows stay)")
    args = parser.parse_args(argv)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    start = time.perf_counter()
    pretrained = pretrained_weights(PretrainConfig())
    work = args.work or Path(tempfile.mkdtemp(prefix="fisherscan-stability-"))
    common = dict(model=MODEL, weights=pretrained.path, layout="generic", crop=64, batch_size=8, device="cpu",
                  workers=0, overwrite=True)
    head_data = write_dataset(work / "head", domains=(SOURCE_STYLE,), images_per_domain=128, size=(64, 64),
                              seed=SOURCE_SEED)[SOURCE_STYLE]
    head_scores = work / "head_scores.safetensors"
    run_score(config_for(common, data=head_data, out=head_scores, warmup_steps=200, warmup_lr=3e-3, images=8))
    head = head_scores.with_name("head_scores.head.safetensors")
    ranks, device = distributed.setup(torch.device("cpu"))
    probe = set_up(config_for(common, data=head_data, out=work / "probe.safetensors"), ranks, device)
    groups = parameter_groups(probe.segmenter.backbone.named_parameters())
    candidates = candidate_names(groups)
    if args.timing_only:
        report = json.loads(args.out.read_text())
        report["cost_per_pass_cpu"] = pass_costs(config_for(common, data=head_data, head=head,
                                                            out=work / "t.safetensors"), args.timing_repeats)
        args.out.write_text(json.dumps(report, indent=1))
        return print_table(report)
    seeds = [run_seed(seed, args, common, head, work, groups, candidates) for seed in range(args.seeds)]
    rows = {name: {"drfim": agreement([s["vectors"][name]["drfim"] for s in seeds]),
                   "fim": agreement([s["vectors"][name]["fim"] for s in seeds]), "passes": seeds[0]["passes"].get(name)}
            for name in seeds[0]["vectors"]}
    first = args.variants[0]
    equal = next(n for n in rows if n.startswith("diagonal x") and "pseudocount" not in n and n != "diagonal x 1"
                 and rows[n]["passes"] is not None and abs(rows[n]["passes"] - rows[f"variational {first}"]["passes"])
                 <= 2 * -(-args.images // 8))
    costs = pass_costs(config_for(common, data=head_data, head=head, out=work / "t.safetensors"), args.timing_repeats)
    report = {"variational_seed_jaccard_top5": rows[f"variational {first}"]["drfim"]["jaccard_top5"],
              "diagonal_seed_jaccard_top5": rows[equal]["drfim"]["jaccard_top5"],
              "passes_each": {"variational": rows[f"variational {first}"]["passes"], "diagonal": rows[equal]["passes"],
                              "unit": "forward+backward passes of one batch of 8 images, both fits / F(x) and F(x')"},
              "compared": {"variational": f"variational {first}", "diagonal": equal},
              "rows": rows, "cost_per_pass_cpu": costs,
              "settings": {**{k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
                           "model": MODEL, "pretrained": pretrained.path.name,
                           "pretrain_config_hash": PretrainConfig().key(), "source_style": SOURCE_STYLE,
                           "batch_size": 8, "crop": 64},
              "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} CPU threads",
              "torch": torch.__version__, "seconds": time.perf_counter() - start}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=1))
    print_table(report)


def print_table(report: dict) -> None:
    print("| estimator | passes | DR-FIM top-5% Jaccard across seeds | DR-FIM Spearman | F top-5% Jaccard |")
    print("|---|---|---|---|---|")
    for name, row in report["rows"].items():
        print(f"| {name} | {row['passes']} | {row['drfim']['jaccard_top5']:.3f} | {row['drfim']['spearman']:.3f} | "
              f"{row['fim']['jaccard_top5']:.3f} |")
    print(json.dumps(report["cost_per_pass_cpu"], indent=1))


if __name__ == "__main__":
    main()
