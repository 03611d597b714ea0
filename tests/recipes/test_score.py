"""End-to-end tests of ``fisherscan score`` through the command line (typer's CliRunner, in process).

Everything runs on CPU with a randomly initialised ViT-Ti/16, 4 procedural 48x48 images and a 32-pixel crop
(2x2 patches), so one scoring run takes about a second. The oracles are independent of fisherscan's code:
parameter names and shapes come from a timm model built here, Eq. 5/7 are recomputed here from the saved
F(x), F(x') and the metadata, and Eq. 9 is recomputed by a plain per-image autograd loop.
"""

from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import timm
import torch
import torch.nn.functional as F
from conftest import invoke, one_error_line
from PIL import Image
from safetensors.torch import load_file

import fisherscan
from fisherscan.data.synthetic import write_dataset
from fisherscan.recipes.score_record import rebalance
from fisherscan.scores.file import load_scores

MODEL = "timm:vit_tiny_patch16_224"
TIMM_NAME = "vit_tiny_patch16_224"
IMAGES = 4
CROP = 32
KINDS = ("fim", "fim_shift", "delta", "drfim")
FAST = ["--model", MODEL, "--random-init", "--crop", str(CROP), "--workers", "0"]



# ----------------------------------------------------------------------------------------------------------
# helpers


def score(data: Path, out: Path, *extra, warmup: int = 2, batch_size: int = 2, seed: int = 0):
    """Run ``fisherscan score`` and require success; returns the CliRunner result."""
    args = ["score", *FAST, "--data", data, "--out", out, "--warmup-steps", warmup, "--batch-size", batch_size,
            "--seed", seed, *extra]
    result = invoke(*args)
    assert result.exit_code == 0, f"exit {result.exit_code}\nstdout:\n{result.stdout}\nstderr:\n{result.stderr}\n" \
                                  f"exception: {result.exception!r}"
    return result


def reference_backbone(seed: int | None = None) -> torch.nn.Module:
    """The same timm architecture fisherscan builds (classifier-free, dynamic image size), built here."""
    if seed is not None:
        torch.manual_seed(seed)
    return timm.create_model(TIMM_NAME, pretrained=False, num_classes=0, dynamic_img_size=True).eval()


def assert_same_scores(a: dict, b: dict, **tolerance) -> None:
    assert set(a) == set(b)
    for kind in a:
        assert set(a[kind]) == set(b[kind]), kind
        for name in a[kind]:
            if tolerance:
                torch.testing.assert_close(a[kind][name], b[kind][name], **tolerance, msg=f"{kind}/{name}")
            else:
                assert torch.equal(a[kind][name], b[kind][name]), f"{kind}/{name} differs"


# ----------------------------------------------------------------------------------------------------------
# fixtures: one dataset and a handful of runs shared by the module


@pytest.fixture(scope="module")
def data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("data")
    return write_dataset(root, domains=("source",), images_per_domain=IMAGES, size=(48, 48), seed=3)["source"]


@pytest.fixture(scope="module")
def base(tmp_path_factory, data):
    """The reference run: seed 0, batch size 2, 2 warm-up steps, default (normalised) DR-FIM."""
    # a long folder name: printed paths must survive a narrow (80-column, non-terminal) console unbroken
    out = tmp_path_factory.mktemp("base-" + "long" * 20) / "scores.safetensors"
    result = score(data, out)
    scores, meta = load_scores(out)
    return {"out": out, "result": result, "scores": scores, "meta": meta,
            "head": out.with_name("scores.head.safetensors"), "csv": out.with_name("scores.groups.csv")}


@pytest.fixture(scope="module")
def reused_head(tmp_path_factory, data, base):
    """Same options as ``base`` but the head loaded from base's head file and no warm-up."""
    out = tmp_path_factory.mktemp("reuse") / "scores.safetensors"
    score(data, out, "--head", base["head"], warmup=0)
    return load_scores(out)


# ----------------------------------------------------------------------------------------------------------
# end to end


