"""Training throughput and quality: Ray Train with 1 and 2 workers, and a plain diffusers loop.

    python -m benchmarks.train [--steps-2w 300] [--skip-diffusers]

1. The DEFAULT TrainConfig on the built-in digits (one worker, placed as `run` places it on this
   machine: every core, `ray_cluster.local_worker_cpus`): wall time (start-up included),
   images/s, and the quality of 1,000 EMA samples (dpmpp_2m, 20 steps) judged by a digit
   classifier (benchmarks/train_quality.py).
2. The same with two workers for a shorter run: images/s.
3. Side by side: a plain PyTorch loop with diffusers' UNet2DModel + DDPMScheduler (cosine betas) of
   a similar parameter count, on the same data, batch size, optimiser and LR schedule, for the same
   training time as run 1; sampled with diffusers' DPMSolverMultistepScheduler (DPM-Solver++(2M)),
   20 steps, and judged the same way. diffusers is the `bench` extra; the library never imports it.

Ray is started as `run` starts it, with one logical CPU more than the machine has
(`ray_cluster.local_cluster_cpus`): Ray Data's read tasks need a free CPU while the training
workers hold theirs (they read one shuffle window at a time, a small share of the time on this
dataset).
Writes benchmarks/results/train.json with machine info.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from benchmarks.train_quality import DigitJudge
from diffusion_core.adapters.ray_cluster import local_cluster_cpus, local_worker_cpus
from diffusion_core.adapters.ray_data import decode_batch, row_group_rows
from diffusion_core.adapters.ray_train import run_training
from diffusion_core.atomic_io import atomic_write_text
from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.data.config import PrepareConfig
from diffusion_core.data.manifest import read_manifest
from diffusion_core.data.prepare import prepare
from diffusion_core.data.readers import read_split_table
from diffusion_core.data_order import stream_row_indices
from diffusion_core.ema import EMA
from diffusion_core.training import TrainConfig, lr_factor, training_windows
from diffusion_core.unet import count_parameters

logger = logging.getLogger("benchmarks.train")
RESULTS = Path(__file__).parent / "results" / "train.json"
NUM_SAMPLES = 1000


def machine_info() -> dict[str, object]:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "loadavg": os.getloadavg()}


def ray_run(config: TrainConfig) -> tuple[dict, str]:
    start = time.perf_counter()
    result = run_training(config)
    wall = time.perf_counter() - start
    m = result.metrics
    return {"wall_seconds_including_startup": round(wall, 1), "train_seconds": round(m["train_seconds"], 1),
            "images_per_s": round(m["images_per_s"], 1), "steps": m["step"],
            "num_workers": config.num_workers}, result.checkpoint_path


def judge_ours(judge: DigitJudge, checkpoint: str) -> dict[str, object]:
    loaded = load_checkpoint(checkpoint)
    seeds = list(range(NUM_SAMPLES))
    out: dict[str, object] = {}
    with torch.no_grad():
        uncond = loaded.generate(NUM_SAMPLES, steps=20, sampler="dpmpp_2m", seeds=seeds, unconditional=True)
        out["unconditional"] = judge.score(uncond.numpy())
        labels = [i % 10 for i in seeds]
        for scale in (1.0, 2.0):
            cond = loaded.generate(NUM_SAMPLES, steps=20, sampler="dpmpp_2m", seeds=seeds, labels=labels,
                                   guidance_scale=scale)
            out[f"conditional_guidance_{scale:g}"] = judge.score(cond.numpy(), np.array(labels))
    out["params"] = count_parameters(loaded.model)
    return out


def train_data(dataset: str) -> torch.Tensor:
    table, manifest = read_split_table(dataset, "train")
    images, _ = decode_batch({c: table.column(c).to_numpy(zero_copy_only=False)
                              for c in ("image", "label")}, manifest)
    return images


def worker_order(config: TrainConfig, dataset: str, steps: int) -> torch.Tensor:
    """Row indices of `steps` batches in the order one Ray Train worker reads them (data_order)."""
    manifest = read_manifest(dataset)
    longer = config.model_copy(update={"steps": steps})
    windows = training_windows(longer, math.prod(manifest.image_shape), row_group_rows(dataset, "train"),
                               rank=0, world=1, start_step=0)
    return torch.from_numpy(stream_row_indices(windows))


@dataclass
class DiffusersBaseline:
    """The baseline after training: its EMA UNet, the DDPM scheduler it was trained with, and the
    training figures (params, steps, train_seconds, images_per_s)."""

    unet: torch.nn.Module
    ddpm: object
    figures: dict[str, object]


def train_diffusers_baseline(config: TrainConfig, dataset: str, seconds: float) -> DiffusersBaseline:
    """Plain loop with diffusers' UNet2DModel + DDPMScheduler (cosine betas) for `seconds` of
    training, on the data order, batch size, optimiser, LR schedule and EMA of `config`."""
    from diffusers import DDPMScheduler, UNet2DModel

    torch.manual_seed(config.seed)
    torch.set_num_threads(max(1, math.floor(config.cpus_per_worker)))
    unet = UNet2DModel(sample_size=8, in_channels=1, out_channels=1, block_out_channels=(32, 64),
                       layers_per_block=2, down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"), norm_num_groups=8,
                       attention_head_dim=16)
    ddpm = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    images = train_data(dataset)
    order = worker_order(config, dataset, steps=10 * config.steps)  # more than `seconds` allow
    opt = torch.optim.AdamW(unet.parameters(), lr=config.lr, betas=config.adam_betas)
    ema = EMA(unet, decay=config.ema_decay)
    step, start = 0, time.perf_counter()
    while time.perf_counter() - start < seconds:
        for group in opt.param_groups:
            group["lr"] = config.lr * lr_factor(step, config.warmup_steps, config.steps, config.min_lr_ratio)
        x0 = images[order[step * config.batch_size : (step + 1) * config.batch_size]]
        noise = torch.randn_like(x0)
        t = torch.randint(0, 1000, (x0.shape[0],))
        loss = torch.nn.functional.mse_loss(unet(ddpm.add_noise(x0, noise, t), t).sample, noise)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(unet.parameters(), config.grad_clip or float("inf"))
        opt.step()
        ema.update(unet)
        step += 1
    elapsed = time.perf_counter() - start
    figures = {"params": count_parameters(unet), "steps": step, "train_seconds": round(elapsed, 1),
               "images_per_s": round(step * config.batch_size / elapsed, 1)}
    return DiffusersBaseline(unet=ema.averaged_model(unet).eval(), ddpm=ddpm, figures=figures)


def diffusers_baseline(config: TrainConfig, dataset: str, seconds: float, judge: DigitJudge) -> dict:
    """The baseline trained for `seconds`, sampled with DPM-Solver++(2M) at 20 steps and judged."""
    from diffusers import DPMSolverMultistepScheduler

    baseline = train_diffusers_baseline(config, dataset, seconds)
    scheduler = DPMSolverMultistepScheduler.from_config(baseline.ddpm.config)
    samples = diffusers_sample(baseline.unet, scheduler, NUM_SAMPLES, steps=20)
    return {**baseline.figures, "unconditional": judge.score(samples.numpy())}


@torch.no_grad()
def diffusers_sample(unet: torch.nn.Module, scheduler, num_images: int, steps: int,
                     seed: int = 0) -> torch.Tensor:
    """(num_images, 1, 8, 8) samples in [0, 1] with a diffusers scheduler at `steps` steps, from
    one seeded generator (the initial noise, and the noise of stochastic schedulers such as DDPM)."""
    scheduler.set_timesteps(steps)
    generator = torch.Generator().manual_seed(seed)
    x = torch.randn(num_images, 1, 8, 8, generator=generator)
    for t in scheduler.timesteps:
        x = scheduler.step(unet(x, t).sample, t, x, generator=generator).prev_sample
    return (x.clamp(-1, 1) + 1) / 2


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps-2w", type=int, default=300, help="steps of the two-worker run")
    parser.add_argument("--skip-diffusers", action="store_true")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import ray

    judge = DigitJudge()
    out: dict[str, object] = {
        "machine": machine_info(), "classifier_heldout_accuracy": judge.heldout_accuracy,
        "real_digits_reference": judge.real_reference(),
    }
    with tempfile.TemporaryDirectory() as tmp:
        dataset = prepare(PrepareConfig(source="digits", output=f"{tmp}/digits")).uri
        common = {"dataset": dataset, "storage_path": f"{tmp}/ray", "tracking_uri": f"sqlite:///{tmp}/mlflow.db"}
        ray.init(num_cpus=local_cluster_cpus(), include_dashboard=False, configure_logging=False)
        try:
            default = TrainConfig(**common, run_name="bench-default", cpus_per_worker=local_worker_cpus(1))
            out["default_config"] = default.model_dump(mode="json")
            out["ray_1_worker_default"], checkpoint = ray_run(default)
            out["ray_1_worker_default"]["quality"] = judge_ours(judge, checkpoint)
            two = TrainConfig(**common, run_name="bench-2w", num_workers=2,
                              cpus_per_worker=local_worker_cpus(2), steps=args.steps_2w)
            out["ray_2_workers"], _ = ray_run(two)
        finally:
            ray.shutdown()
        if not args.skip_diffusers:
            seconds = out["ray_1_worker_default"]["train_seconds"]
            out["diffusers_baseline"] = diffusers_baseline(default, dataset, seconds, judge)
    out["machine_after"] = machine_info()
    atomic_write_text(RESULTS, json.dumps(out, indent=2) + "\n")
    logger.info("wrote %s", RESULTS)


if __name__ == "__main__":
    main()
