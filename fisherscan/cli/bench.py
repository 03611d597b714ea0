"""``fisherscan bench``: the proxy domain-generalisation benchmark (``fisherscan.bench.proxy_dg``)."""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.markup import escape

from .app import app, console, print_paths, stdout, user_errors


@app.command()
def bench(
    out: Optional[Path] = typer.Option(None, "--out", show_default=False,
                                       help="folder for proxy_dg.json/.csv/.summary.csv/.png (default "
                                            "$XDG_CACHE_HOME/fisherscan/bench, i.e. ~/.cache/fisherscan/bench)"),
    quick: bool = typer.Option(False, "--quick", help="one seed, short pretraining, few steps (~1 CPU minute; CI)"),
    seeds: Optional[int] = typer.Option(None, "--seeds", help="number of seeds (default 3; 1 with --quick)"),
    cache: Optional[Path] = typer.Option(None, "--cache",
                                         help="pretrained-backbone cache "
                                              "(default $XDG_CACHE_HOME/fisherscan/proxy_dg)"),
    work: Optional[Path] = typer.Option(None, "--work", help="data, scores and run folders (default OUT/work)"),
    device: str = typer.Option("cpu", "--device", help="cpu|cuda|auto (the benchmark's numbers are CPU numbers)"),
) -> None:
    """Pretrain a small ViT on procedural scenes of 5 domains (cached), then score, tune on the source domain with
    full, freeze, random, fim, delta, drfim and variational drfim, and evaluate mIoU on every domain."""
    from ..bench.proxy_dg import benchmark_config, results_table, run_benchmark, verdict
    from ..io import cache_folder

    with user_errors():
        out = out if out is not None else cache_folder("bench")
        config = benchmark_config(out, quick=quick, seeds=seeds, cache=cache, work=work, device=device)
        result = run_benchmark(config, console)
        stdout.print(results_table(result))
        for line in verdict(result):
            stdout.print(escape(line), highlight=False)
        made = "loaded from the cache; it took" if result.pretrained.cached else "done now in"
        stdout.print(f"pretraining: {made} {result.pretrained.seconds:.0f} s; benchmark without pretraining: "
                     f"{result.seconds:.0f} s", highlight=False)
        print_paths(*((label, path) for label, path in result.paths.items()), ("weights", result.pretrained.path))
