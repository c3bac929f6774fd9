"""Every source kind reproduces the original pixels and labels; the conversion policy holds."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image

from diffusion_core.data.config import PrepareConfig
from diffusion_core.data.manifest import read_manifest
from diffusion_core.data.prepare import prepare
from diffusion_core.data.readers import load_split
from diffusion_core.data.sources import NO_LABEL
from diffusion_core.data.transforms import conform_image
from diffusion_core.errors import DatasetError

N, SIZE, CLASSES = 24, 8, 3


def originals() -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(N, SIZE, SIZE, 3), dtype=np.uint8)
    return images, np.arange(N, dtype=np.int64) % CLASSES


def png_bytes(pixels: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(pixels).save(buf, format="PNG")
    return buf.getvalue()


def write_folder(tmp: Path, images: np.ndarray, labels: np.ndarray | None) -> str:
    """Labelled: one sub-folder per class; unlabelled: every image at the top level."""
    for i, pixels in enumerate(images):
        folder = tmp / "folder" / (f"class_{labels[i]}" if labels is not None else "")
        folder.mkdir(parents=True, exist_ok=True)
        Image.fromarray(pixels).save(folder / f"{i:03d}.png")
    return str(tmp / "folder")


def write_npy(tmp: Path, images: np.ndarray, labels: np.ndarray | None) -> str:
    assert labels is None, "a .npy file holds one array: images only"
    np.save(tmp / "data.npy", images)
    return str(tmp / "data.npy")


def write_npz(tmp: Path, images: np.ndarray, labels: np.ndarray | None) -> str:
    arrays = {"images": images} if labels is None else {"images": images, "labels": labels}
    np.savez(tmp / "data.npz", **arrays)
    return str(tmp / "data.npz")


def parquet_table(image_column: pa.Array | list, labels: np.ndarray | None) -> pa.Table:
    """An image column plus a `label` column, or no label column at all when unlabelled."""
    columns = {"image": image_column} if labels is None else {"image": image_column, "label": labels}
    return pa.table(columns)


def write_parquet_png(tmp: Path, images: np.ndarray, labels: np.ndarray | None) -> str:
    pq.write_table(parquet_table([png_bytes(p) for p in images], labels), tmp / "png.parquet")
    return str(tmp / "png.parquet")


def write_parquet_lists(tmp: Path, images: np.ndarray, labels: np.ndarray | None) -> str:
    pq.write_table(parquet_table([p.tolist() for p in images], labels), tmp / "lists.parquet")
    return str(tmp / "lists.parquet")


def write_parquet_tensor(tmp: Path, images: np.ndarray, labels: np.ndarray | None) -> str:
    tensors = pa.FixedShapeTensorArray.from_numpy_ndarray(images)
    pq.write_table(parquet_table(tensors, labels), tmp / "tensor.parquet")
    return str(tmp / "tensor.parquet")


SourceWriter = Callable[[Path, np.ndarray, np.ndarray | None], str]
SOURCES: dict[str, SourceWriter] = {
    "image_folder": write_folder,
    "npy": write_npy,
    "npz": write_npz,
    "parquet_png": write_parquet_png,
    "parquet_nested_lists": write_parquet_lists,
    "parquet_fixed_shape_tensor": write_parquet_tensor,
}
UNLABELLED_ONLY = {"npy"}
SOURCE_CASES = [(kind, labelled) for kind in sorted(SOURCES) for labelled in (True, False)
                if not (labelled and kind in UNLABELLED_ONLY)]


def read_back(out: str) -> tuple[np.ndarray, np.ndarray]:
    """All rows as uint8 (N, H, W, C) via the torch-side reader, inverting x = v / 127.5 - 1."""
    parts = [load_split(out, split) for split in ("train", "val")]
    x = np.concatenate([p[0].numpy() for p in parts])
    labels = np.concatenate([p[1].numpy() for p in parts])
    return np.rint((x + 1.0) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1), labels


def as_row_set(images: np.ndarray, labels: np.ndarray) -> list[tuple[bytes, int]]:
    return sorted((p.tobytes(), int(label)) for p, label in zip(images, labels, strict=True))


@pytest.mark.parametrize(("kind", "labelled"), SOURCE_CASES,
                         ids=[f"{k}-{'labelled' if lab else 'unlabelled'}" for k, lab in SOURCE_CASES])
def test_source_round_trips_every_row_with_exact_pixels_and_labels(kind: str, labelled: bool,
                                                                   tmp_path: Path) -> None:
    images, labels = originals()
    source = SOURCES[kind](tmp_path, images, labels if labelled else None)
    out = str(tmp_path / "ds")
    result = prepare(PrepareConfig(source=source, output=out, size=SIZE, channels=3, val_fraction=0.25))
    got_images, got_labels = read_back(out)
    expected_labels = labels if labelled else np.full(N, NO_LABEL)
    assert as_row_set(got_images, got_labels) == as_row_set(images, expected_labels)
    assert result.manifest.counts["train"] + result.manifest.counts["val"] == N
    assert result.manifest.skipped == []
    assert result.manifest.num_classes == (CLASSES if labelled else None)


def test_labelled_parquet_skips_rows_with_a_null_or_negative_label(tmp_path: Path) -> None:
    images, labels = originals()
    table = pa.table({"image": [png_bytes(p) for p in images],
                      "label": pa.array([None, -1, *labels[2:].tolist()], pa.int64())})
    pq.write_table(table, tmp_path / "holes.parquet")
    result = prepare(PrepareConfig(source=str(tmp_path / "holes.parquet"), output=str(tmp_path / "ds"),
                                   size=SIZE, channels=3, val_fraction=0))
    assert [(s.name, s.reason) for s in result.manifest.skipped] == [
        ("holes.parquet[row 0]", "label is None; labels must be >= 0"),
        ("holes.parquet[row 1]", "label is -1; labels must be >= 0"),
    ]
    assert as_row_set(*read_back(str(tmp_path / "ds"))) == as_row_set(images[2:], labels[2:])


def test_digits_source_scales_0_16_to_0_255(tmp_path: Path) -> None:
    from sklearn.datasets import load_digits

    digits = load_digits()
    result = prepare(PrepareConfig(output=str(tmp_path / "ds")))
    got_images, got_labels = read_back(str(tmp_path / "ds"))
    expected = np.rint(digits.images * 255 / 16).astype(np.uint8)[..., None]
    assert as_row_set(got_images, got_labels) == as_row_set(expected, digits.target)
    assert result.manifest.label_names == [str(d) for d in range(10)]
    assert result.manifest.image_shape == (8, 8, 1)


def test_float_and_uint16_arrays_follow_the_policy(tmp_path: Path) -> None:
    floats = np.array([[[0.0, 1.0], [0.5, 0.25]]])  # (1, 2, 2) grey
    np.save(tmp_path / "f.npy", floats)
    prepare(PrepareConfig(source=str(tmp_path / "f.npy"), output=str(tmp_path / "f"), size=2, val_fraction=0))
    np.save(tmp_path / "u.npy", np.array([[[0, 65535], [256 * 100 + 255, 255]]], dtype=np.uint16))
    prepare(PrepareConfig(source=str(tmp_path / "u.npy"), output=str(tmp_path / "u"), size=2, val_fraction=0))
    assert read_back(str(tmp_path / "f"))[0][0, :, :, 0].tolist() == [[0, 255], [128, 64]]
    assert read_back(str(tmp_path / "u"))[0][0, :, :, 0].tolist() == [[0, 255], [100, 0]]


def test_out_of_range_floats_are_an_error_naming_the_source(tmp_path: Path) -> None:
    np.save(tmp_path / "bad.npy", np.full((3, 4, 4), 200.0))
    with pytest.raises(DatasetError, match=r"(?s)bad\.npy.*max_unreadable_share.*bad\.npy\[0\]: .*\[0, 1\]"):
        prepare(PrepareConfig(source=str(tmp_path / "bad.npy"), output=str(tmp_path / "ds"), size=4))
    assert not (tmp_path / "ds").exists()


# ---- the image-folder edge cases of the issue ---------------------------------------------------


def test_folder_with_corrupt_rgba_16bit_and_wrong_size_files(tmp_path: Path) -> None:
    root = tmp_path / "imgs"
    root.mkdir()
    Image.new("RGB", (SIZE, SIZE), (10, 20, 30)).save(root / "a_ok.png")
    (root / "b_corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n this is not a png")
    Image.new("RGBA", (SIZE, SIZE), (200, 100, 0, 0)).save(root / "c_rgba.png")
    Image.fromarray(np.full((SIZE, SIZE), 256 * 60 + 200, dtype=np.uint16)).save(root / "d_16bit.png")
    Image.new("RGB", (3 * SIZE, 2 * SIZE), (0, 0, 250)).save(root / "e_wrong_size.jpg", quality=100)
    result = prepare(PrepareConfig(source=str(root), output=str(tmp_path / "ds"), size=SIZE, channels=3,
                                   val_fraction=0, max_unreadable_share=0.25))
    manifest = read_manifest(str(tmp_path / "ds"))
    assert [s.name for s in manifest.skipped] == ["b_corrupt.png"]
    assert result.manifest.counts == {"train": 4, "val": 0}
    corners = {tuple(int(v) for v in p[0, 0]) for p in read_back(str(tmp_path / "ds"))[0]}
    blue = {c for c in corners if c[2] > 200 and max(c[:2]) <= 3}  # JPEG (quality 100): near-exact
    assert len(blue) == 1
    # untouched RGB; fully transparent -> white; 16-bit 60*256+200 -> high byte 60, grey -> RGB
    assert corners - blue == {(10, 20, 30), (255, 255, 255), (60, 60, 60)}


def test_rgba_is_composited_on_the_chosen_background() -> None:
    image = Image.fromarray(np.array([[[200, 100, 0, 128], [7, 7, 7, 255]]], dtype=np.uint8), "RGBA")
    on_white = conform_image(image, 1, 3, "white")  # 1x2 -> 1x1 would resample; check the policy at 2
    white = conform_image(image.resize((2, 2), Image.Resampling.NEAREST), 2, 3, "white")
    black = conform_image(image.resize((2, 2), Image.Resampling.NEAREST), 2, 3, "black")
    a = 128
    expected_white = [(a * c + (255 - a) * 255 + 127) // 255 for c in (200, 100, 0)]
    expected_black = [(a * c + 127) // 255 for c in (200, 100, 0)]
    assert white[0, 0].tolist() == expected_white
    assert black[0, 0].tolist() == expected_black
    assert white[0, 1].tolist() == [7, 7, 7] == black[0, 1].tolist()  # opaque pixels unchanged
    assert on_white.shape == (1, 1, 3)


def test_palette_with_transparency_and_grey_conversions() -> None:
    palette = Image.new("P", (2, 2), 0)
    palette.putpalette([255, 0, 0, 0, 255, 0] + [0] * 762)
    palette.putpixel((1, 1), 1)
    palette.info["transparency"] = 0  # index 0 (red) is transparent
    out = conform_image(palette, 2, 3, "black")
    assert out[0, 0].tolist() == [0, 0, 0] and out[1, 1].tolist() == [0, 255, 0]
    rgb = Image.new("RGB", (2, 2), (255, 0, 0))
    assert conform_image(rgb, 2, 1, "white")[0, 0, 0] == round(0.299 * 255)  # ITU-R 601-2 luma
    grey = Image.new("L", (2, 2), 77)
    assert conform_image(grey, 2, 3, "white")[0, 0].tolist() == [77, 77, 77]


def test_wrong_size_is_resized_then_centre_cropped() -> None:
    band = np.zeros((16, 48, 3), dtype=np.uint8)
    band[:, :16] = (255, 0, 0)
    band[:, 16:32] = (0, 0, 255)  # the centre third: all that survives the crop
    band[:, 32:] = (255, 0, 0)
    out = conform_image(Image.fromarray(band), 8, 3, "white")
    assert out.shape == (8, 8, 3)
    assert (out[:, 2:6, 2] >= 250).all() and (out[:, 2:6, 0] <= 5).all()
    constant = conform_image(Image.new("RGB", (29, 13), (40, 80, 120)), 8, 3, "white")
    assert np.abs(constant.astype(int) - [40, 80, 120]).max() <= 1


def test_bad_sources_fail_before_any_work(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("x")
    mixed = tmp_path / "mixed"
    (mixed / "cat").mkdir(parents=True)
    Image.new("L", (2, 2)).save(mixed / "cat" / "1.png")
    Image.new("L", (2, 2)).save(mixed / "loose.png")
    cases = {
        str(tmp_path / "missing"): "does not exist",
        str(tmp_path / "notes.txt"): "unsupported file type",
        str(mixed): "loose.png",
    }
    for source, message in cases.items():
        with pytest.raises(DatasetError, match=message):
            prepare(PrepareConfig(source=source, output=str(tmp_path / "ds")))
    assert not (tmp_path / "ds").exists()
