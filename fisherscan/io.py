"""fisherscan's files: atomic writes, one metadata format for every safetensors file it writes, options as JSON.

Every safetensors file fisherscan writes -- scores, partial scores, heads, tune checkpoints, tuned models, masks,
the benchmark's pretrained backbones -- holds its tensors and ONE metadata entry, key ``fisherscan``: a JSON object
with ``file_kind`` (``FILE_KINDS``) and the writer's fields. Files written before that format (the same JSON under
``fisherscan_partial``, ``fisherscan_head``, ``fisherscan_run`` or ``fisherscan_proxy_dg``, or a scores file without
``file_kind``) are read as they are. Anything else is one error naming the file, what it should be and the fix.

Writes are atomic: a temporary file in the same folder, fsync, rename -- a killed run never leaves a truncated
file under the final name, and the next write of a file deletes the temporaries a killed writer of it left.
"""

from __future__ import annotations

import contextlib
import glob
import hashlib
import json
import os
import tempfile
import time
from dataclasses import asdict
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from .errors import FisherscanError

METADATA_KEY = "fisherscan"
FILE_KINDS = {"scores": "scores file", "partial": "partial scoring file", "head": "head", "checkpoint":
              "tune checkpoint", "model": "tuned model", "mask": "mask file", "pretrained": "pretrained backbone"}
# the metadata keys of the files written before the one format, and the kind each held
LEGACY_KEYS = {"fisherscan_partial": ("partial",), "fisherscan_head": ("head",),
               "fisherscan_run": ("checkpoint", "model", "mask"), "fisherscan_proxy_dg": ("pretrained",)}


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


def write_text(path: Path, text: str) -> None:
    with atomic_target(path) as tmp:
        tmp.write_text(text)


def json_value(value):
    """A value as JSON: paths as strings, tuples as lists (recursively); everything else as it is."""
    if isinstance(value, Path):
        return str(value)
    if isinstance(value, (tuple, list)):
        return [json_value(v) for v in value]
    if isinstance(value, dict):
        return {k: json_value(v) for k, v in value.items()}
    return value


def options_json(config, exclude: tuple[str, ...] = ()) -> dict:
    """Every field of a config dataclass as a JSON value, except ``exclude``."""
    return {k: json_value(v) for k, v in asdict(config).items() if k not in exclude}


def write_tensors(path: Path, tensors: dict[str, torch.Tensor], kind: str, info: dict) -> None:
    """``tensors`` (moved to the CPU, contiguous) and ``info`` (a JSON object, ``file_kind`` added) into the
    safetensors file ``path``, atomically."""
    if kind not in FILE_KINDS:
        raise ValueError(f"unknown file kind {kind!r}")
    tensors = {name: t.detach().cpu().contiguous() for name, t in tensors.items()}
    metadata = {METADATA_KEY: json.dumps({**info, "file_kind": kind}, sort_keys=True)}
    with atomic_target(path) as tmp:
        save_file(tensors, str(tmp), metadata=metadata)


def _unreadable(path: Path, kind: str, why: str, fix: str) -> FisherscanError:
    return FisherscanError(f"{path}: not a readable {FILE_KINDS[kind]} ({why}); {fix}")


def _parse(raw: dict, kind: str) -> tuple[dict | None, str]:
    """(info, why not) from a file's raw metadata: the one format, else a legacy key of ``kind``."""
    if METADATA_KEY in raw:
        try:
            info = json.loads(raw[METADATA_KEY])
        except ValueError:
            return None, f"its '{METADATA_KEY}' metadata is not JSON"
        if not isinstance(info, dict):
            return None, f"its '{METADATA_KEY}' metadata is not a JSON object"
        found = info.get("file_kind", "scores")  # scores files carried no file_kind before the one format
        return (info, "") if found == kind else (None, f"it is a {FILE_KINDS.get(found, found)}")
    for key, kinds in LEGACY_KEYS.items():
        if key in raw and kind in kinds:
            try:
                info = json.loads(raw[key])
            except ValueError:
                return None, f"its '{key}' metadata is not JSON"
            return (info, "") if isinstance(info, dict) else (None, f"its '{key}' metadata is not a JSON object")
    return None, f"no '{METADATA_KEY}' metadata: not written by fisherscan"


def read_info(path: Path, kind: str, fix: str) -> dict:
    """The metadata of the fisherscan file ``path`` of ``kind``; a one-line error ending in ``fix`` otherwise."""
    path = Path(path)
    try:
        with safe_open(str(path), "pt") as handle:
            raw = handle.metadata() or {}
    except Exception as error:  # noqa: BLE001 - a damaged or foreign file is the user's to fix
        raise _unreadable(path, kind, type(error).__name__, fix) from None
    info, why = _parse(raw, kind)
    if info is None:
        raise _unreadable(path, kind, why, fix)
    return info


def read_tensors(path: Path, kind: str, fix: str) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of the fisherscan file ``path`` of ``kind`` (``read_info``'s checks first)."""
    info = read_info(path, kind, fix)
    try:
        return load_file(str(path)), info
    except Exception as error:  # noqa: BLE001
        raise _unreadable(Path(path), kind, type(error).__name__, fix) from None


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 22), b""):
            digest.update(chunk)
    return digest.hexdigest()


def recorded_base(written: Path, recorded_out: str | None) -> Path:
    """The folder a relative path recorded in a file is read against. Files record absolute paths; older ones
    recorded them as given, relative to the working folder of the run that wrote ``written`` (a scores file or a
    run folder) as ``recorded_out``: that folder is recovered when ``written`` still ends with ``recorded_out``,
    else ``written``'s own folder is taken."""
    written = Path(os.path.abspath(written))
    if recorded_out and not os.path.isabs(recorded_out):
        parts = Path(os.path.normpath(recorded_out)).parts
        if ".." not in parts and written.parts[-len(parts):] == parts:
            return Path(*written.parts[:-len(parts)])
    return written.parent


def resolve_recorded(value: str | None, base: Path) -> Path | None:
    """A path recorded in a file, absolute: as it is when absolute, else read against ``base``."""
    if value is None:
        return None
    return Path(os.path.abspath(Path(base) / value))


def cache_folder(*parts: str) -> Path:
    """``$XDG_CACHE_HOME/fisherscan/<parts>`` (``~/.cache/fisherscan/...``): where the tools write when the user
    names no folder."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base, "fisherscan", *parts)
