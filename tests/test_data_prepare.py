"""Preparation: fingerprint, hash split, idempotency, atomic publishing, parameter checks."""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from diffusion_core.data.config import PrepareConfig
from diffusion_core.data.manifest import MANIFEST_NAME, read_manifest
from diffusion_core.data.prepare import prepare
from diffusion_core.errors import ConfigError, DatasetError
from flows.config import load_config


def save_images(path: Path, images: np.ndarray, labels: np.ndarray | None = None) -> str:
    if labels is None:
        np.save(path, images)
    else:
        np.savez(path, images=images, labels=labels)
    return str(path)


def random_images(n: int, seed: int = 0, size: int = 4) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, size=(n, size, size), dtype=np.uint8)


def config(source: str, output: Path, **kw: object) -> PrepareConfig:
    return PrepareConfig(source=source, output=str(output), size=4, **kw)


def rows_by_split(uri: str) -> dict[str, str]:
    manifest = read_manifest(uri)
    found = {}
    for split in ("train", "val"):
        for rel in manifest.shard_paths(split):
            for key in pq.read_table(Path(uri) / rel, columns=["key"]).column("key").to_pylist():
                found[key] = split
    return found


def test_fingerprint_is_stable_and_manifest_byte_identical(tmp_path: Path) -> None:
    src = save_images(tmp_path / "a.npy", random_images(50))
    first = prepare(config(src, tmp_path / "one"))
    second = prepare(config(src, tmp_path / "two"))
    assert first.manifest.fingerprint == second.manifest.fingerprint
    one = (tmp_path / "one" / MANIFEST_NAME).read_bytes()
    assert one == (tmp_path / "two" / MANIFEST_NAME).read_bytes()


def test_second_run_skips_the_work(tmp_path: Path) -> None:
    src = save_images(tmp_path / "a.npy", random_images(50))
    first = prepare(config(src, tmp_path / "ds"))
    stamp = (tmp_path / "ds" / MANIFEST_NAME).stat().st_mtime_ns
    again = prepare(config(src, tmp_path / "ds"))
    assert (first.reused, again.reused) == (False, True)
    assert again.manifest == first.manifest
    assert (tmp_path / "ds" / MANIFEST_NAME).stat().st_mtime_ns == stamp  # nothing rewritten


def test_fingerprint_changes_with_one_pixel_a_label_or_a_parameter(tmp_path: Path) -> None:
    images, labels = random_images(50), np.arange(50) % 5
    base = prepare(config(save_images(tmp_path / "a.npz", images, labels), tmp_path / "a")).manifest
    changed = images.copy()
    changed[17, 2, 3] ^= 1
    pixel = prepare(config(save_images(tmp_path / "b.npz", changed, labels), tmp_path / "b")).manifest
    relabelled = labels.copy()
    relabelled[3] = 4 if labels[3] != 4 else 0
    label = prepare(config(save_images(tmp_path / "c.npz", images, relabelled), tmp_path / "c")).manifest
    param = prepare(config(str(tmp_path / "a.npz"), tmp_path / "d", val_fraction=0.3)).manifest
    fingerprints = {base.fingerprint, pixel.fingerprint, label.fingerprint, param.fingerprint}
    assert len(fingerprints) == 4


def test_keys_and_split_follow_the_documented_hash(tmp_path: Path) -> None:
    images = random_images(40)
    prepare(config(save_images(tmp_path / "a.npy", images), tmp_path / "ds", val_fraction=0.5))
    expected = {}
    for pixels in images:
        digest = hashlib.sha256(b"4x4x1:-1:" + pixels.tobytes()).hexdigest()[:32]
        expected[digest] = "val" if int(digest[:16], 16) / 2**64 < 0.5 else "train"
    assert rows_by_split(str(tmp_path / "ds")) == expected


def test_split_is_stable_when_images_are_added(tmp_path: Path) -> None:
    old, new = random_images(300, seed=1), random_images(200, seed=2)
    prepare(config(save_images(tmp_path / "old.npy", old), tmp_path / "v1"))
    prepare(config(save_images(tmp_path / "all.npy", np.concatenate([old, new])), tmp_path / "v2"))
    before, after = rows_by_split(str(tmp_path / "v1")), rows_by_split(str(tmp_path / "v2"))
    assert len(after) == 500
    assert {key: after[key] for key in before} == before


