"""fisherscan.cli.options: the options of score and tune are built from the config dataclasses; every option of every
command has help; flags show no metavar; command-line values become the config values written out here by hand.

Oracles: ``dataclasses.fields`` of the config classes (names, defaults, help, panels) read independently of the
generator; hand-written expected config values for each command-line form; a made-up dataclass with one field of
every shape, so a field added later gets its option without touching the CLI.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import typer
from conftest import invoke, ok, one_error_line
from typer.testing import CliRunner

import fisherscan.recipes.layers
from fisherscan.cli import app
from fisherscan.cli.app import App
from fisherscan.cli.options import PANEL_TITLES, config_options, given, to_config
from fisherscan.errors import FisherscanError
from fisherscan.recipes.config import ScoreConfig, TuneConfig, option

CONFIGS = {"score": ScoreConfig, "tune": TuneConfig}


def commands() -> dict:
    return typer.main.get_command(app).commands


def options_of(command) -> dict:
    return {p.name: p for p in command.params if isinstance(p, typer.core.TyperOption)}


def test_every_option_of_every_command_has_help():
    for name, command in commands().items():
        assert command.help, name
        for param in command.params:
            assert (param.help or "").strip(), f"{name} {param.opts}: no help"


@pytest.mark.parametrize("command", sorted(CONFIGS))
def test_cli_defaults_names_and_panels_are_the_dataclass_fields(command):
    cls, params = CONFIGS[command], options_of(commands()[command])
    for field in dataclasses.fields(cls):
        param = params[field.name]
        expected = None if field.default is dataclasses.MISSING else field.default
        assert to_config(cls, field.name, param.default) == (() if expected is None and field.name == "eval"
                                                              else expected), field.name
        assert param.help == field.metadata["help"]
        assert param.rich_help_panel == PANEL_TITLES[field.metadata["panel"]]
        long = "--" + field.name.replace("_", "-")
        assert long in param.opts or field.metadata.get("flag", "").startswith(param.opts[0] + "/"), param.opts
        assert not param.required  # a missing value may come from --config (or the scores, for tune)
    assert set(params) - {f.name for f in dataclasses.fields(cls)} <= {"config_file", "schedule_t__alias0"}


def test_workers_default_is_one_value_everywhere():
    assert ScoreConfig.__dataclass_fields__["workers"].default == TuneConfig.__dataclass_fields__["workers"].default \
        == options_of(commands()["score"])["workers"].default == options_of(commands()["tune"])["workers"].default == 2


SPELLINGS = {"tune": ("--schedule-t", "--schedule-T"), "predict": ("--input", "--images"), "inspect": ("--scores", "")}


@pytest.mark.parametrize("command", sorted(["score", "tune", "eval", "predict", "mask", "plot", "inspect", "bench",
                                            "demo", "models"]))
def test_help_shows_no_bool_metavar_and_hides_old_spellings(command):
    text = ok(invoke(command, "--help")).stdout
    assert "<bool>" not in text
    new, old = SPELLINGS.get(command, ("--help", ""))
    assert new in text and (not old or old not in text)
    if command in CONFIGS:
        assert "--config" in text and "--no-overwrite" in text
    if command == "score":
        assert "--normalize" in text and "--literal" in text


def capture_tune(monkeypatch) -> dict:
    """Replace the layering by a spy: it keeps the explicit values tune passes on and stops the command."""
    seen = {}

    def spy(explicit, config_file=None):
        seen.update(explicit=explicit, config_file=config_file)
        raise FisherscanError("captured")

    monkeypatch.setattr(fisherscan.recipes.layers, "tune_config", spy)
    return seen


def test_command_line_forms_become_config_values(monkeypatch, tmp_path):
    seen = capture_tune(monkeypatch)
    one_error_line(invoke("tune", "--scores", "s.safetensors", "--delta-max", "5%", "--delta-min", "0.002",
                          "--candidates", "Q,V", "--feature-blocks", "1,2,3,4", "--eval", "a", "--eval", "b",
                          "--schedule-T", "7", "--no-strict", "--random-init", "--steps", "3", "--config",
                          tmp_path / "c.toml"), "captured")
    assert seen["explicit"] == {"scores": Path("s.safetensors"), "delta_max": 0.05, "delta_min": 0.002,
                                "candidates": ("Q", "V"), "feature_blocks": (1, 2, 3, 4),
                                "eval": (Path("a"), Path("b")), "schedule_t": 7.0, "strict": False,
                                "random_init": True, "steps": 3}
    assert seen["config_file"] == tmp_path / "c.toml"


def test_only_the_options_given_are_explicit(monkeypatch):
    seen = capture_tune(monkeypatch)
    invoke("tune", "--scores", "s.safetensors", "--steps", "1000")  # the default value, given: explicit
    assert seen["explicit"] == {"scores": Path("s.safetensors"), "steps": 1000}


@pytest.mark.parametrize("args, needles", [(["--delta-max", "7 percent"], ["--delta-max", "5%"]),
                                           (["--delta-max", "150%"], ["--delta-max", "[0, 1]"]),
                                           (["--feature-blocks", "7,x"], ["--feature-blocks", "7,x"]),
                                           (["--schedule-T", "x"], [])])
def test_bad_command_line_values_are_one_line_errors(monkeypatch, args, needles):
    capture_tune(monkeypatch)
    result = invoke("tune", "--scores", "s.safetensors", *args)
    if needles:
        one_error_line(result, *needles)
    else:  # click's own type check
        assert result.exit_code == 2 and "Traceback" not in result.output


# ----------------------------------------------------------------------------------------------------------
# a made-up config: a field added to a config class gets its option without touching the CLI


@dataclasses.dataclass(kw_only=True)
class Made:
    count: int = option(3, "a count", "data")
    share: float = option(0.5, "a fraction", "selection", fraction=True)
    blocks: tuple[int, ...] | None = option(None, "numbers", "model")
    names: tuple[str, ...] = option(("x", "y"), "names", "model")
    folders: tuple[Path, ...] = option((), "folders", "evaluation")
    on: bool = option(False, "a switch", "output")
    pair: bool = option(True, "a named pair", "method", flag="--this/--that")
    later: float | None = option(None, "renamed", "selection", aliases=("--old-Later",))
    where: Path | None = option(None, "a path", "data")
    must: str = option(help="no default", panel="model")


def made_app():
    made = App()
    seen = {}

    @made.command()
    @config_options(Made)
    def run(ctx: typer.Context, **options) -> None:
        """A command of the made-up config."""
        seen.clear()
        seen.update(given(ctx, Made, options))

    @made.command()
    def other() -> None:
        """A second command, so ``run`` is addressed by name."""

    return made, seen


@pytest.mark.parametrize("args, expected", [
    ([], {}),
    (["--count", "5", "--share", "25%", "--blocks", "1,2", "--names", "a,b,c", "--folders", "p", "--folders", "q",
      "--on", "--that", "--old-Later", "2.5", "--where", "w", "--must", "m"],
     {"count": 5, "share": 0.25, "blocks": (1, 2), "names": ("a", "b", "c"), "folders": (Path("p"), Path("q")),
      "on": True, "pair": False, "later": 2.5, "where": Path("w"), "must": "m"}),
    (["--later", "1", "--no-on", "--this", "--share", "0.1"], {"later": 1.0, "on": False, "pair": True, "share": 0.1}),
])
def test_a_new_field_gets_its_option(args, expected):
    made, seen = made_app()
    result = CliRunner().invoke(made, ["run", *args])
    assert result.exit_code == 0, result.output
    assert seen == expected
    params = options_of(typer.main.get_command(made).commands["run"])
    assert {name: params[name].default for name in ("count", "share", "names", "on", "pair", "must")} == \
        {"count": 3, "share": "50%", "names": "x,y", "on": False, "pair": True, "must": None}
    assert params["later__alias0"].hidden and params["later__alias0"].opts == ["--old-Later"]
    assert [params[n].rich_help_panel for n in ("count", "share", "on", "pair")] == ["Data", "Selection", "Output",
                                                                                     "Method"]


def test_shell_completion_is_offered():
    text = ok(invoke("--help")).stdout
    assert "--install-completion" in text and "--show-completion" in text
