"""Typer options built from the config dataclasses (``fisherscan.recipes.config``): one option per field, named
``--field-name``, with the field's default, help and panel; the one home of them all stays the dataclass.

Typer reads a command's parameters from ``inspect.signature``; ``config_options(cls)`` gives the decorated command
a generated ``__signature__`` whose keyword-only parameters are its own (``ctx``, ``--config``) plus one per field,
and the command receives the fields' values as ``**options``. On the command line:

- ``bool`` -> ``--x/--no-x`` (or the field's ``flag``);
- ``tuple[int, ...]`` / ``tuple[str, ...]`` -> one comma-separated value (``--feature-blocks 7,11,15,23``);
- ``tuple[Path, ...]`` -> a repeatable option (``--eval A --eval B``);
- a ``fraction`` field -> a fraction or a percentage (``--delta-max 5%``);
- ``aliases`` -> hidden options of the old spellings (``--schedule-T``).

``given(ctx, cls, options)`` returns the options the user typed, as config values, for ``fisherscan.recipes.layers``
to put over a ``--config`` file, a recipe, a scores file and the defaults.
"""

from __future__ import annotations

import dataclasses
import inspect
import typing
from pathlib import Path
from typing import List, Optional

import typer

from ..errors import FisherscanError
from ..recipes.config import PANELS, UNIONS, field_types

PANEL_TITLES = {panel: panel[0].upper() + panel[1:] for panel in PANELS}
ALIAS = "__alias"  # generated parameter name of a hidden old spelling: <field>__alias<i>
KW = inspect.Parameter.KEYWORD_ONLY


def flag_name(name: str) -> str:
    return "--" + name.replace("_", "-")


def _unwrap(hint) -> tuple[object, bool]:
    """(the type inside ``X | None``, whether None is allowed)."""
    if typing.get_origin(hint) in UNIONS:
        args = [a for a in typing.get_args(hint) if a is not type(None)]
        return args[0], True
    return hint, False


def shape(field: dataclasses.Field, hint) -> str:
    """How a field is written on the command line: flag, fraction, list (comma-separated), repeat, or plain."""
    kind, _ = _unwrap(hint)
    if kind is bool:
        return "flag"
    if field.metadata.get("fraction"):
        return "fraction"
    if typing.get_origin(kind) is tuple:
        return "repeat" if typing.get_args(kind)[0] is Path else "list"
    return "plain"


def cli_default(field: dataclasses.Field, hint):
    """The command line's default of a field: the field's default, written as the command line takes it (None for a
    field without default: it must come from elsewhere, e.g. ``--config``)."""
    if field.default is dataclasses.MISSING:
        return None
    value, form = field.default, shape(field, hint)
    if value is None:
        return None
    if form == "fraction":
        return f"{value * 100:g}%"
    if form == "list":
        return ",".join(map(str, value))
    if form == "repeat":
        return list(value) or None
    return value


def annotation(field: dataclasses.Field, hint):
    kind, _ = _unwrap(hint)
    form = shape(field, hint)
    if form == "flag":
        return bool
    if form == "repeat":
        return Optional[List[Path]]
    if form in ("fraction", "list"):
        return Optional[str]
    return Optional[kind]


def parameters(cls, notes: dict[str, str] | None = None) -> list[inspect.Parameter]:
    """One keyword-only Typer parameter per field of ``cls`` (panels in ``PANELS`` order), plus hidden ones for the
    old spellings; ``notes``: per field, what its default is when not the field's (shown as the default)."""
    notes, hints = notes or {}, field_types(cls)
    fields = sorted(dataclasses.fields(cls), key=lambda f: PANELS.index(f.metadata.get("panel", "run control")))
    made = []
    for field in fields:
        hint, meta = hints[field.name], field.metadata
        form, default = shape(field, hint), cli_default(field, hint)
        decls = [meta.get("flag") or f"{flag_name(field.name)}/--no-{flag_name(field.name)[2:]}"] \
            if form == "flag" else [flag_name(field.name)]
        extra = {"metavar": "<path>"} if form == "repeat" else {}
        if field.name in notes:
            extra["show_default"] = notes[field.name]
        elif default is None:
            extra["show_default"] = False
        help_text = meta.get("help", "")
        option = typer.Option(default, *decls, help=help_text, rich_help_panel=PANEL_TITLES[meta.get("panel",
                              "run control")], hidden=meta.get("hidden", False), **extra)
        made.append(inspect.Parameter(field.name, KW, default=option, annotation=annotation(field, hint)))
        for i, alias in enumerate(meta.get("aliases", ())):
            made.append(inspect.Parameter(f"{field.name}{ALIAS}{i}", KW, annotation=annotation(field, hint),
                                          default=typer.Option(None, alias, hidden=True, help=help_text)))
    return made


def config_options(cls, notes: dict[str, str] | None = None):
    """Decorator: the command takes one option per field of ``cls`` (as ``**options``) after its own parameters."""
    def decorate(func):
        hints = typing.get_type_hints(func)
        own = [p.replace(kind=KW, annotation=hints.get(p.name, p.annotation))
               for p in inspect.signature(func).parameters.values() if p.kind is not inspect.Parameter.VAR_KEYWORD]
        func.__signature__ = inspect.Signature([*own[:1], *parameters(cls, notes), *own[1:]])
        return func
    return decorate


def to_config(cls, name: str, value, option: str | None = None):
    """A command-line value of the field ``name`` as the config value (fractions parsed, lists split)."""
    from ..recipes.layers import parse_fraction

    field = {f.name: f for f in dataclasses.fields(cls)}[name]
    form, option = shape(field, field_types(cls)[name]), option or flag_name(name)
    if value is None:
        return () if form == "repeat" else None
    if form == "fraction":
        return parse_fraction(value, option)
    if form == "repeat":
        return tuple(value)
    if form == "list":
        kind = typing.get_args(_unwrap(field_types(cls)[name])[0])[0]
        try:
            return tuple(kind(t.strip()) for t in value.split(",") if t.strip())
        except ValueError:
            raise FisherscanError(f"{option} {value}: pass comma-separated {kind.__name__} values, like "
                                  f"{cli_default(field, field_types(cls)[name]) or '7,11,15,23'}") from None
    return value


def field_help(cls, name: str) -> str:
    """The help text of the field ``name`` of ``cls`` (for a hand-written option of the same meaning)."""
    return {f.name: f for f in dataclasses.fields(cls)}[name].metadata["help"]


def explicit(ctx: typer.Context, name: str) -> bool:
    """Whether the user gave the parameter ``name`` (not its default)."""
    source = ctx.get_parameter_source(name)  # by name: typer may carry its own copy of click
    return getattr(source, "name", "DEFAULT") not in ("DEFAULT", "DEFAULT_MAP")


def given(ctx: typer.Context, cls, options: dict) -> dict:
    """The fields of ``cls`` the user gave on the command line (old spellings included), as config values."""
    values = {}
    for key, value in options.items():
        name, _, alias = key.partition(ALIAS)
        if not explicit(ctx, key):
            continue
        spelled = None
        if alias:
            meta = {f.name: f for f in dataclasses.fields(cls)}[name].metadata
            spelled = meta["aliases"][int(alias)]
        values[name] = to_config(cls, name, value, spelled)
    return values
