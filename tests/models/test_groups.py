"""Tests for fisherscan.groups on real timm architectures (2 blocks each).

Oracles: an expected-group table written out here per parameter name (not fisherscan's regexes), and the
attention's own forward pass -- the q, k and v it hands to scaled_dot_product_attention are compared with
the rows that group_slices calls Q, K and V.
"""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from fisherscan.models.backbone import create_architecture, meta_architecture
from fisherscan.models.groups import (
    CANDIDATE_GROUPS,
    GROUPS,
    GroupSlice,
    block_index,
    candidate_mask,
    candidate_names,
    group_slices,
    parameter_groups,
)
from fisherscan.models.registry import REGISTRY

DEPTH = 2

# name (with "blocks.<i>." removed) -> expected group; "QKV" marks a fused weight split in three
EXPECTED = {
    "cls_token": "embed", "reg_token": "embed", "pos_embed": "embed",
    "patch_embed.proj.weight": "embed", "patch_embed.proj.bias": "embed",
    "norm.weight": "norm", "norm.bias": "norm", "fc_norm.weight": "norm", "fc_norm.bias": "norm",
    "norm1.weight": "norm", "norm1.bias": "norm", "norm2.weight": "norm", "norm2.bias": "norm",
    "attn.qkv.weight": "QKV", "attn.qkv.bias": "QKV",
    "attn.q_bias": "Q", "attn.v_bias": "V",
    "attn.q_proj.weight": "Q", "attn.q_proj.bias": "Q",
    "attn.k_proj.weight": "K",
    "attn.v_proj.weight": "V", "attn.v_proj.bias": "V",
    "attn.proj.weight": "attn-proj", "attn.proj.bias": "attn-proj",
    "ls1.gamma": "other", "ls2.gamma": "other",
    "mlp.fc1.weight": "FFN", "mlp.fc1.bias": "FFN", "mlp.fc2.weight": "FFN", "mlp.fc2.bias": "FFN",
    "mlp.fc1_g.weight": "FFN", "mlp.fc1_g.bias": "FFN", "mlp.fc1_x.weight": "FFN", "mlp.fc1_x.bias": "FFN",
    "mlp.norm.weight": "FFN", "mlp.norm.bias": "FFN",
    "norm_pre.weight": "norm", "norm_pre.bias": "norm",  # CLIP's ln_pre
    "attn.rel_pos_h": "other", "attn.rel_pos_w": "other",  # SAM
}

MODELS = {
    "dinov2": ("vit_small_patch14_dinov2", {}),
    "dinov2_reg": ("vit_small_patch14_reg4_dinov2", {}),
    "eva02_separate": ("eva02_tiny_patch14_224", {"qkv_fused": False, "scale_mlp": True}),
    "eva02_fused": ("eva02_tiny_patch14_224", {}),
    "vit": ("vit_tiny_patch16_224", {}),
    # the registry's families as fisherscan builds them (SAM without neck, MAE's pos_embed a buffer)
    "clip": ("clip_vitl14", {"embed_dim": 32, "num_heads": 2}),
    "sam": ("sam_vitb16", {"embed_dim": 32, "num_heads": 2, "global_attn_indexes": (1,)}),
    "mae": ("mae_vitb16", {"embed_dim": 32, "num_heads": 2}),
}


@pytest.fixture(scope="module", params=sorted(MODELS))
def model(request):
    name, kwargs = MODELS[request.param]
    torch.manual_seed(0)
    if name in REGISTRY:
        query = "&".join(f"{k}={v!r}".replace(" ", "") for k, v in {"depth": DEPTH, **kwargs}.items())
        m = create_architecture(f"{name}?{query}").eval()
    else:
        m = timm.create_model(name, depth=DEPTH, num_classes=0, **kwargs).eval()
    m.tag = request.param
    return m


def split_name(name: str) -> tuple[int, str]:
    parts = name.split(".")
    if parts[0] == "blocks":
        return int(parts[1]), ".".join(parts[2:])
    return -1, name