def test_val_share_matches_val_fraction(tmp_path: Path) -> None:
    counts = prepare(PrepareConfig(output=str(tmp_path / "ds"), val_fraction=0.2)).manifest.counts
    n = counts["train"] + counts["val"]
    sigma = (n * 0.2 * 0.8) ** 0.5
    assert abs(counts["val"] - 0.2 * n) < 4 * sigma  # binomial(1797, 0.2) within 4 sigma


def test_channel_statistics_are_those_of_the_train_split(tmp_path: Path) -> None:
    rgb = np.random.default_rng(3).integers(0, 256, size=(300, 4, 4, 3), dtype=np.uint8)
    result = prepare(config(save_images(tmp_path / "a.npy", rgb), tmp_path / "ds", channels=3,
                            rows_per_row_group=7, rows_per_shard=50))
    train = rows_by_split(str(tmp_path / "ds"))
    keys = [hashlib.sha256(b"4x4x3:-1:" + p.tobytes()).hexdigest()[:32] for p in rgb]
    pixels = np.stack([p for p, k in zip(rgb, keys, strict=True) if train[k] == "train"]) / 255.0
    np.testing.assert_allclose(result.manifest.mean, pixels.reshape(-1, 3).mean(0), atol=1e-7)
    np.testing.assert_allclose(result.manifest.std, pixels.reshape(-1, 3).std(0), atol=1e-7)
    assert len(result.manifest.shards["train"]) == -(-result.manifest.counts["train"] // 50)


def test_every_shard_is_cut_into_full_row_groups(tmp_path: Path) -> None:
    """350 train rows, 100 per shard, 50 per row group: shards [50, 50] x 3 then [50]."""
    out = tmp_path / "ds"
    result = prepare(config(save_images(tmp_path / "a.npy", random_images(350)), out, val_fraction=0,
                            rows_per_row_group=50, rows_per_shard=100))
    row_groups = []
    for shard in result.manifest.shards["train"]:
        metadata = pq.ParquetFile(out / shard.path).metadata
        row_groups.append([metadata.row_group(i).num_rows for i in range(metadata.num_row_groups)])
    assert row_groups == [[50, 50], [50, 50], [50, 50], [50]]
    assert [shard.rows for shard in result.manifest.shards["train"]] == [100, 100, 100, 50]


def test_failure_mid_write_leaves_the_previous_dataset_intact(tmp_path: Path) -> None:
    """An interruption after ~3000 of 5000 rows (here the progress callback raises, as Ctrl-C would)
    leaves the published dataset byte for byte and no staging behind."""
    out = tmp_path / "ds"
    prepare(config(save_images(tmp_path / "good.npy", random_images(100)), out))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    big = save_images(tmp_path / "big.npy", random_images(5000, seed=9))

    def interrupt(consumed: int) -> None:
        if consumed >= 3000:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        prepare(config(big, out, rows_per_row_group=100, rows_per_shard=500), progress=interrupt)
    after = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    assert after == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["big.npy", "ds", "good.npy"]  # no staging


def test_failed_swap_restores_the_previous_dataset(tmp_path: Path, monkeypatch) -> None:
    """Publishing renames the old dataset aside, then the staging directory in; when that second
    rename fails, the old dataset goes back in place."""
    import os

    out = tmp_path / "ds"
    prepare(config(save_images(tmp_path / "good.npy", random_images(100)), out))
    before = {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()}
    real_rename = os.rename

    def staging_rename_fails(src, dst, *args, **kwargs):
        if ".ds.tmp-" in str(src) and Path(dst) == out:
            raise OSError("rename failed")
        return real_rename(src, dst, *args, **kwargs)

    monkeypatch.setattr(os, "rename", staging_rename_fails)
    with pytest.raises(OSError, match="rename failed"):
        prepare(config(save_images(tmp_path / "new.npy", random_images(30, seed=5)), out))
    monkeypatch.undo()
    assert {p.relative_to(out): p.read_bytes() for p in out.rglob("*") if p.is_file()} == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "good.npy", "new.npy"]


