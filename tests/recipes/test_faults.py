"""Long runs survive faults and bad input (issue 7): kill -9, bad files, malicious checkpoints, NaN batches.

Oracles: a run that was never interrupted (its files must be the same bytes as a killed-and-continued run's), a
run on a copy of the data set with the bad pairs removed (``--skip-bad`` must score exactly those images), the
state before a skipped step (a NaN step must change nothing), and a marker file a pickle payload would create.

Covered elsewhere and not repeated here: a missing or empty data folder, an undecodable or truncated image and an
image/label size mismatch through the CLI (tests/test_cli.py), an existing output without --overwrite
(tests/test_cli.py for score, tests/test_tuning.py for tune), NaN batches in ``score`` (tests/test_resume.py),
the library-level checkpoint key checks and the malicious .pth (tests/test_models.py).

Tiny on purpose: a 2-block, 32-wide ViT with 16-pixel patches on 8 procedural 40x40 images, 32-pixel crops. The
killed runs are real ``python -m fisherscan`` processes slowed by ``FISHERSCAN_TEST_DELAY`` (a sleep after each
batch or step that changes no result) so the signal lands mid-run; their continuations run in process.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import invoke, ok, one_error_line, placed, write_random_scores
from PIL import Image
from safetensors.torch import load_file, save_file

import fisherscan
import fisherscan.models.segmenter
import fisherscan.recipes.tune
from fisherscan.data.synthetic import write_dataset
from fisherscan.io import read_tensors
from fisherscan.models.backbone import build_backbone
from fisherscan.runtime import DELAY_VARIABLE
from fisherscan.scores.file import load_scores, save_scores

MODEL = "timm:vit_tiny_patch16_224?depth=2&embed_dim=32&num_heads=2"
IMAGES = 8
SCORE = ["--model", MODEL, "--random-init", "--crop", "32", "--workers", "0", "--warmup-steps", "1",
         "--batch-size", "2", "--seed", "0", "--save-every", "1"]
ROOT = Path(fisherscan.__file__).resolve().parents[1]





def kill_when_written(args: list, cwd: Path, watched: Path, delay: float = 0.4, timeout: float = 300) -> None:
    """Start ``python -m fisherscan *args`` in ``cwd``, SIGKILL it as soon as ``watched`` exists."""
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1",
           DELAY_VARIABLE: str(delay)}
    process = subprocess.Popen([sys.executable, "-m", "fisherscan", *map(str, args)], cwd=cwd, env=env,
                               stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + timeout
    try:
        while not watched.exists():
            assert process.poll() is None, f"finished before {watched.name} appeared: {process.stderr.read()!r}"
            assert time.monotonic() < deadline, f"no {watched.name} after {timeout} s"
            time.sleep(0.01)
        os.kill(process.pid, signal.SIGKILL)
    finally:
        if process.poll() is None:
            process.kill()
        process.wait()
        process.stderr.close()
    assert process.returncode == -signal.SIGKILL


def copy_dataset(src: Path, dst: Path, leave_out: tuple[str, ...] = ()) -> Path:
    for sub in ("images", "labels"):
        (dst / sub).mkdir(parents=True)
        for file in sorted((src / sub).iterdir()):
            if file.stem not in leave_out:
                (dst / sub / file.name).write_bytes(file.read_bytes())
    return dst


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), domains=("source",), images_per_domain=IMAGES,
                         size=(40, 40), seed=2)["source"]


@pytest.fixture(scope="module")
def scores_file(tmp_path_factory) -> Path:
    """Random scores with the model's names and shapes (tune needs no real ones)."""
    return write_random_scores(tmp_path_factory.mktemp("scores") / "scores.safetensors", MODEL, IMAGES, seed=0)


def tune_args(scores_file: Path, data: Path, *extra) -> list:
    return ["tune", "--scores", scores_file, "--model", MODEL, "--random-init", "--data", data, "--out", "run",
            "--crop", 32, "--batch-size", 2, "--steps", 6, "--lr", 1e-2, "--warmup-steps", 1, "--workers", 0,
            "--seed", 3, "--save-every", 1, *extra]


# ----------------------------------------------------------------------------------------------------------
# kill -9 mid-run, then the same command again


@pytest.mark.slow
def test_score_killed_mid_run_continues_to_the_same_bytes(tmp_path, data):
    args = ["score", *SCORE, "--data", data, "--out", "scores.safetensors"]
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    kill_when_written(args, killed, killed / "scores.partial.safetensors")
    assert (killed / "scores.partial.safetensors").is_file() and not (killed / "scores.safetensors").exists()

    again = ok(invoke(*args, cwd=killed))
    assert "continued the stopped run" in again.stdout
    ok(invoke(*args, cwd=whole))
    for name in ("scores.safetensors", "scores.head.safetensors", "scores.groups.csv"):
        assert placed(killed / name, killed) == placed(whole / name, whole), name
    assert not (killed / "scores.partial.safetensors").exists()


