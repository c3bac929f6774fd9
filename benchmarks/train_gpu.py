"""GPU training throughput: the Ray Train path with use_gpu=True (NCCL backend), with and without
bf16 autocast and channels_last.

    PYTHONPATH=. python benchmarks/train_gpu.py [--steps 3000] [--batch-size 512] [--num-workers 1]
        [--compile] [--variants fp32 bf16 bf16-channels-last]

Prepares the built-in digits in a temp dir, trains with the default model for `--steps` steps per
variant (about a minute each on one H100/H200) and writes benchmarks/results/train_gpu.json with
images/s per variant, the device name and machine info. MLflow goes to a SQLite store in the temp
dir: no server needed. Exits with status 2 and a clear message on a machine without a CUDA GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results" / "train_gpu.json"
logger = logging.getLogger("benchmarks.train_gpu")
# TrainConfig fields of each variant.
VARIANTS = {
    "fp32": {"precision": "fp32", "channels_last": False},
    "bf16": {"precision": "bf16", "channels_last": False},
    "fp32-channels-last": {"precision": "fp32", "channels_last": True},
    "bf16-channels-last": {"precision": "bf16", "channels_last": True},
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=3000)
    parser.add_argument("--batch-size", type=int, default=512)
    parser.add_argument("--num-workers", type=int, default=1)
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--variants", nargs="+", choices=sorted(VARIANTS),
                        default=["fp32", "bf16", "bf16-channels-last"])
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.stderr.write("benchmarks/train_gpu.py needs a CUDA GPU; torch sees none on this machine "
                         f"(torch {torch.__version__}). Run it on a GPU node.\n")
        sys.exit(2)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import ray

    from diffusion_core.adapters.ray_train import run_training
    from diffusion_core.atomic_io import atomic_write_text
    from diffusion_core.data.config import PrepareConfig
    from diffusion_core.data.prepare import prepare
    from diffusion_core.training import TrainConfig

    runs: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = prepare(PrepareConfig(source="digits", output=f"{tmp}/digits")).uri
        ray.init(num_gpus=torch.cuda.device_count(), include_dashboard=False, configure_logging=False)
        try:
            for name in args.variants:
                config = TrainConfig(
                    dataset=dataset, storage_path=f"{tmp}/ray", tracking_uri=f"sqlite:///{tmp}/mlflow.db",
                    run_name=f"gpu-bench-{name}", use_gpu=True, compile=args.compile,
                    num_workers=args.num_workers, cpus_per_worker=2, batch_size=args.batch_size,
                    steps=args.steps, checkpoint_every=args.steps, log_every=200, **VARIANTS[name],
                )
                start = time.perf_counter()
                result = run_training(config)
                runs[name] = {
                    **VARIANTS[name], "steps": result.metrics["step"],
                    "train_seconds": round(result.metrics["train_seconds"], 1),
                    "images_per_s": round(result.metrics["images_per_s"], 1),
                    "wall_seconds_including_startup": round(time.perf_counter() - start, 1),
                }
                logger.info("%s: %s", name, runs[name])
        finally:
            ray.shutdown()
    out = {
        "device": torch.cuda.get_device_name(0), "num_workers": args.num_workers, "compile": args.compile,
        "batch_size": args.batch_size, "runs": runs,
        "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
                    "cuda": torch.version.cuda, "loadavg": os.getloadavg()},
    }
    atomic_write_text(RESULTS, json.dumps(out, indent=2) + "\n")
    logger.info("wrote %s: %s", RESULTS, {name: run["images_per_s"] for name, run in runs.items()})


if __name__ == "__main__":
    main()
