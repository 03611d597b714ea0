"""Loading a backbone's weights from the files users actually have, without executing code.

Weights come from ``--weights FILE`` (the official file, timm's safetensors, a transformers ``model.safetensors``)
or ``--weights FOLDER`` (a Hugging Face model folder, ``fisherscan.models.hf``), else from the torch hub cache
under the official file name, or for a hub id from its snapshot in the Hugging Face cache. A file is read as
safetensors, with ``torch.load(weights_only=True)``, or, for OpenAI CLIP's TorchScript archive, by
``fisherscan.models.torchscript``; nested ``model``/``module``/``state_dict``/``model_ema`` dicts are unwrapped.
Tensors in a transformers layout (found by their names) are renamed to timm's by the family's ``HFFormat`` after
the config (if any) is checked against the built model. The family's ``convert`` (``families``) runs next, then
timm's own checkpoint filter function for the architecture (DINOv2, EVA02, CLIP's ``visual.`` names and fused
in-projection, SAM's ``image_encoder.`` prefix), then the parts the backbone is built without (a classifier
``head.``, SAM's ``neck.``) are dropped, and the result loads strictly: keys missing or unexpected are a one-line
error.
"""

from __future__ import annotations

import hashlib
import sys
from dataclasses import replace
from pathlib import Path

import torch
from safetensors.torch import load_file
from torch import nn

from ..errors import FisherscanError
from ..io import sha256_of
from . import hf
from .families import FAMILIES
from .hf_formats import detect_layout, to_timm
from .registry import REGISTRY, base_name, hub_checkpoint_dir, short_name_for
from .torchscript import is_torchscript_archive, read_torchscript_tensors


def resolve_weights(spec: str, weights: Path | None, random_init: bool) -> Path | None:
    """The checkpoint file or Hugging Face folder to load for ``spec``, or None for an untrained backbone
    (``--random-init``) or timm's own weights (``timm:<name>``)."""
    if weights is not None:
        if not Path(weights).exists():
            raise FisherscanError(f"--weights {weights}: no such file or folder; pass the path of a .pth or "
                                  ".safetensors checkpoint or of a Hugging Face model folder")
        return Path(weights)
    if random_init:
        return None
    if hf.is_hub_id(base_name(spec)):
        return hf.hub_snapshot(base_name(spec))
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


def weights_sha256(path: Path) -> str:
    """sha256 of a checkpoint file; of a Hugging Face folder, over the names and sha256s of its config, index and
    weight files."""
    path = Path(path)
    if not path.is_dir():
        return sha256_of(path)
    digest = hashlib.sha256()
    for file in hf.open_folder(path).digest_files():
        digest.update(f"{file.name}\0{sha256_of(file)}\n".encode())
    return digest.hexdigest()


def read_weights(path: Path, source: hf.Source | None = None) -> tuple[dict[str, torch.Tensor], hf.Source]:
    """The tensors of a checkpoint file or Hugging Face folder (``source``: the folder, opened already), and where
    they came from (the transformers layout and its prefix, if the names are in one). A shard index naming
    tensors its shards lack is an error."""
    path = Path(path)
    if source is None:
        source = hf.open_folder(path) if path.is_dir() else hf.Source("checkpoint", path, (path,))
    state = {}
    for file in source.files:
        state.update(read_state_dict(file))
    absent = sorted(source.indexed - set(state))
    if absent:
        raise FisherscanError(f"--weights {path}: {len(absent)} tensors listed in {hf.INDEX} are in none of its "
                              f"shards ({', '.join(absent[:3])}); download the folder again")
    found = detect_layout(state) if source.format != "timm" else None
    if found is not None:
        layout, prefix = found
        config = source.config if source.config is not None else hf.sibling_config(path)
        source = replace(source, format="transformers", config=config, layout=layout.name, prefix=prefix)
    return state, source


def check_source(source: hf.Source, model: nn.Module, family: str, spec: str | None) -> None:
    """A transformers source's family (its config's, else its names' layout) and its config's sizes must be
    ``--model``'s: one-line errors naming both (and the ``--model`` that fits)."""
    wanted, config = spec or family, source.config
    fmt = FAMILIES[family].transformers
    held_family = config.family if config is not None else source.layout
    fits = fmt is not None and (family == held_family if config is not None else fmt.layout.name == source.layout)
    if not fits:
        held = config.architecture if config is not None else f"transformers {source.layout} layout"
        raise FisherscanError(f"--weights {source.path} holds a {held} ({held_family}), but --model {wanted} is "
                              f"{FAMILIES[family].label}; pass the matching --model")
    differ = hf.mismatches(config, model) if config is not None else []
    if differ:
        suggestion = short_name_for(fmt.timm_spec(config))
        raise FisherscanError(f"--weights {source.path} holds a {config.architecture} that --model {wanted} does "
                              f"not match ({', '.join(differ)}: config/model); pass --model {suggestion}")


def from_transformers(state: dict[str, torch.Tensor], source: hf.Source, model: nn.Module, family: str,
                      spec: str | None) -> dict[str, torch.Tensor]:
    """A transformers state dict in timm's names (``check_source`` first); the config's LayerNorm eps and image
    statistics are applied to the model."""
    check_source(source, model, family, spec)
    if source.config is not None:
        hf.adapt_to_config(model, source.config, source.folder)
    prefix = source.prefix
    return to_timm({k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)},
                   FAMILIES[family].transformers.layout)


def load_weights(model: nn.Module, path: Path, strict: bool = True, family: str = "vit",
                 spec: str | None = None) -> dict:
    """Load a checkpoint file or Hugging Face folder into ``model``; unexpected or missing keys are a one-line
    error. Returns where the weights came from (``hf.Source.record``, for the metadata). A folder's config is
    checked against ``model`` before any weights are read."""
    folder = hf.open_folder(path) if Path(path).is_dir() else None
    if folder is not None and folder.config is not None:
        check_source(replace(folder, layout=FAMILIES[folder.config.family].transformers.layout.name), model,
                     family, spec)
    state, source = read_weights(path, folder)
    if source.format == "transformers":
        state = from_transformers(state, source, model, family, spec)
    elif source.format == "timm":
        check_timm_folder(source, model, spec)
    state = convert_state_dict(state, model, family)
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
    return source.record()


def check_timm_folder(source: hf.Source, model: nn.Module, spec: str | None) -> None:
    """A timm hub folder's ``architecture`` must be the one ``--model`` builds."""
    arch = str(source.timm_config.get("architecture"))
    built = getattr(model, "pretrained_cfg", {}).get("architecture")
    if built is not None and built != arch:
        raise FisherscanError(f"--weights {source.path} holds timm's {arch}, but --model {spec or built} builds "
                              f"{built}; pass --model timm:{arch}")
