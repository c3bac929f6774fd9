"""The domain feature space for evaluation: a small classifier trained on the dataset itself.

Inception features (FID) describe 299x299 natural photographs; on 8x8 digits they say little. So,
for a labelled dataset, we train a small convolutional classifier on its training split and use
its penultimate activations as the feature space (the "domain FID" idea of e.g. the MNIST-FID
literature). The classifier is trained once per (dataset fingerprint, classifier settings) and
cached on local disk as `weights.safetensors` + `meta.json` (never pickle).

How it is trained, and why (a small dataset must still give a classifier that generalises):
- a fixed budget of optimiser steps (`steps`), whatever the dataset size: an epoch budget gives a
  200-image dataset 45 updates, and the loss stays at ln K;
- per-image, per-channel standardisation of the input (`input_norm`): with a nuisance such as a
  random background colour the classifier otherwise memorises colours (100% on the training
  split, chance on held-out images);
- random translations of up to `max_shift` of the image side (replicate padding), the one
  augmentation that keeps the label of every image dataset (flips do not: 6 and 9, b and d).
The standardisation makes the learned features blind to each image's brightness, contrast and
colour, which an FD must see (faint digits, washed-out colours). So the feature vector appends
each image's per-channel mean and standard deviation, scaled on the training split so that each
statistic varies as much as an average learned feature (`calibrate_statistics`).

Unlabelled datasets fall back to the same architecture with a fixed random initialisation
(seeded, never trained): random convolutional features still separate noise, blur and real data,
but the numbers are not comparable to a trained feature space, and `kind` says which one it is.
"""

from __future__ import annotations

import hashlib
import json
import logging
import shutil
import time
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Literal

import torch
from pydantic import BaseModel, ConfigDict, Field
from safetensors.torch import load_file, save_file
from torch import Tensor, nn

from diffusion_core.atomic_io import replace_directory, staging_dir

logger = logging.getLogger(__name__)

WEIGHTS_FILE = "weights.safetensors"
META_FILE = "meta.json"


class FeatureNetConfig(BaseModel):
    """Architecture and training settings of the feature classifier (part of the cache key)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    width: int = Field(32, ge=4, description="channels of the first conv layer (doubles twice)")
    feature_dim: int = Field(64, ge=2, description="size of the penultimate feature vector")
    steps: int = Field(1000, ge=1, description="optimiser steps, whatever the dataset size")
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    max_shift: float = Field(0.125, ge=0.0, lt=0.5, description="random translations of up to this "
                             "fraction of the image side while training (>= 1 pixel when > 0; 0: none)")
    input_norm: Literal["per_image", "none"] = Field(
        "per_image", description="per_image: standardise each image's channels before the network "
        "(the mean and std are appended to the features); none: map [0, 1] to [-1, 1] only")
    seed: int = 0


class FeatureNet(nn.Module):
    """Conv classifier: three 3x3 conv stages, global average pooling, a feature layer, a head.

    forward(x: (N, C, H, W) in [0, 1]) -> logits (N, K); features(x) -> (N, D) with D = feature_dim,
    plus 2C appended image statistics with input_norm "per_image". Global pooling makes it work at
    any image size >= 4.
    """

    def __init__(self, in_channels: int, num_classes: int, config: FeatureNetConfig) -> None:
        super().__init__()
        self.per_image_norm = config.input_norm == "per_image"
        # Affine map of the appended statistics (per channel: means, then stds), set by
        # calibrate_statistics; buffers, so they are saved, loaded and hashed with the weights.
        self.register_buffer("stat_mean", torch.zeros(2 * in_channels))
        self.register_buffer("stat_scale", torch.ones(2 * in_channels))
        w = config.width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, config.feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(config.feature_dim, num_classes)

    def learned_features(self, x: Tensor) -> Tensor:
        """(N, feature_dim): the penultimate activations, what the head classifies."""
        if self.per_image_norm:
            return self.body(standardise_per_image(x))
        return self.body(x * 2 - 1)  # centred, so that a random init sees zero-mean data too

    def features(self, x: Tensor) -> Tensor:
        """The evaluation's feature vector: the learned features, plus (per_image input norm) the
        scaled per-channel statistics that the standardisation hid from the network."""
        learned = self.learned_features(x)
        if not self.per_image_norm:
            return learned
        return torch.cat([learned, (image_statistics(x) - self.stat_mean) * self.stat_scale], dim=1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.learned_features(x))


# Floor of a channel's standard deviation in the standardisation: a flat image (std 0) maps to zeros
# instead of amplified rounding noise; 0.05 is about 13 grey levels of 255.
STD_FLOOR = 0.05


def image_statistics(x: Tensor) -> Tensor:
    """(N, C, H, W) -> (N, 2C): each channel's mean, then each channel's standard deviation."""
    return torch.cat([x.mean(dim=(2, 3)), x.std(dim=(2, 3), correction=0)], dim=1)


def standardise_per_image(x: Tensor) -> Tensor:
    """Each image's channels to zero mean and unit standard deviation: (x - mean) / max(std, floor)."""
    mean = x.mean(dim=(2, 3), keepdim=True)
    std = x.std(dim=(2, 3), keepdim=True, correction=0).clamp_min(STD_FLOOR)
    return (x - mean) / std


