"""fisherscan.bench.report on made-up rows (no training): the summary, the group means and the paired differences
recomputed by pandas from the written CSV (oracle), the JSON keys the issue names, the plot, and a failed sanity
check that leaves the test columns out."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from fisherscan.bench.pretrain import Pretrained
from fisherscan.bench.protocol import GROUPS, PAIRS, SOURCE_VAL, STRATEGIES, TEST_STYLES, benchmark_config
from fisherscan.bench.proxy_dg import BenchResult, row, sanity_check
from fisherscan.bench.report import finish, mean_std, results_table, verdict


def made_up(tmp_path: Path, gap: float = 8.0) -> BenchResult:
    config = benchmark_config(tmp_path / "out")
    config.out.mkdir()
    rng = np.random.default_rng(0)
    rows = []
    for seed in config.seeds:
        for i, strategy in enumerate(config.strategies):
            for column in (SOURCE_VAL, "rain", *TEST_STYLES):
                value = 40 + i + rng.normal(0, 1) + (gap if strategy == "full" and column == SOURCE_VAL else 0)
                rows.append(row(seed, strategy, column, value))
    pretrained = Pretrained(tmp_path / "w.safetensors", True, 12.0, {"final_loss": 0.3})
    result = BenchResult(config, pretrained, rows, {}, tuned_fraction={s: 0.05 for s in config.strategies})
    result.sanity = sanity_check(config, rows)
    return result


def test_summary_groups_and_pairs_recomputed_from_the_csv(tmp_path):
    result = made_up(tmp_path)
    finish(result)
    frame = pd.read_csv(result.paths["csv"])
    data = json.loads(result.paths["json"].read_text())
    assert sorted(frame["strategy"].unique()) == sorted(STRATEGIES) and len(frame) == 3 * len(STRATEGIES) * 8
    assert set(frame[frame.group == "seen"]["column"]) == set(GROUPS["seen"])
    groups = frame[frame.group != "validation"].groupby(["group", "strategy", "seed"])["miou"].mean()
    for strategy in STRATEGIES:
        for group in GROUPS:
            assert data["summary"][strategy][group]["mean"] == pytest.approx(groups[group, strategy].mean(), abs=1e-3)
            assert data["summary"][strategy][group]["std"] == pytest.approx(groups[group, strategy].std(ddof=1),
                                                                           abs=1e-3)
    for a, b in PAIRS:
        for group in GROUPS:
            diffs = (groups[group, a] - groups[group, b]).to_numpy()
            cell = data["paired"][f"{a}_vs_{b}"][group]
            assert cell["mean"] == pytest.approx(diffs.mean(), abs=1e-3)
            assert cell["std"] == pytest.approx(statistics.stdev(diffs), abs=1e-3)
    value = frame[frame.column == SOURCE_VAL].set_index(["strategy", "seed"])["miou"]
    assert data["sanity"]["full_minus_freeze_source_val"] == pytest.approx((value["full"] - value["freeze"]).mean(),
                                                                           abs=1e-3)
    assert data["sanity"]["passed"] is True
    summary = pd.read_csv(result.paths["summary"])
    cell = summary[(summary.strategy == "drfim") & (summary.column == "novel")].iloc[0]
    assert cell["mean"] == pytest.approx(data["summary"]["drfim"]["novel"]["mean"], abs=1e-3)
    png = result.paths["plot"].read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    assert "drfim - random on novel" in "\n".join(verdict(result))
    assert results_table(result).row_count == len(STRATEGIES)


def test_failed_sanity_check_has_no_test_columns(tmp_path):
    result = made_up(tmp_path, gap=0.0)
    result.rows = [r for r in result.rows if r["group"] == "validation"]  # what run_benchmark has at that point
    assert result.sanity["passed"] is False and result.sanity["full_minus_freeze_source_val"] < 5
    finish(result)
    data = json.loads(result.paths["json"].read_text())
    assert data["paired"] == {} and set(data["summary"]["drfim"]) == {SOURCE_VAL, "rain", "tuned_fraction"}
    assert "FAILED" in verdict(result)[0]


def test_mean_std_against_statistics():
    values = [31.2, 28.7, 30.05]
    result = mean_std(values)
    assert result["mean"] == pytest.approx(statistics.fmean(values))
    assert result["std"] == pytest.approx(statistics.stdev(values)) and result["n"] == 3
    assert mean_std([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}
