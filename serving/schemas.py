"""The HTTP API's request and response bodies (also the OpenAPI schema at /docs).

Seeds: image i of a request is drawn with seed `seed + i`; when `seed` is null the server draws a
random base seed and returns the seeds it used, so that any image can be regenerated exactly.
"""

from __future__ import annotations

from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from diffusion_core.errors import ConfigError
from diffusion_core.sampling_defaults import (
    DEFAULT_GUIDANCE_SCALE,
    ETA_SAMPLERS,
    MAX_SEED,
    NULL_LABEL,
    SAMPLER_NAMES,
    SamplerName,
    check_label_count,
)
from serving.config import ServeSettings

Label = Annotated[int, Field(ge=NULL_LABEL, description="a class of the model, or -1 (unconditional)")]
LABELS_DESCRIPTION = (
    "one class per image (exactly num_images), -1 for the null label. null: for a class-conditional "
    "model each image's class is drawn from the training data's class prior (GET /model: "
    "class_prior) by the image's seed, i.e. a sample of the model's marginal; the answer reports "
    "the classes drawn. Each must be a class of the served model (GET /model: num_classes)")


class GenerateRequest(BaseModel):
    """POST /generate. Every field has a default. Types are strict: `"num_images": "2"` or `true` is
    refused, not converted. `request_model` narrows the ranges to a server's limits."""

    model_config = ConfigDict(extra="forbid", strict=True)

    num_images: int = Field(1, ge=1, description="images to generate")
    steps: int | None = Field(None, ge=1, description="sampler steps; null -> server default")
    sampler: SamplerName | None = Field(None, description="null -> server default")
    guidance_scale: float = Field(DEFAULT_GUIDANCE_SCALE, ge=0.0, le=50.0, allow_inf_nan=False,
                                  description="classifier-free guidance w (1 = no guidance)")
    eta: float = Field(0.0, ge=0.0, le=1.0, allow_inf_nan=False,
                       description=f"stochasticity; non-zero only for {', '.join(ETA_SAMPLERS)}")
    labels: list[Label] | None = Field(None, description=LABELS_DESCRIPTION)
    unconditional: bool = Field(False, description="with no labels: the null label (the model's "
                                "unconditional estimate) for every image instead of classes drawn "
                                "from the class prior")
    seed: int | None = Field(None, ge=0, le=MAX_SEED, description="image i uses seed + i (seed + "
                             "num_images - 1 at most MAX_SEED); null -> random base seed")
    format: Literal["png", "array"] = Field("png", description="base64 PNGs or floats in [0, 1]")

    @model_validator(mode="after")
    def _consistent(self) -> Self:
        check_label_count(self.labels, self.num_images)
        if self.unconditional and self.labels is not None:
            raise ConfigError("unconditional: accepted: true only without labels (label -1 asks for the "
                              "null label image by image)")
        if self.seed is not None and self.seed + self.num_images - 1 > MAX_SEED:
            raise ConfigError(f"seed: seed + num_images - 1 must not exceed {MAX_SEED}")
        if self.eta != 0.0 and self.sampler is not None and self.sampler not in ETA_SAMPLERS:
            raise ConfigError(f"eta: only used by {', '.join(ETA_SAMPLERS)}; accepted: 0 for another sampler")
        return self


def request_model(settings: ServeSettings) -> type[GenerateRequest]:
    """GenerateRequest within `settings`' limits, with null steps and sampler set to its defaults.

    The ranges are in the schema (the OpenAPI document then says what this server accepts); the work
    cap and the eta rule for the default sampler, which combine fields, are checked after.
    """
    max_images = settings.max_images_per_request

    def within_limits(request: GenerateRequest) -> GenerateRequest:
        request.steps = settings.default_steps if request.steps is None else request.steps
        request.sampler = settings.default_sampler if request.sampler is None else request.sampler
        if request.num_images * request.steps > settings.max_work:
            raise ConfigError(f"num_images * steps: exceeds the per-request work cap; accepted: "
                              f"<= {settings.max_work}")
        if request.eta != 0.0 and request.sampler not in ETA_SAMPLERS:
            raise ConfigError(f"eta: only used by {', '.join(ETA_SAMPLERS)}; accepted: 0 for sampler "
                              f"{request.sampler}")
        return request

    return create_model(
        "GenerateRequest", __base__=GenerateRequest,
        __validators__={"_within_limits": model_validator(mode="after")(within_limits)},
        num_images=(int, Field(1, ge=1, le=max_images, description="images to generate")),
        steps=(int | None, Field(None, ge=1, le=settings.max_steps, description=(
            f"sampler steps; null -> {settings.default_steps}. num_images * steps <= {settings.max_work}"))),
        sampler=(SamplerName | None, Field(None, description=f"null -> {settings.default_sampler}")),
        labels=(list[Label] | None, Field(None, max_length=max_images, description=LABELS_DESCRIPTION)),
    )


class ModelRef(BaseModel):
    name: str
    version: str | None
    alias: str | None


class Timings(BaseModel):
    """Where a request's time went on the server. The rest of what a client measures is the HTTP
    proxy, the network and the client itself."""

    queue_s: float = Field(description="from arrival at the model replica to the start of its turn")
    sampling_s: float = Field(description="from the start of its turn to its last image sampled")
    model_s: float = Field(description="inside the model replica, arrival to answer")
    handle_s: float = Field(description="the ingress's wait on the model deployment (model_s plus the "
                            "handle call's transport)")
    total_s: float = Field(description="inside the ingress, end to end (handle_s plus validation and "
                           "encoding)")
    batch_images: int = Field(description="images in the largest run this request shared")
    batch_total_images: int = Field(description="images in the whole turn (all its runs) this request "
                                    "was part of; at most max(max_images_per_batch, the request's own)")


class GenerateResponse(BaseModel):
    model: ModelRef
    seeds: list[int]
    labels: list[int] | None = Field(description="the class each image was sampled with (-1: the null "
                                     "label); null for a model without classes")
    shape: list[int] = Field(description="(num_images, C, H, W)")
    format: Literal["png", "array"]
    images: list[str] | list[list[list[list[float]]]] = Field(
        description="base64 PNG per image, or nested floats in [0, 1] shaped (num_images, C, H, W)")
    timings: Timings


class RequestLimits(BaseModel):
    """What one POST /generate may ask of the endpoint that answered (its ServeSettings): clients
    split larger jobs by it, and the page sets its form's bounds from it."""

    max_images_per_request: int
    max_steps: int
    max_work: int = Field(description="cap on num_images * steps")
    default_steps: int
    default_sampler: str
    samplers: list[str]

    @classmethod
    def of(cls, settings: ServeSettings) -> RequestLimits:
        return cls(max_images_per_request=settings.max_images_per_request, max_steps=settings.max_steps,
                   max_work=settings.max_work, default_steps=settings.default_steps,
                   default_sampler=settings.default_sampler, samplers=list(SAMPLER_NAMES))


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
    class_prior: list[float] | None = Field(description="p(class) that a request without labels draws "
                                            "each image's class from (the training data's class "
                                            "frequencies); null for a model without classes")
    prediction: str
    weights: str
    device: str
    loaded_at: float
    replica: str = Field("", description="id of the Serve replica that answered (unchanged by a hot swap)")
    limits: RequestLimits | None = Field(None, description="the request limits of the endpoint that "
                                         "answered (set by its ingress; the model replica leaves it null)")


class Health(BaseModel):
    """GET /healthz: readiness only; what is served is at GET /model."""

    status: Literal["ready"]
