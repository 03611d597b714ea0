"""The ``fisherscan`` Typer app and what its commands share: one-line user errors, fractions, paths printed.

Each command module (``fisherscan.cli.score``, ``tune``, ...) registers its commands on ``app``.
"""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Iterator

import typer
from rich.console import Console
from rich.markup import escape
from typer.core import TyperCommand, TyperGroup

from ..errors import FisherscanError


def _no_flag_metavar(params: list) -> list:
    for param in params:  # a flag takes no value: show none (typer would show <bool>)
        if getattr(param, "is_flag", False) and param.metavar is None:
            param.metavar = ""
    return params


class Command(TyperCommand):
    """A command whose flags (``--help`` too) show no ``<bool>`` metavar."""

    def get_params(self, ctx) -> list:
        return _no_flag_metavar(super().get_params(ctx))


class Group(TyperGroup):
    def get_params(self, ctx) -> list:
        return _no_flag_metavar(super().get_params(ctx))


class App(typer.Typer):
    """``typer.Typer`` whose commands are ``Command``s."""

    def command(self, *args, cls=None, **kwargs):
        return super().command(*args, cls=cls or Command, **kwargs)


app = App(cls=Group, no_args_is_help=True, add_completion=True, pretty_exceptions_enable=False,
          help="Fisher-guided robust tuning (FisherTune) of ViT foundation models for DG segmentation.")
console = Console(stderr=True)
stdout = Console()


@contextlib.contextmanager
def user_errors() -> Iterator[None]:
    """A FisherscanError becomes one red line on stderr and exit code 2; never a traceback."""
    try:
        yield
    except FisherscanError as error:
        console.print(f"[bold red]error:[/] {escape(str(error))}", highlight=False, soft_wrap=True)
        raise typer.Exit(2) from None
    except KeyboardInterrupt:
        console.print("[bold red]interrupted[/]")
        raise typer.Exit(130) from None


def parse_fraction(text: str, option: str, allow_zero: bool = True) -> float:
    """'5%' or '0.05' -> 0.05, within [0, 1] (or (0, 1] without ``allow_zero``); a one-line error otherwise."""
    from ..recipes.layers import parse_fraction as parse

    return parse(text, option, allow_zero)


def print_paths(*labelled: tuple[str, Path]) -> None:
    """``label: path`` lines on stdout, verbatim: no markup, no highlighting, never wrapped (scripts parse them)."""
    width = max(len(label) for label, _ in labelled) + 1
    for label, path in labelled:
        stdout.print(f"{label + ':':<{width}} {path}", markup=False, highlight=False, soft_wrap=True)

