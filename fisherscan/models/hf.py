"""Hugging Face folders and the local Hugging Face cache: what ``--weights FOLDER`` and ``--model org/name`` read.

- A transformers folder: ``config.json`` (its ``model_type`` decides the family and the size, ``hf_formats``) and
  ``model.safetensors``, or the shards ``model-0000x-of-0000y.safetensors`` that ``model.safetensors.index.json``
  lists (every one must be there), or a ``pytorch_model.bin`` (read with ``torch.load(weights_only=True)``).
- A timm folder (timm's own hub repositories, ``timm/<name>``): ``config.json`` with ``architecture`` and
  ``model.safetensors`` in timm's names.
- A bare transformers ``model.safetensors``: recognised by its names; a transformers ``config.json`` beside it is
  read too.
- A hub id is looked up in the cache only (``$HF_HUB_CACHE``, else ``$HF_HOME/hub``, else
  ``~/.cache/huggingface/hub``): ``models--<org>--<name>/snapshots/<revision>/``, the revision named by
  ``refs/main`` (or the only snapshot). Nothing is downloaded.

Nothing here unpickles: configs are JSON, weights are read by ``fisherscan.models.checkpoints``.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass
from pathlib import Path

import torch
from timm.layers.mlp import GluMlp
from torch import nn

from ..errors import FisherscanError
from .families import FAMILIES
from .hf_formats import HF_FORMATS, VisionConfig, read_vision_config, to_transformers

INDEX = "model.safetensors.index.json"
WEIGHT_FILES = ("model.safetensors", "pytorch_model.bin")
HUB_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


@dataclass(frozen=True)
class Source:
    """Where a backbone's weights come from. ``format``: ``transformers``, ``timm`` (a timm hub folder) or
    ``checkpoint`` (one file in an official or timm layout); ``indexed``: the names a shard index lists."""

    format: str
    path: Path
    files: tuple[Path, ...]
    config: VisionConfig | None = None
    timm_config: dict | None = None
    indexed: frozenset[str] = frozenset()
    layout: str | None = None
    prefix: str = ""

    @property
    def folder(self) -> Path | None:
        return self.path if self.path.is_dir() else None

    def digest_files(self) -> list[Path]:
        """The files whose bytes are the weights: config.json, the shard index and the weight files."""
        folder = self.folder
        names = () if folder is None else ("config.json", INDEX)
        return [folder / name for name in names if (folder / name).is_file()] + list(self.files)

    def record(self) -> dict:
        """The scores metadata's ``weights_source``."""
        out = {"format": self.format, "path": str(self.path), "files": [f.name for f in self.files]}
        if self.config is not None:
            out.update(architecture=self.config.architecture, model_type=self.config.model_type,
                       family=self.config.family)
        if self.layout is not None:
            out.update(layout=self.layout, prefix=self.prefix)
        if self.timm_config is not None:
            out["architecture"] = self.timm_config.get("architecture")
        return out


def read_json(path: Path, what: str) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise FisherscanError(f"{what}: cannot read {path} ({type(error).__name__}); download the folder "
                              "again") from None
    if not isinstance(data, dict):
        raise FisherscanError(f"{what}: {path} is not a JSON object; download the folder again")
    return data


def _weight_files(folder: Path, what: str) -> tuple[tuple[Path, ...], frozenset[str]]:
    """The weight files of a transformers folder (shards of the index, else one file) and the names indexed."""
    if (folder / INDEX).is_file():
        weight_map = read_json(folder / INDEX, what).get("weight_map")
        if not isinstance(weight_map, dict) or not weight_map:
            raise FisherscanError(f"{what}: {folder / INDEX} has no weight_map; download the folder again")
        shards = sorted(set(weight_map.values()))
        missing = [name for name in shards if not (folder / name).is_file()]
        if missing:
            raise FisherscanError(f"{what}: shard {missing[0]} listed in {INDEX} is missing from {folder} "
                                  f"({len(missing)} of {len(shards)} missing); download the folder again")
        return tuple(folder / name for name in shards), frozenset(weight_map)
    for name in WEIGHT_FILES:
        if (folder / name).is_file():
            return (folder / name,), frozenset()
    raise FisherscanError(f"{what}: {folder} has config.json but no model.safetensors (nor {INDEX} with its "
                          "shards); download the weights too")


def open_folder(folder: Path, what: str = "--weights") -> Source:
    """The ``Source`` of a Hugging Face model folder (transformers or timm); one-line errors for a folder without
    config.json, a config of another architecture, a missing shard."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FisherscanError(f"{what} {folder}: a folder without config.json; pass a Hugging Face model folder "
                              "(config.json + model.safetensors) or a checkpoint file")
    config = read_json(folder / "config.json", what)
    if "architecture" in config and "model_type" not in config:  # timm's hub format
        for name in WEIGHT_FILES:
            if (folder / name).is_file():
                return Source("timm", folder, (folder / name,), timm_config=config)
        raise FisherscanError(f"{what}: {folder} has a timm config.json but no model.safetensors; download the "
                              "weights too")
    vision = read_vision_config(config, f"{what} {folder / 'config.json'}")
    files, indexed = _weight_files(folder, what)
    return Source("transformers", folder, files, vision, indexed=indexed)


def sibling_config(path: Path) -> VisionConfig | None:
    """The transformers config.json beside a bare weights file, if there is one."""
    config = Path(path).parent / "config.json"
    if not config.is_file():
        return None
    data = read_json(config, f"--weights {path}")
    return read_vision_config(data, str(config)) if "model_type" in data else None


# ---- the architecture a config describes, and whether a built model is it ------------------------------------


def timm_spec_of(source: Source) -> str:
    """The ``timm:<name>[?key=value&...]`` spec of a folder's architecture."""
    if source.timm_config is not None:
        config = source.timm_config
        tag = (config.get("pretrained_cfg") or {}).get("tag")
        args = config.get("model_args") or {}
        query = "&".join(f"{key}={value!r}".replace(" ", "") for key, value in args.items())
        return f"timm:{config['architecture']}" + (f".{tag}" if tag else "") + (f"?{query}" if query else "")
    return HF_FORMATS[source.config.family].timm_spec(source.config)


