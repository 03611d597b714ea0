"""Every option of ``score`` and ``tune`` as plain keyword-only dataclasses: the one home of their defaults and
help texts, and which of them a stopped run may change when it continues.

``RunConfig`` holds what both share (the backbone, the data, the head, the seed, run control); ``ScoreConfig``
and ``TuneConfig`` add their own. Each field is declared with ``option(default, help, panel)``: the command line
builds its options from these fields (names, defaults, help, the help panel they are listed in), the scores
metadata and the run manifest record them (``fisherscan.io.options_json``).
"""

from __future__ import annotations

import dataclasses
import os
import types
import typing
from dataclasses import dataclass
from pathlib import Path

from ..fisher.variational import DEFAULT_CURVATURE, DEFAULT_STEPS, PILOT_STEPS, PRIOR_FRACTION, TOLERANCE
from ..models.groups import CANDIDATE_GROUPS

PANELS = ("model", "data", "method", "shift", "variational", "selection", "optimisation", "evaluation",
          "run control", "output")

UNIONS = (typing.Union, types.UnionType)

#: --perturb-strength's default per --shift family: the pixel family's was chosen on the validation style
#: (docs/method.md, benchmarks/drfim_signal.py); Eq. 6 keeps the paper's spread
SHIFT_STRENGTH = {"pixel": 3.0, "eq6": 1.0}
DEFAULT_LABEL_DRAWS = 2  # --label-draws of the diagonal estimator with sampled labels: chosen there too
# options that may change between a stopped run and its continuation: none of them changes a result
RESUME_SAFE = ("workers", "device", "overwrite", "resume", "stop_after", "save_every", "max_bad_frac", "eval",
               "eval_every", "eval_layout", "eval_split", "eval_crop", "eval_stride")


def option(default=dataclasses.MISSING, help: str = "", panel: str = "run control", **metadata):
    """A config field with its command-line help and panel. ``metadata``: ``flag="--normalize/--literal"`` for a
    boolean pair (default ``--x/--no-x``), ``fraction=True`` for a value the command line also takes as a
    percentage (5%), ``aliases=("--old-name",)`` for hidden old spellings, ``hidden=True``, ``before=value``: the
    value that reproduces what runs did before the option existed (``LEGACY``), assumed for a file that lacks it."""
    if panel not in PANELS:
        raise ValueError(f"unknown panel {panel!r}")
    return dataclasses.field(default=default, metadata={"help": help, "panel": panel, **metadata})


@dataclass(kw_only=True)
class RunConfig:
    model: str = option(help="a short name (see 'fisherscan models'), timm:<name>, or a Hugging Face hub id in the "
                             "local cache (facebook/dinov2-large); ?key=value&... passes timm.create_model arguments",
                        panel="model")
    data: Path = option(help="folder of labelled source images (a layout of docs/method.md)", panel="data")
    out: Path = option(help="where to write the result", panel="output")
    weights: Path | None = option(None, "checkpoint file (the official .pth/.pt, timm's or transformers' .safetensors) "
                                        "or Hugging Face model folder (config.json + model.safetensors); default the "
                                        "torch hub cache, for a hub id the Hugging Face cache", "model")
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
    workers: int = option(2, "DataLoader worker processes decoding images (0: in the main process)", "run control")
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
    label_draws: int | None = option(None, "label (and shift) draws per image; its squares are averaged over them (K "
                                           "backwards on one clean forward, K shifted passes; default 2, chosen on "
                                           "a validation style; 1 with --labels given and the variational "
                                           "estimator)", "method", before=1)
    shift: str = option("pixel", "the simulated unseen domain of F(x'): pixel (photometric, contrast, haze and blur "
                                 "change of each image; the default, chosen on a validation style) or eq6 (feature "
                                 "statistics, the paper's Eq. 6)", "shift", before="eq6")
    shift_data: Path | None = option(None, "real images of another style for F(x') instead: the same scenes (same "
                                           "relative paths: paired) or any images (unpaired); overrides --shift",
                                     "shift", before=None)
    perturb_at: tuple[int, ...] = option((0,), "block(s) whose input tokens get Eq. 6, e.g. 0,2,4 (the first one "
                                               "also measures the shift s of the other families)", "shift")
    perturb_prob: float = option(1.0, "probability that Eq. 6 is applied at a site, per image and site (DSU: 0.5)",
                                 "shift", before=1.0)
    perturb_strength: float | None = option(None, "multiplies the pixel family's ranges or Eq. 6's spread (default "
                                                  "3 for pixel, chosen on a validation style; 1 for eq6, the paper's)",
                                            "shift", before=1.0)
    spread: str = option("batch", "Eq. 6's spread of the statistics: batch (the batch's, as DSU) or pool (the "
                                  "first --spread-pool images', fixed)", "shift",
                         before="batch")
    spread_pool: int = option(64, "images of the pool of --spread pool", "shift", before=64)
    normalize: bool = option(True, "divide F by its candidate mean before Eq. 5/7 (docs/method.md), or the literal "
                                   "formula", "method", flag="--normalize/--literal")
    delta_eps: float | None = option(None, "Eq. 5's eps (default 1e-3 normalised, 1e-8 literal)", "method")
    shift_weight: float | None = option(None, "a fixed weight of the domain term of Eq. 7 (default exp(-s))", "method")
    drfim_weight: float = option(1.0, "lambda in DR-FIM = F + lambda * w * Delta F (Eq. 7's balance)", "method",
                                 before=1.0)
    combine: str | None = option(None, "rank (F + lambda w Delta F on the ranks of F and Delta F over the "
                                       "candidates: unit-free; the default) or sum (the same in normalised units; the "
                                       "default with --literal)", "method", before="sum")
    replicates: int = option(1, "2: also score the even- and odd-index images apart and report each kind's "
                                "half-vs-half agreement (top-k Jaccard, Spearman with Spearman-Brown); no extra cost",
                             "method", before=1)
    chunk_size: int = option(8, "images per chunk of per-image gradient work (bounds memory)", "run control")

    def __post_init__(self):
        """The defaults that depend on other options: the draws per image, the shift family's strength, the balance
        of --literal."""
        if self.label_draws is None:
            self.label_draws = DEFAULT_LABEL_DRAWS if (self.estimator, self.labels) == ("diagonal", "sampled") else 1
        if self.perturb_strength is None:
            self.perturb_strength = SHIFT_STRENGTH.get(self.shift, 1.0)
        if self.combine is None:
            self.combine = "rank" if self.normalize else "sum"


