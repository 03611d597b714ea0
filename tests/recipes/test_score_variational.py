"""``fisherscan score --estimator variational`` end to end: the file holds the precisions, Eq. 14 on them equals the
saved F (recomputed here from gamma, tau and the likelihood scale in the metadata), and the ELBO terms are recorded."""

from __future__ import annotations

import torch
from typer.testing import CliRunner

from fisherscan.cli import app
from fisherscan.data.synthetic import write_dataset
from fisherscan.scores.file import load_scores


def test_variational_scores_file(tmp_path):
    source = write_dataset(tmp_path / "data", domains=("source",), images_per_domain=4, size=(48, 48))["source"]
    out = tmp_path / "v.safetensors"
    result = CliRunner().invoke(app, ["score", "--model", "timm:vit_tiny_patch16_224", "--random-init", "--data",
                                      str(source), "--crop", "32", "--batch-size", "2", "--warmup-steps", "1",
                                      "--workers", "0", "--estimator", "variational", "--var-steps", "4",
                                      "--gamma", "2.0", "--tau", "0.01", "--out", str(out)])
    assert result.exit_code == 0, result.output
    scores, meta = load_scores(out)
    assert set(scores) == {"fim", "fim_shift", "delta", "drfim", "precision", "precision_shift"}
    info = meta["variational"]
    assert meta["estimator"] == "variational" and info["gamma"] == 2.0 and info["tau"] == 0.01
    assert info["steps"] == 4 and info["likelihood_scale"] == 4.0
    assert set(info["final_terms"]["clean"]) == {"expected_loss", "kl", "objective"}
    for clean, precision in (("fim", "precision"), ("fim_shift", "precision_shift")):
        for name, value in scores[precision].items():
            eq14 = (2.0 * (value - 0.01 ** -2) / 4.0).clamp_min(0)
            assert torch.allclose(scores[clean][name], eq14, rtol=1e-5, atol=1e-6), name
    assert all(torch.isfinite(t).all() for kind in scores.values() for t in kind.values())
