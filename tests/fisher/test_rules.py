"""Each rule of fisherscan.per_image_rules against its oracle: brute-force per-image autograd on the layer alone.

For a random output gradient g, image i's "loss" is sum(layer(x_i) * g_i); its autograd gradient with respect to
the layer's parameters is what the rule must return for image i, from x and g only.
"""

from __future__ import annotations

import pytest
import torch
from timm.layers import LayerNorm as TimmLayerNorm
from timm.layers import LayerNorm2d, LayerScale, resample_abs_pos_embed_nhwc
from torch import nn

from fisherscan.fisher import rules

IMAGES = 3


def autograd_per_image(module, x, g, images):
    """Oracle: one autograd call per image over its (batch-major) rows of x and g."""
    k = x.shape[0] // images
    params = dict(module.named_parameters(recurse=False))
    out = {n: [] for n in params}
    for i in range(images):
        y = module(x[i * k:(i + 1) * k])
        grads = torch.autograd.grad((y * g[i * k:(i + 1) * k]).sum(), list(params.values()))
        for n, value in zip(params, grads):
            out[n].append(value)
    return {n: torch.stack(v) for n, v in out.items()}


def check(module, x, images=IMAGES):
    torch.manual_seed(1)
    with torch.no_grad():
        for p in module.parameters():  # away from the init values (LayerNorm weight 1, bias 0)
            p.add_(0.3 * torch.randn_like(p))
    g = torch.randn_like(module(x))
    expected = autograd_per_image(module, x, g, images)
    got = rules.rule_for(module).rule(module, x, g, images)
    assert set(got) == set(expected)
    for name in expected:
        assert got[name].shape == expected[name].shape
        torch.testing.assert_close(got[name].float(), expected[name], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("shape", [(IMAGES, 5, 6), (IMAGES * 4, 2, 2, 6)], ids=["tokens", "windows"])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_on_tokens_and_windows(shape, bias):
    check(nn.Linear(6, 7, bias=bias), torch.randn(*shape))


@pytest.mark.parametrize("cls", [nn.LayerNorm, TimmLayerNorm])
def test_layer_norm(cls):
    check(cls(6, eps=1e-5), 2 + 3 * torch.randn(IMAGES, 5, 6))


def test_layer_norm_2d_channels_first():
    check(LayerNorm2d(6), torch.randn(IMAGES, 6, 3, 4))


@pytest.mark.parametrize("kwargs", [dict(kernel_size=4, stride=4), dict(kernel_size=3, padding=1, bias=False),
                                    dict(kernel_size=(2, 3), stride=(2, 1), dilation=(1, 2))],
                         ids=["patch-embed", "3x3-padded", "strided-dilated"])
def test_conv2d_unfolded(kwargs):
    check(nn.Conv2d(3, 5, **kwargs), torch.randn(IMAGES, 3, 8, 12))


def test_layer_scale():
    check(LayerScale(6, init_values=0.5), torch.randn(IMAGES, 5, 6))


def test_modules_without_a_safe_rule_are_left_to_the_fallback():
    assert rules.rule_for(nn.Conv2d(3, 6, 3, groups=3)) is None
    assert rules.rule_for(nn.Conv2d(3, 6, 3, padding="same")) is None
    assert rules.rule_for(LayerScale(6, inplace=True)) is None
    assert rules.rule_for(nn.GroupNorm(2, 6)) is None
    assert rules.rule_for(nn.ConvTranspose2d(3, 3, 2)) is None


def test_token_gradients_of_an_interpolated_position_embedding():
    """SAM-style: x + bicubic resample of pos_embed; oracle: per-image autograd through the same function."""
    torch.manual_seed(0)
    pos = nn.Parameter(torch.randn(1, 3, 3, 4))
    x, g = torch.randn(IMAGES, 5, 5, 4), torch.randn(IMAGES, 5, 5, 4)

    def embed(t):
        return t + resample_abs_pos_embed_nhwc(pos, t.shape[1:3])

    pos.requires_grad_(False)  # as in the engine's pass: the rule switches it on for its own call only
    got = rules.token_gradients(embed, {"pos_embed": pos}, x, g)["pos_embed"]
    assert not pos.requires_grad
    pos.requires_grad_(True)
    for i in range(IMAGES):
        (expected,) = torch.autograd.grad((embed(x[i:i + 1]) * g[i:i + 1]).sum(), [pos])
        torch.testing.assert_close(got[i], expected)


@pytest.mark.parametrize("fused", [True, False], ids=["sdpa", "explicit"])
@pytest.mark.parametrize("windows, size, table", [(4, 2, 2), (1, 4, 4), (1, 4, 3)],
                         ids=["windowed", "global", "global-resized-table"])
def test_sam_rel_pos_attention(windows, size, table, fused):
    """timm's SAM attention with decomposed relative positions: rel_pos_h/w per image (4 windows of 2x2 tokens per
    image, or one global 4x4 map; a table of another length is resized inside get_rel_pos). qkv and proj are
    children with their own Linear rule; the oracle's parameters are the module's own (rel_pos_h/w)."""
    from timm.models.vision_transformer_sam import Attention

    torch.manual_seed(0)
    module = Attention(8, num_heads=2, use_rel_pos=True, input_size=(table, table + 1)).eval()
    module.fused_attn = fused
    check(module, torch.randn(IMAGES * windows, size, size + 1, 8))
    assert rules.rule_for(Attention(8, num_heads=2)) is None  # no rel_pos: no parameters of its own either
