"""fisherscan.io's recorded paths: the folder a relative path in an older file is read against, and the cache.

Oracle: the folders written out by hand for each case.
"""

from __future__ import annotations

from pathlib import Path

from fisherscan.io import cache_folder, recorded_base, resolve_recorded


def test_recorded_base_recovers_the_working_folder_of_the_writer(tmp_path):
    assert recorded_base(tmp_path / "w" / "runs" / "a", "runs/a") == tmp_path / "w"
    assert recorded_base(tmp_path / "w" / "s.safetensors", "s.safetensors") == tmp_path / "w"
    assert recorded_base(tmp_path / "w" / "s.safetensors", "./sub/../s.safetensors") == tmp_path / "w"
    assert recorded_base(tmp_path / "moved" / "s.safetensors", "x/s.safetensors") == tmp_path / "moved"
    assert recorded_base(tmp_path / "w" / "s.safetensors", "../s.safetensors") == tmp_path / "w"
    assert recorded_base(tmp_path / "w" / "s.safetensors", "/abs/s.safetensors") == tmp_path / "w"
    assert recorded_base(tmp_path / "w" / "s.safetensors", None) == tmp_path / "w"


def test_resolve_recorded():
    assert resolve_recorded("data/../gta", Path("/w")) == Path("/w/gta")
    assert resolve_recorded("/abs/gta", Path("/w")) == Path("/abs/gta")
    assert resolve_recorded(None, Path("/w")) is None


def test_cache_folder(monkeypatch, tmp_path):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    assert cache_folder("demo") == tmp_path / "fisherscan" / "demo"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_folder("bench") == tmp_path / "home" / ".cache" / "fisherscan" / "bench"
