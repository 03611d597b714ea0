"""fisherscan.recipes.inherit: what tune takes from a scores file, paths of older files read against the folder
their scoring ran in, and whether the head beside the scores fits the decoder.

Oracles: metadata written here by hand in the old (relative paths) and new (absolute) forms, and the folders they
must resolve to, written out.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from fisherscan.errors import FisherscanError
from fisherscan.io import write_tensors
from fisherscan.recipes.inherit import INHERITED, default_run_folder, head_mismatch, read_record


def write_scores(path: Path, meta: dict) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    write_tensors(path, {"fim/x": torch.zeros(1)}, "scores", meta)
    return path


OPTIONS = {"model": "timm:m", "weights": None, "random_init": True, "strict": False, "layout": "generic",
           "split": "train", "crop": 32, "decoder": "multilevel", "feature_blocks": [0, 1, 1, 1], "images": 8,
           "seed": 4, "batch_size": 2}


def test_an_older_file_reads_relative_paths_against_the_folder_it_was_scored_in(tmp_path, monkeypatch):
    work = tmp_path / "work"
    path = write_scores(work / "out" / "s.safetensors", {
        "model": "timm:m", "head": "out/s.head.safetensors", "data": {"path": "data/source"},
        "options": {**OPTIONS, "data": "data/source", "out": "out/s.safetensors"}})
    monkeypatch.chdir(tmp_path)  # another working folder: it must not matter
    record = read_record(path)
    assert record.values == {"model": "timm:m", "weights": None, "random_init": True, "strict": False,
                             "data": work / "data" / "source", "layout": "generic", "split": "train", "crop": 32,
                             "decoder": "multilevel", "feature_blocks": (0, 1, 1, 1)}
    assert record.head == work / "out" / "s.head.safetensors"
    assert set(record.values) <= set(INHERITED) and not {"images", "seed", "batch_size"} & set(record.values)


def test_a_moved_older_file_reads_them_against_its_own_folder(tmp_path):
    path = write_scores(tmp_path / "moved" / "s.safetensors", {
        "model": "timm:m", "head": "s.head.safetensors", "options": {**OPTIONS, "data": "gta", "out": "x/s.safetensors",
                                                                     "weights": "w.pth"}})
    record = read_record(path)
    assert record.values["data"] == tmp_path / "moved" / "gta" and record.values["weights"] == tmp_path / "moved" / \
        "w.pth"
    assert record.head == tmp_path / "moved" / "s.head.safetensors"


def test_absolute_paths_stay_and_files_without_options_use_the_top_level_keys(tmp_path):
    path = write_scores(tmp_path / "s.safetensors", {
        "model": "timm:m", "weights": "timm-pretrained", "random_init": False, "crop": 64, "decoder": "linear",
        "head": "/abs/s.head.safetensors", "data": {"path": "/abs/data", "layout": "gta5", "split": "train"}})
    record = read_record(path)
    assert record.values == {"model": "timm:m", "random_init": False, "data": Path("/abs/data"), "layout": "gta5",
                             "split": "train", "crop": 64, "decoder": "linear"}
    assert record.head == Path("/abs/s.head.safetensors")


def test_files_that_are_not_scores_are_one_line_errors(tmp_path):
    with pytest.raises(FisherscanError, match="no such scores file"):
        read_record(tmp_path / "none.safetensors")
    save_file({"x": torch.zeros(1)}, str(tmp_path / "plain.safetensors"))
    with pytest.raises(FisherscanError, match="not written by fisherscan"):
        read_record(tmp_path / "plain.safetensors")


def test_head_mismatch_names_the_option_and_what_the_head_has(tmp_path):
    head = tmp_path / "h.safetensors"
    write_tensors(head, {"w": torch.zeros(1)}, "head", {"decoder": "multilevel", "decoder_spec": "multilevel",
                                                        "feature_blocks": [0, 1, 2, 3]})
    assert head_mismatch(head, "multilevel", None) is None
    assert head_mismatch(head, "multilevel", (0, 1, 2, 3)) is None
    assert head_mismatch(head, "linear", None) == ("--decoder", "linear", "the multilevel decoder")
    assert head_mismatch(head, "multilevel", (1, 1, 2, 3)) == ("--feature-blocks", "1,1,2,3",
                                                               "feature blocks 0,1,2,3")


def test_default_run_folder_is_beside_the_scores():
    assert default_run_folder(Path("/x/gta.safetensors")) == Path("/x/gta-run")
