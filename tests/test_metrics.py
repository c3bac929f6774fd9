"""Evaluation metrics: closed forms, a reference implementation, and separation on real digits."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

import numpy as np
import pytest
import scipy.linalg
import torch
from sklearn.datasets import load_digits

from diffusion_core.errors import ConfigError
from diffusion_core.metrics import EvalConfig, EvalResult, ReferenceData, eval_settings_key, evaluate_samples
from diffusion_core.metrics_features import (
    FeatureNetConfig,
    accuracy,
    random_feature_extractor,
    trained_feature_extractor,
)
from diffusion_core.metrics_fid import InceptionAdapter, inception_fid, load_inception, to_uint8_pixels
from diffusion_core.metrics_stats import (
    binomial_upper_tail,
    class_histogram,
    frechet_distance,
    frechet_distance_from_stats,
    normalised_entropy,
    precision_recall,
)

logger = logging.getLogger(__name__)


# ---------------------------------------------------------------------------------- Fréchet distance


def test_frechet_distance_matches_closed_form_for_diagonal_gaussians() -> None:
    # For commuting (diagonal) covariances: d^2 = |mu1 - mu2|^2 + sum_i (sqrt(a_i) - sqrt(b_i))^2.
    f64 = torch.float64
    a, b = torch.tensor([1.0, 4.0, 9.0], dtype=f64), torch.tensor([4.0, 1.0, 9.0], dtype=f64)
    mu1, mu2 = torch.zeros(3, dtype=torch.float64), torch.tensor([1.0, 2.0, 0.0], dtype=torch.float64)
    expected = 5.0 + float(((a.sqrt() - b.sqrt()) ** 2).sum())
    assert frechet_distance_from_stats(mu1, torch.diag(a), mu2, torch.diag(b)) == pytest.approx(expected)


def test_frechet_distance_matches_scipy_sqrtm_for_non_commuting_covariances() -> None:
    rng = np.random.default_rng(0)
    m1, m2 = rng.normal(size=(6, 6)), rng.normal(size=(6, 6))
    s1, s2 = m1 @ m1.T + 0.1 * np.eye(6), m2 @ m2.T + 0.1 * np.eye(6)
    mu1, mu2 = rng.normal(size=6), rng.normal(size=6)
    reference = ((mu1 - mu2) ** 2).sum() + np.trace(s1 + s2 - 2 * scipy.linalg.sqrtm(s1 @ s2).real)
    t = lambda a: torch.from_numpy(a)  # noqa: E731
    assert frechet_distance_from_stats(t(mu1), t(s1), t(mu2), t(s2)) == pytest.approx(reference, rel=1e-6)


def test_frechet_distance_of_samples_approaches_the_population_value() -> None:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(20000, 2, generator=g, dtype=torch.float64)
    y = torch.randn(20000, 2, generator=g, dtype=torch.float64) * 2 + 3  # N(3, 4 I)
    # |mu|^2 = 18; per dimension (1 - 2)^2 = 1 -> 20.
    assert frechet_distance(x, y) == pytest.approx(20.0, rel=0.03)
    assert frechet_distance(x, x) == pytest.approx(0.0, abs=1e-9)


# ------------------------------------------------------------------------------ precision and recall


def test_precision_recall_identical_disjoint_and_collapsed_sets() -> None:
    g = torch.Generator().manual_seed(0)
    real = torch.randn(400, 4, generator=g)
    assert precision_recall(real, real.clone()) == (1.0, 1.0)
    assert precision_recall(real, real + 100.0) == (0.0, 0.0)
    # Samples collapsed onto a small region of the data: realistic (precision ~1), poor variety.
    collapsed = real[real[:, 0] > 1.0]
    precision, recall = precision_recall(real, collapsed)
    assert precision == 1.0 and recall < 0.5


def test_precision_recall_rejects_k_too_large() -> None:
    with pytest.raises(ValueError, match="k must be"):
        precision_recall(torch.zeros(3, 2), torch.zeros(3, 2), k=3)


def test_binomial_upper_tail_matches_scipy_and_closed_forms() -> None:
    from scipy.stats import binom

    for k, n, p in ((11, 19, 0.579), (17, 19, 0.579), (350, 360, 0.11), (0, 5, 0.3), (5, 5, 0.5)):
        expected = float(binom.sf(k - 1, n, p))
        assert binomial_upper_tail(k, n, p) == pytest.approx(expected, rel=1e-9, abs=1e-300)
    assert binomial_upper_tail(5, 5, 0.5) == pytest.approx(1 / 32)  # all right by coin flips
    assert binomial_upper_tail(3, 10, 0.0) == 0.0 and binomial_upper_tail(3, 10, 1.0) == 1.0
    with pytest.raises(ValueError, match="successes"):
        binomial_upper_tail(11, 10, 0.5)


def test_class_histogram_and_entropy() -> None:
    uniform = class_histogram(torch.arange(100) % 10, 10)
    assert uniform == pytest.approx([0.1] * 10)
    assert normalised_entropy(uniform) == pytest.approx(1.0)
    assert normalised_entropy(class_histogram(torch.full((50,), 3), 10)) == 0.0
    with pytest.raises(ValueError, match="needs >= 2 classes"):  # one class says nothing about diversity
        normalised_entropy([1.0])


# ---------------------------------------------------------------------------------- digits: the data


@pytest.fixture(scope="module")
def digits() -> ReferenceData:
    """sklearn digits in [0, 1], a fixed 1437/360 train/validation split."""
    data = load_digits()
    images = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16
    labels = torch.tensor(data.target, dtype=torch.int64)
    order = torch.randperm(len(images), generator=torch.Generator().manual_seed(0))
    train, val = order[:1437], order[1437:]
    return ReferenceData("digits-test", images[train], labels[train], images[val], 10)


@pytest.fixture(scope="module")
def extractor(digits: ReferenceData, tmp_path_factory: pytest.TempPathFactory):
    cache = tmp_path_factory.mktemp("feature-cache")
    return trained_feature_extractor(digits.fingerprint, digits.train_images, digits.train_labels, 10, cache)


def _corruptions(digits: ReferenceData) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    val = digits.val_images
    padded = torch.nn.functional.pad(val, (1, 1, 1, 1), mode="replicate")
    return {
        "real (held-out train images)": digits.train_images[:360],
        "gaussian noise": (0.5 + 0.3 * torch.randn(val.shape, generator=g)).clamp(0, 1),
        "blurred validation copy": torch.nn.functional.avg_pool2d(padded, 3, stride=1),
        "a single class": digits.train_images[digits.train_labels == 3][:150],
    }


def test_feature_classifier_is_accurate_and_cached_as_safetensors_json(digits, extractor) -> None:
    val_labels = torch.tensor(load_digits().target)[torch.randperm(1797, generator=torch.Generator()
                                                                  .manual_seed(0))[1437:]]
    assert accuracy(extractor.net, digits.val_images, val_labels) > 0.9
    files = sorted(p.name for p in extractor.directory.iterdir())
    assert files == ["meta.json", "weights.safetensors"]
    assert json.loads((extractor.directory / "meta.json").read_text())["dataset_fingerprint"] == "digits-test"
    # A second call loads the cached weights instead of training: same features, bit for bit.
    again = trained_feature_extractor(digits.fingerprint, digits.train_images[:10], digits.train_labels[:10],
                                      10, extractor.directory.parent)
    assert torch.equal(again.features_and_predictions(digits.val_images)[0],
                       extractor.features_and_predictions(digits.val_images)[0])


def test_fd_separates_real_digits_from_noise_blur_and_collapse(digits, extractor) -> None:
    scores = {name: evaluate_samples(images, digits.val_images, extractor)
              for name, images in _corruptions(digits).items()}
    for name, s in scores.items():
        logger.warning("separation %-30s fd=%8.2f precision=%.3f recall=%.3f entropy=%.3f", name, s["fd"],
                       s["precision"], s["recall"], s["class_entropy"])
    real = scores.pop("real (held-out train images)")
    assert real["precision"] > 0.8 and real["recall"] > 0.8 and real["class_entropy"] > 0.95
    for name, s in scores.items():
        assert s["fd"] > 10 * real["fd"], name
        assert s["recall"] < 0.5, name
    assert scores["a single class"]["class_entropy"] < 0.1


def test_label_accuracy_counts_samples_classified_as_requested(digits, extractor) -> None:
    val_labels = extractor.features_and_predictions(digits.val_images)[1]
    right = evaluate_samples(digits.val_images, digits.val_images, extractor, val_labels)
    wrong = evaluate_samples(digits.val_images, digits.val_images, extractor, (val_labels + 1) % 10)
    assert right["label_accuracy"] == 1.0 and wrong["label_accuracy"] == 0.0


def test_random_feature_fallback_still_separates_noise(digits) -> None:
    random_features = random_feature_extractor(1, FeatureNetConfig(seed=7))
    same = random_feature_extractor(1, FeatureNetConfig(seed=7))
    corrupt = _corruptions(digits)
    real = evaluate_samples(corrupt["real (held-out train images)"], digits.val_images, random_features)
    noise = evaluate_samples(corrupt["gaussian noise"], digits.val_images, random_features)
    assert noise["fd"] > 10 * real["fd"]
    assert evaluate_samples(corrupt["gaussian noise"], digits.val_images, same)["fd"] == noise["fd"]


def test_unlabelled_evaluation_reports_no_class_entropy(digits) -> None:
    """Random features have one dummy class: an entropy of 1.0 would read as perfect diversity."""
    numbers = evaluate_samples(digits.train_images[:100], digits.val_images, random_feature_extractor(1,
                               FeatureNetConfig()), requested_labels=digits.train_labels[:100])
    assert numbers["class_entropy"] is None and numbers["label_accuracy"] is None
    result = EvalResult(**numbers, copy_share=0.1, nn_distance_ratio=1.0, feature_kind="random_features",
                        eval_key="k")
    assert "eval_class_entropy" not in result.as_metrics()
    assert set(result.as_metrics()) == {"eval_fd", "eval_precision", "eval_recall", "eval_copy_share",
                                        "eval_nn_distance_ratio"}
    assert set(result.as_metrics()) <= EvalResult.metric_names()


def test_reference_from_model_space_maps_minus_one_one_to_unit_range() -> None:
    x = torch.tensor([-1.0, 0.0, 1.0]).reshape(1, 1, 1, 3)
    reference = ReferenceData.from_model_space("fp", x, None, x, None)
    assert reference.train_images.flatten().tolist() == [0.0, 0.5, 1.0]
    assert reference.val_images.flatten().tolist() == [0.0, 0.5, 1.0]


def test_eval_key_changes_with_every_setting_that_changes_the_number() -> None:
    base = EvalConfig()
    key = eval_settings_key("fp", 360, base, "w")
    # No effect on the headline numbers: how it is computed, and the side passes.
    for same in ({"batch_size": 7, "device": "cpu"}, {"null_label_pass": False, "guided_scale": None},
                 {"guided_scale": 3.0}, {"inception_path": "x.pt"}):
        assert eval_settings_key("fp", 360, EvalConfig(**same), "w") == key, same
    assert eval_settings_key("fp", 360, base.headline_only(), "w") == key
    for changed in ({"num_samples": 600}, {"seed": 1}, {"steps": 10}, {"sampler": "ddim"},
                    {"guidance_scale": 2.0}, {"clip_x0": None}, {"nearest_k": 5}, {"use_ema": False},
                    {"feature_net": FeatureNetConfig(steps=500)}):
        assert eval_settings_key("fp", 360, EvalConfig(**changed), "w") != key, changed
    assert eval_settings_key("other", 360, base, "w") != key
    assert eval_settings_key("fp", 360, base, "other feature weights") != key


# -------------------------------------------------------------------------- Inception FID (local file)


class _TinyFeatures(torch.nn.Module):
    """Stands in for a TorchScript Inception taking float (N, 3, 299, 299) in [0, 1]."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.conv = torch.nn.Conv2d(3, 16, 5, stride=4)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.nn.functional.adaptive_avg_pool2d(torch.relu(self.conv(x)), 2).flatten(1)


