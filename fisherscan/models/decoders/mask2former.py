"""The paper's decoder (as Rein): a Mask2Former head on the patch tokens of 4 ViT blocks, from Hugging Face
transformers.

- **Neck** (:class:`ViTNeck`): the 4 block maps (B, D, h, w) on the patch grid are resampled bilinearly by x4, x2,
  x1 and x0.5 (Rein's current code), i.e. strides 4, 8, 16, 32 for patch 16 (3.5, 7, 14, 28 for patch 14). It has
  no parameters. Blocks: Rein's [7, 11, 15, 23] for a ViT-L (depth 24), 4 evenly spaced blocks otherwise.
- **Head**: transformers' ``Mask2FormerForUniversalSegmentation`` (pixel decoder with multi-scale deformable
  attention, masked-attention transformer decoder, Hungarian-matched set loss; pure PyTorch, scipy for the
  matcher). Its pixel-level module's encoder is the neck, built in place of the Swin backbone (which is never
  built), so the pixel decoder is sized from the neck's channels and initialised by transformers' own
  ``post_init`` (level embedding included). Rein's head settings are transformers' defaults with 19 labels
  (100 queries, 6 encoder layers, 9 decoder layers + 1, 256 channels, class/mask/dice weights 2/5/5, no-object
  0.1, 12544 points, oversample 3, importance 0.75); ``dropout`` stays 0 (it also drops whole decoder layers) and
  ``feature_size == mask_feature_size == hidden_dim`` (otherwise some projections are never trained or saved).
- **Semantic scores** (:func:`semantic_scores`): s_c = sum_q softmax(class_q)_c sigmoid(mask_q) over the real
  classes (no-object dropped), with the mask logits upsampled bilinearly to the label size first (mmseg's
  Mask2Former inference). The segmenter's forward returns log(s_c / sum_c s_c): the per-pixel log-likelihood, so
  the Fisher (Eq. 9: labels sampled from this categorical), slide inference and mIoU work unchanged. The matched
  set loss (:meth:`Mask2FormerDecoder.matched_loss`) is for training only.

transformers is imported lazily (``pip install 'fisherscan[mask2former]'``), so the rest of fisherscan runs
without it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ...data.labels import IGNORE_INDEX
from ...errors import FisherscanError

SCALES = (4.0, 2.0, 1.0, 0.5)  # the neck: patch grid -> strides 4, 8, 16, 32 (patch 16)

# options a ``mask2former?key=value&...`` decoder spec may set (Mask2FormerConfig fields); hidden_dim also sets
# feature_size and mask_feature_size so they stay equal
OPTIONS = ("num_queries", "train_num_points", "encoder_layers", "decoder_layers", "hidden_dim", "num_attention_heads",
           "dim_feedforward", "encoder_feedforward_dim", "oversample_ratio", "importance_sample_ratio",
           "class_weight", "mask_weight", "dice_weight", "no_object_weight")


def require_transformers():
    """The ``transformers`` Mask2Former module, or a one-line error saying how to install it."""
    try:
        import scipy  # noqa: F401  (the Hungarian matcher)
        from transformers.models.mask2former import configuration_mask2former, modeling_mask2former
    except ImportError:
        raise FisherscanError("--decoder mask2former needs transformers and scipy: "
                              "pip install 'fisherscan[mask2former]'") from None
    return configuration_mask2former, modeling_mask2former


@dataclass
class NeckOutput:
    """What transformers' pixel-level module reads from its encoder."""

    feature_maps: tuple[torch.Tensor, ...]


class ViTNeck(nn.Module):
    """The pixel-level module's encoder: the 4 block maps, concatenated on channels as (B, 4D, h, w) (the only
    input transformers' forward passes on), resampled by x4, x2, x1, x0.5 (highest resolution first)."""

    def __init__(self, embed_dim: int):
        super().__init__()
        self.channels = [int(embed_dim)] * len(SCALES)

    def forward(self, stacked: torch.Tensor) -> NeckOutput:
        maps = stacked.split(self.channels, dim=1)
        return NeckOutput(tuple(m if scale == 1 else F.interpolate(m, scale_factor=scale, mode="bilinear",
                                                                   align_corners=False)
                                for m, scale in zip(maps, SCALES)))


