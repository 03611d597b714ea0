"""One registry of backbone names, and loading their weights from the files users actually have.

A model spec is either a short name of one of the five families of the paper's Table 1 (``dinov2_vitl14``,
``eva02_vitl14``, ``clip_vitl14``, ``sam_vith16``, ``mae_vith14``...) mapped to a timm architecture, or
``timm:<name>`` for any timm model; either may end in ``?key=value&...`` extra ``timm.create_model`` arguments
(``sam_vitb16?depth=2``). Weights come from ``--weights FILE`` (the official file, or timm's safetensors), else
from the torch hub cache under the official file name. Official key layouts (CHECKPOINTS.md) are converted by
timm's own checkpoint filter function for the architecture, after the family's own unwrapping (nested
``model``/``module`` dicts, MAE's decoder dropped; SAM's ``image_encoder.`` prefix and OpenAI CLIP's ``visual.``
names with fused in-projections are timm's), loaded strictly, and read without executing code (safetensors,
``torch.load(weights_only=True)``, or ``fisherscan.torchscript`` for CLIP's TorchScript archive).

Family specifics of the backbone (``adapt_architecture``): SAM's encoder ends at its last block (the ``neck``
is not built; decoders read block tokens, as ViTDet/Rein-style heads on SAM do); MAE's fixed sin-cos position
table is a buffer, so it is never scored or tuned; EVA02's final norm (timm's ``fc_norm``) is applied to the
patch tokens (``patch_tokens``), as the original applies its final norm to every token.

Input size (FISHERTUNE.md): the backbone keeps its native patch size and is built with timm's
``dynamic_img_size``, so position embeddings are interpolated at run time for any padded crop and the
parameters keep their official shapes.
"""

from __future__ import annotations

import contextlib
import hashlib
import math
import re
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from .errors import FisherscanError


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
        return FAMILY_LABELS[self.family]


FAMILY_LABELS = {"dinov2": "DINOv2", "eva02": "EVA02 (MIM)", "clip": "CLIP (OpenAI)", "sam": "SAM", "mae": "MAE"}


def _dinov2(size: str, timm_size: str, registers: bool) -> ModelEntry:
    name = f"dinov2_vit{size}14" + ("_reg" if registers else "")
    stem = f"dinov2_vit{size}14" + ("_reg4" if registers else "")
    return ModelEntry(
        name=name,
        timm_name=f"vit_{timm_size}_patch14" + ("_reg4" if registers else "") + "_dinov2",
        official_file=f"{stem}_pretrain.pth",
        url=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/{stem}_pretrain.pth",
    )


def _sam(size: str, timm_size: str, digest: str) -> ModelEntry:
    file = f"sam_vit_{size}_{digest}.pth"
    return ModelEntry(f"sam_vit{size}16", f"samvit_{timm_size}_patch16.sa1b", file,
                      f"https://dl.fbaipublicfiles.com/segment_anything/{file}", "sam")


def _mae(name: str, timm_arch: str, timm_size: str) -> ModelEntry:
    file = f"mae_pretrain_vit_{timm_size}.pth"
    return ModelEntry(name, f"{timm_arch}.mae", file, f"https://dl.fbaipublicfiles.com/mae/pretrain/{file}", "mae")


REGISTRY: dict[str, ModelEntry] = {
    entry.name: entry
    for entry in [
        *(entry for size, timm_size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
          for entry in (_dinov2(size, timm_size, False), _dinov2(size, timm_size, True))),
        ModelEntry("eva02_vitl14", "eva02_large_patch14_224.mim_m38m", "eva02_L_pt_m38m_p14.pt",
                   "https://huggingface.co/Yuxin-CV/EVA-02/resolve/main/eva02/pt/eva02_L_pt_m38m_p14.pt", "eva02"),
        ModelEntry("clip_vitl14", "vit_large_patch14_clip_quickgelu_224.openai", "ViT-L-14.pt",
                   "https://openaipublic.azureedge.net/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0"
                   "eca1737a03836/ViT-L-14.pt", "clip"),
        _sam("b", "base", "01ec64"), _sam("l", "large", "0b3195"), _sam("h", "huge", "4b8939"),
        _mae("mae_vitb16", "vit_base_patch16_224", "base"), _mae("mae_vitl16", "vit_large_patch16_224", "large"),
        _mae("mae_vith14", "vit_huge_patch14_224", "huge"),
    ]
}


