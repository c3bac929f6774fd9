"""Switching the served version (serving.switch), one way for the deploy stage, `promote` and
`rollback`.

Fast tests: the pinning and RayService patch as pure functions (on the committed rayservice.yaml),
and the Ray token lookup. Slow tests: a real Serve app on the session's local Ray, driven through
Serve's REST API on its dashboard (token auth on, as a local `ray.init` sets it), with a real MLflow
registry: `rollback` under a concurrent client, a replica added after the alias moved on, the
commands' exit codes when a target cannot be switched.
"""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest
import yaml
from served_app import LoadClient

from diffusion_core.errors import ConfigError
from serving.config import MODEL_DEPLOYMENT, KubeRayTarget, ModelDeploymentConfig, RayTarget, ServeSettings

REPO = Path(__file__).resolve().parent.parent
RAYSERVICE = REPO / "infra" / "k8s" / "rayservice.yaml"
MODEL = "switch-test-digits"
UNSERVED = "switch-test-unserved"


def rayservice() -> dict:
    return yaml.safe_load(RAYSERVICE.read_text())


def model_entry(config: dict, app: str = "diffusion") -> dict:
    application = next(a for a in config["applications"] if a["name"] == app)
    return next(d for d in application["deployments"] if d["name"] == MODEL_DEPLOYMENT)


# ---------------------------------------------------------------------------- pure: pinning


def test_pinning_a_rayservice_changes_only_the_model_deployments_user_config():
    from ray.serve.schema import ServeDeploySchema

    from serving.kuberay import pin_serve_config_v2

    text = rayservice()["spec"]["serveConfigV2"]
    new, serving, changed = pin_serve_config_v2(text, "diffusion-digits", "7", "champion")
    assert changed == ["diffusion"] and list(serving) == ["diffusion"]
    before, after = yaml.safe_load(text), yaml.safe_load(new)
    ServeDeploySchema.model_validate(after)  # what KubeRay hands to Serve
    pinned = ModelDeploymentConfig.model_validate(model_entry(after).pop("user_config"))
    assert after == before  # nothing else changed
    assert (pinned.model.model_name, pinned.model.version, pinned.model.alias) == ("diffusion-digits", "7",
                                                                                   "champion")
    # the app's own settings stay: tracking URI from the pods' environment, the GPU, the batching
    args = ServeSettings.model_validate(before["applications"][0]["args"])
    assert pinned.model.tracking_uri is None and pinned.device == "cuda" == args.device
    assert pinned.max_images_per_batch == args.max_images_per_batch
    assert serving["diffusion"] == pinned.model_dump(mode="json")


def test_pinning_again_or_another_model_or_app_changes_nothing():
    from serving.kuberay import pin_serve_config_v2

    original = rayservice()["spec"]["serveConfigV2"]
    text, _, _ = pin_serve_config_v2(original, "diffusion-digits", "7", "champion")
    pinned = model_entry(yaml.safe_load(text))["user_config"]
    assert pin_serve_config_v2(text, "diffusion-digits", "7", "champion") == (text, {"diffusion": pinned}, [])
    assert pin_serve_config_v2(text, "another-model", "3", "champion") == (text, {}, [])
    assert pin_serve_config_v2(text, "diffusion-digits", "3", "champion", app_name="other") == (text, {}, [])
    again, _, changed = pin_serve_config_v2(text, "diffusion-digits", "8", "champion")
    assert changed == ["diffusion"]
    user_config = model_entry(yaml.safe_load(again))["user_config"]
    assert ModelDeploymentConfig.model_validate(user_config).model.version == "8"


def test_an_app_serving_a_local_checkpoint_or_another_import_path_is_not_switched():
    from serving.pinning import serves_model

    app = copy.deepcopy(yaml.safe_load(rayservice()["spec"]["serveConfigV2"])["applications"][0])
    assert serves_model(app, "diffusion-digits")
    local = copy.deepcopy(app)
    local["args"].update(checkpoint_dir="/models/ckpt", alias=None)
    assert not serves_model(local, "diffusion-digits")
    other = {**app, "import_path": "someone.else:app"}
    assert not serves_model(other, "diffusion-digits")