@pytest.mark.slow
def test_tune_killed_mid_run_continues_to_the_same_bytes(tmp_path, data, scores_file):
    args = tune_args(scores_file, data)
    whole, killed = tmp_path / "whole", tmp_path / "killed"
    whole.mkdir(), killed.mkdir()
    kill_when_written(args, killed, killed / "run" / "checkpoint.safetensors")
    assert (killed / "run" / "checkpoint.safetensors").is_file() and not (killed / "run" / "model.safetensors").exists()

    again = ok(invoke(*args, cwd=killed))
    assert "continued the stopped run" in again.stdout
    ok(invoke(*args, cwd=whole))
    for name in ("model.safetensors", "manifest.json", "log.csv", "checkpoint.safetensors"):
        assert placed(killed / "run" / name, killed) == placed(whole / "run" / name, whole), name


# ----------------------------------------------------------------------------------------------------------
# bad input: one line, exit code 2


def damage(data: Path, folder: Path, case: str) -> Path:
    """A copy of ``data`` with one fault of the issue's list."""
    bad = copy_dataset(data, folder)
    label = bad / "labels" / "scene_00001.png"
    if case == "corrupt label":
        label.write_bytes(label.read_bytes()[:60])
    elif case == "label values":
        Image.fromarray(np.full((40, 40), 40, dtype=np.uint8)).save(label)
    return bad


@pytest.mark.parametrize("case, needles", [
    ("corrupt label", ("scene_00001.png", "cannot read")),
    ("label values", ("scene_00001.png", "40", "trainIds", "--layout")),
])
def test_bad_label_is_one_error_line(tmp_path, data, case, needles):
    bad = damage(data, tmp_path / "bad", case)
    one_error_line(invoke("score", *SCORE, "--data", bad, "--out", tmp_path / "s.safetensors"), *needles)
    assert not (tmp_path / "s.safetensors").exists()


def test_undetectable_layout(tmp_path, data):
    (tmp_path / "photos").mkdir()
    (tmp_path / "photos" / "a.png").write_bytes((data / "images" / "scene_00000.png").read_bytes())
    one_error_line(invoke("score", *SCORE, "--data", tmp_path / "photos", "--out", tmp_path / "s.safetensors"),
                   str(tmp_path / "photos"), "cannot recognise", "--layout")


def unwritable_folder(tmp_path: Path) -> Path:
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    if os.access(folder, os.W_OK):  # root writes anywhere but not into /proc/sys
        folder = Path("/proc/sys")
    if os.access(folder, os.W_OK) or not folder.is_dir():
        pytest.skip("no unwritable folder on this machine")
    return folder


def test_unwritable_output_folder(tmp_path, data, scores_file):
    folder = unwritable_folder(tmp_path)
    one_error_line(invoke("score", *SCORE, "--data", data, "--out", folder / "s.safetensors"),
                   str(folder), "not writable")
    args = tune_args(scores_file, data)
    args[args.index("run")] = folder / "run"
    one_error_line(invoke(*args), str(folder / "run"), "--out")


@pytest.fixture(scope="module")
def wrong_scores(tmp_path_factory, scores_file) -> dict[str, Path]:
    """Scores files that do not fit MODEL: a missing name, a wrong shape, the same shapes of another model."""
    scores, meta = load_scores(scores_file)
    folder = tmp_path_factory.mktemp("wrong")
    missing = {k: {n: v for n, v in by.items() if n != "blocks.1.attn.qkv.weight"} for k, by in scores.items()}
    shape = {k: {**by, "norm.weight": torch.ones(7)} for k, by in scores.items()}
    files = {"missing": (missing, meta), "shape": (shape, meta), "other model": (scores, {**meta,
                                                                                          "model": "dinov2_vits14"})}
    for name, (kinds, info) in files.items():
        save_scores(folder / f"{name}.safetensors", kinds, info)
    return {name: folder / f"{name}.safetensors" for name in files}


@pytest.mark.parametrize("case, needles", [("missing", ("1 missing", "blocks.1.attn.qkv.weight")),
                                           ("shape", ("1 wrong shapes", "norm.weight")),
                                           ("other model", ("dinov2_vits14", "--model"))])
