"""Where each option of ``score`` and ``tune`` comes from. Highest first: an option given on the command line, a
``--config`` file, a ``--recipe`` preset (tune), what the scores file records (tune, ``inherit``), the dataclass
default (``config``). The run records the source of every value (the manifest's ``option_sources``).

A ``--config`` file is TOML or JSON whose keys are the config field names (``batch_size = 4``); a run's
``manifest.json`` and a scores file are config files too (their recorded options), so ``tune --config
RUN/manifest.json --out NEW`` repeats a run. Relative paths in a config file are read against its folder (recorded
files: against the folder their run ran in). Unknown keys and values of the wrong type are one-line errors.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import sys
import typing
from dataclasses import dataclass
from pathlib import Path

from ..errors import FisherscanError
from ..io import read_info, recorded_base, resolve_recorded
from . import inherit
from .config import UNIONS, ScoreConfig, TuneConfig, absolute_paths, field_types
from .presets import recipe_values

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    import tomli as tomllib

COMMANDS = {ScoreConfig: "score", TuneConfig: "tune"}
DEFAULT = "default"
OPTION = "option"
# how to give an option the config cannot do without
REQUIRED = {"model": "--model NAME (see 'fisherscan models')", "data": "--data FOLDER"}


@dataclass
class Resolved:
    """A run's config and where each of its values came from (field -> "option", "config FILE", ...)."""

    config: ScoreConfig | TuneConfig
    sources: dict[str, str]


def parse_fraction(text: str, option: str, allow_zero: bool = True) -> float:
    """'5%' or '0.05' -> 0.05, within [0, 1] (or (0, 1] without ``allow_zero``); a one-line error otherwise."""
    try:
        value = float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        raise FisherscanError(f"{option} {text}: pass a fraction like 0.05 or a percentage like 5%") from None
    if not (0 <= value <= 1) or (value == 0 and not allow_zero):
        bounds = "[0, 1] (0% to 100%)" if allow_zero else "(0, 1] (above 0%, at most 100%)"
        raise FisherscanError(f"{option} {text}: must lie in {bounds}")
    return value


def _load(path: Path) -> tuple[dict, Path]:
    """(the options a config file holds, the folder its relative paths are read against)."""
    if path.suffix == ".safetensors":
        options = read_info(path, "scores", "pass a TOML or JSON file, a run's manifest.json or a scores file"
                            ).get("options")
        if not isinstance(options, dict):
            raise FisherscanError(f"--config {path}: the scores file records no options; score it again")
        return options, recorded_base(path, options.get("out"))
    try:
        text = path.read_text()
        raw = tomllib.loads(text) if path.suffix == ".toml" else json.loads(text)
    except (ValueError, tomllib.TOMLDecodeError) as error:
        kind = "TOML" if path.suffix == ".toml" else "JSON"
        raise FisherscanError(f"--config {path}: not valid {kind} ({str(error).splitlines()[0]})") from None
    except (OSError, UnicodeDecodeError) as error:
        raise FisherscanError(f"--config {path}: cannot read it ({type(error).__name__}); pass a readable file") \
            from None
    if not isinstance(raw, dict):
        raise FisherscanError(f"--config {path}: holds no table of options; write keys like batch_size = 4")
    if raw.get("kind") == "tune-run" and isinstance(raw.get("options"), dict):  # a run's manifest
        return raw["options"], recorded_base(path.parent, raw["options"].get("out"))
    return raw, path.parent


def read_config_file(path: Path, cls) -> dict:
    """The options of the ``--config`` file ``path`` for the config class ``cls``, checked and converted."""
    path = Path(path)
    if not path.is_file():
        raise FisherscanError(f"--config {path}: no such file; pass a TOML or JSON file of options")
    if path.suffix not in (".toml", ".json", ".safetensors"):
        raise FisherscanError(f"--config {path}: name a .toml or .json file (or a run's manifest.json or a scores "
                              "file)")
    raw, base = _load(path)
    return check_values(raw, cls, f"--config {path}", base)


def check_values(raw: dict, cls, origin: str, base: Path) -> dict:
    """``raw`` (JSON/TOML values by field name) as config values: every key a field of ``cls``, every value of its
    type (lists -> tuples, strings -> paths read against ``base``; fractions also as '5%')."""
    fields = {f.name: f for f in dataclasses.fields(cls)}
    types = field_types(cls)
    values = {}
    for key, value in raw.items():
        if key not in fields:
            close = difflib.get_close_matches(key, fields, n=1)
            hint = f"did you mean {close[0]}?" if close else f"see 'fisherscan {COMMANDS[cls]} --help'"
            raise FisherscanError(f"{origin}: {key!r} is not an option of {COMMANDS[cls]}; {hint}")
        values[key] = convert(value, types[key], fields[key].metadata, f"{origin}: {key}", base)
    return values


