"""Samplers against a Gaussian oracle and on a small trained digits model, ours beside diffusers'.

    python benchmarks/samplers.py [--train-seconds 180] [--skip-quality | --quality-only] [--threads N]

Part 1 (oracle). Data N(MU, S^2) has the exact noise predictor
E[eps | x_t] = sqrt(1 - a)(x_t - sqrt(a) mu) / (a s^2 + 1 - a). Every sampler (ours through
`diffusion_core.samplers`, diffusers' DDPMScheduler / DDIMScheduler / DPMSolverMultistepScheduler with
their default settings except clip_sample=False) gets that predictor and the SAME start noise, and we
report the relative error of the sample std, the mean error and the wall time, on the linear and cosine
schedules. A spacing study justifies the default grids (dpmpp_2m / ddim over time, quadratic, logsnr,
logsnr_skip, karras).

Part 2 (quality). A small UNet is trained for --train-seconds on sklearn digits with
`objective.training_loss`, then every sampler x steps draws the same seeds and labels; scores: a
LogisticRegression digit classifier trained on the real digits (mean max-confidence, entropy of the
predicted-class histogram, agreement with the requested label) and the mean distance to the nearest
real digit. Each row is scored without x0 clipping on both sides ("ours", "diffusers") and with x0
clamped to [-1, 1] ("ours_clip_x0", which LoadedModel.generate does by default; "diffusers_clip_sample",
diffusers' default for DDPM/DDIM). diffusers is a `bench` extra: the library never imports it.

Writes benchmarks/results/samplers.json (with machine info).
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import platform
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffusion_core.atomic_io import atomic_write_text
from diffusion_core.ema import EMA
from diffusion_core.guidance import NULL_LABEL
from diffusion_core.objective import ObjectiveConfig, training_loss
from diffusion_core.samplers import (
    SAMPLERS,
    SPACINGS,
    Denoiser,
    PerSampleNoise,
    first_timestep,
    sample,
)
from diffusion_core.schedule import NoiseSchedule

log = logging.getLogger("benchmarks.samplers")
RESULTS = Path(__file__).parent / "results" / "samplers.json"
MU, S = 0.3, 0.5
ORACLE_SHAPE = (64, 1, 32, 32)  # 65,536 scalars: std of the std estimate ~0.28%
OUR_STEPS = {"ddpm": [10, 20, 50, 100, 1000], "ddim": [10, 20, 50, 100], "dpmpp_2m": [5, 10, 20, 50, 100]}
QUALITY_STEPS = {"ddpm": [50, 250], "ddim": [10, 20, 50], "dpmpp_2m": [5, 10, 20]}
DIFFUSERS_NAMES = {
    "ddpm": "DDPMScheduler", "ddim": "DDIMScheduler", "dpmpp_2m": "DPMSolverMultistepScheduler",
}
DIFFUSERS_BETAS = {"linear": "linear", "cosine": "squaredcos_cap_v2"}

ModelFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor | None], torch.Tensor]


def machine_info() -> dict[str, Any]:
    return {
        "platform": platform.platform(),
        "python": platform.python_version(),
        "cpu_count": os.cpu_count(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "loadavg": os.getloadavg(),
    }


def gaussian_oracle(sched: NoiseSchedule, mu: float = MU, s: float = S) -> ModelFn:
    abar = sched.alphas_cumprod

    def model_fn(x: torch.Tensor, t: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        a = abar[t.long().cpu()].reshape(-1, *[1] * (x.ndim - 1)).to(x.dtype)
        return (1 - a).sqrt() * (x - a.sqrt() * mu) / (a * s * s + 1 - a)

    return model_fn


def start_noise(shape: tuple[int, ...]) -> torch.Tensor:
    """The start noise `sample(seeds=range(n))` uses, for driving diffusers from the same point."""
    return PerSampleNoise(range(shape[0]), shape[1:], torch.device("cpu")).draw()


# ------------------------------------------------------------------------------------- diffusers


def diffusers_scheduler(kind: str, schedule_name: str, clip: bool = False):
    import diffusers  # the `bench` extra

    cls = getattr(diffusers, DIFFUSERS_NAMES[kind])
    kwargs: dict[str, Any] = {"num_train_timesteps": 1000, "beta_schedule": DIFFUSERS_BETAS[schedule_name]}
    if kind in ("ddpm", "ddim"):
        kwargs["clip_sample"] = clip  # diffusers' default True clamps x0 to [-1, 1], like our clip_x0=1
    return cls(**kwargs)


def run_diffusers(kind: str, schedule_name: str, model_fn: ModelFn, x: torch.Tensor, steps: int,
                  labels: torch.Tensor | None = None, seed: int = 0, clip: bool = False) -> torch.Tensor:
    """diffusers' sampling loop: scheduler.step(model(x, t), t, x) over scheduler.timesteps."""
    sched = diffusers_scheduler(kind, schedule_name, clip)
    sched.set_timesteps(steps)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for t in sched.timesteps:
            t_batch = torch.full((x.shape[0],), int(t), dtype=torch.long)
            eps = model_fn(x, t_batch, labels)
            step_kwargs = {"generator": gen} if kind != "dpmpp_2m" else {}
            x = sched.step(eps, t, x, **step_kwargs).prev_sample
    return x


