"""fisherscan.recipes.config: paths made absolute, a stopped run's recorded options compared by meaning (an option
missing from an old recording counts as its ``before`` value), and the variational options' defaults and help the
same in the library, the config and the command line.

Oracles: values written out by hand (``os.path.abspath`` semantics: '..' folded, relative to the working folder);
the Typer command's own parameters.
"""

from __future__ import annotations

import dataclasses
import inspect
from pathlib import Path

import typer.main

from fisherscan.cli import app
from fisherscan.fisher.variational import DEFAULT_STEPS, TOLERANCE, fit_precision
from fisherscan.fisher.variational_segmentation import variational_fisher
from fisherscan.recipes.config import (
    ScoreConfig,
    TuneConfig,
    absolute_paths,
    changed_options,
    field_types,
    options_before,
    path_kind,
)

VARIATIONAL = ("tau", "var_steps", "var_curvature", "var_control", "var_tolerance", "var_legacy", "eq15", "var_scale")


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


def cli_parameters() -> dict:
    command = typer.main.get_command(app).commands["score"]
    return {p.name: p for p in command.params}


def test_variational_defaults_and_help_agree_with_the_command_line():
    fields = {f.name: f for f in dataclasses.fields(ScoreConfig)}
    params = cli_parameters()
    for name in VARIATIONAL:
        assert params[name].default == fields[name].default, name
        help_text = " ".join(fields[name].metadata["help"].split())
        assert " ".join(params[name].help.split()).endswith(help_text), name
    assert fields["var_steps"].default == DEFAULT_STEPS == inspect.signature(fit_precision).parameters["steps"].default
    assert inspect.signature(variational_fisher).parameters["steps"].default == DEFAULT_STEPS
    assert fields["var_tolerance"].default == TOLERANCE and fields["tau"].default is None
    assert params["var_legacy"].hidden


def test_an_option_missing_from_an_old_recording_counts_as_its_before_value():
    before = options_before()
    assert {k: before[k] for k in ("var_curvature", "var_control", "var_legacy", "eq15")} == \
        {"var_curvature": "reparam", "var_control": False, "var_legacy": True, "eq15": "substituted"}
    assert {k: before[k] for k in ("shift", "perturb_strength", "combine", "label_draws", "adam_bias_correction")} == \
        {"shift": "eq6", "perturb_strength": 1.0, "combine": "sum", "label_draws": 1, "adam_bias_correction": "global"}
    now = {"tau": 0.001, "var_curvature": "reparam", "var_control": False, "var_legacy": True, "eq15": "substituted"}
    assert changed_options({"tau": 0.001}, now) == []
    assert changed_options({"tau": 0.001}, {**now, "eq15": "printed"}) == ["eq15"]
    assert changed_options({"steps": 3}, {"steps": 3}) == []  # tune's options: no score option is assumed
