"""The proxy domain-generalisation benchmark (fisherscan.proxy_dg, ``fisherscan bench``).

One real ``fisherscan bench --quick`` run through the CLI (module scope; pretraining included, into an empty cache,
as in CI) is checked against independent oracles: pandas recomputes the summary from the per-seed CSV, hashlib
the weights every run was tuned from, the run manifests and score files what each strategy actually did. The
pretraining cache is checked on a tiny config: a second call reuses the file, a fresh pretraining in another
folder reproduces it bit for bit, a damaged file is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import statistics

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import invoke
from safetensors.torch import load_file

from fisherscan.bench.pretrain import COARSE_NAMES, MODEL, PretrainConfig, cache_dir, coarse_labels, pretrained_weights
from fisherscan.bench.proxy_dg import STRATEGIES, TUNED, UNSEEN, benchmark_config, mean_std
from fisherscan.data.scenes import CLASSES, scene_layout
from fisherscan.data.synthetic import DOMAINS
from fisherscan.models.backbone import build_backbone
from fisherscan.scores.file import load_scores


@pytest.fixture(scope="module")
def quick(tmp_path_factory):
    root = tmp_path_factory.mktemp("bench")
    out, cache = root / "out", root / "cache"
    result = invoke(*["bench", "--quick", "--out", str(out), "--cache", str(cache)])
    data = json.loads((out / "proxy_dg.json").read_text()) if (out / "proxy_dg.json").is_file() else None
    return {"result": result, "out": out, "cache": cache, "data": data}


@pytest.mark.slow
def test_quick_exits_0_and_prints_table_verdict_and_paths(quick):
    result = quick["result"]
    assert result.exit_code == 0, f"{result.exception!r}\n{result.stderr}"
    assert "mIoU (%) on held-out scenes" in result.stdout
    assert "DR-FIM" in result.stdout and "FIM" in result.stdout and "random" in result.stdout
    for label, name in (("json:", "proxy_dg.json"), ("csv:", "proxy_dg.csv"), ("plot:", "proxy_dg.png")):
        line = next(row for row in result.stdout.splitlines() if row.startswith(label))
        assert line.split()[1] == str(quick["out"] / name)


@pytest.mark.slow
def test_every_strategy_has_a_finite_miou_on_every_domain(quick):
    """Oracle: the per-seed CSV, read by pandas, holds every (strategy, domain) once, finite, in [0, 100]."""
    frame = pd.read_csv(quick["out"] / "proxy_dg.csv")
    assert sorted(frame["strategy"].unique()) == sorted(STRATEGIES)
    assert sorted(frame["domain"].unique()) == sorted(DOMAINS)
    assert len(frame) == len(STRATEGIES) * len(DOMAINS) * len(quick["data"]["config"]["seeds"])
    assert not frame.duplicated(["seed", "strategy", "domain"]).any()
    assert np.isfinite(frame["miou"]).all() and frame["miou"].between(0, 100).all()


@pytest.mark.slow
def test_tuned_models_beat_freeze_on_the_source_domain(quick):
    summary = quick["data"]["summary"]
    frozen = summary["freeze"]["source"]["mean"]
    for strategy in TUNED:
        assert summary[strategy]["source"]["mean"] > frozen, (strategy, summary[strategy]["source"], frozen)


@pytest.mark.slow
def test_summary_and_paired_differences_recomputed_from_the_csv(quick):
    """Oracle: pandas group-bys of the per-seed rows (the CSV) give the JSON's means, stds and paired differences."""
    frame = pd.read_csv(quick["out"] / "proxy_dg.csv")
    data = quick["data"]
    unseen = frame[frame["domain"].isin(UNSEEN)].groupby(["strategy", "seed"])["miou"].mean()
    for strategy, entry in data["summary"].items():
        for domain in DOMAINS:
            values = frame[(frame.strategy == strategy) & (frame.domain == domain)]["miou"]
            assert entry[domain]["mean"] == pytest.approx(values.mean(), abs=1e-3)
        assert entry["unseen"]["mean"] == pytest.approx(unseen[strategy].mean(), abs=1e-3)
    diff = (unseen["drfim"] - unseen["fim"]).to_numpy()
    assert data["paired_unseen_differences"]["drfim - fim"]["mean"] == pytest.approx(diff.mean(), abs=1e-3)
    summary_csv = pd.read_csv(quick["out"] / "proxy_dg.summary.csv")
    row = summary_csv[(summary_csv.strategy == "drfim") & (summary_csv.column == "unseen")].iloc[0]
    assert row["mean"] == pytest.approx(data["summary"]["drfim"]["unseen"]["mean"], abs=1e-3)


