"""The one way the served version changes: every running application serving a registered model
switches to one pinned version. The deploy stage, `promote` and `rollback` all call this.

    version <- the alias, resolved now (switch_to_alias), or given (switch_to_version)
    for each target (ServeSettings.switch_targets()):
      ray      GET the cluster's applications from Serve's REST API; pin the version in the model
               deployment's user_config of each app serving the model; one PUT; watch the apps
      kuberay  pin the version in the RayService's serveConfigV2 (Kubernetes API); KubeRay applies
               it to the running cluster; watch the apps on that cluster's dashboard
    -> SwitchReport: per app switched / unchanged / failed, or missing (named by the target but
       not serving the model there); per target "none" (no app serves the model there) or failed
       (unreachable, refused). failed and missing are failures.

Watching means: Serve reports the model deployment HEALTHY with the pinned user_config, i.e. every
replica has reconfigured to the version, or started with it (serving/pinning.py). Until then the
replicas that have not reconfigured yet serve the previous version, and requests already in a
replica finish on the model they started with. A replica that starts later (autoscaling, restart)
loads the pinned version from its user_config, whatever the alias says by then.

A RayTarget without a dashboard URL means the local Ray: when no dashboard answers there, no app
runs locally and the outcome is "none", not a failure. A target named explicitly must answer.
"""

from __future__ import annotations

import logging
import time
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict

from diffusion_core.adapters.ray_dashboard import local_dashboard_url
from serving.config import KubeRayTarget, RayTarget
from serving.pinning import is_pinned, model_pinned, pin_version, pinned_model, serves_model
from serving.serve_rest import ServeRestClient, ServeRestError, ServeUnreachableError, declarative_configs

logger = logging.getLogger(__name__)

DEFAULT_SWITCH_TIMEOUT_S = 300.0
SwitchAction = Literal["switched", "unchanged", "failed", "missing", "none"]


class SwitchOutcome(BaseModel):
    """One application (or a whole target, when app_name is None) after the switch."""

    model_config = ConfigDict(frozen=True)

    target: str
    app_name: str | None
    action: SwitchAction
    message: str = ""

    def describe(self) -> str:
        app = f"application {self.app_name!r}" if self.app_name else "no application"
        detail = f": {self.message}" if self.message else ""
        return f"{self.action:<9} {app} on {self.target}{detail}"


class SwitchReport(BaseModel):
    model_config = ConfigDict(frozen=True)

    model_name: str
    version: str
    alias: str | None
    outcomes: list[SwitchOutcome]

    @property
    def failures(self) -> list[SwitchOutcome]:
        return [o for o in self.outcomes if o.action in ("failed", "missing")]

    @property
    def serving(self) -> list[SwitchOutcome]:
        """The apps that now serve the version (switched or already did)."""
        return [o for o in self.outcomes if o.action in ("switched", "unchanged")]


def switch_to_alias(model_name: str, alias: str, targets: list[RayTarget | KubeRayTarget],
                    tracking_uri: str | None = None,
                    timeout_s: float = DEFAULT_SWITCH_TIMEOUT_S) -> SwitchReport:
    """Switch the targets to the version that `alias` points to now."""
    from diffusion_core.adapters.mlflow_registry import resolve_version

    version = resolve_version(model_name, alias, tracking_uri).version
    return switch_to_version(model_name, version, alias, targets, timeout_s)


def switch_to_version(model_name: str, version: str, alias: str | None,
                      targets: list[RayTarget | KubeRayTarget],
                      timeout_s: float = DEFAULT_SWITCH_TIMEOUT_S) -> SwitchReport:
    """Pin `version` (recorded as reached through `alias`) in every app of `targets` that serves
    `model_name`, and wait until each serves it or `timeout_s` (shared by all) has passed."""
    deadline = time.monotonic() + timeout_s
    outcomes: list[SwitchOutcome] = []
    for target in targets:
        switch = _switch_kuberay if isinstance(target, KubeRayTarget) else _switch_ray
        outcomes += switch(target, model_name, version, alias, deadline)
    report = SwitchReport(model_name=model_name, version=version, alias=alias, outcomes=outcomes)
    for outcome in outcomes:
        # a target where nothing serves the model is the normal first deploy: not worth a line
        quiet = outcome.action == "none"
        log = logger.error if outcome in report.failures else logger.debug if quiet else logger.info
        log("%s version %s: %s", model_name, version, outcome.describe())
    return report


