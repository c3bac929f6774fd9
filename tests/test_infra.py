"""The deployment assets under infra/ are real configuration that matches the project.

Every manifest validates against the schema that would enforce it (KubeRay CRDs, Kubernetes API,
Serve config; infra/validate.py); kinds and API versions, images and versions, entrypoints and
module paths, resource requests and the RayService's Serve config are checked against the code and
config files they name; the security settings (token auth, NetworkPolicy, non-root pods, MLflow
authentication, credentials only where needed) hold, and no credential appears as a literal.
"""

from __future__ import annotations

import copy
import importlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import tomllib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from infra import render, validate

REPO = Path(__file__).resolve().parent.parent
INFRA = REPO / "infra"
K8S = INFRA / "k8s"
COMPOSE = INFRA / "compose" / "compose.yaml"
DOCKERFILE = INFRA / "docker" / "Dockerfile"
MLFLOW_DOCKERFILE = INFRA / "docker" / "mlflow.Dockerfile"
SERVE_CONFIG = REPO / "serving" / "serve_config.yaml"
PREFECT_YAML = REPO / "prefect.yaml"
PYPROJECT = tomllib.loads((REPO / "pyproject.toml").read_text())
PROJECT_VERSION = PYPROJECT["project"]["version"]

# kind -> apiVersion of everything the manifests may contain.
API_VERSIONS = {
    "RayCluster": "ray.io/v1", "RayJob": "ray.io/v1", "RayService": "ray.io/v1",
    "Deployment": "apps/v1", "Service": "v1", "Namespace": "v1", "ConfigMap": "v1",
    "NetworkPolicy": "networking.k8s.io/v1", "Kustomization": "kustomize.config.k8s.io/v1beta1",
    "ServiceAccount": "v1", "Role": "rbac.authorization.k8s.io/v1",
    "RoleBinding": "rbac.authorization.k8s.io/v1",
}
POOL = "diffusion-pool"


def k8s_documents() -> Iterator[tuple[Path, dict[str, Any]]]:
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            assert isinstance(doc, dict), f"{path.name}: every document must be a mapping"
            yield path, doc


def docs_of_kind(kind: str) -> list[dict[str, Any]]:
    return [doc for _, doc in k8s_documents() if doc.get("kind") == kind]


def one(kind: str) -> dict[str, Any]:
    docs = docs_of_kind(kind)
    assert len(docs) == 1, f"expected one {kind}, found {len(docs)}"
    return docs[0]


def cluster_specs() -> dict[str, dict[str, Any]]:
    """The Ray cluster spec inside each KubeRay resource, by kind."""
    return {"RayCluster": one("RayCluster")["spec"], "RayJob": one("RayJob")["spec"]["rayClusterSpec"],
            "RayService": one("RayService")["spec"]["rayClusterConfig"]}


def pod_specs(cluster: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["template"]["spec"]


def all_pods() -> Iterator[tuple[str, dict[str, Any]]]:
    """(manifest or kind, pod spec) for every pod template of every workload manifest."""
    for path, doc in k8s_documents():
        if doc["kind"] == "Deployment":
            yield path.name, doc["spec"]["template"]["spec"]
    for kind, cluster in cluster_specs().items():
        for pod in pod_specs(cluster):
            yield kind, pod


def all_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, container) for every container of every workload manifest."""
    for where, pod in all_pods():
        for c in pod["containers"]:
            yield f"{where}:{c['name']}", c


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def require(path: Path) -> None:
    assert path.is_file(), f"{path.relative_to(REPO)} is missing: the manifests are built from it"


# ---------------------------------------------------------------- parsing, kinds, generation


def infra_yaml_files() -> list[Path]:
    """Every YAML file under infra/ that this project writes (the vendored CRD schemas excluded)."""
    return sorted(p for p in INFRA.rglob("*.yaml") if not p.is_relative_to(validate.CRD_DIR))


def test_every_yaml_under_infra_parses() -> None:
    paths = infra_yaml_files()
    assert len(paths) >= 10
    for path in paths:
        docs = [d for d in yaml.safe_load_all(path.read_text()) if d is not None]
        assert docs, f"{path} holds no document"


def test_kinds_and_api_versions() -> None:
    kinds = []
    for path, doc in k8s_documents():
        kind = doc.get("kind")
        assert kind in API_VERSIONS, f"{path.name}: unexpected kind {kind!r}"
        assert doc.get("apiVersion") == API_VERSIONS[kind], f"{path.name}: {kind} apiVersion"
        kinds.append(kind)
    assert {"RayCluster", "RayJob", "Deployment", "Service", "Kustomization"} <= set(kinds)


@pytest.mark.parametrize("name", render.GENERATED)
def test_generated_manifest_is_current(name: str) -> None:
    if name == "rayservice.yaml":
        require(SERVE_CONFIG)
    committed = (K8S / name).read_text()
    assert committed == render.render(name), f"infra/k8s/{name} is stale: run `python -m infra.render`"


def test_render_check_detects_a_stale_manifest(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(render, "K8S_DIR", tmp_path)
    (tmp_path / "raycluster.yaml").write_text(render.render("raycluster.yaml") + "# hand edit\n")
    (tmp_path / "rayjob.yaml").write_text(render.render("rayjob.yaml"))
    names = ("raycluster.yaml", "rayjob.yaml")
    stale = render.stale_manifests({tmp_path / n: render.render(n) for n in names})
    assert stale == [tmp_path / "raycluster.yaml"]


def test_all_ray_resources_share_the_template_cluster_spec() -> None:
    """One cluster spec; the training clusters add the S3 credentials, the serving one its API key."""
    template = render.load_cluster_spec()
    specs = cluster_specs()
    assert specs["RayCluster"] == specs["RayJob"] == render.with_env(template, render.S3_CREDENTIALS_ENV)
    assert specs["RayService"] == render.with_env(template, render.SERVE_API_KEY_ENV)
    plain = copy.deepcopy(specs["RayService"])
    for pod in pod_specs(plain):
        for c in pod["containers"]:
            c["env"] = c["env"][:-len(render.SERVE_API_KEY_ENV)]
    assert plain == template


def leaves(node: Any, path: tuple = ()) -> dict[tuple, Any]:
    """Flatten a Serve config; list items are keyed by their `name` so that order does not matter."""
    if isinstance(node, dict):
        return {k: v for key, value in node.items() for k, v in leaves(value, (*path, key)).items()}
    if isinstance(node, list) and all(isinstance(i, dict) and "name" in i for i in node):
        return {k: v for item in node for k, v in leaves(item, (*path, item["name"])).items()}
    return {path: node}


def override_leaves(overrides: dict[str, Any]) -> set[tuple]:
    """The override keys in the flattened Serve config's terms (applications/deployments by name)."""
    flat = leaves(overrides)
    out = set()
    for key in flat:
        out.add(tuple(k for k in key if k != "deployments") if key[0] == "applications" else key)
    return out