def hub_checkpoint_dir() -> Path:
    """Where torch hub caches checkpoints: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def resolve_weights(spec: str, weights: Path | None, random_init: bool) -> Path | None:
    """The checkpoint file to load for ``spec``, or None for an untrained backbone (``--random-init``)."""
    if weights is not None:
        if not Path(weights).is_file():
            raise FisherscanError(f"--weights {weights}: no such file; pass the path of a .pth or .safetensors checkpoint")
        return Path(weights)
    if random_init:
        return None
    entry = REGISTRY.get(base_name(spec))
    if entry is None:
        return None  # timm:<name> without --weights: timm's own pretrained weights (see build_backbone)
    cached = hub_checkpoint_dir() / entry.official_file
    if cached.is_file():
        return cached
    raise FisherscanError(
        f"no weights for {spec}: pass --weights FILE or place {entry.official_file} in {cached.parent} "
        f"(from {entry.url}); --random-init scores an untrained backbone"
    )


def read_state_dict(path: Path) -> dict[str, torch.Tensor]:
    """Tensors of a checkpoint file, read without executing code; unwraps ``model``/``module``/``state_dict``.
    A TorchScript archive (OpenAI CLIP) is read by ``fisherscan.torchscript``: its tensors by attribute path."""
    from .torchscript import is_torchscript_archive, read_torchscript_tensors

    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
        elif is_torchscript_archive(path):
            state = read_torchscript_tensors(path)
        else:
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # noqa: BLE001 - any reader failure is a bad file for the user
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise FisherscanError(
            f"cannot read checkpoint {path}: {reason[:200]}; pass a .safetensors file or a .pth state dict"
        ) from None
    for key in ("model", "module", "state_dict", "model_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise FisherscanError(f"{path} holds no state dict of tensors; pass the backbone's checkpoint file")
    return dict(state)


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def base_name(spec: str) -> str:
    """The spec without its ``?key=value`` arguments: a short name or ``timm:<name>``."""
    return spec.split("?", 1)[0]


def timm_name_of(spec: str) -> str:
    """The timm architecture behind a model spec; a clear error for an unknown name."""
    base = base_name(spec)
    if base in REGISTRY:
        return REGISTRY[base].timm_name
    if base.startswith("timm:") and len(base) > 5:
        return base[5:]
    known = ", ".join(REGISTRY)
    raise FisherscanError(f"--model {spec}: unknown model; use one of {known} or timm:<name>[?key=value&...]")


def family_of(spec: str) -> str:
    """dinov2, eva02, clip, sam, mae (a registry name's family; a timm name's by architecture and tag), or vit."""
    base = base_name(spec)
    if base in REGISTRY:
        return REGISTRY[base].family
    arch, _, tag = timm_name_of(spec).partition(".")
    if arch.startswith("samvit"):
        return "sam"
    for family, found in (("mae", tag.startswith("mae")), ("eva02", arch.startswith("eva02")),
                          ("clip", "clip" in arch), ("dinov2", "dinov2" in arch)):
        if found:
            return family
    return "vit"


def timm_kwargs_of(spec: str) -> dict:
    """Extra ``timm.create_model`` arguments of a ``<name>?key=value&...`` spec (values read as Python
    literals where they parse, e.g. ``timm:vit_small_patch14_dinov2?init_values=1.0``, ``sam_vitb16?depth=2``)."""
    if "?" not in spec:
        return {}
    return query_kwargs(spec.split("?", 1)[1])


def query_kwargs(query: str) -> dict:
    """``key=value&...`` as a dict, values read as Python literals where they parse (else kept as text)."""
    import ast
    from urllib.parse import parse_qsl

    kwargs = {}
    for key, text in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def create_architecture(spec: str, pretrained: bool = False) -> nn.Module:
    """The timm model for ``spec`` with no classifier head and run-time position-embedding interpolation (SAM
    resizes its position table per call by itself), adapted to its family (``adapt_architecture``)."""
    import timm

    name, extra = timm_name_of(spec), timm_kwargs_of(spec)
    if not timm.is_model(name.split(".")[0]):
        raise FisherscanError(f"--model {spec}: timm has no model {name}; see timm.list_models()")
    try:
        model = timm.create_model(name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **extra)
    except TypeError as error:
        if "dynamic_img_size" not in str(error):
            raise FisherscanError(f"--model {spec}: timm's {name} does not take these arguments ({error})") from None
        try:  # no dynamic_img_size option
            model = timm.create_model(name, pretrained=pretrained, num_classes=0, **extra)
        except TypeError as error:
            raise FisherscanError(f"--model {spec}: timm's {name} does not take these arguments ({error})") from None
    return adapt_architecture(model, family_of(spec), pretrained)


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


def adapt_architecture(model: nn.Module, family: str, pretrained: bool = False) -> nn.Module:
    """SAM: no neck (the backbone ends at its last block, whose tokens the decoders read), no prefix tokens.
    MAE: ``pos_embed`` becomes a buffer, so no estimator or optimiser ever sees it as a parameter; an untrained
    model holds MAE's sin-cos table there (``mae_sincos_table``), loaded weights hold the file's."""
    from timm.models.vision_transformer_sam import VisionTransformerSAM

    if isinstance(model, VisionTransformerSAM):
        model.neck = nn.Identity()
        model.num_prefix_tokens = 0
        model.num_features = model.embed_dim
    if family == "mae" and isinstance(getattr(model, "pos_embed", None), nn.Parameter):
        table = model.pos_embed.detach().clone()
        del model.pos_embed
        if not pretrained and table.device.type != "meta" and table.shape[1] == 1 + model.patch_embed.num_patches:
            grid = model.patch_embed.grid_size
            if grid[0] == grid[1]:
                table = mae_sincos_table(table.shape[-1], grid[0]).to(table.dtype)
        model.register_buffer("pos_embed", table)
    return model


def checkpoint_filter(model: nn.Module):
    """timm's checkpoint filter function for the model's architecture family (converts official formats)."""
    module = sys.modules[type(model).__module__]
    return getattr(module, "checkpoint_filter_fn", None)


MAE_DECODER = re.compile(r"^(decoder_|mask_token$)")  # MAE's *_full.pth: the pre-training decoder, not the encoder


def convert_state_dict(state: dict[str, torch.Tensor], model: nn.Module, family: str = "vit") -> dict[str, torch.Tensor]:
    """An official or timm state dict in the model's own key layout (a pure function): MAE's decoder dropped,
    then timm's filter (DINOv2, EVA02, CLIP's ``visual.`` names and fused in-projection, SAM's
    ``image_encoder.`` prefix), then the parts the backbone is built without (classifier ``head.``, SAM's
    ``neck.``) dropped."""
    state = dict(state)  # timm's converters pop keys from their input
    if family == "mae":
        state = {k: v for k, v in state.items() if not MAE_DECODER.search(k)}
    filter_fn = checkpoint_filter(model)
    if filter_fn is not None:
        state = filter_fn(state, model)
    own = model.state_dict()
    for part in ("head.", "neck."):
        if not any(key.startswith(part) for key in own):
            state = {k: v for k, v in state.items() if not k.startswith(part)}
    return state


def load_weights(model: nn.Module, path: Path, strict: bool = True, family: str = "vit") -> None:
    """Load a checkpoint file into ``model``; unexpected or missing keys are a one-line error."""
    state = convert_state_dict(read_state_dict(path), model, family)
    own = model.state_dict()
    if not any(key in state for key in own):
        raise FisherscanError(f"{path} shares no parameter names with this model; is it the right checkpoint?")
    missing = sorted(set(own) - set(state))
    unexpected = sorted(set(state) - set(own))
    wrong_shape = sorted(k for k in set(state) & set(own) if state[k].shape != own[k].shape)
    if strict and (missing or unexpected or wrong_shape):
        parts = []
        for label, keys in (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong_shape)):
            if keys:
                parts.append(f"{len(keys)} {label} ({', '.join(keys[:3])}{', ...' if len(keys) > 3 else ''})")
        raise FisherscanError(f"{path} does not match the model: {'; '.join(parts)}; check --model, or --no-strict")
    model.load_state_dict({k: v for k, v in state.items() if k not in wrong_shape}, strict=False)


def patch_tokens(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The patch tokens (B, N, D) of the backbone's last block after its final norm, row-major over the patch
    grid. SAM (no neck): its last block's token map. EVA02: timm keeps the final norm as ``fc_norm``, applied
    after pooling only; the original applies it to every token, so it is applied here. Prefix tokens dropped."""
    tokens = model.forward_features(x)
    if tokens.dim() == 4:  # (B, D, h, w): SAM's block tokens after the (removed) neck's place
        return tokens.flatten(2).transpose(1, 2)
    fc_norm = getattr(model, "fc_norm", None)
    if isinstance(getattr(model, "norm", None), nn.Identity) and fc_norm is not None \
            and not isinstance(fc_norm, nn.Identity):
        tokens = fc_norm(tokens)
    return tokens[:, getattr(model, "num_prefix_tokens", 0):]


