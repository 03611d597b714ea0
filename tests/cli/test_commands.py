"""The commands as users write them: ``score`` then ``tune --scores s.safetensors`` alone, ``eval``/``predict`` with
only the run folder, ``--config`` files and manifest replays, and the one-line errors of bad input.

Tiny on purpose: a randomly initialised 2-block ViT (width 16, patch 8) on 4 generated 40x40 scenes, 32-pixel
crops, in this process. Oracles: the values the score command was given (written out here) for what tune inherits;
a run with the equivalent options for a config file; the first run's tensors (``torch.equal``) for a replay.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import invoke, ok, one_error_line
from safetensors.torch import load_file, save_file

from fisherscan.data.synthetic import write_dataset

MODEL = "timm:vit_tiny_patch16_224?depth=2&embed_dim=16&num_heads=2&patch_size=8&img_size=32&mlp_ratio=2.0"
FAST = ["--workers", "0", "--device", "cpu"]


def score_in(here: Path, *extra) -> dict:
    """score, from ``here`` with relative paths, as a user types it; ``here`` then holds data/, s.safetensors and
    s.head.safetensors."""
    write_dataset(here / "data", domains=("source", "fog"), images_per_domain=4, size=(40, 40), seed=0)
    ok(invoke("score", "--model", MODEL, "--random-init", "--data", "data/source", "--layout", "generic", "--crop",
              32, "--batch-size", 2, "--warmup-steps", 1, "--out", "s.safetensors", *FAST, *extra, cwd=here))
    return {"here": here, "scores": here / "s.safetensors", "head": here / "s.head.safetensors",
            "data": here / "data" / "source", "fog": here / "data" / "fog"}


@pytest.fixture(scope="module")
def scored(tmp_path_factory) -> dict:
    return score_in(tmp_path_factory.mktemp("scored"))


def manifest(run: Path) -> dict:
    return json.loads((run / "manifest.json").read_text())


def test_tune_with_only_the_scores_file(scored):
    ok(invoke("tune", "--scores", scored["scores"], "--steps", 2))  # workers, batch size, seed: tune's defaults
    run = scored["here"] / "s-run"
    made = manifest(run)
    options, sources = made["options"], made["option_sources"]
    assert made["model"] == MODEL and options["random_init"] is True and options["weights"] is None
    assert options["data"] == str(scored["data"]) and made["data"]["layout"] == "generic"
    assert (options["crop"], options["decoder"], options["feature_blocks"]) == (32, "linear", None)
    assert made["head"] == str(scored["head"])  # the warmed head beside the scores, not a new warm-up
    assert (options["batch_size"], options["seed"], options["images"], options["workers"]) == (8, 0, None, 2)
    scores_source = f"scores {scored['scores']}"
    assert {k: sources[k] for k in ("model", "data", "layout", "crop", "decoder", "head", "random_init")} == \
        dict.fromkeys(("model", "data", "layout", "crop", "decoder", "head", "random_init"), scores_source)
    assert sources["steps"] == "option" and sources["batch_size"] == "default" and "out" in sources
    assert (run / "model.safetensors").is_file()


@pytest.mark.parametrize("name, args, value", [
    ("data", ["--data", "FOG"], "FOG"),
    ("layout", ["--layout", "auto"], "auto"),
    ("crop", ["--crop", 24], 24),
    ("strict", ["--no-strict"], False),
    ("head", ["--head", "HEAD"], "HEAD"),
    ("decoder", ["--decoder", "multilevel", "--feature-blocks", "0,0,1,1", "--warmup-steps", 1], "multilevel"),
])
def test_each_recorded_value_can_be_overridden(scored, tmp_path, name, args, value):
    named = {"FOG": str(scored["fog"]), "HEAD": str(tmp_path / "other.head.safetensors")}
    shutil.copyfile(scored["head"], tmp_path / "other.head.safetensors")
    args = [named.get(a, a) for a in args]
    ok(invoke("tune", "--scores", scored["scores"], "--steps", 1, "--batch-size", 2, "--out", tmp_path / "run", *args,
              *FAST))
    made = manifest(tmp_path / "run")
    assert made["options"][name] == named.get(value, value) and made["option_sources"][name] == "option"
    assert made["option_sources"]["model"] == f"scores {scored['scores']}"
    if name == "decoder":
        assert made["head"] == "warmed up for 1 steps" and made["options"]["feature_blocks"] == [0, 0, 1, 1]
    if name == "head":
        assert made["head"] == named["HEAD"]


def test_a_recorded_folder_that_moved_is_one_error_naming_the_option(tmp_path):
    moved = score_in(tmp_path)
    (tmp_path / "data").rename(tmp_path / "elsewhere")
    one_error_line(invoke("tune", "--scores", moved["scores"], "--steps", 1), "data folder", str(moved["data"]),
                   "--data FOLDER")
    ok(invoke("tune", "--scores", moved["scores"], "--data", tmp_path / "elsewhere" / "source", "--steps", 1,
              "--batch-size", 2, *FAST))  # the option that replaces it
    moved["head"].unlink()
    one_error_line(invoke("tune", "--scores", moved["scores"], "--data", tmp_path / "elsewhere" / "source"),
                   "head", str(moved["head"]), "--head FILE", "--warmup-steps N")


def test_a_decoder_mismatch_says_what_to_do(scored, tmp_path):
    line = one_error_line(invoke("tune", "--scores", scored["scores"], "--decoder", "multilevel", "--out",
                                 tmp_path / "run"), "--decoder multilevel", "the linear decoder",
                          "score with --decoder multilevel", "--warmup-steps N")
    assert "--head" not in line.split(";")[0]  # no --head was given: the message is not about one
    line = one_error_line(invoke("tune", "--scores", scored["scores"], "--recipe", "rein-512", "--out",
                                 tmp_path / "run"), "--decoder mask2former (from recipe rein-512)", "linear")
    assert not (tmp_path / "run").exists()


@pytest.fixture(scope="module")
def tuned(scored, tmp_path_factory) -> Path:
    """A run tuned with --eval on the fog scenes."""
    run = tmp_path_factory.mktemp("tuned") / "run"
    ok(invoke("tune", "--scores", scored["scores"], "--steps", 2, "--batch-size", 2, "--eval", scored["fog"],
              "--eval-layout", "generic", "--out", run, *FAST))
    return run


def test_eval_without_data_uses_the_folders_the_run_evaluated(scored, tuned, tmp_path):
    result = ok(invoke("eval", "--checkpoint", tuned, "--out", tmp_path / "eval", *FAST))
    assert "crop 32 stride 21" in result.stdout  # the run's window: its --crop, every 2/3 of it
    evaluated = json.loads((tmp_path / "eval" / "eval.json").read_text())
    recorded = json.loads((tuned / "eval" / "eval.json").read_text())  # tune's own evaluation of the same folder
    assert [d["name"] for d in evaluated["datasets"]] == [d["name"] for d in recorded["datasets"]]
    assert evaluated["miou"] == pytest.approx(recorded["miou"])


def test_eval_of_a_run_without_eval_folders_names_the_option(scored, tmp_path):
    ok(invoke("tune", "--scores", scored["scores"], "--steps", 1, "--batch-size", 2, "--out", tmp_path / "run", *FAST))
    one_error_line(invoke("eval", "--checkpoint", tmp_path / "run"), "--data", "without --eval")


def test_predict_needs_only_the_run_and_the_images(scored, tuned):
    ok(invoke("predict", "--checkpoint", tuned, "--input", scored["fog"] / "images", "--device", "cpu"))
    assert len(list((tuned / "predictions").rglob("*.png"))) == 4
    one_error_line(invoke("predict", "--checkpoint", tuned), "--input")


def test_a_config_file_gives_the_manifest_of_the_same_options(scored, tmp_path):
    options = ["--steps", 2, "--batch-size", 2, "--lr", 1e-3, "--delta-max", "10%", "--candidates", "Q,FFN",
               "--eval-split", "val", "--seed", 3]
    ok(invoke("tune", "--scores", scored["scores"], "--out", tmp_path / "by_options", *options, *FAST))
    (tmp_path / "c.toml").write_text('steps = 2\nbatch_size = 2\nlr = 1e-3\ndelta_max = "10%"\n'
                                     'candidates = ["Q", "FFN"]\neval_split = "val"\nseed = 3\nworkers = 0\n'
                                     'device = "cpu"\nscores = "s.safetensors"\n')
    shutil.copyfile(tmp_path / "c.toml", scored["here"] / "c.toml")  # relative paths: against the file's folder
    ok(invoke("tune", "--config", scored["here"] / "c.toml", "--out", tmp_path / "by_config"))
    by_options, by_config = manifest(tmp_path / "by_options"), manifest(tmp_path / "by_config")
    assert by_options["options"] == {**by_config["options"], "out": str(tmp_path / "by_options")}
    assert by_config["option_sources"]["lr"] == f"config {scored['here'] / 'c.toml'}"


def test_a_manifest_replays_the_run_to_equal_tensors(tuned, tmp_path):
    ok(invoke("tune", "--config", tuned / "manifest.json", "--out", tmp_path / "again"))
    first, again = load_file(str(tuned / "model.safetensors")), load_file(str(tmp_path / "again" / "model.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)
    assert manifest(tmp_path / "again")["options"] == {**manifest(tuned)["options"], "out": str(tmp_path / "again")}


def test_a_scores_file_is_the_config_of_its_scoring(scored, tmp_path):
    ok(invoke("score", "--config", scored["scores"], "--out", tmp_path / "again.safetensors"))
    first, again = load_file(str(scored["scores"])), load_file(str(tmp_path / "again.safetensors"))
    assert first.keys() == again.keys() and all(torch.equal(first[k], again[k]) for k in first)


def test_bad_input_is_one_line(scored, tmp_path):
    save_file({"x": torch.zeros(2)}, str(tmp_path / "plain.safetensors"))  # no metadata
    one_error_line(invoke("tune", "--scores", tmp_path / "plain.safetensors"), "plain.safetensors",
                   "not written by fisherscan")
    (tmp_path / "typo.toml").write_text("stepz = 3\n")
    one_error_line(invoke("tune", "--scores", scored["scores"], "--config", tmp_path / "typo.toml"),
                   "typo.toml", "'stepz' is not an option of tune", "did you mean steps?")
    (tmp_path / "type.json").write_text('{"steps": "many"}')
    one_error_line(invoke("tune", "--scores", scored["scores"], "--config", tmp_path / "type.json"),
                   "type.json", "steps must be an integer", "'many'")
    (tmp_path / "broken.toml").write_text("steps = = 3\n")
    one_error_line(invoke("score", "--config", tmp_path / "broken.toml"), "broken.toml", "not valid TOML")
    one_error_line(invoke("score", "--data", scored["data"]), "--model: missing")
    one_error_line(invoke("tune"), "--scores: missing")


def test_a_replay_without_the_head_it_started_from_is_refused(tmp_path):
    here = score_in(tmp_path)
    ok(invoke("tune", "--scores", here["scores"], "--steps", 1, "--batch-size", 2, "--out", tmp_path / "run", *FAST))
    here["head"].unlink()  # the manifest sets --warmup-steps, but a replay must not silently warm a new head up
    one_error_line(invoke("tune", "--config", tmp_path / "run" / "manifest.json", "--out", tmp_path / "again"),
                   str(here["head"]), "--warmup-steps N")
    ok(invoke("tune", "--config", tmp_path / "run" / "manifest.json", "--out", tmp_path / "again", "--warmup-steps",
              1))
    assert manifest(tmp_path / "again")["head"] == "warmed up for 1 steps"
