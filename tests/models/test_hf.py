"""Hugging Face transformers checkpoints and the local Hugging Face cache load as they are.

Oracle: transformers itself. Per family a tiny random transformers model (width 32, 2 layers, 2 heads, a small
image) is saved with ``save_pretrained`` (DINOv2 sharded by ``max_shard_size``; CLIP both as ``CLIPModel`` with its
text tower and as ``CLIPVisionModel``; MAE as ``ViTMAEForPreTraining`` with its decoder; SAM as ``SamModel`` with
its prompt encoder, mask decoder and neck), loaded by fisherscan under a short name sized by ``?key=value``, and
fisherscan's last-block patch tokens (``patch_tokens``) must equal the transformers model's on the same input.

Where the two differ by design, the reference is adapted and the test says so:
- final norm: transformers' CLIP applies ``post_layernorm`` to the pooled class token only, fisherscan (timm, as
  for OpenAI's file) to every token, so the reference is ``post_layernorm(last_hidden_state)``; SAM's reference is
  the last layer's output (fisherscan builds no neck).
- position-embedding interpolation at another input size: timm resamples with antialiased bicubic (PIL's cubic
  kernel), as does transformers' ``Dinov2WithRegistersModel``; transformers' ``Dinov2Model``, CLIP, ViT and MAE use
  plain bicubic (another kernel, even when upsampling), so they agree once transformers' bicubic is made
  antialiased too, and differ (by more than 1e-4) without; transformers' SAM adds its table without resizing, so
  its reference gets the table resized as timm resizes it (relative positions are resized alike by both).
"""

from __future__ import annotations

import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from conftest import invoke, ok, one_error_line, write_random_scores
from safetensors import safe_open
from safetensors.torch import load_file, save_file

transformers = pytest.importorskip("transformers")

from fisherscan.data.synthetic import write_dataset  # noqa: E402
from fisherscan.errors import FisherscanError  # noqa: E402
from fisherscan.models import hf  # noqa: E402
from fisherscan.models.backbone import build_backbone, meta_architecture, patch_tokens  # noqa: E402
from fisherscan.models.hf_formats import (  # noqa: E402
    CONFIG_DEFAULTS,
    detect_layout,
    read_vision_config,
    to_timm,
    to_transformers,
)
from fisherscan.models.registry import short_name_for  # noqa: E402

SIZE = "embed_dim=32&depth=2&num_heads=2"


def _sam():
    vision = dict(hidden_size=32, output_channels=16, num_hidden_layers=2, num_attention_heads=2, image_size=64,
                  patch_size=16, window_size=2, global_attn_indexes=[1], mlp_dim=64)
    return transformers.SamModel(transformers.SamConfig(vision_config=vision))


def _clip(full: bool):
    vision = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=28,
                  patch_size=14)
    if not full:
        return transformers.CLIPVisionModel(transformers.CLIPVisionConfig(**vision))
    text = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=2)
    return transformers.CLIPModel(transformers.CLIPConfig(vision_config=vision, text_config=text))


DINO = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, image_size=28, patch_size=14)
VIT = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, image_size=32,
           patch_size=16)

