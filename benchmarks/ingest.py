"""Training ingest: peak memory of the whole Ray process tree and images/s, streaming against the
in-memory path it replaced, on 32x32 RGB datasets of two sizes and on the default digits run.

    python -m benchmarks.ingest [--sizes 20000 200000] [--steps 20] [--digits-steps 200]
                                [--before REF] [--out benchmarks/results/ingest.json]

About ten minutes on a quiet 2-core machine with the defaults; the in-memory run on 200,000 images
needs about 10 GB of free memory.

Datasets: random 32x32 RGB images written to a .npy (benchmarks.prepare.generate) and prepared with
the CLI (`diffusion-pipeline prepare SOURCE OUT --size 32 --channels 3`), once per size.

Each training run is a fresh process that calls `run_training` with one worker and its own local
Ray (as `diffusion-pipeline train` does), from one of two source trees: `after`, this checkout, and
`before`, the tree of REF extracted with `git archive` (default: the parent of the commit that
added diffusion_core/data_order.py, i.e. the last in-memory version). While it runs, every 0.25 s
the proportional set size (PSS) of the process and all its descendants (driver, GCS, raylet, the
training worker, Ray Data tasks) is summed; PSS counts each shared page (the object store's shared
memory) once across processes, so the sum is the memory the run occupies. `peak_pss_mib` is the
largest sum seen. `images_per_s` is the training loop's rate as the run reports it (the in-memory
path loads its shard before the loop starts; `wall_s` includes that and Ray's start-up).

Goals: `after` peak memory at the largest size within 20% of the smallest (memory does not grow
with the dataset), and `after` images/s within 10% of `before` on the small datasets.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import subprocess
import sys
import tarfile
import tempfile
import time
from io import BytesIO
from pathlib import Path

import psutil

from benchmarks.measure import TreeMemory
from benchmarks.prepare import generate
from diffusion_core.atomic_io import atomic_write_text

logger = logging.getLogger("benchmarks.ingest")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results" / "ingest.json"
SAMPLE_EVERY_S = 0.25
CLI = str(Path(sys.executable).parent / "diffusion-pipeline")

# Runs inside the measured process, against whichever source tree is first on PYTHONPATH: only
# fields that both the in-memory and the streaming TrainConfig know.
CHILD = """
import json, sys
from diffusion_core.adapters.ray_train import run_training
from diffusion_core.training import TrainConfig
config = TrainConfig.model_validate_json(sys.argv[1])
result = run_training(config)
print("RESULT " + json.dumps(result.metrics))
"""


def machine_info() -> dict[str, object]:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(),
            "memory_gib": round(psutil.virtual_memory().total / 2**30, 1), "loadavg": os.getloadavg()}


def source_tree(ref: str | None, tmp: Path) -> Path:
    """`ref`'s files (git archive) under tmp; the default ref is the last in-memory version."""
    if ref is None:
        added = subprocess.run(["git", "log", "--diff-filter=A", "--format=%H", "--",
                                "diffusion_core/data_order.py"], cwd=ROOT, check=True,
                               capture_output=True, text=True).stdout.split()
        if not added:
            raise SystemExit("--before: no commit adds diffusion_core/data_order.py; pass --before REF")
        ref = f"{added[-1]}^"
    archive = subprocess.run(["git", "archive", "--format=tar", ref], cwd=ROOT, check=True,
                             capture_output=True).stdout
    tree = tmp / "before-tree"
    with tarfile.open(fileobj=BytesIO(archive)) as tar:
        tar.extractall(tree, filter="data")
    logger.info("before: %s extracted to %s", ref, tree)
    return tree


def prepare_synthetic(count: int, work: Path) -> str:
    """A CLI-prepared dataset of `count` random 32x32 RGB images (reused when already there)."""
    out = work / f"rgb32-{count}"
    if (out / "manifest.json").is_file():
        return str(out)
    source = work / f"rgb32-{count}.npy"
    generate(source, count)
    subprocess.run([CLI, "prepare", str(source), str(out), "--size", "32", "--channels", "3"], cwd=ROOT,
                   check=True, stdout=subprocess.DEVNULL)
    source.unlink()
    return str(out)


def prepare_digits(work: Path) -> str:
    out = work / "digits"
    if not (out / "manifest.json").is_file():
        subprocess.run([CLI, "prepare", "digits", str(out)], cwd=ROOT, check=True, stdout=subprocess.DEVNULL)
    return str(out)


