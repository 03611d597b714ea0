"""What a score run computes from F(x) and F(x') and what its file records: Eq. 5/7 with the decided normalisation
and balance (``combine``), the halves' agreement (``reliability``) and the metadata (``score_metadata``)."""

from __future__ import annotations

from .. import __version__
from ..data.datasets import padded_size
from ..data.labels import NUM_CLASSES
from ..errors import FisherscanError
from ..fisher.drfim import default_delta_eps, dr_fim_terms, eq15_pseudocount, shift_weight, variational_dr_fim_terms
from ..io import options_json
from ..models.groups import candidate_names, parameter_groups
from ..models.heads import head_path_for
from ..scores.reliability import half_agreement
from .config import ScoreConfig

# run control, left out of the scores file's options so a continued run writes the same file as an uninterrupted one
RUN_CONTROL = ("resume", "stop_after", "save_every")
KINDS = ("fim", "fim_shift", "delta", "drfim")
SHIFT_DEFINITIONS = {
    "eq6": "s = mean over images and channels of (|alpha-mu| + |beta-sigma|) / sigma; weight = exp(-s)",
    "eq6-sites": "s = mean over images of the sum over the sites where Eq. 6 applied of the mean over channels of "
                 "(|alpha-mu| + |beta-sigma|) / sigma; weight = exp(-s)",
    "other": "s = mean over images and channels of (|mu'-mu| + |sigma'-sigma|) / sigma of the patch tokens entering "
             "the first --perturb-at block, x vs x'; weight = exp(-s)",
}


def combine(f_clean: dict, f_shift: dict, magnitude: float, config: ScoreConfig, candidates: list[str],
            prior: dict | None = None) -> tuple[dict, dict]:
    """Eq. 5 and Eq. 7 with the decided normalisation, relative eps, shift weight and balance
    (``fisherscan.fisher.drfim``): (scores by kind, the record of those choices). With ``prior`` (the variational
    fit's gamma, tau and likelihood scale) and ``--eq15 printed``, Eq. 15 under the same balance."""
    weight = config.shift_weight if config.shift_weight is not None else shift_weight(magnitude)
    eps = config.delta_eps if config.delta_eps is not None else default_delta_eps(config.normalize)
    printed = prior is not None and config.eq15 == "printed"
    balance = {"drfim_weight": config.drfim_weight, "combine": config.combine}
    try:
        if printed:
            delta, drfim, scale = variational_dr_fim_terms(f_clean, f_shift, weight, normalize=config.normalize,
                                                           candidates=candidates, eps=eps, **prior, **balance)
        else:
            delta, drfim, scale = dr_fim_terms(f_clean, f_shift, weight, config.normalize, candidates, eps, **balance)
    except ValueError:
        raise FisherscanError("F(x) is zero on every candidate parameter; check the labels and --warmup-steps") \
            from None
    scores = {"fim": f_clean, "fim_shift": f_shift, "delta": delta, "drfim": drfim}
    eq6 = config.shift_data is None and config.shift == "eq6"
    single = len(config.perturb_at) == 1 and config.perturb_prob >= 1
    definition = SHIFT_DEFINITIONS[("eq6" if single else "eq6-sites") if eq6 else "other"]
    terms = {"normalization": {"mode": "candidate-mean" if config.normalize else "none", "scale": scale},
             "delta_eps": eps,
             "shift": {"magnitude": magnitude, "weight": weight, "weight_overridden": config.shift_weight is not None,
                       "definition": definition},
             "balance": balance_record(config.drfim_weight, config.combine)}
    if prior is not None:
        terms["eq15"] = eq15_record(config, prior, scale, printed)
    return scores, terms


def rebalance(scores: dict, metadata: dict, drfim_weight: float, combine_mode: str) -> tuple[dict, dict]:
    """A diagonal scores file's DR-FIM under another balance (Eq. 7 as ``combine`` computes it, from the file's F(x),
    F(x'), normalisation, eps and shift weight): (scores with the new ``drfim``, metadata with the new balance).
    ``drfim_weight`` may be negative here (domain-sensitive elements pushed out of the selection), a bench probe
    that ``score`` does not offer."""
    if "eq15" in metadata:
        raise ValueError("rebalance takes the diagonal estimator's files (Eq. 7), not Eq. 15's")
    candidates = candidate_names(parameter_groups((n, t.shape) for n, t in scores["fim"].items()))
    normalize = metadata["normalization"]["mode"] != "none"
    _, drfim, _ = dr_fim_terms(scores["fim"], scores["fim_shift"], metadata["shift"]["weight"], normalize,
                               candidates, metadata["delta_eps"], drfim_weight, combine_mode)
    return {**scores, "drfim": drfim}, {**metadata, "balance": balance_record(drfim_weight, combine_mode)}


def balance_record(drfim_weight: float, combine_mode: str) -> dict:
    """The metadata's ``balance``: lambda, the combine mode and the formula they give."""
    return {"drfim_weight": drfim_weight, "combine": combine_mode, "formula": "DRF = F + lambda * w * Delta F" + (
        " on the ranks of F and Delta F over the candidates" if combine_mode == "rank" else "")}