def test_rayservice_serve_config_is_the_projects_serve_config() -> None:
    """serveConfigV2 is serving/serve_config.yaml plus the declared cluster overrides, nothing else."""
    require(SERVE_CONFIG)
    project = yaml.safe_load(SERVE_CONFIG.read_text())
    overrides = yaml.safe_load((INFRA / "templates" / "serve-cluster-overrides.yaml").read_text())
    embedded = yaml.safe_load(one("RayService")["spec"]["serveConfigV2"])
    assert embedded == render.cluster_serve_config(project, overrides)
    ours, theirs = leaves(embedded), leaves(project)
    assert set(theirs) <= set(ours), "the cluster config must not drop settings"
    changed = {k for k in ours if k not in theirs or ours[k] != theirs[k]}
    declared = {tuple(x for x in k if x != "deployments") for k in changed}
    assert declared <= override_leaves(overrides), "only the declared overrides may add or change"
    # What the cluster needs: the proxy on the pod address, GPU model replicas, the tracking URI
    # of the ConfigMap (null -> MLFLOW_TRACKING_URI), and the same applications and import paths.
    assert embedded["http_options"]["host"] == "0.0.0.0"
    assert [a["import_path"] for a in embedded["applications"]] == [
        a["import_path"] for a in project["applications"]]
    for app in embedded["applications"]:
        assert app["args"].get("tracking_uri") is None
        gpus = [d["ray_actor_options"].get("num_gpus", 0) for d in app["deployments"]]
        assert max(gpus) >= 1 and app["args"]["device"].startswith("cuda")


def test_serve_overrides_must_name_existing_applications() -> None:
    project = {"applications": [{"name": "a", "import_path": "m:f", "deployments": [{"name": "D"}]}]}
    with pytest.raises(ValueError, match="lacks"):
        render.cluster_serve_config(project, {"applications": {"b": {"args": {}}}})
    with pytest.raises(ValueError, match="lacks"):
        render.cluster_serve_config(project, {"applications": {"a": {"deployments": {"E": {}}}}})
    merged = render.cluster_serve_config(project, {"applications": {"a": {"deployments": {"D": {"x": 1}}}}})
    assert merged["applications"][0]["deployments"] == [{"name": "D", "x": 1}]
    assert project["applications"][0]["deployments"] == [{"name": "D"}], "input must not be mutated"


def test_serve_import_paths_resolve() -> None:
    require(SERVE_CONFIG)
    apps = yaml.safe_load(SERVE_CONFIG.read_text())["applications"]
    assert apps
    for app in apps:
        module_name, _, attr = app["import_path"].partition(":")
        module = importlib.import_module(module_name)
        assert hasattr(module, attr), f"{app['import_path']}: no attribute {attr!r}"


# ---------------------------------------------------------------- entrypoints and module paths


def console_script_target(name: str) -> str:
    scripts = PYPROJECT["project"]["scripts"]
    assert name in scripts, f"{name!r} is not a console script of pyproject.toml ({sorted(scripts)})"
    return scripts[name]


def cli_subcommands() -> set[str]:
    import typer

    from flows.cli import app

    return set(typer.main.get_command(app).commands)


def test_rayjob_entrypoint_is_the_training_cli() -> None:
    words = one("RayJob")["spec"]["entrypoint"].split()
    module_name, _, func = console_script_target(words[0]).partition(":")
    assert importlib.util.find_spec(module_name) is not None
    assert callable(getattr(importlib.import_module(module_name), func))
    assert words[1] in cli_subcommands()
    assert words[1] == "train" and re.fullmatch(r"(s3|gs)://\S+", words[2]), "dataset must be shared storage"


def console_script(name: str) -> str | None:
    """The installed command `name`: beside this interpreter (venv not activated), else on PATH."""
    return shutil.which(name, path=os.pathsep.join([str(Path(sys.executable).parent),
                                                     os.environ.get("PATH", "")]))


def test_container_commands_exist() -> None:
    """Every command a container runs is a console script of the image (project, Ray, Prefect)."""
    known = {"prefect", "ray", "diffusion-pipeline", "mlflow", "python"}
    for where, c in all_containers():
        command = c.get("command") or []
        if command:
            assert command[0] in known, f"{where}: unknown command {command[0]!r}"
            assert console_script(command[0]) or command[0] == "python", command[0]
    for name, service in compose()["services"].items():
        command = service.get("command")
        if isinstance(command, list) and service.get("entrypoint") is None and command[0].startswith("p"):
            assert console_script(command[0]), f"compose {name}: {command[0]} not installed"


