"""Benchmark dataset preparation: throughput and peak memory for 10k and 100k 32x32 RGB images, an
image folder, and what hostile inputs cost.

Each size runs in a fresh subprocess (so peak RSS, from resource.getrusage, belongs to that run
alone); the source .npy is generated chunk by chunk in yet another subprocess. Peak memory that
does not grow with the image count shows that preparation streams. The folder run adds the cost of
walking and content-fingerprinting a folder of PNG files.

Hostile inputs (--hostile): each case is prepared in a child whose address space may grow by at
most 4 GiB beyond its imports (RLIMIT_AS), so an unbounded implementation ends in MemoryError
instead of exhausting the machine; the peak RSS growth during preparation (VmHWM, reset after the
imports) and the outcome are reported.

    python benchmarks/prepare.py [--sizes 10000 100000] [--folder-images 5000] [--hostile]
                                 [--out benchmarks/results/prepare.json]
"""

from __future__ import annotations

import argparse
import io
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

IMAGE_SHAPE = (32, 32, 3)
GENERATE_CHUNK = 5000


def generate(path: Path, count: int) -> None:
    """Random images written to a .npy through a memmap, a chunk at a time."""
    out = np.lib.format.open_memmap(path, mode="w+", dtype=np.uint8, shape=(count, *IMAGE_SHAPE))
    rng = np.random.default_rng(0)
    for start in range(0, count, GENERATE_CHUNK):
        n = min(GENERATE_CHUNK, count - start)
        out[start : start + n] = rng.integers(0, 256, size=(n, *IMAGE_SHAPE), dtype=np.uint8)
    out.flush()
    del out


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0  # Linux reports KiB


def measure(source: Path, output: Path) -> dict:
    """Run in a fresh process: prepare the source and report time and peak RSS."""
    from diffusion_core.data.config import PrepareConfig
    from diffusion_core.data.prepare import prepare

    config = PrepareConfig(source=str(source), output=str(output), size=32, channels=3, val_fraction=0.1)
    rss_before = rss_mib()
    start = time.perf_counter()
    result = prepare(config)
    seconds = time.perf_counter() - start
    count = sum(result.manifest.counts.values())
    dataset_bytes = sum(p.stat().st_size for p in output.rglob("*.parquet"))
    return {
        "images": count, "seconds": round(seconds, 3), "images_per_s": round(count / seconds, 1),
        "peak_rss_mib": round(rss_mib(), 1), "rss_after_imports_mib": round(rss_before, 1),
        "source_mib": round(source.stat().st_size / 2**20, 1), "dataset_mib": round(dataset_bytes / 2**20, 1),
        "shards": {k: len(v) for k, v in result.manifest.shards.items()},
    }


def generate_folder(folder: Path, count: int) -> None:
    """`count` random 32x32 RGB PNG files in 10 class sub-folders."""
    from PIL import Image

    rng = np.random.default_rng(0)
    for i in range(count):
        path = folder / f"class_{i % 10}" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(rng.integers(0, 256, size=IMAGE_SHAPE, dtype=np.uint8)).save(path)


def measure_folder(folder: Path, output: Path) -> dict:
    """Run in a fresh process: open (walk) and fingerprint the folder, then prepare it."""
    from diffusion_core.data.config import PrepareConfig
    from diffusion_core.data.prepare import prepare
    from diffusion_core.data.sources import open_source

    config = PrepareConfig(source=str(folder), output=str(output), size=32, channels=3)
    start = time.perf_counter()
    source = open_source(config.source, config.parameters())
    source.fingerprint()
    fingerprint_seconds = time.perf_counter() - start
    start = time.perf_counter()
    result = prepare(config)
    seconds = time.perf_counter() - start
    count = sum(result.manifest.counts.values())
    return {
        "images": count, "walk_and_fingerprint_seconds": round(fingerprint_seconds, 3),
        "fingerprint_kind": getattr(result.manifest.source, "fingerprint_kind", None),  # None: not recorded
        "seconds": round(seconds, 3), "images_per_s": round(count / seconds, 1),
        "peak_rss_mib": round(rss_mib(), 1),
    }


# ---- hostile inputs -----------------------------------------------------------------------------

HOSTILE_HEADROOM_MIB = 4096


