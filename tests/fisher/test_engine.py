"""The hook engine (fisherscan.fisher_engine) against the brute-force per-image autograd loop of test_fisher (Eq. 9,
fp32, rtol 1e-4) on tiny versions of every supported family's timm architecture, in both label modes and with
Eq. 6's TokenShift active; and a walk over every parameter checking that a rule or the exact fallback computed it.
"""

from __future__ import annotations

import pytest
import timm
import torch
from conftest import IGNORE, OracleShift, assert_close_dicts, brute_force_fisher
from torch import nn

from fisherscan.fisher.diagonal import squared_gradient_sum
from fisherscan.fisher.engine import FALLBACK, RECOMPUTE, UNUSED, HookEngine
from fisherscan.fisher.loss import trainable_parameters
from fisherscan.fisher.perturb import TokenShift
from fisherscan.fisher.vmap import VmapEngine

# family -> (timm architecture, reduced create_model kwargs); depth 2, width 32, tiny images
FAMILIES = {
    "dinov2": ("vit_small_patch14_reg4_dinov2", dict(img_size=28, init_values=0.5)),
    "eva02": ("eva02_tiny_patch14_224", dict(img_size=28, qkv_fused=False)),  # separate q/k/v, SwiGLU, rope
    "eva02-fused": ("eva02_tiny_patch14_224", dict(img_size=28)),  # timm's default: fused qkv, q/v biases
    "clip": ("vit_base_patch16_clip_quickgelu_224", dict(img_size=32)),  # norm_pre, QuickGELU
    "sam": ("samvit_base_patch16", dict(img_size=64, window_size=2, global_attn_indexes=(1,), neck_chans=16)),
    "mae": ("vit_base_patch16_224.mae", dict(img_size=32)),
}
# parameters no rule covers, recomputed module by module (or found unused: no path to the segmentation loss)
EXPECTED_RECOMPUTE: dict[str, set[str]] = {}
# SAM's rel_pos_h/w (block 0 windowed, block 1 global) have their own rule
EXPECTED_RULE = {"sam": {f"backbone.blocks.{i}.attn.rel_pos_{a}": "sam_rel_pos" for i in range(2) for a in "hw"}}
EXPECTED_UNUSED = {"eva02": {"backbone.fc_norm.weight", "backbone.fc_norm.bias"},
                   "eva02-fused": {"backbone.fc_norm.weight", "backbone.fc_norm.bias"}}


