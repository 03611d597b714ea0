"""Shared tiny models for the tests (CPU, fp32, seconds)."""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer

from fisherscan.models.segmenter import Segmenter

torch.set_num_threads(1)  # tiny models: one thread is as fast, and immune to a busy machine's oversubscription


def tiny_vit(depth: int = 2, embed_dim: int = 16, patch: int = 4, reg_tokens: int = 0) -> VisionTransformer:
    """A ViT with every part the Fisher rules must handle: conv patch embedding, cls (+ register) tokens,
    position embedding, LayerNorm, attention, MLP and LayerScale."""
    return VisionTransformer(img_size=16, patch_size=patch, embed_dim=embed_dim, depth=depth, num_heads=2,
                             mlp_ratio=2.0, init_values=0.5, num_classes=0, dynamic_img_size=True,
                             reg_tokens=reg_tokens)


def tiny_segmenter(num_classes: int = 4, seed: int = 0, **kwargs) -> Segmenter:
    torch.manual_seed(seed)
    model = Segmenter(tiny_vit(**kwargs), num_classes=num_classes).eval()
    with torch.no_grad():  # LayerScale and the head away from their init values: every gradient non-trivial
        for p in model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    return model


@pytest.fixture
def segmenter() -> Segmenter:
    return tiny_segmenter()


def vit_shapes(depth: int, D: int = 4) -> dict[str, tuple[int, ...]]:
    """Parameter names and shapes of a timm DINOv2-style ViT with embedding width D and patch 2 (no model built)."""
    shapes = {"cls_token": (1, 1, D), "pos_embed": (1, 5, D), "patch_embed.proj.weight": (D, 3, 2, 2),
              "patch_embed.proj.bias": (D,)}
    for i in range(depth):
        b = f"blocks.{i}."
        shapes.update({b + "norm1.weight": (D,), b + "norm1.bias": (D,), b + "attn.qkv.weight": (3 * D, D),
                       b + "attn.qkv.bias": (3 * D,), b + "attn.proj.weight": (D, D), b + "attn.proj.bias": (D,),
                       b + "ls1.gamma": (D,), b + "norm2.weight": (D,), b + "norm2.bias": (D,),
                       b + "mlp.fc1.weight": (4 * D, D), b + "mlp.fc1.bias": (4 * D,),
                       b + "mlp.fc2.weight": (D, 4 * D), b + "mlp.fc2.bias": (D,), b + "ls2.gamma": (D,)})
    shapes.update({"norm.weight": (D,), "norm.bias": (D,)})
    return shapes