# case -> (transformers model builder, input side, patch, the --model a user would type, saved sharded)
CASES = {
    "dinov2": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(**DINO)), 28, 14,
               f"dinov2_vits14?{SIZE}&img_size=28", True),
    "dinov2_swiglu": (lambda: transformers.Dinov2Model(transformers.Dinov2Config(**DINO, use_swiglu_ffn=True)), 28,
                      14, f"dinov2_vitg14?{SIZE}&img_size=28&mlp_ratio=5.5", False),
    "dinov2_registers": (lambda: transformers.Dinov2WithRegistersModel(transformers.Dinov2WithRegistersConfig(**DINO)),
                         28, 14, f"dinov2_vits14_reg?{SIZE}&img_size=28", False),
    "clip": (lambda: _clip(True), 28, 14, f"clip_vitl14?{SIZE}&img_size=28&mlp_ratio=2.0", False),
    "clip_vision": (lambda: _clip(False), 28, 14, f"clip_vitl14?{SIZE}&img_size=28&mlp_ratio=2.0", False),
    "sam": (_sam, 64, 16, f"sam_vitb16?{SIZE}&img_size=64&window_size=2&global_attn_indexes=(1,)&mlp_ratio=2.0",
            False),
    "mae": (lambda: transformers.ViTMAEForPreTraining(transformers.ViTMAEConfig(
        **VIT, mask_ratio=0.0, decoder_hidden_size=16, decoder_num_hidden_layers=1, decoder_intermediate_size=32,
        decoder_num_attention_heads=2)), 32, 16, f"mae_vitb16?{SIZE}&img_size=32&mlp_ratio=2.0", False),
    "vit": (lambda: transformers.ViTModel(transformers.ViTConfig(**VIT)), 32, 16,
            f"timm:vit_base_patch16_224?{SIZE}&img_size=32&mlp_ratio=2.0", False),
}


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, tuple[torch.nn.Module, Path]]:
    """Every case's transformers model (every tensor moved off its init by N(0, 0.2)) and its saved folder."""
    root = tmp_path_factory.mktemp("hf")
    out = {}
    for seed, (case, (build, _, _, _, sharded)) in enumerate(CASES.items()):
        torch.manual_seed(seed)
        model = build().eval()
        with torch.no_grad():
            for p in model.parameters():
                p.add_(0.2 * torch.randn_like(p))
        model.save_pretrained(root / case, **({"max_shard_size": "20KB"} if sharded else {}))
        out[case] = (model, root / case)
    assert len(list((root / "dinov2").glob("model-0000*-of-*.safetensors"))) > 1  # really sharded
    return out


