"""A KubeRay RayService as a switch target: its `spec.serveConfigV2` pins the model version.

KubeRay owns a RayService's Serve config: it re-applies `serveConfigV2` to the running cluster, so
a change made on the cluster alone would be reverted. The version is therefore pinned in the
resource itself, through the Kubernetes API. A change to serveConfigV2 alone (rayClusterConfig
untouched) is applied by KubeRay to the running cluster in place, through Serve's REST API: the
model deployment's user_config changes and its replicas reconfigure without restarting.

The patch is a JSON merge patch of `spec.serveConfigV2` carrying the `metadata.resourceVersion`
it was computed from, so the API server refuses it (409) if someone changed the resource in
between; the switch then reads the resource again.

Credentials: in a pod, its ServiceAccount (infra/k8s/rbac.yaml grants get and patch on the
RayService); elsewhere the current kubeconfig context. The `kubernetes` package loads only here.
"""

from __future__ import annotations

import os
from typing import Any

import yaml

from serving.config import KubeRayTarget
from serving.pinning import is_pinned, pin_version, pinned_model, serves_model

GROUP, VERSION, PLURAL = "ray.io", "v1", "rayservices"
CONFLICT_RETRIES = 3


Pinned = dict[str, dict[str, Any]]  # app name -> the model deployment's pinned user_config


def pin_serve_config_v2(text: str, model_name: str, version: str, alias: str | None,
                        app_name: str | None = None) -> tuple[str, Pinned, list[str]]:
    """serveConfigV2 (YAML text) with `version` pinned in every app serving `model_name` (only
    `app_name` when given) -> (new text, each app serving the model with its pinned user_config,
    the apps whose config changed). The text is returned unchanged when no app changes."""
    config = yaml.safe_load(text) or {}
    serving: Pinned = {}
    changed, apps = [], []
    for app in config.get("applications") or []:
        if serves_model(app, model_name) and app_name in (None, app.get("name")):
            if not is_pinned(app, version, alias):
                changed.append(app["name"])
                app = pin_version(app, version, alias)
            serving[app["name"]] = pinned_model(app, version, alias).model_dump(mode="json")
        apps.append(app)
    if not changed:
        return text, serving, changed
    return yaml.safe_dump({**config, "applications": apps}, sort_keys=False, width=100), serving, changed


def rayservice_patch(resource: dict[str, Any], model_name: str, version: str, alias: str | None,
                     app_name: str | None = None) -> tuple[dict[str, Any] | None, Pinned, list[str]]:
    """The merge patch that pins `version` in a RayService resource (None when nothing changes),
    the apps serving the model, and the apps it changes."""
    text = resource["spec"]["serveConfigV2"]
    new, serving, changed = pin_serve_config_v2(text, model_name, version, alias, app_name)
    if not changed:
        return None, serving, changed
    patch = {"metadata": {"resourceVersion": resource["metadata"]["resourceVersion"]},
             "spec": {"serveConfigV2": new}}
    return patch, serving, changed


class RayServices:
    """get and patch RayService resources with this process's Kubernetes credentials."""

    def __init__(self) -> None:
        from kubernetes import client, config

        configuration = client.Configuration()
        if os.environ.get("KUBERNETES_SERVICE_HOST"):  # set in every pod
            config.load_incluster_config(client_configuration=configuration)
        else:
            config.load_kube_config(client_configuration=configuration, persist_config=False)
        self._api = client.CustomObjectsApi(client.ApiClient(configuration))

    def get(self, target: KubeRayTarget) -> dict[str, Any]:
        return self._api.get_namespaced_custom_object(GROUP, VERSION, target.namespace, PLURAL, target.name)

    def pin(self, target: KubeRayTarget, model_name: str, version: str,
            alias: str | None) -> tuple[Pinned, list[str]]:
        """Pin `version` in the RayService (read, patch, and again on a conflict) -> (the apps
        serving the model, those whose config changed)."""
        from kubernetes.client.exceptions import ApiException

        conflicts = 0
        while True:
            patch, serving, changed = rayservice_patch(self.get(target), model_name, version, alias,
                                                       target.app_name)
            if patch is None:
                return serving, changed
            try:
                self._api.patch_namespaced_custom_object(GROUP, VERSION, target.namespace, PLURAL,
                                                         target.name, patch)
                return serving, changed
            except ApiException as err:
                conflicts += 1
                if err.status != 409 or conflicts >= CONFLICT_RETRIES:
                    raise
