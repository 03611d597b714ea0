"""fisherscan.bench.oracle: the oracle-delta scores file against Eq. 5 computed by hand in numpy (float64): both F
divided by the mean of F(x) over the candidate elements (Q, K, V, FFN of every block), |a - b| / (min(a, b) + 1e-3).
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import write_random_scores

from fisherscan.bench.oracle import oracle_delta_scores
from fisherscan.errors import FisherscanError
from fisherscan.scores.file import load_scores, save_scores

MODEL = "timm:vit_tiny_patch16_224?depth=2&embed_dim=16&num_heads=2&img_size=32&patch_size=8"


def test_oracle_delta_is_eq5_between_the_two_fims(tmp_path):
    source = write_random_scores(tmp_path / "toon.safetensors", MODEL, 4)
    shifted_scores, meta = load_scores(source)
    g = torch.Generator().manual_seed(5)
    shifted_scores = {"fim": {n: v * (0.2 + 3 * torch.rand(v.shape, generator=g))
                              for n, v in shifted_scores["fim"].items()}}
    save_scores(tmp_path / "rain.safetensors", shifted_scores, meta)
    out = oracle_delta_scores(source, tmp_path / "rain.safetensors", tmp_path / "oracle.safetensors", "rain")
    scores, metadata = load_scores(out)
    clean = {n: v.double().numpy() for n, v in load_scores(source)[0]["fim"].items()}
    shift = {n: v.double().numpy() for n, v in shifted_scores["fim"].items()}
    # candidates by hand: the qkv and mlp weights and biases of the two blocks (timm names)
    candidates = [n for n in clean if n.startswith("blocks.") and (".attn.qkv." in n or ".mlp.fc" in n)]
    assert len(candidates) == 2 * 2 * 3
    scale = sum(clean[n].sum() for n in candidates) / sum(clean[n].size for n in candidates)
    for name in clean:
        a, b = clean[name] / scale, shift[name] / scale
        expected = np.abs(a - b) / (np.minimum(a, b) + 1e-3)
        np.testing.assert_allclose(scores["delta"][name].double().numpy(), expected, rtol=1e-5, atol=1e-6)
        assert torch.equal(scores["fim"][name], load_scores(source)[0]["fim"][name])
    assert metadata["oracle"]["style"] == "rain" and metadata["model"] == load_scores(source)[1]["model"]


def test_scores_of_other_images_are_refused(tmp_path):
    source = write_random_scores(tmp_path / "toon.safetensors", MODEL, 4)
    other = write_random_scores(tmp_path / "rain.safetensors", MODEL, 8)
    with pytest.raises(FisherscanError, match="not scored on the same images"):
        oracle_delta_scores(source, other, tmp_path / "oracle.safetensors", "rain")
