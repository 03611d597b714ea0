"""fisherscan.segmenter: decoder shapes, the multi-level decoder reads the blocks it names (checked with forward
hooks, an independent route to the same tensors), head files round-trip and refuse a wrong model."""

from __future__ import annotations

import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

from fisherscan.errors import FisherscanError
from fisherscan.models.decoders.blocks import evenly_spaced_blocks
from fisherscan.models.heads import head_path_for, load_head, save_head
from fisherscan.models.segmenter import Segmenter


def vit(depth=8, dim=32):
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=dim, depth=depth, num_heads=2, num_classes=0,
                             dynamic_img_size=True)


def test_evenly_spaced_blocks():
    assert evenly_spaced_blocks(12) == [2, 5, 8, 11]
    assert evenly_spaced_blocks(24) == [5, 11, 17, 23]
    assert evenly_spaced_blocks(40) == [9, 19, 29, 39]


@pytest.mark.parametrize("decoder, scale", [("linear", 1), ("multilevel", 4)])
def test_logit_shapes(decoder, scale):
    model = Segmenter(vit(), 19, decoder).eval()
    assert model(torch.randn(2, 3, 32, 48)).shape == (2, 19, 4 * scale, 6 * scale)


def test_multilevel_reads_the_named_blocks():
    torch.manual_seed(0)
    model = Segmenter(vit(), 5, "multilevel").eval()
    seen = {}
    for index in model.decoder.blocks:
        model.backbone.blocks[index].register_forward_hook(lambda m, a, o, i=index: seen.setdefault(i, o))
    x = torch.randn(1, 3, 32, 32)
    (maps,) = model.features(x)
    for index, fmap in zip(model.decoder.blocks, maps):
        tokens = seen[index][:, model.backbone.num_prefix_tokens:]
        assert torch.allclose(fmap, tokens.transpose(1, 2).reshape(1, 32, 4, 4), atol=1e-6)
    assert torch.allclose(model.decode(model.features(x)), model(x))


def test_head_round_trip_and_mismatch(tmp_path):
    torch.manual_seed(0)
    model = Segmenter(vit(), 19, "linear")
    path = head_path_for(tmp_path / "scores.safetensors")
    assert path.name == "scores.head.safetensors"
    save_head(path, model, {"model": "tiny"})
    other = Segmenter(vit(), 19, "linear")
    info = load_head(path, other)
    assert info["model"] == "tiny" and info["decoder"] == "linear"
    assert all(torch.equal(a, b) for a, b in zip(model.decoder.state_dict().values(),
                                                 other.decoder.state_dict().values()))
    with pytest.raises(FisherscanError, match="does not fit"):
        load_head(path, Segmenter(vit(dim=64), 19, "linear"))
    with pytest.raises(FisherscanError, match="no such file"):
        load_head(tmp_path / "missing.safetensors", other)
