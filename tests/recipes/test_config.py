"""The option dataclasses (``fisherscan.recipes.config``): the variational options' defaults and help are the same
in the library, the config and the command line (oracle: the Typer command's own parameters), and a stopped run
recorded before an option existed continues with that option's ``before`` value."""

from __future__ import annotations

import dataclasses
import inspect

import typer.main

from fisherscan.cli import app
from fisherscan.fisher.variational import DEFAULT_STEPS, TOLERANCE, fit_precision
from fisherscan.fisher.variational_segmentation import variational_fisher
from fisherscan.recipes.config import ScoreConfig, changed_options, options_before

VARIATIONAL = ("tau", "var_steps", "var_curvature", "var_control", "var_tolerance", "var_legacy", "eq15", "var_scale")


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
    assert before == {"var_curvature": "reparam", "var_control": False, "var_legacy": True, "eq15": "substituted"}
    now = {"tau": 0.001, "var_curvature": "reparam", "var_control": False, "var_legacy": True, "eq15": "substituted"}
    assert changed_options({"tau": 0.001}, now) == []
    assert changed_options({"tau": 0.001}, {**now, "eq15": "printed"}) == ["eq15"]
    assert changed_options({"steps": 3}, {"steps": 3}) == []  # tune's options: no score option is assumed
