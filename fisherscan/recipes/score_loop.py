"""The diagonal estimator's loop over the source images, one process or many: F(x) and F(x') (Eq. 9) per batch,
x' from the run's shift family (``shifts``: Eq. 6 at one or several blocks, a pixel change, or real images).

One loop over a batch plan serves both: the plan cuts every global batch of ``--batch-size`` images into one
contiguous part per rank (one part, the whole batch, in a single process). Label uniforms and every shift draw are
keyed on (seed, image index), and Eq. 6's batch spread is that of the global batch, so the scores do not depend on
the number of ranks. ``--label-draws K`` averages each image's squares over K label draws (draw 0 is the one a
single-draw run makes); F(x) and F(x') share each draw's uniforms, and F(x)'s draws share one forward (K + 1
forwards and 2K backwards per batch). ``--replicates 2`` keeps the images of even and
odd index in two accumulators (the halves whose agreement measures the scores' reliability); the full sums are
their sum. Per batch, every rank takes the same decisions (``distributed.agree``): a batch that could not be read
on some rank stops every rank with that one-line error; a batch part whose sums are not finite is skipped and the
batch counted (``bad_batches``), and more than ``--max-bad-frac`` of them stops every rank. In one process, every
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
from ..fisher.vmap import add_sums
from ..models.segmenter import Segmenter
from ..rng import keyed_generator
from ..runtime import step_done
from . import distributed
from .config import ScoreConfig
from .distributed import Ranks


@dataclass
class Sums:
    """One replicate's accumulators: both Fisher sums and the summed shift magnitude of its images."""

    clean: FisherAccumulator
    shifted: FisherAccumulator
    shift_magnitude_sum: float = 0.0

    def add(self, clean: dict, shifted: dict, images: int, magnitude: float) -> None:
        self.clean.add(clean, images)
        self.shift_magnitude_sum += magnitude
        self.shifted.add(shifted, images)


@dataclass
class ScoringState:
    """Everything a run accumulates: the sums of each replicate (one: all images; two: even and odd image
    index), how far it got (image index) and how many batches were skipped for non-finite gradients."""

    parts: list[Sums]
    next_image: int = 0
    bad_batches: int = 0

    def counters(self) -> dict:
        return {"next_image": self.next_image, "shift_magnitude_sum": self.parts[0].shift_magnitude_sum,
                "bad_batches": self.bad_batches}

    def total(self) -> Sums:
        """The sums over all images (the one part, or the sum of the halves)."""
        if len(self.parts) == 1:
            return self.parts[0]
        first, *rest = self.parts
        total = Sums(FisherAccumulator({n: v.shape for n, v in first.clean.sums.items()}),
                     FisherAccumulator({n: v.shape for n, v in first.clean.sums.items()}))
        for part in self.parts:
            total.add(part.clean.sums, part.shifted.sums, 0, part.shift_magnitude_sum)
            total.clean.images += part.clean.images
            total.shifted.images += part.shifted.images
        return total


def new_state(segmenter: Segmenter, replicates: int = 1) -> ScoringState:
    shapes = {f"backbone.{n}": p.shape for n, p in segmenter.backbone.named_parameters()}
    return ScoringState([Sums(FisherAccumulator(shapes), FisherAccumulator(shapes)) for _ in range(replicates)])


@dataclass
class Estimate:
    """An estimator's result: F(x), F(x') (None when stopped), the mean applied shift s, and its record
    (``extra["replicates"]``: per half, (F(x), F(x'), s) when the run kept two)."""

    f_clean: dict | None
    f_shift: dict | None
    magnitude: float
    extra: dict = field(default_factory=dict)


def label_uniforms(config: ScoreConfig, y: torch.Tensor, indices: list[int], visit: int = 0) -> torch.Tensor | None:
    """Each image's uniforms for sampled labels, keyed on (seed, image index, visit: the draw); None for given
    labels."""
    if config.labels != "sampled":
        return None
    return torch.stack([torch.rand(y.shape[-2:], generator=keyed_generator(config.seed, i, "labels", visit))
                        for i in indices])


def all_finite(sums: dict[str, torch.Tensor]) -> bool:
    """True when every element of every tensor is finite (one device sync)."""
    if not sums:
        return True
    return bool(torch.stack([v.isfinite().all() for v in sums.values()]).all())


