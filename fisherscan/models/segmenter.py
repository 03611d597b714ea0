"""The segmentation model whose Fisher information is scored: a ViT backbone plus a decoder head.

``Segmenter(x)`` returns logits (B, classes, h, w); losses upsample them bilinearly to the label size.

- ``linear``: normalises each patch token of the last block (LayerNorm) and applies a 1x1 classifier, on the patch
  grid -- the smallest head that makes the backbone's features a segmentation model.
- ``multilevel``: patch tokens of 4 evenly spaced blocks, a simple feature pyramid (strides 4, 8, 16, 32 for
  patch 16: x4, x2, x1, x0.5 of the patch grid, as ViTDet/Rein), each projected to 128 channels, upsampled to the
  finest level and summed, then a 3x3 conv + GroupNorm + GELU fusion and a 1x1 classifier; logits at 4x the grid.
- ``mask2former``: the paper's (Rein's) head, ``fisherscan.models.decoders.mask2former``; its "logits" are per-pixel
  log-likelihoods log(s_c / sum_c s_c) at the input size, and it trains with the matched set loss.
  ``mask2former?num_queries=4&...`` changes head options (``fisherscan.models.decoders.mask2former.OPTIONS``).

``forward(x, y)`` (so DistributedDataParallel sees it) is the decoder's training loss: the mean pixel cross-entropy
(Eq. 1) for ``linear``/``multilevel``, the matched set loss for ``mask2former``.
"""

from __future__ import annotations

import torch
from torch import nn

from ..data.labels import IGNORE_INDEX
from ..errors import FisherscanError
from .backbone import patch_tokens
from .decoders.blocks import evenly_spaced_blocks, rein_blocks
from .decoders.linear import LinearDecoder
from .decoders.mask2former import Mask2FormerDecoder
from .decoders.multilevel import MultiLevelDecoder
from .logits import upsample_logits
from .registry import query_kwargs

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
