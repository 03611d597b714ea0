"""The variational estimator's run (Eq. 10-14): Lambda_x on the source batches, then Lambda_x' on the same batches
shifted by the run's family (Eq. 6, the pixel family or --shift-data), each ``var_steps`` natural-gradient steps
(``fisherscan.fisher.variational``), resumable.

Without ``--tau`` the clean fit starts with a pilot of ``PILOT_STEPS`` probes that picks tau; the shifted fit uses
the same prior (one prior N(theta_pt, tau^2 I) for both, so Eq. 15's pseudocount is one number). Global steps:
the pilot's, then the clean fit's, then the shifted fit's.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from rich.progress import Progress

from ..data.datasets import make_loader
from ..data.labels import IGNORE_INDEX
from ..errors import FisherscanError
from ..fisher.loss import trainable_parameters
from ..fisher.variational import PASSES_PER_STEP, PILOT_STEPS, fit_precision
from ..fisher.variational_segmentation import segmentation_losses, segmentation_squares
from ..models.segmenter import Segmenter
from ..runtime import step_done
from .config import ScoreConfig
from .score_loop import Estimate, label_uniforms


def cycle(dataset, batch_size: int, workers: int, start: int = 0) -> Iterator[tuple[int, list]]:
    """(visit, batch: x, y, indices[, x', y']) for ever in dataset order from batch ``start`` on (no batch is held
    in memory)."""
    visit, skip = divmod(start, math.ceil(len(dataset) / batch_size))
    while True:
        part = torch.utils.data.Subset(dataset, range(skip * batch_size, len(dataset))) if skip else dataset
        for batch in make_loader(part, batch_size, workers):
            yield visit, list(batch)
        visit, skip = visit + 1, 0


VARIATIONAL_PHASES = ("clean", "shift")


def phase_steps(config: ScoreConfig) -> dict[str, int]:
    """Steps of each fit, the pilot's included (the clean fit runs the pilot when tau is not given)."""
    return {"clean": config.var_steps + (PILOT_STEPS if config.tau is None else 0), "shift": config.var_steps}


def total_steps(config: ScoreConfig) -> int:
    """Global steps of a whole variational run: the pilot's, the clean fit's and the shifted fit's."""
    return sum(phase_steps(config).values())


def run_variational(segmenter: Segmenter, shift, dataset, config: ScoreConfig, device: torch.device,
                    autocast_dtype: torch.dtype | None, progress: Progress, resume: dict | None = None,
                    save=None) -> Estimate:
    """Eq. 10-14 on source batches (Lambda_x) and on the same batches shifted by the run's family (Lambda_x').

    Every ``config.save_every`` global steps, and when ``config.stop_after`` steps of this run are done (then F is
    None and ``extra["stopped"]`` True), ``save(run)`` gets the state; ``resume`` (that state) continues it.
    """
    resume = resume or {"phase": "clean", "global_step": 0, "magnitudes": [], "fits": {}, "fit": None}
    run = {"fits": dict(resume["fits"]), "magnitudes": list(resume["magnitudes"])}
    steps, total = phase_steps(config), total_steps(config)
    stop_at = resume["global_step"] + config.stop_after if config.stop_after is not None else None

    def stopped(global_step: int) -> Estimate:
        return Estimate(None, None, 0.0, {"stopped": True, "batches_done": global_step, "batches_total": total})

    offset = 0
    for phase, kind in enumerate(VARIATIONAL_PHASES):
        if kind not in run["fits"]:
            fit_state = resume["fit"] if resume["phase"] == kind else None
            fit = _fit_phase(segmenter, dataset, config, device, autocast_dtype, progress, kind, offset, fit_state,
                             run, shift, stop_at, save)
            if fit is None:
                return stopped(stop_at)
            run["fits"][kind] = fit
            done = offset + steps[kind]
            stopping = stop_at is not None and done >= stop_at
            if done < total and save is not None and (stopping or done % config.save_every == 0):
                save({"phase": VARIATIONAL_PHASES[phase + 1], "global_step": done, "magnitudes": run["magnitudes"],
                      "fits": run["fits"], "fit": None})
            if done < total and stopping:
                return stopped(done)
        offset += steps[kind]
    fits, magnitudes = run["fits"], run["magnitudes"]
    magnitude = sum(magnitudes) / max(len(magnitudes), 1)
    return Estimate(fits["clean"].fisher, fits["shift"].fisher, magnitude,
                    variational_record(fits, config, len(dataset)))


