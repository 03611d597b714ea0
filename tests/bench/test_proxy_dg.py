"""The proxy DG benchmark v2 (fisherscan.bench.proxy_dg, ``fisherscan bench``).

One real ``fisherscan bench --quick`` run through the CLI (module scope; pretraining included, into an empty cache,
as in CI) is checked against independent oracles: pandas recomputes the summary and the paired differences from
the per-seed CSV, hashlib the weights every run was tuned from, the run manifests and score files what each
strategy actually did. The order of the phases (validation, sanity check, then the test styles) is checked with the
training replaced by stubs.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path

import pandas as pd
import pytest
import torch
from conftest import invoke, one_error_line

import fisherscan.bench.protocol as protocol
import fisherscan.bench.proxy_dg as proxy_dg
from fisherscan.bench.pretrain import MODEL, Pretrained
from fisherscan.bench.protocol import GROUPS, PAIRS, SOURCE_VAL, STRATEGIES, TEST_STYLES, benchmark_config
from fisherscan.errors import FisherscanError
from fisherscan.scores.file import load_scores


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out, cache = root / "out", root / "cache"
    result = invoke("bench", "--quick", "--out", out, "--cache", cache)
    data = json.loads((out / "proxy_dg_v2.json").read_text()) if (out / "proxy_dg_v2.json").is_file() else None
    return {"result": result, "out": out, "cache": cache, "data": data}


@pytest.mark.slow
def test_quick_exits_0_and_prints_table_verdict_and_paths(quick):
    result = quick["result"]
    assert result.exit_code == 0, f"{result.exception!r}\n{result.stderr}"
    text = " ".join(result.stdout.split())  # rich wraps the title and long lines at the terminal's width
    assert "mIoU (%), tuned on 'toon' only" in text and "sanity: full - freeze" in text
    assert "drfim - oracle-delta on novel" in text and "(paired over 1 seed;" in text
    for label, name in (("json:", "proxy_dg_v2.json"), ("csv:", "proxy_dg_v2.csv"), ("plot:", "proxy_dg_v2.png"),
                        ("summary:", "proxy_dg_v2.summary.csv")):
        line = next(row for row in result.stdout.splitlines() if row.startswith(label))
        assert line.split()[1] == str(quick["out"] / name)


@pytest.mark.slow
def test_every_strategy_has_a_finite_miou_on_every_column(quick):
    """Oracle: the per-seed CSV, read by pandas, holds every (strategy, column) once, finite, in [0, 100]."""
    frame = pd.read_csv(quick["out"] / "proxy_dg_v2.csv")
    assert sorted(frame["strategy"].unique()) == sorted(STRATEGIES)
    assert sorted(frame["column"].unique()) == sorted([SOURCE_VAL, "rain", *TEST_STYLES])
    assert len(frame) == len(STRATEGIES) * (2 + len(TEST_STYLES)) * len(quick["data"]["config"]["seeds"])
    assert not frame.duplicated(["seed", "strategy", "column"]).any()
    assert frame["miou"].between(0, 100).all()


@pytest.mark.slow
def test_json_keys_and_paired_differences_recomputed_from_the_csv(quick):
    """Oracle: pandas group-bys of the per-seed rows give the JSON's group means and paired differences."""
    frame = pd.read_csv(quick["out"] / "proxy_dg_v2.csv")
    data = quick["data"]
    groups = frame[frame.group != "validation"].groupby(["group", "strategy", "seed"])["miou"].mean()
    for a, b in PAIRS:
        for group in GROUPS:
            cell = data["paired"][f"{a}_vs_{b}"][group]
            assert cell["mean"] == pytest.approx((groups[group, a] - groups[group, b]).mean(), abs=1e-3)
            assert cell["std"] == 0.0 and cell["n"] == 1  # one seed
    value = frame[frame.column == SOURCE_VAL].set_index(["strategy", "seed"])["miou"]
    sanity = data["sanity"]
    assert sanity["full_minus_freeze_source_val"] == pytest.approx((value["full"] - value["freeze"]).mean(), abs=1e-3)
    assert sanity["enforced"] is False and sanity["passed"] is True  # --quick reports it only
    assert data["protocol"]["source_style"] == "toon" and data["protocol"]["validation_style"] == "rain"
    assert data["model"] == MODEL and data["config"]["quick"] is True
    assert set(data["stage_seconds"]) >= {"score diagonal", "score oracle", "tune full", "evaluate test"}
    assert not list(quick["out"].glob(".*.tmp"))  # atomic writes leave no temporary files