def test_score_writes_a_complete_scores_file(base):
    scores = base["scores"]
    reference = dict(reference_backbone().named_parameters())
    assert not any(name.startswith("head.") for name in reference)
    assert set(scores) == set(KINDS)
    for kind in KINDS:
        assert set(scores[kind]) == set(reference), kind
        for name, tensor in scores[kind].items():
            assert tensor.shape == reference[name].shape, f"{kind}/{name}"
            assert tensor.dtype == torch.float32
            assert torch.isfinite(tensor).all(), f"{kind}/{name} not finite"
            assert (tensor >= 0).all(), f"{kind}/{name} negative"
    # a Fisher that is zero everywhere would pass every check above
    assert sum(float(t.sum()) for t in scores["fim"].values()) > 0
    assert sum(float(t.sum()) for t in scores["fim_shift"].values()) > 0


def test_score_metadata_records_every_choice(base, data):
    meta = base["meta"]
    for key in ("schema_version", "fisherscan_version", "model", "weights", "weights_sha256", "estimator", "images",
                "seed", "labels", "loss_reduction", "normalization", "delta_eps", "shift", "perturbation", "crop",
                "padding", "decoder", "head"):
        assert key in meta, key
    assert meta["schema_version"] == 1
    assert meta["fisherscan_version"] == fisherscan.__version__
    assert meta["model"] == MODEL
    assert meta["weights"] is None and meta["weights_sha256"] is None  # --random-init: no checkpoint
    assert meta["estimator"] == "diagonal"
    assert meta["images"] == IMAGES
    assert meta["seed"] == 0
    assert meta["labels"] == "sampled"
    assert "sum" in meta["loss_reduction"]
    assert meta["normalization"]["scale"] > 0
    assert meta["delta_eps"] == 1e-3
    shift = meta["shift"]
    assert shift["magnitude"] > 0
    assert shift["weight"] == pytest.approx(math.exp(-shift["magnitude"]))
    assert "block 0" in meta["perturbation"]["site"]
    assert meta["crop"] == CROP
    assert meta["padding"]["pad_to_multiple_of"] == 16 and meta["padding"]["padded_size"] == 32
    assert meta["decoder"] == "linear"
    assert Path(meta["head"]) == base["head"]


def test_score_writes_head_and_groups_csv_beside_the_scores(base):
    assert base["head"].is_file()
    head = load_file(str(base["head"]))
    assert head["classifier.weight"].shape == (19, 192)
    assert base["csv"].is_file()
    frame = pd.read_csv(base["csv"])
    # every backbone element is in exactly one group
    assert frame["elements"].sum() == sum(p.numel() for p in reference_backbone().parameters())
    assert set(frame["group"]) >= {"Q", "K", "V", "FFN"}
    assert frame.filter(like="share").iloc[:, 0].sum() == pytest.approx(1.0)


def test_score_prints_the_output_paths(base):
    stdout = base["result"].stdout
    for label, path in (("scores:", base["out"]), ("head:", base["head"]), ("table:", base["csv"])):
        line = next((row for row in stdout.splitlines() if row.startswith(label)), None)
        assert line is not None, stdout
        assert line.split(None, 1)[1] == str(path), f"{label} line is {line!r}"


def test_score_prints_its_loop_timing(base):
    """Oracle: the run's own numbers -- the line names the 4 images scored and a share between 0 and 100%."""
    line = next((row for row in base["result"].stdout.splitlines() if row.startswith("timing:")), None)
    assert line is not None, base["result"].stdout
    assert line.startswith(f"timing: {IMAGES} images in ")
    share = float(line.split("waiting for data ")[1].split("%")[0])
    assert 0 <= share <= 100
    assert "timing" not in base["meta"]  # never saved: a continued run must write the same bytes


def test_timed_batches_count_the_time_blocked_in_next():
    """Oracle: time.sleep's lower bound -- a loader that sleeps 20 ms before each of 3 batches (30 ms before the
    first) has been waited on for at least 70 ms, all of it inside the loop's time."""
    import time

    from fisherscan.recipes.score_loop import TimedBatches

    def slow():
        for i, pause in enumerate((0.03, 0.02, 0.02)):
            time.sleep(pause)
            yield i

    batches = TimedBatches(slow())
    assert [next(batches) for _ in range(3)] == [0, 1, 2]
    record = batches.record(images=6)
    assert record["batches"] == 3 and record["images"] == 6
    assert record["first_batch_wait_seconds"] >= 0.03
    assert 0.07 <= record["data_wait_seconds"] <= record["loop_seconds"]
    assert record["data_wait_share"] == pytest.approx(record["data_wait_seconds"] / record["loop_seconds"])
    assert record["images_per_second"] == pytest.approx(6 / record["loop_seconds"])