@torch.no_grad()
def calibrate_statistics(net: FeatureNet, images: Tensor, batch_size: int = 512) -> None:
    """Scale the appended statistics so that, on `images` (the training split), each varies as much
    as the average learned feature: scale_j = mean_i std(f_i) / max(std(s_j), 1/255)."""
    learned = torch.cat([net.learned_features(chunk) for chunk in images.split(batch_size)])
    stats = image_statistics(images)
    target = learned.std(dim=0).mean()
    net.stat_mean.copy_(stats.mean(dim=0))
    net.stat_scale.copy_(target / stats.std(dim=0).clamp_min(1 / 255))


@dataclass(frozen=True)
class FeatureExtractor:
    """A ready feature network plus what it is (`kind`) and where it is cached."""

    net: FeatureNet
    kind: Literal["trained_classifier", "random_features"]
    num_classes: int
    directory: Path | None = None
    train_accuracy: float | None = None

    @cached_property
    def weights_sha256(self) -> str:
        """SHA-256 of the network's weights: two extractors give comparable features only when equal."""
        return weights_sha256(self.net)

    @torch.no_grad()
    def features_and_predictions(self, images: Tensor, batch_size: int = 512) -> tuple[Tensor, Tensor]:
        """(N, D) features and (N,) predicted classes of images (N, C, H, W) in [0, 1]."""
        feats, preds = [], []
        for chunk in images.split(batch_size):
            feats.append(self.net.features(chunk))
            preds.append(self.net(chunk).argmax(dim=1))
        return torch.cat(feats), torch.cat(preds)


