"""GPU check of the denoiser stack: UNet fp32 / bf16-autocast steps, per-sample independence, EMA,
a checkpoint saved from and loaded onto CUDA, and generate() on CUDA.

    python benchmarks/unet_gpu_check.py [--out benchmarks/results/unet_gpu_check.json]

Needs a CUDA device; writes a JSON report with timings and machine info.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from diffusion_core.atomic_io import atomic_write_text
from diffusion_core.checkpoint import DataSpec, ModelSpec, load_checkpoint, save_checkpoint
from diffusion_core.ema import EMA
from diffusion_core.objective import ObjectiveConfig
from diffusion_core.schedule import ScheduleConfig
from diffusion_core.unet import UNet, UNetConfig, count_parameters

logger = logging.getLogger("benchmarks.unet_gpu_check")


def configs() -> dict[str, UNetConfig]:
    return {
        "digits_default": UNetConfig.digits_default(),
        "rgb32_default": UNetConfig(image_size=32, num_classes=10),
        "rgb64": UNetConfig(
            image_size=64, channel_mult=(1, 2, 2, 2), attention_resolutions=(16, 8), num_classes=10
        ),
    }


def step_seconds(cfg: UNetConfig, batch: int, dtype: torch.dtype | None, steps: int = 20) -> float:
    """Mean seconds per forward + backward + AdamW step on CUDA (bf16 autocast when dtype is set)."""
    torch.manual_seed(0)
    model = UNet(cfg).cuda().train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
    x = torch.randn(batch, cfg.in_channels, cfg.image_size, cfg.image_size, device="cuda")
    t = torch.randint(0, 1000, (batch,), device="cuda")
    labels = torch.randint(-1, cfg.num_classes, (batch,), device="cuda") if cfg.num_classes else None
    for i in range(steps + 3):
        if i == 3:
            torch.cuda.synchronize()
            start = time.perf_counter()
        with torch.autocast("cuda", dtype=dtype or torch.float32, enabled=dtype is not None):
            loss = (model(x, t, labels).float() - x).pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    torch.cuda.synchronize()
    assert torch.isfinite(loss), f"non-finite loss for {cfg}"
    return (time.perf_counter() - start) / steps


def batch_independence(cfg: UNetConfig) -> dict[str, float]:
    """max |out_a[0] - out_b[0]| when the other samples of the batch change (fp32, TF32 on and off)."""
    torch.manual_seed(0)
    model = UNet(cfg).cuda().eval()
    with torch.no_grad():
        for p in model.parameters():
            if not p.any():
                p.normal_(0, 0.05)
    x = torch.randn(64, cfg.in_channels, cfg.image_size, cfg.image_size, device="cuda")
    t = torch.randint(0, 1000, (64,), device="cuda")
    labels = torch.randint(-1, cfg.num_classes, (64,), device="cuda") if cfg.num_classes else None
    result = {}
    for tf32 in (True, False):
        torch.backends.cudnn.allow_tf32 = tf32
        torch.backends.cuda.matmul.allow_tf32 = tf32
        with torch.no_grad():
            full = model(x, t, labels)[0]
            single = model(x[:1], t[:1], None if labels is None else labels[:1])[0]
        result[f"tf32_{tf32}"] = (full - single).abs().max().item()
    torch.backends.cudnn.allow_tf32 = True
    torch.backends.cuda.matmul.allow_tf32 = False
    return result


def checkpoint_round_trip() -> dict[str, object]:
    """Save from a CUDA model + EMA, load onto CUDA: bit-exact weights; generate() shape and range."""
    cfg = UNetConfig.digits_default()
    spec = ModelSpec(unet=cfg, schedule=ScheduleConfig(), objective=ObjectiveConfig(),
                     data=DataSpec(image_size=8, channels=1, label_names=[str(i) for i in range(10)]))
    model = UNet(cfg).cuda()
    ema = EMA(model, decay=0.9)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    ema.update(model)
    with tempfile.TemporaryDirectory() as tmp:
        path = save_checkpoint(Path(tmp) / "ckpt", model, spec, ema=ema)
        raw = load_checkpoint(path, use_ema=False, device="cuda")
        averaged = load_checkpoint(path, device="cuda")
    raw_exact = all(torch.equal(v, model.state_dict()[k]) for k, v in raw.model.state_dict().items())
    ema_exact = all(torch.equal(v, ema.shadow[k]) for k, v in averaged.model.state_dict().items())
    start = time.perf_counter()
    images = averaged.generate(256, steps=20, seeds=list(range(256)), labels=[i % 10 for i in range(256)],
                               guidance_scale=2.0)
    seconds = time.perf_counter() - start
    return {"raw_bit_exact": raw_exact, "ema_bit_exact": ema_exact, "device": str(averaged.device),
            "generate_shape": list(images.shape), "generate_min": images.min().item(),
            "generate_max": images.max().item(), "generate_256_images_20_steps_s": seconds}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--out", default="benchmarks/results/unet_gpu_check.json")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    report: dict[str, object] = {"machine": {
        "platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
        "gpu": torch.cuda.get_device_name(0), "loadavg": os.getloadavg()}}
    for name, cfg in configs().items():
        entry = {"params": count_parameters(UNet(cfg))}
        for batch in (128,):
            entry[f"fp32_b{batch}_s"] = step_seconds(cfg, batch, None)
            entry[f"bf16_b{batch}_s"] = step_seconds(cfg, batch, torch.bfloat16)
        entry["batch_independence_max_abs"] = batch_independence(cfg)
        report[name] = entry
        logger.info("%s: %s", name, entry)
    report["checkpoint"] = checkpoint_round_trip()
    logger.info("checkpoint: %s", report["checkpoint"])
    atomic_write_text(args.out, json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
