"""GPU check of the training and sampling code paths that Ray Train workers and Serve replicas run.

    PYTHONPATH=. python benchmarks/train_gpu_core.py [--seconds 12] [--out PATH.json]

Runs without Ray (the lent GPU machine has no Ray and its wheel is too large to carry), calling
exactly what `train_loop_per_worker` calls on a GPU worker: `build_train_state` on CUDA,
`train_step` with bf16 autocast (precision="bf16") and fp32 for comparison, wrapped in DDP over a
one-rank NCCL process group (the backend ray_train selects when use_gpu=True). Then it trains the
default digits model for a short while on the real digits, samples from its EMA on the GPU
(dpmpp_2m, 20 steps), checks batch invariance of sampling with TF32 on and off, and round-trips a
checkpoint saved from CUDA. Writes one JSON with images/s per configuration.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffusion_core.atomic_io import atomic_write_text
from diffusion_core.checkpoint import DataSpec, ModelSpec, load_checkpoint, save_checkpoint
from diffusion_core.training import TrainConfig, build_train_state, train_step
from diffusion_core.unet import UNetConfig, count_parameters

RESULTS = Path(__file__).parent / "results" / "train_gpu_core.json"


def digits_tensors(device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """sklearn's 8x8 digits in [-1, 1], (1797, 1, 8, 8), and labels."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 8.0 - 1.0
    return images.to(device), torch.tensor(digits.target, dtype=torch.int64).to(device)


def ddp_wrap(model: torch.nn.Module) -> torch.nn.Module:
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[torch.cuda.current_device()])


def throughput(config: TrainConfig, images: torch.Tensor, labels: torch.Tensor | None,
               seconds: float) -> dict[str, float]:
    """Steps for `seconds` on random batches of `images`; images/s after a warm-up."""
    state = build_train_state(config, "cuda")
    model = ddp_wrap(state.model)
    gen = torch.Generator(device="cuda").manual_seed(0)
    batch = config.batch_size

    def one_step() -> float:
        idx = torch.randint(0, images.shape[0], (batch,), device="cuda", generator=gen)
        return train_step(state, config, images[idx], None if labels is None else labels[idx],
                          model=model).loss

    for _ in range(10):
        one_step()
    torch.cuda.synchronize()
    steps, start, loss = 0, time.perf_counter(), float("nan")
    while time.perf_counter() - start < seconds:
        loss = one_step()
        steps += 1
    torch.cuda.synchronize()
    elapsed = time.perf_counter() - start
    return {"steps": steps, "seconds": round(elapsed, 2), "images_per_s": round(steps * batch / elapsed, 1),
            "last_loss": round(loss, 4), "params": count_parameters(state.model)}


def batch_invariance(loaded, tf32: bool) -> float:
    torch.backends.cuda.matmul.allow_tf32 = tf32
    torch.backends.cudnn.allow_tf32 = tf32
    alone = loaded.generate(4, steps=20, seeds=[1, 2, 3, 4], labels=[1, 2, 3, 4])
    mixed = loaded.generate(64, steps=20, seeds=[1, 2, 3, 4, *range(100, 160)],
                            labels=[1, 2, 3, 4, *([7] * 60)])[:4]
    return float((alone - mixed).abs().max())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=12.0, help="timed seconds per configuration")
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    if not torch.cuda.is_available():
        sys.stderr.write("train_gpu_core.py needs a CUDA GPU; torch sees none here.\n")
        sys.exit(2)
    os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
    os.environ.setdefault("MASTER_PORT", "29531")
    torch.distributed.init_process_group("nccl", rank=0, world_size=1)
    images, labels = digits_tensors(torch.device("cuda"))
    rgb32 = torch.randn(4096, 3, 32, 32, device="cuda").clamp(-1, 1)
    results: dict[str, object] = {
        "device": torch.cuda.get_device_name(), "torch": torch.__version__,
        "python": platform.python_version(), "backend": torch.distributed.get_backend(),
        "note": "no Ray on the GPU machine: the core train_step in one-rank NCCL DDP",
    }
    runs = {}
    for precision in ("fp32", "bf16"):
        digits_cfg = TrainConfig(dataset="digits(in-memory)", precision=precision, batch_size=512,
                                 steps=100_000, warmup_steps=10)
        runs[f"digits_default_b512_{precision}"] = throughput(digits_cfg, images, labels, args.seconds)
        rgb_cfg = TrainConfig(dataset="random(in-memory)", precision=precision, batch_size=256, steps=100_000,
                              unet=UNetConfig(image_size=32, in_channels=3), warmup_steps=10)
        runs[f"rgb32_b256_{precision}"] = throughput(rgb_cfg, rgb32, None, args.seconds)
        sys.stderr.write(f"{precision}: {json.dumps(runs)}\n")
    results["throughput"] = runs

    # Train the default digits model briefly (bf16), then sample from its EMA on the GPU.
    cfg = TrainConfig(dataset="digits(in-memory)", precision="bf16", batch_size=256, steps=600, lr=2e-3)
    state = build_train_state(cfg, "cuda")
    model = ddp_wrap(state.model)
    gen = torch.Generator(device="cuda").manual_seed(1)
    start = time.perf_counter()
    for _ in range(cfg.steps):
        idx = torch.randint(0, images.shape[0], (cfg.batch_size,), device="cuda", generator=gen)
        last = train_step(state, cfg, images[idx], labels[idx], model=model)
    results["digits_600_steps_bf16"] = {"seconds": round(time.perf_counter() - start, 1),
                                         "final_loss": round(last.loss, 4)}
    spec = ModelSpec(unet=cfg.unet, schedule=cfg.schedule, objective=cfg.objective,
                     data=DataSpec(image_size=8, channels=1, label_names=[str(i) for i in range(10)]))
    with tempfile.TemporaryDirectory() as tmp:
        save_checkpoint(Path(tmp) / "ckpt", state.model, spec, ema=state.ema)
        loaded = load_checkpoint(Path(tmp) / "ckpt", device="cuda")
        t0 = time.perf_counter()
        samples = loaded.generate(1000, steps=20, seeds=list(range(1000)),
                                  labels=[i % 10 for i in range(1000)])
        torch.cuda.synchronize()
        results["sample_1000_dpmpp_2m_20"] = {"seconds": round(time.perf_counter() - t0, 2),
                                              "finite": bool(np.isfinite(samples.numpy()).all()),
                                              "min": float(samples.min()), "max": float(samples.max())}
        results["batch_invariance_max_abs"] = {"tf32_on": batch_invariance(loaded, True),
                                               "tf32_off": batch_invariance(loaded, False)}
        cpu = load_checkpoint(Path(tmp) / "ckpt", device="cpu")
        results["cuda_checkpoint_loads_on_cpu"] = all(
            torch.equal(a.cpu(), b) for a, b in zip(loaded.model.state_dict().values(),
                                                    cpu.model.state_dict().values(), strict=True))
    torch.distributed.destroy_process_group()
    atomic_write_text(args.out, json.dumps(results, indent=2) + "\n")
    sys.stdout.write(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