def expected_pieces(name: str, shape: tuple[int, ...]) -> list[tuple[int, str, int, int]]:
    block, local = split_name(name)
    group = EXPECTED[local]
    rows = shape[0]
    if group == "QKV":
        d = rows // 3
        return [(block, "Q", 0, d), (block, "K", d, 2 * d), (block, "V", 2 * d, 3 * d)]
    return [(block, group, 0, rows)]


def as_tuples(pieces: list[GroupSlice], rows: int) -> list[tuple[int, str, int, int]]:
    return [(p.block, p.group, *p.rows.indices(rows)[:2]) for p in pieces]


def test_expected_names_are_the_real_ones(model):
    """The table above really describes these architectures (guards against a timm rename)."""
    locals_ = {split_name(n)[1] for n, _ in model.named_parameters()}
    assert locals_ <= set(EXPECTED), locals_ - set(EXPECTED)
    if model.tag == "eva02_separate":
        assert {"attn.q_proj.weight", "attn.k_proj.weight", "attn.v_proj.weight", "mlp.fc1_g.weight",
                "mlp.fc1_x.weight", "mlp.norm.weight", "mlp.fc2.weight"} <= locals_
    if model.tag in ("dinov2", "vit", "eva02_fused", "clip", "sam", "mae"):
        assert "attn.qkv.weight" in locals_
    if model.tag == "sam":
        assert {"attn.rel_pos_h", "attn.rel_pos_w"} <= locals_


def test_every_parameter_is_mapped_as_expected(model):
    groups = parameter_groups(model.named_parameters())
    params = dict(model.named_parameters())
    assert list(groups) == list(params)
    for name, pieces in groups.items():
        rows = params[name].shape[0]
        assert as_tuples(pieces, rows) == expected_pieces(name, tuple(params[name].shape)), name
        assert all(p.group in GROUPS for p in pieces)


def test_pieces_partition_the_rows(model):
    groups = parameter_groups((n, p.shape) for n, p in model.named_parameters())  # shapes work as well
    for name, p in model.named_parameters():
        covered = torch.zeros(p.shape[0], dtype=torch.int64)
        for piece in groups[name]:
            covered[piece.rows] += 1
            assert piece.rows.step in (None, 1)
        assert torch.all(covered == 1), name


def test_block_indices(model):
    for name, pieces in parameter_groups(model.named_parameters()).items():
        expected = int(name.split(".")[1]) if name.startswith("blocks.") else -1
        assert {p.block for p in pieces} == {expected}, name
    assert block_index("backbone.blocks.11.mlp.fc1.weight") == 11
    assert block_index("blocks.10.attn.qkv.weight") == 10
    assert block_index("pos_embed") == -1


def test_fused_qkv_rows_are_d_2d_3d(model):
    d = model.embed_dim
    names = [n for n, _ in model.named_parameters() if n.endswith("attn.qkv.weight") or n.endswith("attn.qkv.bias")]
    if model.tag == "eva02_separate":
        assert not names
        return
    assert len(names) == DEPTH * (1 if model.tag == "eva02_fused" else 2)
    for name in names:
        pieces = group_slices(name, dict(model.named_parameters())[name].shape)
        assert [(p.group, p.rows) for p in pieces] == [("Q", slice(0, d)), ("K", slice(d, 2 * d)),
                                                         ("V", slice(2 * d, 3 * d))]


def _captured_qkv(attn: torch.nn.Module, x: torch.Tensor, monkeypatch) -> dict[str, torch.Tensor]:
    """Run the attention module; return the q, k, v it passed to SDPA as (B, N, heads * head_dim)."""
    seen = {}
    real = F.scaled_dot_product_attention

    def spy(q, k, v, *args, **kwargs):
        for key, t in zip("qkv", (q, k, v)):
            if t.dim() == 3:  # SAM: (B * heads, N, head_dim)
                t = t.reshape(x.shape[0], -1, *t.shape[1:])
            b, h, n, hd = t.shape
            seen[key] = t.transpose(1, 2).reshape(b, n, h * hd)
        return real(q, k, v, *args, **kwargs)

    monkeypatch.setattr(F, "scaled_dot_product_attention", spy)
    if hasattr(attn, "fused_attn"):
        monkeypatch.setattr(attn, "fused_attn", True)
    with torch.no_grad():
        attn(x)
    monkeypatch.undo()
    assert set(seen) == {"q", "k", "v"}
    return seen


