"""The segmentation model whose Fisher information is scored: a ViT backbone plus a decoder head.

``Segmenter(x)`` returns logits (B, classes, h, w); losses upsample them bilinearly to the label size.

- ``linear``: normalises each patch token of the last block (LayerNorm) and applies a 1x1 classifier, on the patch
  grid -- the smallest head that makes the backbone's features a segmentation model.
- ``multilevel``: patch tokens of 4 evenly spaced blocks, a simple feature pyramid (strides 4, 8, 16, 32 for
  patch 16: x4, x2, x1, x0.5 of the patch grid, as ViTDet/Rein), each projected to 128 channels, upsampled to the
  finest level and summed, then a 3x3 conv + GroupNorm + GELU fusion and a 1x1 classifier; logits at 4x the grid.
- ``mask2former``: the paper's (Rein's) head, ``fisherscan.mask2former``; its "logits" are per-pixel
  log-likelihoods log(s_c / sum_c s_c) at the input size, and it trains with the matched set loss.
  ``mask2former?num_queries=4&...`` changes head options (``fisherscan.mask2former.OPTIONS``).

``training_loss(x, y)`` (or ``forward(x, y)``, so DistributedDataParallel sees it) is the decoder's training
loss: the mean pixel cross-entropy (Eq. 1) for ``linear``/``multilevel``, the matched set loss for ``mask2former``.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .data import IGNORE_INDEX
from .errors import FisherscanError
from .fisher import upsample_logits
from .models import patch_tokens, query_kwargs

DECODERS = ("linear", "multilevel", "mask2former")


def decoder_spec(spec: str) -> tuple[str, dict]:
    """``name[?key=value&...]`` -> (name, options); options only for ``mask2former``."""
    name, _, query = spec.partition("?")
    if name not in DECODERS:
        raise FisherscanError(f"--decoder {spec}: unknown decoder; use one of {', '.join(DECODERS)}")
    options = query_kwargs(query) if query else {}
    if options and name != "mask2former":
        raise FisherscanError(f"--decoder {spec}: only mask2former takes options")
    return name, options


class LinearDecoder(nn.Module):
    """Per-token LayerNorm + 1x1 classifier over patch tokens (B, N, D) -> logits (B, classes, h, w)."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        logits = self.classifier(self.norm(patch_tokens))
        return logits.transpose(1, 2).reshape(logits.shape[0], -1, *grid)


