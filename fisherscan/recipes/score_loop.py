"""The diagonal estimator's loop over the source images, one process or many: F(x) and F(x') (Eq. 9) per batch,
x' by Eq. 6 at the input of block ``perturb_at``.

One loop over a batch plan serves both: the plan cuts every global batch of ``--batch-size`` images into one
contiguous part per rank (one part, the whole batch, in a single process). Label uniforms and Eq. 6's eps are keyed
on (seed, image index), and Eq. 6's batch spread is that of the global batch, so the scores do not depend on the
number of ranks. Per batch, every rank takes the same decisions (``distributed.agree``): a batch that could not be
read on some rank stops every rank with that one-line error; a batch part whose sums are not finite is skipped and
the batch counted (``bad_batches``), and more than ``--max-bad-frac`` of them stops every rank. In one process, every
``save_every`` batches the state goes to the partial file (``save``), and ``stop_after`` batches end the run
resumably.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field

import torch
from rich.progress import Progress

from ..data.labels import IGNORE_INDEX
from ..errors import FisherscanError
from ..fisher.diagonal import FisherAccumulator
from ..fisher.perturb import TokenShift, block_input, channel_statistics, draw_eps, shift_statistics, statistic_spread
from ..models.segmenter import Segmenter
from ..rng import keyed_generator
from ..runtime import step_done
from . import distributed
from .config import ScoreConfig
from .distributed import Ranks


@dataclass
class ScoringState:
    """Everything a run accumulates: both Fisher sums, the applied shift, how far it got (image index) and how
    many batches were skipped for non-finite gradients."""

    clean: FisherAccumulator
    shifted: FisherAccumulator
    shift_magnitude_sum: float = 0.0
    next_image: int = 0
    bad_batches: int = 0

    def counters(self) -> dict:
        return {"next_image": self.next_image, "shift_magnitude_sum": self.shift_magnitude_sum,
                "bad_batches": self.bad_batches}


def new_state(segmenter: Segmenter) -> ScoringState:
    shapes = {f"backbone.{n}": p.shape for n, p in segmenter.backbone.named_parameters()}
    return ScoringState(FisherAccumulator(shapes), FisherAccumulator(shapes))


@dataclass
class Estimate:
    """An estimator's result: F(x), F(x') (None when stopped), the mean applied shift s, and its record."""

    f_clean: dict | None
    f_shift: dict | None
    magnitude: float
    extra: dict = field(default_factory=dict)


def label_uniforms(config: ScoreConfig, y: torch.Tensor, indices: list[int], visit: int = 0) -> torch.Tensor | None:
    """Each image's uniforms for sampled labels, keyed on (seed, image index, visit); None for given labels."""
    if config.labels != "sampled":
        return None
    return torch.stack([torch.rand(y.shape[-2:], generator=keyed_generator(config.seed, i, "labels", visit))
                        for i in indices])


def patch_tokens_at(segmenter: Segmenter, x: torch.Tensor, site: int) -> torch.Tensor:
    """The patch tokens (B, N, C) entering block ``site``, fp32 (prefix tokens dropped): what Eq. 6 shifts."""
    return block_input(segmenter, x, site)[:, getattr(segmenter.backbone, "num_prefix_tokens", 0):].float()