@dataclass(kw_only=True)
class TuneConfig(RunConfig):
    """Every option of ``fisherscan tune``; the manifest records them all."""

    scores: Path = option(help="scores file from 'fisherscan score'", panel="selection")
    out: Path = option(help="run folder to write", panel="output")
    head: Path | None = option(None, "head to start from (default: the one saved beside the scores)", "model")
    warmup_steps: int = option(200, "decoder warm-up steps when no head is found; given with another --decoder than "
                                    "the scores', a new head is warmed up", "method")
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
    delta_min: float = option(0.01, "selected fraction of all backbone parameters at the start (Eq. 16): 0.01 or 1%",
                              "selection", fraction=True)
    delta_max: float = option(0.05, "selected fraction of all backbone parameters at the end (Eq. 16): 0.05 or 5%",
                              "selection", fraction=True)
    schedule_t: float | None = option(None, "Eq. 16 time constant (default steps/3)", "selection",
                                      aliases=("--schedule-T",))
    lr: float = option(1e-4, "AdamW learning rate (poly decay)", "optimisation")
    decoder_lr: float | None = option(None, "the decoder's AdamW learning rate (poly decay; default --lr)",
                                      "optimisation")
    adam_bias_correction: str = option("selection", "selection: an element's Adam bias correction counts from the "
                                                    "step it was first selected (its first update is a normal first "
                                                    "Adam step); global: from the run's first step (fisherscan before "
                                                    "per-element counts)", "optimisation", before="global")
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
    save_every: int = option(100, "steps between resumable checkpoints", "run control")


def options_before() -> dict:
    """Option name -> the value that reproduces runs made before the option existed (``option(before=...)``)."""
    return {f.name: f.metadata["before"] for cls in (ScoreConfig, TuneConfig) for f in dataclasses.fields(cls)
            if "before" in f.metadata}


# options added since files were first written: the value that reproduces what a file without them did
LEGACY = options_before()


def recorded_option(saved: dict, key: str):
    """An option as a file recorded it, in today's spelling: a missing one takes its ``LEGACY`` value, a single
    block of ``perturb_at`` becomes a list."""
    value = saved.get(key, LEGACY.get(key))
    return [value] if key == "perturb_at" and isinstance(value, int) else value


def field_types(cls) -> dict[str, object]:
    """Each field's type (``Path | None``, ``tuple[int, ...] | None``, ...) of a config dataclass."""
    return typing.get_type_hints(cls)


def path_kind(hint) -> str | None:
    """"path" for a ``Path`` field (optional or not), "paths" for ``tuple[Path, ...]``, else None."""
    args = [a for a in typing.get_args(hint) if a is not type(None)] if typing.get_origin(hint) in UNIONS else [hint]
    base = args[0] if len(args) == 1 else None
    if base is Path:
        return "path"
    if typing.get_origin(base) is tuple and typing.get_args(base)[:1] == (Path,):
        return "paths"
    return None


def absolute_paths(config):
    """``config`` with every path field absolute (``os.path.abspath``: '..' folded, links kept), so the files a run
    writes name the same paths from any working folder."""
    changes = {}
    for name, hint in field_types(type(config)).items():
        value, kind = getattr(config, name), path_kind(hint)
        if value is not None and kind == "path":
            changes[name] = Path(os.path.abspath(value))
        elif kind == "paths":
            changes[name] = tuple(Path(os.path.abspath(v)) for v in value)
    return dataclasses.replace(config, **changes)


def _same(saved, now, base: Path | None) -> bool:
    """Recorded and current option values agree; a relative recorded path (files written before paths were
    recorded absolute) names the same place when read against the working folder or ``base``."""
    if saved == now:
        return True
    if isinstance(saved, list) and isinstance(now, list):
        return len(saved) == len(now) and all(_same(a, b, base) for a, b in zip(saved, now))
    if not (isinstance(saved, str) and isinstance(now, str)) or os.path.isabs(saved) or not os.path.isabs(now):
        return False
    return any(os.path.abspath(os.path.join(folder, saved)) == now
               for folder in (os.getcwd(), *((str(base),) if base is not None else ())))


def changed_options(saved: dict, now: dict, base: Path | None = None) -> list[str]:
    """The recorded options (JSON) of a stopped run that differ from this run's, ``RESUME_SAFE`` left out (a missing
    one read as its ``LEGACY`` value); ``base``: the folder a relative recorded path is read against (besides the
    working folder)."""
    keys = (set(saved) | set(now)) - set(RESUME_SAFE)
    return sorted(k for k in keys if not _same(recorded_option(saved, k), now.get(k), base))