def head_config(num_classes: int, **options):
    """Mask2FormerConfig for ``num_classes`` labels: transformers' defaults (= Rein's head) changed by ``options``."""
    configuration, _ = require_transformers()
    unknown = sorted(set(options) - set(OPTIONS))
    if unknown:
        raise FisherscanError(f"--decoder mask2former?{unknown[0]}=...: unknown option; use some of "
                              f"{', '.join(OPTIONS)}")
    hidden = int(options.pop("hidden_dim", 256))
    if hidden % 32:
        raise FisherscanError(f"--decoder mask2former?hidden_dim={hidden}: must be a multiple of 32 (GroupNorm groups)")
    if int(options.get("decoder_layers", 10)) < 1 or int(options.get("encoder_layers", 6)) < 1:
        raise FisherscanError("--decoder mask2former: encoder_layers and decoder_layers must be at least 1")
    labels = {str(i): str(i) for i in range(num_classes)}
    return configuration.Mask2FormerConfig(
        id2label=labels, label2id={v: int(k) for k, v in labels.items()}, feature_size=hidden, mask_feature_size=hidden,
        hidden_dim=hidden, dropout=0.0, ignore_value=IGNORE_INDEX, use_auxiliary_loss=True, **options)


def build_model(config, neck: nn.Module) -> nn.Module:
    """transformers' Mask2FormerForUniversalSegmentation with ``neck`` as the pixel-level module's encoder.

    The module builds its encoder with ``load_backbone(config)`` and then sizes the pixel decoder from
    ``encoder.channels``; here that call returns the neck, so no Swin backbone is built, and ``post_init``
    initialises every weight (the pixel decoder's level embedding included) after the swap.
    """
    _, modeling = require_transformers()
    with _patched(modeling, "load_backbone", lambda _config: neck):
        return modeling.Mask2FormerForUniversalSegmentation(config)


@contextlib.contextmanager
def _patched(module, name: str, value):
    original = getattr(module, name)
    setattr(module, name, value)
    try:
        yield
    finally:
        setattr(module, name, original)


def semantic_targets(labels: torch.Tensor, ignore_index: int = IGNORE_INDEX) -> tuple[list, list]:
    """Per image of (B, H, W) labels: the class ids present (ignore dropped, ascending) and one binary float mask
    per class (ignore pixels are 0 in every mask) -- the set the matched loss compares the queries with."""
    classes, masks = [], []
    for label in labels:
        present = torch.unique(label)
        present = present[present != ignore_index]
        classes.append(present.long())
        masks.append((label.unsqueeze(0) == present[:, None, None]).float())
    return classes, masks


def semantic_scores(class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """s (B, C, H, W) = einsum(softmax(class)[..., :-1], sigmoid(masks upsampled to ``size``)), in fp32."""
    masks = F.interpolate(mask_logits.float(), size=tuple(size), mode="bilinear", align_corners=False).sigmoid()
    probs = class_logits.float().softmax(dim=-1)[..., :-1]
    return torch.einsum("bqc,bqhw->bchw", probs, masks)


def semantic_log_probs(class_logits: torch.Tensor, mask_logits: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """log(s_c / sum_c s_c): the per-pixel categorical log-likelihood over the normalised semantic scores."""
    scores = semantic_scores(class_logits, mask_logits, size)
    tiny = torch.finfo(scores.dtype).tiny
    return scores.clamp_min(tiny).log() - scores.sum(dim=1, keepdim=True).clamp_min(tiny).log()


class Mask2FormerDecoder(nn.Module):
    """The decoder ``--decoder mask2former[?option=value&...]`` builds: block maps -> per-pixel log-likelihoods."""

    def __init__(self, embed_dim: int, num_classes: int, blocks: list[int], **options):
        super().__init__()
        self.blocks = list(blocks)
        self.num_classes = num_classes
        self.model = build_model(head_config(num_classes, **options), ViTNeck(embed_dim))

    def outputs(self, maps: list[torch.Tensor], auxiliary: bool = False):
        """transformers' output on the 4 block maps: class logits (B, Q, C+1), mask logits (B, Q, h, w) at
        stride 4 and, with ``auxiliary``, the same for every decoder layer before the last."""
        return self.model(pixel_values=torch.cat(list(maps), dim=1), output_auxiliary_logits=auxiliary,
                          return_dict=True)

    def forward(self, maps: list[torch.Tensor], size: tuple[int, int]) -> torch.Tensor:
        out = self.outputs(maps)
        with torch.autocast(out.class_queries_logits.device.type, enabled=False):
            return semantic_log_probs(out.class_queries_logits, out.masks_queries_logits, size)

    def matched_loss(self, maps: list[torch.Tensor], size: tuple[int, int], labels: torch.Tensor) -> torch.Tensor:
        """transformers' Mask2Former loss (Hungarian matching; weighted class CE + mask BCE + dice on sampled
        points, for the last layer and every auxiliary layer), computed in fp32. Its random points come from the
        global torch RNG."""
        out = self.outputs(maps, auxiliary=True)
        classes, masks = semantic_targets(labels)
        with torch.autocast(labels.device.type, enabled=False):
            auxiliary = [{k: v.float() for k, v in layer.items()} for layer in out.auxiliary_logits]
            losses = self.model.get_loss_dict(out.masks_queries_logits.float(), out.class_queries_logits.float(),
                                              masks, classes, auxiliary)
            return self.model.get_loss(losses)