def reference_tokens(case: str, model: torch.nn.Module, x: torch.Tensor) -> torch.Tensor:
    """transformers' last-block patch tokens, with the adaptations the module docstring states."""
    patches = (x.shape[-2] // CASES[case][2]) * (x.shape[-1] // CASES[case][2])
    other_size = x.shape[-1] != CASES[case][1] or x.shape[-2] != CASES[case][1]
    with torch.no_grad():
        if case == "sam":
            return sam_tokens(model.vision_encoder, x)
        if case == "mae":  # increasing noise: the identity shuffle, mask ratio 0 keeps every patch
            noise = torch.arange(patches, dtype=torch.float32).expand(x.shape[0], -1)
            return model.vit(x, noise=noise, interpolate_pos_encoding=other_size).last_hidden_state[:, 1:]
        if case.startswith("clip"):
            tower = getattr(model, "vision_model", model)
            out = tower(pixel_values=x, interpolate_pos_encoding=other_size).last_hidden_state
            return tower.post_layernorm(out)[:, 1:]
        kwargs = {"interpolate_pos_encoding": other_size} if case == "vit" else {}
        return model(x, **kwargs).last_hidden_state[:, -patches:]


def sam_tokens(encoder, x: torch.Tensor) -> torch.Tensor:
    """transformers' SAM encoder up to its last layer; its table resized as timm resizes it (bicubic,
    antialiased) where the input is not the native size (its patch embedding's size check bypassed)."""
    from timm.layers import resample_abs_pos_embed_nhwc

    tokens = encoder.patch_embed.projection(x).permute(0, 2, 3, 1)
    tokens = tokens + resample_abs_pos_embed_nhwc(encoder.pos_embed, tokens.shape[1:3])
    for layer in encoder.layers:
        tokens = layer(tokens)
        tokens = tokens[0] if isinstance(tokens, tuple) else tokens
    return tokens.flatten(1, 2)


@pytest.mark.parametrize("case", sorted(CASES))
def test_same_patch_tokens_as_transformers(case, saved):
    model, folder = saved[case]
    _, size, _, spec, _ = CASES[case]
    backbone = build_backbone(spec, weights=folder)
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours = patch_tokens(backbone.model, x)
    reference = reference_tokens(case, model, x)
    assert ours.shape == reference.shape and reference.abs().max() > 0.1
    assert (ours - reference).abs().max() <= 1e-4
    assert backbone.source["format"] == "transformers" and backbone.source["path"] == str(folder)
    assert backbone.source["architecture"] == type(model).__name__
    assert backbone.source["files"] == sorted(p.name for p in folder.glob("*.safetensors"))


def antialiased_bicubic(*args, **kwargs):
    if kwargs.get("mode") == "bicubic":
        kwargs["antialias"] = True
    return REAL_INTERPOLATE(*args, **kwargs)


REAL_INTERPOLATE = F.interpolate


@pytest.mark.parametrize("case", sorted(CASES))
def test_interpolated_positions_agree_where_the_modes_agree(case, saved, monkeypatch):
    """At 3 x 5 patches (one side up, one down from the native grid): equal where both resample alike."""
    model, folder = saved[case]
    _, _, patch, spec, _ = CASES[case]
    backbone = build_backbone(spec, weights=folder)
    x = torch.randn(2, 3, 3 * patch, 5 * patch, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ours = patch_tokens(backbone.model, x)
    plain = reference_tokens(case, model, x)
    if case in ("dinov2_registers", "sam"):  # antialiased bicubic on both sides (SAM's reference: see docstring)
        assert (ours - plain).abs().max() <= 1e-4
        return
    assert (ours - plain).abs().max() > 1e-4  # transformers' plain bicubic is another kernel
    monkeypatch.setattr(torch.nn.functional, "interpolate", antialiased_bicubic)
    assert (ours - reference_tokens(case, model, x)).abs().max() <= 1e-4


# ---- names: conversion both ways, layouts, configs ------------------------------------------------------------


@pytest.mark.parametrize("case", sorted(CASES))
def test_names_go_to_timm_and_back(case, saved):
    """Every backbone tensor of the file maps to a parameter of the built model and back to its own name and
    shape (values too, except where a register model's class position is folded into cls_token)."""
    _, folder = saved[case]
    state = {}
    for file in folder.glob("*.safetensors"):
        state.update(load_file(str(file)))
    layout, prefix = detect_layout(state)
    backbone = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    timm_state = to_timm(backbone, layout)
    model = build_backbone(CASES[case][3], random_init=True).model
    own = model.state_dict()
    assert set(timm_state) == set(own) and all(timm_state[k].shape == own[k].shape for k in own)
    back = to_transformers(timm_state, layout, prefix)
    dropped = {k for k in state if k.startswith(prefix) and any(re.search(d, k[len(prefix):]) for d in layout.drop)}
    kept = {k: v for k, v in state.items() if k.startswith(prefix) and k not in dropped}
    assert set(back) == set(kept)
    for name, value in kept.items():
        assert back[name].shape == value.shape, name
        if case != "dinov2_registers" or "embeddings." not in name:
            assert torch.equal(back[name], value), name


def test_layouts_are_told_apart_by_their_names(saved):
    expected = {"dinov2": ("dinov2", ""), "dinov2_swiglu": ("dinov2", ""), "dinov2_registers": ("dinov2", ""),
                "clip": ("clip", "vision_model."), "clip_vision": ("clip", ""), "sam": ("sam", "vision_encoder."),
                "mae": ("vit", "vit."), "vit": ("vit", "")}
    for case, (_, folder) in saved.items():
        names = []
        for file in folder.glob("*.safetensors"):
            with safe_open(str(file), "pt") as handle:
                names += list(handle.keys())
        layout, prefix = detect_layout(names)
        assert (layout.name, prefix) == expected[case], case
    timm_names = build_backbone(f"dinov2_vits14?{SIZE}", random_init=True).model.state_dict()
    assert detect_layout(timm_names) is None


def test_config_defaults_are_transformers_defaults():
    """Oracle: transformers' own config classes (a config.json may leave out any default)."""
    classes = {"dinov2": transformers.Dinov2Config, "dinov2_with_registers": transformers.Dinov2WithRegistersConfig,
               "clip_vision_model": transformers.CLIPVisionConfig, "sam_vision_model": transformers.SamVisionConfig,
               "vit_mae": transformers.ViTMAEConfig, "vit": transformers.ViTConfig}
    for model_type, defaults in CONFIG_DEFAULTS.items():
        config = classes[model_type]()
        for key, value in defaults.items():
            got = getattr(config, key, True)  # CLIP has no qkv_bias option: its projections always have biases
            assert (list(got) if isinstance(got, tuple) else got) == value, (model_type, key)


@pytest.mark.parametrize("config, spec, short", [
    (transformers.Dinov2Config(hidden_size=1024, num_hidden_layers=24, num_attention_heads=16, image_size=518),
     "timm:vit_large_patch14_dinov2", "dinov2_vitl14"),
    (transformers.Dinov2Config(hidden_size=1536, num_hidden_layers=40, num_attention_heads=24, image_size=518,
                               use_swiglu_ffn=True), "timm:vit_giant_patch14_dinov2", "dinov2_vitg14"),
    (transformers.Dinov2WithRegistersConfig(hidden_size=384, num_hidden_layers=12, num_attention_heads=6,
                                            image_size=518, patch_size=14),
     "timm:vit_small_patch14_reg4_dinov2", "dinov2_vits14_reg"),
    (transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, patch_size=14),
     "timm:vit_large_patch14_clip_quickgelu_224", "clip_vitl14"),
    (transformers.CLIPVisionConfig(hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                                   num_attention_heads=16, patch_size=14, image_size=336, hidden_act="gelu"),
     "timm:vit_large_patch14_clip_336", None),
    (transformers.SamVisionConfig(hidden_size=1280, num_hidden_layers=32, num_attention_heads=16,
                                  global_attn_indexes=[7, 15, 23, 31]), "timm:samvit_huge_patch16", "sam_vith16"),
    (transformers.ViTMAEConfig(hidden_size=1280, intermediate_size=5120, num_hidden_layers=32, num_attention_heads=16,
                               patch_size=14), "timm:vit_huge_patch14_224.mae", "mae_vith14"),
    (transformers.ViTConfig(), "timm:vit_base_patch16_224", None),
])
def test_published_sizes_are_timm_names(config, spec, short):
    """The published configs' sizes (written out here from the model cards) give timm's own names, and the meta
    architecture of that name matches the config in every checked value."""
    vision = read_vision_config(config.to_dict(), "config.json")
    derived = hf.timm_spec_of(hf.Source("transformers", Path("."), (), vision))
    assert derived == spec
    assert short_name_for(derived) == (short or spec)
    assert hf.mismatches(vision, meta_architecture(derived)) == []


# ---- files and folders -------------------------------------------------------------------------------------


def test_a_bare_model_safetensors_loads(saved, tmp_path):
    """With its config.json beside it (sizes checked) and alone (sizes from --model, names from the file)."""
    model, folder = saved["vit"]
    spec = CASES["vit"][3]
    alone = tmp_path / "model.safetensors"
    shutil.copy(folder / "model.safetensors", alone)
    x = torch.randn(1, 3, 32, 32)
    for path in (folder / "model.safetensors", alone):
        backbone = build_backbone(spec, weights=path)
        with torch.no_grad():
            assert (patch_tokens(backbone.model, x) - reference_tokens("vit", model, x)).abs().max() <= 1e-4
        assert backbone.source["format"] == "transformers"
    with pytest.raises(FisherscanError, match="transformers vit layout.*dinov2_vits14"):
        build_backbone(f"dinov2_vits14?{SIZE}&img_size=28", weights=alone)


def test_the_config_sets_layer_norm_eps_and_the_image_statistics(saved, tmp_path):
    """Oracle: the folder's config.json (ViT: 1e-12, timm's default 1e-6) and preprocessor_config.json."""
    folder = tmp_path / "vit"
    shutil.copytree(saved["vit"][1], folder)
    (folder / "preprocessor_config.json").write_text(json.dumps({"image_mean": [0.5, 0.4, 0.3],
                                                                 "image_std": [0.2, 0.25, 0.3]}))
    model = build_backbone(CASES["vit"][3], weights=folder).model
    norms = [m for m in model.modules() if isinstance(m, torch.nn.LayerNorm)]
    assert len(norms) == 5 and all(m.eps == 1e-12 for m in norms)
    assert model.pretrained_cfg["mean"] == (0.5, 0.4, 0.3) and model.pretrained_cfg["std"] == (0.2, 0.25, 0.3)
    assert all(m.eps == 1e-6 for m in build_backbone(CASES["vit"][3], random_init=True).model.modules()
               if isinstance(m, torch.nn.LayerNorm))


def test_weights_sha256_of_a_folder_covers_config_and_shards(saved, tmp_path):
    from fisherscan.models.checkpoints import weights_sha256

    folder = tmp_path / "copy"
    shutil.copytree(saved["dinov2"][1], folder)
    before = weights_sha256(folder)
    assert before == weights_sha256(saved["dinov2"][1])
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, "layer_norm_eps": 1e-5}))
    assert weights_sha256(folder) != before