def prepare_shift(shift: TokenShift, tokens: torch.Tensor, indices: list[int], config: ScoreConfig,
                  spread: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[tuple[torch.Tensor, torch.Tensor], float]:
    """Set Eq. 6's batch spread on ``shift`` (``spread`` when given: the global batch's under torchrun; else that
    of ``tokens``); return each image's eps draws (keyed on (seed, image index)) and the sum over images of the
    mean relative shift s they apply."""
    shift.spread = spread if spread is not None else statistic_spread(*channel_statistics(tokens))
    draws = [draw_eps(1, tokens.shape[-1], keyed_generator(config.seed, i, "shift")) for i in indices]
    eps = (torch.cat([d[0] for d in draws]).to(tokens.device), torch.cat([d[1] for d in draws]).to(tokens.device))
    _, magnitude = shift_statistics(tokens, *eps, *shift.spread)
    return eps, float(magnitude.mean(dim=1).sum())


def all_finite(sums: dict[str, torch.Tensor]) -> bool:
    """True when every element of every tensor is finite (one device sync)."""
    if not sums:
        return True
    return bool(torch.stack([v.isfinite().all() for v in sums.values()]).all())


def score_batch(engine, state: ScoringState, shift: TokenShift, x: torch.Tensor, y: torch.Tensor, indices: list[int],
                config: ScoreConfig, autocast_dtype: torch.dtype | None, tokens: torch.Tensor,
                spread: tuple[torch.Tensor, torch.Tensor] | None = None) -> bool:
    """F(x) and F(x') (Eq. 9) of one batch (part) into ``state``; all draws keyed on (seed, image index).

    Returns False, and adds nothing, when the squared-gradient sums (or the shift) are not finite.
    """
    uniforms = label_uniforms(config, y, indices)
    common = dict(ignore_index=IGNORE_INDEX, autocast_dtype=autocast_dtype)
    clean = engine.squared_gradient_sum(x, y, uniforms, **common)
    if not all_finite(clean):
        return False
    eps, magnitude = prepare_shift(shift, tokens, indices, config, spread)
    if not math.isfinite(magnitude):
        return False
    shifted = engine.squared_gradient_sum(x, y, uniforms, shift=shift, shift_eps=eps, **common)
    if not all_finite(shifted):
        return False
    state.clean.add(clean, len(indices))
    state.shift_magnitude_sum += magnitude
    state.shifted.add(shifted, len(indices))
    return True


def _next_part(batches, part: list[int], device: torch.device) -> tuple[torch.Tensor | None, torch.Tensor | None,
                                                                          str | None]:
    """This rank's images of the next batch (x, y on ``device``), or the one-line error reading them gave."""
    if not part:
        return None, None, None
    try:
        x, y, _ = next(batches)
    except FisherscanError as error:
        return None, None, str(error)
    return x.to(device), y.to(device), None


def _spread(tokens: torch.Tensor | None, segmenter: Segmenter, ranks: Ranks, device: torch.device):
    """Eq. 6's batch spread: this process's batch alone (None: ``prepare_shift`` takes it), or the global
    batch's under torchrun (every rank, every batch)."""
    if ranks.world == 1:
        return None
    return distributed.global_spread(tokens, segmenter.backbone.embed_dim, device)


def _count_bad(state: ScoringState, first: int, last: int, batches_total: int, config: ScoreConfig,
               progress: Progress) -> None:
    state.bad_batches += 1
    if not progress.disable:
        progress.console.print(f"[yellow]warning:[/] batch of images {first}..{last}: non-finite loss or gradient, "
                               f"skipped ({state.bad_batches} bad of {batches_total} batches)", highlight=False)
    if state.bad_batches > config.max_bad_frac * batches_total:
        raise FisherscanError(f"{state.bad_batches} of {batches_total} batches had non-finite losses or "
                              f"gradients (more than --max-bad-frac {config.max_bad_frac}); check the "
                              "weights, the data and --warmup-lr")


def run_diagonal(segmenter: Segmenter, engine, dataset, config: ScoreConfig, device: torch.device,
                 autocast_dtype: torch.dtype | None, progress: Progress, ranks: Ranks = Ranks(),
                 state: ScoringState | None = None, save=None) -> Estimate:
    """The exact diagonal estimator over every image once, from ``state.next_image`` on (a continued run sees the
    batches an uninterrupted one would); ``save(state)`` every ``config.save_every`` batches; after
    ``config.stop_after`` batches of this run it stops (F is None, ``extra["stopped"]`` True)."""
    state = state if state is not None else new_state(segmenter)
    total, batch_size = len(dataset), config.batch_size
    batches_total = math.ceil(total / batch_size)
    if state.next_image % batch_size:
        raise FisherscanError(f"the partial file stopped at image {state.next_image}, not at a batch boundary of "
                              f"--batch-size {batch_size}; delete it or pass --overwrite")
    first = state.next_image // batch_size
    parts = distributed.rank_parts(total, batch_size, ranks)[first:]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[p for p in parts if p],
                                         num_workers=max(int(config.workers), 0))
    batches, shift = iter(loader), TokenShift(segmenter, config.perturb_at)
    ranks_note = f" ({ranks.world} ranks)" if ranks.world > 1 else ""
    task = progress.add_task(f"score F(x), F(x'){ranks_note}", total=total, completed=state.next_image, rate="")
    started, done_here = time.perf_counter(), 0
    extra = {"batches_total": batches_total, "stopped": False}
    for g, part in enumerate(parts, first):
        x, y, error = _next_part(batches, part, device)
        tokens = patch_tokens_at(segmenter, x, config.perturb_at) if x is not None else None
        spread = _spread(tokens, segmenter, ranks, device)
        ok = x is None or score_batch(engine, state, shift, x, y, part, config, autocast_dtype, tokens, spread)
        bad, error = distributed.agree(ranks, device, not ok, error)
        if error is not None:
            raise FisherscanError(error)
        batch_end = min((g + 1) * batch_size, total)
        if bad:
            _count_bad(state, g * batch_size, batch_end - 1, batches_total, config, progress)
        images_here, state.next_image = batch_end - state.next_image, batch_end
        done_here += 1
        rate = (state.next_image - first * batch_size) / max(time.perf_counter() - started, 1e-9)
        step_done(progress, task, images_here, f"{rate:.2f} img/s")
        unfinished = state.next_image < total
        stopping = unfinished and config.stop_after is not None and done_here >= config.stop_after
        if save is not None and (stopping or (unfinished and (g + 1) % config.save_every == 0)):
            save(state)
        if stopping:
            extra.update(stopped=True, batches_done=g + 1, images=state.clean.images, bad_batches=state.bad_batches)
            return Estimate(None, None, 0.0, extra)
    return _finish(state, ranks, device, extra)


def _finish(state: ScoringState, ranks: Ranks, device: torch.device, extra: dict) -> Estimate:
    """Sum over the ranks (once), then F = sums / N (Eq. 9) and the mean applied shift."""
    if ranks.world > 1:
        distributed.sum_over_ranks([*state.clean.sums.values(), *state.shifted.sums.values()], device)
        scalars = torch.tensor([state.clean.images, state.shifted.images, state.shift_magnitude_sum],
                               dtype=torch.float64, device=device)
        torch.distributed.all_reduce(scalars)
        state.clean.images, state.shifted.images = int(scalars[0]), int(scalars[1])
        state.shift_magnitude_sum = float(scalars[2])
        extra["world_size"] = ranks.world
    if state.clean.images == 0:
        raise FisherscanError(f"every batch ({state.bad_batches} of {extra['batches_total']}) had non-finite losses "
                              "or gradients; check the weights, the data and --warmup-lr")
    magnitude = state.shift_magnitude_sum / max(state.shifted.images, 1)
    extra.update(images=state.clean.images, bad_batches=state.bad_batches, batches_done=extra["batches_total"])
    return Estimate(state.clean.fisher(), state.shifted.fisher(), magnitude, extra)