@pytest.mark.slow
def test_runs_used_the_pretrained_weights_and_each_strategy_its_selection(quick):
    """Oracles: hashlib's sha256 of the cached weights; the manifests' selection counts; the score files' estimator."""
    data = quick["data"]
    weights = quick["cache"] / data["pretraining"]["file"]
    assert weights.is_file() and data["pretraining"]["cached"] is False
    sha = hashlib.sha256(weights.read_bytes()).hexdigest()
    work = quick["out"] / "work" / "seed0"
    for strategy in STRATEGIES:
        manifest = json.loads((work / f"run_{strategy}" / "manifest.json").read_text())
        assert manifest["weights_sha256"] == sha and manifest["random_init"] is False
        fraction = manifest["trainable"]["backbone_fraction"]
        expected = {"full": 1.0, "freeze": 0.0}.get(strategy, 0.05)
        assert fraction == pytest.approx(expected, abs=1e-4), strategy
        assert data["summary"][strategy]["tuned_fraction"] == pytest.approx(fraction)
    var_manifest = json.loads((work / "run_drfim-var" / "manifest.json").read_text())
    assert var_manifest["selection"]["strategy"] == "drfim"
    _, var_meta = load_scores(var_manifest["scores"])
    _, diag_meta = load_scores(work / "scores.safetensors")
    assert var_meta["estimator"] == "variational" and diag_meta["estimator"] == "diagonal"


@pytest.mark.slow
def test_plot_and_json_metadata(quick):
    png = (quick["out"] / "proxy_dg.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 5000
    data = quick["data"]
    assert data["model"] == MODEL and data["config"]["quick"] is True
    assert data["pretraining"]["seconds"] > 0 and data["benchmark_seconds"] > 0
    assert list(data["domains"]["unseen"]) == list(UNSEEN)
    assert not list(quick["out"].glob(".*.tmp"))  # atomic writes leave no temporary files


def test_coarse_labels_against_a_hand_written_table():
    oracle = {0: 0, 1: 0, 2: 1, 5: 1, 8: 2, 10: 3, 11: 4, 13: 4}  # road/sidewalk, building/pole, veg, sky, person/car
    assert set(oracle) == set(CLASSES) and len(COARSE_NAMES) == 5
    label = np.array([[0, 1, 2, 5], [8, 10, 11, 13], [255, 3, 0, 13]], np.uint8)
    expected = np.array([[oracle.get(int(v), 255) for v in row] for row in label], np.uint8)
    np.testing.assert_array_equal(coarse_labels(label), expected)
    layout = scene_layout(0, 3, (64, 64))
    assert len(np.unique(coarse_labels(layout))) < len(np.unique(layout))  # coarser than the fine labels


def test_mean_std_against_statistics():
    values = [31.2, 28.7, 30.05]
    result = mean_std(values)
    assert result["mean"] == pytest.approx(statistics.fmean(values))
    assert result["std"] == pytest.approx(statistics.stdev(values)) and result["n"] == 3
    assert mean_std([4.0]) == {"mean": 4.0, "std": 0.0, "n": 1}


TINY = PretrainConfig(scenes=2, steps=2, batch_size=2)


@pytest.mark.slow
def test_pretraining_is_cached_reused_and_reproducible(tmp_path):
    first = pretrained_weights(TINY, tmp_path / "a")
    assert not first.cached and first.path.name == f"{TINY.key()}.safetensors"
    again = pretrained_weights(TINY, tmp_path / "a")
    assert again.cached and again.path == first.path and again.seconds == pytest.approx(first.seconds)
    other = pretrained_weights(TINY, tmp_path / "b")  # a fresh pretraining elsewhere: the same bits
    a, b = load_file(str(first.path)), load_file(str(other.path))
    assert set(a) == set(b) and all(torch.equal(a[k], b[k]) for k in a)
    backbone = build_backbone(MODEL, weights=first.path)  # loads strictly into the benchmark's architecture
    own = backbone.model.state_dict()
    assert all(torch.equal(own[k], a[k]) for k in a) and set(own) == set(a)
    first.path.write_bytes(b"damaged")  # a damaged cache file is rebuilt, not trusted
    rebuilt = pretrained_weights(TINY, tmp_path / "a")
    assert not rebuilt.cached and load_file(str(rebuilt.path)).keys() == a.keys()


def test_cache_key_and_location(monkeypatch, tmp_path):
    keys = {dataclasses.replace(TINY, **{f.name: change}).key()
            for f, change in zip(dataclasses.fields(TINY), ("timm:vit_tiny_patch16_224", 32, 3, 3, 4, 1e-4, 0.1, 1))}
    assert TINY.key() not in keys and len(keys) == len(dataclasses.fields(TINY))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_dir() == tmp_path / "fisherscan" / "proxy_dg"
    assert cache_dir(tmp_path / "x") == tmp_path / "x"


def test_quick_and_full_settings():
    quick, full = benchmark_config("o", quick=True), benchmark_config("o")
    assert quick.seeds == (0,) and full.seeds == (0, 1, 2)
    assert quick.pretrain.key() != full.pretrain.key()
    assert full.tune_steps > quick.tune_steps and quick.strategies == full.strategies == STRATEGIES
    assert benchmark_config("o", seeds=5).seeds == (0, 1, 2, 3, 4)


@pytest.mark.parametrize("args, fragment", [(["--seeds", "0"], "--seeds 0"), (["--device", "tpu"], "--device tpu")])
def test_option_mistakes_are_one_red_line(tmp_path, args, fragment):
    result = invoke(*["bench", "--quick", "--out", str(tmp_path / "o"), "--cache", str(tmp_path),
                                      *args])
    assert result.exit_code == 2 and fragment in result.stderr and "Traceback" not in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1
    assert not list(tmp_path.glob("*.safetensors"))  # nothing was pretrained


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    result = invoke(*["bench", "--quick", "--out", str(tmp_path / "file"), "--cache", str(tmp_path)])
    assert result.exit_code == 2 and "is a file" in result.stderr
