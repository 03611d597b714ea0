"""The benchmark's numbers and files: the summary over seeds, the paired differences, ``proxy_dg_v2.json``,
``proxy_dg_v2.csv`` (one row per seed, strategy and column), ``proxy_dg_v2.summary.csv``, ``proxy_dg_v2.png``, the
printed table and the verdict sentences.

Per seed, a group's value is the plain mean of its styles' mIoUs (``protocol.GROUPS``); over seeds, the mean and the
sample standard deviation (ddof 1); a pair's difference is taken per seed first (same seed: same source scenes,
decoder initialisation, draws and data order), then its mean and std.
"""

from __future__ import annotations

import csv
import dataclasses
import io
import json
import platform
from pathlib import Path

import numpy as np
import torch
from rich import box
from rich.markup import escape
from rich.table import Table

from .. import __version__
from ..io import atomic_target
from . import protocol
from .protocol import GROUPS, PAIRS, SOURCE_STYLE, SOURCE_VAL, VALIDATION_COLUMNS

STEM = "proxy_dg_v2"


def mean_std(values: list[float]) -> dict:
    """Mean and sample standard deviation (ddof 1; 0 for a single value) of ``values``."""
    array = np.asarray(values, dtype=np.float64)
    std = float(array.std(ddof=1)) if array.size > 1 else 0.0
    return {"mean": float(array.mean()), "std": std, "n": int(array.size)}


def columns_of(result) -> list[str]:
    tested = result.config.styles if result.sanity["passed"] else ()
    return [*VALIDATION_COLUMNS, *tested]


def group_values(result) -> dict[tuple[int, str, str], float]:
    """(seed, strategy, group) -> the mean of the group's evaluated styles, for every group with a style."""
    value = {(r["seed"], r["strategy"], r["column"]): r["miou"] for r in result.rows}
    out = {}
    for group, styles in GROUPS.items():
        present = [s for s in styles if s in columns_of(result)]
        for seed in result.config.seeds:
            for strategy in result.config.strategies:
                if present:
                    out[seed, strategy, group] = float(np.mean([value[seed, strategy, s] for s in present]))
    return out


def summarise(result) -> None:
    """``result.summary`` (per strategy: each column and group, mean/std over seeds) and ``result.paired``."""
    value = {(r["seed"], r["strategy"], r["column"]): r["miou"] for r in result.rows}
    groups = group_values(result)
    seeds, strategies = result.config.seeds, result.config.strategies
    for strategy in strategies:
        entry = {c: mean_std([value[seed, strategy, c] for seed in seeds]) for c in columns_of(result)}
        for group in GROUPS:
            if (seeds[0], strategy, group) in groups:
                entry[group] = mean_std([groups[seed, strategy, group] for seed in seeds])
        entry["tuned_fraction"] = result.tuned_fraction.get(strategy)
        result.summary[strategy] = entry
    for a, b in PAIRS:
        if a not in strategies or b not in strategies:
            continue
        pair = {}
        for group in GROUPS:
            if (seeds[0], a, group) in groups:
                diffs = [groups[seed, a, group] - groups[seed, b, group] for seed in seeds]
                pair[group] = {**mean_std(diffs), "per_seed": diffs, "wins": int(sum(d > 0 for d in diffs))}
        if pair:
            result.paired[f"{a}_vs_{b}"] = pair


def protocol_record() -> dict:
    names = ("PROTOCOL_VERSION", "SOURCE_STYLE", "VALIDATION_STYLE", "SEEN_STYLES", "NOVEL_STYLES", "SOURCE_SEED",
             "VAL_SEED", "TEST_SEED", "BUDGET", "START_FRACTION", "DECODER", "WARMUP_STEPS", "WARMUP_LR",
             "BACKBONE_LR", "DECODER_LR", "TUNE_STEPS", "BATCH_SIZE", "SANITY_MIN")
    from .pretrain import PRETRAIN_SEED, PRETRAIN_STYLES

    return {**{n.lower(): getattr(protocol, n) for n in names}, "pretrain_styles": list(PRETRAIN_STYLES),
            "pretrain_seed": PRETRAIN_SEED, "groups": {g: list(s) for g, s in GROUPS.items()},
            "steps": (protocol.__doc__ or "").strip()}


def result_dict(result) -> dict:
    config = result.config
    return {
        "fisherscan_version": __version__, "torch": torch.__version__,
        "machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                    "device": config.device},
        "protocol": protocol_record(),
        "config": {k: (str(v) if isinstance(v, Path) else v) for k, v in dataclasses.asdict(config).items()
                   if k not in ("out", "work", "cache")},
        "model": config.pretrain.model,
        "pretraining": {"cached": result.pretrained.cached, "seconds": result.pretrained.seconds,
                        "file": result.pretrained.path.name, **{k: v for k, v in result.pretrained.info.items()
                                                                 if k != "config"}},
        "benchmark_seconds": result.seconds, "benchmark_cpu_seconds": result.cpu_seconds,
        "stage_seconds": result.stage_seconds,
        "columns": {"validation": list(VALIDATION_COLUMNS), **{g: list(s) for g, s in GROUPS.items()}},
        "sanity": result.sanity,
        "summary": result.summary, "paired": result.paired,
        "rows": result.rows,
    }