def test_q_k_v_pieces_are_what_attention_uses(model, monkeypatch):
    """Per block, x @ W[rows].T + b[rows] over the rows group_slices calls Q (K, V) equals the attention's q (k, v)."""
    groups = parameter_groups(model.named_parameters())
    params = dict(model.named_parameters())
    d = model.embed_dim
    torch.manual_seed(1)
    with torch.no_grad():  # non-zero biases everywhere so a swapped bias would show
        for name, p in params.items():
            if "attn" in name and name.endswith(("bias", "q_bias", "v_bias")):
                p.normal_()
    for i, block in enumerate(model.blocks):
        x = torch.randn(2, 2, 3, d) if model.tag == "sam" else torch.randn(2, 7, d)  # SAM: a token map
        seen = _captured_qkv(block.attn, x, monkeypatch)
        x = x.flatten(1, 2) if x.dim() == 4 else x
        for letter in "QKV":
            weight = torch.zeros(d, d)
            bias = torch.zeros(d)
            n_weight = n_bias = 0
            for name, pieces in groups.items():
                if not name.startswith(f"blocks.{i}."):
                    continue
                for piece in pieces:
                    if piece.group != letter:
                        continue
                    value = params[name].detach()[piece.rows]
                    if value.dim() == 2:
                        weight, n_weight = value, n_weight + 1
                    else:
                        bias, n_bias = value, n_bias + 1
            assert n_weight == 1 and n_bias <= 1, (i, letter)
            expected = F.linear(x, weight, bias)
            torch.testing.assert_close(seen[letter.lower()], expected, rtol=1e-5, atol=1e-5)


def test_candidate_names_and_mask(model):
    groups = parameter_groups(model.named_parameters())
    params = dict(model.named_parameters())
    expected_names = [n for n in params if EXPECTED[split_name(n)[1]] in ("Q", "K", "V", "QKV", "FFN")]
    assert candidate_names(groups) == expected_names
    expected_count = sum(params[n].numel() for n in expected_names)  # every element of these is a candidate
    total = 0
    for name, p in params.items():
        mask = candidate_mask(name, p.shape, groups)
        assert mask.shape == p.shape and mask.dtype == torch.bool
        if name in expected_names:
            assert mask.all(), name
        else:
            assert not mask.any(), name
        total += int(mask.sum())
    assert total == expected_count


def test_partial_candidate_mask():
    """A parameter only part of whose rows are candidates gets exactly those rows."""
    groups = {"w": [GroupSlice(0, "Q", slice(0, 2)), GroupSlice(0, "attn-proj", slice(2, 5)),
                    GroupSlice(0, "FFN", slice(5, 6))]}
    mask = candidate_mask("w", torch.Size([6, 3]), groups)
    assert mask.tolist() == [[True] * 3] * 2 + [[False] * 3] * 3 + [[True] * 3]
    assert candidate_names(groups) == ["w"]
    assert candidate_names({"n": [GroupSlice(0, "norm", slice(0, 4))]}) == []
    scalar = candidate_mask("s", torch.Size([]), {"s": [GroupSlice(-1, "FFN", slice(0, 1))]})
    assert scalar.shape == () and bool(scalar)


def test_group_slices_edge_cases():
    assert group_slices("blocks.3.attn.qkv.bias", (12,)) == [
        GroupSlice(3, "Q", slice(0, 4)), GroupSlice(3, "K", slice(4, 8)), GroupSlice(3, "V", slice(8, 12))]
    with pytest.raises(ValueError, match="not divisible"):
        group_slices("blocks.0.attn.qkv.weight", (10, 4))
    assert group_slices("blocks.0.attn.q_norm.weight", (64,)) == [GroupSlice(0, "norm", slice(0, 64))]
    assert group_slices("blocks.0.attn.k_norm.weight", (64,)) == [GroupSlice(0, "norm", slice(0, 64))]
    assert group_slices("mask_token", (1, 384)) == [GroupSlice(-1, "embed", slice(0, 1))]
    assert group_slices("some.unknown", (5,)) == [GroupSlice(-1, "other", slice(0, 5))]
    assert set(CANDIDATE_GROUPS) == {"Q", "K", "V", "FFN"}


