"""The Ray Serve application: `build_app(args)` is the builder that `serve run`, `serve deploy` and
KubeRay's RayService import (`import_path: serving.app:build_app`, `args:` = ServeSettings fields).

    serve run serving/serve_config.yaml                        # the packaged config
    serve run serving.app:build_app model_name=digits alias=champion tracking_uri=http://...

Graph: GenerationIngress (FastAPI: guard, validation, PNG encoding; no torch) -> DiffusionModel
(one batching.Batcher, the sampler).
`build_app` sets the options that follow from the settings (queue bounds, the model's user_config);
replicas, autoscaling and ray_actor_options come from the deployments section of the Serve config
file, which Serve applies on top.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError
from ray.serve import Application

from diffusion_core.errors import config_error_from
from serving.config import ServeSettings
from serving.ingress import GenerationIngress
from serving.model_deployment import DiffusionModel


def parse_settings(args: ServeSettings | dict[str, Any] | None) -> ServeSettings:
    """ServeSettings from the builder's args; a bad value -> ConfigError naming `serve.<field>`."""
    if isinstance(args, ServeSettings):
        return args
    try:
        return ServeSettings.model_validate(args or {})
    except ValidationError as err:
        raise config_error_from(err, prefix="serve") from None


def build_app(args: ServeSettings | dict[str, Any] | None = None) -> Application:
    """The application for `args` (ServeSettings or its fields as a dict)."""
    settings = parse_settings(args)
    model = DiffusionModel.options(
        max_ongoing_requests=settings.model_max_ongoing_requests,
        max_queued_requests=settings.max_queued_requests,
        user_config=settings.model_deployment_config().model_dump(mode="json"),
    ).bind()
    ingress = GenerationIngress.options(
        max_ongoing_requests=settings.ingress_max_ongoing_requests,
        max_queued_requests=settings.ingress_max_queued_requests,
    )
    return ingress.bind(model, settings.app_args())
