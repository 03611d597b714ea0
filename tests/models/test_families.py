"""The five VFM families of Table 1 load from their official checkpoint files and score end to end.

Oracle: per family a reduced timm model (2 blocks, width 32, the family's key layout) with N(0, 1) values, written
out here in the family's OFFICIAL layout by an inverse mapping spelled out in this file (OpenAI's ``visual.`` names,
fused ``in_proj`` and TorchScript archive; SAM's ``image_encoder.`` prefix and ``mlp.lin``; EVA02's ``q_bias``,
``w1/w2/ffn_ln/w3`` and ``{'module': ...}``; MAE's ``{'model': ...}``; DINOv2's flat dict with ``mask_token``),
together with the parts the published files carry beyond the backbone (CLIP's text tower and int buffers, SAM's
prompt encoder, mask decoder and neck, EVA02's MIM head and rope buffers, MAE's decoder). Loading by short name +
``--weights`` must give back every original tensor exactly. The TorchScript reader is checked against
``torch.jit.load`` (a second implementation) and against crafted malicious archives (a marker file must not
appear).
"""

from __future__ import annotations

import math
import os
import pickle
import warnings
import zipfile
from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import invoke
from safetensors.torch import load_file
from torch import nn

from fisherscan.data.synthetic import write_dataset
from fisherscan.errors import FisherscanError
from fisherscan.models.backbone import build_backbone
from fisherscan.models.checkpoints import read_state_dict
from fisherscan.models.families import mae_sincos_table
from fisherscan.models.registry import REGISTRY
from fisherscan.models.segmenter import Segmenter
from fisherscan.models.torchscript import read_torchscript_tensors

SMALL = {"depth": 2, "embed_dim": 32, "num_heads": 2}
QUERY = "depth=2&embed_dim=32&num_heads=2"

# family -> (short name, timm architecture written out here, extra reduced-size arguments)
FAMILIES = {
    "dinov2": ("dinov2_vits14", "vit_small_patch14_dinov2", {}),
    "eva02": ("eva02_vitl14", "eva02_large_patch14_224", {}),
    "clip": ("clip_vitl14", "vit_large_patch14_clip_quickgelu_224", {}),
    "sam": ("sam_vitb16", "samvit_base_patch16", {"global_attn_indexes": (1,)}),
    "mae": ("mae_vith14", "vit_huge_patch14_224", {}),
}


def spec_of(family: str) -> str:
    short, _, extra = FAMILIES[family]
    return f"{short}?{QUERY}" + "".join(f"&{k}={v!r}".replace(" ", "") for k, v in extra.items())


def reference_state(family: str, seed: int) -> dict[str, torch.Tensor]:
    """The reduced timm model's state dict with every tensor N(0, 1) (fp16-representable for CLIP's fp16 file)."""
    _, timm_name, extra = FAMILIES[family]
    model = timm.create_model(timm_name, pretrained=False, num_classes=0, **SMALL, **extra)
    g = torch.Generator().manual_seed(seed)
    state = {k: torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}
    if family == "clip":
        state = {k: v.half().float() for k, v in state.items()}
    return state


def junk(*shape: int, seed: int = 99) -> torch.Tensor:
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


# ---- inverse mappings: timm layout -> the layout each family's authors publish ---------------------------


def official_dinov2(sd: dict) -> dict:
    return {**sd, "mask_token": junk(1, 32)}  # flat, as dinov2_vits14_pretrain.pth


def official_eva02(sd: dict) -> dict:
    swaps = (("attn.q_proj.bias", "attn.q_bias"), ("attn.v_proj.bias", "attn.v_bias"), ("mlp.fc1_g.", "mlp.w1."),
             ("mlp.fc1_x.", "mlp.w2."), ("mlp.norm.", "mlp.ffn_ln."), ("mlp.fc2.", "mlp.w3."))
    out = {}
    for key, value in sd.items():
        for old, new in swaps:
            key = key.replace(old, new)
        out["norm." + key[len("fc_norm."):] if key.startswith("fc_norm.") else key] = value
    out.update({"mask_token": junk(1, 1, 32), "lm_head.weight": junk(24, 32), "lm_head.bias": junk(24),
                "rope.freqs_cos": junk(256, 16), "rope.freqs_sin": junk(256, 16)})
    return {"module": out}


