"""One registry of backbone names, and loading their weights from the files users actually have.

A model spec is either a short hub name (``dinov2_vitl14``) mapped to a timm architecture, or
``timm:<name>`` for any timm model. Weights come from ``--weights FILE`` (the official file, or timm's
safetensors), else from the torch hub cache under the official file name. Official key layouts are converted
by timm's own checkpoint filter function for the architecture (``_convert_dinov2`` for DINOv2), loaded
strictly, and read safely (safetensors, or ``torch.load(weights_only=True)``).

Input size (FISHERTUNE.md): the backbone keeps its native patch size and is built with timm's
``dynamic_img_size``, so position embeddings are interpolated at run time for any padded crop and the
parameters keep their official shapes.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import dataclass
from pathlib import Path

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


def _dinov2(size: str, timm_size: str, registers: bool) -> ModelEntry:
    name = f"dinov2_vit{size}14" + ("_reg" if registers else "")
    stem = f"dinov2_vit{size}14" + ("_reg4" if registers else "")
    return ModelEntry(
        name=name,
        timm_name=f"vit_{timm_size}_patch14" + ("_reg4" if registers else "") + "_dinov2",
        official_file=f"{stem}_pretrain.pth",
        url=f"https://dl.fbaipublicfiles.com/dinov2/dinov2_vit{size}14/{stem}_pretrain.pth",
    )


REGISTRY: dict[str, ModelEntry] = {
    entry.name: entry
    for size, timm_size in (("s", "small"), ("b", "base"), ("l", "large"), ("g", "giant"))
    for entry in (_dinov2(size, timm_size, False), _dinov2(size, timm_size, True))
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
    entry = REGISTRY.get(spec)
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
    """Tensors of a checkpoint file, read without executing code; unwraps ``model``/``module``/``state_dict``."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
            from safetensors.torch import load_file

            state = load_file(str(path))
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


def timm_name_of(spec: str) -> str:
    """The timm architecture behind a model spec; a clear error for an unknown name."""
    if spec in REGISTRY:
        return REGISTRY[spec].timm_name
    if spec.startswith("timm:") and len(spec) > 5:
        return spec[5:].split("?")[0]
    known = ", ".join(sorted(REGISTRY))
    raise FisherscanError(f"--model {spec}: unknown model; use one of {known} or timm:<name>[?key=value&...]")


def timm_kwargs_of(spec: str) -> dict:
    """Extra ``timm.create_model`` arguments of a ``timm:<name>?key=value&...`` spec (values read as Python
    literals where they parse, e.g. ``timm:vit_small_patch14_dinov2?init_values=1.0``)."""
    if not spec.startswith("timm:") or "?" not in spec:
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
    """The timm model for ``spec`` with no classifier head and run-time position-embedding interpolation."""
    import timm

    name, extra = timm_name_of(spec), timm_kwargs_of(spec)
    if not timm.is_model(name.split(".")[0]):
        raise FisherscanError(f"--model {spec}: timm has no model {name}; see timm.list_models()")
    try:
        return timm.create_model(name, pretrained=pretrained, num_classes=0, dynamic_img_size=True, **extra)
    except TypeError as error:
        if extra and "dynamic_img_size" not in str(error):
            raise FisherscanError(f"--model {spec}: timm's {name} does not take these arguments ({error})") from None
        return timm.create_model(name, pretrained=pretrained, num_classes=0, **extra)  # no dynamic_img_size option


def checkpoint_filter(model: nn.Module):
    """timm's checkpoint filter function for the model's architecture family (converts official formats)."""
    module = sys.modules[type(model).__module__]
    return getattr(module, "checkpoint_filter_fn", None)


def convert_state_dict(state: dict[str, torch.Tensor], model: nn.Module) -> dict[str, torch.Tensor]:
    """An official or timm state dict in the model's own key layout (timm's filter; a pure function)."""
    filter_fn = checkpoint_filter(model)
    state = dict(state)  # timm's converters pop keys from their input
    if filter_fn is not None:
        state = filter_fn(state, model)
    return state


def load_weights(model: nn.Module, path: Path, strict: bool = True) -> None:
    """Load a checkpoint file into ``model``; unexpected or missing keys are a one-line error."""
    state = convert_state_dict(read_state_dict(path), model)
    if not any(key in state for key in model.state_dict()):
        raise FisherscanError(f"{path} shares no parameter names with this model; is it the right checkpoint?")
    own = model.state_dict()
    if not any(key.startswith("head.") for key in own):  # built head-free: a checkpoint's classifier is not ours
        state = {k: v for k, v in state.items() if not k.startswith("head.")}
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
            load_weights(model, path, strict=strict)
    for attribute in ("patch_embed", "blocks", "num_prefix_tokens", "embed_dim"):
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
