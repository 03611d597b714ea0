"""The variational estimator's run (Eq. 10-14): Lambda_x on the source batches, then Lambda_x' on the same batches
with Eq. 6 applied, each ``var_steps`` natural-gradient steps (``fisherscan.fisher.variational``), resumable.
"""

from __future__ import annotations

import contextlib
import math
from typing import Iterator

import torch
from rich.progress import Progress

from ..data.datasets import make_loader
from ..data.labels import IGNORE_INDEX
from ..fisher.loss import trainable_parameters
from ..fisher.variational import fit_precision, segmentation_losses
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


def run_variational(segmenter: Segmenter, shift, dataset, config: ScoreConfig, device: torch.device,
                    autocast_dtype: torch.dtype | None, progress: Progress, resume: dict | None = None,
                    save=None) -> Estimate:
    """Eq. 10-14 on source batches (Lambda_x) and on the same batches shifted by the run's family (Lambda_x').

    The two fits take ``var_steps`` steps each, 2 x var_steps in all (the "global" steps). Every
    ``config.save_every`` global steps, and when ``config.stop_after`` steps of this run are done (then F is None
    and ``extra["stopped"]`` True), ``save(run)`` gets the state; ``resume`` (that state) continues it.
    """
    means = trainable_parameters(segmenter)
    scale = float(config.var_scale if config.var_scale is not None else len(dataset))
    resume = resume or {"phase": "clean", "global_step": 0, "magnitudes": [], "fits": {}, "fit": None}
    fits, magnitudes = dict(resume["fits"]), list(resume["magnitudes"])
    total_steps = 2 * config.var_steps
    stop_at = resume["global_step"] + config.stop_after if config.stop_after is not None else None

    def stopped(global_step: int) -> Estimate:
        return Estimate(None, None, 0.0, {"stopped": True, "batches_done": global_step, "batches_total": total_steps})

    for phase, kind in enumerate(VARIATIONAL_PHASES):
        if kind in fits:
            continue
        shifted, offset = kind == "shift", phase * config.var_steps
        fit_state = resume["fit"] if resume["phase"] == kind else None
        first = int(fit_state["step"]) if fit_state is not None else 0
        batches = cycle(dataset, config.batch_size, config.workers, first)
        task = progress.add_task(f"variational Lambda_x{chr(39) if shifted else ''}", total=config.var_steps,
                                 completed=first, rate="")

        def next_batch(step, batches=batches, shifted=shifted):
            visit, batch = next(batches)
            x, y, indices = batch[0].to(device), batch[1].to(device), [int(i) for i in batch[2]]
            if shifted:
                x_other = batch[3].to(device) if len(batch) > 3 else None
                prepared = shift.prepare(x, indices, x_other)  # sets the Eq. 6 hook's draws
                magnitudes.append(float(prepared.magnitudes.sum()) / len(indices))
                x, y = prepared.x, (batch[4].to(device) if len(batch) > 3 else y)
            return x, y, label_uniforms(config, y, indices, visit)

        def on_step(step, terms, task=task):
            step_done(progress, task, 1, f"E[loss] {terms['expected_loss']:.3g} KL {terms['kl']:.3g}")

        def checkpoint(done, get_state, kind=kind, offset=offset):
            stopping = stop_at is not None and offset + done >= stop_at
            if save is not None and (stopping or (offset + done) % config.save_every == 0):
                save({"phase": kind, "global_step": offset + done, "magnitudes": magnitudes, "fits": fits,
                      "fit": get_state()})
            return stopping

        losses = segmentation_losses(segmenter, next_batch, ignore_index=IGNORE_INDEX, autocast_dtype=autocast_dtype)
        with shift.hook if shifted and shift.hook is not None else contextlib.nullcontext():
            fit = fit_precision(losses, means, gamma=config.gamma, tau=config.tau, steps=config.var_steps,
                                lr=config.var_lr, scale=scale, tolerance=config.var_tolerance,
                                generator=torch.Generator().manual_seed(config.seed), on_step=on_step,
                                state=fit_state, checkpoint=checkpoint)
        if fit is None:
            return stopped(stop_at)
        fits[kind] = fit
        done = offset + config.var_steps
        stopping = stop_at is not None and done >= stop_at
        if done < total_steps and save is not None and (stopping or done % config.save_every == 0):
            save({"phase": VARIATIONAL_PHASES[phase + 1], "global_step": done, "magnitudes": magnitudes,
                  "fits": fits, "fit": None})
        if done < total_steps and stopping:
            return stopped(done)
    magnitude = sum(magnitudes) / max(len(magnitudes), 1)
    return Estimate(fits["clean"].fisher, fits["shift"].fisher, magnitude, variational_record(fits, config, scale,
                                                                                             len(dataset)))


def variational_record(fits: dict, config: ScoreConfig, scale: float, images: int) -> dict:
    """The fits' precisions and what the metadata records of them."""
    return {
        "precision": fits["clean"].precision, "precision_shift": fits["shift"].precision,
        "variational": {"gamma": config.gamma, "tau": config.tau, "steps": config.var_steps, "lr": config.var_lr,
                        "likelihood_scale": scale,
                        "final_terms": {kind: fit.terms for kind, fit in fits.items()},
                        "relative_change_last_10pct": {kind: fit.relative_change for kind, fit in fits.items()},
                        "converged": {kind: fit.converged for kind, fit in fits.items()},
                        "update": "natural-gradient steps of Eq. 11 in the precision, antithetic reparameterized "
                                  "curvature; F = gamma * (Lambda - tau^-2) / s (Eq. 14), clamped at 0"},
        "images": images,
    }
