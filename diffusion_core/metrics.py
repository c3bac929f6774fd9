"""Evaluation of a generative model against a dataset's validation split.

What is measured (all in the dataset's own feature space, see `metrics_features`):
- `fd`: Fréchet distance between generated samples and the validation split (lower is better).
- `precision` / `recall`: k-NN improved precision and recall (Kynkäänniemi et al. 2019).
- `class_histogram` / `class_entropy`: how the feature classifier labels the samples; entropy 1.0
  means every class appears equally often, low entropy means mode collapse. Unlabelled datasets
  have no classes (random features), so their `class_entropy` is None.
- `label_accuracy`: for class-conditional sampling, the fraction of samples classified as the label
  they were generated for.
- `inception_fid`: standard FID, only when a local Inception file is configured (`metrics_fid`).

Images at every boundary here are float (N, C, H, W) in [0, 1]. Results depend only on the
configuration and the seed: sample i is generated from seed `config.seed + i`.
"""

from __future__ import annotations

import hashlib
import json
import logging
import time
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import torch
from pydantic import BaseModel, ConfigDict, Field, PositiveFloat
from torch import Tensor

from diffusion_core.images import MODEL_VALUE_RANGE, to_unit_range
from diffusion_core.metrics_features import (
    FeatureExtractor,
    FeatureNetConfig,
    random_feature_extractor,
    trained_feature_extractor,
)
from diffusion_core.metrics_fid import InceptionInput, inception_fid, load_inception
from diffusion_core.metrics_stats import (
    class_histogram,
    frechet_distance,
    normalised_entropy,
    precision_recall,
)
from diffusion_core.sampling_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS, SamplerName

if TYPE_CHECKING:
    from diffusion_core.checkpoint import LoadedModel

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/diffusion-pipeline/feature-nets")