ACT_NAMES = {"GELU": "gelu", "QuickGELU": "quick_gelu", "GELUTanh": "gelu_tanh", "SiLU": "silu", "ReLU": "relu"}


def describe_model(model: nn.Module) -> dict:
    """The values of a built timm backbone a transformers config must share (``VisionConfig.describe``)."""
    block = model.blocks[0]
    act = "swiglu" if isinstance(block.mlp, GluMlp) else ACT_NAMES.get(type(block.mlp.act).__name__, "other")
    if act == "gelu" and getattr(block.mlp.act, "approximate", "none") == "tanh":
        act = "gelu_tanh"
    values = {"hidden": model.embed_dim, "layers": len(model.blocks), "heads": block.attn.num_heads,
              "patch": model.patch_embed.patch_size[0], "grid": tuple(model.patch_embed.grid_size),
              "registers": getattr(model, "num_reg_tokens", 0), "mlp": block.mlp.fc1.out_features, "act": act,
              "qkv_bias": block.attn.qkv.bias is not None}
    if hasattr(block, "window_size"):
        values["windows"] = tuple(int(b.window_size) for b in model.blocks)
    return values


def mismatches(config: VisionConfig, model: nn.Module) -> list[str]:
    """What differs between a config and a built model, as 'name config/model' strings."""
    own = describe_model(model)
    return [f"{key} {value}/{own[key]}" for key, value in config.describe().items() if own.get(key, value) != value]


def adapt_to_config(model: nn.Module, config: VisionConfig, folder: Path | None) -> None:
    """What a config sets that the timm spec cannot: the LayerNorm eps (transformers' ViT/MAE use 1e-12, timm
    1e-6) and, from the folder's preprocessor_config.json, the image mean and std."""
    for module in model.modules():
        if isinstance(module, nn.LayerNorm):
            module.eps = config.eps
    processor = None if folder is None else Path(folder) / "preprocessor_config.json"
    if processor is not None and processor.is_file():
        data = read_json(processor, f"--weights {folder}")
        if data.get("image_mean") and data.get("image_std"):
            model.pretrained_cfg = {**getattr(model, "pretrained_cfg", {}), "mean": tuple(data["image_mean"]),
                                    "std": tuple(data["image_std"])}


# ---- the local Hugging Face cache -------------------------------------------------------------------------


def is_hub_id(name: str) -> bool:
    return not name.startswith("timm:") and HUB_ID.fullmatch(name) is not None


def hub_cache_dir() -> Path:
    """huggingface_hub's cache folder, read from the environment at call time."""
    for variable in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE"):
        if os.environ.get(variable):
            return Path(os.environ[variable]).expanduser()
    home = os.environ.get("HF_HOME") or os.path.join(os.environ.get("XDG_CACHE_HOME") or "~/.cache", "huggingface")
    return Path(home).expanduser() / "hub"


def hub_snapshot(repo_id: str) -> Path:
    """The cached snapshot folder of ``repo_id`` (``refs/main``'s revision, or the only one); never downloads."""
    repo = hub_cache_dir() / ("models--" + repo_id.replace("/", "--"))
    snapshots = repo / "snapshots"
    ref = repo / "refs" / "main"
    folder = None
    if ref.is_file():
        folder = snapshots / ref.read_text().strip()
    elif snapshots.is_dir() and len(found := [p for p in snapshots.iterdir() if p.is_dir()]) == 1:
        folder = found[0]
    if folder is None or not (folder / "config.json").is_file():
        raise FisherscanError(f"--model {repo_id}: not in the Hugging Face cache ({repo}); fetch it on a machine "
                              f"with a network with 'hf download {repo_id}' and copy that folder here (or point "
                              "HF_HUB_CACHE at a copy of the cache)")
    return folder


# ---- masks under the transformers names -----------------------------------------------------------------------


def transformers_names(tensors: dict[str, torch.Tensor], family: str, source: dict | None
                       ) -> tuple[dict[str, torch.Tensor], dict]:
    """timm-named backbone tensors under the names of the transformers checkpoint the scores came from (its
    prefix), or of the family's usual transformers model for scores of other files; (tensors, what was used)."""
    source = source or {}
    fmt = FAMILIES[family].transformers
    if fmt is None:
        raise FisherscanError(f"--format hf: {FAMILIES[family].label} has no transformers implementation; use "
                              "--format timm")
    if source.get("format") == "transformers":
        architecture, prefix = source.get("architecture", fmt.architecture), source.get("prefix", fmt.prefix)
    else:
        registers = "reg_token" in tensors
        architecture = "Dinov2WithRegistersModel" if family == "dinov2" and registers else fmt.architecture
        prefix = fmt.prefix
    return to_transformers(tensors, fmt.layout, prefix), {"architecture": architecture, "prefix": prefix}
