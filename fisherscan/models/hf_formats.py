"""The Hugging Face transformers format of the backbone families it implements: the parameter names, how they map
to timm's, and the timm architecture a transformers ``config.json`` describes.

Per family one ``HFFormat`` (referenced by its ``Family`` record in ``families``): the ``Layout`` of its names
(DINOv2's ``Dinov2Model``/``Dinov2WithRegistersModel``, CLIP's ``CLIPVisionModel``/``CLIPModel.vision_model``,
SAM's ``SamModel.vision_encoder``, ``ViTMAEModel`` and ``ViTModel`` share one), the ``model_type`` values of its
configs, and ``timm_spec``: the ``timm:<name>[?key=value&...]`` spec that builds the architecture a config
describes. The names are those of the checkpoint files (what ``save_pretrained`` writes and the hub holds);
transformers >= 5 renames some modules in memory (``attention.q_proj``...) and converts on load.

Conversion is a pure function of the names (no transformers import): renames by template, the separate q/k/v
projections fused into timm's ``attn.qkv`` (q, k, v stacked along the output dimension), and each layout's own
reshaping (CLIP's class embedding and position table; DINOv2's register checkpoints fold the class token's
position into ``cls_token`` as timm's own DINOv2 converter does). ``to_transformers`` maps timm-named tensors
(masks) back, ``qkv`` split in three.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import timm
import torch

from ..errors import FisherscanError

Rule = tuple[str, str]  # (transformers template, timm template); "{n}" a block index; a trailing "." a module prefix


def _identity(tensors: dict) -> dict:
    return tensors


@dataclass(frozen=True)
class Layout:
    """The transformers names of one family's backbone. ``anchor``: the patch embedding's weight, which finds the
    prefix (``vision_model.``, ``vit.``...); ``marker``: a name part only this layout has; ``qkv``: (the q/k/v
    module template with ``{qkv}``, the three names, timm's fused module); ``drop``: names with no timm
    counterpart; ``forward``/``backward``: the layout's own steps after renaming to timm names / before renaming
    timm-named masks back."""

    name: str
    anchor: str
    marker: str
    renames: tuple[Rule, ...]
    qkv: tuple[str, tuple[str, str, str], str] | None = None
    drop: tuple[str, ...] = ()
    forward: Callable[[dict], dict] = _identity
    backward: Callable[[dict], dict] = _identity


def _pattern(template: str) -> re.Pattern:
    body = re.escape(template).replace(r"\{n\}", r"(?P<n>\d+)")
    return re.compile(body if template.endswith(".") else body + "$")


def rename(name: str, rules: tuple[Rule, ...], to_timm: bool = True) -> str | None:
    """``name`` renamed by the first matching rule (transformers -> timm, or back), None when none matches."""
    for hf, tm in rules:
        source, target = (hf, tm) if to_timm else (tm, hf)
        match = _pattern(source).match(name)
        if match:
            index = match.groupdict().get("n")
            return target.replace("{n}", index or "") + name[match.end():]
    return None


def to_timm(state: dict[str, torch.Tensor], layout: Layout) -> dict[str, torch.Tensor]:
    """A transformers backbone state dict (prefix already removed) in timm's names; names no rule knows are kept,
    so strict loading reports them; q/k/v parts without their siblings are kept under their own names."""
    out, parts = {}, {}
    module, letters, fused = layout.qkv or ("", (), "")
    qkv = [_pattern(module.replace("{qkv}", letter) + ".") for letter in letters]
    for name, tensor in state.items():
        if any(re.search(pattern, name) for pattern in layout.drop):
            continue
        for slot, pattern in enumerate(qkv):
            match = pattern.match(name)
            if match:
                target = fused.replace("{n}", match.group("n")) + name[match.end():]
                parts.setdefault(target, {})[slot] = (name, tensor)
                break
        else:
            out[rename(name, layout.renames) or name] = tensor
    for target, found in parts.items():
        if len(found) == 3:
            out[target] = torch.cat([found[slot][1] for slot in range(3)])
        else:
            out.update(dict(found.values()))
    return layout.forward(out)


def to_transformers(tensors: dict[str, torch.Tensor], layout: Layout, prefix: str = "") -> dict[str, torch.Tensor]:
    """timm-named masks of the backbone under the transformers names: ``attn.qkv`` split into the q, k and v
    projections (a register model's class-token position row takes ``cls_token``'s mask); names no rule knows
    are kept."""
    module, letters, fused = layout.qkv or ("", (), "")
    out = {}
    for name, tensor in layout.backward(dict(tensors)).items():
        match = _pattern(fused).match(name) if fused else None
        if match:
            rest = name[match.end():]
            for letter, part in zip(letters, tensor.chunk(3, dim=0)):
                out[prefix + module.replace("{n}", match.group("n")).replace("{qkv}", letter) + "." + rest] = \
                    part.clone()
            continue
        out[prefix + (rename(name, layout.renames, to_timm=False) or name)] = tensor
    return out


# ---- DINOv2: Dinov2Model, Dinov2WithRegistersModel ---------------------------------------------------------


def _dinov2_forward(state: dict) -> dict:
    """SwiGLU's ``w12``/``w3`` (``mlp.weights_in``/``weights_out``) are timm's ``fc1``/``fc2``; with registers
    the class token's position is folded into ``cls_token`` (timm's register models add no position to prefix
    tokens; ``_convert_dinov2`` does the same for the official files)."""
    state = {re.sub(r"\.mlp\.w12\.", ".mlp.fc1.", re.sub(r"\.mlp\.w3\.", ".mlp.fc2.", k)): v for k, v in state.items()}
    if "reg_token" in state and "cls_token" in state and "pos_embed" in state:
        state["cls_token"] = state["cls_token"] + state["pos_embed"][:, :1]
        state["pos_embed"] = state["pos_embed"][:, 1:]
    return state


def _dinov2_backward(tensors: dict) -> dict:
    """Masks back: a register model's class-token position row is the class token's element (one parameter in
    timm); a packed SwiGLU (``fc1`` twice as wide as ``fc2``'s input) is ``weights_in``/``weights_out``."""
    if "reg_token" in tensors and "cls_token" in tensors and "pos_embed" in tensors:
        tensors["pos_embed"] = torch.cat([tensors["cls_token"], tensors["pos_embed"]], dim=1)
    swiglu = re.compile(r"^blocks\.(\d+)\.mlp\.fc([12])\.")
    out = {}
    for name, tensor in tensors.items():
        match = swiglu.match(name)
        if match:
            fc1, fc2 = (tensors.get(f"blocks.{match.group(1)}.mlp.fc{i}.weight") for i in (1, 2))
            if fc1 is not None and fc2 is not None and fc1.shape[0] == 2 * fc2.shape[1]:
                name = name.replace(".mlp.fc1.", ".mlp.w12.").replace(".mlp.fc2.", ".mlp.w3.")
        out[name] = tensor
    return out


_BLOCK = "encoder.layer.{n}."
DINOV2 = Layout(
    "dinov2", "embeddings.patch_embeddings.projection.weight", "layer_scale1.lambda1",
    renames=(("embeddings.cls_token", "cls_token"), ("embeddings.position_embeddings", "pos_embed"),
             ("embeddings.register_tokens", "reg_token"),
             ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
             (_BLOCK + "attention.output.dense.", "blocks.{n}.attn.proj."),
             (_BLOCK + "layer_scale1.lambda1", "blocks.{n}.ls1.gamma"),
             (_BLOCK + "layer_scale2.lambda1", "blocks.{n}.ls2.gamma"),
             (_BLOCK + "mlp.weights_in.", "blocks.{n}.mlp.w12."), (_BLOCK + "mlp.weights_out.", "blocks.{n}.mlp.w3."),
             (_BLOCK, "blocks.{n}."), ("layernorm.", "norm.")),
    qkv=(_BLOCK + "attention.attention.{qkv}", ("query", "key", "value"), "blocks.{n}.attn.qkv."),
    drop=(r"^embeddings\.mask_token$",), forward=_dinov2_forward, backward=_dinov2_backward)

# ---- ViTModel and ViTMAEModel (one layout; ViTMAEForPreTraining's decoder lies outside its ``vit.`` prefix) --

VIT = Layout(
    "vit", "embeddings.patch_embeddings.projection.weight", "layernorm_before",
    renames=(("embeddings.cls_token", "cls_token"), ("embeddings.position_embeddings", "pos_embed"),
             ("embeddings.patch_embeddings.projection.", "patch_embed.proj."),
             (_BLOCK + "attention.output.dense.", "blocks.{n}.attn.proj."),
             (_BLOCK + "layernorm_before.", "blocks.{n}.norm1."), (_BLOCK + "layernorm_after.", "blocks.{n}.norm2."),
             (_BLOCK + "intermediate.dense.", "blocks.{n}.mlp.fc1."), (_BLOCK + "output.dense.", "blocks.{n}.mlp.fc2."),
             ("layernorm.", "norm.")),
    qkv=(_BLOCK + "attention.attention.{qkv}", ("query", "key", "value"), "blocks.{n}.attn.qkv."),
    drop=(r"^pooler\.", r"^embeddings\.mask_token$"))

# ---- CLIP: CLIPVisionModel, CLIPModel's vision_model ---------------------------------------------------------


def _clip_forward(state: dict) -> dict:
    """CLIP's class embedding is a (D,) vector and its position table an (N, D) embedding weight."""
    if "cls_token" in state and state["cls_token"].dim() == 1:
        state["cls_token"] = state["cls_token"].reshape(1, 1, -1)
    if "pos_embed" in state and state["pos_embed"].dim() == 2:
        state["pos_embed"] = state["pos_embed"].unsqueeze(0)
    return state


def _clip_backward(tensors: dict) -> dict:
    if "cls_token" in tensors:
        tensors["cls_token"] = tensors["cls_token"].reshape(-1)
    if "pos_embed" in tensors:
        tensors["pos_embed"] = tensors["pos_embed"].reshape(tensors["pos_embed"].shape[-2:])
    return tensors


_LAYER = "encoder.layers.{n}."
CLIP = Layout(
    "clip", "embeddings.patch_embedding.weight", "embeddings.class_embedding",
    renames=(("embeddings.class_embedding", "cls_token"), ("embeddings.position_embedding.weight", "pos_embed"),
             ("embeddings.patch_embedding.", "patch_embed.proj."), ("pre_layrnorm.", "norm_pre."),
             ("post_layernorm.", "norm."), (_LAYER + "self_attn.out_proj.", "blocks.{n}.attn.proj."),
             (_LAYER + "layer_norm1.", "blocks.{n}.norm1."), (_LAYER + "layer_norm2.", "blocks.{n}.norm2."),
             (_LAYER + "mlp.", "blocks.{n}.mlp.")),
    qkv=(_LAYER + "self_attn.{qkv}_proj", ("q", "k", "v"), "blocks.{n}.attn.qkv."),
    drop=(r"^embeddings\.position_ids$",), forward=_clip_forward, backward=_clip_backward)

# ---- SAM: SamModel's vision_encoder (the neck is not built) -------------------------------------------------

SAM = Layout(
    "sam", "patch_embed.projection.weight", "mlp.lin1.",
    renames=(("patch_embed.projection.", "patch_embed.proj."), ("pos_embed", "pos_embed"),
             ("layers.{n}.layer_norm1.", "blocks.{n}.norm1."), ("layers.{n}.layer_norm2.", "blocks.{n}.norm2."),
             ("layers.{n}.mlp.lin1.", "blocks.{n}.mlp.fc1."), ("layers.{n}.mlp.lin2.", "blocks.{n}.mlp.fc2."),
             ("layers.{n}.", "blocks.{n}.")),  # attn.qkv (fused, as timm's), attn.proj, attn.rel_pos_h/w
    drop=(r"^neck\.",))

LAYOUTS = {layout.name: layout for layout in (SAM, CLIP, DINOV2, VIT)}  # detection order: most specific first


def detect_layout(names) -> tuple[Layout, str] | None:
    """(the transformers layout, the prefix of its backbone) of a state dict's names, or None when it is not one.
    The prefix is what stands before the layout's patch-embedding name (``vision_model.``, ``vit.``, ...)."""
    names = list(names)
    for layout in LAYOUTS.values():
        prefixes = sorted((n[:-len(layout.anchor)] for n in names if n.endswith(layout.anchor)), key=len)
        prefixes = [p for p in prefixes if p == "" or p.endswith(".")]
        if prefixes and any(n.startswith(prefixes[0]) and layout.marker in n for n in names):
            return layout, prefixes[0]
    return None


# ---- config.json: what it says about the architecture, and the timm spec that builds it ---------------------

_COMMON = {"hidden_size": 768, "num_hidden_layers": 12, "num_attention_heads": 12, "hidden_act": "gelu",
           "qkv_bias": True}
_VIT = {**_COMMON, "patch_size": 16, "image_size": 224, "intermediate_size": 3072, "layer_norm_eps": 1e-12}
_DINOV2 = {**_COMMON, "patch_size": 14, "image_size": 224, "mlp_ratio": 4, "layer_norm_eps": 1e-6,
           "use_swiglu_ffn": False}
# transformers' config defaults, for the keys a config.json may leave out (checked against transformers in the tests)
CONFIG_DEFAULTS = {
    "dinov2": _DINOV2,
    "dinov2_with_registers": {**_DINOV2, "patch_size": 16, "num_register_tokens": 4},
    "clip_vision_model": {**_VIT, "patch_size": 32, "layer_norm_eps": 1e-5, "hidden_act": "quick_gelu"},
    "sam_vision_model": {**_COMMON, "patch_size": 16, "image_size": 1024, "mlp_ratio": 4.0,
                         "layer_norm_eps": 1e-6, "window_size": 14, "global_attn_indexes": [2, 5, 8, 11],
                         "use_abs_pos": True, "use_rel_pos": True},
    "vit_mae": _VIT,
    "vit": _VIT,
}
MODEL_TYPES = {"dinov2": "dinov2", "dinov2_with_registers": "dinov2", "clip_vision_model": "clip",
               "sam_vision_model": "sam", "vit_mae": "mae", "vit": "vit"}
COMPOSITE = {"clip": "clip_vision_model", "sam": "sam_vision_model"}  # their backbone's config is vision_config
ACTIVATIONS = {"gelu": "gelu", "quick_gelu": "quick_gelu", "gelu_pytorch_tanh": "gelu_tanh", "gelu_new": "gelu_tanh",
               "silu": "silu", "swish": "silu", "relu": "relu"}


@dataclass(frozen=True)
class VisionConfig:
    """A transformers backbone config in timm's terms. ``mlp``: the width of timm's ``fc1`` (a packed SwiGLU's
    two halves); ``act``: timm's activation name, ``swiglu`` for DINOv2's SwiGLU FFN; ``windows``: SAM's window
    size per block (0: global attention)."""

    model_type: str
    architecture: str
    family: str
    hidden: int
    layers: int
    heads: int
    patch: int
    image: tuple[int, int]
    mlp: int
    act: str
    eps: float
    qkv_bias: bool = True
    registers: int = 0
    windows: tuple[int, ...] = ()
    rel_pos: bool = True
    abs_pos: bool = True

    def describe(self) -> dict:
        """The values a built timm model must share (``fisherscan.models.hf.describe_model``)."""
        values = {"hidden": self.hidden, "layers": self.layers, "heads": self.heads, "patch": self.patch,
                  "grid": (self.image[0] // self.patch, self.image[1] // self.patch), "registers": self.registers,
                  "mlp": self.mlp, "act": self.act, "qkv_bias": self.qkv_bias}
        return {**values, "windows": self.windows} if self.family == "sam" else values


def _pair(value) -> tuple[int, int]:
    return (int(value[0]), int(value[1])) if isinstance(value, (list, tuple)) else (int(value), int(value))


def _mlp(model_type: str, c: dict) -> tuple[int, str]:
    """(fc1's width, the activation) as the transformers module computes them."""
    if model_type.startswith("dinov2"):
        hidden = int(c["hidden_size"] * c["mlp_ratio"])
        if c.get("use_swiglu_ffn"):
            return 2 * ((int(hidden * 2 / 3) + 7) // 8 * 8), "swiglu"
        return hidden, c["hidden_act"]
    if model_type == "sam_vision_model":
        return int(c.get("mlp_dim") or c["hidden_size"] * c["mlp_ratio"]), c["hidden_act"]
    return int(c["intermediate_size"]), c["hidden_act"]


def read_vision_config(config: dict, where: str) -> VisionConfig:
    """The backbone's ``VisionConfig`` of a transformers ``config.json`` (``where`` names it in errors)."""
    model_type = config.get("model_type")
    architecture = (config.get("architectures") or [model_type])[0]
    if model_type in COMPOSITE:
        config = {"model_type": COMPOSITE[model_type], **(config.get("vision_config") or {})}
        model_type = config["model_type"]
    if model_type not in MODEL_TYPES:
        known = "Dinov2Model, Dinov2WithRegistersModel, CLIPModel, CLIPVisionModel, SamModel, ViTMAEModel, ViTModel"
        raise FisherscanError(f"{where} describes a {architecture} (model_type {model_type}); fisherscan reads the "
                              f"transformers backbones {known}")
    c = {**CONFIG_DEFAULTS[model_type], **config}
    mlp, act = _mlp(model_type, c)
    if act not in ACTIVATIONS and act != "swiglu":
        raise FisherscanError(f"{where}: hidden_act {act} has no timm counterpart; use one of {', '.join(ACTIVATIONS)}")
    layers = int(c["num_hidden_layers"])
    windows = ()
    if model_type == "sam_vision_model":
        windows = tuple(0 if i in c["global_attn_indexes"] else int(c["window_size"]) for i in range(layers))
    return VisionConfig(model_type, architecture, MODEL_TYPES[model_type], int(c["hidden_size"]), layers,
                        int(c["num_attention_heads"]), _pair(c["patch_size"])[0], _pair(c["image_size"]), mlp,
                        ACTIVATIONS.get(act, act), float(c["layer_norm_eps"]), bool(c["qkv_bias"]),
                        int(c.get("num_register_tokens", 0)), windows, bool(c.get("use_rel_pos", True)),
                        bool(c.get("use_abs_pos", True)))


def _ratio(cfg: VisionConfig) -> float:
    """An mlp_ratio whose int(hidden * ratio) is exactly the config's width."""
    ratio = cfg.mlp / cfg.hidden
    return ratio if int(cfg.hidden * ratio) == cfg.mlp else (cfg.mlp + 0.5) / cfg.hidden


def _spec(name: str, cfg: VisionConfig | None = None, **extra) -> str:
    """``timm:<name>``, with every size argument of ``cfg`` (and ``extra``) when given."""
    if cfg is None:
        return f"timm:{name}"
    image = cfg.image[0] if cfg.image[0] == cfg.image[1] else cfg.image
    kwargs = {"embed_dim": cfg.hidden, "depth": cfg.layers, "num_heads": cfg.heads, "patch_size": cfg.patch,
              "img_size": image, "mlp_ratio": _ratio(cfg), **extra}
    if not cfg.qkv_bias:
        kwargs["qkv_bias"] = False
    if cfg.act not in ("gelu", "swiglu"):
        kwargs["act_layer"] = cfg.act
    return f"timm:{name}?" + "&".join(f"{key}={value!r}".replace(" ", "") for key, value in kwargs.items())


def _standard(cfg: VisionConfig, sizes: dict, patch: int, image: int, act: tuple[str, ...] = ("gelu",)) -> str | None:
    """The size name of a config with one of ``sizes``' (hidden, layers, heads) and the family's usual rest."""
    size = next((name for name, dims in sizes.items() if dims == (cfg.hidden, cfg.layers, cfg.heads)), None)
    usual = cfg.patch == patch and cfg.image == (image, image) and cfg.qkv_bias and cfg.act in act
    return size if usual and (cfg.mlp == 4 * cfg.hidden or cfg.act == "swiglu") else None


def dinov2_spec(cfg: VisionConfig) -> str:
    reg = "_reg4" if cfg.registers else ""
    size = _standard(cfg, {"small": (384, 12, 6), "base": (768, 12, 12), "large": (1024, 24, 16),
                           "giant": (1536, 40, 24)}, 14, 518, ("gelu", "swiglu"))
    if size and cfg.registers in (0, 4) and (size == "giant") == (cfg.act == "swiglu") \
            and (size != "giant" or cfg.mlp == 8192):
        return _spec(f"vit_{size}_patch14{reg}_dinov2")
    extra = {"reg_tokens": cfg.registers} if cfg.registers not in (0, 4) else {}
    return _spec(f"vit_{'giant' if cfg.act == 'swiglu' else 'small'}_patch14{reg}_dinov2", cfg, **extra)


def clip_spec(cfg: VisionConfig) -> str:
    quick = "quickgelu_" if cfg.act == "quick_gelu" else ""
    size = _standard(cfg, {"base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16)}, cfg.patch,
                     cfg.image[0], ("gelu", "quick_gelu"))
    name = f"vit_{size}_patch{cfg.patch}_clip_{quick}{cfg.image[0]}"
    if size and cfg.image[0] == cfg.image[1] and timm.is_model(name):
        return _spec(name)
    return _spec("vit_base_patch16_clip_224", cfg)


def sam_spec(cfg: VisionConfig) -> str:
    size = _standard(cfg, {"base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16)}, 16, 1024)
    usual = {"base": (2, 5, 8, 11), "large": (5, 11, 17, 23), "huge": (7, 15, 23, 31)}.get(size)
    global_attn = tuple(i for i, window in enumerate(cfg.windows) if window == 0)
    window = max(cfg.windows, default=0)
    if usual == global_attn and window == 14 and cfg.rel_pos and cfg.abs_pos:
        return _spec(f"samvit_{size}_patch16")
    extra = {"window_size": window, "global_attn_indexes": global_attn}
    if not cfg.rel_pos:
        extra["use_rel_pos"] = False
    if not cfg.abs_pos:
        extra["use_abs_pos"] = False
    return _spec("samvit_base_patch16", cfg, **extra)


def mae_spec(cfg: VisionConfig) -> str:
    names = {(768, 16): "vit_base_patch16_224", (1024, 16): "vit_large_patch16_224", (1280, 14): "vit_huge_patch14_224"}
    size = _standard(cfg, {"base": (768, 12, 12), "large": (1024, 24, 16), "huge": (1280, 32, 16)}, cfg.patch, 224)
    if size and (cfg.hidden, cfg.patch) in names:
        return _spec(names[cfg.hidden, cfg.patch] + ".mae")
    return _spec("vit_base_patch16_224.mae", cfg)


def vit_spec(cfg: VisionConfig) -> str:
    size = _standard(cfg, {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
                           "large": (1024, 24, 16), "huge": (1280, 32, 16)}, cfg.patch, cfg.image[0])
    name = f"vit_{size}_patch{cfg.patch}_{cfg.image[0]}"
    if size and cfg.image[0] == cfg.image[1] and timm.is_model(name):
        return _spec(name)
    return _spec("vit_base_patch16_224", cfg)


@dataclass(frozen=True)
class HFFormat:
    """A family's transformers format: its ``layout`` of names, ``timm_spec(VisionConfig)``, and the model whose
    names ``fisherscan mask --format hf`` writes for scores of a checkpoint that came from elsewhere."""

    layout: Layout
    timm_spec: Callable[[VisionConfig], str]
    architecture: str
    prefix: str = ""


HF_FORMATS = {
    "dinov2": HFFormat(DINOV2, dinov2_spec, "Dinov2Model"),
    "clip": HFFormat(CLIP, clip_spec, "CLIPVisionModel", "vision_model."),
    "sam": HFFormat(SAM, sam_spec, "SamModel", "vision_encoder."),
    "mae": HFFormat(VIT, mae_spec, "ViTMAEModel"),
    "vit": HFFormat(VIT, vit_spec, "ViTModel"),
}