@contextlib.contextmanager
def _skip_truncated_normal_init() -> Iterator[None]:
    """timm's truncated-normal init is slow on the meta device (decomposed into Python meta kernels) and means
    nothing there; skip it while building shapes only."""
    import timm.layers.weight_init as weight_init

    saved = weight_init._trunc_normal_, nn.init.trunc_normal_
    weight_init._trunc_normal_ = nn.init.trunc_normal_ = lambda tensor, *args, **kwargs: tensor
    try:
        yield
    finally:
        weight_init._trunc_normal_, nn.init.trunc_normal_ = saved


def meta_architecture(spec: str) -> nn.Module:
    """The backbone of ``spec`` on the meta device: names and shapes without memory or weight init."""
    with _skip_truncated_normal_init(), torch.device("meta"):
        return create_architecture(spec)


def candidate_count(shapes: dict[str, tuple[int, ...]]) -> int:
    """Elements in the candidate groups Q, K, V, FFN (Eq. 3) of parameters given by name -> shape."""
    from .groups import CANDIDATE_GROUPS, parameter_groups

    total = 0
    for name, pieces in parameter_groups(shapes.items()).items():
        shape = tuple(shapes[name])
        per_row = math.prod(shape[1:]) if len(shape) > 1 else 1
        total += sum((p.rows.stop - p.rows.start) * per_row for p in pieces if p.group in CANDIDATE_GROUPS)
    return total


