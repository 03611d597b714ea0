"""The backbone: the timm architecture of a model spec, adapted to its family, with its weights loaded.

Input size (``docs/method.md``): the backbone keeps its native patch size and is built
with timm's ``dynamic_img_size``, so position embeddings are interpolated at run time for any padded crop and the
parameters keep their official shapes (SAM resizes its table per call by itself).
"""

from __future__ import annotations

import contextlib
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import timm
import torch
from timm.layers import weight_init
from torch import nn

from ..errors import FisherscanError
from .checkpoints import load_weights, resolve_weights, weights_sha256
from .families import FAMILIES, ModelEntry
from .groups import candidate_count
from .registry import REGISTRY, family_of, hub_checkpoint_dir, timm_kwargs_of, timm_name_of


def create_architecture(spec: str, pretrained: bool = False) -> nn.Module:
    """The timm model for ``spec`` with no classifier head and run-time position-embedding interpolation (SAM
    resizes its position table per call by itself), adapted to its family (``Family.adapt``)."""
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
    FAMILIES[family_of(spec)].adapt(model, pretrained)
    return model


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
    """A loaded backbone and what the scores metadata needs to know about where it came from (``source``: the
    format, path and files of the weights, ``hf.Source.record``)."""

    model: nn.Module
    spec: str
    timm_name: str
    weights: str | None
    weights_sha256: str | None
    random_init: bool
    source: dict = field(default_factory=dict)

    @property
    def patch_size(self) -> int:
        size = self.model.patch_embed.patch_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)


def build_backbone(spec: str, *, weights: Path | None = None, random_init: bool = False,
                   strict: bool = True) -> Backbone:
    """Build the backbone for ``spec`` and load its weights (``--weights`` file or Hugging Face folder, the torch
    hub cache, a hub id's snapshot in the Hugging Face cache, or timm's own)."""
    path = resolve_weights(spec, weights, random_init)
    source = {"format": "timm-pretrained" if path is None and not random_init else "none"}
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
            source = load_weights(model, path, strict=strict, family=family_of(spec), spec=spec)
    for attribute in ("patch_embed", "blocks", "embed_dim"):
        if not hasattr(model, attribute):
            raise FisherscanError(f"--model {spec}: not a ViT with patch tokens (no {attribute}); use a ViT backbone")
    return Backbone(
        model=model.eval(),
        spec=spec,
        timm_name=timm_name_of(spec),
        weights=str(path) if path is not None else ("timm-pretrained" if use_timm_pretrained else None),
        weights_sha256=weights_sha256(path) if path is not None else None,
        random_init=random_init and path is None,
        source=source,
    )
