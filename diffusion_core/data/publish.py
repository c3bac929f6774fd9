"""Publishing a prepared dataset so that readers see the old version or the new one, never a mix,
and concurrent preparations of one output never delete each other's data.

Local filesystem (`LocalPublisher`): shards and manifest are written into a hidden sibling staging
directory, then swapped in with two directory renames (atomic_io.replace_directory: old aside, new
in, old deleted). Two concurrent writers each swap a complete directory: the output holds one
complete dataset at every moment, and the writer that loses a race fails without touching it.

Object stores (`VersionedPublisher`), which cannot rename directories: every preparation writes its
shards into its own folder, versions/<random id>/, that no other writer ever writes to. The root
manifest.json is the only pointer to a version; it is replaced in one atomic write (a temporary
object moved over it). Garbage collection must never delete a version that the root manifest
points to or will point to. The rule that guarantees it:

1. A writer points the root manifest at its version once, then writes versions/<id>/manifest.json,
   the version's "published" mark. No writer ever points the root at a marked version again.
2. The collector lists the versions first, then reads the root pointer, then deletes the marked
   versions other than the one the root names. A version marked before the listing cannot become
   the root afterwards (rule 1), so the one the root names later is unmarked in that listing or is
   the one read. Unmarked versions (a preparation still writing, or one that stopped between its
   root write and its mark) are left alone, unless nothing under them has changed for
   STALE_VERSION_AGE, far longer than any preparation writes without finishing a shard.

A reader that read the previous root manifest a moment before it was replaced may find that
version's shards deleted under it, as with the local swap; it reads the manifest again.
"""

from __future__ import annotations

import contextlib
import errno
import logging
import shutil
import time
import uuid
from pathlib import Path
from typing import Protocol

import pyarrow.fs as pafs

from diffusion_core.atomic_io import atomic_write_bytes, replace_directory, staging_dir
from diffusion_core.data.manifest import MANIFEST_NAME, DatasetManifest, join, read_manifest_from
from diffusion_core.errors import DatasetError

logger = logging.getLogger(__name__)

VERSIONS_DIR = "versions"
STALE_VERSION_AGE_S = 7 * 24 * 3600.0


class Publisher(Protocol):
    """Where one preparation writes its shards, and how it publishes or discards them.

    Shards go to `join(write_dir, shard_prefix + "<split>/part-NNNNN.parquet")` and are listed in the
    manifest as `shard_prefix + "<split>/part-NNNNN.parquet"` (relative to the dataset root).
    """

    write_dir: str
    shard_prefix: str

    def publish(self, manifest: DatasetManifest, replaced: DatasetManifest | None) -> None: ...

    def discard(self) -> None:
        """Remove what this preparation wrote, unless it may already be published (idempotent)."""


def publisher_for(fs: pafs.FileSystem, root: str) -> Publisher:
    if isinstance(fs, pafs.LocalFileSystem):
        return LocalPublisher(root)
    return VersionedPublisher(fs, root)


def is_dataset_folder_entry(name: str) -> bool:
    """Whether an entry of an output folder without a manifest may be left by a preparation that
    stopped (so the folder may be written to): only versions/ on object stores."""
    return name == VERSIONS_DIR


class LocalPublisher:
    """Stage in a hidden sibling directory, then swap it in."""

    shard_prefix = ""

    def __init__(self, root: str) -> None:
        self.root = Path(root)
        self.write_dir = str(staging_dir(self.root))

    def publish(self, manifest: DatasetManifest, replaced: DatasetManifest | None) -> None:
        atomic_write_bytes(Path(self.write_dir) / MANIFEST_NAME, manifest.to_json_bytes())
        try:
            replace_directory(self.write_dir, self.root)
        except OSError as err:
            # replace_directory moved any old dataset aside first: a non-empty directory in its place
            # is another preparation's, swapped in between our two renames.
            if err.errno in (errno.ENOTEMPTY, errno.EEXIST) and (self.root / MANIFEST_NAME).is_file():
                raise DatasetError(f"another preparation published {str(self.root)!r} at the same time; "
                                   "this one was not published", hint="rerun it to publish it") from err
            raise

    def discard(self) -> None:
        shutil.rmtree(self.write_dir, ignore_errors=True)  # gone already once swapped in


