"""Serving configuration: `ServeSettings` (the `serve` config section and the Serve app's args) and
`ModelDeploymentConfig` (the model deployment's Serve `user_config`, the part that changes on a hot swap).

Where each knob lives:

- `ServeSettings` (this module): which model to load, request limits, batching, queue bounds, HTTP
  host/port/route prefix, the API-key variable. It is the `args:` mapping of the application in
  serving/serve_config.yaml and the `serve` section of the diffusion-pipeline config file.
- serving/serve_config.yaml: replicas, autoscaling and `ray_actor_options` (num_cpus, num_gpus) of each
  deployment, which Serve applies on top of what `build_app` sets.
- `ModelDeploymentConfig`: derived from `ServeSettings`; Serve passes it to the model deployment's
  `reconfigure`, so changing it (a new model version) swaps the model without restarting replicas.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Self

from pydantic import BaseModel, ConfigDict, Field, model_validator

from diffusion_core.sampling_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS, SamplerName

SERVE_CONFIG_PATH = Path(__file__).with_name("serve_config.yaml")
MODEL_DEPLOYMENT = "DiffusionModel"
INGRESS_DEPLOYMENT = "GenerationIngress"


class ModelSelection(BaseModel):
    """Which model a replica serves: a registry version (`models:/<name>/<version>`, or the version that
    `alias` points to when `version` is None), or a local checkpoint directory for development."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(min_length=1)
    alias: str | None = Field(None, description="registry alias; resolved when version is None")
    version: str | None = Field(None, description="pinned registry version (wins over alias)")
    tracking_uri: str | None = Field(None, description="MLflow tracking URI; None -> MLflow's default")
    checkpoint_dir: str | None = Field(None, description="local checkpoint instead of the registry")

    @model_validator(mode="after")
    def _check_source(self) -> Self:
        if self.checkpoint_dir is None and self.alias is None and self.version is None:
            raise ValueError("alias/version: give an alias, a version or a checkpoint_dir")
        return self


class ModelDeploymentConfig(BaseModel):
    """The model deployment's Serve `user_config` (applied by `reconfigure`); built by
    `ServeSettings.model_deployment_config`, which holds the defaults."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model: ModelSelection
    device: str = Field(description="torch device: cpu, cuda, cuda:0 ...")
    max_images_per_batch: int = Field(ge=1, description="images in one reverse-sampling run")
    batch_wait_timeout_s: float = Field(ge=0.0, le=10.0)


class ServeSettings(BaseModel):
    """Section `serve` of the config file and the args of `serving.app:build_app`.

    The per-request cost cap is `num_images * steps <= max_work`. `max_ongoing_requests` and
    `max_queued_requests` bound the model deployment: beyond ongoing + queued requests the ingress
    answers 503 at once instead of queueing without limit. These fields are the one source of
    defaults: the deployment decorators take theirs from here (`settings_default`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Which model.
    model_name: str = Field("diffusion-digits", min_length=1)
    alias: str | None = "champion"
    version: str | None = None
    tracking_uri: str | None = None
    checkpoint_dir: str | None = None
    device: str = "cpu"
    # HTTP.
    app_name: str = Field("diffusion", min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = Field("/", pattern=r"^/")
    api_key_env: str | None = Field(None, description="name of the env var holding the bearer token")
    # Per-request limits.
    max_images_per_request: int = Field(64, ge=1)
    max_steps: int = Field(200, ge=1)
    max_work: int = Field(64 * 50, ge=1, description="cap on num_images * steps per request")
    default_steps: int = Field(DEFAULT_STEPS, ge=1)
    default_sampler: SamplerName = DEFAULT_SAMPLER
    # Batching and back-pressure.
    max_images_per_batch: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(
        0.05, ge=0.0, le=10.0, description="how long a batch waits to fill; under load, a longer wait "
        "packs larger runs (measured in benchmarks/serve.py); an idle server adds it to latency")
    max_ongoing_requests: int | None = Field(
        None, ge=1, description="model deployment; None -> 2 * max_images_per_batch (a running batch "
        "plus a full next one), since Serve's default of 5 would silently cap batches")
    max_queued_requests: int = Field(
        64, ge=1, description="model deployment: requests waiting beyond the ongoing ones, then 503. It "
        "also bounds a burst of simultaneous arrivals (they queue briefly while being assigned), so keep "
        "it at least the expected burst size")
    ingress_max_ongoing_requests: int = Field(
        256, ge=1, description="ingress replica: requests it handles at once (each only validates, waits "
        "for the model and encodes PNGs, so this is generous; the model's queue is the real bound)")
    ingress_max_queued_requests: int = Field(
        256, ge=1, description="ingress: requests the proxy holds beyond the ongoing ones, then 503")
    request_timeout_s: float = Field(
        300.0, gt=0.0, description="deadline for the ingress's wait on the model deployment (queue + "
        "sampling): past it /generate answers 504 and /model 503 instead of hanging, e.g. while no "
        "model replica is healthy. Keep it above the worst case max_work takes on the slowest device")

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps: {self.default_steps} exceeds max_steps={self.max_steps}")
        ongoing = self.model_max_ongoing_requests
        if ongoing < self.max_images_per_batch:
            raise ValueError(f"max_ongoing_requests: {ongoing} would cap batches below "
                             f"max_images_per_batch={self.max_images_per_batch}; accepted: >= it")
        ModelSelection.model_validate(self._selection_fields())  # same rules as a hot swap
        return self

    @property
    def model_max_ongoing_requests(self) -> int:
        return self.max_ongoing_requests or 2 * self.max_images_per_batch

    def _selection_fields(self) -> dict[str, str | None]:
        return {"model_name": self.model_name, "alias": self.alias, "version": self.version,
                "tracking_uri": self.tracking_uri, "checkpoint_dir": self.checkpoint_dir}

    def model_selection(self) -> ModelSelection:
        return ModelSelection(**self._selection_fields())

    def model_deployment_config(self) -> ModelDeploymentConfig:
        return ModelDeploymentConfig(
            model=self.model_selection(), device=self.device,
            max_images_per_batch=self.max_images_per_batch, batch_wait_timeout_s=self.batch_wait_timeout_s,
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.route_prefix.rstrip('/')}"


def settings_default(field: str) -> Any:
    """The ServeSettings default of `field`, for decorator arguments that Serve needs at import time
    (build_app and reconfigure then set the configured values)."""
    return ServeSettings.model_fields[field].default
