"""Every option of ``score`` and ``tune`` as plain keyword-only dataclasses: the one home of their defaults and
help texts, and which of them a stopped run may change when it continues.

``RunConfig`` holds what both share (the backbone, the data, the head, the seed, run control); ``ScoreConfig``
and ``TuneConfig`` add their own. Each field is declared with ``option(default, help, panel)``: the command line
builds its options from these fields (names, defaults, help, the help panel they are listed in), the scores
metadata and the run manifest record them (``fisherscan.io.options_json``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

from ..fisher.variational import DEFAULT_CURVATURE, DEFAULT_STEPS, PILOT_STEPS, PRIOR_FRACTION, TOLERANCE
from ..models.groups import CANDIDATE_GROUPS

PANELS = ("model", "data", "method", "variational", "selection", "optimisation", "evaluation", "run control",
          "output")

# options that may change between a stopped run and its continuation: none of them changes a result
RESUME_SAFE = ("workers", "device", "overwrite", "resume", "stop_after", "save_every", "max_bad_frac", "eval",
               "eval_every", "eval_layout", "eval_split", "eval_crop", "eval_stride")


def option(default=dataclasses.MISSING, help: str = "", panel: str = "run control", **metadata):
    """A config field with its command-line help and panel (``metadata``: e.g. ``flag="--normalize/--literal"``
    for a boolean pair, ``hidden=True``, ``before=value``: the value that reproduces what runs did before the
    option existed, assumed for a stopped run whose recorded options lack it)."""
    if panel not in PANELS:
        raise ValueError(f"unknown panel {panel!r}")
    return dataclasses.field(default=default, metadata={"help": help, "panel": panel, **metadata})


@dataclass(kw_only=True)
class RunConfig:
    model: str = option(help="a short name (see 'fisherscan models'), or timm:<name>; ?key=value&... passes "
                             "timm.create_model arguments", panel="model")
    data: Path = option(help="folder of labelled source images (a layout of docs/method.md)", panel="data")
    out: Path = option(help="where to write the result", panel="output")
    weights: Path | None = option(None, "checkpoint file: the official one (.pth/.pt) or timm's .safetensors; default "
                                        "the torch hub cache", "model")
    random_init: bool = option(False, "allow an untrained backbone (no weights)", "model")
    strict: bool = option(True, "checkpoint keys missing or unexpected after conversion are an error", "model",
                          flag="--strict/--no-strict")
    layout: str = option("auto", "auto|gta5|cityscapes|bdd100k|mapillary|acdc|generic", "data")
    split: str = option("train", "dataset split where the layout has splits", "data")
    images: int | None = option(None, "use a seeded random subset of N images (default: all)", "data")
    batch_size: int = option(8, "images per batch", "data")
    crop: int = option(512, "square crop; padded to a multiple of the patch size", "data")
    decoder: str = option("linear", "linear, multilevel or mask2former[?option=value&...]", "model")
    feature_blocks: tuple[int, ...] | None = option(None, "multilevel/mask2former: 4 block indices (default: Rein's "
                                                          "7,11,15,23 at depth 24, else evenly spaced)", "model")
    head: Path | None = option(None, "a warmed-up head to start from instead of warming one up", "model")
    warmup_steps: int = option(200, "decoder warm-up steps with the backbone frozen (Algorithm 1, step 1)", "method")
    seed: int = option(0, "seed of every draw (subset, crops, labels, shifts, selection)", "run control")
    device: str = option("auto", "auto|cpu|cuda", "run control")
    workers: int = option(0, "DataLoader worker processes decoding images", "run control")
    overwrite: bool = option(False, "replace an existing --out (and discard a stopped run's state)", "output")
    save_every: int = option(50, "save the resumable state every N batches or steps", "run control")
    resume: bool = option(False, "continue the stopped run of the same command", "run control")
    stop_after: int | None = option(None, "stop resumably after N batches or steps of this run", "run control")
    max_bad_frac: float = option(0.1, "stop with an error when more than this fraction of batches or steps has "
                                      "non-finite losses or gradients (such ones are skipped)", "run control")
    skip_bad: bool = option(False, "skip unreadable or invalid image/label pairs (checked before the run, listed in "
                                   "the metadata) instead of stopping", "data")


@dataclass(kw_only=True)
class ScoreConfig(RunConfig):
    """Every option of ``fisherscan score``; the metadata records them all."""

    out: Path = option(Path("scores.safetensors"), "scores file to write (<name>.safetensors)", "output")
    batch_size: int = option(8, "images per batch (Eq. 6's batch spread); under torchrun the global batch, split "
                                "across the ranks", "data")
    warmup_lr: float = option(1e-3, "decoder warm-up learning rate", "method")
    labels: str = option("sampled", "sampled (the true Fisher) or given (the empirical Fisher)", "method")
    estimator: str = option("diagonal", "diagonal (exact Eq. 9) or variational (Eq. 10-15)", "method")
    gamma: float = option(1.0, "KL weight gamma (Eq. 11)", "variational")
    tau: float | None = option(None, "prior std tau around the pretrained weights (Eq. 10); default: picked by a pilot "
                                     f"of {PILOT_STEPS} probes, tau^-2 = {PRIOR_FRACTION} * s * (mean curvature) / "
                                     "gamma", "variational")
    var_steps: int = option(DEFAULT_STEPS, "natural-gradient steps T2 per precision (the pilot's come on top)",
                            "variational")
    var_curvature: str = option(DEFAULT_CURVATURE, "vogn (per-image squared gradients at perturbed weights: a "
                                                   "diagonal Fisher at perturbed weights, one pass per step) or "
                                                   "reparam (the antithetic reparameterized Hessian of Eq. 12, two "
                                                   "passes per step)", "variational",
                                before="reparam")
    var_control: bool = option(True, "reparam: subtract the control variate (xi^2 - 1) * D from each step's "
                                     "curvature (zero mean, removes the xi^2 noise)", "variational",
                               flag="--var-control/--no-var-control", before=False)
    var_lr: float = option(0.0, "step size (0: running average)", "variational")
    var_scale: float | None = option(None, "likelihood scale s (default: picked by the pilot so that the posterior "
                                           "stays narrow, at least the number of images; with --tau, the number of "
                                           "images)", "variational")
    var_tolerance: float = option(TOLERANCE, "converged when the data part D = Lambda - tau^-2 moved less than this "
                                              "(sum |D_T - D_T/2| / sum |D_T|) over the second half of the steps",
                                  "variational")
    var_legacy: bool = option(False, "the variational estimator before the data part was kept apart (Lambda stored "
                                     "with its prior, 10%-window test, reparam without control variate): reproduces "
                                     "old score files", "variational", hidden=True, before=True)
    eq15: str = option("printed", "variational DR-FIM: printed (Eq. 15's pseudocount gamma tau^-2 / s in Delta F's "
                                  "denominator, gamma times the domain term) or substituted (Eq. 14 into Eq. 5/7)",
                       "method", before="substituted")
    perturb_at: int = option(0, "block whose input tokens get Eq. 6", "method")
    normalize: bool = option(True, "divide F by its candidate mean before Eq. 5/7 (docs/method.md), or the literal "
                                   "formula", "method", flag="--normalize/--literal")
    delta_eps: float | None = option(None, "Eq. 5's eps (default 1e-3 normalised, 1e-8 literal)", "method")
    shift_weight: float | None = option(None, "a fixed weight of the domain term of Eq. 7 (default exp(-s))", "method")
    chunk_size: int = option(8, "images per chunk of per-image gradient work (bounds memory)", "run control")


@dataclass(kw_only=True)
class TuneConfig(RunConfig):
    """Every option of ``fisherscan tune``; the manifest records them all."""

    scores: Path = option(help="scores file from 'fisherscan score'", panel="selection")
    out: Path = option(help="run folder to write", panel="output")
    head: Path | None = option(None, "head to start from (default: the one saved beside the scores)", "model")
    warmup_steps: int = option(200, "decoder warm-up steps when no head is found", "method")
    steps: int = option(1000, "fine-tuning steps T3", "optimisation")
    accumulate: int = option(1, "gradient accumulation: batches per step", "optimisation")
    augment: str = option("crop", "crop (random crop + flip) or rein (resize 0.5-2.0, class-balanced crop, flip, "
                                  "photometric distortion)", "data")
    recipe: str | None = option(None, "preset of a published protocol: rein-512 (options given explicitly override "
                                      "it)", "optimisation")
    strategy: str = option("scores", "scores (by --score-kind), fim, delta, drfim, random, random-q/k/v, full, "
                                     "freeze", "selection")
    score_kind: str = option("drfim", "score kind that ranks elements", "selection")
    candidates: tuple[str, ...] = option(CANDIDATE_GROUPS, "groups to select from", "selection")
    delta_min: float = option(0.01, "selected fraction of all backbone parameters at the start (Eq. 16)",
                              "selection")
    delta_max: float = option(0.05, "selected fraction of all backbone parameters at the end (Eq. 16)", "selection")
    schedule_t: float | None = option(None, "Eq. 16 time constant (default steps/3)", "selection")
    lr: float = option(1e-4, "AdamW learning rate (poly decay)", "optimisation")
    weight_decay: float = option(0.05, "AdamW weight decay (selected elements and the decoder only)", "optimisation")
    power: float = option(0.9, "poly decay power", "optimisation")
    full_checkpoint: bool = option(False, "save the whole backbone, not only the changed parameters", "output")
    eval: tuple[Path, ...] = option((), "target domain folder(s) to evaluate at the end (repeat for several)",
                                    "evaluation")
    eval_every: int = option(0, "also evaluate every N steps (0: only at the end)", "evaluation")
    eval_layout: str = option("auto", "layout of the --eval folders", "evaluation")
    eval_split: str = option("val", "split of the --eval folders", "evaluation")
    eval_crop: int | None = option(None, "slide window (default --crop)", "evaluation")
    eval_stride: int | None = option(None, "slide stride (default 2/3 of the window)", "evaluation")
    workers: int = option(2, "DataLoader worker processes decoding images", "run control")
    save_every: int = option(100, "steps between resumable checkpoints", "run control")


def options_before() -> dict:
    """Option name -> the value that reproduces runs made before the option existed (``option(before=...)``)."""
    return {f.name: f.metadata["before"] for cls in (ScoreConfig, TuneConfig) for f in dataclasses.fields(cls)
            if "before" in f.metadata}


def changed_options(saved: dict, now: dict) -> list[str]:
    """The recorded options (JSON) of a stopped run that differ from this run's, ``RESUME_SAFE`` left out; an option
    the recording lacks counts as its ``before`` value (runs made before it existed)."""
    saved = {**{k: v for k, v in options_before().items() if k in now and k not in saved}, **saved}
    keys = (set(saved) | set(now)) - set(RESUME_SAFE)
    return sorted(k for k in keys if saved.get(k) != now.get(k))