def finish(result) -> None:
    """Summarise and write every file (atomically); ``result.paths``."""
    summarise(result)
    out = Path(result.config.out)
    paths = {"json": out / f"{STEM}.json", "csv": out / f"{STEM}.csv", "summary": out / f"{STEM}.summary.csv",
             "plot": out / f"{STEM}.png"}
    with atomic_target(paths["json"]) as tmp:
        tmp.write_text(json.dumps(result_dict(result), indent=1))
    with atomic_target(paths["csv"]) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=["seed", "strategy", "column", "group", "miou"])
            writer.writeheader()
            writer.writerows({**r, "miou": f"{r['miou']:.4f}"} for r in result.rows)
    with atomic_target(paths["summary"]) as tmp:
        with open(tmp, "w", newline="") as handle:
            writer = csv.writer(handle)
            writer.writerow(["strategy", "tuned_fraction", "column", "mean", "std", "n"])
            for strategy, entry in result.summary.items():
                for column, cell in entry.items():
                    if isinstance(cell, dict):
                        writer.writerow([strategy, f"{entry['tuned_fraction']:.4f}", column, f"{cell['mean']:.4f}",
                                         f"{cell['std']:.4f}", cell["n"]])
    plot_results(result, paths["plot"])
    result.paths = paths


def plot_results(result, path: Path) -> None:
    """Top: one group of bars per column and test group, one bar per strategy (seed std as error bars). Bottom: the
    paired differences per test group, mean and seed std."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    columns = [*columns_of(result), *(g for g in GROUPS if g in next(iter(result.summary.values())))]
    strategies = list(result.summary)
    width = 0.85 / max(len(strategies), 1)
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(14, 8), gridspec_kw={"height_ratios": [3, 2]})
    colours = plt.get_cmap("tab20").colors
    for i, strategy in enumerate(strategies):
        xs = np.arange(len(columns)) + (i - (len(strategies) - 1) / 2) * width
        top.bar(xs, [result.summary[strategy][c]["mean"] for c in columns], width, color=colours[i % len(colours)],
                yerr=[result.summary[strategy][c]["std"] for c in columns], capsize=1.5, label=strategy)
    top.set_xticks(np.arange(len(columns)), [c if c not in GROUPS else f"{c} (mean)" for c in columns])
    top.set_ylabel("mIoU (%)")
    seeds = len(result.config.seeds)
    top.set_title(f"proxy DG benchmark v2: tuned on '{SOURCE_STYLE}' only, {seeds} seed{'s' if seeds > 1 else ''} "
                  "(mean, error bar = std)" + (" -- quick" if result.config.quick else ""))
    top.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    pairs = list(result.paired)
    for j, group in enumerate(GROUPS):
        cells = [result.paired[p].get(group) for p in pairs]
        xs = np.arange(len(pairs)) + (j - 0.5) * 0.35
        bottom.bar(xs, [c["mean"] if c else 0 for c in cells], 0.35, yerr=[c["std"] if c else 0 for c in cells],
                   capsize=3, label=group)
    bottom.axhline(0, color="black", linewidth=0.8)
    bottom.set_xticks(np.arange(len(pairs)), [p.replace("_vs_", " - ") for p in pairs])
    bottom.set_ylabel("paired difference (mIoU points)")
    bottom.legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=110, bbox_inches="tight")
    plt.close(fig)
    with atomic_target(path) as tmp:
        tmp.write_bytes(buffer.getvalue())


def results_table(result) -> Table:
    """Strategy x (the validation columns and the test groups) mIoU (%), mean +- std over seeds; the single test
    styles are in the files."""
    seeds = len(result.config.seeds)
    columns = [c for c in (*VALIDATION_COLUMNS, *GROUPS) if c in next(iter(result.summary.values()))]
    table = Table(title=f"mIoU (%), tuned on '{SOURCE_STYLE}' only: mean±std over {seeds} seed"
                        f"{'s' if seeds > 1 else ''}" + (" (--quick)" if result.config.quick else ""),
                  box=box.SIMPLE_HEAD, padding=(0, 1), collapse_padding=True)
    table.caption = (f"{SOURCE_VAL}: {SOURCE_STYLE} validation scenes; rain: validation style; "
                     + "; ".join(f"{g}: mean of {', '.join(s)}" for g, s in GROUPS.items()))
    table.add_column("strategy", no_wrap=True)
    table.add_column("tuned", justify="right")
    for column in columns:
        table.add_column(column, justify="right")
    for strategy, entry in result.summary.items():
        cells = [f"{entry[c]['mean']:.1f}±{entry[c]['std']:.1f}" for c in columns]
        fraction = entry.get("tuned_fraction")
        table.add_row(escape(strategy), f"{100 * fraction:.0f}%" if fraction is not None else "-", *cells)
    return table


def verdict(result) -> list[str]:
    """Plain sentences: the sanity check, then per pair and group the paired difference against its spread."""
    sanity = result.sanity
    lines = [f"sanity: full - freeze on the source validation scenes = {sanity['full_minus_freeze_source_val']:+.2f} "
             f"mIoU points ({'passed' if sanity['passed'] else 'FAILED'}"
             + (f", needs >= {sanity['min']})" if sanity["enforced"] else ", not enforced)")]
    for key, pair in result.paired.items():
        a, b = key.split("_vs_")
        for group, diff in pair.items():
            seeds = f"{diff['n']} seed{'s' if diff['n'] != 1 else ''}"
            lines.append(f"{a} - {b} on {group}: {diff['mean']:+.2f} ± {diff['std']:.2f} mIoU points (paired over "
                         f"{seeds}; {a} ahead in {diff['wins']})")
    return lines
