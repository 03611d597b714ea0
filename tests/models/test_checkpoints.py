"""Tests for fisherscan.models: official and timm checkpoint layouts, the hub cache, and one-line errors.

The oracle for every layout test is a state dict written by hand here in the published key layout (random
values), together with the mapping to timm's names spelled out in the test -- not timm's converter.
Nothing is downloaded: the tests only build architectures and load files they wrote themselves.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import pytest
import torch
from conftest import invoke
from safetensors.torch import save_file

from fisherscan.errors import FisherscanError
from fisherscan.models import backbone as backbone_module
from fisherscan.models import checkpoints, registry
from fisherscan.models.backbone import build_backbone
from fisherscan.models.checkpoints import resolve_weights

D = 384  # ViT-S embed dim
DEPTH = 12
MLP = 4 * D
GRID = 37  # 518 / 14


@pytest.fixture(autouse=True)
def offline(monkeypatch):
    """Never download: a code path that asks timm for pretrained weights fails the test instead."""
    real = backbone_module.create_architecture

    def no_pretrained(spec, pretrained=False):
        import timm

        if pretrained and timm.is_model(registry.timm_name_of(spec).split(".")[0]):
            pytest.fail(f"{spec}: the test asked timm for pretrained weights (a download)")  # not an Exception
        return real(spec, pretrained=pretrained)  # an unknown name fails before any download

    monkeypatch.setattr(backbone_module, "create_architecture", no_pretrained)


@pytest.fixture
def hub_home(tmp_path, monkeypatch) -> Path:
    """An empty torch home: torch.hub.get_dir() -> <tmp>/torch/hub (restored after the test)."""
    home = tmp_path / "torch"
    monkeypatch.setenv("TORCH_HOME", str(home))
    monkeypatch.setattr(torch.hub, "_hub_dir", None)  # a set_dir() elsewhere would override TORCH_HOME
    assert Path(torch.hub.get_dir()) == home / "hub"
    return home / "hub"


def official_dinov2_vits14(registers: bool, seed: int = 0) -> dict[str, torch.Tensor]:
    """DINOv2 ViT-S/14 as published by facebookresearch/dinov2: a flat state dict, random values."""
    g = torch.Generator().manual_seed(seed)

    def r(*shape):
        return torch.randn(*shape, generator=g)

    sd = {
        "cls_token": r(1, 1, D),
        "pos_embed": r(1, 1 + GRID * GRID, D),
        "mask_token": r(1, D),
        "patch_embed.proj.weight": r(D, 3, 14, 14),
        "patch_embed.proj.bias": r(D),
    }
    if registers:
        sd["register_tokens"] = r(1, 4, D)
    for i in range(DEPTH):
        p = f"blocks.{i}."
        sd.update({
            p + "norm1.weight": r(D), p + "norm1.bias": r(D),
            p + "attn.qkv.weight": r(3 * D, D), p + "attn.qkv.bias": r(3 * D),
            p + "attn.proj.weight": r(D, D), p + "attn.proj.bias": r(D),
            p + "ls1.gamma": r(D),
            p + "norm2.weight": r(D), p + "norm2.bias": r(D),
            p + "mlp.fc1.weight": r(MLP, D), p + "mlp.fc1.bias": r(MLP),
            p + "mlp.fc2.weight": r(D, MLP), p + "mlp.fc2.bias": r(D),
            p + "ls2.gamma": r(D),
        })
    sd["norm.weight"] = r(D)
    sd["norm.bias"] = r(D)
    return sd


def expected_timm(official: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The timm state dict an official DINOv2 file must become (mapping written out by hand)."""
    out = {k: v for k, v in official.items() if k not in ("mask_token", "register_tokens")}
    if "register_tokens" in official:
        out["reg_token"] = official["register_tokens"]
        out["cls_token"] = official["cls_token"] + official["pos_embed"][:, :1]
        out["pos_embed"] = official["pos_embed"][:, 1:]
    return out


