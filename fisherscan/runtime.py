"""What every long-running recipe shares at run time: the device, the progress bar, and the tests' slow-down.

``FISHERSCAN_TEST_DELAY=<seconds>`` makes every ``step_done`` sleep that long, so the fault tests can ``kill -9``
a real ``score`` or ``tune`` process in the middle (a tiny model is otherwise done before the signal lands). This
is the one place it is read; unset (the default) it costs one dictionary look-up per step.
"""

from __future__ import annotations

import os
import time

import torch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from .errors import FisherscanError

DELAY_VARIABLE = "FISHERSCAN_TEST_DELAY"


def resolve_device(name: str) -> torch.device:
    """``--device auto|cpu|cuda`` as a torch device; a one-line error for a missing or unknown one."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FisherscanError("--device cuda: no CUDA device is visible; use --device cpu or auto")
    if name not in ("cpu", "cuda"):
        raise FisherscanError(f"--device {name}: use auto, cpu or cuda")
    return torch.device(name)


def progress_bar(console: Console | None) -> Progress:
    """A rich progress bar with count, rate, elapsed time and ETA; disabled without a console."""
    return Progress(TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                    TextColumn("{task.fields[rate]}"), TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn(),
                    console=console, disable=console is None, transient=False)


def step_done(progress: Progress, task, advance: int = 1, rate: str = "") -> None:
    """Advance a long loop's bar by ``advance`` (one batch or step done), then sleep ``$FISHERSCAN_TEST_DELAY``
    seconds when the fault tests set it."""
    progress.update(task, advance=advance, rate=rate)
    delay = os.environ.get(DELAY_VARIABLE)
    if delay:
        time.sleep(float(delay))
