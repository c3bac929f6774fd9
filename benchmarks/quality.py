"""Sample quality per CPU-minute, side by side: ours against the diffusers baseline, in one run.

    python -m benchmarks.quality            # the measurement (about 13-16 min on 2 quiet cores:
                                            # 8 of training, 4 of the DDPM-1000 set, 3 of the rest)
    python -m benchmarks.quality --quick    # a smoke test at tiny settings (not a measurement)

1. Ours: the DEFAULT TrainConfig on the built-in digits, one Ray Train worker on every core (as
   `run` places it on this machine; benchmarks/train.py's run), sampled as users request it:
   - `default`: a request without labels, what the service returns by default (each image's class
     drawn from the training split's class prior by its seed: the marginal p(x));
   - `null_label`: explicitly unconditional requests (the null class embedding);
   - `conditional`: labels 0..9 in turn, guidance 1;
   each with ddim and dpmpp_2m at 10 and 20 steps.
2. The diffusers UNet2DModel loop of similar size (benchmarks/train.py's baseline, the same data
   order, batch, optimiser, schedule, EMA and torch threads) trained for the same wall-clock time as
   ours, sampled with diffusers' DDIM and DPM-Solver++(2M) at 10 and 20 steps and its DDPM at 1000
   steps.
3. Every sample set is scored like the promotion gate scores a model (diffusion_core.metrics:
   the project's FD in the digits classifier's feature space, k-NN precision/recall,
   memorisation against the training split) and timed: seconds to generate `--images` images with
   all CPU threads. The DDPM-1000 row is sampled on `--ddpm-images` images (1000 network calls per
   image); every row also reports `fd_subset`, its FD on its first `--ddpm-images` images, the
   number to compare with that row (an FD's bias depends on the sample count).
4. The evaluation's own cost: seconds of `evaluate_model` on our model with the default EvalConfig,
   headline only against all passes (null label, guidance 2, memorisation): what the extra
   evaluations add to `diffusion-pipeline run`.

Writes benchmarks/results/quality.json (--quick: quality_quick.json in the temporary folder).
"""

from __future__ import annotations

import argparse
import json
import logging
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch

from benchmarks.train import diffusers_sample, machine_info, ray_run, train_diffusers_baseline
from diffusion_core.adapters.ray_cluster import local_cluster_cpus, local_worker_cpus, machine_cpus
from diffusion_core.atomic_io import atomic_write_text
from diffusion_core.checkpoint import LoadedModel, load_checkpoint
from diffusion_core.data.config import PrepareConfig
from diffusion_core.data.prepare import prepare
from diffusion_core.metrics import (
    EvalConfig,
    Scorer,
    evaluate_model,
    feature_check,
    feature_extractor_for,
    reference_from_dataset,
)
from diffusion_core.metrics_features import FeatureNetConfig
from diffusion_core.training import TrainConfig

logger = logging.getLogger("benchmarks.quality")
RESULTS_DIR = Path(__file__).parent / "results"
SAMPLERS = ("ddim", "dpmpp_2m")
STEP_COUNTS = (10, 20)
DDPM_STEPS = 1000
SEED = 0
DPMSOLVER_LAMBDA_MIN = -5.1  # as in diffusers#3314, which added the clip for cosine-schedule models


def timed(generate: Callable[[], torch.Tensor]) -> tuple[torch.Tensor, float]:
    start = time.perf_counter()
    with torch.no_grad():
        images = generate()
    return images, time.perf_counter() - start


class Bench:
    """Scores and times sample sets against one reference, one feature network."""

    def __init__(self, scorer: Scorer, num_images: int, subset: int) -> None:
        self.scorer, self.num_images, self.subset = scorer, num_images, subset

    def row(self, name: str, generate: Callable[[int], torch.Tensor], num_images: int | None = None,
            labels: torch.Tensor | None = None) -> dict[str, object]:
        """Generate `num_images` (default: --images) with generate(n), time it, score it."""
        n = num_images or self.num_images
        images, seconds = timed(lambda: generate(n))
        scores = self.scorer.score(images, None if labels is None else labels[:n])
        subset = self.scorer.score(images[:self.subset], None if labels is None else labels[:self.subset])
        row = {"num_images": n, "seconds": round(seconds, 2),
               "seconds_per_900_images": round(seconds * 900 / n, 2),
               **{k: round(v, 4) for k, v in scores.scalars().items()}, "fd_subset": round(subset.fd, 4)}
        logger.info("%-40s %s", name, row)
        return row


def our_rows(bench: Bench, loaded: LoadedModel) -> dict[str, dict[str, object]]:
    """Default (marginal), null-label and conditional requests, each sampler x step count."""
    rows: dict[str, dict[str, object]] = {}
    seeds = list(range(SEED, SEED + bench.num_images))
    balanced = [i % 10 for i in range(bench.num_images)]
    drawn = torch.tensor(loaded.default_labels(seeds))
    requests = {"default": ({}, drawn), "null_label": ({"unconditional": True}, None),
                "conditional": ({"labels": balanced}, torch.tensor(balanced))}
    for request, (kwargs, labels) in requests.items():
        for sampler in SAMPLERS:
            for steps in STEP_COUNTS:
                def generate(n: int, kwargs=kwargs, sampler=sampler, steps=steps) -> torch.Tensor:
                    extra = {k: (v[:n] if k == "labels" else v) for k, v in kwargs.items()}
                    return loaded.generate(n, steps=steps, sampler=sampler, seeds=seeds[:n], **extra)
                name = f"ours/{request}/{sampler}/{steps}"
                rows[name] = bench.row(name, generate, labels=labels)
    return rows