def _type_name(hint) -> str:
    names = {bool: "true or false", int: "an integer", float: "a number", str: "a string", Path: "a path"}
    if typing.get_origin(hint) is tuple:
        return f"a list of {_type_name(typing.get_args(hint)[0]).removeprefix('a ').removeprefix('an ')}s"
    return names.get(hint, str(hint))


def convert(value, hint, metadata, label: str, base: Path):
    """One JSON/TOML value as the field type ``hint``; a one-line error naming ``label`` otherwise."""
    args = typing.get_args(hint) if typing.get_origin(hint) in UNIONS else (hint,)
    optional, kinds = type(None) in args, [a for a in args if a is not type(None)]
    kind = kinds[0]
    if value is None and optional:
        return None
    if kind is float and metadata.get("fraction") and isinstance(value, str):
        return parse_fraction(value, label)
    if typing.get_origin(kind) is tuple:
        item = typing.get_args(kind)[0]
        if not isinstance(value, list):
            raise FisherscanError(f"{label} must be {_type_name(kind)}, not {value!r}")
        return tuple(convert(v, item, {}, label, base) for v in value)
    ok = {bool: isinstance(value, bool), int: isinstance(value, int) and not isinstance(value, bool),
          float: isinstance(value, (int, float)) and not isinstance(value, bool), str: isinstance(value, str),
          Path: isinstance(value, str)}.get(kind, False)
    if not ok:
        raise FisherscanError(f"{label} must be {_type_name(kind)}{' or null' if optional else ''}, not {value!r}")
    if kind is Path:
        return resolve_recorded(value, base)
    return float(value) if kind is float else value


def stack(layers: list[tuple[str, dict]]) -> tuple[dict, dict]:
    """(values, sources): the layers merged, later ones (higher precedence) winning, each value's layer named."""
    values, sources = {}, {}
    for label, layer in layers:
        for key, value in layer.items():
            values[key], sources[key] = value, label
    return values, sources


def require(values: dict, hint: str) -> None:
    for name, option in REQUIRED.items():
        if values.get(name) is None:
            raise FisherscanError(f"--{name}: missing; pass {option}{hint}")


def finish(cls, values: dict, sources: dict) -> Resolved:
    config = absolute_paths(cls(**values))
    return Resolved(config, {f.name: sources.get(f.name, DEFAULT) for f in dataclasses.fields(cls)})


def score_config(explicit: dict, config_file: Path | None = None) -> Resolved:
    """``score``'s config: ``explicit`` (the options given, as config values) over ``config_file`` over the
    defaults."""
    layers = [(f"config {config_file}", read_config_file(config_file, ScoreConfig))] if config_file else []
    values, sources = stack([*layers, (OPTION, explicit)])
    require(values, " (or put it in --config)")
    return finish(ScoreConfig, values, sources)


def tune_config(explicit: dict, config_file: Path | None = None) -> Resolved:
    """``tune``'s config: ``explicit`` over ``config_file`` over ``--recipe`` over what ``--scores`` records
    (``inherit.INHERITED``) over the defaults; ``--out`` by default ``<scores stem>-run`` beside the scores."""
    from_file = read_config_file(config_file, TuneConfig) if config_file else {}
    upper = {**from_file, **explicit}
    if upper.get("scores") is None:
        raise FisherscanError("--scores: missing; pass the scores file written by 'fisherscan score'")
    record = inherit.read_record(upper["scores"])
    recipe = upper.get("recipe")
    values, sources = stack([(f"scores {record.path}", record.values), (f"recipe {recipe}", recipe_values(recipe)),
                             (f"config {config_file}", from_file), (OPTION, explicit)])
    if values.get("out") is None:
        values["out"], sources["out"] = inherit.default_run_folder(record.path), "default (beside the scores)"
    require(values, f" (--scores {record.path} records none)")
    inherit.check_recorded(record, values, sources)
    inherit.check_head(record, values, sources)
    if values.get("head") is None:  # the head beside the scores when it fits, else a new one warmed up
        fits = inherit.fitting_head(record.head, values.get("decoder", "linear"), values.get("feature_blocks"))
        sources["head"] = f"scores {record.path}" if fits else "warm-up (--warmup-steps)"
    return finish(TuneConfig, values, sources)