def malicious_pickle(path: Path, marker: Path) -> None:
    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    path.write_bytes(pickle.dumps(Payload()))


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return write_dataset(root, domains=("source",), images_per_domain=2, size=(32, 32), seed=0)["source"]


def score_args(model: str, data: Path, out: Path, *extra) -> list:
    return ["score", "--model", model, "--data", data, "--out", out, "--crop", 28, "--batch-size", 2,
            "--warmup-steps", 1, "--workers", 0, "--device", "cpu", *extra]


def broken(kind: str, saved, tmp_path: Path) -> Path:
    folder = tmp_path / kind
    shutil.copytree(saved["dinov2"][1], folder)
    if kind == "no-config":
        (folder / "config.json").unlink()
    elif kind == "other-architecture":
        (folder / "config.json").write_text(json.dumps({"architectures": ["BertModel"], "model_type": "bert"}))
    else:
        sorted(folder.glob("model-0000*.safetensors"))[1].unlink()
    return folder


@pytest.mark.parametrize("kind, needles", [
    ("no-config", ["a folder without config.json"]),
    ("other-architecture", ["BertModel", "model_type bert", "Dinov2Model"]),
    ("missing-shard", ["shard model-00002-of-", "is missing"]),
])
def test_bad_folders_are_one_line_errors_and_nothing_is_unpickled(kind, needles, saved, tiny_data, tmp_path,
                                                                  monkeypatch):
    folder = broken(kind, saved, tmp_path)
    marker = tmp_path / "pwned"
    malicious_pickle(folder / "pytorch_model.bin", marker)
    loads = []
    real_load = torch.load
    monkeypatch.setattr(torch, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    result = invoke(*score_args(CASES["dinov2"][3], tiny_data, tmp_path / "s.safetensors", "--weights", folder))
    one_error_line(result, str(folder), *needles)
    assert not marker.exists() and loads == []


def test_an_index_naming_tensors_no_shard_holds_is_an_error(saved, tmp_path):
    folder = tmp_path / "cut"
    shutil.copytree(saved["dinov2"][1], folder)
    index = json.loads((folder / hf.INDEX).read_text())
    index["weight_map"]["encoder.layer.9.norm1.weight"] = next(iter(index["weight_map"].values()))
    (folder / hf.INDEX).write_text(json.dumps(index))
    with pytest.raises(FisherscanError, match="1 tensors listed in model.safetensors.index.json.*layer.9"):
        build_backbone(CASES["dinov2"][3], weights=folder)


def test_a_mismatch_with_model_names_both(saved, tiny_data, tmp_path, monkeypatch):
    """Checked before any weights are read (for a folder: from its config.json)."""
    from fisherscan.models import checkpoints

    reads = []
    real_read = checkpoints.read_state_dict
    monkeypatch.setattr(checkpoints, "read_state_dict", lambda path: reads.append(path) or real_read(path))
    _, folder = saved["dinov2"]
    result = invoke(*score_args("dinov2_vits14", tiny_data, tmp_path / "s.safetensors", "--weights", folder))
    line = one_error_line(result, "Dinov2Model", "dinov2_vits14", "hidden 32/384", "layers 2/12")
    assert "timm:vit_small_patch14_dinov2?embed_dim=32" in line  # the --model that fits
    assert reads == []
    _, clip = saved["clip"]
    result = invoke(*score_args(CASES["dinov2"][3], tiny_data, tmp_path / "t.safetensors", "--weights", clip))
    one_error_line(result, "CLIPModel", "clip", "dinov2_vits14", "DINOv2")


# ---- the local Hugging Face cache --------------------------------------------------------------------------


def cache_as_the_hub_lays_it_out(cache: Path, repo_id: str, folder: Path, revision: str = "0" * 40) -> Path:
    """``models--org--name/{blobs/<sha256>, snapshots/<revision>/<file> -> ../../blobs/<sha256>, refs/main}``."""
    import hashlib

    repo = cache / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    for file in folder.iterdir():
        blob = repo / "blobs" / hashlib.sha256(file.read_bytes()).hexdigest()
        shutil.copy(file, blob)
        (snapshot / file.name).symlink_to(os.path.relpath(blob, snapshot))
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    return snapshot


def test_a_hub_id_loads_from_the_cache(saved, tmp_path, monkeypatch):
    model, folder = saved["dinov2_registers"]
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    snapshot = cache_as_the_hub_lays_it_out(tmp_path / "cache", "someone/tiny-dinov2-reg", folder)
    backbone = build_backbone("someone/tiny-dinov2-reg")
    x = torch.randn(2, 3, 28, 28)
    with torch.no_grad():
        assert (patch_tokens(backbone.model, x) - reference_tokens("dinov2_registers", model, x)).abs().max() <= 1e-4
    assert backbone.weights == str(snapshot) and backbone.source["architecture"] == "Dinov2WithRegistersModel"
    assert backbone.timm_name == "vit_small_patch14_reg4_dinov2"
    monkeypatch.delenv("HF_HUB_CACHE")  # HF_HOME's layout: $HF_HOME/hub
    monkeypatch.setenv("HF_HOME", str(tmp_path))
    (tmp_path / "cache").rename(tmp_path / "hub")
    assert build_backbone("someone/tiny-dinov2-reg?drop_path_rate=0.1").model.blocks[1].drop_path1.drop_prob > 0


def test_a_timm_hub_id_loads_from_the_cache(tmp_path, monkeypatch):
    """timm's own repositories: config.json with architecture, tag and model arguments; timm's names."""
    spec = f"timm:vit_small_patch14_dinov2?{SIZE}&img_size=28"
    state = {k: torch.randn(v.shape) for k, v in build_backbone(spec, random_init=True).model.state_dict().items()}
    folder = tmp_path / "timm"
    folder.mkdir()
    save_file(state, str(folder / "model.safetensors"))
    (folder / "config.json").write_text(json.dumps({
        "architecture": "vit_small_patch14_dinov2", "num_classes": 0,
        "model_args": {"embed_dim": 32, "depth": 2, "num_heads": 2, "img_size": 28},
        "pretrained_cfg": {"tag": "lvd142m", "input_size": [3, 518, 518]}}))
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "cache"))
    cache_as_the_hub_lays_it_out(tmp_path / "cache", "timm/vit_small_patch14_dinov2.lvd142m", folder)
    backbone = build_backbone("timm/vit_small_patch14_dinov2.lvd142m")
    assert all(torch.equal(backbone.model.state_dict()[k], v) for k, v in state.items())
    assert backbone.source["format"] == "timm" and backbone.timm_name == "vit_small_patch14_dinov2.lvd142m"
    with pytest.raises(FisherscanError, match="timm's vit_small_patch14_dinov2, but --model dinov2_vits14_reg"):
        build_backbone(f"dinov2_vits14_reg?{SIZE}&img_size=28", weights=Path(backbone.weights))


