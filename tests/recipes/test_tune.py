"""fisherscan.tuning: the backbone changes exactly where the mask says (bits compared with a fresh rebuild of the
pretrained model), the selection follows Eq. 16 at every step, the optimizer's late entries are the elements each
step adds, resume equals an uninterrupted run to the bit, an old checkpoint is refused, --decoder-lr."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import invoke, one_error_line, write_random_scores
from safetensors.torch import load_file

from fisherscan.data.synthetic import write_dataset
from fisherscan.eval.runs import load_run
from fisherscan.models.backbone import build_backbone
from fisherscan.recipes.config import TuneConfig
from fisherscan.recipes.distributed import Ranks
from fisherscan.recipes.tune import Selection, run_tune, set_up
from fisherscan.scores.file import load_scores
from fisherscan.scores.select import STRATEGIES, select_mask, selected_count

MODEL = "timm:vit_tiny_patch16_224"


@pytest.fixture(scope="module")
def source(tmp_path_factory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("data"), domains=("source",), images_per_domain=4, size=(48,
                                                                                                          48))["source"]


@pytest.fixture(scope="module")
def scores_file(tmp_path_factory) -> Path:
    return write_random_scores(tmp_path_factory.mktemp("scores") / "scores.safetensors", MODEL, 4, seed=123)


def config(scores_file, source, out, **overrides) -> TuneConfig:
    options = dict(scores=scores_file, model=MODEL, random_init=True, data=source, out=out, crop=32, batch_size=2,
                   steps=4, lr=1e-2, weight_decay=0.05, warmup_steps=1, workers=0, seed=7, save_every=100)
    options.update(overrides)
    return TuneConfig(**options)


def pretrained(seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)  # how run_tune builds an untrained base
    return {n: p.detach().clone() for n, p in build_backbone(MODEL, random_init=True).model.named_parameters()}


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_backbone_changes_only_where_the_mask_says(scores_file, source, tmp_path, strategy):
    result = run_tune(config(scores_file, source, tmp_path / "run", strategy=strategy))
    base = pretrained(7)
    tuned, _ = load_run(tmp_path / "run")
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    masks = {k[len("mask/"):]: v.bool() for k, v in saved.items() if k.startswith("mask/")}
    changed_total, in_mask = 0, 0
    for name, p in tuned.backbone.named_parameters():
        mask = masks.get(name, torch.zeros_like(p, dtype=torch.bool))
        changed = p.detach() != base[name]
        assert not (changed & ~mask).any(), f"{strategy}: {name} moved outside its mask"
        changed_total += int(changed.sum())
        in_mask += int(mask.sum())
    assert in_mask == result.selected
    if strategy == "freeze":
        assert in_mask == 0 and changed_total == 0
    else:
        assert changed_total > 0.5 * in_mask  # selected elements do move (zero-gradient biases may not)
    if strategy == "full":
        assert in_mask == result.total


def test_selection_follows_eq16_at_every_step(scores_file, source, tmp_path):
    steps, total = 6, sum(p.numel() for p in pretrained(0).values())
    run_tune(config(scores_file, source, tmp_path / "run", steps=steps, delta_min=0.01, delta_max=0.05))
    log = pd.read_csv(tmp_path / "run" / "log.csv")
    expected = [selected_count(t, steps - 1, total, 0.01, 0.05) for t in range(steps)]
    assert log["selected"].tolist() == expected
    assert expected[0] == int(0.01 * total) and expected[-1] == int(0.05 * total)
    final = select_mask(load_scores(scores_file)[0], expected[-1], strategy="drfim")
    saved = load_file(str(tmp_path / "run" / "model.safetensors"))
    for name, mask in final.items():
        stored = saved.get(f"mask/{name}")
        assert torch.equal(stored.bool() if stored is not None else torch.zeros_like(mask), mask)


def test_resume_equals_an_uninterrupted_run_to_the_bit(scores_file, source, tmp_path):
    straight = run_tune(config(scores_file, source, tmp_path / "a", steps=5))
    stopped = run_tune(config(scores_file, source, tmp_path / "b", steps=5, stop_after=2))
    assert not stopped.finished and not (tmp_path / "b" / "model.safetensors").exists()
    resumed = run_tune(config(scores_file, source, tmp_path / "b", steps=5, resume=True))
    a, b = (load_file(str(tmp_path / run / "model.safetensors")) for run in ("a", "b"))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    assert resumed.log == straight.log


def test_resume_refuses_other_options(scores_file, source, tmp_path):
    from fisherscan.errors import FisherscanError

    run_tune(config(scores_file, source, tmp_path / "b", steps=5, stop_after=2))
    with pytest.raises(FisherscanError, match="other options"):
        run_tune(config(scores_file, source, tmp_path / "b", steps=5, resume=True, lr=5e-3))


def test_cli_tune_and_mask(scores_file, source, tmp_path):
    out = tmp_path / "run"
    result = invoke(*["tune", "--scores", str(scores_file), "--model", MODEL, "--random-init", "--data",
                                 str(source), "--out", str(out), "--crop", "32", "--batch-size", "2", "--steps", "2",
                                 "--workers", "0", "--warmup-steps", "1", "--delta-max", "2%", "--eval", str(source),
                                 "--eval-layout", "generic", "--eval-crop", "32"])
    assert result.exit_code == 0, result.output
    assert "backbone elements tuned" in result.output and (out / "manifest.json").exists()
    evaluation = json.loads((out / "eval" / "eval.json").read_text())
    assert 0 <= evaluation["miou"] <= 100 and "mIoU" in result.output
    again = invoke(*["tune", "--scores", str(scores_file), "--model", MODEL, "--random-init", "--data",
                                str(source), "--out", str(out), "--crop", "32", "--steps", "2", "--workers", "0"])
    assert again.exit_code == 2 and "--overwrite" in again.output

    mask_path = tmp_path / "mask.safetensors"
    result = invoke(*["mask", "--scores", str(scores_file), "--out", str(mask_path), "--budget", "3%"])
    assert result.exit_code == 0, result.output
    masks = load_file(str(mask_path))
    total = sum(p.numel() for p in pretrained(0).values())
    assert sum(int(m.sum()) for m in masks.values()) == int(0.03 * total)


def test_scores_of_another_model_are_refused(scores_file, source, tmp_path):
    result = invoke(*["tune", "--scores", str(scores_file), "--model", "timm:vit_small_patch16_224",
                                      "--random-init", "--data", str(source), "--out", str(tmp_path / "r"),
                                      "--crop", "32", "--workers", "0"])
    assert result.exit_code == 2 and "does not match --model" in result.output


def test_multilevel_decoder_run_reloads_identically(scores_file, source, tmp_path):
    run_tune(config(scores_file, source, tmp_path / "run", steps=2, decoder="multilevel"))
    tuned, manifest = load_run(tmp_path / "run")
    assert manifest["decoder"] == "multilevel"
    again, _ = load_run(tmp_path / "run")
    x = torch.randn(1, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(tuned(x), again(x)) and tuned(x).shape == (1, 19, 8, 8)


def test_late_entries_are_the_elements_each_step_adds(scores_file, source, tmp_path):
    """Oracle: the growing masks themselves (``grow_to`` step by step): the step at which each element first shows
    up; the entries hold exactly the elements that show up after step 0, with that step, in join order."""
    steps = 7
    run = set_up(config(scores_file, source, tmp_path / "run", steps=steps, delta_min=0.01, delta_max=0.06),
                 Ranks(), torch.device("cpu"))
    selection = Selection(run)
    first = {name: torch.full(mask.shape, -1).view(-1) for name, mask in selection.masks.items()}
    for step in range(steps):
        selection.grow_to(step)
        for name, mask in selection.masks.items():
            new = mask.reshape(-1) & (first[name] < 0)
            first[name][new] = step
    entries = selection.backbone_opt.entries
    assert set(entries) == {n for n, f in first.items() if (f > 0).any()} and entries
    for name, (positions, joined) in entries.items():
        assert positions.dtype == joined.dtype == torch.int32
        assert (joined[1:] >= joined[:-1]).all()  # in join order
        expected = {(int(i), int(first[name][i])) for i in (first[name] > 0).nonzero().view(-1)}
        assert set(zip(positions.tolist(), joined.tolist())) == expected and len(positions) == len(expected)
    glob = Selection(set_up(config(scores_file, source, tmp_path / "g", steps=steps, adam_bias_correction="global"),
                            Ranks(), torch.device("cpu")))
    assert glob.backbone_opt.entries == {}


def test_a_checkpoint_from_before_per_element_bias_correction_is_refused(scores_file, source, tmp_path):
    """A tune checkpoint recorded before this change (the golden fixture) has no optimizer_missed: one line."""
    (tmp_path / "run").mkdir()
    old = Path(__file__).parents[1] / "golden" / "dinov2" / "checkpoint.safetensors"
    (tmp_path / "run" / "checkpoint.safetensors").write_bytes(old.read_bytes())
    result = invoke(*["tune", "--scores", str(scores_file), "--model", MODEL, "--random-init", "--data", str(source),
                      "--out", str(tmp_path / "run"), "--crop", "32", "--steps", "2", "--workers", "0", "--resume"])
    one_error_line(result, "checkpoint.safetensors", "optimizer_missed", "--overwrite")


def test_decoder_lr(scores_file, source, tmp_path):
    """Oracle: a second run. With the backbone frozen, --decoder-lr X and --lr 1e-9 give the decoder of --lr X; with
    --decoder-lr equal to --lr every bit equals the run without it; --adam-bias-correction and --decoder-lr checked."""
    run_tune(config(scores_file, source, tmp_path / "a", strategy="freeze", lr=3e-3))
    run_tune(config(scores_file, source, tmp_path / "b", strategy="freeze", lr=1e-9, decoder_lr=3e-3))
    run_tune(config(scores_file, source, tmp_path / "c", strategy="freeze", lr=1e-9))
    a, b, c = (load_file(str(tmp_path / run / "model.safetensors")) for run in "abc")
    assert all(torch.equal(a[k], b[k]) for k in a) and not all(torch.equal(a[k], c[k]) for k in a)
    manifest = json.loads((tmp_path / "b" / "manifest.json").read_text())
    assert manifest["optimizer"]["decoder_lr"] == 3e-3 and manifest["optimizer"]["lr"] == 1e-9
    run_tune(config(scores_file, source, tmp_path / "d", steps=2, strategy="full", lr=3e-3))
    run_tune(config(scores_file, source, tmp_path / "e", steps=2, strategy="full", lr=3e-3, decoder_lr=3e-3))
    d, e = (load_file(str(tmp_path / run / "model.safetensors")) for run in "de")
    assert set(d) == set(e) and all(torch.equal(d[k], e[k]) for k in d)
    base = ["tune", "--scores", str(scores_file), "--model", MODEL, "--random-init", "--data", str(source), "--out",
            str(tmp_path / "f"), "--crop", "32", "--workers", "0"]
    one_error_line(invoke(*base, "--decoder-lr", "-1"), "--decoder-lr -1")
    one_error_line(invoke(*base, "--adam-bias-correction", "local"), "--adam-bias-correction local", "selection")