def baseline_rows(bench: Bench, unet: torch.nn.Module, ddpm, ddpm_images: int,
                  ddpm_steps: int = DDPM_STEPS) -> dict[str, dict[str, object]]:
    """diffusers DDIM and DPM-Solver++(2M) at 10 and 20 steps, DDPM at `ddpm_steps` (1000: the
    schedule it was trained on, every step)."""
    from diffusers import DDIMScheduler, DDPMScheduler, DPMSolverMultistepScheduler

    # DPM-Solver++ on the cosine schedule needs diffusers' lambda_min_clipped ("critical for the
    # cosine noise schedule", its docs): unclipped, the second-order update takes x0_hat from
    # t = 999, where alpha ~ 0 multiplies the eps error by sigma / alpha, and samples are noise.
    schedulers = {"ddim": lambda: DDIMScheduler.from_config(ddpm.config),
                  "dpmpp_2m": lambda: DPMSolverMultistepScheduler.from_config(
                      ddpm.config, lambda_min_clipped=DPMSOLVER_LAMBDA_MIN)}
    rows: dict[str, dict[str, object]] = {}
    for sampler, scheduler in schedulers.items():
        for steps in STEP_COUNTS:
            def generate(n: int, scheduler=scheduler, steps=steps) -> torch.Tensor:
                return diffusers_sample(unet, scheduler(), n, steps, seed=SEED)
            name = f"diffusers/{sampler}/{steps}"
            rows[name] = bench.row(name, generate)
    name = f"diffusers/ddpm/{ddpm_steps}"
    rows[name] = bench.row(name, lambda n: diffusers_sample(unet, DDPMScheduler.from_config(ddpm.config), n,
                                                            ddpm_steps, seed=SEED), num_images=ddpm_images)
    return rows


def evaluation_cost(loaded: LoadedModel, reference, extractor, config: EvalConfig) -> dict[str, float]:
    """Seconds of evaluate_model: the headline alone, and with every side pass."""
    start = time.perf_counter()
    evaluate_model(loaded, reference, config.headline_only(), extractor)
    headline = time.perf_counter() - start
    start = time.perf_counter()
    evaluate_model(loaded, reference, config, extractor)
    full = time.perf_counter() - start
    return {"num_samples": config.num_samples, "headline_only_seconds": round(headline, 1),
            "all_passes_seconds": round(full, 1), "added_seconds": round(full - headline, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=900, help="images per sample set")
    parser.add_argument("--ddpm-images", type=int, default=200, help="images of the DDPM-1000 set")
    parser.add_argument("--quick", action="store_true",
                        help="smoke test: 20 training steps, 60 images, DDPM at 50 steps on 20 (numbers "
                             "mean nothing)")
    parser.add_argument("--out", type=Path, default=None,
                        help="where the JSON goes (default: benchmarks/results/quality.json; with --quick "
                             "quality_quick.json in the temporary folder, never the results)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import ray

    num_images, ddpm_images = (60, 20) if args.quick else (args.images, args.ddpm_images)
    threads = machine_cpus()
    out: dict[str, object] = {"machine": machine_info(), "quick": args.quick, "images": num_images,
                              "ddpm_images": ddpm_images, "sampling_threads": threads}
    with tempfile.TemporaryDirectory() as tmp:
        dataset = prepare(PrepareConfig(source="digits", output=f"{tmp}/digits")).uri
        common = {"dataset": dataset, "storage_path": f"{tmp}/ray", "tracking_uri": f"sqlite:///{tmp}/mlflow.db",
                  "run_name": "bench-quality"}
        tiny = {"steps": 20, "warmup_steps": 5, "checkpoint_every": 20, "sample_every": 20}
        config = TrainConfig(**common, cpus_per_worker=local_worker_cpus(1), **(tiny if args.quick else {}))
        out["train_config"] = config.recipe.model_dump(mode="json")
        ray.init(num_cpus=local_cluster_cpus(), include_dashboard=False, configure_logging=False)
        try:
            out["ours_training"], checkpoint = ray_run(config)
        finally:
            ray.shutdown()
        baseline = train_diffusers_baseline(config, dataset, out["ours_training"]["train_seconds"])
        out["diffusers_training"] = baseline.figures
        torch.set_num_threads(threads)
        eval_config = EvalConfig(cache_dir=Path(tmp) / "feature-nets",
                                 **({"feature_net": FeatureNetConfig(steps=50), "num_samples": 40}
                                    if args.quick else {}))
        reference = reference_from_dataset(dataset)
        extractor = feature_extractor_for(reference, eval_config)
        out["feature_classifier"] = feature_check(extractor, reference)
        scorer = Scorer.for_reference(reference, extractor, eval_config.nearest_k)
        bench = Bench(scorer, num_images, ddpm_images)
        loaded = load_checkpoint(checkpoint)
        out["ours"] = our_rows(bench, loaded)
        out["diffusers"] = baseline_rows(bench, baseline.unet, baseline.ddpm, ddpm_images,
                                         50 if args.quick else DDPM_STEPS)
        out["evaluation_cost"] = evaluation_cost(loaded, reference, extractor, eval_config)
    out["machine_after"] = machine_info()
    path = args.out or (Path(tempfile.gettempdir()) / "quality_quick.json" if args.quick
                        else RESULTS_DIR / "quality.json")
    atomic_write_text(path, json.dumps(out, indent=2) + "\n")
    logger.info("wrote %s", path)


if __name__ == "__main__":
    main()