# ----------------------------------------------------------------------------------------------------------
# the full-size backbones of Table 1, on the meta device (names and shapes only)

# short name -> (depth, width D, FFN hidden H, head dim), from the families' papers / CHECKPOINTS.md
FULL = {
    "dinov2_vitl14": (24, 1024, 4096, 64),
    "clip_vitl14": (24, 1024, 4096, 64),
    "eva02_vitl14": (24, 1024, 2730, 64),  # SwiGLU hidden int(1024 * 4 * 2 / 3)
    "sam_vith16": (32, 1280, 5120, 80),
    "mae_vith14": (32, 1280, 5120, 80),
}


@pytest.mark.parametrize("short", sorted(FULL))
def test_full_size_groups_match_known_shapes(short):
    """Every candidate element of the full-size model lies in exactly one of Q, K, V, FFN, and per block the
    counts equal the closed forms of the family's layout: Q, V = D x D + bias D (K without bias in EVA02),
    FFN = fc1 + fc2 (EVA02: gate fc1_g, fc1_x, sub-norm, fc2)."""
    depth, d, hidden, head_dim = FULL[short]
    shapes = {name: tuple(p.shape) for name, p in meta_architecture(short).named_parameters()}
    eva = short.startswith("eva02")
    counts: dict[tuple[int, str], int] = {}
    for name, pieces in parameter_groups(shapes.items()).items():
        shape = shapes[name]
        rows = torch.zeros(shape[0] if shape else 1, dtype=torch.int64)
        per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
        for piece in pieces:
            rows[piece.rows] += 1
            if piece.group in CANDIDATE_GROUPS:
                key = (piece.block, piece.group)
                counts[key] = counts.get(key, 0) + (piece.rows.stop - piece.rows.start) * per_row
        assert torch.all(rows == 1), name  # each element in exactly one group
    if eva:
        q = v = d * d + d
        k = d * d
        ffn = 2 * (d * hidden + hidden) + 2 * hidden + hidden * d + d
        assert shapes["blocks.0.attn.q_proj.weight"] == (d, d) and "blocks.0.attn.k_proj.bias" not in shapes
        assert shapes["blocks.0.mlp.fc1_g.weight"] == shapes["blocks.0.mlp.fc1_x.weight"] == (hidden, d)
        assert shapes["blocks.0.mlp.norm.weight"] == (hidden,) and shapes["blocks.0.mlp.fc2.weight"] == (d, hidden)
    else:
        q = k = v = d * d + d
        ffn = 2 * d * hidden + hidden + d
        assert shapes["blocks.0.attn.qkv.weight"] == (3 * d, d) and shapes["blocks.0.attn.qkv.bias"] == (3 * d,)
        assert shapes["blocks.0.mlp.fc1.weight"] == (hidden, d)
    expected = {(b, g): n for b in range(depth) for g, n in (("Q", q), ("K", k), ("V", v), ("FFN", ffn))}
    assert counts == expected  # nothing outside the blocks is a candidate
    if short.startswith("sam"):
        for b in range(depth):
            size = 127 if b in (7, 15, 23, 31) else 27  # global blocks see the whole 64x64 grid, others 14x14
            assert shapes[f"blocks.{b}.attn.rel_pos_h"] == shapes[f"blocks.{b}.attn.rel_pos_w"] == (size, head_dim)
            assert group_slices(f"blocks.{b}.attn.rel_pos_h", (size, head_dim))[0].group == "other"
        assert not any(name.startswith("neck.") for name in shapes)
    if short.startswith("mae"):
        assert "pos_embed" not in shapes  # the fixed sin-cos table is a buffer: never scored or tuned