def weights_sha256(net: nn.Module) -> str:
    """SHA-256 over every state-dict entry (name, dtype, shape, bytes) in name order."""
    digest = hashlib.sha256()
    for name, tensor in sorted(net.state_dict().items()):
        value = tensor.detach().cpu().contiguous()
        digest.update(f"{name}:{value.dtype}:{tuple(value.shape)}".encode())
        digest.update(value.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def cache_key(dataset_fingerprint: str, in_channels: int, num_classes: int, config: FeatureNetConfig) -> str:
    """Directory name of a cached classifier: the fingerprint plus a hash of everything that
    changes the weights."""
    settings = json.dumps({"c": in_channels, "k": num_classes, **config.model_dump()}, sort_keys=True)
    return f"{dataset_fingerprint}-{hashlib.sha256(settings.encode()).hexdigest()[:12]}"


def _seeded_net(in_channels: int, num_classes: int, config: FeatureNetConfig) -> FeatureNet:
    # fork_rng: seeding must not disturb the caller's global RNG stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(config.seed)
        return FeatureNet(in_channels, num_classes, config)


def random_feature_extractor(in_channels: int, config: FeatureNetConfig,
                             calibration_images: Tensor | None = None) -> FeatureExtractor:
    """The unlabelled-dataset fallback: a fixed, seeded, untrained FeatureNet (one dummy class).

    calibration_images (N, C, H, W) in [0, 1], the training split: scale the appended image
    statistics on them (`calibrate_statistics`); without them the statistics are appended as they are.
    """
    net = _seeded_net(in_channels, 1, config).eval()
    if calibration_images is not None and net.per_image_norm:
        calibrate_statistics(net, calibration_images)
    return FeatureExtractor(net=net, kind="random_features", num_classes=1)


def random_shift(images: Tensor, max_pixels: int, generator: torch.Generator) -> Tensor:
    """Each image translated by its own random (dy, dx) in [-max_pixels, max_pixels]^2, the uncovered
    border filled by replicating the edge pixels. (N, C, H, W) -> (N, C, H, W)."""
    if max_pixels <= 0:
        return images
    n, _, height, width = images.shape
    padded = nn.functional.pad(images, (max_pixels,) * 4, mode="replicate")
    dy = torch.randint(0, 2 * max_pixels + 1, (n,), generator=generator)
    dx = torch.randint(0, 2 * max_pixels + 1, (n,), generator=generator)
    rows = (dy[:, None] + torch.arange(height))[:, :, None]  # (N, H, 1)
    cols = (dx[:, None] + torch.arange(width))[:, None, :]   # (N, 1, W)
    # Advanced indices around the channel slice: the result is (N, H, W, C).
    return padded[torch.arange(n)[:, None, None], :, rows, cols].permute(0, 3, 1, 2)


def shift_pixels(image_size: int, max_shift: float) -> int:
    """max_shift (a fraction of the side) in whole pixels: at least 1 when max_shift > 0."""
    return max(1, round(max_shift * image_size)) if max_shift > 0 else 0


def train_feature_net(
    images: Tensor, labels: Tensor, num_classes: int, config: FeatureNetConfig
) -> FeatureNet:
    """Train a FeatureNet with Adam and cross-entropy on (N, C, H, W) images in [0, 1]: `config.steps`
    batches drawn with replacement, each randomly translated (`random_shift`); then calibrate the
    appended statistics on the same images."""
    net = _seeded_net(images.shape[1], num_classes, config).train()
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    shift = shift_pixels(images.shape[-1], config.max_shift)
    batch_size = min(config.batch_size, len(images))
    start = time.monotonic()
    for step in range(1, config.steps + 1):
        rows = torch.randint(0, len(images), (batch_size,), generator=generator)
        loss = nn.functional.cross_entropy(net(random_shift(images[rows], shift, generator)), labels[rows])
        optimiser.zero_grad()
        loss.backward()
        optimiser.step()
        if step % 250 == 0 or step == config.steps:
            rate = step / (time.monotonic() - start)
            logger.info("feature classifier step %d/%d loss %.4f (%.0f steps/s, ETA %.0fs)", step,
                        config.steps, loss.item(), rate, (config.steps - step) / rate)
    net.eval()
    calibrate_statistics(net, images)
    return net


@torch.no_grad()
def accuracy(net: FeatureNet, images: Tensor, labels: Tensor) -> float:
    return float((net(images).argmax(dim=1) == labels).to(torch.float64).mean())


def _write_atomically(directory: Path, net: FeatureNet, meta: dict) -> None:
    """Write weights + meta into a temp dir beside `directory`, then publish it with
    atomic_io.replace_directory (a half-written cache entry is never visible)."""
    tmp = staging_dir(directory)
    try:
        save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp / WEIGHTS_FILE))
        (tmp / META_FILE).write_text(json.dumps(meta, indent=2, sort_keys=True))
        if (directory / META_FILE).is_file():  # another process cached the same classifier first
            logger.info("feature classifier: %s was cached meanwhile; keeping that copy", directory)
            shutil.rmtree(tmp)
            return
        replace_directory(tmp, directory)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def load_feature_extractor(directory: Path) -> FeatureExtractor:
    """Load a cached classifier written by `trained_feature_extractor`."""
    meta = json.loads((directory / META_FILE).read_text())
    config = FeatureNetConfig.model_validate(meta["config"])
    net = FeatureNet(meta["in_channels"], meta["num_classes"], config)
    net.load_state_dict(load_file(str(directory / WEIGHTS_FILE)))
    return FeatureExtractor(net=net.eval(), kind="trained_classifier", num_classes=meta["num_classes"],
                            directory=directory, train_accuracy=meta.get("train_accuracy"))


def trained_feature_extractor(
    dataset_fingerprint: str,
    train_images: Tensor,
    train_labels: Tensor,
    num_classes: int,
    cache_dir: Path,
    config: FeatureNetConfig | None = None,
) -> FeatureExtractor:
    """The dataset's feature classifier: loaded from `cache_dir/<key>/` or trained and cached there.

    train_images: (N, C, H, W) float in [0, 1]; train_labels: (N,) int64 in [0, num_classes).
    """
    config = config or FeatureNetConfig()
    directory = Path(cache_dir) / cache_key(dataset_fingerprint, train_images.shape[1], num_classes, config)
    if (directory / META_FILE).is_file():
        logger.info("feature classifier: using cached %s", directory)
        return load_feature_extractor(directory)
    logger.info("feature classifier: training on %d images (%d classes)", len(train_images), num_classes)
    net = train_feature_net(train_images, train_labels, num_classes, config)
    meta = {
        "config": config.model_dump(), "in_channels": train_images.shape[1], "num_classes": num_classes,
        "dataset_fingerprint": dataset_fingerprint,
        "train_accuracy": accuracy(net, train_images, train_labels),
    }
    _write_atomically(directory, net, meta)
    return load_feature_extractor(directory)