class TokenSegmenter(nn.Module):
    """backbone.forward_features + a linear classifier per patch token (or per pixel of SAM's neck map)."""

    def __init__(self, backbone: nn.Module, classes: int = 4):
        super().__init__()
        self.backbone = backbone
        channels = backbone.neck[-1].normalized_shape[0] if hasattr(backbone, "neck") else backbone.embed_dim
        self.head = nn.Linear(channels, classes)

    def forward(self, x):
        features = self.backbone.forward_features(x)
        if features.dim() == 4:  # SAM: (B, C, h, w)
            grid = features.shape[-2:]
            tokens = features.flatten(2).transpose(1, 2)
        else:
            patch = self.backbone.patch_embed.patch_size[0]
            grid = (x.shape[-2] // patch, x.shape[-1] // patch)
            tokens = features[:, self.backbone.num_prefix_tokens:]
        return self.head(tokens).transpose(1, 2).reshape(x.shape[0], -1, *grid)


def build(family: str) -> tuple[nn.Module, int]:
    name, kwargs = FAMILIES[family]
    torch.manual_seed(0)
    backbone = timm.create_model(name, pretrained=False, num_classes=0, depth=2, embed_dim=32, num_heads=2, **kwargs)
    model = TokenSegmenter(backbone).eval()
    with torch.no_grad():  # away from init values (zero biases, unit norms): every gradient non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model, kwargs["img_size"]


def oracle(name, model, batches, uniforms=None, hook=None):
    """brute_force_fisher, with exact zeros for the parameters that have no path to the loss (its autograd
    loop has no gradient for them)."""
    unused = [p for n, p in model.named_parameters() if n in EXPECTED_UNUSED.get(name, ())]
    for p in unused:
        p.requires_grad_(False)
    try:
        fisher = brute_force_fisher(model, batches, uniforms, hook=hook)
    finally:
        for p in unused:
            p.requires_grad_(True)
    return {**fisher, **{n: torch.zeros_like(p) for n,
                         p in model.named_parameters() if n in EXPECTED_UNUSED.get(name, ())}}


def images(size: int, b: int = 3, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, size, size, generator=g)
    y = torch.randint(0, 4, (b, size, size), generator=g)
    y[0, :3] = IGNORE
    return x, y


@pytest.fixture(scope="module", params=list(FAMILIES))
def family(request):
    model, size = build(request.param)
    return request.param, model, size


def test_engine_equals_per_image_loop_given_labels(family):
    name, model, size = family
    x, y = images(size)
    engine = HookEngine(model, trainable_parameters(model), chunk_size=2)  # chunks of 2 images: 2 + 1
    got = {n: v / 3 for n, v in engine.squared_gradient_sum(x, y).items()}
    assert_close_dicts(got, oracle(name, model, [(x, y)]))
    # every parameter visited: by its rule, by recomputing its module where none applies, or found unused
    assert set(engine.visits) == set(dict(model.named_parameters()))
    assert {n for n, how in engine.visits.items() if how == RECOMPUTE} == EXPECTED_RECOMPUTE.get(name, set())
    assert {n: engine.visits[n] for n in EXPECTED_RULE.get(name, {})} == EXPECTED_RULE.get(name, {})
    assert not [n for n, how in engine.visits.items() if how == FALLBACK]
    assert {n for n, how in engine.visits.items() if how == UNUSED} == EXPECTED_UNUSED.get(name, set())
    assert all(float(got[n].sum()) > 0 for n, how in engine.visits.items() if how != UNUSED)


def test_engine_equals_per_image_loop_sampled_labels_with_token_shift(family):
    name, model, size = family
    if name == "sam":  # Eq. 6 acts on (B, N, C) token sequences; SAM's blocks take (B, H, W, C) maps
        x, y = images(size, seed=1)
        u = torch.rand(y.shape, generator=torch.Generator().manual_seed(2))
        got = {n: v / 3 for n, v in squared_gradient_sum(model, x, y, u).items()}
        assert_close_dicts(got, oracle(name, model, [(x, y)], [u]))
        return
    x, y = images(size, seed=1)
    u = torch.rand(y.shape, generator=torch.Generator().manual_seed(2))
    site, prefix = 1, model.backbone.num_prefix_tokens
    g = torch.Generator().manual_seed(3)
    eps_mu, eps_sigma = torch.randn(3, 32, generator=g), torch.randn(3, 32, generator=g)
    spread = (0.5 + torch.rand(32, generator=g), 0.5 + torch.rand(32, generator=g))
    shift = TokenShift(model, site)
    shift.spread = spread
    got = squared_gradient_sum(model, x, y, u, shift=shift, shift_eps=(eps_mu, eps_sigma))
    got = {n: v / 3 for n, v in got.items()}
    shifter = OracleShift(eps_mu, eps_sigma, *spread, prefix)
    handle = model.backbone.blocks[site].register_forward_pre_hook(shifter)
    try:
        expected = oracle(name, model, [(x, y)], [u], hook=shifter)
    finally:
        handle.remove()
    assert_close_dicts(got, expected)
    clean = squared_gradient_sum(model, x, y, u)
    name0 = "backbone.blocks.1.norm1.weight"  # the block the shifted tokens enter
    assert not torch.allclose(got[name0], clean[name0] / 3, rtol=1e-2), "the shift must change the Fisher"


def test_engine_equals_vmap_chunked_and_leaves_requires_grad_alone():
    model, size = build("dinov2")
    for p in model.head.parameters():
        p.requires_grad_(False)
    x, y = images(size, b=5, seed=4)
    u = torch.rand(y.shape, generator=torch.Generator().manual_seed(5))
    hooks = squared_gradient_sum(model, x, y, u, chunk_size=2)
    vmap = squared_gradient_sum(model, x, y, u, chunk_size=2, engine="vmap")
    assert set(hooks) == set(vmap) and not any(n.startswith("head.") for n in hooks)
    assert_close_dicts(hooks, vmap, rtol=1e-5)
    assert all(p.requires_grad for p in model.backbone.parameters())
    assert not any(p.requires_grad for p in model.head.parameters())


def test_a_module_called_twice_goes_to_the_fallback():
    """A rule sees one call's input; a layer used twice per forward must not be squared per call."""

    class Twice(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 1)
            self.shared = nn.Linear(4, 4)

        def forward(self, x):
            t = self.conv(x).permute(0, 2, 3, 1)
            return self.shared(torch.tanh(self.shared(t))).permute(0, 3, 1, 2)

    torch.manual_seed(0)
    model = Twice()
    x, y = torch.randn(3, 3, 4, 4), torch.randint(0, 4, (3, 4, 4))
    engine = HookEngine(model, trainable_parameters(model))
    got = engine.squared_gradient_sum(x, y)
    assert engine.visits["shared.weight"] == FALLBACK and engine.visits["conv.weight"] == "conv2d"
    assert_close_dicts({n: v / 3 for n, v in got.items()}, brute_force_fisher(model, [(x, y)]))


def test_bf16_autocast_accumulates_in_fp32_close_to_fp32():
    model, size = build("clip")
    x, y = images(size, seed=6)
    exact = squared_gradient_sum(model, x, y)
    low = squared_gradient_sum(model, x, y, autocast_dtype=torch.bfloat16)
    assert all(v.dtype == torch.float32 for v in low.values())
    for name in ("backbone.blocks.1.attn.qkv.weight", "backbone.blocks.0.mlp.fc1.weight", "backbone.pos_embed"):
        relative = (low[name] - exact[name]).norm() / exact[name].norm()
        assert relative < 0.1, f"{name}: {relative:.3f}"


class Odd(nn.Module):
    """A conv (its rule), a GroupNorm (no rule: recomputed per image) and a weight read outside its module's forward
    (the vmap fallback); ``in_place`` writes into the conv's output, so the backward starts from the image."""

    def __init__(self, in_place: bool = False):
        super().__init__()
        self.in_place = in_place
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.norm = nn.GroupNorm(2, 4)
        self.side = nn.Linear(4, 4)

    def forward(self, x):
        t = self.conv(x)
        if self.in_place:
            t.mul_(2.0)
        t = torch.tanh(self.norm(t))
        return t + torch.einsum("bchw,dc->bdhw", t, self.side.weight)  # side's weight, not side(...)


def test_modules_without_rules_are_recomputed_or_fall_back():
    """GroupNorm has no rule: recomputed per image; a parameter used outside its module's forward (read by the
    parent) never reaches a hook: the vmap fallback. Oracle: the brute-force loop."""

    torch.manual_seed(0)
    model = Odd()
    x, y = torch.randn(3, 3, 4, 4), torch.randint(0, 4, (3, 4, 4))
    engine = HookEngine(model, {n: p for n, p in model.named_parameters() if n != "side.bias"})
    got = engine.squared_gradient_sum(x, y)
    assert engine.visits == {"conv.weight": "conv2d", "conv.bias": "conv2d", "norm.weight": RECOMPUTE,
                             "norm.bias": RECOMPUTE, "side.weight": FALLBACK}
    model.side.bias.requires_grad_(False)
    assert_close_dicts({n: v / 3 for n, v in got.items()}, brute_force_fisher(model, [(x, y)]))


def test_the_backward_starts_at_the_first_scored_layer():
    """Nothing before the first scored layer needs a gradient: its output becomes the autograd leaf (no gradient
    of the image, none through the unscored blocks). Scoring block 1 alone gives block 1's exact squares.
    Oracle: the brute-force loop with only those parameters requiring grad."""
    model, size = build("dinov2")
    x, y = images(size, seed=7)
    block = {n: p for n, p in model.named_parameters() if n.startswith("backbone.blocks.1.")}
    engine = HookEngine(model, block, chunk_size=2)
    got = {n: v / 3 for n, v in engine.squared_gradient_sum(x, y).items()}
    assert engine.leaf_mode and set(engine.visits.values()) <= {"linear", "layer_norm", "layer_scale"}
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    try:
        for n, p in model.named_parameters():
            p.requires_grad_(n in block)
        want = brute_force_fisher(model, [(x, y)])
    finally:
        for n, p in model.named_parameters():
            p.requires_grad_(flags[n])
    assert_close_dicts(got, want)


def test_a_model_writing_in_place_into_the_first_output_takes_the_gradient_of_the_image():
    """An autograd leaf cannot be changed in place: the engine notices and backpropagates from the image instead
    (for good). Oracle: the brute-force loop."""

    class InPlace(nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = nn.Conv2d(3, 4, 3, padding=1)
            self.head = nn.Conv2d(4, 4, 1)

        def forward(self, x):
            t = self.conv(x)
            t.mul_(2.0)
            return self.head(torch.tanh(t))

    torch.manual_seed(0)
    model = InPlace()
    x, y = torch.randn(3, 3, 4, 4), torch.randint(0, 4, (3, 4, 4))
    engine = HookEngine(model, trainable_parameters(model))
    got = engine.squared_gradient_sum(x, y)
    assert not engine.leaf_mode and engine.visits["conv.weight"] == "conv2d"
    assert_close_dicts({n: v / 3 for n, v in got.items()}, brute_force_fisher(model, [(x, y)]))
    again = engine.squared_gradient_sum(x, y)  # the second batch goes the image's way at once
    assert_close_dicts(again, got, rtol=1e-6)


def count_forwards(model: nn.Module) -> list[int]:
    calls = [0]
    model.register_forward_hook(lambda *_: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_label_draws_share_one_forward_and_equal_the_per_image_loop(family):
    """K label draws of one batch: one forward, K backwards. Oracle: the brute-force loop over the K draws (a
    separate forward per image and draw); and bit for bit the sum of K single-draw calls, in draw order."""
    name, model, size = family
    x, y = images(size, seed=8)
    draws = [torch.rand(y.shape, generator=torch.Generator().manual_seed(10 + k)) for k in range(3)]
    engine = HookEngine(model, trainable_parameters(model), chunk_size=2)
    singles = [engine.squared_gradient_sum(x, y, u) for u in draws]
    forwards = count_forwards(model)
    got = engine.squared_gradient_sum_over_draws(x, y, draws)
    assert forwards[0] == 1
    for n, value in got.items():
        assert torch.equal(value, singles[0][n] + singles[1][n] + singles[2][n]), n
    assert_close_dicts({n: v / 9 for n, v in got.items()}, oracle(name, model, [(x, y)] * 3, draws))


def test_label_draws_through_recompute_fallback_and_the_image_leaf():
    """The modules without rules (recomputed per image, or the vmap fallback) and a model that forces the backward
    from the image see every draw: equal to the sum of single-draw calls."""

    torch.manual_seed(0)
    model = Odd(in_place=True)
    x, y = torch.randn(3, 3, 4, 4), torch.randint(0, 4, (3, 4, 4))
    draws = [torch.rand(y.shape, generator=torch.Generator().manual_seed(k)) for k in range(2)]
    engine = HookEngine(model, trainable_parameters(model))
    got = engine.squared_gradient_sum_over_draws(x, y, [*draws, None])  # None: the given labels
    assert not engine.leaf_mode
    assert {engine.visits[n] for n in ("norm.weight", "side.weight")} == {RECOMPUTE, FALLBACK}
    singles = [engine.squared_gradient_sum(x, y, u) for u in [*draws, None]]
    for n, value in got.items():
        assert torch.equal(value, singles[0][n] + singles[1][n] + singles[2][n]), n
    vmap = VmapEngine(model, trainable_parameters(model)).squared_gradient_sum_over_draws(x, y, [*draws, None])
    assert_close_dicts(vmap, got, rtol=1e-5)