# ----------------------------------------------------------------------------------------------------------
# determinism and independence


def test_same_seed_gives_identical_scores_and_another_seed_differs(tmp_path, data, base):
    score(data, tmp_path / "again.safetensors")
    again, meta = load_scores(tmp_path / "again.safetensors")
    assert_same_scores(base["scores"], again)
    assert meta["shift"] == base["meta"]["shift"]

    score(data, tmp_path / "seed1.safetensors", seed=1)
    other, _ = load_scores(tmp_path / "seed1.safetensors")
    for kind in ("fim", "drfim"):
        assert any(not torch.equal(other[kind][n], base["scores"][kind][n]) for n in other[kind]), kind


def test_head_file_is_reused_instead_of_warming_up(base, reused_head):
    scores, meta = reused_head
    assert meta["warmup"].get("source") == str(base["head"])
    for name, tensor in base["scores"]["fim"].items():
        torch.testing.assert_close(scores["fim"][name], tensor, rtol=1e-6, atol=0, msg=name)


def test_clean_fisher_does_not_depend_on_batch_size(tmp_path, data, base, reused_head):
    out = tmp_path / "b4.safetensors"
    score(data, out, "--head", base["head"], warmup=0, batch_size=4)
    b4, _ = load_scores(out)
    b2 = reused_head[0]
    # Only float32 rounding may differ (vmap over 2 vs 4 images, another summation order): about 1e-6 of a
    # tensor's largest element. Batch-dependent draws would change the Fisher by O(1).
    for name, tensor in b2["fim"].items():
        scale = float(tensor.abs().max())
        torch.testing.assert_close(b4["fim"][name], tensor, rtol=1e-5, atol=1e-4 * scale, msg=name)
        assert float((b4["fim"][name] - tensor).norm()) <= 1e-5 * float(tensor.norm()), name


# ----------------------------------------------------------------------------------------------------------
# the estimators against independent oracles


def test_normalised_drfim_matches_eq_5_and_7(base):
    """The default balance: Eq. 5 on the normalised F, then DRF = rank(F) + w rank(Delta F) over the candidates
    (scipy's average ranks divided by their count; every other element 0)."""
    from scipy.stats import rankdata

    scores, meta = base["scores"], base["meta"]
    s, w, eps = meta["normalization"]["scale"], meta["shift"]["weight"], meta["delta_eps"]
    assert meta["normalization"]["mode"] != "none" and meta["balance"]["combine"] == "rank"
    # s is the mean of F(x) over the Eq. 3 candidates: every qkv and mlp element of a ViT-Ti
    names = [n for n in scores["fim"] if ".attn.qkv." in n or ".mlp." in n]
    assert s == pytest.approx(float(torch.cat([scores["fim"][n].double().reshape(-1) for n in names]).mean()),
                              rel=1e-6)
    delta = {}
    for name in scores["fim"]:
        f, f_shift = scores["fim"][name].double() / s, scores["fim_shift"][name].double() / s
        delta[name] = (f - f_shift).abs() / (torch.minimum(f, f_shift) + eps)
        torch.testing.assert_close(scores["delta"][name].double(), delta[name], rtol=1e-4, atol=1e-6, msg=name)
    count = sum(scores["fim"][n].numel() for n in names)
    task = rankdata(torch.cat([scores["fim"][n].double().reshape(-1) for n in names]).numpy()) / count
    domain = rankdata(torch.cat([scores["delta"][n].double().reshape(-1) for n in names]).numpy()) / count
    expected = torch.from_numpy(task + w * domain)
    drfim = torch.cat([scores["drfim"][n].double().reshape(-1) for n in names])
    torch.testing.assert_close(drfim, expected, rtol=1e-5, atol=1e-6)
    assert all(not scores["drfim"][n].any() for n in scores["fim"] if n not in names)


