"""Check every deployment manifest under infra/ against the schemas that would enforce it.

- KubeRay resources (RayCluster, RayJob, RayService) against the OpenAPI v3 schemas of the KubeRay
  CRDs in infra/schemas/kuberay-crds/ (copied unchanged from the operator's release).
- Core Kubernetes resources (Deployment, Service, NetworkPolicy, ...) against the Kubernetes
  OpenAPI schemas that the `kubernetes-validate` package carries, for KUBERNETES_VERSION.
- A RayService's `serveConfigV2` against Ray Serve's own config schema (`ray.serve.schema`).
- The kustomization and the compose file, which no published schema covers offline, against the
  field names of their formats.

Unknown fields are errors everywhere: the API server rejects them under strict field validation
(kubectl's default) or silently drops them, and Serve ignores an unknown deployment option, so a
misspelled `autoscaling_config` would leave the app unscaled without a word.

    python -m infra.validate          # exit 1 and list the problems, if any
"""

from __future__ import annotations

import argparse
import functools
import logging
import sys
import types
import typing
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import jsonschema
import yaml

REPO_ROOT = Path(__file__).resolve().parent.parent
INFRA_DIR = REPO_ROOT / "infra"
K8S_DIR = INFRA_DIR / "k8s"
COMPOSE_PATH = INFRA_DIR / "compose" / "compose.yaml"
CRD_DIR = INFRA_DIR / "schemas" / "kuberay-crds"
# The oldest Kubernetes the manifests support (README prerequisites): a field added later fails.
KUBERNETES_VERSION = "1.30"
KUSTOMIZE_API_VERSION = "kustomize.config.k8s.io/v1beta1"

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Problem:
    """One schema violation: which file, which resource, where in it, and what is wrong."""

    path: str
    resource: str
    location: str
    message: str

    def __str__(self) -> str:
        where = f"{self.resource} at {self.location}" if self.location else self.resource
        return f"{self.path}: {where}: {self.message}"


# ---------------------------------------------------------------- schemas


def _fast_yaml_load_all(text: str) -> list[Any]:
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # the CRDs are megabytes of YAML
    return list(yaml.load_all(text, Loader=loader))