def squares(engine, x, y, indices, config: ScoreConfig, autocast_dtype, draws: range, hook=None,
            shift_draws=None) -> dict:
    """sum over the label ``draws`` of sum_i each image's squared gradient (Eq. 9); one forward serves them all."""
    return engine.squared_gradient_sum_over_draws(
        x, y, [label_uniforms(config, y, indices, draw) for draw in draws], ignore_index=IGNORE_INDEX,
        shift=hook, shift_eps=shift_draws, autocast_dtype=autocast_dtype)


def score_batch(engine, state: ScoringState, x: torch.Tensor, y: torch.Tensor, indices: list[int],
                prepare, y_shift: torch.Tensor, config: ScoreConfig, autocast_dtype: torch.dtype | None) -> bool:
    """F(x) and F(x') (Eq. 9) of one batch (part) into ``state``, each image into its replicate, averaged over the
    ``label_draws`` draws: F(x) from one forward and a backward per draw; for F(x'), ``prepare(draw)`` gives each
    draw's input (a shift draw of its own, so a forward of its own). Both passes of a draw use its label uniforms.

    Returns False, and adds nothing, when any squared-gradient sum (or the shift) is not finite; every draw's shift
    is still prepared then (its statistics are a collective on every rank).
    """
    replicates, draws = len(state.parts), config.label_draws
    parts = []  # (replicate, a function selecting its rows, its image indices)
    for part in range(replicates):
        rows = [j for j, i in enumerate(indices) if i % replicates == part]
        if rows:
            pick = (lambda t: t) if replicates == 1 else (lambda t, r=rows: t[torch.tensor(r, device=t.device)])
            parts.append((part, pick, [indices[j] for j in rows]))
    clean = [squares(engine, pick(x), pick(y), own, config, autocast_dtype, range(draws)) for _, pick, own in parts]
    finite = all(all_finite(sums) for sums in clean)
    shifted, magnitudes = [None] * len(parts), [0.0] * len(parts)
    for draw in range(draws):
        prepared = prepare(draw)
        finite = finite and bool(prepared.magnitudes.isfinite().all())
        for p, (_, pick, own) in enumerate(parts if finite else []):
            shift_draws = None if prepared.draws is None else tuple(pick(d) for d in prepared.draws)
            sums = squares(engine, pick(prepared.x), pick(y_shift), own, config, autocast_dtype, range(draw, draw + 1),
                           prepared.hook, shift_draws)
            finite = all_finite(sums)
            if not finite:
                break
            shifted[p] = add_sums(shifted[p], sums)
            magnitudes[p] += float(pick(prepared.magnitudes).sum())
    if not finite:
        return False
    for p, (part, _, own) in enumerate(parts):
        f_clean, f_shift, magnitude = clean[p], shifted[p], magnitudes[p]
        if draws > 1:
            f_clean, f_shift = {n: v / draws for n, v in f_clean.items()}, {n: v / draws for n, v in f_shift.items()}
            magnitude /= draws
        state.parts[part].add(f_clean, f_shift, len(own), magnitude)
    return True


class TimedBatches:
    """A loader's batches, with the wall time since the loader was opened (``started``) and the time spent blocked
    waiting for them: opening it (worker start-up) and every ``next``; ``first`` is the wait for the first batch."""

    def __init__(self, loader):
        self.started = time.perf_counter()
        self.batches = iter(loader)
        self.waited, self.first, self.calls = time.perf_counter() - self.started, 0.0, 0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        try:
            return next(self.batches)
        finally:
            seconds = time.perf_counter() - start
            self.waited += seconds
            self.first = self.waited if self.calls == 0 else self.first
            self.calls += 1

    def record(self, images: int) -> dict:
        """The loop's wall time and the share of it spent waiting for data (``--workers`` too few when it is
        large); printed at the end of a run, never saved in the scores (a continued run writes the same bytes)."""
        loop = time.perf_counter() - self.started
        return {"loop_seconds": loop, "data_wait_seconds": self.waited, "first_batch_wait_seconds": self.first,
                "batches": self.calls, "images": images, "data_wait_share": self.waited / max(loop, 1e-9),
                "images_per_second": images / max(loop, 1e-9)}


def _next_part(batches, part: list[int], device: torch.device):
    """This rank's images of the next batch (tensors on ``device``), or the one-line error reading them gave."""
    if not part:
        return None, None
    try:
        batch = next(batches)
    except FisherscanError as error:
        return None, str(error)
    return [t.to(device) if isinstance(t, torch.Tensor) else t for t in batch], None


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