def test_a_hub_id_not_in_the_cache_is_one_line(tiny_data, tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path / "empty"))
    result = invoke(*score_args("facebook/dinov2-large", tiny_data, tmp_path / "s.safetensors"))
    one_error_line(result, "facebook/dinov2-large", str(tmp_path / "empty" / "models--facebook--dinov2-large"),
                   "hf download facebook/dinov2-large")


# ---- end to end: the metadata records the source; masks under the transformers names ---------------------


@pytest.mark.parametrize("case", ["dinov2_registers", "clip"])
def test_score_tune_eval_and_mask_in_transformers_names(case, saved, tiny_data, tmp_path):
    """score, tune and eval's rebuild (base weights checked by sha256) from a folder; the scores keep timm's
    names and the metadata names the source; mask --format hf writes the checkpoint's names."""
    from fisherscan.eval.runs import load_run
    from fisherscan.scores.file import load_scores

    model, folder = saved[case]
    spec = CASES[case][3]
    scores = tmp_path / "scores.safetensors"
    ok(invoke(*score_args(spec, tiny_data, scores, "--weights", folder)))
    by_kind, metadata = load_scores(scores)
    assert metadata["weights_source"]["format"] == "transformers"
    assert metadata["weights_source"]["path"] == str(folder)
    own = {n: p.shape for n, p in build_backbone(spec, weights=folder).model.named_parameters()}
    assert {n: t.shape for n, t in by_kind["drfim"].items()} == own
    ok(invoke("tune", "--scores", scores, "--model", spec, "--weights", folder, "--data", tiny_data, "--out",
              tmp_path / "run", "--steps", 1, "--crop", 28, "--batch-size", 2, "--workers", 0, "--device", "cpu"))
    tuned, manifest = load_run(tmp_path / "run")
    assert manifest["weights_source"]["architecture"] == type(model).__name__
    final_norm = {"clip": "vision_model.post_layernorm.weight", "dinov2_registers": "layernorm.weight"}[case]
    assert torch.equal(tuned.backbone.norm.weight, load_file(str(folder / "model.safetensors"))[final_norm])
    timm_mask, hf_mask = tmp_path / "timm.safetensors", tmp_path / "hf.safetensors"
    ok(invoke("mask", "--scores", scores, "--out", timm_mask, "--budget", "20%"))
    ok(invoke("mask", "--scores", scores, "--out", hf_mask, "--budget", "20%", "--format", "hf"))
    timm_masks = {k[5:]: v for k, v in load_file(str(timm_mask)).items()}
    hf_masks = {k[5:]: v for k, v in load_file(str(hf_mask)).items()}
    assert_transformers_mask(hf_masks, timm_masks, folder)