def forbid_unknown_fields(schema: Any) -> Any:
    """`schema` with `additionalProperties: false` on every object that lists its properties.

    Structural CRD schemas leave it implicit: the API server prunes or (strict field validation)
    rejects unknown fields itself, whereas a JSON-Schema validator would accept them. Objects marked
    `x-kubernetes-preserve-unknown-fields` stay open, as they do in the cluster.
    """
    if isinstance(schema, list):
        return [forbid_unknown_fields(item) for item in schema]
    if not isinstance(schema, dict):
        return schema
    out = {key: forbid_unknown_fields(value) for key, value in schema.items()}
    if ("properties" in out and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")):
        out["additionalProperties"] = False
    return out


@functools.cache
def crd_schemas(crd_dir: Path = CRD_DIR) -> dict[tuple[str, str], dict[str, Any]]:
    """(apiVersion, kind) -> strict JSON schema of every CRD version in `crd_dir`."""
    schemas = {}
    paths = sorted(crd_dir.glob("*.yaml"))
    if not paths:
        raise FileNotFoundError(f"no CRD in {crd_dir}: the KubeRay schemas are part of the repository")
    for path in paths:
        for crd in _fast_yaml_load_all(path.read_text()):
            group, kind = crd["spec"]["group"], crd["spec"]["names"]["kind"]
            for version in crd["spec"]["versions"]:
                schema = version["schema"]["openAPIV3Schema"]
                schemas[(f"{group}/{version['name']}", kind)] = forbid_unknown_fields(schema)
    return schemas


def _location(error: jsonschema.ValidationError) -> str:
    parts = []
    for part in error.absolute_path:
        parts.append(f"[{part}]" if isinstance(part, int) else f".{part}")
    return "".join(parts).lstrip(".")


def _schema_errors(schema: dict[str, Any], doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    validator = jsonschema.Draft7Validator(schema)
    for error in sorted(validator.iter_errors(doc), key=lambda e: list(map(str, e.absolute_path))):
        yield _location(error), error.message


# ---------------------------------------------------------------- per kind


def _core_errors(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    """A core Kubernetes resource against the API's schema (strict: no unknown fields)."""
    import kubernetes_validate

    try:
        kubernetes_validate.validate(doc, KUBERNETES_VERSION, strict=True)
    except kubernetes_validate.ValidationError as err:
        yield _location(err), err.message
    except kubernetes_validate.SchemaNotFoundError as err:
        yield "", err.message


def _object_meta_errors(meta: Any) -> Iterator[tuple[str, str]]:
    """A custom resource's metadata against Kubernetes' ObjectMeta (CRDs leave it unchecked).

    kubernetes-validate validates whole resources only, so the metadata travels in the smallest
    resource that has nothing else: a ConfigMap.
    """
    yield from _core_errors({"apiVersion": "v1", "kind": "ConfigMap", "metadata": meta})


def _custom_resource_errors(doc: dict[str, Any]) -> Iterator[tuple[str, str]]:
    schema = crd_schemas().get((doc.get("apiVersion"), doc.get("kind")))
    if schema is None:
        yield "", f"no CRD in {CRD_DIR.relative_to(REPO_ROOT)} defines this apiVersion and kind"
        return
    yield from _schema_errors(schema, doc)
    yield from _object_meta_errors(doc.get("metadata"))
    if doc.get("kind") == "RayService" and isinstance(doc.get("spec", {}).get("serveConfigV2"), str):
        for location, message in serve_config_errors(yaml.safe_load(doc["spec"]["serveConfigV2"])):
            yield f"spec.serveConfigV2:{location}", message


# Kustomization fields (kustomize v5); no schema for them ships with any validator here.
KUSTOMIZATION_FIELDS = frozenset({
    "apiVersion", "kind", "metadata", "resources", "components", "namespace", "namePrefix",
    "nameSuffix", "labels", "commonLabels", "commonAnnotations", "images", "replicas", "patches",
    "patchesStrategicMerge", "patchesJson6902", "configMapGenerator", "secretGenerator",
    "generatorOptions", "generators", "transformers", "validators", "vars", "replacements",
    "crds", "openapi", "buildMetadata", "helmCharts", "helmGlobals", "sortOptions",
})


def _kustomization_errors(doc: dict[str, Any], base: Path) -> Iterator[tuple[str, str]]:
    for key in sorted(set(doc) - KUSTOMIZATION_FIELDS):
        yield key, "unknown Kustomization field"
    for i, resource in enumerate(doc.get("resources", [])):
        if not (base / resource).is_file():
            yield f"resources[{i}]", "names a file that does not exist"


def manifest_errors(doc: Any, base: Path = K8S_DIR) -> Iterator[tuple[str, str]]:
    """(location, message) for every way `doc` breaks the schema of its kind."""
    if not isinstance(doc, dict):
        yield "", "a manifest must be a mapping"
        return
    api_version = str(doc.get("apiVersion", ""))
    if api_version == KUSTOMIZE_API_VERSION:
        yield from _kustomization_errors(doc, base)
    elif api_version.startswith("ray.io/"):
        yield from _custom_resource_errors(doc)
    else:
        yield from _core_errors(doc)


# ---------------------------------------------------------------- Serve config


def _model_types(annotation: Any) -> list[type]:
    """The pydantic model classes inside a field annotation (Optional[X], List[X], Union[...])."""
    from pydantic import BaseModel

    if isinstance(annotation, type) and issubclass(annotation, BaseModel):
        return [annotation]
    origin = typing.get_origin(annotation)
    if origin in (typing.Union, types.UnionType, list, tuple):
        return [m for arg in typing.get_args(annotation) for m in _model_types(arg)]
    return []


def _unknown_fields(model: type, data: Any, where: str) -> Iterator[tuple[str, str]]:
    """Keys of `data` that pydantic `model` (and its nested models) does not define.

    Serve's config models ignore unknown keys: a misspelled option would be dropped silently.
    """
    if not isinstance(data, dict):
        return
    fields = model.model_fields
    aliases = {f.alias for f in fields.values() if f.alias}
    for key, value in data.items():
        if key not in fields and key not in aliases:
            yield f"{where}{key}", f"unknown field of {model.__name__}"
            continue
        nested = _model_types(fields[key].annotation if key in fields else None)
        if not nested:
            continue
        items = value if isinstance(value, list) else [value]
        for i, item in enumerate(items):
            name = item.get("name") if isinstance(item, dict) else None
            index = f"[{name or i}]" if isinstance(value, list) else ""
            yield from _unknown_fields(nested[0], item, f"{where}{key}{index}.")


def serve_config_errors(config: Any) -> Iterator[tuple[str, str]]:
    """A Serve config file (what `serve deploy` takes) against `ray.serve.schema.ServeDeploySchema`."""
    from pydantic import ValidationError
    from ray.serve.schema import ServeDeploySchema

    yield from _unknown_fields(ServeDeploySchema, config, "")
    try:
        ServeDeploySchema.model_validate(config)
    except ValidationError as err:
        for e in err.errors():
            yield ".".join(map(str, e["loc"])), e["msg"]


# ---------------------------------------------------------------- compose

COMPOSE_TOP_LEVEL = frozenset({"version", "name", "include", "services", "networks", "volumes",
                               "secrets", "configs", "models"})
# Service fields of the Compose Specification.
COMPOSE_SERVICE_FIELDS = frozenset({
    "annotations", "attach", "blkio_config", "build", "cap_add", "cap_drop", "cgroup", "cgroup_parent",
    "command", "configs", "container_name", "cpu_count", "cpu_percent", "cpu_period", "cpu_quota",
    "cpu_rt_period", "cpu_rt_runtime", "cpu_shares", "cpus", "cpuset", "credential_spec", "depends_on",
    "deploy", "develop", "device_cgroup_rules", "devices", "dns", "dns_opt", "dns_search", "domainname",
    "entrypoint", "env_file", "environment", "expose", "extends", "external_links", "extra_hosts",
    "gpus", "group_add", "healthcheck", "hostname", "image", "init", "ipc", "isolation", "labels",
    "label_file", "links", "logging", "mac_address", "mem_limit", "mem_reservation", "mem_swappiness",
    "memswap_limit", "models", "network_mode", "networks", "oom_kill_disable", "oom_score_adj", "pid",
    "pids_limit", "platform", "ports", "post_start", "pre_stop", "privileged", "profiles", "provider",
    "pull_policy", "read_only", "restart", "runtime", "scale", "secrets", "security_opt", "shm_size",
    "stdin_open", "stop_grace_period", "stop_signal", "storage_opt", "sysctls", "tmpfs", "tty",
    "ulimits", "use_api_socket", "user", "userns_mode", "uts", "volumes", "volumes_from", "working_dir",
})


def compose_errors(doc: Any) -> Iterator[tuple[str, str]]:
    """Field names and cross-references of a compose file (no compose schema ships offline)."""
    if not isinstance(doc, dict):
        yield "", "a compose file must be a mapping"
        return
    for key in sorted(k for k in doc if k not in COMPOSE_TOP_LEVEL and not k.startswith("x-")):
        yield key, "unknown top-level compose field"
    services = doc.get("services") or {}
    declared = {kind: set(doc.get(kind) or {}) for kind in ("volumes", "configs", "secrets")}
    for name, service in services.items():
        for key in sorted(k for k in service if k not in COMPOSE_SERVICE_FIELDS and not k.startswith("x-")):
            yield f"services.{name}.{key}", "unknown compose service field"
        for dep in service.get("depends_on") or []:
            if dep not in services:
                yield f"services.{name}.depends_on", "names a service that does not exist"
        for kind in ("configs", "secrets"):
            for ref in service.get(kind) or []:
                source = ref.get("source") if isinstance(ref, dict) else ref
                if source not in declared[kind]:
                    yield f"services.{name}.{kind}", f"names a {kind[:-1]} that is not declared"
        for volume in service.get("volumes") or []:
            source = volume.split(":")[0] if isinstance(volume, str) else volume.get("source", "")
            if source and not source.startswith(("/", ".", "$")) and source not in declared["volumes"]:
                yield f"services.{name}.volumes", "names a volume that is not declared"


# ---------------------------------------------------------------- all manifests


def _resource_name(doc: Any) -> str:
    if not isinstance(doc, dict):
        return "document"
    name = (doc.get("metadata") or {}).get("name", "?") if isinstance(doc.get("metadata"), dict) else "?"
    return f"{doc.get('kind', '?')}/{name}"


def manifest_paths(infra_dir: Path = INFRA_DIR) -> list[Path]:
    """The Kubernetes manifests under `infra_dir`: its k8s/ tree (the schemas themselves excluded)."""
    return sorted(p for p in (infra_dir / "k8s").rglob("*.yaml") if p.parent.name != "config")


def validate_file(path: Path) -> list[Problem]:
    """Every problem of the manifests in `path` (a compose file is checked as compose)."""
    rel = str(path.relative_to(REPO_ROOT)) if path.is_relative_to(REPO_ROOT) else str(path)
    try:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
    except yaml.YAMLError as err:
        return [Problem(rel, "file", "", f"not valid YAML: {err}")]
    if path.name == "compose.yaml":
        return [Problem(rel, "compose", loc, msg) for doc in docs for loc, msg in compose_errors(doc)]
    return [Problem(rel, _resource_name(doc), loc, msg)
            for doc in docs for loc, msg in manifest_errors(doc, path.parent)]


def validate_all(infra_dir: Path = INFRA_DIR) -> list[Problem]:
    paths = [*manifest_paths(infra_dir), infra_dir / "compose" / "compose.yaml"]
    return [problem for path in paths for problem in validate_file(path)]


def main(argv: list[str] | None = None) -> int:
    argparse.ArgumentParser(description=__doc__.splitlines()[0]).parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    problems = validate_all()
    for problem in problems:
        logger.error("%s", problem)
    if not problems:
        logger.info("every manifest under infra/ matches its schema")
    return 1 if problems else 0


if __name__ == "__main__":
    sys.exit(main())