# -------------------------------------------------------------------------------------- part 1


def stats(x: torch.Tensor) -> dict[str, float]:
    return {"std_rel_err": x.std().item() / S - 1, "mean_err": x.mean().item() - MU}


def timed(fn: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - start


def oracle_rows(schedule_name: str) -> list[dict[str, Any]]:
    sched = NoiseSchedule.create(schedule_name, 1000)
    oracle = gaussian_oracle(sched)
    x_start = start_noise(ORACLE_SHAPE)
    rows = []
    full_chain = first_timestep(sched, "epsilon") + 1  # 996 on cosine: epsilon models start at t = 995
    for kind, step_list in OUR_STEPS.items():
        for steps in (min(n, full_chain) for n in step_list):
            ours, t_ours = timed(lambda: sample(oracle, ORACLE_SHAPE, sched, sampler=kind, steps=steps,  # noqa: B023
                                                seeds=list(range(ORACLE_SHAPE[0]))))
            theirs, t_theirs = timed(
                lambda: run_diffusers(kind, schedule_name, oracle, x_start, steps)  # noqa: B023
            )
            row = {"schedule": schedule_name, "sampler": kind, "steps": steps,
                   "ours": {**stats(ours), "seconds": t_ours},
                   "diffusers": {"scheduler": DIFFUSERS_NAMES[kind], **stats(theirs), "seconds": t_theirs}}
            better = abs(row["ours"]["std_rel_err"]) < abs(row["diffusers"]["std_rel_err"])
            row["ours_better_std"] = better
            rows.append(row)
            log.info("%s %-8s %4d steps: ours std %+.4f (%.2fs)  diffusers %+.4f (%.2fs)", schedule_name,
                     kind, steps, row["ours"]["std_rel_err"], t_ours, row["diffusers"]["std_rel_err"],
                     t_theirs)
    return rows


def deterministic_gain(sched: NoiseSchedule, fn, timesteps: list[int], s: float) -> float:
    """Exact std error of a deterministic sampler: the Gaussian flow is linear, so start at x = 1."""
    oracle = gaussian_oracle(sched, mu=0.0, s=s)
    x = torch.ones(1, 1, 1, 1, dtype=torch.float64)
    return fn(Denoiser(oracle, sched), x, timesteps, None, 0.0).item() / s - 1


def spacing_study() -> list[dict[str, Any]]:
    """Exact std errors (no sampling noise) of dpmpp_2m and ddim over grids, data std 0.1 .. 1."""
    rows = []
    for schedule_name in ("linear", "cosine"):
        sched = NoiseSchedule.create(schedule_name, 1000)
        first = first_timestep(sched, "epsilon")
        for kind, step_list in (("dpmpp_2m", (10, 20, 50)), ("ddim", (20, 50, 100))):
            for spacing, grid in SPACINGS.items():
                for steps in step_list:
                    ts = grid(sched, steps, first)
                    errs = {f"s={s}": deterministic_gain(sched, SAMPLERS[kind].fn, ts, s)
                            for s in (0.1, 0.25, 0.5, 1.0)}
                    rows.append({"schedule": schedule_name, "sampler": kind, "spacing": spacing,
                                 "steps": steps, "default": SAMPLERS[kind].spacing == spacing,
                                 "std_rel_err": errs})
    return rows


# -------------------------------------------------------------------------------------- part 2


def digits_tensors() -> tuple[torch.Tensor, torch.Tensor]:
    from sklearn.datasets import load_digits

    digits = load_digits()
    images = torch.tensor(digits.images, dtype=torch.float32).unsqueeze(1) / 16.0 * 2 - 1  # [-1, 1]
    return images, torch.tensor(digits.target, dtype=torch.long)


def train_digits_model(seconds: float, sched: NoiseSchedule) -> tuple[torch.nn.Module, int, float]:
    from diffusion_core.unet import UNet, UNetConfig

    torch.manual_seed(0)
    images, labels = digits_tensors()
    model = UNet(UNetConfig.digits_default(num_classes=10)).train()
    ema = EMA(model, decay=0.999)
    opt = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.0)
    gen = torch.Generator().manual_seed(0)
    objective = ObjectiveConfig()
    start, step, loss_value = time.perf_counter(), 0, math.nan
    while time.perf_counter() - start < seconds:
        idx = torch.randint(0, len(images), (128,), generator=gen)
        y = torch.where(torch.rand(128, generator=gen) < 0.1, NULL_LABEL, labels[idx])  # CFG dropout
        loss = training_loss(model, images[idx], sched, objective, labels=y, generator=gen)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        ema.update(model)
        step += 1
        loss_value = 0.98 * loss_value + 0.02 * loss.item() if step > 1 else loss.item()
        if step % 100 == 0:
            elapsed = time.perf_counter() - start
            log.info("train step %d loss %.4f (%.1f steps/s, %.0fs left)", step, loss_value, step / elapsed,
                     max(seconds - elapsed, 0))
    ema.copy_to(model)
    return model.eval(), step, loss_value