def test_workers_poll_the_work_pool_of_prefect_yaml() -> None:
    commands = [c["command"] for _, c in all_containers() if "worker" in (c.get("command") or [])]
    commands.append(compose()["services"]["prefect-worker"]["command"])
    for command in commands:
        assert command[:3] == ["prefect", "worker", "start"]
        assert command[command.index("--pool") + 1] == POOL
    require(PREFECT_YAML)
    project = yaml.safe_load(PREFECT_YAML.read_text())
    deployments = project["deployments"]
    assert {d["work_pool"]["name"] for d in deployments} == {POOL}
    # The worker runs flows from the image's WORKDIR, where the Dockerfile copies the project.
    workdir = re.findall(r"^WORKDIR (\S+)$", DOCKERFILE.read_text(), flags=re.M)[-1]
    set_dir = "prefect.deployments.steps.set_working_directory"
    pull_dirs = [step[set_dir]["directory"] for step in project.get("pull") or [] if set_dir in step]
    assert pull_dirs == [workdir]
    for d in deployments:
        path, _, flow = d["entrypoint"].partition(":")
        assert (REPO / path).is_file(), d["entrypoint"]
        module = importlib.import_module(path.removesuffix(".py").replace("/", "."))
        assert hasattr(module, flow), d["entrypoint"]


def test_prefect_worker_submits_ray_jobs_to_the_rayclusters_dashboard() -> None:
    """A dashboard URL as RAY_ADDRESS: training goes to the RayCluster as Ray Jobs (no Ray Client)."""
    head = one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    dashboard_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "dashboard")
    worker = next(c for w, c in all_containers() if w.startswith("prefect-worker"))
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["RAY_ADDRESS"] == f"http://{render.CLUSTER_NAME}-head-svc:{dashboard_port}"
    assert env["PREFECT_API_URL"] == "http://prefect-server:4200/api"


def test_tracking_uri_points_at_the_mlflow_service() -> None:
    env = dict(line.split("=", 1) for line in (K8S / "config" / "pipeline.env").read_text().split())
    services = {d["metadata"]["name"]: d for d in docs_of_kind("Service")}
    service = services["mlflow"]
    assert env["MLFLOW_TRACKING_URI"] == f"http://mlflow:{service['spec']['ports'][0]['port']}"
    assert env["DIFFUSION_PIPELINE_CONFIG"] == "/etc/diffusion-pipeline/pipeline.yaml"


def test_config_maps_and_mounts_match() -> None:
    kustomization = one("Kustomization")
    generated = {g["name"] for g in kustomization["configMapGenerator"]}
    assert kustomization["generatorOptions"]["disableNameSuffixHash"] is True
    for where, c in all_containers():
        for source in c.get("envFrom", []):
            assert source["configMapRef"]["name"] in generated, where
        mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
        if "envFrom" in c:
            assert "/etc/diffusion-pipeline" in mounts, f"{where}: config file not mounted"
    manifests = {p.name for p in K8S.glob("*.yaml")} | set(render.GENERATED)
    assert set(kustomization["resources"]) == manifests - {"kustomization.yaml", "rayjob.yaml"}


# ---------------------------------------------------------------- training config vs cluster


def gpu_group(cluster: dict[str, Any]) -> dict[str, Any]:
    groups = [g for g in cluster["workerGroupSpecs"] if g["groupName"] == "gpu"]
    assert len(groups) == 1
    return groups[0]


def quantity(value: str | int) -> float:
    value = str(value)
    return float(value[:-1]) / 1000 if value.endswith("m") else float(value)


def test_gpu_workers_request_gpus_and_autoscale() -> None:
    for kind, cluster in cluster_specs().items():
        assert cluster["enableInTreeAutoscaling"] is True, kind
        group = gpu_group(cluster)
        assert 0 <= group["minReplicas"] <= group["replicas"] <= group["maxReplicas"] >= 1, kind
        resources = group["template"]["spec"]["containers"][0]["resources"]
        assert int(resources["limits"]["nvidia.com/gpu"]) >= 1, kind
        assert resources["requests"]["nvidia.com/gpu"] == resources["limits"]["nvidia.com/gpu"], kind
        head = cluster["headGroupSpec"]
        assert head["rayStartParams"]["num-gpus"] == "0"
        assert "nvidia.com/gpu" not in head["template"]["spec"]["containers"][0]["resources"]["limits"]


def load_train_config(config_file: Path, dataset: str):
    from diffusion_core.training import TrainConfig
    from flows.config import load_config

    return load_config(TrainConfig, "train", config_file, {"dataset": dataset})