def _png(image: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _folder_with_one_band(directory: Path, band: tuple[int, int], size: int) -> dict:
    """Nine ordinary PNGs and one PNG of `band` (width, height) pixels, a few hundred bytes."""
    from PIL import Image

    folder = directory / "imgs"
    folder.mkdir(parents=True)
    for i in range(9):
        (folder / f"ok_{i}.png").write_bytes(_png(Image.new("RGB", (16, 16), (i, 2 * i, 3 * i))))
    (folder / "bad.png").write_bytes(_png(Image.new("L", band, 9)))
    return {"source": str(folder), "size": size, "channels": 3}


def _parquet_dictionary_cell(directory: Path) -> dict:
    """600 rows of one 1 MB PNG cell, dictionary-encoded: a few KB on disk, 600 MB as plain rows."""
    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    cell = _png(Image.new("L", (4, 4), 5)) + b"\0" * (1 << 20)
    column = pa.DictionaryArray.from_arrays(pa.array([0] * 600, pa.int32()), pa.array([cell], pa.binary()))
    pq.write_table(pa.table({"image": column}), directory / "t.parquet", store_schema=False)
    return {"source": str(directory / "t.parquet"), "size": 4, "val_fraction": 0}


def _parquet_tall_list_cell(directory: Path) -> dict:
    """Nine 4x4 nested-list images and one of 1 x 5M."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    kind = pa.list_(pa.list_(pa.uint8()))
    small = pa.array([np.full((4, 4), i, np.uint8).tolist() for i in range(9)], kind)
    tall = pa.array([[[0] * 5_000_000]], kind)
    pq.write_table(pa.table({"image": pa.concat_arrays([small, tall])}), directory / "t.parquet")
    return {"source": str(directory / "t.parquet"), "size": 64}


def _npz_huge_label(directory: Path) -> dict:
    """20 images, labels 0..2 except one of 10^9 (numeric labels name classes 0..max)."""
    labels = np.arange(20) % 3
    labels[5] = 10**9
    images = np.broadcast_to(np.arange(20, dtype=np.uint8)[:, None, None], (20, 4, 4))
    np.savez(directory / "x.npz", images=images, labels=labels)
    return {"source": str(directory / "x.npz"), "size": 4}


HOSTILE_CASES = {
    "png_300000x1_size_32": lambda d: _folder_with_one_band(d, (300_000, 1), 32),
    "png_1x10M_size_64": lambda d: _folder_with_one_band(d, (1, 10_000_000), 64),
    "parquet_one_1MB_cell_x600_dictionary": _parquet_dictionary_cell,
    "parquet_list_cell_1x5M_size_64": _parquet_tall_list_cell,
    "npz_label_1e9": _npz_huge_label,
}


def status_bytes(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def measure_hostile(config_json: str) -> dict:
    """Run in a fresh process: prepare under an address-space cap; outcome and peak RSS growth."""
    from diffusion_core.data.config import PrepareConfig
    from diffusion_core.data.prepare import prepare
    from diffusion_core.errors import DatasetError

    limit = status_bytes("VmSize") + HOSTILE_HEADROOM_MIB * 2**20
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak RSS (VmHWM) to the current RSS
    rss_before, start = status_bytes("VmRSS"), time.perf_counter()
    try:
        manifest = prepare(PrepareConfig(**json.loads(config_json))).manifest
        outcome = {"outcome": "prepared", "rows": sum(manifest.counts.values()),
                   "skipped": [f"{s.name}: {s.reason}" for s in manifest.skipped]}
    except MemoryError:
        outcome = {"outcome": f"MemoryError (address space capped at +{HOSTILE_HEADROOM_MIB} MiB)"}
    except DatasetError as err:
        outcome = {"outcome": "refused", "message": str(err)[:300]}
    return {**outcome, "seconds": round(time.perf_counter() - start, 2),
            "peak_rss_growth_mib": round((status_bytes("VmHWM") - rss_before) / 2**20, 1)}


def run_hostile(tmp: Path) -> list[dict]:
    results = []
    for case, write in HOSTILE_CASES.items():
        directory = tmp / case
        directory.mkdir()
        config = {**write(directory), "output": str(directory / "ds")}
        measured = json.loads(run_child("--measure-hostile", json.dumps(config)))
        results.append({"case": case, **measured})
        print(json.dumps(results[-1]), file=sys.stderr)
    return results


def run_child(*args: str) -> str:
    cmd = [sys.executable, __file__, *args]
    env = {**os.environ, "ARROW_DEFAULT_MEMORY_POOL": "system", "MALLOC_ARENA_MAX": "2"}
    return subprocess.run(cmd, check=True, capture_output=True, text=True, env=env).stdout


def machine_info() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "loadavg": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--folder-images", type=int, default=5000, help="PNG folder run (0: skip)")
    parser.add_argument("--hostile", action="store_true", help="also measure the hostile-input cases")
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prepare.json")
    parser.add_argument("--generate", nargs=2, metavar=("PATH", "COUNT"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("SOURCE", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--measure-folder", nargs=2, metavar=("FOLDER", "OUTPUT"), help=argparse.SUPPRESS)
    parser.add_argument("--measure-hostile", metavar="CONFIG_JSON", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(Path(args.generate[0]), int(args.generate[1]))
        return
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]))))
        return
    if args.measure_folder:
        print(json.dumps(measure_folder(Path(args.measure_folder[0]), Path(args.measure_folder[1]))))
        return
    if args.measure_hostile:
        print(json.dumps(measure_hostile(args.measure_hostile)))
        return
    runs, folder_run, hostile = [], None, None
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.sizes:
            source = Path(tmp) / f"images_{count}.npy"
            run_child("--generate", str(source), str(count))
            runs.append(json.loads(run_child("--measure", str(source), str(Path(tmp) / f"ds_{count}"))))
            source.unlink()
        if args.folder_images:
            generate_folder(Path(tmp) / "folder", args.folder_images)
            folder_run = json.loads(run_child("--measure-folder", str(Path(tmp) / "folder"),
                                              str(Path(tmp) / "ds_folder")))
        if args.hostile:
            hostile = run_hostile(Path(tmp))
    peaks = [r["peak_rss_mib"] for r in runs]
    report = {
        "benchmark": "prepare", "image_shape": IMAGE_SHAPE, "source": ".npy (uint8, streamed)",
        "runs": runs, "peak_rss_ratio_largest_to_smallest": round(peaks[-1] / peaks[0], 3),
        "folder": folder_run, "hostile": hostile, "machine": machine_info(),
    }
    from diffusion_core.atomic_io import atomic_write_text  # lazily, as elsewhere in this script

    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