def oracle_group(name: str, rows: np.ndarray, D: int = 4) -> np.ndarray:
    """Group of each row of a ``vit_shapes`` parameter, written out by hand (the oracle for fisherscan.groups)."""
    if name.endswith(("attn.qkv.weight", "attn.qkv.bias")):
        return np.array(["Q", "K", "V"])[rows // D]
    if ".mlp." in name:
        group = "FFN"
    elif ".attn.proj." in name:
        group = "attn-proj"
    elif "norm" in name:
        group = "norm"
    elif name in ("cls_token", "pos_embed") or name.startswith("patch_embed."):
        group = "embed"
    else:
        group = "other"
    return np.full(len(rows), group)


def element_frame(by_name: dict[str, torch.Tensor], top: float) -> pd.DataFrame:
    """The oracle of the score tables: one row per element, in element order (parameters in file order,
    row-major): param, block, group (``oracle_group``), value, and whether the element is in the exact top-k of
    the Q/K/V/FFN candidates (stable sort: ties to the earlier element)."""
    parts = []
    for name, tensor in by_name.items():
        values = tensor.reshape(-1).double().numpy()
        rows = np.arange(values.size) // (values.size // tensor.shape[0])
        block = int(name.split(".")[1]) if name.startswith("blocks.") else -1
        parts.append(pd.DataFrame({"param": name, "block": block, "group": oracle_group(name, rows), "value": values}))
    frame = pd.concat(parts, ignore_index=True)
    candidates = np.flatnonzero(frame["group"].isin(("Q", "K", "V", "FFN")).to_numpy())
    k = math.ceil(top * len(candidates))
    chosen = candidates[np.argsort(-frame["value"].to_numpy()[candidates], kind="stable")[:k]]
    frame["selected"] = False
    frame.loc[chosen, "selected"] = True
    return frame


# ----------------------------------------------------------------------------------------------------------
# Oracles of the Fisher tests (``tests/fisher``): a brute-force per-image autograd loop and Eq. 6 by hand


IGNORE = 255


def batch(seed: int = 0, b: int = 3, size: tuple[int, int] = (16, 20), label_size: tuple[int, int] = (15, 21),
          classes: int = 4):
    """Images whose sides are patch multiples, labels of another size (upsampling), some ignored pixels."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(b, 3, *size, generator=g)
    y = torch.randint(0, classes, (b, *label_size), generator=g)
    y[0, :4] = IGNORE
    y[-1, :, -3:] = IGNORE
    return x, y


def brute_force_fisher(model, batches, uniforms=None, hook=None):
    """Oracle: one forward and backward per image, plain autograd; own inverse-CDF sampling (searchsorted)."""
    total = {n: torch.zeros_like(p) for n, p in model.named_parameters() if p.requires_grad}
    images = 0
    for k, (x, y) in enumerate(batches):
        for i in range(x.shape[0]):
            if hook is not None:
                hook.image = i
            model.zero_grad()
            logits = F.interpolate(model(x[i:i + 1]), size=y.shape[-2:], mode="bilinear", align_corners=False)[0]
            valid = y[i] != IGNORE
            if uniforms is None:
                target = y[i].clone()
            else:
                cdf = torch.softmax(logits.detach(), 0).cumsum(0).permute(1, 2, 0).contiguous()
                target = torch.searchsorted(cdf, uniforms[k][i].unsqueeze(-1).contiguous()).squeeze(-1)
                target = target.clamp(max=logits.shape[0] - 1)
            target[~valid] = 0
            pixel_loss = F.cross_entropy(logits.unsqueeze(0), target.unsqueeze(0), reduction="none")[0]
            (pixel_loss * valid).sum().backward()
            for n, p in model.named_parameters():
                if p.requires_grad:
                    total[n] += p.grad.detach() ** 2
            images += 1
    return {n: v / images for n, v in total.items()}


def assert_close_dicts(actual, expected, rtol=1e-4):
    assert set(actual) == set(expected)
    for name in expected:
        scale = expected[name].abs().max().clamp_min(1e-12)
        err = (actual[name] - expected[name]).abs().max() / scale
        assert err < rtol, f"{name}: relative error {err:.2e}"


class OracleShift:
    """Eq. 6 written out independently, applied to the image ``self.image`` of a per-image loop."""

    def __init__(self, eps_mu, eps_sigma, spread_mu, spread_sigma, prefix):
        self.eps_mu, self.eps_sigma, self.spread = eps_mu, eps_sigma, (spread_mu, spread_sigma)
        self.prefix, self.image = prefix, 0

    def __call__(self, module, args):
        tokens = args[0]
        patch = tokens[:, self.prefix:]
        mu = patch.mean(1)
        sigma = torch.sqrt(patch.var(1) + 1e-6)
        alpha = mu + self.eps_mu[self.image] * self.spread[0]
        beta = sigma + self.eps_sigma[self.image] * self.spread[1]
        shifted = beta[:, None] * (patch - mu[:, None]) / sigma[:, None] + alpha[:, None]
        return (torch.cat([tokens[:, : self.prefix], shifted], 1),)


# ----------------------------------------------------------------------------------------------------------
# CLI results and score files shared by the command tests (``from conftest import ok, ...``)


def ok(result):
    """A CliRunner result that exited 0 (else everything it printed and raised)."""
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n" \
                                  f"exception: {result.exception!r}"
    return result


def invoke(*args, cwd=None):
    """``fisherscan *args`` in this process (typer's CliRunner), the arguments as strings, from ``cwd`` if given."""
    from typer.testing import CliRunner

    from fisherscan.cli import app

    with pytest.MonkeyPatch.context() as patch:
        if cwd is not None:
            patch.chdir(cwd)
        return CliRunner().invoke(app, [str(a) for a in args])


def one_error_line(result, *needles: str) -> str:
    """Exit code 2, no traceback, one 'error:' line (the last on stderr) naming every needle."""
    assert result.exit_code == 2, f"exit {result.exit_code}: {result.exception!r}\n{result.stdout}\n{result.stderr}"
    assert isinstance(result.exception, SystemExit), repr(result.exception)
    assert "Traceback" not in result.stderr and "Traceback" not in result.stdout
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    errors = [line for line in lines if line.startswith("error:")]
    assert len(errors) == 1 and lines[-1] == errors[0], result.stderr
    for needle in needles:
        assert needle in errors[0], f"{needle!r} not in {errors[0]!r}"
    return errors[0]


def placed(path, folder):
    """The contents of a file fisherscan wrote, with the absolute ``folder`` in them written as '<folder>': files
    record absolute paths, so the same run in two folders writes the same files apart from those. Safetensors:
    (header without its alignment padding, tensor bytes)."""
    from pathlib import Path

    raw, marker = Path(path).read_bytes(), str(folder).encode()
    if Path(path).suffix != ".safetensors":
        return raw.replace(marker, b"<folder>")
    size = int.from_bytes(raw[:8], "little")
    return raw[8:8 + size].rstrip(b" ").replace(marker, b"<folder>"), raw[8 + size:]


def write_random_scores(path, model: str, images: int, seed: int = 123):
    """A scores file of uniform random values with ``model``'s names and shapes (tune needs no real scores)."""
    from fisherscan.models.backbone import build_backbone
    from fisherscan.scores.file import save_scores

    torch.manual_seed(seed)
    backbone = build_backbone(model, random_init=True).model
    g = torch.Generator().manual_seed(0)
    kinds = {kind: {n: torch.rand(p.shape, generator=g) for n, p in backbone.named_parameters()}
             for kind in ("fim", "fim_shift", "delta", "drfim")}
    save_scores(path, kinds, {"model": model, "images": images, "head": None})
    return path