def test_rayjob_training_fits_the_gpu_worker_group() -> None:
    job = one("RayJob")["spec"]
    config = load_train_config(K8S / "config" / "pipeline.yaml", job["entrypoint"].split()[2])
    group = gpu_group(job["rayClusterSpec"])
    limits = group["template"]["spec"]["containers"][0]["resources"]["limits"]
    gpus_per_pod = int(limits["nvidia.com/gpu"])
    assert config.use_gpu is True
    assert config.gpus_per_worker <= gpus_per_pod
    assert config.cpus_per_worker <= quantity(limits["cpu"])
    cpus_per_pod = quantity(limits["cpu"])
    workers_per_pod = min(gpus_per_pod // config.gpus_per_worker, cpus_per_pod // config.cpus_per_worker)
    assert config.num_workers <= group["maxReplicas"] * workers_per_pod
    assert config.placement_strategy == "SPREAD"
    # Several nodes write checkpoints: storage must be shared, not a pod-local path.
    assert re.match(r"(s3|gs)://", config.storage_path), config.storage_path


def test_compose_training_config_is_valid_and_on_shared_storage() -> None:
    config = load_train_config(INFRA / "compose" / "pipeline.yaml", "s3://pipeline/datasets/digits")
    assert config.use_gpu is False
    assert config.storage_path.startswith("s3://pipeline/")


def test_the_kubernetes_pipeline_switches_the_rayservice_it_may_patch() -> None:
    """Issue 11: the retrain pipeline on Kubernetes pins the champion in the RayService (no
    `serve: false`), and the Prefect worker's ServiceAccount may get and patch exactly that one."""
    from flows.pipeline_config import load_pipeline_config
    from serving.config import KubeRayTarget

    config = load_pipeline_config(K8S / "config" / "pipeline.yaml")
    assert config.serve is True
    [target] = config.serve_settings().switch_targets()
    service = one("RayService")["metadata"]["name"]
    assert isinstance(target, KubeRayTarget)
    assert (target.namespace, target.name) == (one("Kustomization")["namespace"], service)
    assert target.watch_url().startswith(f"http://{service}-head-svc.{target.namespace}.svc")
    worker = next(d for d in docs_of_kind("Deployment") if d["metadata"]["name"] == "prefect-worker")
    account = worker["spec"]["template"]["spec"]["serviceAccountName"]
    assert account in {d["metadata"]["name"] for d in docs_of_kind("ServiceAccount")}
    bound = [b["roleRef"]["name"] for b in docs_of_kind("RoleBinding")
             if {"kind": "ServiceAccount", "name": account} in b["subjects"]]
    roles = [role for role in docs_of_kind("Role") if role["metadata"]["name"] in bound]
    rules = [rule for role in roles for rule in role["rules"]]
    assert rules == [{"apiGroups": ["ray.io"], "resources": ["rayservices"], "resourceNames": [service],
                      "verbs": ["get", "patch"]}]
    # the switch is watched on the RayService's dashboard: the NetworkPolicy lets the worker in
    assert "prefect worker" in admitted(RAY_HEAD, 8265)


# ---------------------------------------------------------------- images and versions


def dockerfile_args(path: Path) -> dict[str, str]:
    return dict(re.findall(r"^ARG (\w+)=(\S+)$", path.read_text(), flags=re.M))


def test_versions_agree_with_the_installed_stack() -> None:
    import mlflow
    import prefect
    import ray
    import torch

    args = dockerfile_args(DOCKERFILE)
    assert args["RAY_VERSION"] == ray.__version__
    assert f"ray[train,serve,data]=={ray.__version__}" in PYPROJECT["project"]["dependencies"]
    assert args["TORCH_VERSION"] == torch.__version__.split("+")[0]
    assert dockerfile_args(MLFLOW_DOCKERFILE)["MLFLOW_VERSION"] == mlflow.__version__
    for kind, cluster in cluster_specs().items():
        assert cluster["rayVersion"] == ray.__version__, kind
    images = [c["image"] for _, c in all_containers()]
    images += [s["image"] for s in compose()["services"].values()]
    assert f"prefecthq/prefect:{prefect.__version__}-python3.11" in images


def test_images_are_pinned_and_built_here() -> None:
    images = [(w, c["image"]) for w, c in all_containers()]
    images += [(f"compose:{n}", s["image"]) for n, s in compose()["services"].items()]
    for where, image in images:
        name, _, tag = image.rpartition(":")
        assert name and tag and tag != "latest", f"{where}: image {image!r} is not pinned"
        if name == "diffusion-pipeline":
            accelerator = r"(cpu|cu\d+|\$\{ACCELERATOR:-cpu\})"
            assert re.fullmatch(re.escape(PROJECT_VERSION) + "-" + accelerator, tag), image
    for where, c in all_containers():
        if where.startswith("Ray") and "worker" in where:
            assert not c["image"].endswith("-cpu"), f"{where}: GPU workers need the CUDA image"


def test_compose_builds_from_files_that_exist() -> None:
    for name, service in compose()["services"].items():
        build = service.get("build")
        if build:
            context = (COMPOSE.parent / build["context"]).resolve()
            assert (context / build["dockerfile"]).is_file(), name
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("./"):
                assert (COMPOSE.parent / source).is_file(), f"{name}: {source}"


def test_dockerfile_copies_existing_paths_runs_unprivileged_and_matches_torch() -> None:
    text = DOCKERFILE.read_text()
    for line in re.findall(r"^COPY (.+)$", text, flags=re.M):
        sources = [w for w in line.split()[:-1] if not w.startswith("--")]
        for source in sources:
            assert (REPO / source).exists(), f"COPY source {source!r} missing"
    users = re.findall(r"^USER (\S+)$", text, flags=re.M)
    assert users and users[-1] not in {"root", "0"}
    base = r"^FROM rayproject/ray:\$\{RAY_VERSION\}-\$\{PYTHON_TAG\}-\$\{ACCELERATOR\}$"
    assert re.search(base, text, re.M)
    args = dockerfile_args(DOCKERFILE)
    assert args["ACCELERATOR"] == "cpu", "the default build must be the CPU variant"
    # One argument chooses base image and wheel index: torch always matches the CUDA in the base.
    assert args["TORCH_INDEX_URL"] == "https://download.pytorch.org/whl/${ACCELERATOR}"
    torch_install = text.index('pip install "torch==${TORCH_VERSION}"')
    assert torch_install < text.index('pip install ".'), "torch must be installed before the project"
    assert re.search(r"^USER ray$", text[:torch_install], flags=re.M)
    for path in (DOCKERFILE, MLFLOW_DOCKERFILE):
        secret_setting = r"^(ENV|ARG)\s+\S*(PASSWORD|SECRET|TOKEN|ACCESS_KEY)"
        assert not re.search(secret_setting, path.read_text(), re.M | re.I)
    assert re.search(r"^USER mlflow$", MLFLOW_DOCKERFILE.read_text(), flags=re.M)


def test_dockerignore_keeps_secrets_out_and_sources_in() -> None:
    text = (INFRA / "docker" / "Dockerfile.dockerignore").read_text()
    lines = [line for line in text.splitlines() if line and not line.startswith("#")]
    assert lines[0] == "**" and "**/.env" in lines
    for needed in ("pyproject.toml", "README.md", "prefect.yaml",
                   "diffusion_core/**", "flows/**", "serving/**"):
        assert f"!{needed}" in lines


# ---------------------------------------------------------------- no secret literals

SECRET_NAME = re.compile(r"password|secret|token|access_key|api_key|credential", re.I)
CREDENTIALS_IN_URL = re.compile(r"://[^/\s:@]+:([^@\s]+)@")
# Keys whose value names a Secret (or an env var) rather than holding one.
SECRET_REFERENCE_KEYS = {"name", "secretName", "api_key_env"}
ENV_REFERENCE = re.compile(r"^\$\{\w+(:?[-?][^}]*)?\}$")


def secret_literals(node: Any, path: str = "") -> list[str]:
    """Places where a credential is written as a literal value.

    A k8s env entry with a secret-like name must use valueFrom.secretKeyRef; a mapping value under
    a secret-like key must be a `${VAR}` reference; a URL's password must be a `${VAR}` reference;
    and no manifest may be a Secret carrying data.
    """
    found: list[str] = []
    if isinstance(node, dict):
        if node.get("kind") == "Secret" and (node.get("data") or node.get("stringData")):
            found.append(f"{path}: Secret with inline data")
        if "name" in node and "value" in node and SECRET_NAME.search(str(node["name"])):
            found.append(f"{path}.{node['name']}: literal env value")
        for key, value in node.items():
            literal = isinstance(value, str) and bool(value) and not ENV_REFERENCE.match(value)
            if literal and SECRET_NAME.search(str(key)) and key not in SECRET_REFERENCE_KEYS:
                found.append(f"{path}.{key}: literal {value!r}")
            found += secret_literals(value, f"{path}.{key}")
    elif isinstance(node, list):
        for i, item in enumerate(node):
            found += secret_literals(item, f"{path}[{i}]")
    elif isinstance(node, str):
        for password in CREDENTIALS_IN_URL.findall(node):
            if not ENV_REFERENCE.match(password):
                found.append(f"{path}: credentials in URL")
    return found


def test_no_secret_literals_in_any_manifest() -> None:
    checked = 0
    for path in infra_yaml_files():
        for doc in yaml.safe_load_all(path.read_text()):
            assert secret_literals(doc, path.name) == []
            checked += 1
    assert checked >= 10
    # env.example carries names only; real values live in the ignored .env.
    for line in (INFRA / "compose" / "env.example").read_text().splitlines():
        if SECRET_NAME.search(line.split("=")[0]) and not line.startswith("#"):
            assert line.endswith("="), line
    assert "compose/.env" in (INFRA / ".gitignore").read_text().split()


def test_secret_scan_flags_planted_literals() -> None:
    planted = [
        {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "hunter2"}]},
        {"environment": {"POSTGRES_PASSWORD": "hunter2"}},
        {"x": "postgresql://user:hunter2@db:5432/mlflow"},
        {"kind": "Secret", "stringData": {"uri": "x"}},
    ]
    for doc in planted:
        assert secret_literals(doc), doc
    allowed = {
        "env": [{"name": "AWS_SECRET_ACCESS_KEY", "valueFrom": {"secretKeyRef": {"name": "s", "key": "k"}}}],
        "environment": {"POSTGRES_PASSWORD": "${POSTGRES_PASSWORD:?set it}"},
        "uri": "postgresql://pipeline:${POSTGRES_PASSWORD}@postgres:5432/mlflow",
    }
    assert secret_literals(allowed) == []