def test_the_rayservice_patch_is_a_merge_patch_guarded_by_the_resource_version():
    from serving.kuberay import rayservice_patch

    resource = rayservice()
    resource["metadata"].update(resourceVersion="4242", generation=3)
    patch, _, changed = rayservice_patch(resource, "diffusion-digits", "2", "champion")
    assert set(patch) == {"metadata", "spec"} and patch["metadata"] == {"resourceVersion": "4242"}
    assert set(patch["spec"]) == {"serveConfigV2"} and changed == ["diffusion"]
    resource["spec"]["serveConfigV2"] = patch["spec"]["serveConfigV2"]
    assert rayservice_patch(resource, "diffusion-digits", "2", "champion")[0] is None


def test_kuberay_target_watches_the_head_service_of_its_rayservice():
    target = KubeRayTarget(kind="kuberay", namespace="diffusion", name="diffusion-serve")
    assert target.watch_url() == "http://diffusion-serve-head-svc.diffusion.svc.cluster.local:8265"
    settings = ServeSettings.model_validate({"targets": [
        {"kind": "kuberay", "namespace": "n", "name": "s", "app_name": "a"},
        {"kind": "ray", "dashboard_url": "http://head:8265"}]})
    assert [type(t) for t in settings.switch_targets()] == [KubeRayTarget, RayTarget]
    assert ServeSettings().switch_targets() == [RayTarget()]
    assert "targets" not in ServeSettings.model_validate({"targets": [{"kind": "ray"}]}).app_args()
    with pytest.raises(ValueError, match="targets"):
        ServeSettings.model_validate({"targets": [{"kind": "ray", "dashboard_url": "head:8265"}]})


# -------------------------------------------------------------------------- pure: the Ray token


