"""Atomic publishing: readers see the old or the new version, failures lose nothing, no debris."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from diffusion_core.atomic_io import (
    atomic_write_bytes,
    atomic_write_text,
    process_umask,
    replace_directory,
    staging_dir,
)


def test_atomic_write_creates_parents_replaces_and_leaves_no_temp_file(tmp_path: Path) -> None:
    path = atomic_write_bytes(tmp_path / "a" / "b" / "data.bin", b"first")
    assert path.read_bytes() == b"first"
    atomic_write_text(path, "zweite Fassung \u00e9\n")
    assert path.read_text(encoding="utf-8") == "zweite Fassung \u00e9\n"
    assert [p.name for p in path.parent.iterdir()] == ["data.bin"]


def test_failed_atomic_write_keeps_the_previous_file(tmp_path: Path, monkeypatch) -> None:
    path = atomic_write_bytes(tmp_path / "data.bin", b"precious")

    def disk_full(*args, **kwargs):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", disk_full)
    with pytest.raises(OSError, match="disk full"):
        atomic_write_bytes(path, b"new")
    monkeypatch.undo()
    assert path.read_bytes() == b"precious"
    assert [p.name for p in tmp_path.iterdir()] == ["data.bin"]


def make_dir(path: Path, content: str) -> Path:
    path.mkdir()
    (path / "file.txt").write_text(content)
    (path / "sub").mkdir()
    (path / "sub" / "nested.txt").write_text(content * 2)
    return path


def test_replace_directory_publishes_new_and_replaces_existing(tmp_path: Path) -> None:
    target = tmp_path / "target"
    replace_directory(make_dir(tmp_path / ".tmp-1", "one"), target)
    assert (target / "sub" / "nested.txt").read_text() == "oneone"
    replace_directory(make_dir(tmp_path / ".tmp-2", "two"), target)
    assert (target / "file.txt").read_text() == "two"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]  # old copy deleted, tmp gone


def test_replace_directory_restores_the_old_directory_when_the_new_one_cannot_move_in(
        tmp_path: Path) -> None:
    target = tmp_path / "target"
    replace_directory(make_dir(tmp_path / ".tmp-1", "old"), target)
    # A real failure of the second rename: the new directory has vanished (e.g. cleaned up).
    with pytest.raises(FileNotFoundError):
        replace_directory(tmp_path / ".tmp-missing", target)
    assert (target / "file.txt").read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["target"]


@pytest.fixture()
def umask():
    """Run with a chosen umask and put the process's own back afterwards."""
    previous = os.umask(0o022)
    os.umask(previous)

    def use(mask: int) -> None:
        os.umask(mask)

    yield use
    os.umask(previous)


@pytest.mark.parametrize(("mask", "file_mode", "dir_mode"), [(0o022, 0o644, 0o755), (0o077, 0o600, 0o700),
                                                             (0o002, 0o664, 0o775)])
def test_published_files_and_directories_get_plain_permissions(tmp_path: Path, umask, mask: int,
                                                               file_mode: int, dir_mode: int) -> None:
    # tempfile creates 0600 files and 0700 dirs; publishing those would lock the team out.
    umask(mask)
    assert process_umask() == mask
    path = atomic_write_bytes(tmp_path / "grid.png", b"png")
    assert path.stat().st_mode & 0o777 == file_mode
    staged = staging_dir(tmp_path / "ckpt")
    assert staged.parent == tmp_path and staged.name.startswith(".ckpt.")
    (staged / "spec.json").write_text("{}")
    published = replace_directory(staged, tmp_path / "ckpt")
    assert published.stat().st_mode & 0o777 == dir_mode
