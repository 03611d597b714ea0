"""The scores file: one safetensors file, tensors ``<kind>/<param>``, JSON metadata under the key ``fisherscan``.

Kinds written by ``score``: ``fim`` (F(x), Eq. 9), ``fim_shift`` (F(x'), Eq. 9 on Eq. 6 inputs),
``delta`` (Eq. 5) and ``drfim`` (Eq. 7). Writes are atomic: a temporary file in the same folder, fsync,
rename -- a killed run never leaves a truncated file under the final name.
"""

from __future__ import annotations

import contextlib
import glob
import json
import os
import tempfile
import time
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import FisherscanError

SCHEMA_VERSION = 1
METADATA_KEY = "fisherscan"
KINDS = ("fim", "fim_shift", "delta", "drfim")


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


@contextlib.contextmanager
def atomic_target(path: Path) -> Iterator[Path]:
    """Yield a temporary path beside ``path``; on success fsync it, rename it to ``path`` and delete what killed
    writers of ``path`` left behind."""
    path = Path(path)
    folder = path.parent if str(path.parent) else Path(".")
    if not folder.is_dir():
        raise FisherscanError(f"{path}: folder {folder} does not exist; create it or choose another --out")
    if not os.access(folder, os.W_OK):
        raise FisherscanError(f"{path}: folder {folder} is not writable; choose another --out")
    started = time.time()
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=folder)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        yield tmp
        with open(tmp, "rb+") as written:
            # mkstemp's (and safetensors') private 0600 would carry over: give it the mode of any new file
            os.fchmod(written.fileno(), 0o666 & ~_umask())
            os.fsync(written.fileno())
        os.replace(tmp, path)
        remove_stale_temporaries(path, started)
    finally:
        if tmp.exists():
            tmp.unlink()


def remove_stale_temporaries(path: Path, before: float) -> None:
    """Delete temporary files of ``path`` that a killed writer left (``.<name>.*.tmp`` made before ``before``)."""
    for stale in path.parent.glob(f".{glob.escape(path.name)}.*.tmp"):
        with contextlib.suppress(OSError):
            if stale.stat().st_mtime < before:
                stale.unlink()


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
    info = {**metadata, "schema_version": SCHEMA_VERSION}
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata={METADATA_KEY: json.dumps(info, sort_keys=True)})


def load_scores(path: Path) -> tuple[dict[str, dict[str, torch.Tensor]], dict]:
    """Read a scores file: (scores by kind -> param name -> tensor, metadata dict)."""
    path = Path(path)
    if not path.is_file():
        raise FisherscanError(f"{path}: no such scores file; run 'fisherscan score ... --out {path}' first")
    try:
        with safe_open(str(path), "pt") as handle:
            raw = (handle.metadata() or {}).get(METADATA_KEY)
            scores: dict[str, dict[str, torch.Tensor]] = {}
            for key in handle.keys():
                kind, _, name = key.partition("/")
                scores.setdefault(kind, {})[name] = handle.get_tensor(key)
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file is the user's to fix
        raise FisherscanError(f"{path}: not a readable safetensors file ({type(error).__name__}); score again") from None
    if raw is None:
        raise FisherscanError(f"{path}: no '{METADATA_KEY}' metadata; it was not written by fisherscan score")
    try:
        metadata = json.loads(raw)
    except ValueError:
        metadata = None
    if not isinstance(metadata, dict):
        raise FisherscanError(f"{path}: its '{METADATA_KEY}' metadata is not a JSON object; score again")
    return scores, metadata