@pytest.fixture()
def token_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No Ray auth variables, and a home of its own (the default token file lives there)."""
    for name in ("RAY_AUTH_MODE", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    return tmp_path


def test_the_ray_token_is_looked_up_in_rays_documented_order(token_env: Path, monkeypatch):
    from diffusion_core.adapters.ray_dashboard import dashboard_headers, ray_auth_token

    assert ray_auth_token() is None and dashboard_headers() == {}
    (token_env / ".ray").mkdir()
    (token_env / ".ray" / "auth_token").write_text("from-default-file\n")
    assert ray_auth_token() == "from-default-file"
    named = token_env / "cluster-token"
    named.write_text("from-named-file")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(named))
    assert ray_auth_token() == "from-named-file"
    monkeypatch.setenv("RAY_AUTH_TOKEN", "from-env")
    assert dashboard_headers() == {"Authorization": "Bearer from-env"}
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")
    assert ray_auth_token() is None


def test_an_unreadable_token_file_is_an_error_not_a_silent_fallback(token_env: Path, monkeypatch):
    from diffusion_core.adapters.ray_dashboard import ray_auth_token

    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_env / "missing"))
    with pytest.raises(ConfigError, match="RAY_AUTH_TOKEN_PATH: the token file cannot be read"):
        ray_auth_token()
    (token_env / "empty").write_text("")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(token_env / "empty"))
    with pytest.raises(ConfigError, match="empty"):
        ray_auth_token()


# ----------------------------------------------------------------------- a running app (slow)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """MODEL v1 -> v2 promoted in turn (champion v2, previous champion v1); UNSERVED v1, champion."""
    from test_serving import make_checkpoint

    from diffusion_core.adapters.mlflow_registry import log_and_register, promote

    root = tmp_path_factory.mktemp("switch_registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    versions = {}
    for key, seed in (("v1", 11), ("v2", 12)):
        checkpoint = make_checkpoint(root / key / "checkpoint", num_classes=None, seed=seed)
        registered = log_and_register(checkpoint, model_name=MODEL, tracking_uri=uri, lock_dir=root)
        versions[key] = registered.version
        promote(MODEL, versions[key], force=True, tracking_uri=uri, lock_dir=root)
    unserved = make_checkpoint(root / "unserved" / "checkpoint", num_classes=None, seed=13)
    version = log_and_register(unserved, model_name=UNSERVED, tracking_uri=uri, lock_dir=root).version
    promote(UNSERVED, version, force=True, tracking_uri=uri, lock_dir=root)
    return {"uri": uri, "lock_dir": root, **versions}


@pytest.fixture(scope="module")
def app(_ray_session: None, registry: dict, tmp_path_factory: pytest.TempPathFactory):
    """The champion served by an app of its own, started by the deploy stage -> its ServeSettings."""
    from local_services import free_port, init_session_ray
    from ray import serve

    from flows.deploy import deploy
    from serving import control

    init_session_ray()
    base = control.load_serve_config()
    for deployment in base["applications"][0]["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 1 if deployment["name"] == MODEL_DEPLOYMENT else 0}
    serve_config = tmp_path_factory.mktemp("switch_serve_config") / "serve_config.yaml"
    serve_config.write_text(yaml.safe_dump(base))
    settings = ServeSettings(model_name=MODEL, tracking_uri=registry["uri"], app_name="switch",
                             route_prefix="/switch", port=free_port(), default_steps=2,
                             max_images_per_batch=8, batch_wait_timeout_s=0.005)
    try:
        not_served = deploy.fn(UNSERVED, settings=settings.model_copy(update={"model_name": UNSERVED}))
        assert not_served.action == "not_running"  # nothing serves it, and starting was not asked
        result = deploy.fn(MODEL, settings=settings, start_if_not_running=True, serve_config=serve_config,
                           timeout_s=300)
        assert result.action == "started" and result.version == registry["v2"]
        yield settings
    finally:
        serve.shutdown()


def champion_of(registry: dict, name: str) -> str:
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri=registry["uri"])
    return str(client.get_model_version_by_alias(name, "champion").version)


def model_info(url: str) -> dict:
    return httpx.get(f"{url}/model", timeout=30).json()


def pin(app: ServeSettings, version: str) -> None:
    from serving.switch import switch_to_version

    report = switch_to_version(MODEL, version, "champion", [RayTarget(app_name=app.app_name)], timeout_s=180)
    assert not report.failures, report


@pytest.mark.slow
def test_rollback_serves_the_previous_champion_within_30s_without_a_failed_request(
        app: ServeSettings, registry: dict, capsys: pytest.CaptureFixture):
    """Issue 11: `rollback` on a running local app; a client keeps requesting throughout."""

    from diffusion_core.adapters.mlflow_registry import promote
    from flows.cli import main

    # champion v2 whose previous champion is v1, served by the app
    promote(MODEL, registry["v2"], force=True, tracking_uri=registry["uri"], lock_dir=registry["lock_dir"])
    pin(app, registry["v2"])
    assert model_info(app.url)["version"] == registry["v2"]
    with LoadClient(app.url) as client:
        time.sleep(1.0)
        started = time.monotonic()
        with pytest.raises(SystemExit) as done:
            main(["rollback", "--model-name", MODEL, "--tracking-uri", registry["uri"]])
        returned = time.monotonic() - started
        assert done.value.code == 0
        while model_info(app.url)["version"] != registry["v1"] and time.monotonic() - started < 30:
            time.sleep(0.1)
        switched = time.monotonic() - started
        time.sleep(1.0)
    out = capsys.readouterr().out
    assert "rolled_back" in out and "switched  application 'switch'" in out
    assert client.results and client.failures() == 0, client.summary()
    versions = client.versions()
    first_v1 = versions.index(registry["v1"])
    assert set(versions[:first_v1]) == {registry["v2"]} and set(versions[first_v1:]) == {registry["v1"]}
    assert switched < 30, f"/model reported the previous champion after {switched:.1f}s"
    alias = champion_of(registry, MODEL)
    assert alias == registry["v1"]
    with capsys.disabled():
        print(f"\nrollback: command returned after {returned:.1f}s, /model served v{registry['v1']} "
              f"{switched:.1f}s after it started; client sent {len(versions)} requests, all 200")


@pytest.mark.slow
def test_a_replica_added_after_the_alias_moved_on_serves_the_pinned_version(app: ServeSettings,
                                                                             registry: dict):
    from mlflow import MlflowClient

    from diffusion_core.adapters.ray_dashboard import local_dashboard_url
    from serving.serve_rest import ServeRestClient, declarative_configs

    pin(app, registry["v2"])
    # the alias moves on without a switch: running and future replicas must keep serving v2
    MlflowClient(tracking_uri=registry["uri"]).set_registered_model_alias(MODEL, "champion", registry["v1"])
    moved_at = time.time()
    rest = ServeRestClient(local_dashboard_url())
    config = declarative_configs(rest.details())[app.app_name]
    next(d for d in config["deployments"] if d["name"] == MODEL_DEPLOYMENT)["num_replicas"] = 2
    seen: dict[str, dict] = {}
    with LoadClient(app.url) as client:
        time.sleep(1.0)
        rest.deploy([config])

        def two_running(details: dict) -> bool | None:
            deployment = details["applications"][app.app_name]["deployments"][MODEL_DEPLOYMENT]
            running = [r for r in deployment["replicas"] if r["state"] == "RUNNING"]
            return True if len(running) == 2 and deployment["status"] == "HEALTHY" else None

        rest.wait_for(two_running, "a second replica", 240)
        deadline = time.monotonic() + 60
        while len(seen) < 2 and time.monotonic() < deadline:
            info = model_info(app.url)
            seen[info["replica"]] = info
    assert len(seen) == 2, "the new replica never answered"
    assert {info["version"] for info in seen.values()} == {registry["v2"]}
    assert max(info["loaded_at"] for info in seen.values()) > moved_at  # one started after the move
    assert client.results and client.failures() == 0, client.summary()
    assert set(client.versions()) == {registry["v2"]}


@pytest.mark.slow
def test_commands_exit_3_naming_a_target_that_could_not_be_switched(app: ServeSettings, registry: dict,
                                                                     tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture):
    from local_services import free_port

    from flows.cli import main

    dead = f"http://127.0.0.1:{free_port()}"
    config = tmp_path / "pipeline.yaml"
    config.write_text(yaml.safe_dump({"serve": {"targets": [{"kind": "ray", "dashboard_url": dead}]}}))
    # promoting the champion again changes nothing in the registry, and still switches the targets
    champion = champion_of(registry, MODEL)
    with pytest.raises(SystemExit) as done:
        main(["--config", str(config), "promote", champion, "--model-name", MODEL,
              "--tracking-uri", registry["uri"]])
    assert done.value.code == 3
    captured = capsys.readouterr()
    assert "unchanged" in captured.out and f"failed    no application on Ray {dead}" in captured.out
    assert f"not switched to version {champion}: (all) on Ray {dead}" in captured.err


@pytest.mark.slow
def test_promote_on_a_machine_where_nothing_serves_switches_nothing_and_succeeds(registry: dict,
                                                                                tmp_path: Path):
    """A separate process, not connected to Ray: the local Ray's dashboard (RAY_DASHBOARD_ADDRESS
    here, as a user would set it) does not answer, so there is no app to switch."""
    from local_services import free_port

    champion = champion_of(registry, UNSERVED)
    env = {**os.environ, "RAY_DASHBOARD_ADDRESS": f"http://127.0.0.1:{free_port()}"}
    env.pop("RAY_ADDRESS", None)
    command = Path(sys.executable).with_name("diffusion-pipeline")
    out = subprocess.run([str(command), "promote", champion, "--model-name", UNSERVED,
                          "--tracking-uri", registry["uri"]], cwd=tmp_path, env=env, capture_output=True,
                         text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]
    assert "none      no application on Ray" in out.stdout and "no local Ray runs Serve" in out.stdout


@pytest.mark.slow
def test_the_dashboard_refuses_a_request_without_the_token(app: ServeSettings, monkeypatch):
    from diffusion_core.adapters.ray_dashboard import local_dashboard_url
    from serving.serve_rest import ServeRestClient, ServeRestError

    url = local_dashboard_url()
    assert ServeRestClient(url).details()["applications"][app.app_name]["status"] == "RUNNING"
    monkeypatch.setenv("RAY_AUTH_MODE", "disabled")  # this client then sends no token
    with pytest.raises(ServeRestError, match="refused the token"):
        ServeRestClient(url).details()


@pytest.mark.slow
def test_serve_pins_the_version_its_alias_points_to_when_it_starts(app: ServeSettings, registry: dict):
    """`diffusion-pipeline serve --alias champion`: the replicas load one version, pinned at start."""
    from diffusion_core.adapters.ray_dashboard import local_dashboard_url
    from flows.cli.context import CliContext
    from flows.cli.serve import serve_until_interrupted
    from serving import control
    from serving.pinning import app_model
    from serving.serve_rest import ServeRestClient, declarative_configs

    base = control.load_serve_config()
    for deployment in base["applications"][0]["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0}
    cli = app.model_copy(update={"app_name": "cli", "route_prefix": "/cli"})
    assert (cli.alias, cli.version) == ("champion", None)
    champion = champion_of(registry, MODEL)
    seen = {}

    def while_serving() -> None:
        config = declarative_configs(ServeRestClient(local_dashboard_url()).details())["cli"]
        seen["pinned"] = app_model(config).model.version
        seen["served"] = model_info(cli.url)["version"]
        raise KeyboardInterrupt

    serve_until_interrupted(CliContext(), cli, base, ray_address=None, block=while_serving)
    assert seen == {"pinned": champion, "served": champion}
    assert "cli" not in control.running_app_names()
