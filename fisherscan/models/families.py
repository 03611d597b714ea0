"""One record per backbone family: the names users type, the timm architecture, the official files, how their
checkpoints convert, what the architecture needs adapted, and what the Fisher engine reads about it.

Adding a family is one ``Family`` record here plus, where timm's own checkpoint filter does not cover the official
file, its ``convert`` function, and where transformers implements it, its ``HFFormat`` (``hf_formats``).
Everything else reads the record: the registry of short names (``fisherscan.models.registry``), checkpoint loading
(``checkpoints``, ``hf``), the architecture (``backbone``), and the hook engine (``fisherscan.fisher.engine``:
``token_layout`` and ``attention_rule``).

Per family (``docs/method.md``, "Checkpoints"):
- SAM's encoder ends at its last block (the ``neck`` is not built; decoders read block tokens, as ViTDet/Rein-style
  heads on SAM do); it has no prefix tokens and adds its position table to the patch-embedding's token map.
- MAE's fixed sin-cos position table is a buffer, so it is never scored or tuned; a ``*_full.pth`` has its decoder
  (``decoder_*``, ``mask_token``) dropped before timm's filter sees it.
- EVA02's fused attention adds separate q/v biases after its qkv Linear (a rule of its own); its final norm (timm's
  ``fc_norm``) is applied to the patch tokens, as the original applies it to every token.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable

import torch
from timm.models.eva import Eva, EvaAttention
from timm.models.vision_transformer import VisionTransformer
from timm.models.vision_transformer_sam import Attention as SamAttention
from timm.models.vision_transformer_sam import VisionTransformerSAM
from torch import nn

from .hf_formats import HF_FORMATS, HFFormat


@dataclass(frozen=True)
class ModelEntry:
    """A public short name, the timm architecture that reproduces it, and its official checkpoint file."""

    name: str
    timm_name: str
    official_file: str
    url: str
    family: str = "dinov2"

    @property
    def family_label(self) -> str:
        return FAMILIES[self.family].label


def _keep(state: dict) -> dict:
    return state


def _unchanged(model: nn.Module, pretrained: bool) -> None:
    return None


@dataclass(frozen=True)
class Family:
    """Everything fisherscan knows about one backbone family.

    ``matches(arch, tag)`` says whether a ``timm:<arch>.<tag>`` spec belongs to it. ``architecture``: the timm
    class its models are. ``token_layout``: ``"prefix"`` when cls/register/position tokens enter in timm's
    ``_pos_embed(x)`` on the patch tokens, ``"grid"`` when a position table is added to the patch embedding's
    (B, h, w, C) output (SAM). ``attention_rule``: the per-image rule (``fisherscan.fisher.rules.FAMILY_RULES``)
    its attention module needs for parameters of its own, by attention class. ``convert`` cleans an official
    state dict before timm's filter; ``adapt(model, pretrained)`` changes the built architecture in place.
    ``transformers``: the family's Hugging Face transformers format (``hf_formats``: names, converter, the timm
    spec of a config), None where transformers has no implementation.
    """

    name: str
    label: str
    matches: Callable[[str, str], bool]
    architecture: type = VisionTransformer
    token_layout: str = "prefix"
    attention_rule: dict[type, str] = field(default_factory=dict)
    convert: Callable[[dict], dict] = _keep
    adapt: Callable[[nn.Module, bool], None] = _unchanged
    checkpoints: tuple[ModelEntry, ...] = ()
    transformers: HFFormat | None = None


def mae_sincos_table(dim: int, grid: int) -> torch.Tensor:
    """MAE's fixed 2-D sin-cos position table (1, 1 + grid^2, dim), a zero row for the cls token first
    (``util/pos_embed.py`` of facebookresearch/mae: the first dim/2 channels encode the column, the rest the row,
    each as sin then cos of pos * 10000^(-k / (dim/4)))."""
    rows, cols = torch.meshgrid(torch.arange(grid, dtype=torch.float64), torch.arange(grid, dtype=torch.float64),
                                indexing="ij")
    omega = 1.0 / 10000 ** (torch.arange(dim // 4, dtype=torch.float64) / (dim / 4))

    def encode(pos: torch.Tensor) -> torch.Tensor:
        angles = pos.reshape(-1, 1) * omega
        return torch.cat([angles.sin(), angles.cos()], dim=1)

    table = torch.cat([encode(cols), encode(rows)], dim=1)
    return torch.cat([torch.zeros(1, dim, dtype=torch.float64), table]).float().unsqueeze(0)


def _fixed_position_table(model: nn.Module, pretrained: bool) -> None:
    """MAE: ``pos_embed`` becomes a buffer, so no estimator or optimiser sees it; an untrained model holds MAE's
    sin-cos table there (``mae_sincos_table``), loaded weights hold the file's."""
    if not isinstance(getattr(model, "pos_embed", None), nn.Parameter):
        return
    table = model.pos_embed.detach().clone()
    del model.pos_embed
    if not pretrained and table.device.type != "meta" and table.shape[1] == 1 + model.patch_embed.num_patches:
        grid = model.patch_embed.grid_size
        if grid[0] == grid[1]:
            table = mae_sincos_table(table.shape[-1], grid[0]).to(table.dtype)
    model.register_buffer("pos_embed", table)