def evenly_spaced_blocks(depth: int, count: int = 4) -> list[int]:
    """Block indices at the ends of ``count`` equal stages: depth 12 -> [2, 5, 8, 11], 24 -> [5, 11, 17, 23]."""
    return [depth * (i + 1) // count - 1 for i in range(count)]


class MultiLevelDecoder(nn.Module):
    """A simple feature pyramid over 4 blocks' patch-token maps and a light fusion head."""

    def __init__(self, embed_dim: int, num_classes: int, blocks: list[int], channels: int = 128):
        super().__init__()
        self.blocks = list(blocks)
        self.resample = nn.ModuleList([
            nn.Sequential(nn.ConvTranspose2d(embed_dim, embed_dim, 2, stride=2), nn.GELU(),
                          nn.ConvTranspose2d(embed_dim, channels, 2, stride=2)),  # x4
            nn.ConvTranspose2d(embed_dim, channels, 2, stride=2),  # x2
            nn.Conv2d(embed_dim, channels, 1),  # x1
            nn.Sequential(nn.MaxPool2d(2, ceil_mode=True), nn.Conv2d(embed_dim, channels, 1)),  # x0.5
        ])
        self.fuse = nn.Sequential(nn.Conv2d(channels, channels, 3, padding=1), nn.GroupNorm(8, channels), nn.GELU())
        self.classifier = nn.Conv2d(channels, num_classes, 1)

    def forward(self, maps: list[torch.Tensor]) -> torch.Tensor:
        levels = [resample(m) for resample, m in zip(self.resample, maps)]
        size = levels[0].shape[-2:]
        fused = sum(nn.functional.interpolate(level, size=size, mode="bilinear", align_corners=False)
                    if level.shape[-2:] != size else level for level in levels)
        return self.classifier(self.fuse(fused))


class Segmenter(nn.Module):
    """Backbone + decoder. The input's sides must be multiples of the patch size (the data pipeline pads)."""

    def __init__(self, backbone: nn.Module, num_classes: int = 19, decoder: str = "linear",
                 feature_blocks: list[int] | None = None):
        super().__init__()
        name, options = decoder_spec(decoder)
        self.backbone = backbone
        self.decoder_name, self.decoder_spec = name, decoder
        if name == "linear":
            self.decoder = LinearDecoder(backbone.embed_dim, num_classes)
            return
        if not hasattr(backbone, "forward_intermediates"):
            raise FisherscanError(f"--decoder {name} needs a timm backbone with forward_intermediates")
        depth = len(backbone.blocks)
        if feature_blocks is not None and (len(feature_blocks) != 4 or not all(0 <= b < depth for b in feature_blocks)):
            raise FisherscanError(f"--feature-blocks {','.join(map(str, feature_blocks))}: give 4 block indices "
                                  f"in 0..{depth - 1}")
        if name == "multilevel":
            blocks = list(feature_blocks) if feature_blocks is not None else evenly_spaced_blocks(depth)
            self.decoder = MultiLevelDecoder(backbone.embed_dim, num_classes, blocks)
        else:
            from .mask2former import Mask2FormerDecoder, feature_blocks as rein_blocks

            blocks = list(feature_blocks) if feature_blocks is not None else rein_blocks(depth)
            self.decoder = Mask2FormerDecoder(backbone.embed_dim, num_classes, blocks, **options)

    @property
    def patch_size(self) -> int:
        size = self.backbone.patch_embed.patch_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def features(self, x: torch.Tensor) -> tuple:
        """What the decoder reads: (patch tokens (B, N, D) of the last block after the final norm, grid (h, w))
        for ``linear`` (``models.patch_tokens``: per family); (list of 4 block maps (B, D, h, w),) for
        ``multilevel``; (the 4 maps, input size (H, W)) for ``mask2former``."""
        if self.decoder_name != "linear":
            maps = self.backbone.forward_intermediates(x, indices=self.decoder.blocks, intermediates_only=True)
            return (maps,) if self.decoder_name == "multilevel" else (maps, tuple(x.shape[-2:]))
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return patch_tokens(self.backbone, x), grid

    def decode(self, features: tuple) -> torch.Tensor:
        """The decoder on ``features(x)`` computed elsewhere (e.g. without gradients, in bf16): fp32 logits."""
        return self.decoder(*float_features(features))

    def loss(self, features: tuple, labels: torch.Tensor) -> torch.Tensor:
        """The training loss on ``features(x)``: the decoder runs in the caller's autocast context, the loss in
        fp32 -- mean pixel cross-entropy of the logits upsampled to the label size (Eq. 1), or the matched set loss."""
        if self.decoder_name == "mask2former":
            return self.decoder.matched_loss(*features, labels)
        logits = self.decoder(*features)
        with torch.autocast(labels.device.type, enabled=False):
            return nn.functional.cross_entropy(upsample_logits(logits.float(), tuple(labels.shape[-2:])), labels,
                                               ignore_index=IGNORE_INDEX)

    def training_loss(self, x: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        return self.loss(self.features(x), labels)

    def forward(self, x: torch.Tensor, labels: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (B, classes, h, w); with ``labels`` (B, H, W), the training loss instead."""
        features = self.features(x)
        return self.decoder(*features) if labels is None else self.loss(features, labels)


def float_features(features: tuple) -> tuple:
    """``features(x)`` with every tensor (also inside lists) as fp32."""
    def as_float(value):
        if isinstance(value, torch.Tensor):
            return value.float()
        return [as_float(v) for v in value] if isinstance(value, list) else value

    return tuple(as_float(f) for f in features)


def head_path_for(scores_path: Path) -> Path:
    """Where ``score`` saves the warmed-up head: beside the scores, ``<stem>.head.safetensors``."""
    scores_path = Path(scores_path)
    return scores_path.with_name(scores_path.name.removesuffix(".safetensors") + ".head.safetensors")


def save_head(path: Path, segmenter: Segmenter, metadata: dict) -> None:
    from .scores import atomic_target

    tensors = {k: v.detach().cpu().contiguous() for k, v in segmenter.decoder.state_dict().items()}
    info = {"decoder": segmenter.decoder_name, "decoder_spec": segmenter.decoder_spec,
            "feature_blocks": getattr(segmenter.decoder, "blocks", None), **metadata}
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata={"fisherscan_head": json.dumps(info)})


def load_head(path: Path, segmenter: Segmenter) -> dict:
    """Load a head saved by ``save_head`` into ``segmenter.decoder``; returns its metadata."""
    path = Path(path)
    if not path.is_file():
        raise FisherscanError(f"--head {path}: no such file; pass a head saved by 'fisherscan score'")
    try:
        from safetensors import safe_open

        with safe_open(str(path), "pt") as handle:
            info = json.loads((handle.metadata() or {}).get("fisherscan_head", "{}"))
        tensors = load_file(str(path))
    except Exception as error:  # noqa: BLE001
        raise FisherscanError(f"--head {path}: not a readable safetensors head ({type(error).__name__})") from None
    own = segmenter.decoder.state_dict()
    if set(tensors) != set(own) or any(tensors[k].shape != own[k].shape for k in own):
        raise FisherscanError(
            f"--head {path} does not fit this model's {segmenter.decoder_name} decoder "
            f"(saved for {info.get('model', 'another model')}); score again without --head"
        )
    blocks = getattr(segmenter.decoder, "blocks", None)
    if info.get("feature_blocks") is not None and blocks is not None and list(info["feature_blocks"]) != list(blocks):
        saved = ",".join(map(str, info["feature_blocks"]))
        raise FisherscanError(f"--head {path} was trained on blocks {saved}, this model reads "
                              f"{','.join(map(str, blocks))}; pass --feature-blocks {saved} or score again")
    segmenter.decoder.load_state_dict(tensors)
    return info