def test_inception_fid_through_torchmetrics_with_a_local_torchscript_file(digits, tmp_path: Path) -> None:
    path = tmp_path / "inception.pt"
    torch.jit.script(_TinyFeatures()).save(str(path))
    inception = load_inception(path, "float_299", hashlib.sha256(path.read_bytes()).hexdigest())
    corrupt = _corruptions(digits)
    real = inception_fid(digits.val_images[:100], corrupt["real (held-out train images)"][:100], inception)
    noise = inception_fid(digits.val_images[:100], corrupt["gaussian noise"][:100], inception)
    assert 0 <= real < noise


class _SpyFeatures(torch.nn.Module):
    """A stand-in Inception that records every batch it is given: a fixed random projection of
    4x4-pooled pixels. Accepts NVlabs' `return_features` keyword, so it serves both conventions."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.register_buffer("projection", torch.randn(3 * 4 * 4, 6, generator=g))
        self.inputs: list[torch.Tensor] = []

    def forward(self, x: torch.Tensor, return_features: bool = False) -> torch.Tensor:
        self.inputs.append(x.detach().clone())
        return torch.nn.functional.adaptive_avg_pool2d(x.float(), 4).flatten(1) @ self.projection


def _three_channels(pixels: torch.Tensor) -> torch.Tensor:
    return pixels.expand(-1, 3, -1, -1)


# What each convention's module must be called with, given the uint8 pixels of the images.
_CONVENTION_INPUTS = {
    "nvlabs_uint8": lambda pixels: _three_channels(pixels),
    "float_299": lambda pixels: torch.nn.functional.interpolate(
        _three_channels(pixels).float() / 255, size=(299, 299), mode="bilinear", align_corners=False),
}
# The largest value each convention must see: 255 for uint8 pixels, 1 for floats in [0, 1].
_CONVENTION_MAX = {"nvlabs_uint8": 255, "float_299": 1.0}


@pytest.mark.parametrize("convention", sorted(_CONVENTION_INPUTS))
def test_inception_fid_feeds_the_convention_and_equals_frechet_distance_of_its_features(
        digits, convention: str) -> None:
    real = digits.val_images[:40]
    fake = _corruptions(digits)["gaussian noise"][:40]
    spy = _SpyFeatures()
    fid = inception_fid(real, fake, InceptionAdapter(spy, convention), batch_size=16)
    # Every batch (torchmetrics' probe included) has the convention's dtype and full value range.
    expected_dtype = torch.uint8 if convention == "nvlabs_uint8" else torch.float32
    assert {x.dtype for x in spy.inputs} == {expected_dtype}
    assert min(float(x.min()) for x in spy.inputs) >= 0
    assert max(float(x.max()) for x in spy.inputs) == pytest.approx(_CONVENTION_MAX[convention], rel=0.02)
    # Independent truth: our own Fréchet distance on features taken from the spy directly.
    features = [spy(_CONVENTION_INPUTS[convention](to_uint8_pixels(images))) for images in (real, fake)]
    assert fid == pytest.approx(frechet_distance(*features), rel=1e-3)
    assert fid > 1.0  # noise is far from digits: a degenerate (all-zero) input would give ~0


def test_inception_fid_without_weights_file_says_what_to_do(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="inception_path is not set") as err:
        load_inception(None)
    assert "inception-2015-12-05.pt" in err.value.hint
    with pytest.raises(ConfigError, match="does not exist"):
        load_inception(tmp_path / "missing.pt")


class _RecordsItsCall(torch.nn.Module):
    """A TorchScript file that is not NVIDIA's Inception: a stand-in for a planted file."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)