@pytest.mark.slow
def test_runs_used_the_pretrained_weights_and_each_strategy_its_selection(quick):
    """Oracles: hashlib's sha256 of the cached weights; the manifests' selection and learning rates; the score
    files each strategy ranked by (estimator; the oracle's paired --shift-data)."""
    data = quick["data"]
    weights = quick["cache"] / data["pretraining"]["file"]
    assert weights.is_file() and data["pretraining"]["cached"] is False
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    work = quick["out"] / "work" / "seed0"
    for strategy in STRATEGIES:
        manifest = json.loads((work / f"run_{strategy}" / "manifest.json").read_text())
        assert manifest["weights_sha256"] == sha and manifest["random_init"] is False
        assert manifest["optimizer"]["lr"] == 1e-4 and manifest["optimizer"]["decoder_lr"] == 1e-3
        assert manifest["optimizer"]["bias_correction"] == "selection"
        fraction = manifest["trainable"]["backbone_fraction"]
        assert fraction == pytest.approx({"full": 1.0, "freeze": 0.0}.get(strategy, 0.05), abs=1e-4), strategy
        assert data["summary"][strategy]["tuned_fraction"] == pytest.approx(fraction)
    var = json.loads((work / "run_drfim-var" / "manifest.json").read_text())
    oracle = json.loads((work / "run_oracle-delta" / "manifest.json").read_text())
    assert var["selection"]["strategy"] == "drfim" and oracle["selection"]["strategy"] == "delta"
    assert load_scores(var["scores"])[1]["estimator"] == "variational"
    oracle_meta = load_scores(oracle["scores"])[1]
    assert oracle_meta["perturbation"]["family"] == "paired"  # the same scenes rendered in rain, --shift-data
    assert Path(oracle_meta["options"]["shift_data"]).parent.name == "source_seed0"
    assert Path(oracle_meta["options"]["shift_data"]).name == "rain"
    assert load_scores(work / "scores.safetensors")[1]["estimator"] == "diagonal"
    real = json.loads((work / "run_oracle-drfim" / "manifest.json").read_text())  # DR-FIM from the same real shift
    assert real["selection"]["strategy"] == "drfim" and real["scores"] == oracle["scores"]
    # anti-drfim: the diagonal scores rebalanced with lambda -1, tuned from the same head as drfim
    anti, drfim = (json.loads((work / f"run_{s}" / "manifest.json").read_text()) for s in ("anti-drfim", "drfim"))
    assert anti["selection"]["strategy"] == "drfim" and anti["head"] == drfim["head"]
    anti_scores, anti_meta = load_scores(anti["scores"])
    assert anti_meta["balance"]["drfim_weight"] == -1.0 and Path(anti["scores"]).name == "scores_anti.safetensors"
    diagonal = load_scores(work / "scores.safetensors")[0]
    assert all(torch.equal(anti_scores["fim"][n], diagonal["fim"][n]) for n in diagonal["fim"])


def stubbed(monkeypatch, tmp_path, gap: float):
    """run_benchmark with pretraining, scoring and tuning replaced by stubs and every evaluation recorded: full's
    source-validation mIoU is ``gap`` above everything else."""
    calls = []
    monkeypatch.setattr(proxy_dg, "pretrained_weights", lambda *a: Pretrained(tmp_path / "w", True, 1.0, {}))
    monkeypatch.setattr(proxy_dg, "score_seed", lambda *a: {})
    monkeypatch.setattr(proxy_dg, "tune_one", lambda config, pre, seed, strategy, *a: (strategy, 0.05))

    def evaluate(config, run_dir, datasets):
        calls.append(tuple(datasets))
        return {c: 50.0 + (gap if run_dir == "full" and c == SOURCE_VAL else 0.0) for c in datasets}

    monkeypatch.setattr(proxy_dg, "evaluate", evaluate)
    config = benchmark_config(tmp_path / "out", quick=True, strategies=("drfim",), styles=("fog", "night"))
    return calls, dataclasses.replace(config, sanity_min=5.0)


def test_a_failed_sanity_check_stops_before_any_test_style(monkeypatch, tmp_path):
    calls, config = stubbed(monkeypatch, tmp_path, gap=4.0)
    with pytest.raises(FisherscanError, match="sanity check failed: full - freeze .* 4.0 < 5.0"):
        proxy_dg.run_benchmark(config)
    assert calls and all(columns == (SOURCE_VAL, "rain") for columns in calls)  # validation only
    data = json.loads((tmp_path / "out" / "proxy_dg_v2.json").read_text())
    assert data["sanity"]["passed"] is False and data["paired"] == {}


def test_the_test_styles_come_after_every_validation(monkeypatch, tmp_path):
    calls, config = stubbed(monkeypatch, tmp_path, gap=6.0)
    result = proxy_dg.run_benchmark(config)
    first_test = calls.index(("fog", "night"))
    assert all(c == (SOURCE_VAL, "rain") for c in calls[:first_test]) and first_test == 3
    assert all(c == ("fog", "night") for c in calls[first_test:]) and len(calls) == 6
    assert result.sanity["full_minus_freeze_source_val"] == pytest.approx(6.0)
    assert result.paired["drfim_vs_freeze"]["novel"]["mean"] == 0.0


def test_cli_prints_the_failed_sanity_check_as_one_line(monkeypatch, tmp_path):
    calls, config = stubbed(monkeypatch, tmp_path, gap=1.0)
    monkeypatch.setitem(protocol.QUICK, "sanity_min", 5.0)
    result = invoke("bench", "--quick", "--out", tmp_path / "cli", "--cache", tmp_path / "cache", "--strategies",
                    "drfim")
    one_error_line(result, "sanity check failed", "no test style was evaluated")
