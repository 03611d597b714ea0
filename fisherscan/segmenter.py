"""The segmentation model whose Fisher information is scored: a ViT backbone plus a decoder head.

``Segmenter(x)`` returns logits (B, classes, h, w) on the patch grid; losses upsample them bilinearly to
the label size. The ``linear`` decoder normalises each patch token of the last block (LayerNorm) and
applies a 1x1 classifier -- the smallest head that makes the backbone's features a segmentation model.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from .errors import FisherscanError

DECODERS = ("linear",)


class LinearDecoder(nn.Module):
    """Per-token LayerNorm + 1x1 classifier over patch tokens (B, N, D) -> logits (B, classes, h, w)."""

    def __init__(self, embed_dim: int, num_classes: int):
        super().__init__()
        self.norm = nn.LayerNorm(embed_dim)
        self.classifier = nn.Linear(embed_dim, num_classes)

    def forward(self, patch_tokens: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        logits = self.classifier(self.norm(patch_tokens))
        return logits.transpose(1, 2).reshape(logits.shape[0], -1, *grid)


class Segmenter(nn.Module):
    """Backbone + decoder. The input's sides must be multiples of the patch size (the data pipeline pads)."""

    def __init__(self, backbone: nn.Module, num_classes: int = 19, decoder: str = "linear"):
        super().__init__()
        if decoder not in DECODERS:
            raise FisherscanError(f"--decoder {decoder}: unknown decoder; use one of {', '.join(DECODERS)}")
        self.backbone = backbone
        self.decoder_name = decoder
        self.decoder = LinearDecoder(backbone.embed_dim, num_classes)

    @property
    def patch_size(self) -> int:
        size = self.backbone.patch_embed.patch_size
        return int(size[0] if isinstance(size, (tuple, list)) else size)

    def features(self, x: torch.Tensor) -> tuple[torch.Tensor, tuple[int, int]]:
        """Patch tokens (B, N, D) of the last block (after the final norm) and their grid (h, w)."""
        grid = (x.shape[-2] // self.patch_size, x.shape[-1] // self.patch_size)
        tokens = self.backbone.forward_features(x)
        return tokens[:, self.backbone.num_prefix_tokens:], grid

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