class EvalConfig(BaseModel):
    """Settings of one evaluation (config section `evaluate`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_samples: int = Field(500, ge=8, description="images generated per evaluation")
    sampler: SamplerName = DEFAULT_SAMPLER
    steps: int = Field(DEFAULT_STEPS, ge=1)
    seed: int = Field(0, ge=0, description="sample i uses seed + i")
    guidance_scale: float = Field(1.0, ge=0.0)
    clip_x0: PositiveFloat | Literal["auto", "dynamic"] | None = Field(
        "auto", description="x0 clipping while sampling: auto (the model's data range, "
        "checkpoint.data_range_clip), a positive float, dynamic, or null (none)")
    class_conditional: bool = Field(
        True, description="for class-conditional models, request labels 0..K-1 in turn (else unconditional)")
    nearest_k: int = Field(3, ge=1, description="k of k-NN precision/recall")
    batch_size: int = Field(250, ge=1, description="images generated per sampler call")
    use_ema: bool = True
    device: str = "cpu"
    feature_net: FeatureNetConfig = FeatureNetConfig()
    cache_dir: Path = Field(DEFAULT_CACHE_DIR, description="local cache of trained feature classifiers")
    inception_path: Path | None = Field(
        None, description="local TorchScript Inception for standard FID; unset -> no Inception FID")
    inception_input: InceptionInput = "nvlabs_uint8"


class EvalResult(BaseModel):
    """The numbers of one evaluation plus the settings that make them comparable (`eval_key`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fd: float
    precision: float
    recall: float
    class_histogram: list[float]
    class_entropy: float | None  # None for unlabelled datasets (no classifier)
    label_accuracy: float | None = None
    inception_fid: float | None = None
    feature_kind: str
    eval_key: str

    def as_metrics(self) -> dict[str, float]:
        """Flat scalar metrics for MLflow (`eval_fd`, `eval_precision`, ...)."""
        scalars = {"fd": self.fd, "precision": self.precision, "recall": self.recall,
                   "class_entropy": self.class_entropy, "label_accuracy": self.label_accuracy,
                   "inception_fid": self.inception_fid}
        return {f"eval_{k}": float(v) for k, v in scalars.items() if v is not None}


@dataclass(frozen=True)
class ReferenceData:
    """The dataset side of an evaluation: images (N, C, H, W) in [0, 1], labels (N,) int64 or None."""

    fingerprint: str
    train_images: Tensor
    train_labels: Tensor | None
    val_images: Tensor
    num_classes: int | None

    @classmethod
    def from_model_space(cls, fingerprint: str, train_images: Tensor, train_labels: Tensor | None,
                         val_images: Tensor, num_classes: int | None) -> ReferenceData:
        """From reader tensors in [-1, 1] (the prepared-dataset convention, MODEL_VALUE_RANGE)."""
        return cls(fingerprint, to_unit_range(train_images, MODEL_VALUE_RANGE), train_labels,
                   to_unit_range(val_images, MODEL_VALUE_RANGE), num_classes)


def reference_from_dataset(dataset_uri: str) -> ReferenceData:
    """Both splits of a prepared dataset (local path or URI) in memory, labels only when it has them."""
    from diffusion_core.data.manifest import read_manifest
    from diffusion_core.data.readers import load_split

    manifest = read_manifest(dataset_uri)
    train_images, train_labels = load_split(dataset_uri, "train")
    val_images, _ = load_split(dataset_uri, "val")
    labelled = manifest.num_classes is not None
    return ReferenceData.from_model_space(manifest.fingerprint, train_images,
                                          train_labels if labelled else None, val_images,
                                          manifest.num_classes)


def eval_settings_key(fingerprint: str, num_val: int, config: EvalConfig, feature_weights: str) -> str:
    """A hash of everything an FD number depends on besides the model: two FDs are comparable
    exactly when their keys are equal. feature_weights: FeatureExtractor.weights_sha256 (the same
    settings can yield different feature networks, e.g. a classifier retrained elsewhere)."""
    relevant = config.model_dump(mode="json", include={
        "num_samples", "sampler", "steps", "seed", "guidance_scale", "clip_x0", "class_conditional",
        "nearest_k", "use_ema", "feature_net"})
    payload = json.dumps({"fingerprint": fingerprint, "num_val": num_val, "feature_weights": feature_weights,
                          **relevant}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def feature_extractor_for(reference: ReferenceData, config: EvalConfig) -> FeatureExtractor:
    """Trained (cached) classifier for labelled data; the seeded random-feature net otherwise."""
    if reference.train_labels is None or reference.num_classes is None:
        logger.warning("dataset %s has no labels: using fixed random conv features (seed %d); FD values "
                       "are not comparable with labelled-dataset FDs", reference.fingerprint,
                       config.feature_net.seed)
        return random_feature_extractor(reference.train_images.shape[1], config.feature_net)
    return trained_feature_extractor(
        reference.fingerprint, reference.train_images, reference.train_labels, reference.num_classes,
        config.cache_dir.expanduser(), config.feature_net)


def evaluate_samples(
    samples: Tensor,
    real_images: Tensor,
    extractor: FeatureExtractor,
    requested_labels: Tensor | None = None,
    nearest_k: int = 3,
) -> dict[str, float | list[float] | None]:
    """The feature-space numbers for `samples` against `real_images` (both (N, C, H, W) in [0, 1]).

    Returns fd, precision, recall, class_histogram, class_entropy (None for a random-feature
    extractor, which has no classes) and label_accuracy (None unless `requested_labels` (N,) is given).
    """
    real_feats, _ = extractor.features_and_predictions(real_images)
    fake_feats, predicted = extractor.features_and_predictions(samples)
    precision, recall = precision_recall(real_feats, fake_feats, k=nearest_k)
    histogram = class_histogram(predicted, extractor.num_classes)
    label_accuracy = None
    if requested_labels is not None:
        label_accuracy = float((predicted == requested_labels).to(torch.float64).mean())
    entropy = normalised_entropy(histogram) if extractor.kind == "trained_classifier" else None
    return {"fd": frechet_distance(real_feats, fake_feats), "precision": precision, "recall": recall,
            "class_histogram": histogram, "class_entropy": entropy, "label_accuracy": label_accuracy}


def requested_labels_for(loaded: LoadedModel, config: EvalConfig) -> Tensor | None:
    """Labels 0, 1, ..., K-1, 0, 1, ... for class-conditional models; None for unconditional."""
    num_classes = loaded.spec.unet.num_classes
    if num_classes is None or not config.class_conditional:
        return None
    return torch.arange(config.num_samples, dtype=torch.int64) % num_classes


def generate_eval_samples(loaded: LoadedModel, config: EvalConfig, labels: Tensor | None) -> Tensor:
    """config.num_samples images in [0, 1], in batches, sample i from seed config.seed + i."""
    chunks, start = [], time.monotonic()
    for first in range(0, config.num_samples, config.batch_size):
        n = min(config.batch_size, config.num_samples - first)
        seeds = list(range(config.seed + first, config.seed + first + n))
        batch_labels = None if labels is None else labels[first:first + n]
        chunks.append(loaded.generate(n, steps=config.steps, sampler=config.sampler, seeds=seeds,
                                      unconditional=batch_labels is None,
                                      labels=batch_labels, guidance_scale=config.guidance_scale,
                                      clip_x0=config.clip_x0))
        done = first + n
        rate = done / max(time.monotonic() - start, 1e-9)
        logger.info("evaluation sampling %d/%d images (%.1f img/s, ETA %.0fs)", done, config.num_samples,
                    rate, (config.num_samples - done) / rate)
    return torch.cat(chunks)


def evaluate_model(
    loaded: LoadedModel,
    reference: ReferenceData,
    config: EvalConfig,
    extractor: FeatureExtractor | None = None,
) -> EvalResult:
    """Generate `config.num_samples` images from `loaded` and score them against the validation split.

    Pass `extractor` to reuse one feature network across several models (e.g. candidate and champion).
    """
    extractor = extractor or feature_extractor_for(reference, config)
    labels = requested_labels_for(loaded, config)
    samples = generate_eval_samples(loaded, config, labels)
    numbers = evaluate_samples(samples, reference.val_images, extractor, labels, config.nearest_k)
    fid = None
    if config.inception_path is not None:
        inception = load_inception(config.inception_path, config.inception_input)
        fid = inception_fid(reference.val_images, samples, inception)
    num_val = len(reference.val_images)
    key = eval_settings_key(reference.fingerprint, num_val, config, extractor.weights_sha256)
    result = EvalResult(**numbers, inception_fid=fid, feature_kind=extractor.kind, eval_key=key)
    logger.info("evaluation (%s features): %s", result.feature_kind, result.as_metrics())
    return result
