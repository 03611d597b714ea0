"""The warmed-up decoder ``score`` saves beside its scores, and loading it for ``tune`` (``--head``)."""

from __future__ import annotations

from pathlib import Path

from ..errors import FisherscanError
from ..io import read_tensors, write_tensors
from .segmenter import Segmenter


def head_path_for(scores_path: Path) -> Path:
    """Where ``score`` saves the warmed-up head: beside the scores, ``<stem>.head.safetensors``."""
    scores_path = Path(scores_path)
    return scores_path.with_name(scores_path.name.removesuffix(".safetensors") + ".head.safetensors")


def save_head(path: Path, segmenter: Segmenter, metadata: dict) -> None:
    """The decoder's state dict, its name, spec and feature blocks, and ``metadata`` (the model, the scores)."""
    info = {"decoder": segmenter.decoder_name, "decoder_spec": segmenter.decoder_spec,
            "feature_blocks": getattr(segmenter.decoder, "blocks", None), **metadata}
    write_tensors(path, segmenter.decoder.state_dict(), "head", info)


def load_head(path: Path, segmenter: Segmenter) -> dict:
    """Load a head saved by ``save_head`` into ``segmenter.decoder``; returns its metadata."""
    path = Path(path)
    if not path.is_file():
        raise FisherscanError(f"--head {path}: no such file; pass a head saved by 'fisherscan score'")
    tensors, info = read_tensors(path, "head", "pass a head saved by 'fisherscan score'")
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
