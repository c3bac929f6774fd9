"""Hostile inputs to data preparation and to dataset readers: each is refused or skipped and listed,
at a cost bounded before it is paid, and nothing already published is lost.

Cases that cost gigabytes on an unbounded implementation run in a child process whose address
space is capped (RLIMIT_AS) a fixed amount above what its imports use, so a regression fails with
MemoryError instead of taking the machine down.
"""

from __future__ import annotations

import io
import itertools
import json
import os
import shutil
import subprocess
import sys
import threading
import zipfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffusion_core.data.config import PrepareConfig
from diffusion_core.data.manifest import MANIFEST_NAME, DatasetManifest, read_manifest, read_manifest_from
from diffusion_core.data.prepare import prepare
from diffusion_core.data.readers import load_split
from diffusion_core.errors import DatasetError

BOUNDED_HEADROOM_MIB = 512

_BOUNDED_CHILD = """
import json, resource, sys
from diffusion_core.data.config import PrepareConfig
from diffusion_core.data.prepare import prepare
from diffusion_core.errors import DatasetError

def status_bytes(field):
    for line in open("/proc/self/status"):
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024

limit = status_bytes("VmSize") + int(sys.argv[2]) * 2**20
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
with open("/proc/self/clear_refs", "w") as f:
    f.write("5")  # resets the peak RSS (VmHWM) to the current RSS
rss_before = status_bytes("VmRSS")
try:
    manifest = prepare(PrepareConfig(**json.loads(sys.argv[1]))).manifest
    out = {"rows": sum(manifest.counts.values()), "label_names": manifest.label_names,
           "skipped": [[s.name, s.reason] for s in manifest.skipped]}
except MemoryError:
    out = {"error": "MemoryError"}
except DatasetError as err:
    out = {"error": "DatasetError", "message": str(err)}
out["peak_rss_growth_mib"] = round((status_bytes("VmHWM") - rss_before) / 2**20, 1)
print(json.dumps(out))
"""


def prepare_bounded(headroom_mib: int = BOUNDED_HEADROOM_MIB, **config: object) -> dict:
    """prepare() in a child whose address space may grow by `headroom_mib` at most."""
    # The system allocator for Arrow too: jemalloc reserves address space it never touches.
    env = {**os.environ, "MALLOC_ARENA_MAX": "2", "OMP_NUM_THREADS": "1",
           "ARROW_DEFAULT_MEMORY_POOL": "system"}
    command = [sys.executable, "-c", _BOUNDED_CHILD, json.dumps(config), str(headroom_mib)]
    done = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def save_png(path: Path, image: Image.Image, **kw: object) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path, format="PNG", **kw)
    return path


def gradient(size: int = 8) -> np.ndarray:
    """An RGB image whose every pixel differs: orientation and crops are visible in it."""
    y, x = np.mgrid[0:size, 0:size]
    return np.stack([x * 30, y * 30, (x + y) * 10], axis=-1).astype(np.uint8)


