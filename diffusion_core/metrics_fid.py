"""Standard FID (Heusel et al. 2017) with Inception-v3 features, from a local weights file only.

torchmetrics' `FrechetInceptionDistance(feature=2048)` needs torch-fidelity (which needs
torchvision, unusable here) and downloads weights at run time; both are ruled out. Instead the user
supplies a TorchScript Inception file (`EvalConfig.inception_path`) and we hand it to torchmetrics
as a custom `feature=` module. Two calling conventions are supported (`inception_input`):

- "nvlabs_uint8": NVlabs' `inception-2015-12-05.pt` (StyleGAN2-ADA / StyleGAN3 metrics), which
  takes uint8 (N, 3, H, W) of any size and is called with `return_features=True` -> (N, 2048).
  It resizes internally exactly like the TF original, so its numbers match published FIDs.
- "float_299": any TorchScript module taking float (N, 3, 299, 299) in [0, 1] -> (N, D).

Grey images are repeated to three channels. Nothing here downloads anything.

A TorchScript file is code: `torch.jit.load` rebuilds its modules and their forward runs whatever
the file says. So the file is read into memory once, its SHA-256 checked against
`expected_sha256`, and only those same bytes are handed to the loader (no window in which the file
can be swapped). The default is NVIDIA's `inception-2015-12-05.pt` (StyleGAN2-ADA/StyleGAN3
metrics, https://nvlabs-fi-cdn.nvidia.com/stylegan2-ada-pytorch/pretrained/metrics/
inception-2015-12-05.pt); its digest is the one crowsonkb/k-diffusion verifies after downloading
that URL (k_diffusion/evaluation.py, InceptionV3FeatureExtractor). Another file is loaded only when
the user configures its hash (`evaluate.inception_sha256`).
"""

from __future__ import annotations

import hashlib
import io
import logging
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor, nn

from diffusion_core.errors import ConfigError

logger = logging.getLogger(__name__)

InceptionInput = Literal["nvlabs_uint8", "float_299"]
NVLABS_INCEPTION_SHA256 = "f58cb9b6ec323ed63459aa4fb441fe750cfe39fafad6da5cb504a16f19e958f4"
# NVIDIA's file is 95.6 MB: a bound that it fits and that keeps a wrong path from filling memory.
MAX_INCEPTION_BYTES = 512 * 1024 * 1024


class InceptionAdapter(nn.Module):
    """Maps uint8 (N, C, H, W) batches in 0..255 onto the TorchScript module's convention.

    `inception_fid` hands torchmetrics uint8 itself: with a custom `feature=` module torchmetrics
    ignores `normalize=True` (it passes the images through untouched), so the conversion from
    [0, 1] floats happens exactly once, in `to_uint8_pixels`, and here only uint8 is accepted.
    """

    def __init__(self, scripted: nn.Module, convention: InceptionInput) -> None:
        super().__init__()
        self.scripted = scripted
        self.convention = convention

    def forward(self, images_uint8: Tensor) -> Tensor:
        if images_uint8.dtype != torch.uint8:
            raise ValueError(f"images: expected uint8 pixels in 0..255, got {images_uint8.dtype}")
        x = images_uint8.expand(-1, 3, -1, -1) if images_uint8.shape[1] == 1 else images_uint8
        if self.convention == "nvlabs_uint8":
            return self.scripted(x, return_features=True)
        x = nn.functional.interpolate(x.to(torch.float32) / 255, size=(299, 299), mode="bilinear",
                                      align_corners=False)
        return self.scripted(x)


def load_inception(path: Path | str | None, convention: InceptionInput = "nvlabs_uint8",
                   expected_sha256: str = NVLABS_INCEPTION_SHA256) -> nn.Module:
    """Load the user's TorchScript Inception after checking its SHA-256; a clear ConfigError when
    the file is missing, too large or not the expected one (then nothing of it was executed)."""
    if path is None:
        raise ConfigError(
            "evaluate.inception_path is not set: Inception FID needs a local TorchScript Inception file",
            hint="place NVlabs' inception-2015-12-05.pt on disk and set evaluate.inception_path to it "
                 "(nothing is downloaded at run time), or leave compute_inception_fid off",
        )
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"evaluate.inception_path: file {str(p)!r} does not exist",
                          hint="point it at a local TorchScript Inception (e.g. inception-2015-12-05.pt)")
    content = _read_bounded(p)
    if hashlib.sha256(content).hexdigest() != expected_sha256.lower():
        raise ConfigError(
            "evaluate.inception_path: the file's SHA-256 is not evaluate.inception_sha256; refusing to "
            "load it (a TorchScript file runs its own code)",
            hint="use NVIDIA's inception-2015-12-05.pt, or set evaluate.inception_sha256 to the SHA-256 "
                 "of a file you trust")
    scripted = torch.jit.load(io.BytesIO(content), map_location="cpu").eval()
    return InceptionAdapter(scripted, convention).eval()


def _read_bounded(path: Path) -> bytes:
    with path.open("rb") as f:
        content = f.read(MAX_INCEPTION_BYTES + 1)
    if len(content) > MAX_INCEPTION_BYTES:
        raise ConfigError(f"evaluate.inception_path: accepted: files up to {MAX_INCEPTION_BYTES >> 20} MiB")
    return content


def to_uint8_pixels(images: Tensor) -> Tensor:
    """(N, C, H, W) floats in [0, 1] -> uint8 0..255, rounding v * 255 to the nearest integer (the
    same rounding as images.to_uint8, which writes PNGs)."""
    return (images.clamp(0, 1) * 255).round().to(torch.uint8)


@torch.no_grad()
def inception_fid(real: Tensor, fake: Tensor, inception: nn.Module, batch_size: int = 64) -> float:
    """FID between (N, C, H, W) image sets in [0, 1] with torchmetrics and a local Inception
    (an `InceptionAdapter`, as returned by `load_inception`)."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    metric = FrechetInceptionDistance(feature=inception)  # normalize=False: it receives uint8
    for images, is_real in ((real, True), (fake, False)):
        for chunk in images.split(batch_size):
            metric.update(to_uint8_pixels(chunk), real=is_real)
    return float(metric.compute())
