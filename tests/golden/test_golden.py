"""The golden fixtures: today's code writes what the code before the package layout wrote.

Oracle: the files ``make_golden.py`` recorded from the earlier code (``tests/golden/<name>/``, never edited). Per
configuration, the same CLI calls run again in a fresh working folder and every recorded file is compared: tensors
with ``torch.equal``, metadata and manifests key by key (every recorded key must keep its value; keys added since
are allowed), eval results number by number. tune, mask and eval read the recorded scores, head and model, and a
recorded partial file is continued to the recorded scores, so files written by the earlier code stay readable.

Bit equality holds on a CPU with the recorded vector instruction set (``recorded_on.json``); on another one the
floating-point kernels differ, and tensors are compared to rtol 1e-4 instead (stated in the failure message).
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from typer.testing import CliRunner

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

from configs import CONFIGS, commands, make_data  # noqa: E402

from fisherscan.cli import app  # noqa: E402

pytestmark = pytest.mark.slow


def read(path: Path) -> tuple[dict[str, torch.Tensor], dict]:
    """(tensors, metadata) of a safetensors file, its metadata JSON under whatever key the writer used."""
    with safe_open(str(path), "pt") as handle:
        tensors = {key: handle.get_tensor(key) for key in handle.keys()}
        raw = handle.metadata() or {}
    metadata = {}
    for key, value in raw.items():
        parsed = json.loads(value)
        metadata.update(parsed if isinstance(parsed, dict) else {key: parsed})
    return tensors, metadata


def exact_machine(name: str) -> bool:
    recorded = json.loads((HERE / name / "recorded_on.json").read_text())
    return recorded["cpu_capability"] == torch.backends.cpu.get_cpu_capability()


def assert_same_tensors(got: dict, want: dict, exact: bool, label: str) -> None:
    assert set(got) == set(want), f"{label}: tensor names differ: {sorted(set(got) ^ set(want))[:5]}"
    for key, expected in want.items():
        value = got[key]
        assert value.dtype == expected.dtype and value.shape == expected.shape, f"{label}: {key}"
        if exact or not value.is_floating_point():
            assert torch.equal(value, expected), f"{label}: {key} differs"
        else:
            assert torch.allclose(value, expected, rtol=1e-4, atol=1e-7), \
                f"{label}: {key} differs beyond rtol 1e-4 (another CPU instruction set than the recording's)"


# options whose spelling changed since the recording, with the recorded value's meaning today
RESPELLED = {
    "options.perturb_at": lambda recorded: [recorded],  # one block -> a list of blocks (several sites)
}


def same_path(got, want, work: Path | None) -> bool:
    """Files record absolute paths now; the recording has the relative paths the commands were given (also inside
    messages, e.g. a skipped pair's reason), which name the same places read against the working folder ``work``:
    the value with ``work/`` taken out of it must be the recorded one."""
    if work is None or not (isinstance(got, str) and isinstance(want, str)):
        return False
    return any(got.replace(f"{folder}{os.sep}", "") == want for folder in {str(work), str(work.resolve())})


def assert_same_meaning(got, want, label: str, exact: bool = True, work: Path | None = None) -> None:
    """Every key the recording has keeps its value (recursively); keys added since are allowed; a recorded relative
    path may now be the absolute path of the same place (``same_path``)."""
    for suffix, respell in RESPELLED.items():
        if label.endswith(suffix) and not isinstance(want, list):
            want = respell(want)
    if isinstance(want, dict):
        assert isinstance(got, dict), f"{label}: {got!r} is not a mapping"
        for key, value in want.items():
            assert key in got, f"{label}.{key} is missing"
            assert_same_meaning(got[key], value, f"{label}.{key}", exact, work)
    elif isinstance(want, list):
        assert isinstance(got, list) and len(got) == len(want), f"{label}: {got!r} != {want!r}"
        for i, (a, b) in enumerate(zip(got, want)):
            assert_same_meaning(a, b, f"{label}[{i}]", exact, work)
    elif isinstance(want, float) and not exact:
        assert got == pytest.approx(want, rel=1e-3, abs=1e-6), f"{label}: {got!r} != {want!r}"
    else:
        assert got == want or same_path(got, want, work), f"{label}: {got!r} != {want!r}"


def compare_file(work: Path, produced: str, name: str, recorded: str, exact: bool) -> None:
    got_path, want_path = work / produced, HERE / name / recorded
    if recorded.endswith(".json"):
        got, want = json.loads(got_path.read_text()), json.loads(want_path.read_text())
        assert_same_meaning(got, want, recorded, exact, work)
        return
    got_tensors, got_meta = read(got_path)
    want_tensors, want_meta = read(want_path)
    assert_same_tensors(got_tensors, want_tensors, exact, recorded)
    assert_same_meaning(got_meta, want_meta, f"{recorded} metadata", exact, work)


def run(args: list[str]) -> None:
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, f"{' '.join(args)}\n{result.output}\n{result.exception!r}"


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_todays_code_writes_the_recorded_files(name, tmp_path, monkeypatch):
    make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    exact = exact_machine(name)
    score, partial, tune, mask, evaluate = commands(name)
    golden = HERE / name

    run(score)
    compare_file(tmp_path, "scores.safetensors", name, "scores.safetensors", exact)
    compare_file(tmp_path, "scores.head.safetensors", name, "scores.head.safetensors", exact)
    run(partial)
    compare_file(tmp_path, "partial.partial.safetensors", name, "partial.partial.safetensors", exact)

    # the recorded scores and head feed tune and mask; the recorded model feeds eval
    shutil.copyfile(golden / "scores.safetensors", "scores.safetensors")
    shutil.copyfile(golden / "scores.head.safetensors", "scores.head.safetensors")
    run(tune)
    compare_file(tmp_path, "run/model.safetensors", name, "model.safetensors", exact)
    compare_file(tmp_path, "run/checkpoint.safetensors", name, "checkpoint.safetensors", exact)
    compare_file(tmp_path, "run/manifest.json", name, "manifest.json", exact)
    run(mask)
    compare_file(tmp_path, "mask.safetensors", name, "mask.safetensors", True)  # a sort of recorded scores
    shutil.copyfile(golden / "model.safetensors", "run/model.safetensors")
    run(evaluate)
    compare_file(tmp_path, "run/eval/eval.json", name, "eval.json", exact)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_a_recorded_partial_file_continues_to_the_recorded_scores(name, tmp_path, monkeypatch):
    make_data(tmp_path)
    monkeypatch.chdir(tmp_path)
    score, partial, *_ = commands(name)
    shutil.copyfile(HERE / name / "partial.partial.safetensors", "partial.partial.safetensors")
    stop = partial.index("--stop-after")
    run(partial[:stop] + partial[stop + 2:])  # the same command without --stop-after: continues the file
    assert not Path("partial.partial.safetensors").exists()
    got, _ = read(Path("partial.safetensors"))
    want, _ = read(HERE / name / "scores.safetensors")
    assert_same_tensors(got, want, exact_machine(name), "continued scores")
    os.remove("partial.safetensors")
