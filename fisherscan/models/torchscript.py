"""The tensors of a TorchScript archive (OpenAI CLIP's ``ViT-L-14.pt``), read without executing any of its code.

A TorchScript archive is a zip: ``<name>/data.pkl`` pickles the module tree (each module an object of a
``__torch__.*`` class whose state is a dict of attributes: sub-modules, parameters, buffers), tensor bytes lie in
separate records ``<name>/data/<key>`` named by persistent ids, and ``<name>/code/`` holds the compiled
TorchScript. ``torch.load(weights_only=True)`` refuses such archives and ``torch.jit.load`` compiles the code, so
this module unpickles ``data.pkl`` itself, like torch's weights-only unpickler: only tensor rebuilds, storage
types, ``OrderedDict`` and TorchScript's list helpers resolve; every ``__torch__`` class becomes an inert
attribute holder; any other global (``os.system``, ``builtins.eval``...) stops the read. The code records are
never read.
"""

from __future__ import annotations

import pickle
import zipfile
from collections import OrderedDict
from pathlib import Path

import torch

_STORAGE_DTYPES = {
    "FloatStorage": torch.float32, "HalfStorage": torch.float16, "BFloat16Storage": torch.bfloat16,
    "DoubleStorage": torch.float64, "LongStorage": torch.int64, "IntStorage": torch.int32,
    "ShortStorage": torch.int16, "CharStorage": torch.int8, "ByteStorage": torch.uint8, "BoolStorage": torch.bool,
}


def _same(value, *_):
    return value


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("collections", "OrderedDict"): OrderedDict,
    ("torch", "device"): torch.device,
    **{("torch.jit._pickle", name): _same for name in (
        "build_intlist", "build_tensorlist", "build_doublelist", "build_boollist", "build_genericlist",
        "build_complexlist", "restore_type_tag")},
}


class ScriptObject:
    """An inert stand-in for an object of a TorchScript class: BUILD stores its attribute dict, nothing runs."""

    def __init__(self, *args) -> None:
        self.attributes: dict = {}

    def __setstate__(self, state) -> None:
        self.attributes = state if isinstance(state, dict) else {}


def is_torchscript_archive(path: Path) -> bool:
    """True for a zip with ``constants.pkl`` (what TorchScript writes and ``torch.save`` does not)."""
    if not zipfile.is_zipfile(path):
        return False
    with zipfile.ZipFile(path) as archive:
        return any(name == "constants.pkl" or name.endswith("/constants.pkl") for name in archive.namelist())


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, data: bytes, archive: zipfile.ZipFile, root: str):
        import io

        super().__init__(io.BytesIO(data))
        self.archive, self.root, self.storages = archive, root, {}

    def find_class(self, module: str, name: str):
        if module == "__torch__" or module.startswith("__torch__."):
            return ScriptObject
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        if (module, name) in _ALLOWED:
            return _ALLOWED[(module, name)]
        raise pickle.UnpicklingError(f"refused to load the global {module}.{name} (it could run code)")

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage" and isinstance(pid[1], torch.dtype)):
            raise pickle.UnpicklingError(f"unexpected persistent id {str(pid)[:80]}")
        _, dtype, key, _location, numel = pid
        if key not in self.storages:
            raw = self.archive.read(f"{self.root}data/{key}")
            size = torch.empty((), dtype=dtype).element_size()
            if len(raw) < numel * size:
                raise pickle.UnpicklingError(f"record data/{key} holds {len(raw)} bytes, fewer than {numel} values")
            values = (torch.frombuffer(bytearray(raw), dtype=dtype) if raw else torch.empty(0, dtype=dtype))
            self.storages[key] = torch.storage.TypedStorage(wrap_storage=values.untyped_storage(), dtype=dtype,
                                                            _internal=True)
        return self.storages[key]


def _collect(value, prefix: str, out: dict[str, torch.Tensor], depth: int = 0) -> None:
    if depth > 64:
        return
    if isinstance(value, torch.Tensor):
        out[prefix] = value.detach()
    elif isinstance(value, ScriptObject):
        _collect(value.attributes, prefix, out, depth + 1)
    elif isinstance(value, dict):
        for key, item in value.items():
            if isinstance(key, str):
                _collect(item, f"{prefix}.{key}" if prefix else key, out, depth + 1)


def read_torchscript_tensors(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor attribute of the archive's module tree by dotted name (``visual.conv1.weight``...), as the
    script module's ``state_dict()`` would name them. Raises ``pickle.UnpicklingError`` or ``KeyError`` on a
    file that is not a plain TorchScript archive (e.g. one whose pickle calls a function)."""
    with zipfile.ZipFile(path) as archive:
        pickles = [name for name in archive.namelist() if name == "data.pkl" or name.endswith("/data.pkl")]
        if not pickles:
            raise KeyError("no data.pkl in the archive")
        name = min(pickles, key=len)
        root = name[: -len("data.pkl")]
        tree = _RestrictedUnpickler(archive.read(name), archive, root).load()
    out: dict[str, torch.Tensor] = {}
    _collect(tree, "", out)
    return out
