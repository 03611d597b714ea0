"""The segmentation model whose Fisher information is scored: a ViT backbone plus a decoder head.

``Segmenter(x)`` returns logits (B, classes, h, w); losses upsample them bilinearly to the label size.

- ``linear``: normalises each patch token of the last block (LayerNorm) and applies a 1x1 classifier, on the patch
  grid -- the smallest head that makes the backbone's features a segmentation model.
- ``multilevel``: patch tokens of 4 evenly spaced blocks, a simple feature pyramid (strides 4, 8, 16, 32 for
  patch 16: x4, x2, x1, x0.5 of the patch grid, as ViTDet/Rein), each projected to 128 channels, upsampled to the
  finest level and summed, then a 3x3 conv + GroupNorm + GELU fusion and a 1x1 classifier; logits at 4x the grid.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import FisherscanError
from .models import patch_tokens

DECODERS = ("linear", "multilevel")


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

    def __init__(self, backbone: nn.Module, num_classes: int = 19, decoder: str = "linear"):
        super().__init__()
        if decoder not in DECODERS:
            raise FisherscanError(f"--decoder {decoder}: unknown decoder; use one of {', '.join(DECODERS)}")
        self.backbone = backbone
        self.decoder_name = decoder
        if decoder == "linear":
            self.decoder = LinearDecoder(backbone.embed_dim, num_classes)
        else:
            if not hasattr(backbone, "forward_intermediates"):
                raise FisherscanError("--decoder multilevel needs a timm backbone with forward_intermediates")
            self.decoder = MultiLevelDecoder(backbone.embed_dim, num_classes, evenly_spaced_blocks(len(backbone.blocks)))

    @property
    def patch_size(self) -> int:
        size = self.backbone.patch_embed.patch_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def features(self, x: torch.Tensor) -> tuple:
        """What the decoder reads: (patch tokens (B, N, D) of the last block after the final norm, grid (h, w))
        for ``linear`` (``models.patch_tokens``: per family); (list of 4 block maps (B, D, h, w),) for
        ``multilevel``."""
        if self.decoder_name == "multilevel":
            return (self.backbone.forward_intermediates(x, indices=self.decoder.blocks, intermediates_only=True),)
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        return patch_tokens(self.backbone, x), grid

    def decode(self, features: tuple) -> torch.Tensor:
        """The decoder on ``features(x)`` computed elsewhere (e.g. without gradients, in bf16): fp32 logits."""
        def as_float(value):
            if isinstance(value, torch.Tensor):
                return value.float()
            return [as_float(v) for v in value] if isinstance(value, list) else value

        return self.decoder(*(as_float(f) for f in features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.decoder(*self.features(x))


def head_path_for(scores_path: Path) -> Path:
    """Where ``score`` saves the warmed-up head: beside the scores, ``<stem>.head.safetensors``."""
    scores_path = Path(scores_path)
    return scores_path.with_name(scores_path.name.removesuffix(".safetensors") + ".head.safetensors")


def save_head(path: Path, segmenter: Segmenter, metadata: dict) -> None:
    from .scores import atomic_target

    tensors = {k: v.detach().cpu().contiguous() for k, v in segmenter.decoder.state_dict().items()}
    info = {"decoder": segmenter.decoder_name, **metadata}
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
    segmenter.decoder.load_state_dict(tensors)
    return info
