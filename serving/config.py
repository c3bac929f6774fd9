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
- `ServeSettings.targets` (`RayTarget`, `KubeRayTarget`): the running applications that a promotion,
  a rollback or the deploy stage switches to the new champion (serving/switch.py). Not an arg of
  the app: it says where apps run, not how one behaves.
"""

from __future__ import annotations

import ipaddress
from pathlib import Path
from typing import Annotated, Literal, Self

from pydantic import BaseModel, ConfigDict, Field, PlainSerializer, model_validator

from diffusion_core.redact import has_credentials, redact_uri, strip_credentials
from diffusion_core.sampling_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS, SamplerName

SERVE_CONFIG_PATH = Path(__file__).with_name("serve_config.yaml")
MODEL_DEPLOYMENT = "DiffusionModel"
INGRESS_DEPLOYMENT = "GenerationIngress"


def without_credentials(uri: str | None) -> str | None:
    """`uri` without user info; a secret left in its query is masked (the URI then no longer
    authenticates, which is the point: secrets travel through the environment)."""
    if not uri:
        return uri
    stripped = strip_credentials(uri)
    return redact_uri(stripped) if has_credentials(stripped) else stripped


# A tracking URI serialised to JSON, which is how it reaches a Serve app's args and the model
# deployment's user_config (Serve records both and shows them in its status and dashboard): without
# credentials. Replicas read them from their environment, as MLflow does: MLFLOW_TRACKING_USERNAME /
# MLFLOW_TRACKING_PASSWORD or MLFLOW_TRACKING_TOKEN. In this process the URI stays as given.
TrackingUri = Annotated[str | None, PlainSerializer(without_credentials, when_used="json")]


class ModelSelection(BaseModel):
    """Which model a replica serves: a registry version (`models:/<name>/<version>`, or the version that
    `alias` points to when `version` is None), or a local checkpoint directory for development."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    model_name: str = Field(min_length=1)
    alias: str | None = Field(None, description="registry alias; resolved when version is None")
    version: str | None = Field(None, description="pinned registry version (wins over alias)")
    tracking_uri: TrackingUri = Field(None, description="MLflow tracking URI; None -> MLflow's default")
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
    request_timeout_s: float = Field(gt=0.0, description="queued work must be able to finish within it")


class RayTarget(BaseModel):
    """Serve applications on a Ray cluster, switched through Serve's REST API on its dashboard.

    dashboard_url None: the Ray this process is connected to, else RAY_DASHBOARD_ADDRESS (the
    variable Ray's `serve deploy` reads), else http://127.0.0.1:8265 (Ray's default port), i.e.
    the local Ray (`ray_dashboard.local_dashboard_url`).
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["ray"] = "ray"
    dashboard_url: str | None = Field(None, pattern=r"^https?://", description="e.g. http://head:8265")
    app_name: str | None = Field(None, min_length=1, description="None: every app serving the model")


class KubeRayTarget(BaseModel):
    """A KubeRay RayService: its `serveConfigV2` is patched through the Kubernetes API (KubeRay then
    applies it to the running cluster in place), and the switch is watched on the cluster's
    dashboard, by default the head service KubeRay creates for the RayService."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    kind: Literal["kuberay"]
    namespace: str = Field(min_length=1)
    name: str = Field(min_length=1, description="the RayService")
    app_name: str | None = Field(None, min_length=1, description="None: every app serving the model")
    dashboard_url: str | None = Field(None, pattern=r"^https?://", description=(
        "None: http://<name>-head-svc.<namespace>.svc.cluster.local:8265"))

    def watch_url(self) -> str:
        return self.dashboard_url or f"http://{self.name}-head-svc.{self.namespace}.svc.cluster.local:8265"


ServeTarget = Annotated[RayTarget | KubeRayTarget, Field(discriminator="kind")]