def test_rebalance_reproduces_the_file_and_pushes_delta_out_with_a_negative_weight(base):
    """Oracles: the file's own DR-FIM (its balance, bit for bit), and scipy's ranks of F and Delta F over the
    candidates for lambda = -1: rank(F) - w rank(Delta F)."""
    from scipy.stats import rankdata

    scores, meta = base["scores"], base["meta"]
    same, same_meta = rebalance(scores, meta, meta["balance"]["drfim_weight"], meta["balance"]["combine"])
    assert all(torch.equal(same["drfim"][n], scores["drfim"][n]) for n in scores["fim"]) and same_meta == meta
    anti, anti_meta = rebalance(scores, meta, -1.0, "rank")
    assert anti_meta["balance"]["drfim_weight"] == -1.0 and anti["fim"] is scores["fim"]
    names = [n for n in scores["fim"] if ".attn.qkv." in n or ".mlp." in n]
    count = sum(scores["fim"][n].numel() for n in names)
    task = rankdata(torch.cat([scores["fim"][n].double().reshape(-1) for n in names]).numpy()) / count
    domain = rankdata(torch.cat([scores["delta"][n].double().reshape(-1) for n in names]).numpy()) / count
    expected = torch.from_numpy(task - meta["shift"]["weight"] * domain)
    torch.testing.assert_close(torch.cat([anti["drfim"][n].double().reshape(-1) for n in names]), expected,
                               rtol=1e-5, atol=1e-6)


def test_literal_drfim_matches_eq_5_and_7(tmp_path, data, base):
    out = tmp_path / "literal.safetensors"
    score(data, out, "--literal", "--head", base["head"], warmup=0)
    scores, meta = load_scores(out)
    assert meta["delta_eps"] == 1e-8
    w = meta["shift"]["weight"]
    for name in scores["fim"]:
        f, f_shift = scores["fim"][name].double(), scores["fim_shift"][name].double()
        delta = (f - f_shift).abs() / (torch.minimum(f, f_shift) + 1e-8)
        torch.testing.assert_close(scores["drfim"][name].double(), f + w * delta, rtol=1e-4, atol=1e-9, msg=name)


def test_given_labels_fisher_is_the_mean_squared_per_image_gradient(tmp_path, data, base):
    """Eq. 9 with y = the label map, recomputed by a plain per-image autograd loop over the same crops."""
    from fisherscan.data.datasets import SegmentationDataset
    from fisherscan.data.layouts import find_pairs

    out = tmp_path / "given.safetensors"
    score(data, out, "--labels", "given", "--head", base["head"], warmup=0)
    scores, meta = load_scores(out)
    assert meta["labels"] == "given"

    backbone = reference_backbone(seed=0)  # fisherscan seeds torch with --seed before building the backbone
    head = load_file(str(base["head"]))
    _, pairs = find_pairs(data, "generic")
    cfg = backbone.pretrained_cfg
    dataset = SegmentationDataset(pairs, CROP, pad_multiple=16, seed=0, mean=cfg["mean"], std=cfg["std"])
    params = dict(backbone.named_parameters())
    squares = {name: torch.zeros_like(p, dtype=torch.float64) for name, p in params.items()}
    for i in range(len(dataset)):
        x, y, _ = dataset[i]
        tokens = backbone.forward_features(x[None])[:, backbone.num_prefix_tokens:]
        tokens = F.layer_norm(tokens, tokens.shape[-1:], head["norm.weight"], head["norm.bias"])
        logits = F.linear(tokens, head["classifier.weight"], head["classifier.bias"])
        grid = CROP // 16
        logits = logits.transpose(1, 2).reshape(1, -1, grid, grid)
        logits = F.interpolate(logits, size=tuple(y.shape), mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, y[None], ignore_index=255, reduction="sum")
        grads = torch.autograd.grad(loss, list(params.values()))
        for name, g in zip(params, grads):
            squares[name] += g.double().square()
    for name, total in squares.items():
        expected = total / len(dataset)
        scale = float(expected.abs().max())
        torch.testing.assert_close(scores["fim"][name].double(), expected, rtol=1e-3, atol=1e-5 * scale, msg=name)


