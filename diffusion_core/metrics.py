"""Evaluation of a generative model against a dataset's validation split.

What is scored: the images users receive. All passes use the same seeds (image i from seed
`config.seed + i`), so their numbers differ only by the request:

- the default request, the headline that the gate compares: what `LoadedModel.generate`, the HTTP
  service and the pyfunc return without labels. For a class-conditional model each image's class
  is drawn from the training split's class prior by its seed (class_prior.py), then sampled with
  the default sampler and steps (sampling_defaults.py) at guidance 1.
- conditional accuracy: those drawn labels are conditional requests at guidance 1, so the share of
  headline samples the feature classifier assigns to their label is the conditional accuracy
  (`label_accuracy`), at no extra sampling cost.
- null label (`null_label_pass`): explicitly unconditional requests, the null class embedding that
  is also the unconditional half of classifier-free guidance.
- guided (`guided_scale`, default 2): the default request at that guidance scale.

What is measured for each (`SampleScores`), in the dataset's own feature space (metrics_features):
- `fd`: Fréchet distance between generated samples and the validation split (lower is better).
- `precision` / `recall`: k-NN improved precision and recall (Kynkäänniemi et al. 2019).
- `class_histogram` / `class_entropy`: how the feature classifier labels the samples; entropy 1.0
  means every class appears equally often, low entropy means mode collapse. Unlabelled datasets
  have no classes (random features), so their `class_entropy` is None.
- `label_accuracy`: the share of samples classified as the label they were generated for.
- `copy_share` / `nn_distance_ratio`: memorisation, in pixel space (metrics_memorisation).
Once per evaluation, the feature network itself is checked: its accuracy on the labelled
validation split against chance (the majority class's share), with the one-sided binomial p-value
of doing that well by chance (`feature_accuracy`, `feature_chance`, `feature_p_value`): FDs in the
space of a classifier that learned nothing say nothing. `inception_fid`: standard FID, only when a
local Inception file is configured (`metrics_fid`).

Images at every boundary here are float (N, C, H, W) in [0, 1].
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
from diffusion_core.metrics_fid import NVLABS_INCEPTION_SHA256, InceptionInput, inception_fid, load_inception
from diffusion_core.metrics_memorisation import memorisation, nearest_distances
from diffusion_core.metrics_stats import (
    binomial_upper_tail,
    class_histogram,
    frechet_distance,
    normalised_entropy,
    precision_recall,
)
from diffusion_core.sampling_defaults import (
    DEFAULT_GUIDANCE_SCALE,
    DEFAULT_SAMPLER,
    DEFAULT_STEPS,
    SamplerName,
)

if TYPE_CHECKING:
    from diffusion_core.checkpoint import LoadedModel

logger = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = Path("~/.cache/diffusion-pipeline/feature-nets")


class EvalConfig(BaseModel):
    """Settings of one evaluation (config section `evaluate`).

    sampler, steps, guidance_scale and clip_x0 define the headline request; their defaults are
    those of a default request (sampling_defaults.py), which is what the headline should measure.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    num_samples: int = Field(500, ge=8, description="images generated per evaluation pass")
    sampler: SamplerName = DEFAULT_SAMPLER
    steps: int = Field(DEFAULT_STEPS, ge=1)
    seed: int = Field(0, ge=0, description="sample i uses seed + i")
    guidance_scale: float = Field(DEFAULT_GUIDANCE_SCALE, ge=0.0,
                                  description="guidance of the headline (default) request")
    clip_x0: PositiveFloat | Literal["auto", "dynamic"] | None = Field(
        "auto", description="x0 clipping while sampling: auto (the model's data range, "
        "checkpoint.data_range_clip), a positive float, dynamic, or null (none)")
    null_label_pass: bool = Field(
        True, description="class-conditional models: also score explicitly unconditional (null-label) "
        "requests")
    guided_scale: PositiveFloat | None = Field(
        2.0, description="class-conditional models: also score the default request at this guidance "
        "scale; null: skip")
    nearest_k: int = Field(3, ge=1, description="k of k-NN precision/recall")
    batch_size: int = Field(250, ge=1, description="images generated per sampler call")
    use_ema: bool = True
    device: str = "cpu"
    feature_net: FeatureNetConfig = FeatureNetConfig()
    cache_dir: Path = Field(DEFAULT_CACHE_DIR, description="local cache of trained feature classifiers")
    inception_path: Path | None = Field(
        None, description="local TorchScript Inception for standard FID; unset -> no Inception FID")
    inception_input: InceptionInput = "nvlabs_uint8"
    inception_sha256: str = Field(
        NVLABS_INCEPTION_SHA256, pattern=r"^[0-9a-fA-F]{64}$",
        description="SHA-256 the Inception file must have (default: NVIDIA's inception-2015-12-05.pt); "
        "any other file is refused unless its hash is set here")

    def headline_only(self) -> EvalConfig:
        """These settings without the side passes: what re-measuring a champion's FD needs."""
        return self.model_copy(update={"null_label_pass": False, "guided_scale": None})


