"""fisherscan.recipes.config: paths made absolute, and a stopped run's recorded options compared by meaning.

Oracle: values written out by hand (``os.path.abspath`` semantics: '..' folded, relative to the working folder).
"""

from __future__ import annotations

from pathlib import Path

from fisherscan.recipes.config import (
    ScoreConfig,
    TuneConfig,
    absolute_paths,
    changed_options,
    field_types,
    path_kind,
)


def test_path_fields_become_absolute(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    config = absolute_paths(TuneConfig(scores=Path("s.safetensors"), model="m", data=Path("d/../gta"), out=Path("r"),
                                       eval=(Path("a"), Path("/b")), head=None))
    assert (config.scores, config.data, config.out, config.eval, config.head) == \
        (tmp_path / "s.safetensors", tmp_path / "gta", tmp_path / "r", (tmp_path / "a", Path("/b")), None)
    assert config.model == "m"
    assert {n for n, hint in field_types(ScoreConfig).items() if path_kind(hint)} == {"data", "out", "weights", "head",
                                                                                  "shift_data"}
    assert path_kind(field_types(TuneConfig)["eval"]) == "paths" and path_kind(field_types(TuneConfig)["crop"]) is None


def test_changed_options_reads_older_relative_paths_by_meaning(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    now = {"data": str(tmp_path / "data"), "out": str(tmp_path / "x" / "s.safetensors"), "eval": [str(tmp_path / "v")],
           "seed": 0, "workers": 2}
    older = {"data": "data", "out": "x/s.safetensors", "eval": ["v"], "seed": 0, "workers": 0}  # workers: resume-safe
    assert changed_options(older, now) == []
    assert changed_options({**older, "data": "other"}, now) == ["data"]
    assert changed_options({**older, "seed": 1}, now) == ["seed"]
    elsewhere = tmp_path / "elsewhere"
    elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)  # the recorded folder (``base``) still reads them
    assert changed_options(older, now) == ["data", "out"]  # eval may change on a continued run (RESUME_SAFE)
    assert changed_options(older, now, base=tmp_path) == []