def assert_transformers_mask(hf_masks: dict, timm_masks: dict, folder: Path) -> None:
    """Oracle: the checkpoint file's own names and shapes; the q/k/v masks are the thirds of timm's qkv mask."""
    file = {}
    for path in folder.glob("*.safetensors"):
        file.update(load_file(str(path)))
    assert set(hf_masks) <= set(file)
    assert all(hf_masks[n].shape == file[n].shape for n in hf_masks)
    qkv = [n for n in timm_masks if n.endswith("attn.qkv.weight")]
    assert qkv and sum(int(m.sum()) for m in timm_masks.values() if m.dim() > 1) > 0
    for name in qkv:
        block = name.split(".")[1]
        letters = ("query", "key", "value") if any("query" in n for n in hf_masks) else ("q_proj", "k_proj", "v_proj")
        parts = [[m for n, m in hf_masks.items() if f".{block}." in n and n.endswith(f".{q}.weight")] for q in letters]
        assert all(len(part) == 1 for part in parts)
        assert torch.equal(torch.cat([part[0] for part in parts]), timm_masks[name])
    selected = sum(int(m.sum()) for n, m in timm_masks.items() if n not in ("cls_token", "pos_embed"))
    assert selected == sum(int(m.sum()) for n, m in hf_masks.items() if "embeddings" not in n)


def test_mask_in_transformers_names_for_scores_of_an_official_file(saved, tmp_path):
    """Scores of a timm-named DINOv2 (no transformers source) get Dinov2Model's names; EVA02 has none."""
    scores = write_random_scores(tmp_path / "s.safetensors", f"dinov2_vits14?{SIZE}&img_size=28", images=2)
    out = tmp_path / "hf.safetensors"
    ok(invoke("mask", "--scores", scores, "--out", out, "--format", "hf"))
    timm_out = tmp_path / "timm.safetensors"
    ok(invoke("mask", "--scores", scores, "--out", timm_out))
    assert_transformers_mask({k[5:]: v for k, v in load_file(str(out)).items()},
                             {k[5:]: v for k, v in load_file(str(timm_out)).items()}, saved["dinov2"][1])
    eva = write_random_scores(tmp_path / "e.safetensors", f"eva02_vitl14?{SIZE}", images=2)
    one_error_line(invoke("mask", "--scores", eva, "--out", tmp_path / "e.mask.safetensors", "--format", "hf"),
                   "EVA02", "--format timm")

