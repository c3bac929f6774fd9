"""Time one training step (forward + backward + Adam) of UNet configurations on this machine.

    python benchmarks/unet_step.py [--batch 128] [--steps 10] [--threads N]

Writes benchmarks/results/unet_step.json with the timings and machine info.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import time
from pathlib import Path

import torch

from diffusion_core.atomic_io import atomic_write_text
from diffusion_core.unet import UNet, UNetConfig, count_parameters

logger = logging.getLogger("benchmarks.unet_step")
RESULTS = Path(__file__).parent / "results" / "unet_step.json"


def candidates() -> dict[str, UNetConfig]:
    digits = UNetConfig.digits_default().model_dump()
    return {
        "digits_default": UNetConfig(**digits),
        "digits_base48_1block": UNetConfig(**{**digits, "base_channels": 48, "num_res_blocks": 1}),
        "digits_base64": UNetConfig(**{**digits, "base_channels": 64}),
    }


def time_step(cfg: UNetConfig, batch: int, steps: int, warmup: int = 2) -> float:
    """Mean seconds per forward + backward + Adam step at batch size `batch`."""
    torch.manual_seed(0)
    model = UNet(cfg).train()
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size)
    t = torch.randint(0, 1000, (batch,))
    labels = torch.randint(-1, cfg.num_classes, (batch,)) if cfg.num_classes else None
    for i in range(warmup + steps):
        if i == warmup:
            start = time.perf_counter()
        loss = (model(x, t, labels) - x).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return (time.perf_counter() - start) / steps


def machine_info() -> dict[str, object]:
    return {
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    results = {}
    for name, cfg in candidates().items():
        seconds = time_step(cfg, args.batch, args.steps)
        results[name] = {"params": count_parameters(UNet(cfg)), "seconds_per_step": seconds,
                         "config": cfg.model_dump(mode="json")}
        logger.info("%-22s %9d params  %.3f s/step at batch %d", name, results[name]["params"], seconds,
                    args.batch)
    payload = {"batch": args.batch, "steps": args.steps, "machine": machine_info(), "results": results}
    atomic_write_text(RESULTS, json.dumps(payload, indent=2))
    logger.info("wrote %s", RESULTS)


if __name__ == "__main__":
    main()