def is_loopback(host: str) -> bool:
    """Whether `host` only accepts connections from this machine (127.0.0.0/8, ::1, localhost)."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:  # a host name: it resolves to whatever the network says
        return False


class ServeSettings(BaseModel):
    """Section `serve` of the config file and the args of `serving.app:build_app`.

    The per-request cost cap is `num_images * steps <= max_work` ("work": image-steps). Two bounds
    keep the queue short: the model replica admits a request only while the work queued ahead of it
    can be sampled within `request_timeout_s` at its recent rate (else 503 with Retry-After), and
    `max_ongoing_requests` + `max_queued_requests` bound how many requests Serve holds for it (beyond
    them the ingress answers 503 at once). These fields are the one source of defaults.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    # Which model.
    model_name: str = Field("diffusion-digits", min_length=1)
    alias: str | None = "champion"
    version: str | None = None
    tracking_uri: TrackingUri = None
    checkpoint_dir: str | None = None
    device: str = "cpu"
    # HTTP.
    app_name: str = Field("diffusion", min_length=1)
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=1, le=65535)
    route_prefix: str = Field("/", pattern=r"^/")
    api_key_env: str | None = Field(None, description="name of the env var holding the bearer token; "
                                    "required when host is not a loopback address")
    max_body_bytes: int = Field(
        16 * 1024, ge=1024, description="larger request bodies get 413 before they are parsed (a "
        "request of max_images_per_request labels needs well under 1 KiB)")
    # Per-request limits.
    max_images_per_request: int = Field(64, ge=1)
    max_steps: int = Field(200, ge=1)
    max_work: int = Field(64 * 50, ge=1, description="cap on num_images * steps per request")
    default_steps: int = Field(DEFAULT_STEPS, ge=1)
    default_sampler: SamplerName = DEFAULT_SAMPLER
    # Batching and back-pressure.
    max_images_per_batch: int = Field(32, ge=1)
    batch_wait_timeout_s: float = Field(
        0.0, ge=0.0, le=10.0, description="once the model is free, how long the next run waits for "
        "more requests unless max_images_per_batch images already wait (serving.batching). Requests "
        "that arrive while a run samples join the next run without it, so 0 suits steady traffic "
        "(benchmarks/serve.py measured no throughput gain from 5 ms at 8 or 32 clients, and 5 ms more "
        "latency for a lone client); a small wait helps bursts that reach an idle model together")
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
        "sampling): past it /generate answers 504 (and drops the request's images from the queue) and "
        "/model 503 instead of hanging, e.g. while no model replica is healthy. The model replica "
        "admits only the work it can finish within it. Keep it above what max_work takes alone")
    # Where running apps are switched when the champion changes; not an arg of the app (app_args).
    targets: list[ServeTarget] = Field(
        default_factory=list, description="running apps to switch when the champion changes; empty: "
        "the apps of the local Ray (RayTarget())")

    @model_validator(mode="after")
    def _check_consistency(self) -> Self:
        if self.api_key_env is None and not is_loopback(self.host):
            raise ValueError("api_key_env: required when host is not a loopback address (anyone who "
                             "reaches the port could generate); name the variable that holds the key")
        if self.default_steps > self.max_steps:
            raise ValueError(f"default_steps: {self.default_steps} exceeds max_steps={self.max_steps}")
        ongoing = self.model_max_ongoing_requests
        if ongoing < self.max_images_per_batch:
            raise ValueError(f"max_ongoing_requests: {ongoing} would cap batches below "
                             f"max_images_per_batch={self.max_images_per_batch}; accepted: >= it")
        ModelSelection.model_validate(self._selection_fields())  # same rules as a hot swap
        return self

    def app_args(self) -> dict[str, object]:
        """The Serve application's args (JSON): every field but `targets`, which say where apps run."""
        return self.model_dump(mode="json", exclude={"targets"})

    def switch_targets(self) -> list[RayTarget | KubeRayTarget]:
        """`targets`, or the local Ray when none are configured."""
        return list(self.targets) or [RayTarget()]

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
            request_timeout_s=self.request_timeout_s,
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}{self.route_prefix.rstrip('/')}"

