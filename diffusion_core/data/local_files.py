"""Reading local source files: regular files only, never through a link that leaves the source
folder, never blocking on a FIFO or a device.

A source folder is listed once (`SourceTree.entries`, with os.fwalk, which never descends a link);
each entry is later opened by its path relative to the folder, one component at a time from a
descriptor of the folder with O_NOFOLLOW, so a file or directory swapped for a link after the
listing is refused rather than followed. Every open is non-blocking and is followed by an fstat:
anything but a regular file (a FIFO named x.png, a socket, a device) is refused before a byte is
read. A link is read only when it resolves to a regular file inside the folder; a link to a
directory is never descended (when its target is inside the folder, that target is walked anyway).

A source named directly by the user (a .npy / .npz / .parquet path) may itself be a link: the user
chose it. It must still be a regular file. POSIX only (O_NOFOLLOW, dir_fd).
"""

from __future__ import annotations

import hashlib
import logging
import os
import stat
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import BinaryIO

from diffusion_core.errors import DatasetError

logger = logging.getLogger(__name__)

_HASH_BLOCK = 1 << 20
_OPEN_FILE = os.O_RDONLY | os.O_NONBLOCK | os.O_NOFOLLOW | os.O_CLOEXEC
_OPEN_DIR = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC


def open_regular_file(path: str | Path) -> BinaryIO:
    """Open a user-named file for reading (links followed); DatasetError unless it is a regular file.

    O_NONBLOCK makes opening a FIFO return at once (instead of waiting for a writer), so the fstat
    that refuses it runs; reads from a regular file ignore the flag.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
    except OSError as err:
        raise DatasetError(f"source {str(path)!r} cannot be opened: {err.strerror}") from None
    return _regular_or_refuse(fd, f"source {str(path)!r}")


def stat_regular_file(path: str | Path) -> os.stat_result:
    """The file's stat (links followed); DatasetError unless it is a regular file."""
    info = os.stat(path)
    if not stat.S_ISREG(info.st_mode):
        raise DatasetError(f"source {str(path)!r} is not a regular file (a FIFO, socket or device?)",
                           hint="copy the data into a regular file")
    return info


def _regular_or_refuse(fd: int, what: str) -> BinaryIO:
    try:
        mode = os.fstat(fd).st_mode
    except OSError:
        os.close(fd)
        raise
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise DatasetError(f"{what} is not a regular file")
    return os.fdopen(fd, "rb")


def hash_stream(f: BinaryIO, prefix: bytes = b"") -> str:
    """SHA-256 of `prefix` followed by the stream's bytes, read in 1 MiB blocks."""
    digest = hashlib.sha256(prefix)
    while block := f.read(_HASH_BLOCK):
        digest.update(block)
    return digest.hexdigest()


def metadata_identity(info: os.stat_result) -> str:
    """A file's identity without reading it: size, modification and change times, inode.

    The change time (ctime) is set by the kernel on every write and cannot be set back by a user,
    so content rewritten with its mtime preserved (cp -p, rsync -t, touch -r) still changes it.
    """
    return f"{info.st_size}\0{info.st_mtime_ns}\0{info.st_ctime_ns}\0{info.st_ino}"


@dataclass(frozen=True)
class TreeEntry:
    """One candidate file of a source folder.

    `rel` is where it sits (its name and class come from there); `target` the regular file to read,
    relative to the folder (`rel` itself, or where an internal link points); None with a `problem`
    when it must not be read.
    """

    rel: PurePosixPath
    target: PurePosixPath | None
    problem: str | None
    info: os.stat_result | None


class SourceTree:
    """A local folder whose files are read only if they are regular files inside it."""

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root).resolve(strict=True)

    def entries(self, accept: Callable[[str], bool]) -> list[TreeEntry]:
        """Every file whose name passes `accept`, in sorted path order, each classified."""
        found: list[TreeEntry] = []
        for dirpath, dirnames, filenames, dirfd in os.fwalk(self.root, follow_symlinks=False):
            rel_dir = PurePosixPath(Path(dirpath).relative_to(self.root).as_posix())
            self._log_directory_links(rel_dir, dirnames, dirfd)
            for name in filenames:
                if accept(name):
                    found.append(self._classify(rel_dir / name, name, dirfd))
        return sorted(found, key=lambda e: e.rel.parts)

    def open(self, target: PurePosixPath) -> BinaryIO:
        """Open `target` (relative to the folder) with no link anywhere on the way; DatasetError or
        OSError when it is not a regular file inside the folder any more."""
        fd = os.open(self.root, _OPEN_DIR)
        try:
            for part in target.parts[:-1]:
                next_fd = os.open(part, _OPEN_DIR, dir_fd=fd)
                os.close(fd)
                fd = next_fd
            file_fd = os.open(target.parts[-1], _OPEN_FILE, dir_fd=fd)
        finally:
            os.close(fd)
        return _regular_or_refuse(file_fd, f"{target.as_posix()!r}")

    def _classify(self, rel: PurePosixPath, name: str, dirfd: int) -> TreeEntry:
        try:
            info = os.stat(name, dir_fd=dirfd, follow_symlinks=False)
        except OSError as err:  # removed since it was listed
            return TreeEntry(rel, None, f"cannot be read: {err.strerror}", None)
        if stat.S_ISREG(info.st_mode):
            return TreeEntry(rel, rel, None, info)
        if not stat.S_ISLNK(info.st_mode):
            return TreeEntry(rel, None, "not a regular file (a FIFO, socket or device)", None)
        return self._classify_link(rel)

    def _classify_link(self, rel: PurePosixPath) -> TreeEntry:
        resolved = Path(os.path.realpath(self.root / rel))
        if not resolved.is_relative_to(self.root):
            return TreeEntry(rel, None, "symbolic link that leaves the source folder", None)
        try:
            info = os.stat(resolved, follow_symlinks=False)
        except OSError:
            return TreeEntry(rel, None, "broken symbolic link", None)
        if not stat.S_ISREG(info.st_mode):
            return TreeEntry(rel, None, "symbolic link to something that is not a regular file", None)
        return TreeEntry(rel, PurePosixPath(resolved.relative_to(self.root).as_posix()), None, info)

    def _log_directory_links(self, rel_dir: PurePosixPath, dirnames: list[str], dirfd: int) -> None:
        dirnames.sort()
        for name in dirnames:
            if stat.S_ISLNK(os.stat(name, dir_fd=dirfd, follow_symlinks=False).st_mode):
                logger.warning("not following the directory link %s: links are read only when they point "
                               "to a regular file inside the source folder", (rel_dir / name).as_posix())