def test_interrupted_first_run_leaves_nothing(tmp_path: Path) -> None:
    truncated = tmp_path / "truncated.npy"
    save_images(truncated, random_images(1000))
    truncated.write_bytes(truncated.read_bytes()[:-100])
    with pytest.raises(DatasetError):
        prepare(config(str(truncated), tmp_path / "ds", rows_per_row_group=50, rows_per_shard=100))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["truncated.npy"]


def test_rebuild_replaces_the_old_version_completely(tmp_path: Path) -> None:
    out = tmp_path / "ds"
    prepare(config(save_images(tmp_path / "a.npy", random_images(100)), out))
    second = prepare(config(save_images(tmp_path / "b.npy", random_images(30, seed=5)), out))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*.parquet"))
    listed = sorted(s.path for split in second.manifest.shards.values() for s in split)
    assert files == listed
    assert read_manifest(str(out)) == second.manifest


def test_readers_refuse_a_directory_without_manifest(tmp_path: Path) -> None:
    (tmp_path / "half" / "train").mkdir(parents=True)
    with pytest.raises(DatasetError, match=r"no manifest\.json"):
        read_manifest(str(tmp_path / "half"))


def test_output_that_is_not_a_dataset_is_never_replaced(tmp_path: Path) -> None:
    (tmp_path / "home").mkdir()
    (tmp_path / "home" / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="not a prepared dataset"):
        prepare(PrepareConfig(output=str(tmp_path / "home")))
    assert (tmp_path / "home" / "thesis.tex").read_text() == "precious"


@pytest.mark.parametrize(("overrides", "field"), [
    ({"size": 0}, "prepare.size"),
    ({"channels": 2}, "prepare.channels"),
    ({"val_fraction": 1.0}, "prepare.val_fraction"),
    ({"alpha_background": "grey"}, "prepare.alpha_background"),
    ({"rows_per_shard": 10, "rows_per_row_group": 20}, "rows_per_shard"),
])
def test_bad_parameters_fail_naming_the_field(overrides: dict, field: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=field):
        load_config(PrepareConfig, "prepare", None, overrides={"output": str(tmp_path), **overrides})


def test_file_uri_output(tmp_path: Path) -> None:
    uri = (tmp_path / "ds").as_uri()
    result = prepare(PrepareConfig(output=uri))
    assert read_manifest(uri).fingerprint == result.manifest.fingerprint
    assert (tmp_path / "ds" / MANIFEST_NAME).is_file()


def test_object_store_publishing_points_the_manifest_at_a_new_version(tmp_path: Path) -> None:
    """Filesystems other than the local one cannot rename directories: each preparation writes its
    own versions/<id>/ folder, the root manifest (written last) is the only pointer to it, and the
    version it replaced (here one in the flat local layout) is deleted afterwards."""
    import pyarrow.fs as pafs

    store = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    assert not isinstance(store, pafs.LocalFileSystem)  # takes the object-store path
    prepare(config(save_images(tmp_path / "a.npy", random_images(60)), tmp_path / "ds"))
    cfg = config(save_images(tmp_path / "b.npy", random_images(40, seed=4)), "ds")
    new = prepare(cfg, filesystem=store).manifest
    assert read_manifest(str(tmp_path / "ds")) == new
    (version,) = {s.path.split("/")[1] for split in new.shards.values() for s in split}
    out = tmp_path / "ds"
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    listed = sorted(s.path for split in new.shards.values() for s in split)
    assert files == sorted([MANIFEST_NAME, f"versions/{version}/{MANIFEST_NAME}", *listed])
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.npy", "b.npy", "ds"]
    again = prepare(cfg, filesystem=store, force=True)  # identical content: nothing new is published
    assert again.reused and read_manifest(str(tmp_path / "ds")) == new
    assert sorted(p.name for p in (tmp_path / "ds" / "versions").iterdir()) == [version]
