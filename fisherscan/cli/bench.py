"""``fisherscan bench``: the proxy domain-generalisation benchmark, version 2 (``fisherscan.bench.proxy_dg``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .app import app, console, parse_fraction, print_paths, stdout, user_errors


def parse_names(text: Optional[str]) -> Optional[tuple[str, ...]]:
    """'a,b' -> ('a', 'b'); None stays None."""
    return None if text is None else tuple(t.strip() for t in text.split(",") if t.strip())


@app.command()
def bench(
    out: Optional[Path] = typer.Option(None, "--out", show_default=False,
                                       help="folder for proxy_dg_v2.json/.csv/.summary.csv/.png (default "
                                            "$XDG_CACHE_HOME/fisherscan/bench, i.e. ~/.cache/fisherscan/bench)"),
    quick: bool = typer.Option(False, "--quick", help="one seed, short pretraining, few steps (about a CPU minute; "
                                                      "CI): shows the pipeline works, not how strategies rank"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="number of seeds (default 3; 1 with --quick)"),
    styles: Optional[str] = typer.Option(None, "--styles", help="test styles to evaluate, comma-separated (default "
                                                                "all: clean,fog,colour,blur,night,snow)"),
    strategies: Optional[str] = typer.Option(None, "--strategies",
                                             help="strategies, comma-separated (default all; freeze and full always "
                                                  "run: the sanity check needs them)"),
    budget: Optional[str] = typer.Option(None, "--budget", help="selected fraction of all backbone parameters at "
                                                                "the end (default 5%; Eq. 16 starts at a fifth)"),
    cache: Optional[Path] = typer.Option(None, "--cache",
                                         help="pretrained-backbone cache "
                                              "(default $XDG_CACHE_HOME/fisherscan/proxy_dg)"),
    work: Optional[Path] = typer.Option(None, "--work", help="data, scores and run folders (default OUT/work)"),
    device: str = typer.Option("cpu", "--device", help="cpu|cuda|auto (the benchmark's numbers are CPU numbers)"),
) -> None:
    """Pretrain a small ViT on procedural scenes in 4 styles (cached), tune it on an unseen source style with every
    selection strategy at 5%, check on validation scenes that the task needs tuning, then evaluate mIoU on seen and
    novel test styles."""
    from ..bench.protocol import benchmark_config
    from ..bench.proxy_dg import run_benchmark
    from ..bench.report import results_table, verdict
    from ..io import cache_folder

    with user_errors():
        out = out if out is not None else cache_folder("bench")
        fraction = parse_fraction(budget, "--budget", allow_zero=False) if budget is not None else None
        config = benchmark_config(out, quick=quick, seeds=seeds, cache=cache, work=work, device=device,
                                  styles=parse_names(styles), strategies=parse_names(strategies), budget=fraction)
        result = run_benchmark(config, console)
        stdout.print(results_table(result))
        for line in verdict(result):
            stdout.print(escape(line), highlight=False)
        made = "loaded from the cache; it took" if result.pretrained.cached else "done now in"
        stdout.print(f"pretraining: {made} {result.pretrained.seconds:.0f} s; benchmark without pretraining: "
                     f"{result.seconds:.0f} s", highlight=False)
        print_paths(*((label, path) for label, path in result.paths.items()), ("weights", result.pretrained.path))
