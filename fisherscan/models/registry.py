"""The registry of backbone names: a short name of one of the paper's five families, ``timm:<name>``, or a
Hugging Face hub id in the local cache.

A model spec is a short name (``dinov2_vitl14``, ``eva02_vitl14``, ``clip_vitl14``, ``sam_vith16``,
``mae_vith14``...; ``fisherscan models`` lists them) mapped to a timm architecture and its official checkpoint
file by the family records (``fisherscan.models.families``), ``timm:<name>`` for any timm ViT, or a hub id
(``facebook/dinov2-large``, ``timm/vit_large_patch14_dinov2.lvd142m``) whose cached ``config.json`` describes the
architecture (``fisherscan.models.hf``; it stands for the ``timm:`` spec of that config). Any may end in
``?key=value&...``: extra ``timm.create_model`` arguments (``sam_vitb16?depth=2``).
"""

from __future__ import annotations

import ast
from pathlib import Path
from urllib.parse import parse_qsl

import torch

from ..errors import FisherscanError
from . import hf
from .families import FAMILIES, REGISTRY_ORDER, Family, ModelEntry, family_of_timm_name

REGISTRY: dict[str, ModelEntry] = {entry.name: entry for family in REGISTRY_ORDER
                                   for entry in FAMILIES[family].checkpoints}


def hub_checkpoint_dir() -> Path:
    """Where torch hub caches checkpoints: ``$TORCH_HOME/hub/checkpoints``."""
    return Path(torch.hub.get_dir()) / "checkpoints"


def base_name(spec: str) -> str:
    """The spec without its ``?key=value`` arguments: a short name or ``timm:<name>``."""
    return spec.split("?", 1)[0]


def resolved(spec: str) -> str:
    """A hub id's spec as the ``timm:`` spec its cached config.json describes (the spec's own ``?key=value``
    arguments appended, so they win); any other spec unchanged. Reads the cache only."""
    base = base_name(spec)
    if not hf.is_hub_id(base):
        return spec
    derived = hf.timm_spec_of(hf.open_folder(hf.hub_snapshot(base), f"--model {base}"))
    query = spec.split("?", 1)[1] if "?" in spec else ""
    return derived + (("&" if "?" in derived else "?") + query if query else "")


def short_name_for(spec: str) -> str:
    """The registry's short name building the same architecture as a ``timm:<name>`` spec without arguments,
    else the spec itself (for messages)."""
    if spec.startswith("timm:") and "?" not in spec:
        arch = spec[5:].split(".")[0]
        for name, entry in REGISTRY.items():
            if entry.timm_name.split(".")[0] == arch and family_of_timm_name(spec[5:]).name == entry.family:
                return name
    return spec


def timm_name_of(spec: str) -> str:
    """The timm architecture behind a model spec; a clear error for an unknown name."""
    spec = resolved(spec)
    base = base_name(spec)
    if base in REGISTRY:
        return REGISTRY[base].timm_name
    if base.startswith("timm:") and len(base) > 5:
        return base[5:]
    known = ", ".join(REGISTRY)
    raise FisherscanError(f"--model {spec}: unknown model; use one of {known}, timm:<name>[?key=value&...] or a "
                          "Hugging Face hub id in the local cache (facebook/dinov2-large)")


def family_record(spec: str) -> Family:
    """The family record of a spec: a registry name's, else the first family whose ``matches`` takes the timm
    name (``vit`` for any other ViT)."""
    spec = resolved(spec)
    base = base_name(spec)
    if base in REGISTRY:
        return FAMILIES[REGISTRY[base].family]
    return family_of_timm_name(timm_name_of(spec))


def family_of(spec: str) -> str:
    """dinov2, eva02, clip, sam, mae, or vit."""
    return family_record(spec).name


def query_kwargs(query: str) -> dict:
    """``key=value&...`` as a dict, values read as Python literals where they parse (else kept as text)."""
    kwargs = {}
    for key, text in parse_qsl(query, keep_blank_values=True, strict_parsing=False):
        try:
            kwargs[key] = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            kwargs[key] = text
    return kwargs


def timm_kwargs_of(spec: str) -> dict:
    """Extra ``timm.create_model`` arguments of a ``<name>?key=value&...`` spec (values read as Python
    literals where they parse, e.g. ``timm:vit_small_patch14_dinov2?init_values=1.0``, ``sam_vitb16?depth=2``)."""
    spec = resolved(spec)
    if "?" not in spec:
        return {}
    return query_kwargs(spec.split("?", 1)[1])
