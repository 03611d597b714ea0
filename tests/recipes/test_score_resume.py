"""``fisherscan score`` robustness (diagonal estimator): the resumable partial file, --stop-after / --resume,
automatic continuation, refusal on changed options, and skipping batches with non-finite gradients.

Tiny on purpose: a randomly initialised ViT-Ti/16 on 8 procedural 48x48 images, 32-pixel crops, batches of 2
(4 batches), 2 warm-up steps, on the CPU. The oracle for resuming is an uninterrupted run: the scores file (and
the head) must be the same bytes, apart from the run's own folder in the paths they record.
"""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import invoke, ok, one_error_line, placed

from fisherscan.data.synthetic import write_dataset
from fisherscan.fisher.engine import HookEngine
from fisherscan.scores.file import load_scores

IMAGES = 8
BATCH = 2
COMMON = ["--model", "timm:vit_tiny_patch16_224", "--random-init", "--crop", "32", "--workers", "0",
          "--warmup-steps", "2", "--batch-size", str(BATCH), "--seed", "0"]



def score_in(data: Path, out: Path, *extra):
    """Run ``score`` from ``out``'s folder with ``--out`` relative to it (the metadata records it absolute: files of
    runs in different folders are compared with their folders taken out, ``placed``)."""
    out = Path(out)
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(out.parent)
        return invoke("score", *COMMON, "--data", data, "--out", out.name, *extra)


def partial(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".partial.safetensors")


def head(out: Path) -> Path:
    return out.with_name(out.name.removesuffix(".safetensors") + ".head.safetensors")


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return write_dataset(root, domains=("source",), images_per_domain=IMAGES, size=(48, 48), seed=5)["source"]


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory, data) -> Path:
    out = tmp_path_factory.mktemp("whole") / "scores.safetensors"
    ok(score_in(data, out))
    assert not partial(out).exists()
    return out


def test_stop_then_resume_is_byte_identical(tmp_path, data, uninterrupted):
    out = tmp_path / "scores.safetensors"
    stopped = ok(score_in(data, out, "--stop-after", 2, "--save-every", 1))
    assert "stopped after 2 batches" in stopped.stdout and "--resume" in stopped.stdout
    assert partial(out).is_file() and not out.exists()
    assert partial(out).name in stopped.stdout

    resumed = ok(score_in(data, out, "--resume"))
    assert "continued" in resumed.stdout
    assert placed(out, tmp_path) == placed(uninterrupted, uninterrupted.parent)
    assert placed(head(out), tmp_path) == placed(head(uninterrupted), uninterrupted.parent)
    assert not partial(out).exists()
    assert "continued" not in " ".join(load_scores(out)[1]["notes"])  # the file does not say it was continued


def test_plain_rerun_continues_automatically_with_a_notice(tmp_path, data, uninterrupted):
    out = tmp_path / "scores.safetensors"
    ok(score_in(data, out, "--stop-after", 1))
    step = ok(score_in(data, out, "--resume", "--stop-after", 1, "--workers", 1))  # a free option may change
    assert "2 of 4 batches" in step.stdout
    again = ok(score_in(data, out))
    assert "note:" in again.stdout and "continued" in again.stdout and "from image 4" in again.stdout
    assert placed(out, tmp_path) == placed(uninterrupted, uninterrupted.parent)
    assert not partial(out).exists()


def test_changed_options_are_refused_and_overwrite_discards(tmp_path, data):
    out = tmp_path / "scores.safetensors"
    ok(score_in(data, out, "--stop-after", 1))
    saved = partial(out).read_bytes()

    one_error_line(score_in(data, out, "--seed", 1), "seed", "--overwrite", partial(out).name)
    one_error_line(score_in(data, out, "--resume", "--crop", 48), "--resume", "crop")
    assert partial(out).read_bytes() == saved and not out.exists()

    fresh = ok(score_in(data, out, "--seed", 1, "--overwrite"))
    assert "continued" not in fresh.stdout
    assert out.is_file() and not partial(out).exists()
    assert load_scores(out)[1]["seed"] == 1

    one_error_line(score_in(data, tmp_path / "other.safetensors", "--resume"), "--resume", "partial")


