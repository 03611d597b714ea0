"""Package attributes imported on first use, so that ``fisherscan --help`` does not load timm and every model."""

from __future__ import annotations

import importlib


def lazy_attribute(package: str, exports: dict[str, str], name: str):
    """``name`` from the module ``exports[name]`` (relative to ``package``, as in an import statement: ".engine",
    "..models.logits"): a package's module-level ``__getattr__`` (PEP 562)."""
    if name not in exports:
        raise AttributeError(f"module {package!r} has no attribute {name!r}")
    return getattr(importlib.import_module(exports[name], package), name)