def _no_neck(model: nn.Module, pretrained: bool) -> None:
    """SAM: no neck (the backbone ends at its last block, whose tokens the decoders read), no prefix tokens."""
    if isinstance(model, VisionTransformerSAM):
        model.neck = nn.Identity()
        model.num_prefix_tokens = 0
        model.num_features = model.embed_dim


MAE_DECODER = re.compile(r"^(decoder_|mask_token$)")  # MAE's *_full.pth: the pre-training decoder, not the encoder


def _drop_mae_decoder(state: dict) -> dict:
    return {k: v for k, v in state.items() if not MAE_DECODER.search(k)}


def _dinov2(size: str, timm_size: str, registers: bool) -> ModelEntry:
    name = f"dinov2_vit{size}14" + ("_reg" if registers else "")
    stem = f"dinov2_vit{size}14" + ("_reg4" if registers else "")
    return ModelEntry(name, f"vit_{timm_size}_patch14" + ("_reg4" if registers else "") + "_dinov2",
                      f"{stem}_pretrain.pth",
                      f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/{stem}_pretrain.pth", "dinov2")


def _sam(size: str, timm_size: str, digest: str) -> ModelEntry:
    file = f"sam_vit_{size}_{digest}.pth"
    return ModelEntry(f"sam_vit{size}16", f"samvit_{timm_size}_patch16.sa1b", file,
                      f"https://dl.fbaipublicfiles.com/segment_anything/{file}", "sam")


def _mae(name: str, timm_arch: str, timm_size: str) -> ModelEntry:
    file = f"mae_pretrain_vit_{timm_size}.pth"
    return ModelEntry(name, f"{timm_arch}.mae", file, f"https://dl.fbaipublicfiles.com/mae/pretrain/{file}", "mae")


_SIZES = (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))

# the order is the order of ``matches``: the first family that matches a timm name is its family
FAMILIES: dict[str, Family] = {family.name: family for family in (
    Family("sam", "SAM", lambda arch, tag: arch.startswith("samvit"), architecture=VisionTransformerSAM,
           token_layout="grid", attention_rule={SamAttention: "sam_rel_pos"}, adapt=_no_neck,
           checkpoints=(_sam("b", "base", "01ec64"), _sam("l", "large", "0b3195"), _sam("h", "huge", "4b8939")),
           transformers=HF_FORMATS["sam"]),
    Family("mae", "MAE", lambda arch, tag: tag.startswith("mae"), convert=_drop_mae_decoder,
           adapt=_fixed_position_table,
           checkpoints=(_mae("mae_vitb16", "vit_base_patch16_224", "base"),
                        _mae("mae_vitl16", "vit_large_patch16_224", "large"),
                        _mae("mae_vith14", "vit_huge_patch14_224", "huge")),
           transformers=HF_FORMATS["mae"]),
    Family("eva02", "EVA02 (MIM)", lambda arch, tag: arch.startswith("eva02"), architecture=Eva,
           attention_rule={EvaAttention: "eva_qkv_bias"},
           checkpoints=(ModelEntry("eva02_vitl14", "eva02_large_patch14_224.mim_m38m", "eva02_L_pt_m38m_p14.pt",
                                   "https://huggingface.co/Yuxin-CV/EVA-02/resolve/main/eva02/pt/"
                                   "eva02_L_pt_m38m_p14.pt", "eva02"),)),
    Family("clip", "CLIP (OpenAI)", lambda arch, tag: "clip" in arch,
           checkpoints=(ModelEntry("clip_vitl14", "vit_large_patch14_clip_quickgelu_224.openai", "ViT-L-14.pt",
                                   "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cd"
                                   "b84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt", "clip"),),
           transformers=HF_FORMATS["clip"]),
    Family("dinov2", "DINOv2", lambda arch, tag: "dinov2" in arch,
           checkpoints=tuple(entry for size, timm_size in _SIZES
                             for entry in (_dinov2(size, timm_size, False), _dinov2(size, timm_size, True))),
           transformers=HF_FORMATS["dinov2"]),
    Family("vit", "ViT (timm)", lambda arch, tag: True, transformers=HF_FORMATS["vit"]),
)}

# the registry's order: DINOv2 first, as ``fisherscan models`` lists them
REGISTRY_ORDER = ("dinov2", "eva02", "clip", "sam", "mae")


def family_of_timm_name(timm_name: str) -> Family:
    """The family of a timm model name (``arch.tag``): the first record that matches; ``vit`` for any other."""
    arch, _, tag = timm_name.partition(".")
    return next(family for family in FAMILIES.values() if family.matches(arch, tag))


def architecture_family(module: nn.Module) -> Family | None:
    """The record whose architecture ``module`` is an instance of (the first in ``FAMILIES`` order), or None.
    Families sharing an architecture (DINOv2, CLIP, MAE, plain ViT) share what the engine reads."""
    return next((family for family in FAMILIES.values() if isinstance(module, family.architecture)), None)


def attention_rule_name(module: nn.Module) -> str | None:
    """The family rule an attention module of this exact type needs (``Family.attention_rule``), or None."""
    for family in FAMILIES.values():
        name = family.attention_rule.get(type(module))
        if name is not None:
            return name
    return None
