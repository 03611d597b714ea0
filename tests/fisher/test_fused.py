"""The fused Triton kernel (fisherscan.fisher.fused) against the PyTorch Linear rule it replaces. Oracles:
``rules.linear``'s per-image weight gradients squared and summed in float64, and, through the engine, the
brute-force per-image autograd loop.

Where to run them: on a CUDA device directly; on the CPU under Triton's interpreter, which must be chosen before
Triton is first imported, so ``test_the_kernel_tests_pass_under_the_interpreter`` runs this file again in a
subprocess with ``TRITON_INTERPRET=1`` (skipped where Triton is absent).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from conftest import assert_close_dicts, batch, brute_force_fisher, tiny_segmenter
from torch import nn

from fisherscan.fisher import fused, rules
from fisherscan.fisher.diagonal import make_engine
from fisherscan.fisher.engine import FUSED

HAS_TRITON = importlib.util.find_spec("triton") is not None
INTERPRETED = os.environ.get("TRITON_INTERPRET") == "1"
DEVICE = "cpu" if INTERPRETED else "cuda" if torch.cuda.is_available() else None
kernel = pytest.mark.skipif(not HAS_TRITON or DEVICE is None,
                            reason="needs Triton and a CUDA device, or the interpreter (run by the subprocess test)")


@pytest.mark.slow
@pytest.mark.skipif(not HAS_TRITON or INTERPRETED, reason="needs Triton; this is the interpreter's own run")
def test_the_kernel_tests_pass_under_the_interpreter():
    root = Path(__file__).resolve().parents[2]
    env = {**os.environ, "TRITON_INTERPRET": "1", "PYTHONPATH": str(root)}
    run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "-m", "not slow",
                          str(Path(__file__).resolve())], capture_output=True, text=True, env=env, cwd=root)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-2000:]
    assert "7 passed, 1 skipped" in run.stdout, run.stdout[-1000:]  # bf16: CUDA only


def rule_squares(module: nn.Linear, x, g, images) -> torch.Tensor:
    return rules.linear(module, x, g, images)["weight"].double().square().sum(dim=0)


@kernel
@pytest.mark.parametrize("images, k, tokens, rows, cols, blocks", [
    (3, 1, 37, 40, 50, None), (2, 2, 9, 70, 65, None), (1, 1, 5, 16, 16, None),
    (4, 1, 33, 130, 24, (128, 64, 32)),  # the bf16 tiles, in fp32 (the interpreter has no bf16)
])
def test_kernel_equals_the_rule_in_fp32(images, k, tokens, rows, cols, blocks):
    torch.manual_seed(images * 100 + rows)
    layer = nn.Linear(cols, rows)
    x, g = torch.randn(images * k, tokens, cols), torch.randn(images * k, tokens, rows)
    out = torch.full((rows, cols), 0.25, device=DEVICE)  # the kernel adds to what the accumulator holds
    fused.add_squared_weight_gradients(out, g.to(DEVICE), x.to(DEVICE), images, blocks)
    want = rule_squares(layer, x, g, images)
    out = out.cpu()
    assert float(((out.double() - 0.25) - want).abs().max() / want.abs().max()) < 1e-5


@kernel
@pytest.mark.skipif(INTERPRETED, reason="Triton's interpreter computes with numpy, which has no bfloat16: CUDA only")
def test_kernel_with_bf16_inputs_accumulates_in_fp32():
    """Oracle: the rule on the same bf16 values in float64 (the kernel may not round its products to bf16)."""
    torch.manual_seed(0)
    layer = nn.Linear(48, 40)
    x, g = torch.randn(3, 21, 48).bfloat16(), torch.randn(3, 21, 40).bfloat16()
    out = torch.zeros(40, 48, device=DEVICE)
    fused.add_squared_weight_gradients(out, g.to(DEVICE), x.to(DEVICE), 3)
    out = out.cpu()
    want = rule_squares(layer.double(), x.double(), g.double(), 3)
    assert float((out.double() - want).abs().max() / want.abs().max()) < 1e-5


def test_a_wrong_accumulator_is_refused():
    with pytest.raises(ValueError, match="accumulator"):
        fused.add_squared_weight_gradients(torch.zeros(3, 3), torch.randn(2, 4, 5), torch.randn(2, 4, 6), 2)


@kernel
def test_engine_with_the_fused_kernel_equals_the_per_image_loop():
    model = tiny_segmenter().to(DEVICE)
    x, y = (t.to(DEVICE) for t in batch())
    engine = make_engine(model, "hooks", chunk_size=2, fused=True)
    got = {n: v.cpu() / x.shape[0] for n, v in engine.squared_gradient_sum(x, y).items()}
    want = {n: v.cpu() for n, v in brute_force_fisher(model, [(x, y)]).items()}
    assert_close_dicts(got, want)
    linear_weights = {f"{n}.weight" for n, m in model.named_modules() if type(m) is nn.Linear}
    assert {n for n, how in engine.visits.items() if how == FUSED} == linear_weights
    plain = make_engine(model, "hooks", chunk_size=2)  # off by default: the PyTorch rule
    plain.squared_gradient_sum(x, y)
    assert FUSED not in plain.visits.values()


def test_the_fused_path_is_not_taken_where_the_kernel_cannot_run(monkeypatch):
    """Without CUDA and without the interpreter the engine keeps the PyTorch rule, fused or not."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    model = tiny_segmenter()
    x, y = batch()
    engine = make_engine(model, "hooks", fused=True)
    engine.squared_gradient_sum(x, y)
    assert FUSED not in engine.visits.values() and not fused.available(x)
