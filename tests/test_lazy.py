"""fisherscan.lazy: the model and Fisher packages export their names on first use, so the command line starts
without timm. Oracle: each name imported from its submodule directly; a fresh interpreter's ``sys.modules``."""

from __future__ import annotations

import importlib
import subprocess
import sys

import pytest

import fisherscan.fisher
import fisherscan.models


@pytest.mark.parametrize("package", [fisherscan.models, fisherscan.fisher])
def test_every_exported_name_is_its_submodules_object(package):
    for name, module in package._EXPORTS.items():
        assert getattr(package, name) is getattr(importlib.import_module(module, package.__name__), name), name
    assert sorted(package.__all__) == sorted(package._EXPORTS)
    with pytest.raises(AttributeError, match="no attribute 'missing'"):
        package.missing


def test_the_command_line_starts_without_timm():
    code = "import sys, fisherscan.cli; print('timm' in sys.modules, 'fisherscan.models.backbone' in sys.modules)"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "False"]