def stored_images(uri: str) -> np.ndarray:
    """Every stored row as uint8 (N, H, W, C), train then val."""
    parts = [load_split(uri, split)[0].numpy() for split in ("train", "val")]
    return np.rint((np.concatenate(parts) + 1.0) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


def good_images(folder: Path, count: int = 9) -> Path:
    """`count` distinct small PNGs: one bad file beside nine is 10%, within the default share."""
    for i in range(count):
        save_png(folder / f"ok_{i}.png", Image.fromarray(gradient() + np.uint8(i)))
    return folder


def tree_bytes(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# ---- 1. images whose cost is out of proportion to their bytes -----------------------------------


@pytest.mark.slow
def test_a_370_byte_png_of_300000x1_pixels_is_skipped_within_bounded_memory(tmp_path: Path) -> None:
    """Scaling the short side up first would make it 9.6M x 32 pixels (740 MB) at size 32."""
    folder = good_images(tmp_path / "imgs")
    band = save_png(folder / "band.png", Image.new("L", (300_000, 1), 200))
    assert band.stat().st_size < 1000
    out = prepare_bounded(source=str(folder), output=str(tmp_path / "ds"), size=32, channels=3)
    assert out.get("error") is None, out
    assert out["rows"] == 9
    assert [name for name, _ in out["skipped"]] == ["band.png"]
    assert "max_aspect_ratio" in out["skipped"][0][1]


@pytest.mark.slow
def test_a_1x10m_png_at_size_64_is_skipped_within_bounded_memory(tmp_path: Path) -> None:
    """Unbounded, this image is 64 x 640M pixels once its short side is scaled to 64."""
    folder = good_images(tmp_path / "imgs")
    save_png(folder / "tall.png", Image.new("L", (1, 10_000_000), 7))
    out = prepare_bounded(source=str(folder), output=str(tmp_path / "ds"), size=64, channels=1)
    assert out.get("error") is None, out
    assert (out["rows"], [name for name, _ in out["skipped"]]) == (9, ["tall.png"])


def test_images_over_the_pixel_limit_are_skipped_before_decoding(tmp_path: Path, monkeypatch) -> None:
    """The limit applies to the header's size: no pixel of a refused image is ever decoded."""
    folder = good_images(tmp_path / "imgs")
    save_png(folder / "big.png", Image.new("RGB", (40, 30), (1, 2, 3)))
    loaded: list[tuple[int, int]] = []
    real_load = Image.Image.load

    def spying_load(image: Image.Image):
        loaded.append(image.size)
        return real_load(image)

    monkeypatch.setattr(Image.Image, "load", spying_load)
    result = prepare(PrepareConfig(source=str(folder), output=str(tmp_path / "ds"), size=8, channels=3,
                                   max_image_pixels=1000))
    assert [(s.name, "max_image_pixels" in s.reason) for s in result.manifest.skipped] == [("big.png", True)]
    assert (40, 30) not in loaded


def test_only_the_centre_square_is_resampled(tmp_path: Path, monkeypatch) -> None:
    """A 90x10 image (aspect 9, allowed) at size 8: the square is cut in source coordinates first, so
    no resize ever produces more than size x size pixels (resize-then-crop made 72 x 8)."""
    folder = tmp_path / "imgs"
    strip = np.zeros((10, 90, 3), dtype=np.uint8)
    strip[:, 40:50] = (0, 0, 255)  # the centre square: all that survives
    save_png(folder / "strip.png", Image.fromarray(strip))
    outputs: list[tuple[int, int]] = []
    real_resize = Image.Image.resize

    def spying_resize(image: Image.Image, size, *args, **kwargs):
        outputs.append(tuple(size))
        return real_resize(image, size, *args, **kwargs)

    monkeypatch.setattr(Image.Image, "resize", spying_resize)
    prepare(PrepareConfig(source=str(folder), output=str(tmp_path / "ds"), size=8, channels=3,
                          val_fraction=0))
    assert outputs and all(w * h <= 64 for w, h in outputs)
    (pixels,) = stored_images(str(tmp_path / "ds"))
    assert (pixels[..., 2] >= 250).all() and (pixels[..., :2] <= 5).all()


def test_pillow_decompression_bomb_warning_is_an_error(tmp_path: Path, monkeypatch) -> None:
    """Pillow only warns between MAX_IMAGE_PIXELS and twice that; here the warning skips the file."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)
    folder = good_images(tmp_path / "imgs")
    save_png(folder / "bomb.png", Image.new("L", (40, 40), 9))  # 1600 pixels: a warning, not an error
    result = prepare(PrepareConfig(source=str(folder), output=str(tmp_path / "ds"), size=8))
    assert [s.name for s in result.manifest.skipped] == ["bomb.png"]
    assert "DecompressionBombWarning" in result.manifest.skipped[0].reason


def test_a_file_that_claims_png_but_holds_another_format_is_skipped(tmp_path: Path) -> None:
    """Only the decoders the suffixes name are used, whatever the bytes claim (here a TIFF)."""
    folder = good_images(tmp_path / "imgs")
    Image.new("L", (8, 8), 3).save(folder / "x.png", format="TIFF")
    result = prepare(PrepareConfig(source=str(folder), output=str(tmp_path / "ds")))
    assert [s.name for s in result.manifest.skipped] == ["x.png"]


# ---- 6. EXIF orientation ------------------------------------------------------------------------


@pytest.mark.parametrize(("orientation", "upright"), [
    (3, lambda a: np.rot90(a, 2)),           # rotated 180
    (6, lambda a: np.rot90(a, -1)),          # 0th row is the visual right: rotate 90 clockwise
    (8, lambda a: np.rot90(a, 1)),           # 0th row is the visual left: rotate 90 anticlockwise
    (2, lambda a: a[:, ::-1]),               # mirrored left-right
])
def test_exif_orientation_is_applied(orientation: int, upright: Callable[[np.ndarray], np.ndarray],
                                     tmp_path: Path) -> None:
    """The stored image is what a viewer shows (EXIF 2.3, tag 0x0112), bit for bit (lossless PNG)."""
    pixels = gradient()
    exif = Image.Exif()
    exif[0x0112] = orientation
    save_png(tmp_path / "imgs" / "photo.png", Image.fromarray(pixels), exif=exif)
    prepare(PrepareConfig(source=str(tmp_path / "imgs"), output=str(tmp_path / "ds"), size=8, channels=3,
                          val_fraction=0))
    (stored,) = stored_images(str(tmp_path / "ds"))
    np.testing.assert_array_equal(stored, upright(pixels))


# ---- 2. only regular files inside the source folder ---------------------------------------------


def labelled_tree(tmp_path: Path) -> tuple[Path, Path]:
    """source/{cat,dog}/*.png and, beside the source, outside/ with a 'secret' image."""
    source, outside = tmp_path / "source", tmp_path / "outside"
    for label, value in (("cat", 10), ("dog", 20)):
        for i in range(10):
            save_png(source / label / f"{i}.png", Image.new("L", (8, 8), value + i))
    save_png(outside / "secret.png", Image.new("L", (8, 8), 255))
    save_png(outside / "more" / "secret2.png", Image.new("L", (8, 8), 254))
    return source, outside


def test_links_that_leave_the_source_folder_are_not_followed(tmp_path: Path) -> None:
    source, outside = labelled_tree(tmp_path)
    (source / "cat" / "escape.png").symlink_to(outside / "secret.png")
    (source / "dog" / "escape_dir").symlink_to(outside / "more", target_is_directory=True)
    (source / "dog" / "broken.png").symlink_to(tmp_path / "nowhere.png")
    (source / "dog" / "alias.png").symlink_to(source / "cat" / "0.png")  # inside: read, labelled dog
    result = prepare(PrepareConfig(source=str(source), output=str(tmp_path / "ds")))
    values = sorted(int(p[0, 0, 0]) for p in stored_images(str(tmp_path / "ds")))
    assert values == sorted([*range(10, 30), 10])  # no 255 or 254
    reasons = {s.name: s.reason for s in result.manifest.skipped}
    assert set(reasons) == {"cat/escape.png", "dog/broken.png"}
    assert "leaves the source folder" in reasons["cat/escape.png"]


def test_a_file_swapped_for_a_link_after_listing_is_not_followed(tmp_path: Path) -> None:
    from diffusion_core.data.sources import Skipped, open_source

    source, outside = labelled_tree(tmp_path)
    params = PrepareConfig(source=str(source), output=str(tmp_path / "ds")).parameters()
    opened = open_source(str(source), params)  # lists the files
    target = source / "cat" / "2.png"
    target.unlink()
    target.symlink_to(outside / "secret.png")
    (source / "dog").rename(tmp_path / "dog_moved")
    (source / "dog").symlink_to(outside, target_is_directory=True)
    save_png(outside / "0.png", Image.new("L", (8, 8), 253))
    items = list(opened.iter_samples(params))
    skipped = {item.name for item in items if isinstance(item, Skipped)}
    assert {"cat/2.png", "dog/0.png"} <= skipped
    assert all(int(item.pixels[0, 0, 0]) < 254 for item in items if not isinstance(item, Skipped))


@contextmanager
def fifo(path: Path, rescue_after_s: float = 20.0) -> Iterator[Path]:
    """A FIFO at `path`. Should a reader block on it (the bug under test), a watchdog opens it for
    writing after `rescue_after_s` and closes it, so the reader gets end-of-file and the test fails
    on its own assertion instead of hanging (an open() blocked inside Arrow's C++ retries through
    pytest-timeout's signal)."""
    os.mkfifo(path)
    done = threading.Event()

    def rescue() -> None:
        if done.wait(rescue_after_s):
            return
        while not done.is_set():
            with suppress(OSError):  # ENXIO unless a reader waits
                os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))
            done.wait(0.2)

    watchdog = threading.Thread(target=rescue, daemon=True)
    watchdog.start()
    try:
        yield path
    finally:
        done.set()
        watchdog.join()


@pytest.mark.timeout(120)
def test_a_fifo_named_like_an_image_is_skipped_without_blocking(tmp_path: Path) -> None:
    source, _ = labelled_tree(tmp_path)
    with fifo(source / "cat" / "x.png"):
        result = prepare(PrepareConfig(source=str(source), output=str(tmp_path / "ds")))
    assert [(s.name, "not a regular file" in s.reason) for s in result.manifest.skipped] == [
        ("cat/x.png", True)]
    assert sum(result.manifest.counts.values()) == 20


@pytest.mark.timeout(120)
@pytest.mark.parametrize("name", ["images.npy", "table.parquet"])
def test_a_fifo_named_as_a_file_source_is_refused_without_blocking(name: str, tmp_path: Path) -> None:
    with fifo(tmp_path / name), pytest.raises(DatasetError, match="not a regular file"):
        prepare(PrepareConfig(source=str(tmp_path / name), output=str(tmp_path / "ds")))
    assert not (tmp_path / "ds").exists()


# ---- 3. the source's identity -------------------------------------------------------------------


def rewrite_keeping_mtime(path: Path, image: Image.Image) -> None:
    before = path.stat()
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    assert len(buffer.getvalue()) == before.st_size  # same size: size + mtime cannot tell
    path.write_bytes(buffer.getvalue())
    os.utime(path, ns=(before.st_atime_ns, before.st_mtime_ns))


@pytest.mark.parametrize("mode", ["auto", "content", "metadata"])
def test_changed_content_with_preserved_mtime_is_prepared_again(mode: str, tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    for i in range(4):
        save_png(folder / f"{i}.png", Image.new("L", (8, 8), 40 * i))
    cfg = PrepareConfig(source=str(folder), output=str(tmp_path / "ds"), source_fingerprint=mode)
    first = prepare(cfg)
    rewrite_keeping_mtime(folder / "2.png", Image.new("L", (8, 8), 200))
    second = prepare(cfg)
    assert not second.reused
    assert second.manifest.fingerprint != first.manifest.fingerprint
    assert 200 in {int(p[0, 0, 0]) for p in stored_images(str(tmp_path / "ds"))}
    assert second.manifest.source.fingerprint_kind == ("metadata" if mode == "metadata" else "content")


def test_auto_fingerprint_reads_content_only_up_to_the_size_limit(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    for i in range(3):
        save_png(folder / f"{i}.png", Image.new("L", (8, 8), i))
    small = prepare(PrepareConfig(source=str(folder), output=str(tmp_path / "a")))
    large = prepare(PrepareConfig(source=str(folder), output=str(tmp_path / "b"),
                                  content_fingerprint_max_bytes=10))
    kinds = (small.manifest.source.fingerprint_kind, large.manifest.source.fingerprint_kind)
    assert kinds == ("content", "metadata")
    assert small.manifest.fingerprint == large.manifest.fingerprint  # the run policy is not the version
    assert prepare(PrepareConfig(source=str(folder), output=str(tmp_path / "a"))).reused


def test_the_run_policy_does_not_change_the_dataset_version(tmp_path: Path) -> None:
    np.save(tmp_path / "a.npy", np.random.default_rng(0).integers(0, 256, (20, 4, 4), dtype=np.uint8))
    base = PrepareConfig(source=str(tmp_path / "a.npy"), output=str(tmp_path / "ds"), size=4)
    first = prepare(base)
    policy = {"max_unreadable_share": 0.5, "max_source_row_group_bytes": 10**6,
              "source_fingerprint": "content"}
    again = prepare(base.model_copy(update=policy))
    assert again.reused and again.manifest.fingerprint == first.manifest.fingerprint


# ---- 4. too many unusable items -----------------------------------------------------------------


def folder_with_corrupt(tmp_path: Path, good: int, corrupt: int) -> Path:
    folder = tmp_path / "imgs"
    for i in range(good):
        save_png(folder / f"good_{i:02d}.png", Image.new("L", (8, 8), i))
    for i in range(corrupt):
        (folder / f"bad_{i:02d}.png").write_bytes(b"\x89PNG\r\n\x1a\n not a png")
    return folder


def test_more_unreadable_files_than_the_share_fail_with_the_list(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    prepare(PrepareConfig(output=str(out)))  # a published dataset that must survive
    before = tree_bytes(out)
    folder = folder_with_corrupt(tmp_path, good=8, corrupt=2)  # 20% > the default 10%
    with pytest.raises(DatasetError, match="max_unreadable_share") as failure:
        prepare(PrepareConfig(source=str(folder), output=str(out)))
    assert "bad_00.png" in str(failure.value) and "bad_01.png" in str(failure.value)
    assert tree_bytes(out) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "imgs"]


def test_a_share_at_the_limit_is_published_with_the_list(tmp_path: Path) -> None:
    folder = folder_with_corrupt(tmp_path, good=9, corrupt=1)  # exactly 10%
    result = prepare(PrepareConfig(source=str(folder), output=str(tmp_path / "ds")))
    assert ([s.name for s in result.manifest.skipped], result.manifest.skipped_count) == (["bad_00.png"], 1)


def test_the_failure_comes_as_soon_as_it_is_certain(tmp_path: Path) -> None:
    """1000 rows, all unusable: the run stops after 101 (10% of 1000 exceeded), not after 1000."""
    np.save(tmp_path / "nan.npy", np.full((1000, 4, 4), np.nan, dtype=np.float32))
    consumed: list[int] = []
    with pytest.raises(DatasetError, match="at least 101 of 1000"):
        prepare(PrepareConfig(source=str(tmp_path / "nan.npy"), output=str(tmp_path / "ds"), size=4),
                progress=consumed.append)
    assert consumed == []  # progress is reported every 256 items: none were reached


# ---- 5. concurrent writers ----------------------------------------------------------------------


class HookedFileSystem(pafs.FileSystemHandler):
    """A real pyarrow filesystem (not the local one) that calls `hook()` before every operation, so
    a test can run a whole other preparation at any point of this one."""

    def __init__(self, inner: pafs.FileSystem, hook: Callable[[], None]) -> None:
        self.inner, self.hook = inner, hook

    def _call(self, name: str, *args, **kwargs):
        self.hook()
        return getattr(self.inner, name)(*args, **kwargs)

    def get_type_name(self) -> str:
        return "hooked"

    def normalize_path(self, path):
        return self.inner.normalize_path(path)

    def equals(self, other) -> bool:
        return other is self

    def get_file_info(self, paths):
        return self._call("get_file_info", paths)

    def get_file_info_selector(self, selector):
        return self._call("get_file_info", selector)

    def create_dir(self, path, recursive):
        return self._call("create_dir", path, recursive=recursive)

    def delete_dir(self, path):
        return self._call("delete_dir", path)

    def delete_dir_contents(self, path, missing_dir_ok=False):
        return self._call("delete_dir_contents", path, missing_dir_ok=missing_dir_ok)

    def delete_root_dir_contents(self):
        return self._call("delete_dir_contents", "/", missing_dir_ok=True)

    def delete_file(self, path):
        return self._call("delete_file", path)

    def move(self, src, dest):
        return self._call("move", src, dest)

    def copy_file(self, src, dest):
        return self._call("copy_file", src, dest)

    def open_input_stream(self, path):
        return self._call("open_input_stream", path)

    def open_input_file(self, path):
        return self._call("open_input_file", path)

    def open_output_stream(self, path, metadata):
        return self._call("open_output_stream", path, metadata)

    def open_append_stream(self, path, metadata):
        return self._call("open_append_stream", path, metadata)


def npy_source(path: Path, seed: int, n: int = 40) -> str:
    np.save(path, np.random.default_rng(seed).integers(0, 256, (n, 4, 4), dtype=np.uint8))
    return str(path)


def assert_complete_dataset(fs: pafs.FileSystem, root: str, fingerprints: set[str]) -> DatasetManifest:
    """The root manifest names one of `fingerprints` and every shard it lists is there, whole."""
    from diffusion_core.data.manifest import shard_uris

    manifest = read_manifest_from(fs, root)
    assert manifest.fingerprint in fingerprints
    for split in ("train", "val"):
        paths = shard_uris(fs, root, manifest, split)
        assert sum(pq.read_table(path, filesystem=fs).num_rows for path in paths) == manifest.counts[split]
    return manifest


def test_two_writers_to_one_object_store_output_never_break_it(tmp_path: Path) -> None:
    """Writer A runs whole before every single filesystem operation of writer B (and the other way
    round): whatever the interleaving, the output is one writer's complete dataset."""
    (tmp_path / "bucket").mkdir()
    store = pafs.SubTreeFileSystem(str(tmp_path / "bucket"), pafs.LocalFileSystem())
    configs = {name: PrepareConfig(source=npy_source(tmp_path / f"{name}.npy", seed), output="ds", size=4,
                                   rows_per_row_group=8, rows_per_shard=16)
               for name, seed in (("a", 1), ("b", 2), ("old", 3))}
    expected = {name: prepare(cfg.model_copy(update={"output": str(tmp_path / name)})).manifest.fingerprint
                for name, cfg in configs.items()}

    def interleave(inner: str, outer: str, point: int) -> int:
        """`outer` through a hooked store, `inner` whole before its point-th operation; the count."""
        shutil.rmtree(tmp_path / "bucket" / "ds", ignore_errors=True)
        prepare(configs["old"], filesystem=store)
        operations = itertools.count()

        def hook() -> None:
            if next(operations) == point:
                prepare(configs[inner], filesystem=store)

        prepare(configs[outer], filesystem=pafs.PyFileSystem(HookedFileSystem(store, hook)))
        assert_complete_dataset(store, "ds", {expected[inner], expected[outer]})
        return next(operations)

    for inner, outer in (("a", "b"), ("b", "a")):
        total = interleave(inner, outer, point=0)
        for point in range(1, total):
            interleave(inner, outer, point)
        assert total > 10  # every operation of a preparation was a point of interleaving


def test_old_versions_are_collected_but_never_the_one_the_manifest_names(tmp_path: Path) -> None:
    from diffusion_core.data.publish import STALE_VERSION_AGE_S, collect_garbage

    store = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    for seed in range(3):
        cfg = PrepareConfig(source=npy_source(tmp_path / f"{seed}.npy", seed), output="ds", size=4)
        current = prepare(cfg, filesystem=store).manifest
    versions = tmp_path / "ds" / "versions"
    assert len(list(versions.iterdir())) == 1  # the two superseded versions are gone
    in_progress = versions / "0123456789abcdef" / "train"
    in_progress.mkdir(parents=True)
    (in_progress / "part-00000.parquet").write_bytes(b"being written by another preparation")
    stale = versions / "fedcba9876543210" / "train"
    stale.mkdir(parents=True)
    (stale / "part-00000.parquet").write_bytes(b"left by a preparation that died")
    old = 1_000_000_000
    for path in (stale / "part-00000.parquet", stale, stale.parent):
        os.utime(path, (old, old))
    assert STALE_VERSION_AGE_S < 10**9
    assert collect_garbage(store, "ds") == ["fedcba9876543210"]
    assert in_progress.exists()
    assert_complete_dataset(store, "ds", {current.fingerprint})


@pytest.mark.parametrize("point", ["before_swap", "between_renames", "after_swap"])
def test_two_writers_to_one_local_output_never_break_it(point: str, tmp_path: Path, monkeypatch) -> None:
    """Writer A runs whole at each point of writer B's directory swap (two renames): the output is
    always one complete dataset, and a writer that loses the race says so."""
    out = tmp_path / "ds"
    configs = {name: PrepareConfig(source=npy_source(tmp_path / f"{name}.npy", seed), output=str(out), size=4)
               for name, seed in (("a", 1), ("b", 2), ("old", 3))}
    expected = {prepare(configs[n].model_copy(update={"output": str(tmp_path / n)})).manifest.fingerprint
                for n in ("a", "b")}
    prepare(configs["old"])
    real_rename = os.rename
    state = {"renames": 0, "inner_running": False}

    def run_inner() -> None:
        state["inner_running"] = True
        prepare(configs["a"])
        state["inner_running"] = False

    def rename(src, dst, *args, **kwargs):
        if state["inner_running"]:
            return real_rename(src, dst, *args, **kwargs)
        state["renames"] += 1
        if (point, state["renames"]) in (("before_swap", 1), ("between_renames", 2)):
            run_inner()
        result = real_rename(src, dst, *args, **kwargs)
        if (point, state["renames"]) == ("after_swap", 2):
            run_inner()
        return result

    monkeypatch.setattr(os, "rename", rename)
    try:
        prepare(configs["b"])
    except DatasetError as err:
        assert point == "between_renames" and "at the same time" in str(err)
    monkeypatch.undo()
    manifest = assert_complete_dataset(pafs.LocalFileSystem(), str(out), expected)
    listed = {f.path for files in manifest.shards.values() for f in files} | {MANIFEST_NAME}
    assert set(tree_bytes(out)) == listed
    assert not [p for p in tmp_path.iterdir() if ".tmp-" in p.name]  # no staging left


# ---- 7. paths from a manifest -------------------------------------------------------------------


@pytest.fixture()
def published(tmp_path: Path) -> Path:
    out = tmp_path / "ds"
    prepare(PrepareConfig(source=npy_source(tmp_path / "a.npy", 0), output=str(out), size=4))
    outside = tmp_path / "outside.parquet"
    pq.write_table(pa.table({"image": [b"\0" * 16], "label": [7], "key": ["k"]}), outside)
    return out


def rewrite_manifest(out: Path, change: Callable[[dict], None]) -> None:
    data = json.loads((out / MANIFEST_NAME).read_text())
    change(data)
    (out / MANIFEST_NAME).write_text(json.dumps(data))


@pytest.mark.parametrize("path", ["../outside.parquet", "train/../../outside.parquet", "/etc/passwd.parquet",
                                  "train//x.parquet", "./train/part-00000.parquet", "train\\..\\x.parquet"])
def test_shard_paths_that_could_leave_the_dataset_are_refused(path: str, published: Path) -> None:
    def point_outside(data: dict) -> None:
        data["shards"]["train"][0]["path"] = path

    rewrite_manifest(published, point_outside)
    with pytest.raises(DatasetError, match=r"shards\.train\.0\.path") as refused:
        load_split(str(published), "train")
    assert path not in str(refused.value)  # the offending value is not echoed


def test_a_shard_linked_out_of_the_dataset_is_refused(published: Path) -> None:
    shard = published / read_manifest(str(published)).shards["train"][0].path
    shard.unlink()
    shard.symlink_to(published.parent / "outside.parquet")
    with pytest.raises(DatasetError, match=r"shards\.train\[0\]\.path leads outside"):
        load_split(str(published), "train")


@pytest.mark.parametrize(("change", "field"), [
    (lambda d: d.update(image_shape=[100000, 100000, 3]), "image_shape"),
    (lambda d: d["counts"].update(train=10**9), "shards.train"),
    (lambda d: d.update(class_counts=[1, 2, 3]), "class_counts"),
])
def test_inconsistent_manifests_are_refused(change: Callable[[dict], None], field: str,
                                            published: Path) -> None:
    rewrite_manifest(published, change)
    with pytest.raises(DatasetError, match=field):
        read_manifest(str(published))


def test_an_oversized_manifest_is_refused_unread(published: Path, monkeypatch) -> None:
    import diffusion_core.data.manifest as manifest_module

    monkeypatch.setattr(manifest_module, "MAX_MANIFEST_BYTES", 200, raising=False)
    with pytest.raises(DatasetError, match="larger than 200 bytes"):
        read_manifest(str(published))


def test_an_older_manifest_without_the_new_fields_is_still_read(published: Path) -> None:
    def as_schema_1(data: dict) -> None:
        data["schema_version"] = 1
        for key in ("class_counts", "skipped_count"):
            data.pop(key)
        data["source"].pop("fingerprint_kind")
        for key in ("max_image_pixels", "max_aspect_ratio", "max_classes", "max_unreadable_share",
                    "source_fingerprint", "content_fingerprint_max_bytes", "max_source_row_group_bytes"):
            data["parameters"].pop(key)

    rewrite_manifest(published, as_schema_1)
    manifest = read_manifest(str(published))
    new_fields = (manifest.class_counts, manifest.skipped_count, manifest.source.fingerprint_kind)
    assert new_fields == (None, 0, None)
    assert len(load_split(str(published), "train")[0]) == manifest.counts["train"]


# ---- the same class, next door: NumPy and Parquet sources, labels --------------------------------


def npy_header_only(path: Path, shape: tuple[int, ...], dtype: str = "|u1", payload: bytes = b"") -> str:
    with path.open("wb") as f:
        np.lib.format.write_array_header_1_0(f, {"descr": dtype, "fortran_order": False, "shape": shape})
        f.write(payload)
    return str(path)


@pytest.mark.parametrize(("shape", "dtype", "message"), [
    ((1, 10**6, 10**6), "|u1", "max_image_pixels"),         # one image of 10^12 pixels
    ((3, 200_000, 2), "|u1", "max_aspect_ratio"),
    ((10**12, 8, 8), "|u1", "more rows than the file holds"),
    ((4, 8, 8), "|b1", "integers or floats"),
    ((4, 8, 8, 7), "|u1", "C in 1..4"),
])
def test_hostile_npy_headers_are_refused_before_any_row_is_read(shape: tuple[int, ...], dtype: str,
                                                                message: str, tmp_path: Path) -> None:
    source = npy_header_only(tmp_path / "x.npy", shape, dtype, payload=b"\0" * 4096)
    with pytest.raises(DatasetError, match=message):
        prepare(PrepareConfig(source=source, output=str(tmp_path / "ds")))
    assert not (tmp_path / "ds").exists()


def test_an_npz_member_declaring_more_rows_than_it_holds_is_refused(tmp_path: Path) -> None:
    buffer = io.BytesIO()
    header = {"descr": "|u1", "fortran_order": False, "shape": (10**9, 8, 8)}
    np.lib.format.write_array_header_1_0(buffer, header)
    with zipfile.ZipFile(tmp_path / "x.npz", "w", compression=zipfile.ZIP_DEFLATED) as archive:
        archive.writestr("images.npy", buffer.getvalue() + b"\0" * 640)
    with pytest.raises(DatasetError, match="more rows than the file holds"):
        prepare(PrepareConfig(source=str(tmp_path / "x.npz"), output=str(tmp_path / "ds")))


@pytest.mark.slow
def test_a_huge_label_value_is_skipped_not_turned_into_class_names(tmp_path: Path) -> None:
    """Numeric labels name classes 0..max: one label of 10^12 must not make 10^12 names."""
    images = np.random.default_rng(0).integers(0, 256, (20, 4, 4), dtype=np.uint8)
    labels = np.arange(20) % 3
    labels[5] = 10**12
    np.savez(tmp_path / "x.npz", images=images, labels=labels)
    out = prepare_bounded(source=str(tmp_path / "x.npz"), output=str(tmp_path / "ds"), size=4)
    assert out.get("error") is None, out
    assert out["label_names"] == ["0", "1", "2"]
    assert [name for name, _ in out["skipped"]] == ["x.npz[5]"]
    assert "max_classes" in out["skipped"][0][1]


def test_too_many_string_classes_are_refused(tmp_path: Path) -> None:
    png = io.BytesIO()
    Image.new("L", (4, 4)).save(png, format="PNG")
    pq.write_table(pa.table({"image": [png.getvalue()] * 30, "label": [f"c{i}" for i in range(30)]}),
                   tmp_path / "t.parquet")
    with pytest.raises(DatasetError, match="max_classes"):
        prepare(PrepareConfig(source=str(tmp_path / "t.parquet"), output=str(tmp_path / "ds"),
                              max_classes=20))


@pytest.mark.slow
def test_a_parquet_list_cell_with_huge_dimensions_is_skipped_within_bounded_memory(tmp_path: Path) -> None:
    """One cell of 1 x 5M nested lists: refused by its shape before its values are converted."""
    rows = [np.full((4, 4), i, dtype=np.uint8).tolist() for i in range(9)]
    tall = pa.array([[[0] * 5_000_000]], type=pa.list_(pa.list_(pa.uint8())))
    small = pa.array(rows, type=pa.list_(pa.list_(pa.uint8())))
    pq.write_table(pa.table({"image": pa.concat_arrays([small, tall])}), tmp_path / "t.parquet")
    out = prepare_bounded(source=str(tmp_path / "t.parquet"), output=str(tmp_path / "ds"), size=64)
    assert out.get("error") is None, out
    assert (out["rows"], [name for name, _ in out["skipped"]]) == (9, ["t.parquet[row 9]"])


def test_a_parquet_row_group_over_the_byte_budget_is_refused_before_reading(tmp_path: Path) -> None:
    png = io.BytesIO()
    Image.new("L", (4, 4)).save(png, format="PNG")
    cells = [png.getvalue() + bytes([i]) * 5000 for i in range(4)]
    pq.write_table(pa.table({"image": cells}), tmp_path / "t.parquet")
    with pytest.raises(DatasetError, match="max_source_row_group_bytes"):
        prepare(PrepareConfig(source=str(tmp_path / "t.parquet"), output=str(tmp_path / "ds"),
                              max_source_row_group_bytes=10_000))


# ---- issue 13: the class prior of the training split --------------------------------------------


def test_class_counts_are_the_train_split_label_histogram(tmp_path: Path) -> None:
    result = prepare(PrepareConfig(output=str(tmp_path / "ds"), val_fraction=0.2))
    _, train_labels = load_split(str(tmp_path / "ds"), "train")
    expected = np.bincount(train_labels.numpy(), minlength=10).tolist()
    assert result.manifest.class_counts == expected
    assert read_manifest(str(tmp_path / "ds")).class_counts == expected


def test_class_counts_align_with_label_names_and_are_none_when_unlabelled(tmp_path: Path) -> None:
    folder = tmp_path / "imgs"
    for label, n in (("ant", 3), ("cow", 2)):
        for i in range(n):
            save_png(folder / label / f"{i}.png", Image.new("L", (4, 4), 10 * i))
    labelled = prepare(PrepareConfig(source=str(folder), output=str(tmp_path / "a"), size=4, val_fraction=0))
    assert (labelled.manifest.label_names, labelled.manifest.class_counts) == (["ant", "cow"], [3, 2])
    images = np.random.default_rng(0).integers(0, 256, (6, 4, 4), dtype=np.uint8)
    np.savez(tmp_path / "gap.npz", images=images, labels=np.array([0, 0, 2, 2, 2, 0]))
    gap = prepare(PrepareConfig(source=str(tmp_path / "gap.npz"), output=str(tmp_path / "b"), size=4,
                                val_fraction=0)).manifest
    assert (gap.label_names, gap.class_counts) == (["0", "1", "2"], [3, 0, 3])
    unlabelled = prepare(PrepareConfig(source=npy_source(tmp_path / "u.npy", 0), output=str(tmp_path / "c"),
                                       size=4))
    assert unlabelled.manifest.class_counts is None


@pytest.mark.slow
def test_a_parquet_value_repeated_by_its_dictionary_is_read_within_bounded_memory(tmp_path: Path) -> None:
    """A 300-row binary column of one 1 MB cell, dictionary-encoded: a few hundred bytes on disk,
    256 MB for a batch of 256 rows (twice that with a Python copy of each). Batches are sized by the
    budget (32 MiB here: 8 rows) and cells are read in place."""
    png = io.BytesIO()
    Image.new("L", (4, 4), 5).save(png, format="PNG")
    cell = png.getvalue() + b"\0" * (1 << 20)  # Pillow stops reading at IEND
    column = pa.DictionaryArray.from_arrays(pa.array([0] * 300, pa.int32()), pa.array([cell], pa.binary()))
    pq.write_table(pa.table({"image": column}), tmp_path / "t.parquet", compression="zstd",
                   store_schema=False)  # read back as a plain binary column
    assert pq.read_schema(tmp_path / "t.parquet").field("image").type == pa.binary()
    assert (tmp_path / "t.parquet").stat().st_size < 4096
    out = prepare_bounded(headroom_mib=256, source=str(tmp_path / "t.parquet"), output=str(tmp_path / "ds"),
                          size=4, val_fraction=0, max_source_row_group_bytes=32 << 20)
    assert out.get("error") is None, out
    assert (out["rows"], out["skipped"]) == (300, [])