class SampleScores(BaseModel):
    """The numbers of one set of generated images (one kind of request)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    fd: float
    precision: float
    recall: float
    class_histogram: list[float]
    class_entropy: float | None  # None for unlabelled datasets (no classifier)
    label_accuracy: float | None = None
    copy_share: float
    nn_distance_ratio: float

    def scalars(self) -> dict[str, float]:
        """The scalar numbers, by name, without the ones that were not measured."""
        values = {"fd": self.fd, "precision": self.precision, "recall": self.recall,
                  "class_entropy": self.class_entropy, "label_accuracy": self.label_accuracy,
                  "copy_share": self.copy_share, "nn_distance_ratio": self.nn_distance_ratio}
        return {k: float(v) for k, v in values.items() if v is not None}


# Metric-name prefixes of the side passes: eval_null_fd, eval_guided_label_accuracy, ...
SIDE_PASSES = {"null_label": "null", "guided": "guided"}


class EvalResult(SampleScores):
    """The headline (default request) numbers, the side passes, the feature network's check, and
    the settings that make the headline comparable (`eval_key`)."""

    inception_fid: float | None = None
    feature_kind: str
    feature_accuracy: float | None = None  # held-out accuracy of a trained classifier
    feature_chance: float | None = None    # the majority class's share of the held-out labels
    feature_p_value: float | None = None   # P[accuracy >= feature_accuracy | chance]
    null_label: SampleScores | None = None
    guided: SampleScores | None = None
    guided_scale: float | None = None
    eval_key: str

    def as_metrics(self) -> dict[str, float]:
        """Flat scalar metrics for MLflow: `eval_fd`, `eval_copy_share`, ... for the headline,
        `eval_feature_*`, and `eval_null_*` / `eval_guided_*` for the side passes."""
        metrics = {f"eval_{k}": v for k, v in self.scalars().items()}
        extra = {"inception_fid": self.inception_fid, "feature_accuracy": self.feature_accuracy,
                 "feature_chance": self.feature_chance, "feature_p_value": self.feature_p_value}
        metrics.update({f"eval_{k}": float(v) for k, v in extra.items() if v is not None})
        for field, prefix in SIDE_PASSES.items():
            scores: SampleScores | None = getattr(self, field)
            if scores is not None:
                metrics.update({f"eval_{prefix}_{k}": v for k, v in scores.scalars().items()})
        return metrics

    @classmethod
    def metric_names(cls) -> set[str]:
        """Every name `as_metrics` can produce (to pick recorded evaluation numbers out of tags)."""
        per_pass = ("fd", "precision", "recall", "class_entropy", "label_accuracy", "copy_share",
                    "nn_distance_ratio")
        names = {f"eval_{k}" for k in (*per_pass, "inception_fid", "feature_accuracy", "feature_chance",
                                       "feature_p_value")}
        return names | {f"eval_{prefix}_{k}" for prefix in SIDE_PASSES.values() for k in per_pass}


@dataclass(frozen=True)
class ReferenceData:
    """The dataset side of an evaluation: images (N, C, H, W) in [0, 1], labels (N,) int64 or None.

    val_labels label the validation split; the feature classifier's held-out check needs them."""

    fingerprint: str
    train_images: Tensor
    train_labels: Tensor | None
    val_images: Tensor
    num_classes: int | None
    val_labels: Tensor | None = None

    @classmethod
    def from_model_space(cls, fingerprint: str, train_images: Tensor, train_labels: Tensor | None,
                         val_images: Tensor, num_classes: int | None,
                         val_labels: Tensor | None = None) -> ReferenceData:
        """From reader tensors in [-1, 1] (the prepared-dataset convention, MODEL_VALUE_RANGE)."""
        return cls(fingerprint, to_unit_range(train_images, MODEL_VALUE_RANGE), train_labels,
                   to_unit_range(val_images, MODEL_VALUE_RANGE), num_classes, val_labels)