def _fit_phase(segmenter: Segmenter, dataset, config: ScoreConfig, device: torch.device,
               autocast_dtype: torch.dtype | None, progress: Progress, kind: str, offset: int, fit_state: dict | None,
               run: dict, shift, stop_at: int | None, save):
    """One fit (``kind`` clean or shift) from ``fit_state`` or afresh; None when stopped by ``--stop-after``."""
    shifted, magnitudes = kind == "shift", run["magnitudes"]
    steps = phase_steps(config)[kind]
    first = int(fit_state["step"]) if fit_state is not None else 0
    batches = cycle(dataset, config.batch_size, config.workers, first)
    task = progress.add_task(f"variational Lambda_x{chr(39) if shifted else ''}", total=steps, completed=first,
                             rate="")

    def next_batch(step):
        visit, batch = next(batches)
        x, y, indices = batch[0].to(device), batch[1].to(device), [int(i) for i in batch[2]]
        if shifted:
            x_other = batch[3].to(device) if len(batch) > 3 else None
            prepared = shift.prepare(x, indices, x_other)  # sets the Eq. 6 hook's spreads and draws
            magnitudes.append(float(prepared.magnitudes.sum()) / len(indices))
            x, y = prepared.x, (batch[4].to(device) if len(batch) > 3 else y)
        return x, y, label_uniforms(config, y, indices, visit)

    def on_step(step, terms):
        text = f"E[loss] {terms['expected_loss']:.3g} KL {terms['kl']:.3g}" if terms else "pilot: picking tau"
        step_done(progress, task, 1, text)

    def on_bad(step, bad):
        progress.console.print(f"[yellow]warning:[/] variational {kind} step {step + 1}: non-finite loss or curvature, "
                               f"skipped ({bad} bad of {steps} steps)", highlight=False)
        if bad > config.max_bad_frac * steps:
            raise FisherscanError(f"{bad} of {steps} variational {kind} steps had non-finite losses or curvature "
                                  f"(more than --max-bad-frac {config.max_bad_frac}); check the weights, --tau and "
                                  "--var-scale")

    def checkpoint(done, get_state):
        stopping = stop_at is not None and offset + done >= stop_at
        if save is not None and (stopping or (offset + done) % config.save_every == 0):
            save({"phase": kind, "global_step": offset + done, "magnitudes": magnitudes, "fits": run["fits"],
                  "fit": get_state()})
        return stopping

    common = dict(ignore_index=IGNORE_INDEX, autocast_dtype=autocast_dtype)
    hook = shift.hook if shifted else None  # Eq. 6's TokenShift; the other families change x itself
    if config.var_curvature == "vogn":  # the engine applies Eq. 6 itself
        likelihood = segmentation_squares(segmenter, next_batch, shift=hook, chunk_size=config.chunk_size, **common)
    else:
        likelihood = segmentation_losses(segmenter, next_batch, **common)
    tau, scale = config.tau, config.var_scale
    if scale is None and tau is not None:
        scale = float(len(dataset))  # no pilot: the number of images
    if shifted:  # one prior and one likelihood scale for both fits
        tau, scale = run["fits"]["clean"].tau, run["fits"]["clean"].scale
    outer = hook if hook is not None and config.var_curvature == "reparam" else contextlib.nullcontext()
    with outer:
        return fit_precision(likelihood, trainable_parameters(segmenter), gamma=config.gamma, tau=tau,
                             steps=config.var_steps, lr=config.var_lr, scale=scale, scale_floor=float(len(dataset)),
                             tolerance=config.var_tolerance,
                             control=config.var_control, curvature=config.var_curvature, legacy=config.var_legacy,
                             generator=torch.Generator().manual_seed(config.seed), on_step=on_step, on_bad=on_bad,
                             state=fit_state, checkpoint=checkpoint)


LEGACY_UPDATE = ("natural-gradient steps of Eq. 11 in the precision, antithetic reparameterized curvature; "
                 "F = gamma * (Lambda - tau^-2) / s (Eq. 14), clamped at 0")


def variational_record(fits: dict, config: ScoreConfig, images: int) -> dict:
    """The fits' precisions and what the metadata records of them."""
    clean = fits["clean"]
    record = {"gamma": config.gamma, "tau": clean.tau, "tau_given": config.tau is not None, "prior": clean.prior,
              "steps": config.var_steps, "lr": config.var_lr, "likelihood_scale": clean.scale,
              "likelihood_scale_given": config.var_scale is not None,
              "curvature": config.var_curvature, "control_variate": config.var_control and not config.var_legacy,
              "final_terms": {kind: fit.terms for kind, fit in fits.items()},
              "relative_change": {kind: fit.relative_change for kind, fit in fits.items()},
              "tolerance": config.var_tolerance,
              "converged": {kind: fit.converged for kind, fit in fits.items()},
              "bad_steps": {kind: fit.bad_steps for kind, fit in fits.items()},
              "passes": {kind: fit.passes for kind, fit in fits.items()},
              "passes_per_step": PASSES_PER_STEP[config.var_curvature]}
    if config.var_legacy:
        record.update(relative_change_last_10pct=record["relative_change"], update=LEGACY_UPDATE,
                      convergence="mean relative change of Lambda over the last 10% of the steps < tolerance")
    else:
        record.update(convergence="sum |D_T - D_T/2| / sum |D_T| < tolerance over the second half of the steps "
                                  "(D = Lambda - tau^-2, at least 10 steps in that half)",
                      update="natural-gradient steps of Eq. 11 on the data part D = Lambda - tau^-2 (stored apart "
                             "from the prior); F = gamma * D / s (Eq. 14), clamped at 0")
    return {"precision": clean.precision, "precision_shift": fits["shift"].precision, "variational": record,
            "images": images}
