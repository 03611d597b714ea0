"""The public names stay where users import them from (oracle: the README's own Python section, and the list the
layout change promised): every import line of the README's ``python`` blocks runs, and the names of
``fisherscan.fisher``, ``fisherscan.select``, ``fisherscan.scores`` and ``fisherscan.perturb`` are there."""

from __future__ import annotations

import importlib
import re
from pathlib import Path

import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
PROMISED = {
    "fisherscan.fisher": ("diagonal_fisher", "variational_fisher", "squared_gradient_sum", "delta_fisher", "dr_fim",
                          "dr_fim_terms", "fisher_scale", "shift_weight", "FisherAccumulator", "sample_labels",
                          "image_loss", "trainable_parameters", "upsample_logits"),
    "fisherscan.select": ("select_mask", "selection_order", "selected_count", "selected_fraction", "STRATEGIES"),
    "fisherscan.scores": ("save_scores", "load_scores", "KINDS", "METADATA_KEY", "SCHEMA_VERSION", "atomic_target"),
    "fisherscan.perturb": ("perturb_statistics", "TokenShift", "channel_statistics", "statistic_spread",
                           "shift_statistics", "block_input"),
}


def readme_imports() -> list[str]:
    blocks = re.findall(r"```python\n(.*?)```", README.read_text(), flags=re.S)
    return [line for block in blocks for line in block.splitlines() if line.startswith(("from fisherscan", "import "))]


def test_the_readme_has_a_python_section():
    assert any("fisherscan.fisher" in line for line in readme_imports())


@pytest.mark.parametrize("line", readme_imports())
def test_every_import_of_the_readme_runs(line):
    exec(line, {})


@pytest.mark.parametrize("module", sorted(PROMISED))
def test_the_promised_names_are_importable(module):
    loaded = importlib.import_module(module)
    missing = [name for name in PROMISED[module] if not hasattr(loaded, name)]
    assert not missing
