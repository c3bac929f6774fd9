"""One training change at a time on the default digits model, scored on what users receive.

Each variant trains in process: the same `train_step` as a Ray Train worker on the same rows in the
same order (`benchmarks.train.worker_order`, the data order of one worker), without Ray or MLflow.
The weights are those of the Ray Train run: checked on the digits recipe, the largest difference
from a one-thread Ray run was 0.0, and the default recipe here scored the FDs of the two-thread Ray
run of results/quality.json to the last digit. It then samples 900 images at the default 20 steps
for four kinds of request, each scored on the project's FD, precision/recall and label accuracy:

  marginal     no labels: classes drawn from the training split's class prior by seed (the default)
  null         unconditional=True: the null label
  cond_cycle   labels 0..9 cycling
  marginal_g2  as `marginal`, guidance scale 2

    python -m benchmarks.train_sweep NAME [key=value ...] [--out F] [--threads N]
        e.g. label_dropout=0.4 seed=1

adds the variant to benchmarks/results/train_sweep.json or F (one thread by default, so that two
variants can run side by side on 2 cores: about 6 minutes each for the default recipe). The seed
(model initialisation, noise and data order) alone moves the null-label FD by up to 3.2 and the
marginal FD by up to 0.8 in results/train_sweep.json, so compare means over seeds.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
import time
from pathlib import Path

import torch

from benchmarks.train import worker_order
from diffusion_core.atomic_io import atomic_write_text
from diffusion_core.checkpoint import DataSpec, LoadedModel, ModelSpec
from diffusion_core.class_prior import class_prior, marginal_labels
from diffusion_core.data.config import PrepareConfig
from diffusion_core.data.prepare import prepare
from diffusion_core.data.readers import load_split
from diffusion_core.metrics import EvalConfig, evaluate_samples, feature_extractor_for, reference_from_dataset
from diffusion_core.training import TrainConfig, build_train_state, train_step

RESULTS = Path(__file__).parent / "results" / "train_sweep.json"
NUM_SAMPLES = 900


def parse_overrides(args: list[str]) -> dict:
    """`a.b=1` -> {"a": {"b": 1}} (values parsed as JSON where they are JSON)."""
    fields: dict = {}
    for arg in args:
        key, value = arg.split("=", 1)
        *parents, leaf = key.split(".")
        target = fields
        for parent in parents:
            target = target.setdefault(parent, {})
        try:
            target[leaf] = json.loads(value)
        except json.JSONDecodeError:
            target[leaf] = value
    return fields


def merged(defaults: dict, overrides: dict) -> dict:
    """`defaults` with `overrides` applied key by key (nested dicts merge; `unet.base_channels=24`
    changes that field of the default U-Net, not the whole U-Net)."""
    out = dict(defaults)
    for key, value in overrides.items():
        nested = isinstance(value, dict) and isinstance(out.get(key), dict)
        out[key] = merged(out[key], value) if nested else value
    return out


def run_variant(name: str, overrides: dict, data: str) -> dict:
    config = TrainConfig.model_validate(merged(TrainConfig(dataset=data).model_dump(), overrides))
    images, labels = load_split(data, "train")
    reference = reference_from_dataset(data)
    extractor = feature_extractor_for(reference, EvalConfig())
    state = build_train_state(config)
    order, b = worker_order(config, data, config.steps), config.batch_size
    start = time.perf_counter()
    while state.step < config.steps:
        index = order[state.step * b:(state.step + 1) * b]
        train_step(state, config, images[index], labels[index])
    train_s = time.perf_counter() - start
    prior = class_prior(torch.bincount(labels, minlength=10).tolist())
    spec = ModelSpec(unet=config.unet, schedule=config.schedule, objective=config.objective,
                     data=DataSpec(image_size=8, channels=1, label_names=[str(i) for i in range(10)],
                                   class_prior=prior))
    model = LoadedModel(state.ema.averaged_model(state.model), spec, weights="ema")
    seeds = list(range(NUM_SAMPLES))
    drawn = marginal_labels(seeds, prior)
    result = {"name": name, "overrides": overrides, "threads": torch.get_num_threads(),
              "train_s": round(train_s, 1),
              "images_per_s": round(config.steps * config.batch_size / train_s, 1)}
    requests = {"marginal": ({}, drawn), "null": ({"unconditional": True}, None),
                "cond_cycle": ({"labels": [i % 10 for i in seeds]}, [i % 10 for i in seeds]),
                "marginal_g2": ({"guidance_scale": 2.0}, drawn)}
    for kind, (options, scored_labels) in requests.items():
        began = time.perf_counter()
        samples = model.generate(NUM_SAMPLES, seeds=seeds, **options)
        sample_s = time.perf_counter() - began
        scores = evaluate_samples(samples, reference.val_images, extractor,
                                  None if scored_labels is None else torch.tensor(scored_labels))
        result[kind] = {k: round(v, 4) if isinstance(v, float) else v for k, v in scores.items()
                        if k != "class_histogram"} | {"sample_s": round(sample_s, 1)}
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("name")
    parser.add_argument("overrides", nargs="*", help="TrainConfig fields as key=value (nested: a.b=1)")
    parser.add_argument("--out", type=Path, default=RESULTS, help="the JSON to add the variant to")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of the training")
    args = parser.parse_args()
    name, overrides, out = args.name, parse_overrides(args.overrides), args.out
    torch.set_num_threads(args.threads)
    with tempfile.TemporaryDirectory() as tmp:
        data = str(Path(tmp) / "digits")
        prepare(PrepareConfig(source="digits", output=data))
        result = run_variant(name, overrides, data)
    record = json.loads(out.read_text()) if out.is_file() else {"variants": []}
    record["machine"] = {"platform": platform.platform(), "cpus": os.cpu_count(),
                         "python": platform.python_version(), "torch": torch.__version__}
    record["variants"] = [v for v in record["variants"] if v["name"] != name] + [result]
    atomic_write_text(out, json.dumps(record, indent=2) + "\n")
    print(json.dumps(result))


if __name__ == "__main__":
    main()
