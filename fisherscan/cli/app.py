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

from ..errors import FisherscanError

app = typer.Typer(no_args_is_help=True, add_completion=False, pretty_exceptions_enable=False,
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
    try:
        value = float(text[:-1]) / 100 if text.strip().endswith("%") else float(text)
    except ValueError:
        raise FisherscanError(f"{option} {text}: pass a fraction like 0.05 or a percentage like 5%") from None
    if not (0 <= value <= 1) or (value == 0 and not allow_zero):
        bounds = "[0, 1] (0% to 100%)" if allow_zero else "(0, 1] (above 0%, at most 100%)"
        raise FisherscanError(f"{option} {text}: must lie in {bounds}")
    return value


def parse_blocks(text: str | None, option: str = "--feature-blocks") -> tuple[int, ...] | None:
    """'7,11,15,23' -> (7, 11, 15, 23) for --feature-blocks or --perturb-at; None stays None."""
    if text is None:
        return None
    try:
        return tuple(int(t) for t in text.split(",") if t.strip())
    except ValueError:
        example = "7,11,15,23" if option == "--feature-blocks" else "0,2,4"
        raise FisherscanError(f"{option} {text}: pass block indices like {example}") from None


def print_paths(*labelled: tuple[str, Path]) -> None:
    """``label: path`` lines on stdout, verbatim: no markup, no highlighting, never wrapped (scripts parse them)."""
    width = max(len(label) for label, _ in labelled) + 1
    for label, path in labelled:
        stdout.print(f"{label + ':':<{width}} {path}", markup=False, highlight=False, soft_wrap=True)