def measure(tree: Path, dataset: str, config: dict, work: Path, label: str) -> dict:
    """One training run in a fresh process tree from `tree`; its metrics, wall time and peak PSS."""
    run_dir = Path(tempfile.mkdtemp(prefix=f"{label}-", dir=work))
    config = {**config, "dataset": dataset, "storage_path": str(run_dir / "ray"), "run_name": label,
              "tracking_uri": f"sqlite:///{run_dir / 'mlflow.db'}"}
    # A short RAY_TMPDIR: Ray's socket paths under it must stay within the 107 bytes of a Unix socket.
    with tempfile.TemporaryDirectory(prefix="ri", dir="/tmp") as ray_tmp:
        env = {**os.environ, "PYTHONPATH": str(tree), "RAY_TMPDIR": ray_tmp, "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_DATA_DISABLE_PROGRESS_BARS": "1"}
        start = time.perf_counter()
        with open(run_dir / "stderr.log", "w") as log:
            proc = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(config)], cwd=tree, env=env,
                                    stdout=subprocess.PIPE, stderr=log, text=True)
            with TreeMemory(proc.pid) as memory:
                stdout, _ = proc.communicate()
        wall = time.perf_counter() - start
    if proc.returncode != 0:
        raise RuntimeError(f"{label}: training exited with {proc.returncode}; see {run_dir / 'stderr.log'}")
    metrics = json.loads(next(line for line in stdout.splitlines() if line.startswith("RESULT "))[7:])
    out = {"wall_s": round(wall, 1), "images_per_s": round(metrics["images_per_s"], 1),
           "train_seconds": round(metrics["train_seconds"], 1), "steps": metrics["step"],
           "peak_pss_mib": round(memory.peak_bytes / 2**20, 1), "largest_at_peak_mib": memory.peak_top}
    logger.info("%s: %s", label, out)
    return out


def rgb_config(steps: int, base_channels: int) -> dict:
    unet = {"image_size": 32, "in_channels": 3, "base_channels": base_channels, "channel_mult": [1, 2, 2],
            "attention_resolutions": [8], "num_classes": None}
    return {"steps": steps, "warmup_steps": 1, "batch_size": 128, "unet": unet, "checkpoint_every": steps,
            "log_every": max(1, steps // 4), "sample_every": None, "num_sample_images": 4, "sample_steps": 2}


def goals(runs: dict, sizes: list[int]) -> dict:
    after, before = runs["after"], runs.get("before", {})
    out: dict[str, float] = {}
    small = str(min(sizes)) if sizes else None
    if len(sizes) > 1:
        large = str(max(sizes))
        out["after_memory_growth"] = round(after[large]["peak_pss_mib"] / after[small]["peak_pss_mib"], 3)
        if before:
            out["before_memory_growth"] = round(
                before[large]["peak_pss_mib"] / before[small]["peak_pss_mib"], 3)
    if before:
        for name in (small, "digits"):
            if name in after and name in before:
                out[f"throughput_ratio_{name}"] = round(
                    after[name]["images_per_s"] / before[name]["images_per_s"], 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", type=int, nargs="*", default=[20_000, 200_000],
                        help="32x32 RGB dataset sizes; none: digits only")
    parser.add_argument("--steps", type=int, default=20, help="steps of each 32x32 RGB run")
    parser.add_argument("--base-channels", type=int, default=32, help="UNet width of the 32x32 RGB runs")
    parser.add_argument("--digits-steps", type=int, default=200, help="steps of the digits runs; 0 skips")
    parser.add_argument("--before", default=None, help="git ref of the in-memory version")
    parser.add_argument("--no-before", action="store_true", help="measure this checkout only")
    parser.add_argument("--work", type=Path, default=None, help="keep datasets here between runs")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")

    with tempfile.TemporaryDirectory(prefix="ingest-", dir="/tmp") as tmp:
        work = args.work or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        trees = {"after": ROOT}
        if not args.no_before:
            trees = {"before": source_tree(args.before, Path(tmp)), **trees}
        datasets = {str(n): prepare_synthetic(n, work) for n in args.sizes}
        configs = {str(n): rgb_config(args.steps, args.base_channels) for n in args.sizes}
        if args.digits_steps:
            datasets["digits"] = prepare_digits(work)
            configs["digits"] = {"steps": args.digits_steps, "warmup_steps": min(100, args.digits_steps - 1),
                                 "checkpoint_every": args.digits_steps, "sample_every": None,
                                 "num_sample_images": 10, "sample_steps": 2}
        out: dict[str, object] = {"machine": machine_info(), "steps": args.steps,
                                  "digits_steps": args.digits_steps,
                                  "rgb_config": rgb_config(args.steps, args.base_channels), "runs": {}}
        out["runs"] = {variant: {} for variant in trees}
        for name in datasets:  # the variants alternate, so that a change in the machine's load hits both
            for variant, tree in trees.items():
                out["runs"][variant][name] = measure(tree, datasets[name], configs[name], Path(tmp),
                                                     f"{variant}-{name}")
        out["goals"] = goals(out["runs"], args.sizes)
        out["machine_after"] = machine_info()
    atomic_write_text(args.out, json.dumps(out, indent=2) + "\n")
    logger.info("wrote %s: %s", args.out, out["goals"])


if __name__ == "__main__":
    main()
