"""The GPU suite's CPU smoke run (``benchmarks/gpu_suite.py --small``): every section runs and its JSON has the
structure the GPU run will fill in. Oracles: the per-image autograd loop the suite compares the hook engine with
(fp32, rtol 1e-4), the files each command must write, and the timing's own arithmetic (time waited is part of the
loop's time; images/s times the loop's time is the image count). No wall-clock assertions."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
METHODS = ("plain", "engine", "engine_two_draws", "engine_fused", "vmap", "variational", "variational_vogn",
           "tune_full", "tune_masked", "tune_adamw")
COMMANDS = ("score", "tune_linear", "tune_mask2former", "eval_linear", "eval_mask2former")

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def report(tmp_path_factory) -> dict:
    out = tmp_path_factory.mktemp("suite") / "suite.json"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("TRITON_INTERPRET", None)  # the fused kernel stays off the CPU (too slow interpreted for the timings)
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "gpu_suite.py"), "--small", "--out", str(out),
                          "--workers", "2", "--budget", "600"], capture_output=True, text=True, env=env, cwd=ROOT)
    assert run.returncode == 0, run.stderr[-3000:]
    return json.loads(out.read_text())


def test_the_engine_equals_the_per_image_loop_on_three_architectures(report):
    checks = report["correctness"]
    assert set(checks) == {"dinov2", "eva02", "sam"}
    for family, check in checks.items():
        assert check["passed"], (family, check)
        assert check["max_rel_err"] < check["rtol"] == 1e-4
        assert "fallback" not in check["visits"] and sum(check["visits"].values()) == check["parameters"]
        assert check["bf16"]["finite"] and check["bf16"]["passed"]
        assert 0 < check["bf16"]["jaccard_top5"] <= 1 and -1 <= check["bf16"]["spearman"] <= 1
        assert check["fused"] == "not available here"  # the CPU without Triton's interpreter: the PyTorch rule


def test_every_method_is_timed_against_plain_with_its_peak_memory(report):
    (setting,) = report["speed"].values()
    assert set(setting["methods"]) == set(METHODS)
    for name, value in setting["methods"].items():
        assert "error" not in value, (name, value)
        assert len(value["seconds"]) == setting["repeats"] == 2
        assert value["time_vs_plain"] == pytest.approx(value["median_seconds"] / setting["methods"]["plain"][
            "median_seconds"])
        assert value["peak_gib"] > 0 and value["memory_vs_plain"] > 0
    variational = setting["methods"]["variational"]
    assert variational["per_pass_vs_plain"] == pytest.approx(variational["time_vs_plain"] / 2)
    assert "time_vs_tune_full" in setting["methods"]["tune_masked"]
    two = setting["methods"]["engine_two_draws"]
    assert two["vs_two_engine_passes"] == pytest.approx(two["median_seconds"] / (2 * setting["methods"]["engine"][
        "median_seconds"]))
    assert "fallback" not in setting["engine_paths"]
    assert setting["engine_fused_paths"] == setting["engine_paths"]  # no kernel on the CPU: the same rules


def test_score_tune_and_eval_ran_end_to_end(report):
    commands = report["commands"]
    assert set(commands) == set(COMMANDS)
    for name, record in commands.items():
        assert record["passed"] and record["returncode"] == 0, (name, record.get("stderr_tail"))
    assert commands["score"]["finite"]


def test_the_end_to_end_score_reports_its_data_wait(report):
    record = report["score_gta_sized"]
    assert record["passed"] and record["images"] == 8 and record["workers"] == 2
    timing = record["timing"]
    assert timing["images"] == 8
    assert 0 <= timing["first_batch_wait_seconds"] <= timing["data_wait_seconds"] <= timing["loop_seconds"] + 0.01
    # the line prints seconds to 0.01 s and the share to 0.1%: the share lies within what the rounding allows
    waited, loop = timing["data_wait_seconds"], timing["loop_seconds"]
    assert (waited - 0.005) / (loop + 0.005) - 5e-4 <= timing["data_wait_share"] <= (waited + 0.005) / (loop - 0.005) \
        + 5e-4
    assert 8 / (loop + 0.005) - 0.005 <= timing["images_per_second"] <= 8 / (loop - 0.005) + 0.005


def test_targets_are_listed_with_their_measurements(report):
    targets = report["targets"]
    assert set(targets) == {"engine_time_vs_plain", "engine_memory_vs_plain", "engine_fused_time_vs_plain",
                            "engine_fused_memory_vs_plain", "tune_masked_vs_full", "data_wait_share"}
    for value in targets.values():
        assert value["measured"] is not None and isinstance(value["met"], bool)
    assert not report.get("skipped")