def eq15_record(config: ScoreConfig, prior: dict, scale: float, printed: bool) -> dict:
    """How the variational DR-FIM was formed: Eq. 15 as printed (its pseudocount) or Eq. 14 substituted."""
    if not printed:
        return {"mode": config.eq15, "formula": "Eq. 14 substituted into Eq. 5/7 (no pseudocount)"}
    pseudocount = eq15_pseudocount(**prior)
    return {"mode": config.eq15, "pseudocount": pseudocount, "pseudocount_normalized": pseudocount / scale,
            "domain_factor": prior["gamma"],
            "formula": "Delta F = |F(x) - F(x')| / (min(F(x), F(x')) + gamma tau^-2 / s + eps), DRF = F(x) + w * "
                       "gamma * Delta F; F and the pseudocount divided by the normalisation scale alike"}


def convergence_notes(record: dict, config: ScoreConfig) -> list[str]:
    """A warning per variational fit that has not converged, and per fit with skipped steps."""
    notes = []
    where = "over the last 10% of steps" if config.var_legacy else "of D = Lambda - tau^-2 over the second half"
    for kind, converged in record["converged"].items():
        if not converged:
            notes.append(f"warning: the {kind} precision has not converged (relative change "
                         f"{record['relative_change'][kind]:.3f} {where}; tolerance {config.var_tolerance}"
                         f"{'' if config.var_legacy else ', at least 10 steps'}); raise --var-steps")
    for kind, bad in record["bad_steps"].items():
        if bad:
            notes.append(f"{bad} variational {kind} steps had a non-finite loss or curvature and were skipped")
    return notes


def reliability(halves: list[dict], seed: int) -> dict:
    """Per kind, the agreement of the two halves' scores (``fisherscan.scores.reliability``)."""
    agreement = half_agreement(halves[0], halves[1], list(KINDS), seed=seed)
    return {"halves": "images of even and odd index", "top": 0.05, **agreement}


def perturbation_record(config: ScoreConfig, mode: str) -> dict:
    """Where and how F(x') was made."""
    sites = list(config.perturb_at)
    record = {"family": mode, "site": f"input of block{'s' if len(sites) > 1 else ''} "
                                      f"{', '.join(map(str, sites))}", "block": sites[0], "blocks": sites}
    if mode == "eq6":
        record.update({"tokens": "patch tokens; prefix tokens untouched", "variance": "unbiased", "eps": 1e-6,
                       "batch_spread": "detached", "batch_size": config.batch_size, "probability": config.perturb_prob,
                       "strength": config.perturb_strength, "spread": config.spread,
                       "draws": "keyed on (seed, image index, site)"})
        if config.spread == "pool":
            record["spread_pool"] = config.spread_pool
    elif mode == "pixel":
        record.update({"strength": config.perturb_strength, "draws": "keyed on (seed, image index)",
                       "changes": "blur, contrast, brightness, tint, haze (fisherscan.fisher.pixel_shift)"})
    else:
        record.update({"shift_data": str(config.shift_data),
                       "pairing": "same relative path, same crop and label draws" if mode == "paired"
                                  else "unpaired: own crops, labels sampled"})
    return record


def score_metadata(run, extra: dict, terms: dict, warmup: dict) -> dict:
    """Every option and decision of the run (``score.ScoreRun``), as the scores file records it."""
    config, backbone = run.config, run.backbone
    return {
        "fisherscan_version": __version__,
        "model": config.model,
        "timm_architecture": backbone.timm_name,
        "weights": backbone.weights,
        "weights_sha256": backbone.weights_sha256,
        "weights_source": backbone.source,
        "random_init": backbone.random_init,
        "estimator": config.estimator,
        "images": extra["images"],
        "bad_batches": extra.get("bad_batches"),
        "skipped_pairs": run.skipped,
        "seed": config.seed,
        "labels": config.labels,
        "loss_reduction": "per image: sum of pixel cross-entropy over valid pixels (ignore 255 and padding); "
                          "F = mean over images of the squared per-image gradient (Eq. 9)",
        **terms,
        "label_draws": config.label_draws,
        "perturbation": perturbation_record(config, run.shift_mode),
        "crop": config.crop,
        "padding": {"pad_to_multiple_of": backbone.patch_size,
                    "padded_size": padded_size(config.crop, backbone.patch_size),
                    "rule": "random crop (smaller images padded), then pad bottom/right with 0 (image) and 255 "
                            "(label); native patch size kept, position embeddings interpolated at run time"},
        "decoder": config.decoder,
        "head": str(head_path_for(config.out)),
        "warmup": warmup,
        "data": {"path": str(config.data), "layout": run.layout, "split": config.split},
        "num_classes": NUM_CLASSES,
        "device": run.device.type,
        "world_size": run.ranks.world,
        "autocast": "bfloat16" if run.device.type == "cuda" else None,
        "options": options_json(config, exclude=RUN_CONTROL),
        "notes": run.notes,
    }