# ----------------------------------------------------------------------------------------------------------
# bad input: exit code 2 and one line that names the option or file


def test_missing_data_folder(tmp_path):
    missing = tmp_path / "nowhere"
    result = invoke("score", *FAST, "--data", missing, "--out", tmp_path / "s.safetensors")
    one_error_line(result, str(missing))


def test_empty_data_folder(tmp_path):
    (tmp_path / "empty").mkdir()
    result = invoke("score", *FAST, "--data", tmp_path / "empty", "--out", tmp_path / "s.safetensors")
    one_error_line(result, str(tmp_path / "empty"))


@pytest.mark.parametrize("model", ["vit_nonexistent", "timm:vit_nonexistent_patch16", "timm:resnet18"])
def test_unknown_or_unusable_model(tmp_path, data, model):
    args = ["score", "--model", model, "--random-init", "--data", data, "--out", tmp_path / "s.safetensors",
            "--crop", CROP, "--workers", 0, "--warmup-steps", 0]
    one_error_line(invoke(*args), "--model", model)


def test_dinov2_without_weights_names_weights_and_the_cache(tmp_path, data, monkeypatch):
    torch_home = tmp_path / "torch-home"
    torch_home.mkdir()
    monkeypatch.setenv("TORCH_HOME", str(torch_home))
    args = ["score", "--model", "dinov2_vits14", "--data", data, "--out", tmp_path / "s.safetensors",
            "--crop", CROP, "--workers", 0]
    line = one_error_line(invoke(*args), "--weights", "dinov2_vits14")
    assert str(torch_home / "hub" / "checkpoints") in line
    assert not (tmp_path / "s.safetensors").exists()


def test_existing_out_needs_overwrite(tmp_path, data):
    out = tmp_path / "s.safetensors"
    out.write_bytes(b"keep me")
    one_error_line(invoke("score", *FAST, "--data", data, "--out", out), "--out", "--overwrite")
    assert out.read_bytes() == b"keep me"


def test_bogus_labels_mode(tmp_path, data):
    result = invoke("score", *FAST, "--data", data, "--out", tmp_path / "s.safetensors", "--labels", "bogus")
    one_error_line(result, "--labels", "bogus")


def test_perturbation_site_outside_the_blocks(tmp_path, data):
    result = invoke("score", *FAST, "--data", data, "--out", tmp_path / "s.safetensors", "--perturb-at", "99")
    one_error_line(result, "--perturb-at", "99")
    assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.skipif(torch.cuda.is_available(), reason="needs a machine without a CUDA device")
def test_cuda_requested_without_a_gpu(tmp_path, data):
    result = invoke("score", *FAST, "--data", data, "--out", tmp_path / "s.safetensors", "--device", "cuda")
    one_error_line(result, "--device", "cuda")


@pytest.mark.parametrize("option, value", [("--shift-weight", "-1"), ("--delta-eps", "-0.5"), ("--delta-eps", "0"),
                                           ("--warmup-lr", "nan"), ("--warmup-lr", "-1"), ("--images", "-3")])
def test_invalid_numeric_options_are_rejected(tmp_path, data, option, value):
    """A negative shift weight or eps gives negative/infinite DR-FIM; a bad lr is a ValueError traceback."""
    out = tmp_path / "s.safetensors"
    result = invoke("score", *FAST, "--data", data, "--out", out, "--warmup-steps", 1, option, value)
    one_error_line(result, option)
    assert not out.exists()

def copy_dataset(src: Path, dst: Path) -> Path:
    for sub in ("images", "labels"):
        (dst / sub).mkdir(parents=True)
        for file in sorted((src / sub).iterdir()):
            (dst / sub / file.name).write_bytes(file.read_bytes())
    return dst


def test_image_label_size_mismatch_names_the_file(tmp_path, data):
    bad = copy_dataset(data, tmp_path / "bad")
    label = bad / "labels" / "scene_00002.png"
    Image.fromarray(np.zeros((40, 48), dtype=np.uint8)).save(label)
    result = invoke("score", *FAST, "--data", bad, "--out", tmp_path / "s.safetensors", "--warmup-steps", 0)
    one_error_line(result, "scene_00002.png")


