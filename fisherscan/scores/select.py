"""Which backbone elements to tune: the global element-wise selection and its schedule (Eq. 16).

Every strategy is an ORDER over the candidate elements (Q, K, V, FFN by default, Eq. 3); a budget of ``count``
elements takes a prefix of that order, so the selected sets of a growing schedule only grow.

- ``fim`` / ``delta`` / ``drfim``: descending by that score kind (Eq. 9 / Eq. 5 / Eq. 7), ties broken by a
  fixed element order (parameters sorted by name, row-major inside each); ``scores``: the same by ``kind``
  (any kind in the file, default drfim);
- ``random``: a seeded random permutation of the candidates; ``random-q`` / ``random-k`` / ``random-v``: the same
  among the Q (K, V) elements only (at most all of them);
- ``full``: every backbone element; ``freeze``: none (the budget does not apply to either).

Eq. 16, as decided (``docs/method.md``): the selected fraction of ALL backbone parameters grows from delta_min to
delta_max, f(t) = dmin + (dmax - dmin) * (1 - exp(-t/T)) / (1 - exp(-T3/T)), count = floor(f(t) * total).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Iterable

import torch

from ..errors import FisherscanError
from ..io import write_tensors
from ..models.families import family_of_timm_name
from ..models.groups import CANDIDATE_GROUPS, GROUPS, candidate_mask, parameter_groups
from ..models.hf import transformers_names
from ..models.registry import family_of
from .file import load_scores

STRATEGIES = ("scores", "full", "freeze", "random", "random-q", "random-k", "random-v", "fim", "delta", "drfim")
SCORE_STRATEGIES = ("fim", "delta", "drfim")


def selected_fraction(step: int, steps: int, delta_min: float, delta_max: float,
                      schedule_t: float | None = None) -> float:
    """Eq. 16 as decided: f(0) = delta_min, f(steps) = delta_max exactly, growing like 1 - exp(-t/T)."""
    if steps <= 0 or delta_max == delta_min:
        return delta_max
    T = schedule_t if schedule_t is not None else steps / 3
    return delta_min + (delta_max - delta_min) * (1 - math.exp(-step / T)) / (1 - math.exp(-steps / T))


def selected_count(step: int, steps: int, total: int, delta_min: float, delta_max: float,
                   schedule_t: float | None = None) -> int:
    return math.floor(selected_fraction(step, steps, delta_min, delta_max, schedule_t) * total)


def entry_steps(counts: torch.Tensor, ranks: torch.Tensor) -> torch.Tensor:
    """The step at which each rank of a selection order joins the selection: the first t with counts[t] > rank.

    ``counts[t]`` is the number selected at step t (Eq. 16's schedule, non-decreasing: the set only grows); a rank
    that never joins gets len(counts).
    """
    return torch.searchsorted(counts, ranks, right=True)


def candidate_elements(shapes: dict[str, torch.Size], groups_allowed: Iterable[str]) -> tuple[list[str], torch.Tensor]:
    """(parameter names in fixed order, boolean vector over all their elements: allowed-group element?)."""
    names = sorted(shapes)
    groups = parameter_groups((name, shapes[name]) for name in names)
    allowed = tuple(groups_allowed)
    parts = [candidate_mask(name, shapes[name], groups, allowed).reshape(-1) for name in names]
    return names, torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool)


def selection_order(scores: dict[str, dict[str, torch.Tensor]], strategy: str,
                    candidates: Iterable[str] = CANDIDATE_GROUPS, seed: int = 0,
                    kind: str | None = None) -> tuple[list[str], torch.Tensor]:
    """The order in which ``strategy`` picks elements: (names in fixed order, flat element indices, best first).

    ``scores`` is a scores file's content by kind (``load_scores(...)[0]``); any kind gives the shapes.
    """
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown strategy {strategy!r}; use one of {', '.join(STRATEGIES)}")
    shapes = {name: tensor.shape for name, tensor in next(iter(scores.values())).items()}
    if strategy.startswith("random-"):
        candidates = [strategy[-1].upper()]
    names, allowed = candidate_elements(shapes, candidates)
    if strategy == "full":
        return names, torch.arange(allowed.numel())
    if strategy == "freeze":
        return names, torch.zeros(0, dtype=torch.long)
    eligible = allowed.nonzero().squeeze(1)
    if strategy in SCORE_STRATEGIES or strategy == "scores":
        kind = strategy if strategy != "scores" else (kind or "drfim")
        if kind not in scores:
            raise ValueError(f"the scores hold no kind {kind!r}; they hold {', '.join(sorted(scores))}")
        values = torch.cat([scores[kind][name].reshape(-1).float() for name in names])[eligible]
        order = torch.sort(values, descending=True, stable=True).indices
        return names, eligible[order]
    generator = torch.Generator().manual_seed(seed)
    return names, eligible[torch.randperm(eligible.numel(), generator=generator)]


def mask_from_order(names: list[str], shapes: dict[str, torch.Size], order: torch.Tensor,
                    count: int) -> dict[str, torch.Tensor]:
    """Boolean masks by parameter: True for the first ``count`` elements of ``order``."""
    flat = torch.zeros(sum(math.prod(shapes[n]) for n in names), dtype=torch.bool)
    flat[order[:count]] = True
    masks, offset = {}, 0
    for name in names:
        size = math.prod(shapes[name])
        masks[name] = flat[offset:offset + size].reshape(shapes[name])
        offset += size
    return masks


def select_mask(scores: dict[str, dict[str, torch.Tensor]], count: int, candidates: Iterable[str] = CANDIDATE_GROUPS,
                strategy: str = "drfim", seed: int = 0, kind: str | None = None) -> dict[str, torch.Tensor]:
    """Boolean mask per backbone parameter: the ``count`` elements ``strategy`` selects (all for ``full``, none
    for ``freeze``). Prefixes of one order, so a larger count selects a superset."""
    names, order = selection_order(scores, strategy, candidates, seed, kind)
    shapes = {name: tensor.shape for name, tensor in next(iter(scores.values())).items()}
    if strategy == "full":
        count = order.numel()
    return mask_from_order(names, shapes, order, count)


MASK_FORMATS = ("timm", "hf")


def scores_family(metadata: dict) -> str:
    """The backbone family of a scores file: its transformers source's, else its timm architecture's, else its
    model spec's."""
    source = metadata.get("weights_source") or {}
    if source.get("format") == "transformers" and source.get("family"):
        return source["family"]
    if metadata.get("timm_architecture"):
        return family_of_timm_name(metadata["timm_architecture"]).name
    return family_of(str(metadata.get("model")))


def write_mask(scores_path: Path, out: Path, budget: float, strategy: str, score_kind: str,
               candidates: tuple[str, ...], seed: int, overwrite: bool, names: str = "timm") -> tuple[int, int]:
    """``fisherscan mask``: the selection of ``budget`` x all backbone elements as uint8 tensors ``mask/<param>``,
    under timm's parameter names (the scores' own) or, ``names="hf"``, under the names of the transformers
    checkpoint the scores came from (``fisherscan.models.hf.transformers_names``: q/k/v split, the prefix kept)."""
    out = Path(out)
    if names not in MASK_FORMATS:
        raise FisherscanError(f"--format {names}: use one of {', '.join(MASK_FORMATS)}")
    if out.exists() and not overwrite:
        raise FisherscanError(f"--out {out} exists; pass --overwrite to replace it")
    if not str(out).endswith(".safetensors"):
        raise FisherscanError(f"--out {out}: name the mask file <name>.safetensors")
    unknown = [g for g in candidates if g not in GROUPS]
    if unknown or strategy not in STRATEGIES:
        raise FisherscanError(f"--candidates/--strategy: unknown {', '.join(unknown) or strategy}; groups are "
                              f"{', '.join(GROUPS)}, strategies {', '.join(STRATEGIES)}")
    scores, metadata = load_scores(scores_path)
    try:
        order_names, order = selection_order(scores, strategy, candidates, seed, score_kind)
    except ValueError as error:
        raise FisherscanError(f"--score-kind {score_kind}: {error}") from None
    shapes = {n: t.shape for n, t in next(iter(scores.values())).items()}
    total = sum(math.prod(s) for s in shapes.values())
    count = order.numel() if strategy == "full" else min(order.numel(), math.floor(budget * total))
    masks = {n: m.to(torch.uint8) for n, m in mask_from_order(order_names, shapes, order, count).items()}
    info = {"scores": str(scores_path), "model": metadata.get("model"), "budget": budget, "strategy": strategy,
            "score_kind": score_kind, "candidates": list(candidates), "seed": seed, "selected": count, "total": total,
            "names": names}
    if names == "hf":
        masks, info["transformers"] = transformers_names(masks, scores_family(metadata), metadata.get("weights_source"))
    write_tensors(out, {f"mask/{n}": m for n, m in masks.items()}, "mask", info)
    return count, total