class DigitJudge:
    """LogisticRegression on the real digits (pixels in [0, 1]) and a nearest-neighbour index."""

    def __init__(self) -> None:
        from sklearn.datasets import load_digits
        from sklearn.linear_model import LogisticRegression

        digits = load_digits()
        self.real = digits.data / 16.0
        self.clf = LogisticRegression(max_iter=2000).fit(self.real, digits.target)

    def score(self, images: torch.Tensor, labels: torch.Tensor) -> dict[str, float]:
        x = ((images.clamp(-1, 1) + 1) / 2).reshape(len(images), -1).numpy()
        proba = self.clf.predict_proba(x)
        pred = proba.argmax(1)
        hist = np.bincount(pred, minlength=10) / len(pred)
        nn = np.sqrt(((x[:, None, :] - self.real[None, :, :]) ** 2).sum(-1)).min(1)
        return {
            "mean_max_confidence": float(proba.max(1).mean()),
            "class_entropy": float(-(hist[hist > 0] * np.log(hist[hist > 0])).sum()),
            "label_agreement": float((pred == labels.numpy()).mean()),
            "nn_distance": float(nn.mean()),
        }


def quality_rows(seconds: float) -> dict[str, Any]:
    sched = NoiseSchedule.create("cosine", 1000)
    model, steps_trained, final_loss = train_digits_model(seconds, sched)
    judge = DigitJudge()
    n = 100
    labels = torch.arange(n) % 10
    shape = (n, 1, 8, 8)
    x_start = start_noise(shape)
    real_images, real_labels = digits_tensors()
    rows = [{"sampler": "real data", **judge.score(real_images[:n], real_labels[:n])}]
    for kind, step_list in QUALITY_STEPS.items():
        for steps in step_list:
            ours, t_ours = timed(lambda: sample(model, shape, sched, sampler=kind, steps=steps,  # noqa: B023
                                                seeds=list(range(n)), labels=labels))
            theirs, t_theirs = timed(
                lambda: run_diffusers(kind, "cosine", model, x_start, steps, labels)  # noqa: B023
            )
            row = {"sampler": kind, "steps": steps,
                   "ours": {**judge.score(ours, labels), "seconds": t_ours},
                   "diffusers": {**judge.score(theirs, labels), "seconds": t_theirs}}
            # x0 clamped to the data range [-1, 1]: LoadedModel.generate's default ("auto"), and
            # diffusers' default for DDPM/DDIM (DPMSolverMultistep has no static clip).
            ours_clip = sample(model, shape, sched, sampler=kind, steps=steps, seeds=list(range(n)),
                               labels=labels, clip_x0=1.0)
            row["ours_clip_x0"] = judge.score(ours_clip, labels)
            if kind in ("ddpm", "ddim"):
                theirs_clip = run_diffusers(kind, "cosine", model, x_start, steps, labels, clip=True)
                row["diffusers_clip_sample"] = judge.score(theirs_clip, labels)
            rows.append(row)
            log.info("quality %s %d: ours %s | diffusers %s", kind, steps, rows[-1]["ours"],
                     rows[-1]["diffusers"])
    return {"train_seconds": seconds, "train_steps": steps_trained, "final_loss_ema": final_loss,
            "schedule": "cosine", "num_samples": n, "rows": rows}


# ---------------------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--train-seconds", type=float, default=180.0)
    parser.add_argument("--skip-quality", action="store_true")
    parser.add_argument("--quality-only", action="store_true", help="rerun part 2, keep part 1 of the JSON")
    parser.add_argument("--threads", type=int, default=None)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s")
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.quality_only:
        result = {**json.loads(RESULTS.read_text()), "machine_quality": machine_info()}
    else:
        result = {"machine": machine_info(), "oracle": {"mu": MU, "s": S, "shape": ORACLE_SHAPE}}
        result["oracle"]["rows"] = oracle_rows("linear") + oracle_rows("cosine")
        result["spacing_study"] = spacing_study()
        atomic_write_text(RESULTS, json.dumps(result, indent=2))
    if not args.skip_quality:
        result["quality"] = quality_rows(args.train_seconds)
    result["machine"]["loadavg_end"] = os.getloadavg()
    atomic_write_text(RESULTS, json.dumps(result, indent=2))
    log.info("wrote %s", RESULTS)


if __name__ == "__main__":
    main()