def test_undecodable_image_names_the_file(tmp_path, data):
    bad = copy_dataset(data, tmp_path / "bad")
    (bad / "images" / "scene_00001.png").write_bytes(b"this is not a png at all")
    result = invoke("score", *FAST, "--data", bad, "--out", tmp_path / "s.safetensors", "--warmup-steps", 0)
    one_error_line(result, str(bad / "images" / "scene_00001.png"))


def test_truncated_image_names_the_file(tmp_path, data):
    """A valid header with cut-off pixel data fails only when decoded, inside the scoring loop."""
    bad = copy_dataset(data, tmp_path / "bad")
    image = bad / "images" / "scene_00003.png"
    image.write_bytes(image.read_bytes()[:200])
    result = invoke("score", *FAST, "--data", bad, "--out", tmp_path / "s.safetensors", "--warmup-steps", 1)
    one_error_line(result, str(image))
    assert not (tmp_path / "s.safetensors").exists()


@pytest.mark.parametrize("name", ["[/oops]", "[bold]x"])
def test_error_messages_are_printed_verbatim(tmp_path, name):
    """Paths are data, not rich markup: brackets must neither crash the printer nor vanish."""
    missing = tmp_path / name
    result = invoke("score", *FAST, "--data", missing, "--out", tmp_path / "s.safetensors")
    one_error_line(result, str(missing))