def _score_part(engine, shift, state, batch, config, autocast_dtype) -> bool:
    """Score this rank's part; the shift is prepared once per draw on every rank (Eq. 6's global spread)."""
    if batch is None:
        for _ in range(config.label_draws):
            shift.prepare_empty()
        return True
    x, y, indices = batch[0], batch[1], [int(i) for i in batch[2]]
    x_other, y_shift = (batch[3], batch[4]) if len(batch) > 3 else (None, y)
    return score_batch(engine, state, x, y, indices, lambda draw: shift.prepare(x, indices, x_other, draw), y_shift,
                       config, autocast_dtype)


def run_diagonal(segmenter: Segmenter, engine, shift, dataset, config: ScoreConfig, device: torch.device,
                 autocast_dtype: torch.dtype | None, progress: Progress, ranks: Ranks = Ranks(),
                 state: ScoringState | None = None, save=None) -> Estimate:
    """The exact diagonal estimator over every image once, from ``state.next_image`` on (a continued run sees the
    batches an uninterrupted one would); ``save(state)`` every ``config.save_every`` batches; after
    ``config.stop_after`` batches of this run it stops (F is None, ``extra["stopped"]`` True)."""
    state = state if state is not None else new_state(segmenter, config.replicates)
    total, batch_size = len(dataset), config.batch_size
    batches_total = math.ceil(total / batch_size)
    if state.next_image % batch_size:
        raise FisherscanError(f"the partial file stopped at image {state.next_image}, not at a batch boundary of "
                              f"--batch-size {batch_size}; delete it or pass --overwrite")
    first = state.next_image // batch_size
    parts = distributed.rank_parts(total, batch_size, ranks)[first:]
    loader = torch.utils.data.DataLoader(dataset, batch_sampler=[p for p in parts if p],
                                         num_workers=max(int(config.workers), 0))
    batches = TimedBatches(loader)
    ranks_note = f" ({ranks.world} ranks)" if ranks.world > 1 else ""
    task = progress.add_task(f"score F(x), F(x'){ranks_note}", total=total, completed=state.next_image, rate="")
    started, done_here = time.perf_counter(), 0
    extra = {"batches_total": batches_total, "stopped": False}
    for g, part in enumerate(parts, first):
        batch, error = _next_part(batches, part, device)
        if error is not None:  # the other ranks are in this batch's collectives: take part, then stop with them
            _score_part(engine, shift, state, None, config, autocast_dtype)
        ok = error is not None or _score_part(engine, shift, state, batch, config, autocast_dtype)
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
            extra.update(stopped=True, batches_done=g + 1, images=state.total().clean.images,
                         bad_batches=state.bad_batches,
                         timing=batches.record(state.next_image - first * batch_size))
            return Estimate(None, None, 0.0, extra)
    extra["timing"] = batches.record(state.next_image - first * batch_size)
    return _finish(state, ranks, device, extra)


def _reduce(sums: Sums, device: torch.device) -> None:
    """One replicate's sums over the ranks (bucketed; the counts and the magnitude in one small all-reduce)."""
    distributed.sum_over_ranks([*sums.clean.sums.values(), *sums.shifted.sums.values()], device)
    scalars = torch.tensor([sums.clean.images, sums.shifted.images, sums.shift_magnitude_sum], dtype=torch.float64,
                           device=device)
    torch.distributed.all_reduce(scalars)
    sums.clean.images, sums.shifted.images, sums.shift_magnitude_sum = int(scalars[0]), int(scalars[1]), \
        float(scalars[2])


def _finish(state: ScoringState, ranks: Ranks, device: torch.device, extra: dict) -> Estimate:
    """Sum over the ranks (once), then F = sums / N (Eq. 9), the mean applied shift, and each half's."""
    if ranks.world > 1:
        for part in state.parts:
            _reduce(part, device)
        extra["world_size"] = ranks.world
    total = state.total()
    if total.clean.images == 0:
        raise FisherscanError(f"every batch ({state.bad_batches} of {extra['batches_total']}) had non-finite losses "
                              "or gradients; check the weights, the data and --warmup-lr")
    if len(state.parts) > 1:
        if any(part.clean.images == 0 for part in state.parts):
            raise FisherscanError("--replicates 2 needs images of both halves (even and odd index) to score; "
                                  "score more images or pass --replicates 1")
        extra["replicates"] = [(p.clean.fisher(), p.shifted.fisher(),
                                p.shift_magnitude_sum / max(p.shifted.images, 1)) for p in state.parts]
    magnitude = total.shift_magnitude_sum / max(total.shifted.images, 1)
    extra.update(images=total.clean.images, bad_batches=state.bad_batches, batches_done=extra["batches_total"])
    return Estimate(total.clean.fisher(), total.shifted.fisher(), magnitude, extra)
