"""The benchmark's ``oracle-delta`` strategy: Delta F (Eq. 5) from a real style shift instead of Eq. 6's simulated
one -- F(x) on the source scenes against F on the very same scenes rendered in the validation style (paired
renderings: one layout, one clean rendering, two styles), each estimated by ``score`` (Eq. 9, sampled labels)
from the same warmed head on the same images. Normalisation and eps are score's defaults (``fisherscan.fisher.drfim``),
so it differs from the ``delta`` strategy only in where x' comes from.
"""

from __future__ import annotations

from pathlib import Path

from ..errors import FisherscanError
from ..fisher.drfim import default_delta_eps, dr_fim_terms
from ..models.groups import candidate_names, parameter_groups
from ..scores.file import load_scores, save_scores


def oracle_delta_scores(source_scores: Path, shifted_scores: Path, out: Path, style: str) -> Path:
    """Write ``out``: a scores file whose ``delta`` kind is Delta F (Eq. 5) between the ``fim`` of
    ``source_scores`` (F(x), the source scenes) and the ``fim`` of ``shifted_scores`` (the same scenes in
    ``style``), both divided by the candidate mean of F(x) and with Eq. 5's relative eps, as ``score`` does."""
    source, metadata = load_scores(source_scores)
    shifted, shifted_meta = load_scores(shifted_scores)
    if metadata.get("images") != shifted_meta.get("images") or set(source["fim"]) != set(shifted["fim"]):
        raise FisherscanError(f"{shifted_scores}: not scored on the same images and model as {source_scores}; "
                              "score both with the same --images, --seed and --head")
    f_clean, f_shift = source["fim"], shifted["fim"]
    candidates = candidate_names(parameter_groups((name, value.shape) for name, value in f_clean.items()))
    eps = default_delta_eps(True)
    delta, _, scale = dr_fim_terms(f_clean, f_shift, 0.0, True, candidates, eps)
    record = {"definition": f"Delta F (Eq. 5) between F(x) on the source scenes and F on the same scenes rendered "
                            f"in {style!r}; both divided by the candidate mean of F(x) ({scale:.6g}), eps {eps}",
              "source_scores": str(source_scores), "shifted_scores": str(shifted_scores), "style": style}
    save_scores(out, {"fim": f_clean, "fim_shift": f_shift, "delta": delta}, {**metadata, "oracle": record})
    return out
