"""Loading a backbone's weights from the files users actually have, without executing code.

Weights come from ``--weights FILE`` (the official file, or timm's safetensors), else from the torch hub cache
under the official file name. The file is read as safetensors, with ``torch.load(weights_only=True)``, or, for
OpenAI CLIP's TorchScript archive, by ``fisherscan.models.torchscript``; nested ``model``/``module``/
``state_dict``/``model_ema`` dicts are unwrapped. The family's ``convert`` (``families``) runs first, then timm's
own checkpoint filter function for the architecture (DINOv2, EVA02, CLIP's ``visual.`` names and fused
in-projection, SAM's ``image_encoder.`` prefix), then the parts the backbone is built without (a classifier
``head.``, SAM's ``neck.``) are dropped, and the result loads strictly: keys missing or unexpected are a one-line
error.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import FisherscanError
from .families import FAMILIES
from .registry import REGISTRY, base_name, hub_checkpoint_dir
from .torchscript import is_torchscript_archive, read_torchscript_tensors


def resolve_weights(spec: str, weights: Path | None, random_init: bool) -> Path | None:
    """The checkpoint file to load for ``spec``, or None for an untrained backbone (``--random-init``)."""
    if weights is not None:
        if not Path(weights).is_file():
            raise FisherscanError(f"--weights {weights}: no such file; pass the path of a .pth or .safetensors "
                                  "checkpoint")
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
    A TorchScript archive (OpenAI CLIP) is read by ``fisherscan.models.torchscript``: its tensors by attribute
    path."""
    path = Path(path)
    try:
        if path.suffix == ".safetensors":
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


def checkpoint_filter(model: nn.Module):
    """timm's checkpoint filter function for the model's architecture family (converts official formats)."""
    module = sys.modules[type(model).__module__]
    return getattr(module, "checkpoint_filter_fn", None)


def convert_state_dict(state: dict[str, torch.Tensor], model: nn.Module, family: str = "vit"
                       ) -> dict[str, torch.Tensor]:
    """An official or timm state dict in the model's own key layout (a pure function): the family's ``convert``,
    then timm's filter, then the parts the backbone is built without (classifier ``head.``, SAM's ``neck.``)
    dropped."""
    state = FAMILIES[family].convert(dict(state))  # a copy: timm's converters pop keys from their input
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