@dataclass(frozen=True)
class RegistryRow:
    """One line of ``fisherscan models``."""

    entry: ModelEntry
    cached: Path | None
    parameters: int | None
    candidates: int | None


def registry_rows(counts: bool = False) -> list[RegistryRow]:
    """Every short name with its hub-cache file (if present) and, with ``counts``, its parameter and candidate
    element counts (full size, computed on the meta device)."""
    rows = []
    for entry in REGISTRY.values():
        cached = hub_checkpoint_dir() / entry.official_file
        parameters = candidates = None
        if counts:
            shapes = {name: p.shape for name, p in meta_architecture(entry.name).named_parameters()}
            parameters = sum(math.prod(shape) for shape in shapes.values())
            candidates = candidate_count(shapes)
        rows.append(RegistryRow(entry, cached if cached.is_file() else None, parameters, candidates))
    return rows


@dataclass
class Backbone:
    """A loaded backbone and what the scores metadata needs to know about where it came from."""

    model: nn.Module
    spec: str
    timm_name: str
    weights: str | None
    weights_sha256: str | None
    random_init: bool

    @property
    def patch_size(self) -> int:
        size = self.model.patch_embed.patch_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def build_backbone(spec: str, *, weights: Path | None = None, random_init: bool = False,
                   strict: bool = True) -> Backbone:
    """Build the backbone for ``spec`` and load its weights (``--weights``, hub cache, or timm's own)."""
    path = resolve_weights(spec, weights, random_init)
    use_timm_pretrained = path is None and not random_init
    if use_timm_pretrained:
        timm_name_of(spec)  # an unknown name is the user's mistake, not a download failure
        try:
            model = create_architecture(spec, pretrained=True)
        except FisherscanError:
            raise
        except Exception as error:  # noqa: BLE001 - offline or unknown tag: tell the user what to pass
            raise FisherscanError(
                f"could not get timm's pretrained weights for {spec} ({type(error).__name__}); "
                "pass --weights FILE or --random-init"
            ) from None
    else:
        model = create_architecture(spec)
        if path is not None:
            load_weights(model, path, strict=strict, family=family_of(spec))
    for attribute in ("patch_embed", "blocks", "embed_dim"):
        if not hasattr(model, attribute):
            raise FisherscanError(f"--model {spec}: not a ViT with patch tokens (no {attribute}); use a ViT backbone")
    return Backbone(
        model=model.eval(),
        spec=spec,
        timm_name=timm_name_of(spec),
        weights=str(path) if path is not None else ("timm-pretrained" if use_timm_pretrained else None),
        weights_sha256=sha256_of(path) if path is not None else None,
        random_init=random_init and path is None,
    )
