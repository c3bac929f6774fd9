"""Benchmark dataset preparation: throughput and peak memory for 10k and 100k 32x32 RGB images.

Each size runs in a fresh subprocess (so peak RSS, from resource.getrusage, belongs to that run
alone); the source .npy is generated chunk by chunk in yet another subprocess. Peak memory that
does not grow with the image count shows that preparation streams.

    python benchmarks/prepare.py [--sizes 10000 100000] [--out benchmarks/results/prepare.json]
"""

from __future__ import annotations

import argparse
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


def run_child(*args: str) -> str:
    cmd = [sys.executable, __file__, *args]
    return subprocess.run(cmd, check=True, capture_output=True, text=True).stdout


def machine_info() -> dict:
    import torch

    return {"platform": platform.platform(), "python": platform.python_version(), "cpu_count": os.cpu_count(),
            "torch": torch.__version__, "loadavg": os.getloadavg()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--sizes", type=int, nargs="+", default=[10_000, 100_000])
    parser.add_argument("--out", type=Path, default=Path(__file__).parent / "results" / "prepare.json")
    parser.add_argument("--generate", nargs=2, metavar=("PATH", "COUNT"), help=argparse.SUPPRESS)
    parser.add_argument("--measure", nargs=2, metavar=("SOURCE", "OUTPUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.generate:
        generate(Path(args.generate[0]), int(args.generate[1]))
        return
    if args.measure:
        print(json.dumps(measure(Path(args.measure[0]), Path(args.measure[1]))))
        return
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for count in args.sizes:
            source = Path(tmp) / f"images_{count}.npy"
            run_child("--generate", str(source), str(count))
            runs.append(json.loads(run_child("--measure", str(source), str(Path(tmp) / f"ds_{count}"))))
            source.unlink()
    peaks = [r["peak_rss_mib"] for r in runs]
    report = {
        "benchmark": "prepare", "image_shape": IMAGE_SHAPE, "source": ".npy (uint8, streamed)",
        "runs": runs, "peak_rss_ratio_largest_to_smallest": round(peaks[-1] / peaks[0], 3),
        "machine": machine_info(),
    }
    from diffusion_core.atomic_io import atomic_write_text  # lazily, as elsewhere in this script

    atomic_write_text(args.out, json.dumps(report, indent=2) + "\n")
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
