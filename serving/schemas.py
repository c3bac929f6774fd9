"""The HTTP API's request and response bodies (also the OpenAPI schema at /docs).

Seeds: image i of a request is drawn with seed `seed + i`; when `seed` is null the server draws a
random base seed and returns the seeds it used, so that any image can be regenerated exactly.
"""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field

from diffusion_core.sampling_defaults import SamplerName
from serving.config import ModelSelection


class GenerateRequest(BaseModel):
    """POST /generate. Every field has a default; ranges that depend on the server (num_images, steps,
    num_images * steps, labels) are checked against its limits and the loaded model."""

    model_config = ConfigDict(extra="forbid")

    num_images: int = Field(1, description="images to generate (1..max_images_per_request)")
    steps: int | None = Field(None, description="sampler steps (1..max_steps); null -> server default")
    sampler: SamplerName | None = Field(None, description="dpmpp_2m, ddim or ddpm; null -> server default")
    guidance_scale: float = Field(1.0, ge=0.0, le=50.0, allow_inf_nan=False,
                                  description="classifier-free guidance w (1 = no guidance)")
    eta: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False, description="DDIM stochasticity")
    labels: list[int] | None = Field(None, description="one class per image; null -> unconditional")
    seed: int | None = Field(None, ge=0, description="image i uses seed + i; null -> random base seed")
    format: Literal["png", "array"] = Field("png", description="base64 PNGs or floats in [0, 1]")


class ModelRef(BaseModel):
    name: str
    version: str | None
    alias: str | None


class Timings(BaseModel):
    queue_s: float = Field(description="from arrival at the model replica to the start of its run")
    sampling_s: float = Field(description="the reverse-sampling run(s) that produced the images")
    total_s: float = Field(description="inside the ingress, end to end")
    batch_images: int = Field(description="images in the largest run this request shared")
    batch_total_images: int = Field(description="images in the whole batch (all its runs) this request "
                                    "was part of; at most max(max_images_per_batch, the request's own)")


class GenerateResponse(BaseModel):
    model: ModelRef
    seeds: list[int]
    labels: list[int] | None
    shape: list[int] = Field(description="(num_images, C, H, W)")
    format: Literal["png", "array"]
    images: list[str] | list[list[list[list[float]]]] = Field(
        description="base64 PNG per image, or nested floats in [0, 1] shaped (num_images, C, H, W)")
    timings: Timings


class ModelInfo(BaseModel):
    """GET /model."""

    name: str
    version: str | None
    alias: str | None
    source: str = Field(description="models:/... URI or local checkpoint path")
    metrics: dict[str, float] = Field(description="numeric tags of the registered version (evaluation)")
    tags: dict[str, str]
    image_shape: list[int] = Field(description="(C, H, W)")
    num_classes: int | None
    label_names: list[str] | None
    prediction: str
    weights: str
    device: str
    loaded_at: float
    replica: str = Field("", description="id of the Serve replica that answered (unchanged by a hot swap)")
    last_load_error: str | None = Field(None, description="a failed hot swap; the previous model is kept")


class ReplicaLoadState(BaseModel):
    """What one model replica serves, and which selection its last failed load was for (so that a
    caller waiting for a swap can tell an earlier swap's failure from its own)."""

    info: ModelInfo
    failed_selection: ModelSelection | None = None
