"""fisherscan.bench.protocol: the roles of the styles never overlap, the scene sets are keyed apart, the settings of
--quick and the full run, and bad --styles/--strategies/--budget are one-line errors (exit 2) before any work."""

from __future__ import annotations

import dataclasses

import pytest
from conftest import invoke, one_error_line

from fisherscan.bench.pretrain import PRETRAIN_SEED, PRETRAIN_STYLES
from fisherscan.bench.protocol import (
    GROUPS,
    NOVEL_STYLES,
    RENDERED_AS,
    SEEN_STYLES,
    SOURCE_SEED,
    SOURCE_STYLE,
    STRATEGIES,
    TEST_SEED,
    TEST_STYLES,
    VAL_SEED,
    VALIDATION_STYLE,
    benchmark_config,
)
from fisherscan.data.synthetic import STYLES
from fisherscan.errors import FisherscanError


def test_style_roles_are_the_issue_s_and_never_overlap():
    """Oracle: the roles written out by hand (issue 17)."""
    assert PRETRAIN_STYLES == ("source", "fog", "colour", "blur")
    assert SOURCE_STYLE == "toon" and VALIDATION_STYLE == "rain"
    assert SEEN_STYLES == ("clean", "fog", "colour", "blur") and NOVEL_STYLES == ("night", "snow")
    assert GROUPS == {"seen": SEEN_STYLES, "novel": NOVEL_STYLES}
    rendered = {RENDERED_AS.get(s, s) for s in TEST_STYLES}
    assert rendered <= set(STYLES) and {SOURCE_STYLE, VALIDATION_STYLE} <= set(STYLES)
    never_pretrained = {SOURCE_STYLE, VALIDATION_STYLE, "night", "snow"}
    assert not never_pretrained & set(PRETRAIN_STYLES)
    assert {RENDERED_AS.get(s, s) for s in SEEN_STYLES} == set(PRETRAIN_STYLES)
    assert not {SOURCE_STYLE, VALIDATION_STYLE} & rendered


def test_scene_sets_use_distinct_seeds_for_any_benchmark_seed():
    fixed = {PRETRAIN_SEED, VAL_SEED, TEST_SEED}
    assert len(fixed) == 3 and all(SOURCE_SEED + seed not in fixed for seed in range(100))


def test_quick_and_full_settings():
    quick, full = benchmark_config("o", quick=True), benchmark_config("o")
    assert quick.seeds == (0,) and full.seeds == (0, 1, 2)
    assert quick.pretrain.key() != full.pretrain.key() and quick.sanity_min is None and full.sanity_min == 5.0
    assert full.tune_steps > quick.tune_steps and quick.strategies == full.strategies == STRATEGIES
    assert full.lr == 1e-4 and full.decoder_lr == 1e-3 and full.budget == 0.05
    assert full.delta_min == pytest.approx(0.01)
    assert benchmark_config("o", seeds=5).seeds == (0, 1, 2, 3, 4)
    chosen = benchmark_config("o", styles=("snow", "fog"), strategies=("drfim",), budget=0.1)
    assert chosen.styles == ("fog", "snow")  # in protocol order
    assert chosen.strategies == ("freeze", "full", "drfim")  # the sanity check's references always run
    assert chosen.budget == 0.1 and chosen.delta_min == pytest.approx(0.02)
    assert dataclasses.replace(full, seeds=(0,)).pretrain == full.pretrain


@pytest.mark.parametrize("kwargs, fragment", [
    ({"styles": ("toon",)}, "--styles toon: unknown test style"),
    ({"styles": ("fog", "haze")}, "--styles haze"),
    ({"styles": ()}, "--styles: name at least one"),
    ({"strategies": ("drfim", "best")}, "--strategies best: unknown strategy"),
    ({"budget": 0.0}, "--budget 0.0"),
    ({"budget": 1.5}, "--budget 1.5"),
    ({"seeds": 0}, "--seeds 0"),
])
def test_library_errors_are_one_line(kwargs, fragment):
    with pytest.raises(FisherscanError) as error:
        benchmark_config("o", **kwargs)
    assert fragment in str(error.value) and "\n" not in str(error.value)


@pytest.mark.parametrize("args, fragment", [
    (["--styles", "toon"], "--styles toon"),
    (["--styles", "rain,snow"], "--styles rain"),
    (["--strategies", "drfim,nonsense"], "--strategies nonsense"),
    (["--budget", "0"], "--budget 0"),
    (["--budget", "101%"], "--budget 101%"),
    (["--budget", "-0.2"], "--budget -0.2"),
    (["--seeds", "0"], "--seeds 0"),
    (["--device", "tpu"], "--device tpu"),
])
def test_cli_mistakes_are_one_red_line_before_any_work(tmp_path, args, fragment):
    result = invoke("bench", "--quick", "--out", tmp_path / "o", "--cache", tmp_path / "cache", *args)
    one_error_line(result, fragment)
    assert not (tmp_path / "cache").exists() and not (tmp_path / "o").exists()  # nothing pretrained or written


def test_out_must_be_a_folder(tmp_path):
    (tmp_path / "file").write_text("x")
    result = invoke("bench", "--quick", "--out", tmp_path / "file", "--cache", tmp_path / "cache")
    one_error_line(result, "is a file")