def test_scores_that_do_not_match_the_model(tmp_path, data, wrong_scores, case, needles):
    result = invoke(*tune_args(wrong_scores[case], data), cwd=tmp_path)
    one_error_line(result, str(wrong_scores[case]), "does not match --model", *needles)
    assert not (tmp_path / "run").exists()


def test_weights_with_unexpected_keys(tmp_path, data):
    torch.manual_seed(0)
    state = build_backbone(MODEL, random_init=True).model.state_dict()
    path = tmp_path / "weights.safetensors"
    save_file({**{k: v.contiguous() for k, v in state.items()}, "blocks.0.extra.weight": torch.ones(3)}, str(path))
    args = [a for a in SCORE if a != "--random-init"]
    one_error_line(invoke("score", *args, "--weights", path, "--data", data, "--out", tmp_path / "s.safetensors"),
                   str(path), "1 unexpected", "blocks.0.extra.weight")


def test_tune_checkpoint_with_unexpected_keys(tmp_path, data, scores_file):
    ok(invoke(*tune_args(scores_file, data, "--stop-after", 1), cwd=tmp_path))
    checkpoint = tmp_path / "run" / "checkpoint.safetensors"
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as handle:
        metadata = handle.metadata()
    tensors = load_file(str(checkpoint))
    save_file({**tensors, "backbone/not_a_parameter": torch.zeros(2)}, str(checkpoint), metadata=metadata)
    one_error_line(invoke(*tune_args(scores_file, data), cwd=tmp_path), "checkpoint.safetensors", "1 unexpected",
                   "not_a_parameter", "--overwrite")