@pytest.mark.slow
def test_module_help():
    done = subprocess.run([sys.executable, "-m", "fisherscan", "--help"], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert "score" in done.stdout and "demo" in done.stdout


def test_variational_scores_file(tmp_path):
    """``--estimator variational`` end to end with the defaults (tau picked by the pilot, VOGN curvature, Eq. 15 as
    printed): the file holds the precisions; Eq. 14 on them equals the saved F, and Eq. 15 on the saved F equals the
    saved Delta F and DR-FIM, both recomputed here from gamma, tau, the likelihood scale and the shift weight in the
    metadata; the ELBO terms, the pilot and the convergence test are recorded."""
    source = write_dataset(tmp_path / "data", domains=("source",), images_per_domain=4, size=(48, 48))["source"]
    out = tmp_path / "v.safetensors"
    result = invoke("score", *FAST, "--data", source, "--batch-size", 2, "--warmup-steps", 1, "--estimator",
                    "variational", "--var-steps", 4, "--gamma", 2.0, "--out", out)
    assert result.exit_code == 0, result.output
    scores, meta = load_scores(out)
    assert set(scores) == {"fim", "fim_shift", "delta", "drfim", "precision", "precision_shift"}
    info = meta["variational"]
    tau, scale = info["tau"], info["likelihood_scale"]
    assert meta["estimator"] == "variational" and info["gamma"] == 2.0 and info["tau_given"] is False
    assert info["steps"] == 4 and info["curvature"] == "vogn" and info["likelihood_scale_given"] is False
    narrow = info["prior"]["likelihood_scale"]  # s from the pilot: gamma n / (2 * 0.1 * L0), at least 4 images
    elements = sum(p.numel() for p in timm.create_model(TIMM_NAME, num_classes=0).parameters())
    assert narrow["elements"] == elements and narrow["floor"] == 4.0
    assert scale == pytest.approx(max(4.0, 2.0 * elements / (2 * 0.1 * narrow["loss_at_mean"])))
    assert tau ** -2 == pytest.approx(0.1 * scale * info["prior"]["mean_curvature"] / 2.0)
    assert info["passes"] == {"clean": 4 + 4, "shift": 4}
    assert info["converged"] == {"clean": False, "shift": False}  # 2 steps in the window: too few to tell
    assert any("has not converged" in note for note in meta["notes"])
    assert set(info["final_terms"]["clean"]) == {"expected_loss", "kl", "objective"}
    for clean, precision in (("fim", "precision"), ("fim_shift", "precision_shift")):
        for name, value in scores[precision].items():  # Lambda = tau^-2 + D, rounded to float32 (the record)
            eq14 = (2.0 * (value.double() - tau ** -2) / scale).clamp_min(0)
            rounding = 2.0 * float(value.max()) * 2.0 ** -23 / scale
            assert torch.allclose(scores[clean][name].double(), eq14, rtol=1e-4, atol=2 * rounding), name
    unit = meta["normalization"]["scale"]
    pseudocount = 2.0 * tau ** -2 / scale
    assert meta["eq15"]["mode"] == "printed" and meta["eq15"]["pseudocount"] == pytest.approx(pseudocount)
    weight = meta["shift"]["weight"]
    for name, f_clean in scores["fim"].items():
        f_x, f_s = f_clean.double() / unit, scores["fim_shift"][name].double() / unit
        delta = (f_x - f_s).abs() / (torch.minimum(f_x, f_s) + pseudocount / unit + meta["delta_eps"])
        assert torch.allclose(scores["delta"][name].double(), delta, rtol=1e-4, atol=1e-6), name
    # the default balance: the ranks of F and Delta F_15 over the candidates (scipy), gamma w on the domain term
    from scipy.stats import rankdata

    names = [n for n in scores["fim"] if ".attn.qkv." in n or ".mlp." in n]
    count = sum(scores["fim"][n].numel() for n in names)
    task = rankdata(torch.cat([scores["fim"][n].double().reshape(-1) for n in names]).numpy()) / count
    domain = rankdata(torch.cat([scores["delta"][n].double().reshape(-1) for n in names]).numpy()) / count
    drfim = torch.cat([scores["drfim"][n].double().reshape(-1) for n in names])
    torch.testing.assert_close(drfim, torch.from_numpy(task + weight * 2.0 * domain), rtol=1e-5, atol=1e-6)
    assert meta["balance"]["combine"] == "rank"
    assert all(torch.isfinite(t).all() for kind in scores.values() for t in kind.values())


@pytest.mark.parametrize("option, value", [("--tau", "0"), ("--tau", "-1"), ("--gamma", "0"), ("--gamma", "-2"),
                                           ("--var-steps", "0"), ("--var-curvature", "exact"), ("--eq15", "both"),
                                           ("--var-scale", "0"), ("--var-tolerance", "0")])
def test_invalid_variational_options_are_rejected(tmp_path, data, option, value):
    out = tmp_path / "s.safetensors"
    result = invoke("score", *FAST, "--data", data, "--out", out, "--estimator", "variational", option, value)
    one_error_line(result, option)
    assert not out.exists()


@pytest.fixture
def nan_every_third_forward(monkeypatch):
    """Every third forward pass of the segmenter without labels returns NaN logits (the variational steps' and the
    engine's passes; the warm-up calls ``Segmenter.loss`` with labels)."""
    original = fisherscan.models.segmenter.Segmenter.forward
    calls = {"n": 0}

    def patched(self, x, labels=None):
        out = original(self, x, labels)
        if labels is not None:
            return out
        calls["n"] += 1
        return out * float("nan") if calls["n"] % 3 == 0 else out

    monkeypatch.setattr(fisherscan.models.segmenter.Segmenter, "forward", patched)
    return calls


def test_variational_skips_and_counts_non_finite_steps(tmp_path, data, nan_every_third_forward):
    """Steps whose loss or curvature is not finite are skipped, counted in the metadata and noted; with
    --max-bad-frac 0 the first one stops the run with one line."""
    out = tmp_path / "v.safetensors"
    common = ["score", *FAST, "--data", data, "--batch-size", 2, "--warmup-steps", 1, "--estimator", "variational",
              "--var-steps", 12, "--tau", 0.01]
    result = invoke(*common, "--max-bad-frac", 0.9, "--out", out)
    assert result.exit_code == 0, result.output
    scores, meta = load_scores(out)
    bad = meta["variational"]["bad_steps"]
    assert bad["clean"] >= 1 and bad["shift"] >= 1
    assert any("non-finite loss or curvature and were skipped" in note for note in meta["notes"])
    assert all(torch.isfinite(t).all() for kind in scores.values() for t in kind.values())
    one_error_line(invoke(*common, "--max-bad-frac", 0, "--out", tmp_path / "w.safetensors"), "--max-bad-frac")