class VersionedPublisher:
    """Write into versions/<random id>/, then point the root manifest at it (see the module doc)."""

    def __init__(self, fs: pafs.FileSystem, root: str) -> None:
        self.fs, self.root = fs, root.rstrip("/")
        self.version = uuid.uuid4().hex[:16]
        self.shard_prefix = f"{VERSIONS_DIR}/{self.version}/"
        self.write_dir = self.root
        self._may_be_published = False

    def publish(self, manifest: DatasetManifest, replaced: DatasetManifest | None) -> None:
        version_dir = join(self.root, self.shard_prefix.rstrip("/"))
        staged_pointer = join(version_dir, f".{MANIFEST_NAME}.tmp")
        _write(self.fs, staged_pointer, manifest.to_json_bytes())
        self._may_be_published = True  # from here on, never delete this version: the root may name it
        self.fs.move(staged_pointer, join(self.root, MANIFEST_NAME))
        _write(self.fs, join(version_dir, MANIFEST_NAME), manifest.to_json_bytes())  # the mark
        try:
            collect_garbage(self.fs, self.root, replaced)
        except OSError as err:  # published already: old versions wait for the next preparation
            logger.warning("could not delete old versions under %s: %s", self.root, err)

    def discard(self) -> None:
        version_dir = join(self.root, self.shard_prefix.rstrip("/"))
        if not self._may_be_published and _exists(self.fs, version_dir):
            self.fs.delete_dir(version_dir)


def collect_garbage(fs: pafs.FileSystem, root: str, replaced: DatasetManifest | None = None) -> list[str]:
    """Delete superseded versions (and the shards of a `replaced` manifest of the older flat layout);
    returns the deleted version ids. Safe while other preparations run (module docstring)."""
    versions = _list_versions(fs, root)
    try:
        current = read_manifest_from(fs, root)
    except DatasetError as err:
        logger.warning("not collecting old versions under %s: %s", root, err)
        return []
    named = _versions_named(current)
    now = time.time()
    doomed = [v for v, (marked, newest) in versions.items()
              if v not in named and (marked or now - newest > STALE_VERSION_AGE_S)]
    for version in doomed:
        with contextlib.suppress(FileNotFoundError):  # another collector was first
            fs.delete_dir(join(root, f"{VERSIONS_DIR}/{version}"))
    if doomed:
        logger.info("deleted %d superseded dataset version(s) under %s", len(doomed), root)
    _delete_flat_layout_shards(fs, root, replaced, current)
    return doomed


def _list_versions(fs: pafs.FileSystem, root: str) -> dict[str, tuple[bool, float]]:
    """{version id: (published mark present, newest modification time as a POSIX timestamp)}."""
    base = join(root, VERSIONS_DIR)
    found: dict[str, tuple[bool, float]] = {}
    for info in fs.get_file_info(pafs.FileSelector(base, recursive=True, allow_not_found=True)):
        relative = info.path[len(base):].strip("/").split("/")
        version = relative[0]
        marked, newest = found.get(version, (False, 0.0))
        marked = marked or relative[1:] == [MANIFEST_NAME]
        # No time (a directory marker on some object stores): unknown, so never stale.
        mtime = info.mtime.timestamp() if info.mtime is not None else time.time()
        found[version] = (marked, max(newest, mtime))
    return found


def _versions_named(manifest: DatasetManifest) -> set[str]:
    return {path.split("/")[1] for files in manifest.shards.values() for path in (f.path for f in files)
            if path.startswith(f"{VERSIONS_DIR}/")}


def _delete_flat_layout_shards(fs: pafs.FileSystem, root: str, replaced: DatasetManifest | None,
                               current: DatasetManifest) -> None:
    """Shards of a manifest written before versions/ existed (split/part-*.parquet at the root):
    deleted once a versioned manifest has replaced it, unless the current one still lists them."""
    if replaced is None:
        return
    listed = {f.path for files in current.shards.values() for f in files}
    flat = [f.path for files in replaced.shards.values() for f in files
            if not f.path.startswith(f"{VERSIONS_DIR}/") and f.path not in listed]
    for path in flat:
        with contextlib.suppress(FileNotFoundError):  # another collector was first
            fs.delete_file(join(root, path))


def _exists(fs: pafs.FileSystem, path: str) -> bool:
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def _write(fs: pafs.FileSystem, path: str, data: bytes) -> None:
    with fs.open_output_stream(path) as f:
        f.write(data)
