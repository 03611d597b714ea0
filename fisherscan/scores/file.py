"""The scores file: one safetensors file, tensors ``<kind>/<param>``, JSON metadata in fisherscan's one format
(``fisherscan.io``: key ``fisherscan``, ``file_kind`` "scores").

Kinds written by ``score``: ``fim`` (F(x), Eq. 9), ``fim_shift`` (F(x'), Eq. 9 on Eq. 6 inputs),
``delta`` (Eq. 5) and ``drfim`` (Eq. 7); the variational estimator adds ``precision`` and ``precision_shift``.
Writes are atomic.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import FisherscanError
from ..io import read_info, write_tensors

SCHEMA_VERSION = 1
KINDS = ("fim", "fim_shift", "delta", "drfim")


def save_scores(path: Path, scores: dict[str, dict[str, torch.Tensor]], metadata: dict) -> None:
    """Write ``scores[kind][param]`` as tensors ``kind/param`` plus ``metadata`` (JSON), atomically."""
    tensors = {}
    storages = set()
    for kind, by_name in scores.items():
        for name, tensor in by_name.items():
            value = tensor.detach().to("cpu", torch.float32).contiguous()
            storage = value.untyped_storage().data_ptr()
            if storage in storages:  # safetensors refuses tensors that share memory (views, one tensor twice)
                value = value.clone()
                storage = value.untyped_storage().data_ptr()
            storages.add(storage)
            tensors[f"{kind}/{name}"] = value
    write_tensors(path, tensors, "scores", {**metadata, "schema_version": SCHEMA_VERSION})


def load_scores(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a scores file: (scores by kind -> param name -> tensor, metadata dict)."""
    path = Path(path)
    if not path.is_file():
        raise FisherscanError(f"{path}: no such scores file; run 'fisherscan score ... --out {path}' first")
    metadata = read_info(path, "scores", "score again")
    try:
        with safe_open(str(path), "pt") as handle:
            scores: dict[str, dict[str, torch.Tensor]] = {}
            for key in handle.keys():
                kind, _, name = key.partition("/")
                scores.setdefault(kind, {})[name] = handle.get_tensor(key)
    except Exception as error:  # noqa: BLE001 - a damaged file is the user's to fix
        raise FisherscanError(f"{path}: not a readable scores file ({type(error).__name__}); score again") from None
    metadata.pop("file_kind", None)
    return scores, metadata
