"""Scheduled retraining: one definition of the `retrain` deployment, served two ways.

- `flow.serve` style (one process, no infrastructure): `serve_retraining(schedule, config)`, which
  `diffusion-pipeline schedule --cron ...` calls.
- A work-pool deployment in `prefect.yaml` (`prefect deploy --name retrain-nightly`, then
  `prefect worker start --pool diffusion-pool`); `prefect_yaml_entry` renders that entry, and a
  test keeps the committed file equal to it.

Both run one retrain at a time (a deployment concurrency limit of 1; a run triggered while another
is running waits for it): two runs would write the same dataset, checkpoints and registry aliases.
Deployment parameters are stored and shown by Prefect, so they never carry credentials.
"""

from __future__ import annotations

from typing import Any

from pydantic import BaseModel, ConfigDict, Field, field_validator

from diffusion_core.errors import ConfigError
from diffusion_core.redact import has_credentials

ENTRYPOINT = "flows/pipeline.py:retrain"
DESCRIPTION = "Scheduled retraining: prepare -> train -> evaluate/register -> deploy"
# At most one retrain at a time; a run that finds the slot taken waits (ENQUEUE) rather than
# being cancelled, so a manual trigger during the nightly run is not lost.
CONCURRENCY_LIMIT = 1
COLLISION_STRATEGY = "ENQUEUE"


class RetrainSchedule(BaseModel):
    """When and where scheduled retraining runs (config section `schedule`)."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    deployment_name: str = Field("retrain-nightly", min_length=1)
    cron: str = Field("0 3 * * *", description="five-field cron expression")
    timezone: str = "UTC"
    work_pool: str = Field("diffusion-pool", min_length=1)
    tags: tuple[str, ...] = ("diffusion", "retrain")

    @field_validator("timezone")
    @classmethod
    def _valid_timezone(cls, value: str) -> str:
        from zoneinfo import ZoneInfo, ZoneInfoNotFoundError

        try:
            ZoneInfo(value)
        except (ZoneInfoNotFoundError, ValueError):
            raise ConfigError("schedule.timezone: not an IANA time zone name; accepted: e.g. 'UTC', "
                              "'Europe/Paris'") from None
        return value

    @field_validator("cron")
    @classmethod
    def _valid_cron(cls, value: str) -> str:
        from prefect.client.schemas.schedules import CronSchedule

        try:
            CronSchedule(cron=value)
        except ValueError:
            raise ConfigError("schedule.cron: not a cron expression; accepted: five fields (minute hour "
                              "day-of-month month day-of-week), e.g. '0 3 * * *'") from None
        if len(value.split()) != 5:
            raise ConfigError(f"schedule.cron: has {len(value.split())} fields; accepted: five")
        return value


def deployment_parameters(config: Any) -> dict[str, Any]:
    """Flow-run parameters of `retrain` for a PipelineConfig (only what differs from defaults).

    None gives no parameters: each run then reads its configuration where it runs (the file named by
    DIFFUSION_PIPELINE_CONFIG, then MLFLOW_TRACKING_URI / RAY_ADDRESS), which is what a work pool on
    a cluster wants; `diffusion-pipeline schedule` passes the config it was given instead.
    """
    if config is None:
        return {}
    parameters = config.model_dump(mode="json", exclude_defaults=True)
    if fields := _fields_with_credentials(parameters):
        raise ConfigError(
            f"{', '.join(fields)}: carries credentials, which a deployment would store and show; "
            "accepted: a URI without them, with the credentials in the environment of the runs "
            "(e.g. MLFLOW_TRACKING_USERNAME / MLFLOW_TRACKING_PASSWORD)")
    return {"config": parameters}


def _fields_with_credentials(data: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the string values in `data` (nested) that embed credentials."""
    found: list[str] = []
    for key, value in data.items():
        if isinstance(value, dict):
            found += _fields_with_credentials(value, f"{prefix}{key}.")
        elif isinstance(value, str) and has_credentials(value):
            found.append(f"{prefix}{key}")
    return found


def runner_deployment(schedule: RetrainSchedule, config: Any):  # -> prefect RunnerDeployment
    """The `flow.serve` form of the deployment: retrain with `config` on `schedule.cron`."""
    from prefect.client.schemas.objects import ConcurrencyLimitConfig
    from prefect.client.schemas.schedules import CronSchedule

    from flows.pipeline import retrain

    return retrain.to_deployment(
        name=schedule.deployment_name,
        schedules=[CronSchedule(cron=schedule.cron, timezone=schedule.timezone)],
        parameters=deployment_parameters(config),
        tags=list(schedule.tags),
        description=DESCRIPTION,
        concurrency_limit=ConcurrencyLimitConfig(limit=CONCURRENCY_LIMIT,
                                                 collision_strategy=COLLISION_STRATEGY),
    )


def serve_retraining(schedule: RetrainSchedule, config: Any) -> None:
    """Serve the scheduled deployment from this process until interrupted (no work pool needed)."""
    from prefect import serve

    serve(runner_deployment(schedule, config))


def prefect_yaml_entry(schedule: RetrainSchedule, config: Any) -> dict[str, Any]:
    """The `deployments:` entry of prefect.yaml for the same deployment, run by a work pool."""
    return {
        "name": schedule.deployment_name,
        "entrypoint": ENTRYPOINT,
        "description": DESCRIPTION,
        "tags": list(schedule.tags),
        "parameters": deployment_parameters(config),
        "concurrency_limit": {"limit": CONCURRENCY_LIMIT, "collision_strategy": COLLISION_STRATEGY},
        "work_pool": {"name": schedule.work_pool, "work_queue_name": "default", "job_variables": {}},
        "schedules": [{"cron": schedule.cron, "timezone": schedule.timezone, "active": True}],
    }


PREFECT_YAML_HEADER = """\
# Prefect deployments of this project. GENERATED by `python -m flows.schedule > prefect.yaml`
# from flows/schedule.py (the same definition `diffusion-pipeline schedule` serves); a test keeps
# the two equal. Register with `prefect deploy --all`; run with
# `prefect worker start --pool diffusion-pool` in the project image (workdir /home/ray/app).
"""


def render_prefect_yaml(schedule: RetrainSchedule | None = None, config: Any = None) -> str:
    """prefect.yaml for the default schedule; with no `config`, runs read the worker's config file."""
    import yaml

    schedule = schedule or RetrainSchedule()
    document = {
        "name": "diffusion-pipeline",
        "prefect-version": "3.9.1",
        "build": None,
        "push": None,
        "pull": [{"prefect.deployments.steps.set_working_directory": {"directory": "/home/ray/app"}}],
        "deployments": [prefect_yaml_entry(schedule, config)],
    }
    return PREFECT_YAML_HEADER + yaml.safe_dump(document, sort_keys=False)


if __name__ == "__main__":
    import sys

    sys.stdout.write(render_prefect_yaml())
