"""Atomic publishing of files and directories on a local filesystem.

A reader must see either the previous complete version of a path or the new complete one, never a
half-written file, and a failure must never lose what was already there. Both helpers write next
to the target (same directory, hence same filesystem, so `rename` is atomic), flush the data to
disk before publishing it, and flush the parent directory afterwards so that the rename itself
survives a crash.

- `atomic_write_bytes` / `atomic_write_text`: temp file in the target's directory, fsync,
  `os.replace` over the target (atomic for files), fsync the directory.
- `staging_dir`: the hidden sibling a directory is built in before `replace_directory` publishes it.
- `replace_directory`: a directory cannot be renamed over a non-empty one, so publishing takes two
  renames: the old directory aside, then the new one in. A reader arriving between them finds no
  directory (and fails loudly rather than reading a mix); if the second rename fails, the old
  directory is renamed back; the old copy is deleted only once the new one is in place.
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path


def fsync_path(path: str | Path) -> None:
    """Flush a file's or a directory's contents to disk (directories: their entries)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def process_umask() -> int:
    """The process umask. Read from /proc where Linux exposes it, because setting and restoring it
    (the only portable way to read it) races with other threads creating files."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("Umask:"):
                return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def _plain_mode(directory: bool) -> int:
    """The mode `open`/`mkdir` would give: tempfile's private 0600/0700 would otherwise be published,
    leaving datasets, checkpoints and sample grids unreadable to the team and to other services."""
    return (0o777 if directory else 0o666) & ~process_umask()


def staging_dir(target: str | Path) -> Path:
    """A new empty hidden directory beside `target` (same filesystem, so `replace_directory` can
    rename it in), with the permissions a plain mkdir would give."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.tmp-", dir=target.parent))
    os.chmod(tmp, _plain_mode(directory=True))
    return tmp


def atomic_write_bytes(path: str | Path, data: bytes) -> Path:
    """Write `data` to `path` atomically, creating parent directories; returns the path. The file
    gets the permissions a plain `open` would give (umask applied).

    On any failure the temp file is removed and a previous file at `path` is left untouched.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        os.fchmod(fd, _plain_mode(directory=False))
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    fsync_path(path.parent)
    return path


def atomic_write_text(path: str | Path, text: str, encoding: str = "utf-8") -> Path:
    """`atomic_write_bytes` of `text` encoded with `encoding`."""
    return atomic_write_bytes(path, text.encode(encoding))


def _fsync_tree(root: Path) -> None:
    """Flush every file and directory under `root` (the data about to be published)."""
    for directory, _, files in os.walk(root):
        for name in files:
            fsync_path(Path(directory) / name)
        fsync_path(directory)


def replace_directory(tmp: str | Path, target: str | Path) -> Path:
    """Publish the complete directory `tmp` as `target`, replacing any directory already there.

    `tmp` must be a sibling of `target` (same filesystem). Its contents are flushed to disk first.
    An existing `target` is renamed aside to a hidden `.<name>.old-*` sibling, `tmp` is renamed in,
    and the old copy is deleted; if renaming `tmp` in fails, the old directory is restored and the
    error re-raised. Returns `target`.
    """
    tmp, target = Path(tmp), Path(target)
    if tmp.is_dir():
        _fsync_tree(tmp)
    if not target.exists():
        os.rename(tmp, target)
        fsync_path(target.parent)
        return target
    old = Path(tempfile.mkdtemp(prefix=f".{target.name}.old-", dir=target.parent))
    old.rmdir()  # only the unique name is wanted: rename needs a free destination
    os.rename(target, old)
    try:
        os.rename(tmp, target)
    except BaseException:
        os.rename(old, target)
        raise
    fsync_path(target.parent)
    shutil.rmtree(old, ignore_errors=True)
    return target