@pytest.fixture
def nan_on_second_batch(monkeypatch):
    """The engine returns NaN for the clean pass of the second batch: its fourth call, after the first batch's
    clean pass (its two label draws on one forward) and its two shifted passes."""
    original = HookEngine.squared_gradient_sum_over_draws
    calls = {"n": 0}

    def patched(*args, **kwargs):
        sums = original(*args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            assert len(args[3]) == 2, "the clean pass: both label draws"
            name = next(iter(sums))
            sums[name] = sums[name].clone()
            sums[name].view(-1)[0] = float("nan")
        return sums

    monkeypatch.setattr(HookEngine, "squared_gradient_sum_over_draws", patched)
    return calls


def test_non_finite_batch_is_skipped_and_counted(tmp_path, data, nan_on_second_batch):
    out = tmp_path / "scores.safetensors"
    result = ok(score_in(data, out, "--max-bad-frac", 0.5))
    assert "non-finite" in result.stderr
    scores, meta = load_scores(out)
    assert meta["bad_batches"] == 1
    assert meta["images"] == IMAGES - BATCH
    assert any("non-finite" in note for note in meta["notes"])
    for kind, by_name in scores.items():
        for name, value in by_name.items():
            assert torch.isfinite(value).all(), f"{kind}/{name}"
    assert math.isfinite(meta["shift"]["weight"])


def test_too_many_bad_batches_is_one_error_line(tmp_path, data, nan_on_second_batch):
    out = tmp_path / "scores.safetensors"
    one_error_line(score_in(data, out), "--max-bad-frac", "1 of 4 batches")
    assert not out.exists()


@pytest.mark.parametrize("option, value", [("--save-every", 0), ("--stop-after", 0), ("--max-bad-frac", 1.5)])
def test_invalid_robustness_options(tmp_path, data, option, value):
    one_error_line(score_in(data, tmp_path / "s.safetensors", option, value), option)


# ----------------------------------------------------------------------------------------------------------
# the variational estimator (Eq. 10-14): its fits are saved every --save-every steps


VARIATIONAL = ["--model", "timm:vit_tiny_patch16_224?depth=2&embed_dim=32&num_heads=2", "--estimator", "variational",
               "--var-steps", 20, "--save-every", 1]


@pytest.mark.parametrize("curvature", ["vogn", "reparam"])
def test_variational_stop_and_continue_is_byte_identical(tmp_path, data, curvature):
    """Stops inside the pilot that picks tau (global step 2 of 44), in the clean fit, exactly between the two fits
    (step 24) and in the shifted fit after its convergence snapshot (step 43) must all continue to the bytes of an
    uninterrupted run (the oracle)."""
    options = [*VARIATIONAL, "--var-curvature", curvature]
    whole = tmp_path / "whole" / "scores.safetensors"
    whole.parent.mkdir()
    ok(score_in(data, whole, *options))
    out = tmp_path / "stopped" / "scores.safetensors"
    out.parent.mkdir()
    first = ok(score_in(data, out, *options, "--stop-after", 2))
    assert "2 of 44 variational steps done" in " ".join(first.stdout.split()) and not out.exists()
    ok(score_in(data, out, *options, "--resume", "--stop-after", 5))  # global step 7: in the clean fit
    ok(score_in(data, out, *options, "--resume", "--stop-after", 17))  # step 24: the clean fit is done
    ok(score_in(data, out, *options, "--resume", "--stop-after", 19))  # step 43: shifted fit's snapshot taken
    again = ok(score_in(data, out, *options))
    assert "from variational step 43 of 44" in " ".join(again.stdout.split())
    assert placed(out, out.parent) == placed(whole, whole.parent)
    assert placed(head(out), out.parent) == placed(head(whole), whole.parent)
    assert not partial(out).exists()
    one_error_line(score_in(data, out.with_name("x.safetensors"), *options, "--resume"), "--resume")