def test_every_referenced_secret_is_documented() -> None:
    readme = (INFRA / "README.md").read_text()
    refs = set()
    for _, c in all_containers():
        for e in c.get("env", []):
            ref = e.get("valueFrom", {}).get("secretKeyRef")
            if ref:
                refs.add((ref["name"], ref["key"]))
    assert refs
    for name, key in refs:
        assert re.search(rf"kubectl .*create secret generic {name}\b[^\n]*(\\\n[^\n]*)*--from-literal={key}=",
                         readme), f"infra/README.md does not say how to create secret {name} key {key}"


def test_cli_is_importable_in_a_clean_interpreter() -> None:
    """The console script named in the manifests starts (as it would in the image)."""
    script = console_script("diffusion-pipeline")
    assert script, "diffusion-pipeline is not installed"
    out = subprocess.run([script, "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "train" in out.stdout


# ---------------------------------------------------------------- schemas the cluster enforces


def test_every_manifest_validates_against_the_schema_that_enforces_it() -> None:
    """KubeRay CRDs, the Kubernetes API (strict: no unknown field), Serve's config schema, compose."""
    checked = validate.manifest_paths()
    assert {p.name for p in checked} >= {"raycluster.yaml", "rayjob.yaml", "rayservice.yaml",
                                          "networkpolicy.yaml", "mlflow.yaml", "kustomization.yaml"}
    problems = validate.validate_all()
    assert problems == [], "\n".join(map(str, problems))


def test_the_kuberay_schemas_are_in_the_repository() -> None:
    schemas = validate.crd_schemas()
    assert {kind for _, kind in schemas} == {"RayCluster", "RayJob", "RayService"}
    assert validate.CRD_DIR.is_relative_to(REPO), "CI must not depend on files outside the repository"


def _raycluster() -> dict[str, Any]:
    return copy.deepcopy(one("RayCluster"))


def test_validation_rejects_a_misspelled_field_in_a_ray_pod_template() -> None:
    doc = _raycluster()
    container = doc["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    container["imagePullPolicyy"] = "Always"
    errors = list(validate.manifest_errors(doc))
    assert [loc for loc, _ in errors] == ["spec.headGroupSpec.template.spec.containers[0]"]
    assert "imagePullPolicyy" in errors[0][1]


@pytest.mark.parametrize("mutate, where", [
    (lambda d: d["spec"].update(authOption={"mode": "token"}), "spec"),
    (lambda d: d["spec"]["authOptions"].update(mode="tokens"), "spec.authOptions.mode"),
    (lambda d: d["spec"]["workerGroupSpecs"][0].update(maxReplicas="4"),
     "spec.workerGroupSpecs[0].maxReplicas"),
    (lambda d: d["metadata"].update(label={"a": "b"}), "metadata"),
    (lambda d: d["spec"].pop("headGroupSpec"), "spec"),
])
def test_validation_rejects_what_kuberay_would(mutate, where: str) -> None:
    doc = _raycluster()
    mutate(doc)
    assert where in [loc for loc, _ in validate.manifest_errors(doc)]


def test_validation_rejects_unknown_fields_of_core_resources() -> None:
    deployment = copy.deepcopy(next(d for d in docs_of_kind("Deployment")
                                    if d["metadata"]["name"] == "mlflow"))
    deployment["spec"]["template"]["spec"]["containers"][0]["securityContex"] = {}
    assert [loc for loc, _ in validate.manifest_errors(deployment)] == ["spec.template.spec.containers[0]"]
    policy = copy.deepcopy(docs_of_kind("NetworkPolicy")[0])
    policy["spec"]["ingres"] = policy["spec"].pop("ingress")
    assert list(validate.manifest_errors(policy))
    unknown = {"apiVersion": "v1", "kind": "Secrett", "metadata": {"name": "x"}}
    assert list(validate.manifest_errors(unknown))


def test_validation_rejects_serve_options_that_serve_would_drop() -> None:
    service = copy.deepcopy(one("RayService"))
    config = yaml.safe_load(service["spec"]["serveConfigV2"])
    model = config["applications"][0]["deployments"][0]
    model["autoscaling_config"]["target_ongoing_request"] = model["autoscaling_config"].pop(
        "target_ongoing_requests")
    service["spec"]["serveConfigV2"] = yaml.safe_dump(config)
    locations = [loc for loc, _ in validate.manifest_errors(service)]
    assert any(loc.endswith("autoscaling_config.target_ongoing_request") for loc in locations), locations


def test_validation_checks_compose_and_kustomization_field_names(tmp_path: Path) -> None:
    doc = compose()
    doc["services"]["mlflow"]["enviroment"] = doc["services"]["mlflow"].pop("environment")
    doc["services"]["mlflow"]["configs"] = [{"source": "missing", "target": "/x"}]
    locations = [loc for loc, _ in validate.compose_errors(doc)]
    assert "services.mlflow.enviroment" in locations and "services.mlflow.configs" in locations
    kustomization = copy.deepcopy(one("Kustomization"))
    kustomization["resource"] = kustomization.pop("resources")
    assert [loc for loc, _ in validate.manifest_errors(kustomization)] == ["resource"]
    kustomization = copy.deepcopy(one("Kustomization"))
    kustomization["resources"].append("missing.yaml")
    assert list(validate.manifest_errors(kustomization))


def test_validate_cli_reports_the_file_and_field(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    infra = tmp_path / "infra"
    shutil.copytree(INFRA / "k8s", infra / "k8s")
    shutil.copytree(INFRA / "compose", infra / "compose")
    path = infra / "k8s" / "raycluster.yaml"
    path.write_text(path.read_text().replace("        - name: ray-head\n",
                                             "        - name: ray-head\n          imagee: x\n"))
    problems = validate.validate_all(infra)
    assert len(problems) == 1
    assert "raycluster.yaml: RayCluster/diffusion-raycluster at spec.headGroupSpec" in str(problems[0])
    assert "'imagee' was unexpected" in str(problems[0])


# ---------------------------------------------------------------- security


def test_every_ray_cluster_requires_a_token() -> None:
    import ray

    version = tuple(int(x) for x in ray.__version__.split(".")[:2])
    assert version >= (2, 52), "token authentication needs Ray 2.52"
    for kind, cluster in cluster_specs().items():
        assert cluster["authOptions"] == {"mode": "token", "secretName": "diffusion-ray-auth"}, kind
    worker = next(c for w, c in all_containers() if w.startswith("prefect-worker"))
    env = {e["name"]: e for e in worker["env"]}
    assert env["RAY_AUTH_MODE"]["value"] == "token"
    assert env["RAY_AUTH_TOKEN"]["valueFrom"]["secretKeyRef"] == {"name": "diffusion-ray-auth",
                                                                  "key": "auth_token"}
    readme = (INFRA / "README.md").read_text()
    assert re.search(r"create secret generic diffusion-ray-auth --from-literal=auth_token=", readme)
    # Compose: every Ray node and the worker (its own Ray included) run with the token.
    for name in ("ray-head", "ray-worker", "prefect-worker"):
        environment = compose()["services"][name]["environment"]
        assert environment["RAY_AUTH_MODE"] == "token", name
        assert environment["RAY_AUTH_TOKEN"].startswith("${RAY_AUTH_TOKEN:?"), name


def test_pods_run_unprivileged_on_a_read_only_root() -> None:
    for where, pod in all_pods():
        security = pod.get("securityContext", {})
        assert security.get("runAsNonRoot") is True and security.get("runAsUser", 0) != 0, where
        assert security.get("seccompProfile") == {"type": "RuntimeDefault"}, where
        for c in pod["containers"]:
            context = c.get("securityContext", {})
            assert context.get("allowPrivilegeEscalation") is False, f"{where}:{c['name']}"
            assert context.get("capabilities") == {"drop": ["ALL"]}, f"{where}:{c['name']}"
            assert context.get("readOnlyRootFilesystem") is True, f"{where}:{c['name']}"
            mounts = {m["mountPath"] for m in c.get("volumeMounts", [])}
            assert "/tmp" in mounts, f"{where}:{c['name']}: nothing writable for temp files"
    for kind, cluster in cluster_specs().items():
        assert cluster["autoscalerOptions"]["securityContext"]["allowPrivilegeEscalation"] is False, kind


def secret_refs(container: dict[str, Any]) -> set[str]:
    return {e["valueFrom"]["secretKeyRef"]["name"] for e in container.get("env", [])
            if "secretKeyRef" in e.get("valueFrom", {})}


def test_s3_credentials_only_where_s3_is_used() -> None:
    holders = {where for where, c in all_containers() if "diffusion-pipeline-s3" in secret_refs(c)}
    assert holders == {"mlflow.yaml:mlflow", "prefect-worker.yaml:prefect-worker",
                       "RayCluster:ray-head", "RayCluster:ray-worker", "RayJob:ray-head", "RayJob:ray-worker"}
    for where, c in all_containers():
        if where.startswith("RayService"):
            assert not any(e["name"].startswith("AWS_") for e in c.get("env", [])), where


def test_mlflow_server_authenticates_and_its_clients_log_in() -> None:
    server = next(c for w, c in all_containers() if w == "mlflow.yaml:mlflow")
    assert server["args"][-2:] == ["--app-name", "basic-auth"]
    env = {e["name"]: e for e in server["env"]}
    for name in ("MLFLOW_AUTH_ADMIN_PASSWORD", "MLFLOW_FLASK_SERVER_SECRET_KEY"):
        assert env[name]["valueFrom"]["secretKeyRef"]["name"] == "mlflow-auth", name
    assert "mlflow[auth]==" in MLFLOW_DOCKERFILE.read_text(), "the basic-auth app needs Flask-WTF"
    # Every container that talks to MLflow (ConfigMap MLFLOW_TRACKING_URI) logs in from a Secret.
    for where, c in all_containers():
        if any(s["configMapRef"]["name"] == "diffusion-pipeline-env" for s in c.get("envFrom", [])):
            names = {e["name"]: e for e in c["env"]}
            for var, key in (("MLFLOW_TRACKING_USERNAME", "username"),
                             ("MLFLOW_TRACKING_PASSWORD", "password")):
                assert names[var]["valueFrom"]["secretKeyRef"] == {"name": "mlflow-client", "key": key}, where
    services = compose()["services"]
    assert services["mlflow"]["command"][-2:] == ["--app-name", "basic-auth"]
    assert services["mlflow"]["environment"]["MLFLOW_AUTH_CONFIG_PATH"] == \
        services["mlflow"]["configs"][0]["target"]
    for name in ("prefect-worker", "ray-head", "ray-worker"):
        assert services[name]["environment"]["MLFLOW_TRACKING_PASSWORD"].startswith("${MLFLOW_ADMIN_PASSWORD")


def test_mlflow_database_uris_name_the_installed_driver() -> None:
    """SQLAlchemy 2.1 maps a bare postgresql:// to psycopg 3; the MLflow image has psycopg2."""
    assert "psycopg2-binary" in MLFLOW_DOCKERFILE.read_text()
    doc = compose()
    auth_config = doc["configs"]["mlflow-auth"]["content"]
    uris = [doc["services"]["mlflow"]["environment"]["MLFLOW_BACKEND_STORE_URI"],
            re.search(r"^database_uri = (\S+)$", auth_config, re.M).group(1)]
    for uri in uris:
        assert uri.startswith("postgresql+psycopg2://"), uri.split("://")[0]
    assert "postgresql+psycopg2://" in (INFRA / "README.md").read_text()


def test_published_ports_and_dashboards_stay_on_loopback() -> None:
    for name, service in compose()["services"].items():
        for port in service.get("ports", []):
            assert port.startswith("127.0.0.1:"), f"compose {name} publishes {port} beyond loopback"


# ---------------------------------------------------------------- network policy


def _selects(selector: dict[str, Any], labels: dict[str, str]) -> bool:
    assert set(selector) <= {"matchLabels"}, "only matchLabels selectors are evaluated here"
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


RAY_HEAD = {"app.kubernetes.io/name": "diffusion-ray", "ray.io/node-type": "head"}
RAY_WORKER = {"app.kubernetes.io/name": "diffusion-ray", "ray.io/node-type": "worker"}
PEERS = {
    "ray pod": ({}, {"app.kubernetes.io/name": "diffusion-ray"}),
    "operator": ({"kubernetes.io/metadata.name": "kuberay"}, {"app.kubernetes.io/name": "kuberay-operator"}),
    "prefect worker": ({}, {"app.kubernetes.io/name": "prefect-worker"}),
    "ingress": ({"kubernetes.io/metadata.name": "ingress-nginx"},
                {"app.kubernetes.io/name": "ingress-nginx"}),
    "other pod": ({}, {"app.kubernetes.io/name": "something-else"}),
    "other namespace": ({"kubernetes.io/metadata.name": "elsewhere"},
                        {"app.kubernetes.io/name": "prefect-worker"}),
}


def admitted(pod: dict[str, str], port: int) -> set[str]:
    """Which of PEERS the namespace's NetworkPolicies let open `port` on a pod labelled `pod`."""
    policies = [p["spec"] for p in docs_of_kind("NetworkPolicy") if _selects(p["spec"]["podSelector"], pod)]
    assert policies and all(p["policyTypes"] == ["Ingress"] for p in policies)
    allowed = set()
    for peer, (ns_labels, labels) in PEERS.items():
        same_namespace = not ns_labels
        for policy in policies:
            for rule in policy.get("ingress", []):
                ports = [p["port"] for p in rule.get("ports", [])]
                if ports and port not in ports:
                    continue
                for source in rule["from"]:
                    assert "ipBlock" not in source
                    ns_ok = ("namespaceSelector" in source and not same_namespace
                             and _selects(source["namespaceSelector"], ns_labels)) or (
                        "namespaceSelector" not in source and same_namespace)
                    pod_ok = "podSelector" not in source or _selects(source["podSelector"], labels)
                    if ns_ok and pod_ok:
                        allowed.add(peer)
    return allowed


def test_network_policy_admits_only_cluster_clients_to_ray_control_ports() -> None:
    assert admitted(RAY_HEAD, 8265) == {"ray pod", "prefect worker", "operator"}
    for port in (6379, 10001):  # the worker needs neither the GCS nor Ray Client: Jobs over 8265
        assert admitted(RAY_HEAD, port) == {"ray pod"}, port
    assert admitted(RAY_HEAD, 8000) == {"ray pod", "ingress"}
    assert admitted(RAY_WORKER, 8000) == {"ray pod", "ingress"}
    assert admitted(RAY_WORKER, 10001) == {"ray pod"}
    assert admitted({"app.kubernetes.io/name": "mlflow"}, 5000) == {"ray pod", "prefect worker"}
    assert admitted({"app.kubernetes.io/name": "prefect-server"}, 4200) == {"prefect worker"}
    assert admitted({"app.kubernetes.io/name": "prefect-worker"}, 8080) == set()


def test_network_policy_selects_the_pods_the_manifests_create() -> None:
    for kind, cluster in cluster_specs().items():
        for pod in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
            assert pod["template"]["metadata"]["labels"]["app.kubernetes.io/name"] == "diffusion-ray", kind
    for doc in docs_of_kind("Deployment"):
        name = doc["spec"]["template"]["metadata"]["labels"]["app.kubernetes.io/name"]
        assert name in {"mlflow", "prefect-server", "prefect-worker"}
    # RayJobs submit over HTTP (no submitter pod that the policy would have to admit).
    assert one("RayJob")["spec"]["submissionMode"] == "HTTPMode"


# ---------------------------------------------------------------- Serve at scale


def test_cluster_serve_config_autoscales_the_model_within_its_limits() -> None:
    from serving.config import INGRESS_DEPLOYMENT, MODEL_DEPLOYMENT, ServeSettings

    config = yaml.safe_load(one("RayService")["spec"]["serveConfigV2"])
    app = config["applications"][0]
    settings = ServeSettings.model_validate(app["args"])
    deployments = {d["name"]: d for d in app["deployments"]}
    model = deployments[MODEL_DEPLOYMENT]
    scaling = model["autoscaling_config"]
    assert model["num_replicas"] == "auto"
    assert scaling["min_replicas"] == 1 and scaling["max_replicas"] > 1
    assert scaling["target_ongoing_requests"] == settings.max_images_per_batch
    assert scaling["max_replicas"] <= gpu_group(one("RayService")["spec"]["rayClusterConfig"])["maxReplicas"]
    for name in (MODEL_DEPLOYMENT, INGRESS_DEPLOYMENT):
        assert deployments[name]["graceful_shutdown_timeout_s"] >= settings.request_timeout_s, name
        assert deployments[name]["health_check_period_s"] > 0, name
        assert deployments[name]["health_check_timeout_s"] > deployments[name]["health_check_period_s"] / 2
    # The proxy listens on the pod address: requests need the API key the serving pods hold.
    assert app["args"]["api_key_env"] == render.SERVE_API_KEY_ENV[0]["name"]
    # The local config stays at one fixed replica.
    local_app = yaml.safe_load(SERVE_CONFIG.read_text())["applications"][0]
    local = {d["name"]: d for d in local_app["deployments"]}[MODEL_DEPLOYMENT]
    assert local["num_replicas"] == 1 and "autoscaling_config" not in local


def _cluster_config() -> dict[str, Any]:
    return copy.deepcopy(yaml.safe_load(one("RayService")["spec"]["serveConfigV2"]))


@pytest.mark.parametrize("change, field", [
    (lambda m: m.update(graceful_shutdown_timeout_s=20), "graceful_shutdown_timeout_s"),
    (lambda m: m.pop("graceful_shutdown_timeout_s"), "graceful_shutdown_timeout_s"),
    (lambda m: m["autoscaling_config"].update(target_ongoing_requests=1000), "target_ongoing_requests"),
    (lambda m: m["autoscaling_config"].update(max_replicas=64), "max_replicas"),
])
def test_render_refuses_scaling_that_contradicts_settings_or_cluster(change, field: str) -> None:
    config = _cluster_config()
    change(config["applications"][0]["deployments"][0])
    with pytest.raises(ValueError, match=field):
        render.check_serve_scaling(config, render.load_cluster_spec())
    render.check_serve_scaling(_cluster_config(), render.load_cluster_spec())  # the committed one passes


def test_render_refuses_a_public_proxy_without_the_api_key() -> None:
    config = _cluster_config()
    config["applications"][0]["args"]["api_key_env"] = None
    with pytest.raises(ValueError, match="api_key_env"):
        render.check_serve_api_key(config)
    config["http_options"]["host"] = "127.0.0.1"
    render.check_serve_api_key(config)  # loopback needs none


def test_a_rehearsal_service_that_never_started_is_not_alive_and_stops_cleanly() -> None:
    """A fixture's cleanup calls stop() even when start() failed before launching anything."""
    from infra.rehearsal import LocalPostgres, LocalPrefectServer, LocalS3

    for service in (LocalPostgres(), LocalS3(), LocalPrefectServer()):
        assert not service.alive()
        service.stop()
