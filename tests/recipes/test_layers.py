"""fisherscan.recipes.layers: --config files (TOML, JSON, a run's manifest, a scores file) checked against the config
fields, and the precedence option > config > recipe > scores > default with each value's source.

Oracles: the values written into the files here by hand; for the precedence, one option set at every layer with a
different value, peeled off layer by layer.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from fisherscan.errors import FisherscanError
from fisherscan.io import write_tensors
from fisherscan.recipes.config import ScoreConfig, TuneConfig
from fisherscan.recipes.layers import read_config_file, score_config, tune_config

TOML = """model = "dinov2_vits14"
data = "gta"
batch_size = 4
feature_blocks = [7, 11, 15, 23]
normalize = false
gamma = 2
var_scale = 10.5
"""


def test_toml_and_json_give_the_same_typed_values(tmp_path):
    (tmp_path / "a.toml").write_text(TOML)
    (tmp_path / "a.json").write_text(json.dumps({"model": "dinov2_vits14", "data": "gta", "batch_size": 4,
                                                 "feature_blocks": [7, 11, 15, 23], "normalize": False, "gamma": 2,
                                                 "var_scale": 10.5}))
    expected = {"model": "dinov2_vits14", "data": tmp_path / "gta", "batch_size": 4, "feature_blocks": (7, 11, 15, 23),
                "normalize": False, "gamma": 2.0, "var_scale": 10.5}
    for name in ("a.toml", "a.json"):
        values = read_config_file(tmp_path / name, ScoreConfig)
        assert values == expected and isinstance(values["gamma"], float)


@pytest.mark.parametrize("text, needles", [
    ("stepz = 3", ["'stepz' is not an option of tune", "did you mean steps?"]),
    ("zzz = 3", ["'zzz' is not an option of tune", "fisherscan tune --help"]),
    ('steps = "3"', ["steps must be an integer", "'3'"]),
    ("steps = true", ["steps must be an integer"]),
    ("lr = [1]", ["lr must be a number"]),
    ("random_init = 1", ["random_init must be true or false"]),
    ("candidates = \"Q,K\"", ["candidates must be a list of strings"]),
    ('delta_max = "5 percent"', ["delta_max", "5%"]),
    ("steps = ", ["not valid TOML"]),
])
def test_bad_config_files_are_one_line_errors(tmp_path, text, needles):
    path = tmp_path / "c.toml"
    path.write_text(text + "\n")
    with pytest.raises(FisherscanError) as error:
        read_config_file(path, TuneConfig)
    message = str(error.value)
    assert "\n" not in message and str(path) in message
    for needle in needles:
        assert needle in message, message


def test_other_files_are_refused(tmp_path):
    (tmp_path / "c.yaml").write_text("steps: 3\n")
    with pytest.raises(FisherscanError, match=r"\.toml or \.json"):
        read_config_file(tmp_path / "c.yaml", TuneConfig)
    with pytest.raises(FisherscanError, match="no such file"):
        read_config_file(tmp_path / "none.toml", TuneConfig)
    (tmp_path / "list.json").write_text("[1, 2]")
    with pytest.raises(FisherscanError, match="no table of options"):
        read_config_file(tmp_path / "list.json", TuneConfig)


def test_fractions_in_a_config_file(tmp_path):
    (tmp_path / "c.toml").write_text('delta_min = "1%"\ndelta_max = 0.1\n')
    assert read_config_file(tmp_path / "c.toml", TuneConfig) == {"delta_min": 0.01, "delta_max": 0.1}


def test_an_older_manifest_reads_its_paths_against_the_folder_its_run_ran_in(tmp_path):
    run = tmp_path / "work" / "runs" / "a"
    run.mkdir(parents=True)
    (run / "manifest.json").write_text(json.dumps({"kind": "tune-run", "model": "m", "options": {
        "out": "runs/a", "data": "data/source", "eval": ["val/fog"], "steps": 5}}))
    values = read_config_file(run / "manifest.json", TuneConfig)
    work = tmp_path / "work"
    assert values == {"out": run, "data": work / "data" / "source", "eval": (work / "val" / "fog",), "steps": 5}


def scores_file(folder: Path, **options) -> Path:
    """A scores file whose metadata records ``options`` (the data folder made), no head."""
    (folder / "data").mkdir(parents=True, exist_ok=True)
    path = folder / "s.safetensors"
    recorded = {"model": "timm:m", "data": str(folder / "data"), "crop": 32, "decoder": "linear", **options}
    write_tensors(path, {"fim/x": torch.zeros(1)}, "scores", {"model": "timm:m", "head": None, "options": recorded})
    return path


def test_precedence_option_config_recipe_scores_default(tmp_path):
    scores = scores_file(tmp_path, crop=32, lr=1.0)  # the scores record crop (inherited) and lr (never inherited)
    (tmp_path / "c.toml").write_text("crop = 64\n")
    config_file = tmp_path / "c.toml"
    layers = [({"crop": 16}, config_file, 16, "option"),
              ({}, config_file, 64, f"config {config_file}"),
              ({"recipe": "rein-512", "warmup_steps": 1}, None, 512, "recipe rein-512"),
              ({}, None, 32, f"scores {scores}")]
    for explicit, file, crop, source in layers:
        resolved = tune_config({"scores": scores, **explicit}, file)
        assert (resolved.config.crop, resolved.sources["crop"]) == (crop, source)
    resolved = tune_config({"scores": scores})
    assert resolved.config.lr == TuneConfig.__dataclass_fields__["lr"].default and resolved.sources["lr"] == "default"
    assert resolved.config.model == "timm:m" and resolved.config.data == tmp_path / "data"
    assert resolved.config.out == tmp_path / "s-run" and resolved.sources["out"].startswith("default")
    assert resolved.config.scores.is_absolute()


def test_a_scores_file_without_a_model_asks_for_one(tmp_path):
    path = tmp_path / "s.safetensors"
    write_tensors(path, {"fim/x": torch.zeros(1)}, "scores", {"images": 1})
    with pytest.raises(FisherscanError, match="--model: missing; pass --model NAME"):
        tune_config({"scores": path})
    with pytest.raises(FisherscanError, match="--data: missing"):
        tune_config({"scores": path, "model": "timm:m"})


def test_score_needs_model_and_data_from_somewhere(tmp_path):
    with pytest.raises(FisherscanError, match="--model: missing"):
        score_config({"data": tmp_path})
    (tmp_path / "c.json").write_text(json.dumps({"model": "timm:m", "data": "d"}))
    resolved = score_config({"batch_size": 2}, tmp_path / "c.json")
    assert (resolved.config.model, resolved.config.data, resolved.config.batch_size) == ("timm:m", tmp_path / "d", 2)
    assert resolved.sources["batch_size"] == "option" and resolved.sources["model"] == f"config {tmp_path / 'c.json'}"
    assert resolved.config.out.is_absolute()
