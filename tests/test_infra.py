"""The deployment assets under infra/ are real configuration that matches the project.

Every manifest is parsed; kinds and API versions, images and versions, entrypoints and module
paths, resource requests and the RayService's Serve config are checked against the code and
config files they name, and no credential appears as a literal.
"""

from __future__ import annotations

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
    "Kustomization": "kustomize.config.k8s.io/v1beta1",
}
POOL = "diffusion-pool"


def _load_render():
    """infra/render.py by path: the repository root is not necessarily on sys.path under pytest."""
    spec = importlib.util.spec_from_file_location("infra_render", INFRA / "render.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


render = _load_render()


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
    specs = {"RayCluster": one("RayCluster")["spec"], "RayJob": one("RayJob")["spec"]["rayClusterSpec"]}
    if SERVE_CONFIG.is_file():
        specs["RayService"] = one("RayService")["spec"]["rayClusterConfig"]
    return specs


def pod_specs(cluster: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield cluster["headGroupSpec"]["template"]["spec"]
    for group in cluster["workerGroupSpecs"]:
        yield group["template"]["spec"]


def all_containers() -> Iterator[tuple[str, dict[str, Any]]]:
    """(where, container) for every container of every workload manifest."""
    for path, doc in k8s_documents():
        if doc["kind"] == "Deployment":
            for c in doc["spec"]["template"]["spec"]["containers"]:
                yield f"{path.name}:{c['name']}", c
    for kind, cluster in cluster_specs().items():
        for pod in pod_specs(cluster):
            for c in pod["containers"]:
                yield f"{kind}:{c['name']}", c


def compose() -> dict[str, Any]:
    return yaml.safe_load(COMPOSE.read_text())


def require(path: Path) -> None:
    if not path.is_file():
        pytest.skip(f"{path.relative_to(REPO)} has not landed yet (owned by another area)")


# ---------------------------------------------------------------- parsing, kinds, generation


def test_every_yaml_under_infra_parses() -> None:
    paths = sorted(INFRA.rglob("*.yaml"))
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
    template = render.load_cluster_spec()
    for kind, spec in cluster_specs().items():
        assert spec == template, f"{kind} cluster spec differs from infra/templates"


def test_kustomize_builds_every_resource_into_the_namespace() -> None:
    require(SERVE_CONFIG)  # the kustomization lists rayservice.yaml
    if shutil.which("kubectl") is None:
        pytest.skip("kubectl is not installed")
    out = subprocess.run(["kubectl", "kustomize", str(K8S)], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    docs = list(yaml.safe_load_all(out.stdout))
    kinds = sorted(d["kind"] for d in docs)
    assert kinds.count("ConfigMap") == 2 and "RayCluster" in kinds and "RayService" in kinds
    for d in docs:
        if d["kind"] != "Namespace":
            assert d["metadata"]["namespace"] == "diffusion", d["metadata"]["name"]


# ---------------------------------------------------------------- the Serve config, once


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
    assert set(ours) == set(theirs), "the cluster config must not add or drop settings"
    changed = {k for k in ours if ours[k] != theirs[k]}
    declared = {tuple(x for x in k if x != "deployments") for k in changed}
    assert declared <= override_leaves(overrides)
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


def test_prefect_worker_reaches_the_rayclusters_client_port() -> None:
    head = one("RayCluster")["spec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    client_port = next(p["containerPort"] for p in head["ports"] if p["name"] == "client")
    worker = next(c for w, c in all_containers() if w.startswith("prefect-worker"))
    env = {e["name"]: e.get("value") for e in worker["env"]}
    assert env["RAY_ADDRESS"] == f"ray://{render.CLUSTER_NAME}-head-svc:{client_port}"
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
    try:
        from diffusion_core.training import TrainConfig
    except ModuleNotFoundError as err:
        pytest.skip(f"TrainConfig is not importable yet: {err}")
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
            if literal and SECRET_NAME.search(str(key)) and key != "name":
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
    for path in sorted(INFRA.rglob("*.yaml")):
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