def official_clip(sd: dict) -> dict:
    """OpenAI's CLIP state dict: image tower under ``visual.`` (fused in_proj, class_embedding (D,),
    positional_embedding (N+1, D), proj (D, E)), the text tower and the three int buffers; fp16 like the file."""
    out = {}
    for key, value in sd.items():
        if key == "cls_token":
            key, value = "class_embedding", value.reshape(-1)
        elif key == "pos_embed":
            key, value = "positional_embedding", value[0]
        elif key.startswith("patch_embed.proj."):
            key = "conv1." + key.split(".")[-1]
        elif key.startswith("norm_pre."):
            key = "ln_pre." + key.split(".")[-1]
        elif key.startswith("norm."):
            key = "ln_post." + key.split(".")[-1]
        else:
            parts = key.split(".")  # blocks.i.<rest>
            rest = ".".join(parts[2:])
            for old, new in (("norm1.", "ln_1."), ("norm2.", "ln_2."), ("attn.qkv.weight", "attn.in_proj_weight"),
                             ("attn.qkv.bias", "attn.in_proj_bias"), ("attn.proj.", "attn.out_proj."),
                             ("mlp.fc1.", "mlp.c_fc."), ("mlp.fc2.", "mlp.c_proj.")):
                rest = rest.replace(old, new)
            key = f"transformer.resblocks.{parts[1]}.{rest}"
        out["visual." + key] = value.half()
    out["visual.proj"] = junk(32, 16).half()
    out.update({"positional_embedding": junk(8, 16).half(), "token_embedding.weight": junk(50, 16).half(),
                "transformer.resblocks.0.attn.in_proj_weight": junk(48, 16).half(), "ln_final.weight": junk(16).half(),
                "text_projection": junk(16, 16).half(), "logit_scale": torch.tensor(4.6).half(),
                "input_resolution": torch.tensor(224), "context_length": torch.tensor(77),
                "vocab_size": torch.tensor(49408)})
    return out


def official_sam(sd: dict) -> dict:
    out = {"image_encoder." + k.replace("mlp.fc", "mlp.lin"): v for k, v in sd.items()}  # neck included
    out.update({"prompt_encoder.pe_layer.positional_encoding_gaussian_matrix": junk(2, 64),
                "mask_decoder.iou_token.weight": junk(1, 256), "mask_decoder.mask_tokens.weight": junk(4, 256)})
    return out


def official_mae(sd: dict, full: bool = False) -> dict:
    out = dict(sd)
    if full:  # mae_pretrain_vit_huge_full.pth style: decoder and mask token too
        out.update({"mask_token": junk(1, 1, 16), "decoder_embed.weight": junk(16, 32),
                    "decoder_pos_embed": junk(1, 5, 16), "decoder_blocks.0.norm1.weight": junk(16),
                    "decoder_norm.weight": junk(16), "decoder_pred.weight": junk(588, 16)})
    return {"model": out}