def test_an_inception_file_without_the_pinned_sha256_is_refused_before_loading(tmp_path, monkeypatch) -> None:
    """Regression (issue 12): torch.jit.load runs the file's code, so a file whose SHA-256 is not
    NVIDIA's inception-2015-12-05.pt (or the one the user configured) must never reach it."""
    path = tmp_path / "inception-2015-12-05.pt"
    torch.jit.script(_RecordsItsCall()).save(str(path))
    loads: list[object] = []
    real_load = torch.jit.load
    monkeypatch.setattr(torch.jit, "load", lambda *a, **k: loads.append(a) or real_load(*a, **k))
    with pytest.raises(ConfigError, match=r"SHA-256 is not evaluate\.inception_sha256") as err:
        load_inception(path, "float_299")
    assert loads == [] and "inception_sha256" in err.value.hint
    with pytest.raises(ConfigError, match="SHA-256"):  # the config's default is the same pin
        load_inception(path, "float_299", EvalConfig().inception_sha256)
    # The user vouches for this file by its hash: then, and only then, it loads.
    trusted = load_inception(path, "float_299", hashlib.sha256(path.read_bytes()).hexdigest())
    assert len(loads) == 1 and isinstance(trusted, InceptionAdapter)


def test_eval_config_accepts_only_a_sha256_for_the_inception_file() -> None:
    with pytest.raises(ValueError, match="inception_sha256"):
        EvalConfig(inception_sha256="not-a-hash")


@pytest.mark.parametrize("value", [0, -1.0, "static"])
def test_eval_config_refuses_a_bad_clip_before_any_work(tmp_path, value) -> None:
    from flows.config import load_config

    path = tmp_path / "c.yaml"
    path.write_text(f"evaluate:\n  clip_x0: {value}\n")
    with pytest.raises(ConfigError, match=r"evaluate\.clip_x0"):
        load_config(EvalConfig, "evaluate", path, environ={})
    path.write_text("evaluate:\n  clip_x0: 1.5\n")
    assert load_config(EvalConfig, "evaluate", path, environ={}).clip_x0 == 1.5