class _Payload:
    """Unpickling this runs a shell command that creates a marker file."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch '{self.marker}'",)


@pytest.mark.parametrize("option, name", [("--weights", "evil.pth"), ("--weights", "evil.safetensors"),
                                          ("--head", "evil.safetensors")])
def test_malicious_checkpoint_is_refused_without_running(tmp_path, data, option, name):
    marker = tmp_path / "pwned"
    path = tmp_path / name
    torch.save({"cls_token": torch.zeros(1, 1, 32), "evil": _Payload(marker)}, path)
    probe = tmp_path / "probe"  # the payload is live: an unsafe load runs it (so this test can fail)
    torch.save({"evil": _Payload(probe)}, tmp_path / "probe.pth")
    torch.load(tmp_path / "probe.pth", weights_only=False)
    assert probe.exists()

    args = [a for a in SCORE if option != "--weights" or a != "--random-init"]
    one_error_line(invoke("score", *args, option, path, "--data", data, "--out", tmp_path / "s.safetensors"),
                   str(path))
    assert not marker.exists()


# ----------------------------------------------------------------------------------------------------------
# --skip-bad


@pytest.fixture(scope="module")
def damaged(tmp_path_factory, data) -> dict[str, Path]:
    """A copy with a truncated image (scene_00002), a label of bad values (scene_00005) and a size mismatch
    (scene_00006); and a copy without those three pairs."""
    root = tmp_path_factory.mktemp("damaged")
    bad = copy_dataset(data, root / "bad")
    image = bad / "images" / "scene_00002.png"
    image.write_bytes(image.read_bytes()[:200])
    Image.fromarray(np.full((40, 40), 99, dtype=np.uint8)).save(bad / "labels" / "scene_00005.png")
    Image.fromarray(np.zeros((32, 40), dtype=np.uint8)).save(bad / "labels" / "scene_00006.png")
    clean = copy_dataset(data, root / "clean", leave_out=("scene_00002", "scene_00005", "scene_00006"))
    return {"bad": bad, "clean": clean}


SKIPPED = ["scene_00002.png", "scene_00005.png", "scene_00006.png"]


def test_score_skip_bad_scores_exactly_the_good_pairs_and_resumes(tmp_path, damaged):
    """Oracle: a run on a copy without the bad pairs (same scores); a stopped and continued run gives them too."""
    out, reference = tmp_path / "skip.safetensors", tmp_path / "clean.safetensors"
    one_error_line(invoke("score", *SCORE, "--data", damaged["bad"], "--out", out), "scene_00006.png", "40x32")
    stopped = ok(invoke("score", *SCORE, "--skip-bad", "--data", damaged["bad"], "--out", out, "--stop-after", 1))
    assert "3 of 8" in stopped.stdout
    done = ok(invoke("score", *SCORE, "--skip-bad", "--data", damaged["bad"], "--out", out))
    assert "--skip-bad: 3 of 8 image/label pairs" in done.stdout and "continued" in done.stdout
    ok(invoke("score", *SCORE, "--data", damaged["clean"], "--out", reference))

    scores, meta = load_scores(out)
    expected, _ = load_scores(reference)
    assert [Path(s["image"]).name for s in meta["skipped_pairs"]] == SKIPPED
    assert "trainIds" in meta["skipped_pairs"][1]["reason"] and "40x32" in meta["skipped_pairs"][2]["reason"]
    assert meta["images"] == IMAGES - 3 and meta["options"]["skip_bad"]
    for kind in expected:
        for name in expected[kind]:
            assert torch.equal(scores[kind][name], expected[kind][name]), f"{kind}/{name}"


def test_tune_and_eval_skip_bad(tmp_path, damaged, scores_file):
    args = tune_args(scores_file, damaged["bad"], "--steps", 2, "--skip-bad")
    result = ok(invoke(*args, cwd=tmp_path))
    assert "--skip-bad: 3 of 8" in result.stdout
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert [Path(s["image"]).name for s in manifest["skipped_pairs"]] == SKIPPED
    assert manifest["data"]["images"] == IMAGES - 3

    eval_args = ["eval", "--checkpoint", tmp_path / "run", "--data", damaged["bad"], "--crop", 32, "--stride", 32,
                 "--workers", 0, "--device", "cpu"]
    one_error_line(invoke(*eval_args), "scene_00006.png")
    result = ok(invoke(*eval_args, "--skip-bad"))
    assert "--skip-bad: 3 of 8" in result.stdout
    saved = json.loads((tmp_path / "run" / "eval" / "eval.json").read_text())
    assert [Path(s["image"]).name for s in saved["options"]["skipped_pairs"]["bad"]] == SKIPPED
    assert saved["datasets"][0]["images"] == IMAGES - 3


# ----------------------------------------------------------------------------------------------------------
# non-finite steps in tune


@pytest.fixture
def nan_on_second_step(monkeypatch):
    """The loss of the second training forward pass (step 2; the head's warm-up calls ``Segmenter.loss`` directly)
    is NaN: NaN loss and gradients."""
    original = fisherscan.models.segmenter.Segmenter.forward
    calls = {"n": 0}

    def patched(self, x, labels=None):
        out = original(self, x, labels)
        if labels is None:
            return out
        calls["n"] += 1
        return out * float("nan") if calls["n"] == 2 else out

    monkeypatch.setattr(fisherscan.models.segmenter.Segmenter, "forward", patched)
    return calls


def checkpoint_state(path: Path) -> tuple[dict, dict]:
    return read_tensors(path, "checkpoint", "")


def test_tune_skips_a_non_finite_step_without_changing_anything(tmp_path, data, scores_file, nan_on_second_step):
    """Oracle: the checkpoint after the bad step 2 holds the same weights, moments and optimizer step counts as the
    one after step 1 of a run without the fault."""
    ok(invoke(*tune_args(scores_file, data, "--stop-after", 2, "--max-bad-frac", 0.2), cwd=tmp_path))
    after_bad, info = checkpoint_state(tmp_path / "run" / "checkpoint.safetensors")
    assert info["bad_steps"] == 1 and info["log"][1]["loss"] is None
    nan_on_second_step["n"] = -100  # no more faults
    clean = tmp_path / "clean"
    clean.mkdir()
    ok(invoke(*tune_args(scores_file, data, "--stop-after", 1), cwd=clean))
    before, clean_info = checkpoint_state(clean / "run" / "checkpoint.safetensors")
    assert set(after_bad) == set(before) and all(torch.equal(after_bad[k], before[k]) for k in before)
    assert info["optimizer_steps"] == clean_info["optimizer_steps"]

    done = ok(invoke(*tune_args(scores_file, data, "--max-bad-frac", 0.2), cwd=tmp_path))
    assert "1 of 6 steps had non-finite" in done.stdout
    manifest = json.loads((tmp_path / "run" / "manifest.json").read_text())
    assert manifest["bad_steps"] == 1
    assert all(torch.isfinite(v).all() for v in load_file(str(tmp_path / "run" / "model.safetensors")).values())


def test_tune_with_too_many_bad_steps_stops_with_one_line(tmp_path, data, scores_file, nan_on_second_step):
    result = invoke(*tune_args(scores_file, data), cwd=tmp_path)  # 1 of 6 > 0.1
    one_error_line(result, "--max-bad-frac", "1 of 6 steps")
    checkpoint, info = checkpoint_state(tmp_path / "run" / "checkpoint.safetensors")
    assert info["step"] == 1 and all(torch.isfinite(v).all() for v in checkpoint.values())
    assert not (tmp_path / "run" / "model.safetensors").exists()
