"""Which block and which functional group every backbone parameter element belongs to (Eq. 3).

Eq. 3 lists the candidates for fine-tuning per block l: theta_Q, theta_K, theta_V and theta_FFN. A fused
``attn.qkv`` weight or bias of 3D rows holds Q, K and V as its three row blocks, in that order; models with
separate projections (``q_proj``/``k_proj``/``v_proj``, EVA's ``q_bias``/``v_bias``) map directly.
Every other parameter gets one of attn-proj, norm, embed or other, so a score file can be summarised whole.

Per family (timm layouts, ``docs/method.md``): DINOv2, CLIP, SAM and MAE have a fused ``attn.qkv`` (with bias);
EVA02 has ``q_proj``/``k_proj``/``v_proj`` (no K bias) and a SwiGLU FFN whose every part -- ``mlp.fc1_g``
(gate), ``mlp.fc1_x``, the sub-layer norm ``mlp.norm`` and ``mlp.fc2`` -- is FFN. SAM's relative position
tables ``attn.rel_pos_h/w`` (windowed and global blocks alike) and LayerScale gammas are "other". MAE's fixed
sin-cos ``pos_embed`` is a buffer (``families``), so it never appears here.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Iterable

import torch

GROUPS = ("Q", "K", "V", "FFN", "attn-proj", "norm", "embed", "other")
CANDIDATE_GROUPS = ("Q", "K", "V", "FFN")

_BLOCK = re.compile(r"(?:^|\.)blocks\.(\d+)\.")
_RULES: tuple[tuple[str, str], ...] = (  # (regex on the name inside a block or at top level, group); first match
    (r"attn\.rel_pos_[hw]$", "other"),
    (r"attn\.(q_proj|q)\.(weight|bias)$|attn\.q_bias$", "Q"),
    (r"attn\.(k_proj|k)\.(weight|bias)$|attn\.k_bias$", "K"),
    (r"attn\.(v_proj|v)\.(weight|bias)$|attn\.v_bias$", "V"),
    (r"(^|\.)mlp\.", "FFN"),
    (r"attn\.proj\.(weight|bias)$", "attn-proj"),
    (r"(^|\.)(norm\d*|fc_norm|norm_pre|q_norm|k_norm)\.(weight|bias)$", "norm"),
    (r"^(patch_embed\.|cls_token$|reg_token$|register_tokens$|pos_embed$|mask_token$|dist_token$)", "embed"),
)
_FUSED_QKV = re.compile(r"attn\.qkv\.(weight|bias)$")


@dataclass(frozen=True)
class GroupSlice:
    """Rows ``rows`` (along dim 0) of a parameter belong to ``group`` of block ``block`` (-1: outside blocks)."""

    block: int
    group: str
    rows: slice


def block_index(name: str) -> int:
    match = _BLOCK.search(name)
    return int(match.group(1)) if match else -1


def group_slices(name: str, shape: torch.Size | tuple[int, ...]) -> list[GroupSlice]:
    """The (block, group, rows) pieces of one parameter; together they cover all of its rows exactly once."""
    block = block_index(name)
    rows = shape[0] if len(shape) else 1
    if _FUSED_QKV.search(name):
        if rows % 3:
            raise ValueError(f"{name}: fused qkv with {rows} rows is not divisible into Q, K, V")
        d = rows // 3
        return [GroupSlice(block, g, slice(i * d, (i + 1) * d)) for i, g in enumerate(("Q", "K", "V"))]
    for pattern, group in _RULES:
        if re.search(pattern, name):
            return [GroupSlice(block, group, slice(0, rows))]
    return [GroupSlice(block, "other", slice(0, rows))]


def parameter_groups(named_shapes: Iterable[tuple[str, torch.Tensor | torch.Size]]) -> dict[str, list[GroupSlice]]:
    """``group_slices`` for every parameter; accepts ``model.named_parameters()`` or (name, shape) pairs."""
    out = {}
    for name, value in named_shapes:
        shape = value.shape if isinstance(value, torch.Tensor) else tuple(value)
        out[name] = group_slices(name, shape)
    return out


def candidate_names(groups: dict[str, list[GroupSlice]]) -> list[str]:
    """Parameters with at least one candidate piece (Q, K, V, FFN) -- the elements of Eq. 3."""
    return [name for name, pieces in groups.items() if any(p.group in CANDIDATE_GROUPS for p in pieces)]


def candidate_mask(name: str, shape: torch.Size, groups: dict[str, list[GroupSlice]],
                   allowed: Iterable[str] = CANDIDATE_GROUPS) -> torch.Tensor:
    """Boolean tensor of ``shape``: True where the element belongs to an ``allowed`` group (default: the
    candidates of Eq. 3)."""
    allowed = set(allowed)
    mask = torch.zeros(shape, dtype=torch.bool)
    for piece in groups[name]:
        if piece.group in allowed:
            if len(shape):
                mask[piece.rows] = True
            else:
                mask.fill_(True)
    return mask


def candidate_count(shapes: dict[str, tuple[int, ...]]) -> int:
    """Elements in the candidate groups Q, K, V, FFN (Eq. 3) of parameters given by name -> shape."""
    total = 0
    for name, pieces in parameter_groups(shapes.items()).items():
        shape = tuple(shapes[name])
        per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
        total += sum((p.rows.stop - p.rows.start) * per_row for p in pieces if p.group in CANDIDATE_GROUPS)
    return total