class Node(nn.Module):
    """A module of the TorchScript tree written for CLIP's archive (attributes only)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x


def write_torchscript(state: dict[str, torch.Tensor], path: Path) -> None:
    """A real TorchScript archive (torch.jit.script + torch.jit.save) whose state_dict() is ``state``."""
    root = Node()
    for key, value in state.items():
        *parents, leaf = key.split(".")
        module = root
        for part in parents:
            if not hasattr(module, part):
                module.add_module(part, Node())
            module = getattr(module, part)
        if value.is_floating_point():
            module.register_parameter(leaf, nn.Parameter(value.clone(), requires_grad=False))
        else:
            module.register_buffer(leaf, value.clone())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.jit is deprecated; OpenAI's files are TorchScript all the same
        torch.jit.save(torch.jit.script(root), str(path))


@pytest.fixture(scope="module")
def official_files(tmp_path_factory) -> dict[str, tuple[Path, dict[str, torch.Tensor]]]:
    """family -> (official file, the state dict the loaded backbone must hold)."""
    folder = tmp_path_factory.mktemp("official")
    out = {}
    for seed, family in enumerate(FAMILIES):
        sd = reference_state(family, seed)
        expected = {k: v for k, v in sd.items() if not k.startswith("neck.")}  # SAM's backbone ends at its blocks
        if family == "clip":
            path = folder / "ViT-L-14.pt"
            write_torchscript(official_clip(sd), path)
        else:
            writer = {"dinov2": official_dinov2, "eva02": official_eva02, "sam": official_sam, "mae": official_mae}
            path = folder / REGISTRY[FAMILIES[family][0]].official_file
            torch.save(writer[family](sd), path)
        out[family] = (path, expected)
    return out


def assert_state_equal(model: nn.Module, expected: dict[str, torch.Tensor]) -> None:
    own = model.state_dict()
    assert set(own) == set(expected), sorted(set(own) ^ set(expected))[:5]
    for key, value in expected.items():
        assert own[key].shape == value.shape, key
        assert torch.equal(own[key].float(), value.float()), key


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_official_file_loads_every_tensor(family, official_files):
    path, expected = official_files[family]
    backbone = build_backbone(spec_of(family), weights=path)
    assert backbone.timm_name.split(".")[0] == FAMILIES[family][1]
    assert_state_equal(backbone.model, expected)


def test_registry_names_the_timm_architectures_of_checkpoints_md():
    table = {"dinov2_vitl14": "vit_large_patch14_dinov2", "eva02_vitl14": "eva02_large_patch14_224.mim_m38m",
             "clip_vitl14": "vit_large_patch14_clip_quickgelu_224.openai", "sam_vith16": "samvit_huge_patch16.sa1b",
             "sam_vitl16": "samvit_large_patch16.sa1b", "sam_vitb16": "samvit_base_patch16.sa1b",
             "mae_vith14": "vit_huge_patch14_224.mae", "mae_vitl16": "vit_large_patch16_224.mae",
             "mae_vitb16": "vit_base_patch16_224.mae"}
    files = {"dinov2_vitl14": "dinov2_vitl14_pretrain.pth", "eva02_vitl14": "eva02_L_pt_m38m_p14.pt",
             "clip_vitl14": "ViT-L-14.pt", "sam_vith16": "sam_vit_h_4b8939.pth",
             "mae_vith14": "mae_pretrain_vit_huge.pth"}
    for name, timm_name in table.items():
        assert REGISTRY[name].timm_name == timm_name
    for name, file in files.items():
        assert REGISTRY[name].official_file == file


def test_mae_full_checkpoint_drops_the_decoder(tmp_path, official_files):
    _, expected = official_files["mae"]
    path = tmp_path / "mae_pretrain_vit_huge_full.pth"
    torch.save(official_mae(expected, full=True), path)
    assert_state_equal(build_backbone(spec_of("mae"), weights=path).model, expected)


def test_mae_position_table_is_a_fixed_buffer(official_files):
    """Never scored or tuned: not a parameter (so no estimator, optimiser or candidate list sees it); loaded from
    the file; an untrained model holds MAE's sin-cos table (oracle: the formula evaluated element by element)."""
    path, expected = official_files["mae"]
    model = build_backbone(spec_of("mae"), weights=path).model
    assert "pos_embed" not in dict(model.named_parameters())
    assert torch.equal(model.pos_embed, expected["pos_embed"])
    untrained = build_backbone(spec_of("mae"), random_init=True).model
    assert "pos_embed" not in dict(untrained.named_parameters())
    dim, grid = 32, 16
    table = untrained.pos_embed[0]
    assert table.shape == (1 + grid * grid, dim) and not table[0].any()
    for index, (row, col) in enumerate(((0, 0), (0, 1), (3, 7), (15, 15))):
        token = 1 + row * grid + col
        for k in range(dim):
            half, rest = divmod(k, dim // 2)  # first half encodes the column, second the row (MAE's meshgrid)
            pos = col if half == 0 else row
            freq, is_cos = rest % (dim // 4), rest >= dim // 4
            angle = pos / 10000 ** (freq / (dim / 4))
            want = math.cos(angle) if is_cos else math.sin(angle)
            assert abs(float(table[token, k]) - want) < 1e-6, (row, col, k)
    assert torch.equal(mae_sincos_table(dim, grid), untrained.pos_embed)


def test_torchscript_reader_equals_torch_jit_load(official_files):
    path, _ = official_files["clip"]
    ours = read_torchscript_tensors(path)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        theirs = torch.jit.load(str(path)).state_dict()
    assert set(ours) == set(theirs)
    for key, value in theirs.items():
        assert ours[key].dtype == value.dtype and torch.equal(ours[key], value), key
    assert ours["visual.class_embedding"].dtype == torch.float16 and ours["vocab_size"].dtype == torch.int64


@pytest.mark.parametrize("family", ["sam", "eva02"])
def test_timm_layout_of_the_same_family_loads(tmp_path, family, official_files):
    """timm's own files (safetensors, timm names) load too; SAM's carries the neck, which the backbone drops."""
    from safetensors.torch import save_file

    sd = reference_state(family, seed=7)
    path = tmp_path / "timm.safetensors"
    save_file({k: v.contiguous() for k, v in sd.items()}, str(path))
    expected = {k: v for k, v in sd.items() if not k.startswith("neck.")}
    assert_state_equal(build_backbone(spec_of(family), weights=path).model, expected)


def test_missing_key_after_conversion_is_one_line(tmp_path, official_files):
    _, expected = official_files["sam"]
    state = official_sam({k: v for k, v in expected.items() if k != "blocks.1.attn.rel_pos_h"})
    path = tmp_path / "sam_cut.pth"
    torch.save(state, path)
    with pytest.raises(FisherscanError) as info:
        build_backbone(spec_of("sam"), weights=path)
    message = str(info.value)
    assert "1 missing (blocks.1.attn.rel_pos_h)" in message and "--no-strict" in message and "\n" not in message
    model = build_backbone(spec_of("sam"), weights=path, strict=False).model
    assert torch.equal(model.state_dict()["blocks.0.attn.rel_pos_h"], expected["blocks.0.attn.rel_pos_h"])


# ---- what the segmenter reads -----------------------------------------------------------------------------


def test_eva02_patch_tokens_pass_the_files_final_norm(official_files):
    """The original EVA02 applies its final ``norm`` to every token; timm keeps it as ``fc_norm`` (after pooling
    only). Oracle: LayerNorm with the weights stored under ``norm.`` in the official file, applied here."""
    path, expected = official_files["eva02"]
    model = build_backbone(spec_of("eva02"), weights=path).model
    official = official_eva02(expected)["module"]
    x = torch.randn(2, 3, 28, 42, generator=torch.Generator().manual_seed(0))
    tokens, grid = Segmenter(model, 4).features(x)
    with torch.no_grad():
        raw = model.forward_features(x)
    want = F.layer_norm(raw, (32,), official["norm.weight"], official["norm.bias"], eps=1e-6)[:, 1:]
    assert grid == (2, 3) and tokens.shape == (2, 6, 32)
    torch.testing.assert_close(tokens, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(tokens, raw[:, 1:], atol=1e-2)  # the norm does change the tokens


def test_sam_patch_tokens_are_the_last_blocks_without_neck(official_files):
    """Oracle: timm's forward_intermediates (another code path) at the last block, as (B, h*w, D)."""
    path, _ = official_files["sam"]
    model = build_backbone(spec_of("sam"), weights=path).model
    x = torch.randn(2, 3, 32, 48, generator=torch.Generator().manual_seed(1))
    tokens, grid = Segmenter(model, 4).features(x)
    with torch.no_grad():
        last = model.forward_intermediates(x, indices=[1], intermediates_only=True)[0]
    assert grid == (2, 3) and tokens.shape == (2, 6, 32)  # the width of the blocks, not the neck's 256
    torch.testing.assert_close(tokens, last.flatten(2).transpose(1, 2), rtol=1e-4,
                               atol=1e-4)  # N(0, 1) weights: large values


# ---- safety: nothing in a checkpoint runs --------------------------------------------------------------


class _Payload:
    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


def _script_object():  # pragma: no cover - stands for a __torch__ class; never resolved by the reader
    return None


class _ScriptPayload:
    """Pickles as a call of ``_script_object`` (renamed to ``__torch__.evil.Model`` in the bytes) followed by a
    BUILD whose state holds a live os.system call."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return _script_object, (), {"visual.proj": _Payload(self.marker)}


def torchscript_style_zip(path: Path, payload: bytes) -> None:
    """A zip laid out like torch.jit.save's (data.pkl, constants.pkl, version, code/) with our own data.pkl."""
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("evil/data.pkl", payload)
        archive.writestr("evil/constants.pkl", pickle.dumps(()))
        archive.writestr("evil/version", "3\n")
        archive.writestr("evil/code/__torch__.py", "def forward(self):\n  pass\n")


@pytest.mark.parametrize("suffix", [".pt", ".pth"])
@pytest.mark.parametrize("where", ["top", "inside-object"])
def test_malicious_torchscript_archive_is_not_executed(tmp_path, suffix, where):
    marker = tmp_path / f"pwned-{where}"
    if where == "top":
        payload = pickle.dumps({"visual.conv1.weight": _Payload(marker)}, protocol=2)
    else:  # a __torch__ object whose attribute state calls os.system
        payload = pickle.dumps(_ScriptPayload(marker), protocol=2)
        own = f"{_script_object.__module__}\n_script_object".encode()
        assert own in payload
        payload = payload.replace(own, b"__torch__.evil\nModel")
    probe = tmp_path / "probe"  # the payload is live: plain pickle runs it (so this test can fail)
    pickle.loads(pickle.dumps(_Payload(probe)))
    assert probe.exists()

    path = tmp_path / f"ViT-L-14{suffix}"
    torchscript_style_zip(path, payload)
    for call in (lambda: read_state_dict(path), lambda: build_backbone(spec_of("clip"), weights=path)):
        with pytest.raises(FisherscanError) as info:
            call()
        assert str(path) in str(info.value) and "\n" not in str(info.value)
        assert "system" in str(info.value)  # refused at the os.system global, inside the object's state too
    assert not marker.exists()


# ---- fisherscan score end to end on every family ---------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return write_dataset(root, domains=("source",), images_per_domain=2, size=(32, 32), seed=0)["source"]


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_score_runs_on_every_family(family, official_files, tiny_data, tmp_path):
    path, expected = official_files[family]
    out = tmp_path / "scores.safetensors"
    patch = 14 if family in ("dinov2", "eva02", "clip", "mae") else 16
    args = ["score", "--model", spec_of(family), "--weights", path, "--data", tiny_data, "--out", out,
            "--crop", 2 * patch, "--batch-size", 2, "--warmup-steps", 1, "--workers", 0, "--device", "cpu"]
    result = invoke(*args)
    assert result.exit_code == 0, f"{result.stdout}\n{result.stderr}\n{result.exception!r}"
    scores = load_file(str(out))
    params = {k for k in expected if not (family == "mae" and k == "pos_embed")}
    drfim = {k.split("/", 1)[1] for k in scores if k.startswith("drfim/")}
    assert drfim == params, sorted(drfim ^ params)[:5]
    assert all(torch.isfinite(v).all() for v in scores.values())
    qkv = "blocks.1.attn.q_proj.weight" if family == "eva02" else "blocks.1.attn.qkv.weight"
    assert scores[f"fim/{qkv}"].abs().sum() > 0  # gradients reach the attention of the last block


def test_score_strict_and_no_strict(official_files, tiny_data, tmp_path):
    """A converted checkpoint missing a key: one error line by default, loads what matches with --no-strict."""
    _, expected = official_files["sam"]
    path = tmp_path / "sam_cut.pth"
    torch.save(official_sam({k: v for k, v in expected.items() if k != "blocks.0.attn.rel_pos_w"}), path)
    base = ["score", "--model", spec_of("sam"), "--weights", path, "--data", tiny_data, "--crop", 32,
            "--batch-size", 2, "--warmup-steps", 1, "--workers", 0, "--device", "cpu"]
    strict = invoke(*base + ["--out", tmp_path / "a.safetensors"])
    assert strict.exit_code == 2
    lines = [line for line in strict.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "1 missing (blocks.0.attn.rel_pos_w)" in lines[0]
    loose = invoke(*base + ["--out", tmp_path / "b.safetensors", "--no-strict"])
    assert loose.exit_code == 0, loose.stderr


def test_tune_never_touches_the_mae_position_table(official_files, tiny_data, tmp_path):
    """Tuning every element of every group, embed included: cls_token moves, the sin-cos table cannot."""
    from fisherscan.eval.runs import load_run
    from fisherscan.recipes.config import TuneConfig
    from fisherscan.recipes.tune import run_tune
    from fisherscan.scores.file import save_scores

    path, expected = official_files["mae"]
    spec = spec_of("mae")
    names = [n for n, _ in build_backbone(spec, weights=path).model.named_parameters()]
    assert "pos_embed" not in names
    scores = tmp_path / "scores.safetensors"
    ones = {n: torch.ones(expected[n].shape) for n in names}
    save_scores(scores, {kind: ones for kind in ("fim", "fim_shift", "delta", "drfim")},
                {"model": spec, "images": 2, "head": None})
    run_tune(TuneConfig(scores=scores, model=spec, weights=path, data=tiny_data, out=tmp_path / "run", crop=28,
                        batch_size=2, steps=1, lr=0.1, strategy="full", candidates=("Q", "K", "V", "FFN", "embed"),
                        warmup_steps=1, workers=0, device="cpu"))
    tuned, _ = load_run(tmp_path / "run")
    state = tuned.backbone.state_dict()
    assert not torch.equal(state["cls_token"], expected["cls_token"])
    assert torch.equal(state["pos_embed"], expected["pos_embed"])
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    assert not any(key.endswith("/pos_embed") for key in saved)