def _switch_ray(target: RayTarget, model_name: str, version: str, alias: str | None,
                deadline: float) -> list[SwitchOutcome]:
    url = target.dashboard_url or local_dashboard_url()
    where = f"Ray {url}"
    client = ServeRestClient(url)
    try:
        configs = declarative_configs(client.details())
    except ServeUnreachableError as err:
        if target.dashboard_url is None:
            return [SwitchOutcome(target=where, app_name=None, action="none",
                                  message="no local Ray runs Serve")]
        return [SwitchOutcome(target=where, app_name=target.app_name, action="failed", message=str(err))]
    except ServeRestError as err:
        return [SwitchOutcome(target=where, app_name=target.app_name, action="failed", message=str(err))]
    serving = {name: app for name, app in configs.items()
               if serves_model(app, model_name) and target.app_name in (None, name)}
    if not serving:
        return [_nothing_serves(where, model_name, target.app_name)]
    changed = {name: pin_version(app, version, alias) for name, app in serving.items()
               if not is_pinned(app, version, alias)}
    if changed:
        try:
            client.deploy(list(changed.values()))
        except ServeRestError as err:
            return [SwitchOutcome(target=where, app_name=name, action="failed", message=str(err))
                    for name in serving]
    return [_watch(client, where, name, _user_config(app, version, alias),
                   "switched" if name in changed else "unchanged", deadline)
            for name, app in serving.items()]


def _switch_kuberay(target: KubeRayTarget, model_name: str, version: str, alias: str | None,
                    deadline: float) -> list[SwitchOutcome]:
    from kubernetes.client.exceptions import ApiException
    from kubernetes.config.config_exception import ConfigException
    from urllib3.exceptions import HTTPError

    from serving.kuberay import RayServices

    where = f"RayService {target.namespace}/{target.name}"
    try:
        serving, changed = RayServices().pin(target, model_name, version, alias)
    except (ApiException, ConfigException, HTTPError, OSError) as err:
        reason = (f"{err.status} {err.reason}" if isinstance(err, ApiException)
                  else f"{type(err).__name__}: {err}")
        return [SwitchOutcome(target=where, app_name=target.app_name, action="failed",
                              message=f"Kubernetes API: {reason}")]
    if not serving:
        return [_nothing_serves(where, model_name, target.app_name)]
    client = ServeRestClient(target.watch_url())
    return [_watch(client, where, name, user_config, "switched" if name in changed else "unchanged", deadline,
                   written="pinned in the RayService, ")
            for name, user_config in serving.items()]


def _nothing_serves(where: str, model_name: str, app_name: str | None) -> SwitchOutcome:
    if app_name is not None:  # named explicitly: it must be there
        return SwitchOutcome(target=where, app_name=app_name, action="missing",
                             message=f"it does not run there, or does not serve {model_name}")
    return SwitchOutcome(target=where, app_name=None, action="none",
                         message=f"no application serves {model_name}")


def _user_config(app: dict[str, Any], version: str, alias: str | None) -> dict[str, Any]:
    return pinned_model(app, version, alias).model_dump(mode="json")


def _watch(client: ServeRestClient, where: str, app_name: str, user_config: dict[str, Any],
           action: SwitchAction, deadline: float, written: str = "") -> SwitchOutcome:
    """Wait until Serve shows the app's model deployment running `user_config` on every replica."""
    try:
        client.wait_for(lambda details: model_pinned(details, app_name, user_config),
                        f"{app_name} switching", max(0.0, deadline - time.monotonic()))
    except ServeRestError as err:
        return SwitchOutcome(target=where, app_name=app_name, action="failed", message=f"{written}{err}")
    return SwitchOutcome(target=where, app_name=app_name, action=action)
