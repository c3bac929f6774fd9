"""The domain feature space for evaluation: a small classifier trained on the dataset itself.

Inception features (FID) describe 299x299 natural photographs; on 8x8 digits they say little. So,
for a labelled dataset, we train a small convolutional classifier on its training split and use
its penultimate activations as the feature space (the "domain FID" idea of e.g. the MNIST-FID
literature). The classifier is trained once per (dataset fingerprint, classifier settings) and
cached on local disk as `weights.safetensors` + `meta.json` (never pickle).

Unlabelled datasets fall back to the same architecture with a fixed random initialisation
(seeded, never trained): random convolutional features still separate noise, blur and real data,
but the numbers are not comparable to a trained feature space, and `meta.json` says which one it is.
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
    epochs: int = Field(15, ge=1)
    batch_size: int = Field(64, ge=1)
    lr: float = Field(2e-3, gt=0)
    seed: int = 0


class FeatureNet(nn.Module):
    """Conv classifier: three 3x3 conv stages, global average pooling, a feature layer, a head.

    forward(x: (N, C, H, W) in [0, 1]) -> logits (N, K); features(x) -> (N, feature_dim).
    Global pooling makes it work at any image size >= 4.
    """

    def __init__(self, in_channels: int, num_classes: int, config: FeatureNetConfig) -> None:
        super().__init__()
        w = config.width
        self.body = nn.Sequential(
            nn.Conv2d(in_channels, w, 3, padding=1), nn.SiLU(),
            nn.Conv2d(w, 2 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.Conv2d(2 * w, 4 * w, 3, stride=2, padding=1), nn.SiLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
            nn.Linear(4 * w, config.feature_dim), nn.SiLU(),
        )
        self.head = nn.Linear(config.feature_dim, num_classes)

    def features(self, x: Tensor) -> Tensor:
        # Centre [0, 1] inputs so that a random init sees zero-mean data too.
        return self.body(x * 2 - 1)

    def forward(self, x: Tensor) -> Tensor:
        return self.head(self.features(x))


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
            f = self.net.features(chunk)
            feats.append(f)
            preds.append(self.net.head(f).argmax(dim=1))
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


def random_feature_extractor(in_channels: int, config: FeatureNetConfig) -> FeatureExtractor:
    """The unlabelled-dataset fallback: a fixed, seeded, untrained FeatureNet (one dummy class)."""
    net = _seeded_net(in_channels, 1, config).eval()
    return FeatureExtractor(net=net, kind="random_features", num_classes=1)


def train_feature_net(
    images: Tensor, labels: Tensor, num_classes: int, config: FeatureNetConfig
) -> FeatureNet:
    """Train a FeatureNet with Adam and cross-entropy on (N, C, H, W) images in [0, 1]."""
    net = _seeded_net(images.shape[1], num_classes, config).train()
    optimiser = torch.optim.Adam(net.parameters(), lr=config.lr)
    generator = torch.Generator().manual_seed(config.seed)
    start = time.monotonic()
    for epoch in range(config.epochs):
        order = torch.randperm(len(images), generator=generator)
        for batch in order.split(config.batch_size):
            loss = nn.functional.cross_entropy(net(images[batch]), labels[batch])
            optimiser.zero_grad()
            loss.backward()
            optimiser.step()
        if epoch % 5 == 4 or epoch == config.epochs - 1:
            rate = (epoch + 1) / (time.monotonic() - start)
            logger.info("feature classifier epoch %d/%d loss %.4f (%.1f epochs/s, ETA %.0fs)", epoch + 1,
                        config.epochs, loss.item(), rate, (config.epochs - epoch - 1) / rate)
    return net.eval()


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