def assert_state_equal(model: torch.nn.Module, expected: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert set(own) == set(expected)
    for key, value in expected.items():
        assert own[key].shape == value.shape, key
        assert torch.equal(own[key], value), key


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def small_dinov2():
    """timm's DINOv2 ViT-S architecture with 2 blocks, built the way create_architecture builds it."""
    import timm

    return timm.create_model("vit_small_patch14_dinov2", depth=2, num_classes=0, dynamic_img_size=True)


def small_vit(num_classes: int = 0):
    import timm

    return timm.create_model("vit_tiny_patch16_224", depth=2, num_classes=num_classes)


def official_small(registers: bool = False, seed: int = 0) -> dict[str, torch.Tensor]:
    """The official DINOv2 ViT-S/14 layout cut to the first 2 blocks (matches small_dinov2)."""
    return {k: v for k, v in official_dinov2_vits14(registers, seed).items()
            if not k.startswith("blocks.") or int(k.split(".")[1]) < 2}


def randomised(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's state dict with every tensor replaced by N(0, 1) values (unlike any init)."""
    g = torch.Generator().manual_seed(seed)
    return {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


@pytest.fixture(scope="module")
def official_file(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("official") / "dinov2_vits14_pretrain.pth"
    torch.save(official_dinov2_vits14(registers=False), path)
    return path


# ----------------------------------------------------------------------------------------------------------
# official and timm layouts


def test_official_dinov2_layout_loads_every_tensor(official_file):
    backbone = build_backbone("dinov2_vits14", weights=official_file)
    official = torch.load(official_file, weights_only=True)
    assert_state_equal(backbone.model, expected_timm(official))
    assert backbone.timm_name == "vit_small_patch14_dinov2"
    assert backbone.weights == str(official_file)
    assert backbone.weights_sha256 == sha256(official_file)
    assert backbone.random_init is False
    assert backbone.patch_size == 14
    assert not backbone.model.training


def test_official_dinov2_reg_layout_converts_registers_and_pos_embed(tmp_path):
    official = official_dinov2_vits14(registers=True, seed=1)
    path = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(official, path)
    model = build_backbone("dinov2_vits14_reg", weights=path).model
    own = model.state_dict()
    assert torch.equal(own["reg_token"], official["register_tokens"])
    assert torch.equal(own["cls_token"], official["cls_token"] + official["pos_embed"][:, 0])
    assert torch.equal(own["pos_embed"], official["pos_embed"][:, 1:])
    assert own["pos_embed"].shape == (1, GRID * GRID, D)
    assert_state_equal(model, expected_timm(official))


def test_timm_layout_safetensors_loads(tmp_path, monkeypatch):
    monkeypatch.setattr(backbone_module, "create_architecture", lambda spec, pretrained=False: small_dinov2())
    timm_sd = expected_timm(official_small(seed=2))
    path = tmp_path / "dinov2_vits14.safetensors"
    save_file({k: v.contiguous() for k, v in timm_sd.items()}, str(path))
    backbone = build_backbone("dinov2_vits14", weights=path)
    assert_state_equal(backbone.model, timm_sd)
    assert backbone.weights_sha256 == sha256(path)


def test_checkpoint_nested_under_model_loads(tmp_path):
    official = official_small(seed=3)
    path = tmp_path / "nested.pth"
    torch.save({"model": official, "epoch": 7, "args": {"lr": 0.1}}, path)
    model = small_dinov2()
    checkpoints.load_weights(model, path)
    assert_state_equal(model, expected_timm(official))


@pytest.fixture(scope="module")
def tiny_with_head() -> dict[str, torch.Tensor]:
    """A full-size vit_tiny_patch16_224 state dict (with a 10-class head), random values."""
    import timm

    with torch.device("meta"):  # shapes only: skips timm's (slow) weight init
        shapes = timm.create_model("vit_tiny_patch16_224", num_classes=10)
    return randomised(shapes, seed=11)


def test_timm_name_with_weights_from_a_timm_state_dict(tmp_path, tiny_with_head):
    saved = {k: v for k, v in tiny_with_head.items() if not k.startswith("head.")}
    path = tmp_path / "vit_tiny.pth"
    torch.save(saved, path)
    backbone = build_backbone("timm:vit_tiny_patch16_224", weights=path)
    assert backbone.timm_name == "vit_tiny_patch16_224"
    assert backbone.patch_size == 16
    assert backbone.weights_sha256 == sha256(path)
    assert_state_equal(backbone.model, saved)


def test_classifier_head_of_a_checkpoint_is_dropped(tmp_path):
    saved = randomised(small_vit(num_classes=10), seed=12)
    assert "head.weight" in saved
    path = tmp_path / "with_head.pth"
    torch.save(saved, path)
    model = small_vit()
    checkpoints.load_weights(model, path)
    assert_state_equal(model, {k: v for k, v in saved.items() if not k.startswith("head.")})


# ----------------------------------------------------------------------------------------------------------
# hub cache, random init


def test_hub_cache_file_is_found(hub_home, monkeypatch):
    monkeypatch.setattr(backbone_module, "create_architecture", lambda spec, pretrained=False: small_dinov2())
    checkpoints = hub_home / "checkpoints"
    checkpoints.mkdir(parents=True)
    cached = checkpoints / "dinov2_vits14_pretrain.pth"
    official = official_small(seed=4)
    torch.save(official, cached)
    assert registry.hub_checkpoint_dir() == checkpoints
    assert resolve_weights("dinov2_vits14", None, False) == cached
    backbone = build_backbone("dinov2_vits14")
    assert backbone.weights == str(cached)
    assert backbone.weights_sha256 == sha256(cached)
    assert backbone.random_init is False
    assert_state_equal(backbone.model, expected_timm(official))
    # an explicit --weights wins over the cache
    other = checkpoints.parent / "other.pth"
    other.write_bytes(b"x")
    assert resolve_weights("dinov2_vits14", other, False) == other
    # the _reg variant looks for its own official file name, which is not there
    with pytest.raises(FisherscanError, match="dinov2_vits14_reg4_pretrain.pth"):
        resolve_weights("dinov2_vits14_reg", None, False)


def test_set_dir_is_honoured(tmp_path, monkeypatch):
    monkeypatch.setattr(torch.hub, "_hub_dir", None)
    torch.hub.set_dir(str(tmp_path / "elsewhere"))  # undone by monkeypatch's restore of _hub_dir
    assert registry.hub_checkpoint_dir() == tmp_path / "elsewhere" / "checkpoints"
    with pytest.raises(FisherscanError, match=str(tmp_path / "elsewhere" / "checkpoints")):
        resolve_weights("dinov2_vits14", None, False)


def test_no_weights_anywhere_names_option_cache_and_file(hub_home):
    for call in (lambda: resolve_weights("dinov2_vits14", None, False), lambda: build_backbone("dinov2_vits14")):
        with pytest.raises(FisherscanError) as info:
            call()
        message = str(info.value)
        assert "--weights" in message
        assert str(hub_home / "checkpoints") in message
        assert "dinov2_vits14_pretrain.pth" in message
        assert "--random-init" in message
        assert "\n" not in message


def test_random_init_needs_no_file(hub_home):
    assert resolve_weights("dinov2_vits14", None, True) is None
    backbone = build_backbone("dinov2_vits14", random_init=True)
    assert backbone.random_init is True
    assert backbone.weights is None
    assert backbone.weights_sha256 is None
    assert backbone.model.pos_embed.shape == (1, 1 + GRID * GRID, D)
    assert len(backbone.model.blocks) == DEPTH


def test_random_init_timm_name_does_not_ask_for_pretrained(monkeypatch):
    calls = []

    def spy(spec, pretrained=False):
        calls.append((spec, pretrained))
        return small_vit()

    monkeypatch.setattr(backbone_module, "create_architecture", spy)
    backbone = build_backbone("timm:vit_tiny_patch16_224", random_init=True)
    assert calls == [("timm:vit_tiny_patch16_224", False)]
    assert backbone.random_init is True and backbone.weights is None


# ----------------------------------------------------------------------------------------------------------
# errors


def test_unknown_model_name(hub_home):
    with pytest.raises(FisherscanError, match=r"--model dinov3_vits14: unknown model.*dinov2_vits14"):
        build_backbone("dinov3_vits14")
    with pytest.raises(FisherscanError, match="unknown model"):
        build_backbone("dinov3_vits14", random_init=True)
    with pytest.raises(FisherscanError, match="unknown model|no such file"):  # either mistake may come first
        build_backbone("dinov3_vits14", weights=hub_home.parent.parent / "nope.pth")


def test_unknown_timm_model(tmp_path):
    with pytest.raises(FisherscanError, match="timm has no model not_a_model"):
        build_backbone("timm:not_a_model")
    with pytest.raises(FisherscanError, match="timm has no model not_a_model"):
        build_backbone("timm:not_a_model", random_init=True)
    with pytest.raises(FisherscanError, match="unknown model"):
        build_backbone("timm:")


@pytest.fixture
def mismatched(tmp_path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A vit_tiny (2 blocks) checkpoint with one key missing and one unexpected key."""
    saved = randomised(small_vit(), seed=13)
    del saved["blocks.0.norm1.weight"]
    saved["blocks.0.extra.weight"] = torch.ones(3)
    path = tmp_path / "mismatch.pth"
    torch.save(saved, path)
    return path, saved


def test_missing_and_unexpected_keys_strict(mismatched):
    path, _ = mismatched
    with pytest.raises(FisherscanError) as info:
        checkpoints.load_weights(small_vit(), path)
    message = str(info.value)
    assert str(path) in message
    assert "1 missing (blocks.0.norm1.weight)" in message
    assert "1 unexpected (blocks.0.extra.weight)" in message
    assert "\n" not in message


def test_missing_and_unexpected_keys_not_strict(mismatched, monkeypatch):
    path, saved = mismatched
    monkeypatch.setattr(backbone_module, "create_architecture", lambda spec, pretrained=False: small_vit())
    with pytest.raises(FisherscanError, match="1 missing"):
        build_backbone("timm:vit_tiny_patch16_224", weights=path)
    own = build_backbone("timm:vit_tiny_patch16_224", weights=path, strict=False).model.state_dict()
    for key, value in saved.items():
        if key in own:
            assert torch.equal(own[key], value), key
    assert "blocks.0.extra.weight" not in own
    assert torch.equal(own["blocks.0.norm1.weight"], torch.ones(192))  # LayerNorm's own init, untouched


def test_wrong_shape_is_listed(tmp_path):
    saved = small_vit().state_dict()
    saved["blocks.1.mlp.fc2.bias"] = torch.zeros(7)
    path = tmp_path / "shape.pth"
    torch.save(saved, path)
    with pytest.raises(FisherscanError, match=r"1 wrong shape \(blocks\.1\.mlp\.fc2\.bias\)"):
        checkpoints.load_weights(small_vit(), path)


def test_checkpoint_of_another_model(tmp_path):
    path = tmp_path / "other.pth"
    torch.save({"encoder.layer.0.weight": torch.zeros(3)}, path)
    with pytest.raises(FisherscanError, match="shares no parameter names"):
        checkpoints.load_weights(small_vit(), path)


def test_nonexistent_weights(tmp_path):
    missing = tmp_path / "nope.pth"
    with pytest.raises(FisherscanError) as info:
        build_backbone("dinov2_vits14", weights=missing)
    assert "--weights" in str(info.value) and str(missing) in str(info.value)
    with pytest.raises(FisherscanError, match="--weights"):
        build_backbone("dinov2_vits14", weights=tmp_path)  # a folder is not a file


@pytest.mark.parametrize("suffix", [".pth", ".safetensors", ".bin"])
def test_corrupt_file(tmp_path, suffix):
    path = tmp_path / f"garbage{suffix}"
    path.write_bytes(bytes(range(256)) * 40)
    for call in (lambda: checkpoints.read_state_dict(path), lambda: checkpoints.load_weights(small_vit(), path)):
        with pytest.raises(FisherscanError) as info:
            call()
        assert str(path) in str(info.value)
        assert "\n" not in str(info.value)


def test_corrupt_file_through_build_backbone(tmp_path, monkeypatch):
    monkeypatch.setattr(backbone_module, "create_architecture", lambda spec, pretrained=False: small_dinov2())
    path = tmp_path / "garbage.pth"
    path.write_bytes(b"\x00not a checkpoint" * 100)
    with pytest.raises(FisherscanError, match="cannot read checkpoint"):
        build_backbone("dinov2_vits14", weights=path)


def test_truncated_checkpoint(tmp_path, official_file):
    path = tmp_path / "truncated.pth"
    path.write_bytes(official_file.read_bytes()[: 1 << 20])
    with pytest.raises(FisherscanError, match="cannot read checkpoint"):
        checkpoints.read_state_dict(path)


def test_file_of_no_tensors(tmp_path):
    path = tmp_path / "numbers.pth"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(FisherscanError, match="no state dict of tensors"):
        checkpoints.read_state_dict(path)


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def test_malicious_pickle_is_not_executed(tmp_path, monkeypatch):
    marker = tmp_path / "pwned"
    path = tmp_path / "evil.pth"
    torch.save({"model": {"cls_token": torch.zeros(1, 1, D), "evil": _Payload(marker)}}, path)

    # the payload is live: an unsafe load runs it (so this test can fail)
    probe = tmp_path / "probe"
    probe_path = tmp_path / "probe.pth"
    torch.save({"evil": _Payload(probe)}, probe_path)
    torch.load(probe_path, weights_only=False)
    assert probe.exists()

    monkeypatch.setattr(backbone_module, "create_architecture", lambda spec, pretrained=False: small_dinov2())
    with pytest.raises(FisherscanError) as info:
        build_backbone("dinov2_vits14", weights=path)
    assert not marker.exists()
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)
    with pytest.raises(FisherscanError):
        checkpoints.read_state_dict(path)
    assert not marker.exists()


def test_timm_spec_with_create_model_arguments():
    from fisherscan.models.backbone import create_architecture
    from fisherscan.models.registry import timm_kwargs_of, timm_name_of

    spec = "timm:vit_tiny_patch16_224?depth=2&init_values=1.0&global_pool=avg"
    assert timm_name_of(spec) == "vit_tiny_patch16_224"
    assert timm_kwargs_of(spec) == {"depth": 2, "init_values": 1.0, "global_pool": "avg"}
    model = create_architecture(spec)
    assert len(model.blocks) == 2 and float(model.blocks[0].ls1.gamma[0].detach()) == 1.0
    with pytest.raises(FisherscanError, match="does not take these arguments"):
        create_architecture("timm:vit_tiny_patch16_224?no_such_argument=3")


def test_every_registry_name_asks_for_its_official_file(hub_home):
    """Without a file, each short name's error names its own official file; a file placed there is found."""
    for name, entry in registry.REGISTRY.items():
        with pytest.raises(FisherscanError, match=f"place {entry.official_file} in"):
            resolve_weights(name, None, False)
    checkpoints = hub_home / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "sam_vit_h_4b8939.pth").write_bytes(b"x")
    assert resolve_weights("sam_vith16", None, False) == checkpoints / "sam_vit_h_4b8939.pth"
    assert resolve_weights("sam_vith16?depth=2", None, False) == checkpoints / "sam_vit_h_4b8939.pth"


def test_models_command_lists_names_files_and_counts(hub_home, monkeypatch):
    """Oracle for the counts: closed forms of ViT-L/14 (24 blocks, D 1024, FFN 4096) and published sizes."""


    monkeypatch.setattr(backbone_module, "REGISTRY", {k: registry.REGISTRY[k] for k in ("dinov2_vitl14",
                                                                                        "clip_vitl14")})
    checkpoints = hub_home / "checkpoints"
    checkpoints.mkdir(parents=True)
    (checkpoints / "ViT-L-14.pt").write_bytes(b"x")
    monkeypatch.setenv("COLUMNS", "250")
    result = invoke(*["models", "--counts"])
    assert result.exit_code == 0, result.stderr
    lines = {line.split()[1]: line for line in result.stdout.splitlines() if line.startswith("│")}
    assert set(lines) == {"dinov2_vitl14", "clip_vitl14"}
    dinov2, clip = lines["dinov2_vitl14"], lines["clip_vitl14"]
    assert "vit_large_patch14_dinov2" in dinov2 and "dinov2_vitl14_pretrain.pth" in dinov2
    assert "vit_large_patch14_clip_quickgelu_224.openai" in clip and "ViT-L-14.pt" in clip
    assert "found" in lines["clip_vitl14"] and "found" not in lines["dinov2_vitl14"]
    d, h = 1024, 4096
    candidates = 24 * (3 * (d * d + d) + 2 * d * h + h + d)
    assert f"{candidates / 1e6:,.1f}M" == "277.0M"
    assert "277.0M" in lines["dinov2_vitl14"] and "304.4M" in lines["dinov2_vitl14"]  # 304.37M: DINOv2's paper
    assert str(checkpoints) in result.stdout.replace("\n", "")
