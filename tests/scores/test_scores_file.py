"""Tests for fisherscan.scores: the safetensors scores file, its metadata and atomic writes.

Oracles: the safetensors reader itself (dtype, keys, raw metadata string) and the folder's listing.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import fisherscan.io as scores_mod
from fisherscan.errors import FisherscanError
from fisherscan.io import METADATA_KEY, atomic_target
from fisherscan.scores.file import KINDS, SCHEMA_VERSION, load_scores, save_scores

SHAPES = {
    "cls_token": (1, 1, 8),
    "blocks.0.attn.qkv.weight": (24, 8),
    "blocks.0.attn.qkv.bias": (24,),
    "blocks.1.mlp.fc1.weight": (32, 8),
    "patch_embed.proj.weight": (8, 3, 2, 2),
}


def make_scores(seed: int = 0, dtype: torch.dtype = torch.float32) -> dict[str, dict[str, torch.Tensor]]:
    g = torch.Generator().manual_seed(seed)
    return {kind: {name: torch.rand(shape, generator=g, dtype=torch.float64).to(dtype) for name,
                   shape in SHAPES.items()}
            for kind in KINDS}


METADATA = {"model": "dinov2_vits14", "images": 3, "seed": 0, "random_init": False, "weights": None,
            "shift": {"weight": 0.5, "magnitude": 0.69}, "notes": ["a", "b"], "crop": [518, 518]}


def listing(folder: Path) -> list[str]:
    return sorted(os.listdir(folder))


def test_round_trip(tmp_path):
    scores = make_scores()
    path = tmp_path / "scores.safetensors"
    save_scores(path, scores, METADATA)
    assert listing(tmp_path) == ["scores.safetensors"]  # no temporary file left

    loaded, meta = load_scores(path)
    assert set(loaded) == set(KINDS)
    for kind in KINDS:
        assert set(loaded[kind]) == set(SHAPES)
        for name, tensor in scores[kind].items():
            assert loaded[kind][name].shape == tensor.shape
            assert loaded[kind][name].dtype == torch.float32
            assert torch.equal(loaded[kind][name], tensor)
    assert meta == {"schema_version": SCHEMA_VERSION, **METADATA}
    assert meta["schema_version"] == 1

    with safe_open(str(path), "pt") as handle:  # the file layout itself, read by safetensors
        assert set(handle.keys()) == {f"{k}/{n}" for k in KINDS for n in SHAPES}
        assert json.loads(handle.metadata()[METADATA_KEY]) == {**meta,
                                                               "file_kind": "scores"}  # fisherscan.io's one format
        for key in handle.keys():
            assert handle.get_slice(key).get_dtype() == "F32"


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16])
def test_tensors_are_stored_float32(tmp_path, dtype):
    scores = make_scores(dtype=dtype)
    path = tmp_path / "s.safetensors"
    save_scores(path, scores, {})
    with safe_open(str(path), "pt") as handle:
        assert {handle.get_slice(k).get_dtype() for k in handle.keys()} == {"F32"}
    loaded, meta = load_scores(path)
    assert meta == {"schema_version": SCHEMA_VERSION}
    for kind in KINDS:
        for name, tensor in scores[kind].items():
            assert loaded[kind][name].dtype == torch.float32
            assert torch.equal(loaded[kind][name], tensor.float())


def test_non_contiguous_and_grad_tensors(tmp_path):
    base = torch.rand(6, 4, requires_grad=True)
    scores = {"fim": {"t": base.t(), "g": base * 2}}
    path = tmp_path / "s.safetensors"
    save_scores(path, scores, {})
    loaded, _ = load_scores(path)
    assert torch.equal(loaded["fim"]["t"], base.detach().t())
    assert torch.equal(loaded["fim"]["g"], base.detach() * 2)


def test_tensors_sharing_memory_are_saved(tmp_path):
    """The same tensor under two kinds, or views into one buffer, are separate entries of the file."""
    flat = torch.arange(20, dtype=torch.float32)
    same = torch.rand(3, 3)
    scores = {"fim": {"a": flat[:8].view(2, 4), "b": flat[8:], "s": same}, "drfim": {"s": same}}
    path = tmp_path / "s.safetensors"
    save_scores(path, scores, {})
    loaded, _ = load_scores(path)
    assert torch.equal(loaded["fim"]["a"], flat[:8].view(2, 4))
    assert torch.equal(loaded["fim"]["b"], flat[8:])
    assert torch.equal(loaded["fim"]["s"], same) and torch.equal(loaded["drfim"]["s"], same)
    assert listing(tmp_path) == ["s.safetensors"]


def test_save_overwrites_atomically(tmp_path):
    path = tmp_path / "s.safetensors"
    save_scores(path, make_scores(seed=1), {"run": 1})
    save_scores(path, make_scores(seed=2), {"run": 2})
    loaded, meta = load_scores(path)
    assert meta["run"] == 2
    assert torch.equal(loaded["fim"]["cls_token"], make_scores(seed=2)["fim"]["cls_token"])
    assert listing(tmp_path) == ["s.safetensors"]


def test_saved_file_is_readable_like_any_new_file(tmp_path):
    """The temporary file's private 0600 mode must not leak into the result: it gets the umask's mode."""
    umask = os.umask(0o022)
    os.umask(umask)
    path = tmp_path / "s.safetensors"
    save_scores(path, make_scores(), {})
    (tmp_path / "plain").write_bytes(b"")
    assert (path.stat().st_mode & 0o777) == ((tmp_path / "plain").stat().st_mode & 0o777) == (0o666 & ~umask)


def test_failing_write_leaves_nothing(tmp_path, monkeypatch):
    def half_write(tensors, filename, metadata=None):
        Path(filename).write_bytes(b"partial")
        raise OSError("disk full")

    monkeypatch.setattr(scores_mod, "save_file", half_write)
    path = tmp_path / "s.safetensors"
    with pytest.raises(OSError, match="disk full"):
        save_scores(path, make_scores(), {})
    assert listing(tmp_path) == []


def test_failing_write_keeps_the_previous_file(tmp_path, monkeypatch):
    path = tmp_path / "s.safetensors"
    save_scores(path, make_scores(seed=1), {"run": 1})
    before = path.read_bytes()
    monkeypatch.setattr(scores_mod, "save_file", lambda *a, **k: (_ for _ in ()).throw(RuntimeError("boom")))
    with pytest.raises(RuntimeError, match="boom"):
        save_scores(path, make_scores(seed=2), {"run": 2})
    assert path.read_bytes() == before
    assert listing(tmp_path) == ["s.safetensors"]


def test_unsaveable_metadata_leaves_nothing(tmp_path):
    path = tmp_path / "s.safetensors"
    with pytest.raises(TypeError):
        save_scores(path, make_scores(), {"bad": object()})  # not JSON
    assert listing(tmp_path) == []


def test_atomic_target_exception_inside(tmp_path):
    path = tmp_path / "out.bin"
    with pytest.raises(KeyError):
        with atomic_target(path) as tmp:
            assert tmp.parent == tmp_path and tmp != path
            tmp.write_bytes(b"half")
            raise KeyError("stop")
    assert listing(tmp_path) == []
    with atomic_target(path) as tmp:
        tmp.write_bytes(b"whole")
    assert path.read_bytes() == b"whole"
    assert listing(tmp_path) == ["out.bin"]


def test_atomic_target_refuses_missing_folder(tmp_path):
    path = tmp_path / "no" / "such" / "s.safetensors"
    with pytest.raises(FisherscanError) as info:
        with atomic_target(path):
            pytest.fail("must not yield")
    assert str(tmp_path / "no" / "such") in str(info.value)
    with pytest.raises(FisherscanError, match="does not exist"):
        save_scores(path, make_scores(), {})
    assert not (tmp_path / "no").exists()


def test_atomic_target_relative_path(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    with atomic_target(Path("rel.bin")) as tmp:
        tmp.write_bytes(b"x")
    assert (tmp_path / "rel.bin").read_bytes() == b"x"
    assert listing(tmp_path) == ["rel.bin"]


def test_load_missing_file(tmp_path):
    path = tmp_path / "absent.safetensors"
    with pytest.raises(FisherscanError) as info:
        load_scores(path)
    assert str(path) in str(info.value)


def test_load_without_metadata_key(tmp_path):
    path = tmp_path / "foreign.safetensors"
    save_file({"fim/a": torch.zeros(2)}, str(path), metadata={"other": "x"})
    with pytest.raises(FisherscanError) as info:
        load_scores(path)
    assert str(path) in str(info.value) and METADATA_KEY in str(info.value)
    save_file({"fim/a": torch.zeros(2)}, str(path))  # no metadata at all
    with pytest.raises(FisherscanError, match=METADATA_KEY):
        load_scores(path)


def test_load_garbage_file(tmp_path):
    path = tmp_path / "garbage.safetensors"
    path.write_bytes(os.urandom(64) + b"\xff" * 1000)
    with pytest.raises(FisherscanError) as info:
        load_scores(path)
    assert str(path) in str(info.value)
    assert "\n" not in str(info.value)


def test_load_truncated_file(tmp_path):
    path = tmp_path / "s.safetensors"
    save_scores(path, make_scores(), {})
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(FisherscanError, match="s.safetensors"):
        load_scores(path)


def test_load_bad_metadata_json(tmp_path):
    path = tmp_path / "bad.safetensors"
    save_file({"fim/a": torch.zeros(2)}, str(path), metadata={METADATA_KEY: "{not json"})
    with pytest.raises(FisherscanError) as info:
        load_scores(path)
    assert str(path) in str(info.value)


def test_load_metadata_not_an_object(tmp_path):
    path = tmp_path / "list.safetensors"
    save_file({"fim/a": torch.zeros(2)}, str(path), metadata={METADATA_KEY: "[1, 2]"})
    with pytest.raises(FisherscanError, match="list.safetensors"):
        load_scores(path)


def test_a_killed_writers_temporary_file_is_removed_by_the_next_write(tmp_path):
    """Oracle: the folder listing. A temporary made before this write (a killed run's) goes; one made during it
    (another writer's, same name) and other files' temporaries stay."""
    path = tmp_path / "scores.safetensors"
    stale = tmp_path / ".scores.safetensors.abc123.tmp"
    stale.write_bytes(b"half a file")
    os.utime(stale, (1_000_000_000, 1_000_000_000))
    other = tmp_path / ".model.safetensors.def456.tmp"
    other.write_bytes(b"")
    os.utime(other, (1_000_000_000, 1_000_000_000))
    with atomic_target(path) as tmp:
        tmp.write_bytes(b"complete")
        concurrent = tmp_path / ".scores.safetensors.ghi789.tmp"
        concurrent.write_bytes(b"")
    assert path.read_bytes() == b"complete"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([path.name, other.name, concurrent.name])