def reference_from_dataset(dataset_uri: str) -> ReferenceData:
    """Both splits of a prepared dataset (local path or URI) in memory, labels only when it has them."""
    from diffusion_core.data.manifest import read_manifest
    from diffusion_core.data.readers import load_split

    manifest = read_manifest(dataset_uri)
    train_images, train_labels = load_split(dataset_uri, "train")
    val_images, val_labels = load_split(dataset_uri, "val")
    labelled = manifest.num_classes is not None
    return ReferenceData.from_model_space(manifest.fingerprint, train_images,
                                          train_labels if labelled else None, val_images,
                                          manifest.num_classes, val_labels if labelled else None)


# What the headline measures; part of the eval key, so that FDs of another definition never compare.
HEADLINE_REQUEST = "default_request"
# Settings that change the headline numbers (fd, precision, recall, copy share): the eval key's.
# Left out because they do not: batch_size, device, cache_dir (where, not what), the side passes
# (null_label_pass, guided_scale) and the Inception settings (inception_fid is reported, not compared).
EVAL_KEY_FIELDS = {"num_samples", "sampler", "steps", "seed", "guidance_scale", "clip_x0", "nearest_k",
                   "use_ema", "feature_net"}


def eval_settings_key(fingerprint: str, num_val: int, config: EvalConfig, feature_weights: str) -> str:
    """A hash of everything an FD number depends on besides the model: two FDs are comparable
    exactly when their keys are equal. feature_weights: FeatureExtractor.weights_sha256 (the same
    settings can yield different feature networks, e.g. a classifier retrained elsewhere)."""
    relevant = config.model_dump(mode="json", include=EVAL_KEY_FIELDS)
    payload = json.dumps({"fingerprint": fingerprint, "num_val": num_val, "feature_weights": feature_weights,
                          "headline": HEADLINE_REQUEST, **relevant}, sort_keys=True)
    return hashlib.sha256(payload.encode()).hexdigest()[:16]


def feature_extractor_for(reference: ReferenceData, config: EvalConfig) -> FeatureExtractor:
    """Trained (cached) classifier for labelled data; the seeded random-feature net otherwise."""
    if reference.train_labels is None or reference.num_classes is None:
        logger.warning("dataset %s has no labels: using fixed random conv features (seed %d), untrained; "
                       "FD values are not comparable with labelled-dataset FDs", reference.fingerprint,
                       config.feature_net.seed)
        return random_feature_extractor(reference.train_images.shape[1], config.feature_net,
                                        calibration_images=reference.train_images)
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
    extractor, which has no classes) and label_accuracy (None unless `requested_labels` (N,) is given
    and the extractor is a trained classifier).
    """
    real_feats, _ = extractor.features_and_predictions(real_images)
    fake_feats, predicted = extractor.features_and_predictions(samples)
    precision, recall = precision_recall(real_feats, fake_feats, k=nearest_k)
    histogram = class_histogram(predicted, extractor.num_classes)
    trained = extractor.kind == "trained_classifier"
    label_accuracy = None
    if requested_labels is not None and trained:
        label_accuracy = float((predicted == requested_labels).to(torch.float64).mean())
    entropy = normalised_entropy(histogram) if trained else None
    return {"fd": frechet_distance(real_feats, fake_feats), "precision": precision, "recall": recall,
            "class_histogram": histogram, "class_entropy": entropy, "label_accuracy": label_accuracy}


@dataclass(frozen=True)
class Scorer:
    """Scores sets of generated images against one reference with one feature network; the
    held-out images' nearest-training distances (the memorisation baseline) are computed once."""

    reference: ReferenceData
    extractor: FeatureExtractor
    nearest_k: int
    heldout_distances: Tensor

    @classmethod
    def for_reference(cls, reference: ReferenceData, extractor: FeatureExtractor, nearest_k: int) -> Scorer:
        heldout = nearest_distances(reference.val_images, reference.train_images)
        return cls(reference, extractor, nearest_k, heldout)

    def score(self, samples: Tensor, requested_labels: Tensor | None = None) -> SampleScores:
        """samples: (N, C, H, W) in [0, 1]; requested_labels: (N,) int64, the classes asked for."""
        numbers = evaluate_samples(samples, self.reference.val_images, self.extractor, requested_labels,
                                   self.nearest_k)
        distances = nearest_distances(samples, self.reference.train_images)
        copying = memorisation(distances, self.heldout_distances)
        return SampleScores(**numbers, **copying.model_dump())


def feature_check(extractor: FeatureExtractor, reference: ReferenceData) -> dict[str, float | None]:
    """The feature classifier on the labelled validation split: accuracy, chance (the majority class's
    share: what always answering that class scores) and the one-sided binomial p-value of reaching
    that accuracy by chance. All None for random features, or without validation labels."""
    none = {"feature_accuracy": None, "feature_chance": None, "feature_p_value": None}
    if extractor.kind != "trained_classifier":
        return none
    if reference.val_labels is None:
        logger.warning("dataset %s: no validation labels, the feature classifier cannot be checked",
                       reference.fingerprint)
        return none
    labels = reference.val_labels
    correct = int((extractor.features_and_predictions(reference.val_images)[1] == labels).sum())
    chance = float(torch.bincount(labels, minlength=extractor.num_classes).max()) / len(labels)
    return {"feature_accuracy": correct / len(labels), "feature_chance": chance,
            "feature_p_value": binomial_upper_tail(correct, len(labels), chance)}


def eval_seeds(config: EvalConfig) -> list[int]:
    return list(range(config.seed, config.seed + config.num_samples))


def generate_eval_samples(loaded: LoadedModel, config: EvalConfig, name: str, guidance_scale: float,
                          unconditional: bool = False) -> Tensor:
    """config.num_samples images in [0, 1] as requests without labels (default labels, or the null
    label with `unconditional`), in batches, sample i from seed config.seed + i."""
    chunks, start, seeds = [], time.monotonic(), eval_seeds(config)
    for first in range(0, config.num_samples, config.batch_size):
        batch = seeds[first:first + config.batch_size]
        chunks.append(loaded.generate(len(batch), steps=config.steps, sampler=config.sampler, seeds=batch,
                                      guidance_scale=guidance_scale, clip_x0=config.clip_x0,
                                      unconditional=unconditional))
        done = first + len(batch)
        rate = done / max(time.monotonic() - start, 1e-9)
        logger.info("evaluation sampling (%s) %d/%d images (%.1f img/s, ETA %.0fs)", name, done,
                    config.num_samples, rate, (config.num_samples - done) / rate)
    return torch.cat(chunks)


def evaluate_model(
    loaded: LoadedModel,
    reference: ReferenceData,
    config: EvalConfig,
    extractor: FeatureExtractor | None = None,
) -> EvalResult:
    """Score the default request of `loaded` (and the side passes `config` asks for) against the
    validation split; see the module docstring.

    Pass `extractor` to reuse one feature network across several models (e.g. candidate and champion).
    """
    extractor = extractor or feature_extractor_for(reference, config)
    scorer = Scorer.for_reference(reference, extractor, config.nearest_k)
    drawn = loaded.default_labels(eval_seeds(config))  # the labels a default request draws; None: no classes
    labels = None if drawn is None else torch.tensor(drawn, dtype=torch.int64)
    samples = generate_eval_samples(loaded, config, "default request", config.guidance_scale)
    headline = scorer.score(samples, labels)
    null_label = guided = None
    if labels is not None and config.null_label_pass:
        null_samples = generate_eval_samples(loaded, config, "null label", 1.0, unconditional=True)
        null_label = scorer.score(null_samples)
    if labels is not None and config.guided_scale is not None:
        guided = scorer.score(generate_eval_samples(loaded, config, f"guidance {config.guided_scale:g}",
                                                    config.guided_scale), labels)
    fid = None
    if config.inception_path is not None:
        inception = load_inception(config.inception_path, config.inception_input, config.inception_sha256)
        fid = inception_fid(reference.val_images, samples, inception)
    num_val = len(reference.val_images)
    key = eval_settings_key(reference.fingerprint, num_val, config, extractor.weights_sha256)
    result = EvalResult(**headline.model_dump(), inception_fid=fid, feature_kind=extractor.kind,
                        **feature_check(extractor, reference), null_label=null_label, guided=guided,
                        guided_scale=None if guided is None else config.guided_scale, eval_key=key)
    # every number reaches MLflow, the version and the summary; the terminal line would repeat them
    logger.debug("evaluation (%s features): %s", result.feature_kind, result.as_metrics())
    return result
