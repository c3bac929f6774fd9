"""Hostile input and faults at the registry, the model loader and training's MLflow tracking.

Each test reproduces one way to make the registry do what it should not (a score that promotes
anything, a crafted model that moves files outside its folder, a planted symlink, an MLflow outage
that kills training, a credential copied into params) against real MLflow stores and servers.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import math
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import mlflow
import numpy as np
import pytest
import torch
from local_services import free_port, terminate, wait_http
from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from test_registry_support import make_checkpoint

from diffusion_core.adapters.mlflow_registry import (
    CHAMPION,
    DATA_SPEC_TAG,
    PREVIOUS_CHAMPION,
    DataSpecKey,
    RegistryError,
    download_checkpoint,
    generation_frame,
    log_and_register,
    promote_if_better,
    registry_lock,
    rollback,
)
from diffusion_core.errors import CheckpointError
from diffusion_core.metrics import EvalConfig, ReferenceData, evaluate_model
from diffusion_core.metrics_features import FeatureExtractor, FeatureNetConfig, random_feature_extractor

# Versions registered by log_and_register always carry their data spec; the gate compares only those.
DIGITS_SPEC = DataSpecKey(image_size=8, channels=1, label_names=[str(i) for i in range(10)]).to_tag()
# Above the quality floor, not copying, measured with a feature classifier that learned its data.
GOOD = {"eval_precision": "0.9", "eval_recall": "0.9", "eval_key": "k", DATA_SPEC_TAG: DIGITS_SPEC,
        "eval_copy_share": "0.1", "eval_feature_kind": "trained_classifier", "eval_feature_p_value": "0.0"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", train_steps=0)


def bare_version(client: MlflowClient, name: str, tags: dict[str, str]) -> str:
    """A version with `tags` and no model files: the gate reads only tags and aliases."""
    with contextlib.suppress(MlflowException):
        client.create_registered_model(name)
    experiment = client.get_experiment_by_name("Default") or client.get_experiment("0")
    run = client.create_run(experiment.experiment_id)
    source = f"{run.info.artifact_uri}/model"
    return str(client.create_model_version(name, source, run_id=run.info.run_id, tags=tags).version)


def alias(client: MlflowClient, name: str, which: str) -> str | None:
    try:
        return str(client.get_model_version_by_alias(name, which).version)
    except MlflowException:
        return None


# ------------------------------------------------------------------------------- registry and gate


def test_the_first_version_must_pass_the_quality_floor(mlflow_store, tmp_path) -> None:
    client = MlflowClient(mlflow_store.tracking_uri)
    v1 = bare_version(client, "floor", {**GOOD, "eval_fd": "400.0", "eval_precision": "0.1",
                                        "eval_recall": "0.2"})
    decision = promote_if_better("floor", v1, tracking_uri=mlflow_store.tracking_uri, lock_dir=tmp_path)
    assert decision.action == "rejected" and "quality floor" in decision.reason
    assert alias(client, "floor", CHAMPION) is None


@pytest.mark.parametrize("bad_fd", ["-1.0", "-inf", "nan", "inf", "not a number"])
def test_invalid_candidate_scores_never_promote(mlflow_store, tmp_path, bad_fd: str) -> None:
    uri = mlflow_store.tracking_uri
    client = MlflowClient(uri)
    v1 = bare_version(client, "scores", {**GOOD, "eval_fd": "10.0"})
    assert promote_if_better("scores", v1, tracking_uri=uri, lock_dir=tmp_path).promoted
    v2 = bare_version(client, "scores", {**GOOD, "eval_fd": bad_fd})
    assert promote_if_better("scores", v2, tracking_uri=uri, lock_dir=tmp_path).action == "rejected"
    assert alias(client, "scores", CHAMPION) == v1
    v3 = bare_version(client, "first", {**GOOD, "eval_fd": bad_fd})  # no champion to compare with
    assert promote_if_better("first", v3, tracking_uri=uri, lock_dir=tmp_path).action == "rejected"


@pytest.mark.parametrize("recorded", ["nan", "inf", "-5.0"])
def test_an_invalid_champion_score_is_measured_again_not_compared(mlflow_store, tmp_path,
                                                                  recorded: str) -> None:
    """A NaN champion FD used to reject every candidate, an infinite one to accept any."""
    uri = mlflow_store.tracking_uri
    client = MlflowClient(uri)
    v1 = bare_version(client, "broken", {**GOOD, "eval_fd": "10.0"})
    promote_if_better("broken", v1, tracking_uri=uri, lock_dir=tmp_path)
    client.set_model_version_tag("broken", v1, "eval_fd", recorded)
    asked: list[str] = []

    def reevaluate(model_uri: str) -> float:
        asked.append(model_uri)
        return 20.0

    better = bare_version(client, "broken", {**GOOD, "eval_fd": "5.0"})
    worse = bare_version(client, "broken", {**GOOD, "eval_fd": "50.0"})
    assert promote_if_better("broken", worse, tracking_uri=uri, lock_dir=tmp_path,
                             reevaluate_champion=reevaluate).action == "rejected"
    assert promote_if_better("broken", better, tracking_uri=uri, lock_dir=tmp_path,
                             reevaluate_champion=reevaluate).action == "promoted"
    assert asked == [f"models:/broken/{v1}"] * 2


def test_a_model_name_with_a_quote_is_refused_before_it_reaches_a_filter_string(mlflow_store) -> None:
    from diffusion_core.adapters.mlflow_registry import list_versions

    with pytest.raises(RegistryError, match="model_name"):
        list_versions("x' OR name != '", mlflow_store.tracking_uri)


def test_scores_from_different_feature_networks_never_compare(checkpoint, one_torch_thread) -> None:
    """Same data and settings, different feature weights (a classifier retrained elsewhere): the
    eval keys differ, so the gate re-measures instead of comparing."""
    from diffusion_core.checkpoint import load_checkpoint

    generator = torch.Generator().manual_seed(0)
    images = torch.rand(40, 1, 8, 8, generator=generator)
    reference = ReferenceData("fp", images, None, images[:20], None)
    config = EvalConfig(num_samples=8, steps=2, batch_size=8).headline_only()
    first = random_feature_extractor(1, FeatureNetConfig())
    net = random_feature_extractor(1, FeatureNetConfig()).net
    with torch.no_grad():
        net.head.bias.add_(1.0)
    second = FeatureExtractor(net=net, kind=first.kind, num_classes=first.num_classes)
    loaded = load_checkpoint(checkpoint)
    key_a = evaluate_model(loaded, reference, config, first).eval_key
    assert evaluate_model(loaded, reference, config, first).eval_key == key_a
    assert evaluate_model(loaded, reference, config, second).eval_key != key_a


CRASHING_PROMOTION = """
import os, sys
from pathlib import Path
from mlflow import MlflowClient
from diffusion_core.adapters.mlflow_registry import promote

real = MlflowClient.set_registered_model_alias

def crash_before_previous_alias(self, name, alias, version):
    if alias == "previous_champion":
        os._exit(3)  # the process dies: no finally block, no cleanup
    return real(self, name, alias, version)

MlflowClient.set_registered_model_alias = crash_before_previous_alias
promote(sys.argv[1], sys.argv[2], force=True, tracking_uri=sys.argv[3], lock_dir=Path(sys.argv[4]))
"""


def test_a_promotion_killed_between_writes_is_finished_by_the_next_operation(mlflow_store, tmp_path) -> None:
    uri, name = mlflow_store.tracking_uri, "crashy"
    client = MlflowClient(uri, uri)
    v1 = bare_version(client, name, {**GOOD, "eval_fd": "10.0"})
    promote_if_better(name, v1, tracking_uri=uri, lock_dir=tmp_path)
    v2 = bare_version(client, name, {**GOOD, "eval_fd": "5.0"})
    died = subprocess.run([sys.executable, "-c", CRASHING_PROMOTION, name, v2, uri, str(tmp_path)],
                          capture_output=True, text=True, timeout=300)
    assert died.returncode == 3, died.stderr[-2000:]
    assert alias(client, name, CHAMPION) == v2 and alias(client, name, PREVIOUS_CHAMPION) is None  # torn
    decision = rollback(name, tracking_uri=uri, lock_dir=tmp_path)  # repairs first, then rolls back
    assert decision.champion_version == v1 and alias(client, name, CHAMPION) == v1
    assert client.get_model_version(name, v2).tags[PREVIOUS_CHAMPION] == v1
    history = json.loads(client.get_registered_model(name).tags["champion_history"])
    assert [entry["event"] for entry in history] == [f"promoted:{v1}", f"forced:{v2}", f"rolled_back:{v1}"]


def _lock_file(lock_dir: Path, uri: str) -> Path:
    return lock_dir / f"mlflow-registry-{hashlib.sha256(uri.encode()).hexdigest()[:16]}.lock"


def test_a_planted_symlink_at_the_lock_file_is_refused_not_followed(mlflow_store, tmp_path) -> None:
    uri = mlflow_store.tracking_uri
    victim = tmp_path / "victim.txt"
    victim.write_text("precious\n")
    lock_dir = tmp_path / "locks"
    lock_dir.mkdir()
    _lock_file(lock_dir, uri).symlink_to(victim)
    with pytest.raises(RegistryError) as refused:
        rollback("m", tracking_uri=uri, lock_dir=lock_dir, lock_timeout_s=1.0)
    assert victim.read_text() == "precious\n"
    assert "lock file" in str(refused.value)


def test_the_default_lock_folder_is_private_to_the_user(mlflow_store, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    with registry_lock(mlflow_store.tracking_uri, timeout_s=1.0):
        folders = [p for p in tmp_path.iterdir() if p.is_dir()]
    assert folders, "the lock file must live in a folder under the temp dir"
    for folder in folders:
        info = folder.lstat()
        assert info.st_uid == os.getuid() and info.st_mode & 0o077 == 0, oct(info.st_mode)


def test_a_default_lock_folder_open_to_others_is_refused(mlflow_store, tmp_path, monkeypatch) -> None:
    monkeypatch.setattr("tempfile.tempdir", str(tmp_path))
    planted = tmp_path / f"diffusion-pipeline-{os.getuid()}"
    planted.mkdir()
    planted.chmod(0o777)
    with pytest.raises(RegistryError, match="not a private folder"), registry_lock(mlflow_store.tracking_uri):
        pass


def test_hosts_without_a_shared_lock_folder_exclude_each_other_through_prefect(prefect_harness, mlflow_store,
                                                                               tmp_path) -> None:
    """Two lock folders stand for two hosts: only the Prefect global concurrency limit is shared."""
    uri = mlflow_store.tracking_uri
    with (registry_lock(uri, tmp_path / "host-a", timeout_s=5.0),
          pytest.raises(RegistryError, match="Prefect global concurrency limit")):
        rollback("m", tracking_uri=uri, lock_dir=tmp_path / "host-b", lock_timeout_s=2.0)
    with pytest.raises(RegistryError, match="has no champion"):  # released: the rollback reaches the store
        rollback("m", tracking_uri=uri, lock_dir=tmp_path / "host-b", lock_timeout_s=5.0)


# ---------------------------------------------------------------------- loading models and checkpoints


def _crafted_version(client: MlflowClient, name: str, checkpoint_path: str, tmp_path: Path) -> str:
    """A version whose MLmodel points its `checkpoint` artifact at `checkpoint_path`."""
    model_dir = tmp_path / "crafted-model"
    model_dir.mkdir()
    (model_dir / "MLmodel").write_text(
        "flavors:\n  python_function:\n    loader_module: mlflow.pyfunc.model\n"
        f"    artifacts:\n      checkpoint:\n        path: {checkpoint_path}\n        uri: x\n")
    run = client.create_run(client.get_experiment_by_name("Default").experiment_id)
    client.log_artifacts(run.info.run_id, str(model_dir), "model")
    with contextlib.suppress(MlflowException):
        client.create_registered_model(name)
    source = f"{run.info.artifact_uri}/model"
    return str(client.create_model_version(name, source, run_id=run.info.run_id).version)


@pytest.mark.parametrize("kind", ["absolute", "parent"])
def test_a_crafted_checkpoint_path_cannot_reach_outside_the_download(mlflow_store, checkpoint, tmp_path,
                                                                     kind: str) -> None:
    import shutil

    victim = tmp_path / "outside" / "victim"  # a real checkpoint, so nothing else stops the loader
    shutil.copytree(checkpoint, victim)
    path = str(victim) if kind == "absolute" else "../" * 12 + str(victim).lstrip("/")
    client = MlflowClient(mlflow_store.tracking_uri, mlflow_store.tracking_uri)
    version = _crafted_version(client, "crafted", path, tmp_path)
    with pytest.raises(CheckpointError, match="inside"):
        download_checkpoint(f"models:/crafted/{version}", tmp_path / "dl",
                            tracking_uri=mlflow_store.tracking_uri)
    assert (victim / "spec.json").is_file() and not (tmp_path / "dl").exists()


LOAD_WITHOUT_THE_PROJECT = """
import json, sys
sys.path.append(sys.argv[2])  # site-packages without its .pth files: no editable diffusion_core
import mlflow.pyfunc, pandas as pd
model = mlflow.pyfunc.load_model(sys.argv[1])
frame = pd.DataFrame({"seed": [5, 6], "label": [1, 2]})
images = model.predict(frame, params={"steps": 3, "sampler": "ddim"})
import diffusion_core
print(json.dumps({"code": diffusion_core.__file__, "shape": list(images.shape), "sum": float(images.sum())}))
"""


def test_the_logged_model_ships_its_code_and_loads_without_the_project(mlflow_store, checkpoint,
                                                                       tmp_path) -> None:
    uri = mlflow_store.tracking_uri
    info = log_and_register(checkpoint, model_name="shipped", tracking_uri=uri, lock_dir=tmp_path)
    local = Path(mlflow.artifacts.download_artifacts(
        artifact_uri=MlflowClient(uri, uri).get_model_version_download_uri("shipped", info.version),
        dst_path=str(tmp_path / "model"), tracking_uri=uri))
    requirements = (local / "requirements.txt").read_text().split()
    assert not any(r.startswith("diffusion-pipeline") for r in requirements), requirements
    assert any(r.startswith("torch==") for r in requirements)
    site = sysconfig.get_paths()["purelib"]
    out = subprocess.run([sys.executable, "-S", "-c", LOAD_WITHOUT_THE_PROJECT, str(local), site],
                         capture_output=True, text=True, timeout=300, cwd=tmp_path)
    assert out.returncode == 0, out.stderr[-3000:]
    result = json.loads(out.stdout.strip().splitlines()[-1])
    assert Path(result["code"]).resolve().is_relative_to(local.resolve())
    from diffusion_core.checkpoint import load_checkpoint

    expected = load_checkpoint(checkpoint).generate(2, steps=3, sampler="ddim", seeds=[5, 6], labels=[1, 2])
    assert result["shape"] == [2, 1, 8, 8]
    assert math.isclose(result["sum"], float(expected.sum()), rel_tol=1e-4)
    model = mlflow.pyfunc.load_model(str(local))  # and in this process, through MLflow's public loader
    images = model.predict(generation_frame(2, seed=5, labels=[1, 2]), params={"steps": 3, "sampler": "ddim"})
    np.testing.assert_allclose(images, expected.numpy(), atol=1e-5)


# --------------------------------------------------------------------------------------- training


def _start_mlflow_server(root: Path, port: int) -> subprocess.Popen:
    log = open(root / f"server-{port}.log", "ab")  # noqa: SIM115 - the process keeps it
    proc = subprocess.Popen([sys.executable, "-m", "mlflow", "server",
                             "--backend-store-uri", f"sqlite:///{root / 'mlflow.db'}",
                             "--artifacts-destination", str(root / "artifacts"),
                             "--host", "127.0.0.1", "--port", str(port), "--workers", "1"],
                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    wait_http(f"http://127.0.0.1:{port}/health", proc, timeout=120, log_path=root / f"server-{port}.log")
    return proc


def give_up_quickly(monkeypatch: pytest.MonkeyPatch) -> None:
    """MLflow's HTTP client gives up after one try: an outage without minutes of client retries."""
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_TIMEOUT", "10")


@pytest.fixture()
def quick_mlflow_http(monkeypatch: pytest.MonkeyPatch) -> None:
    give_up_quickly(monkeypatch)


def test_rank_zero_tracking_survives_a_server_outage(tmp_path, monkeypatch) -> None:
    from diffusion_core.adapters.mlflow_tracking import RankZeroTracker

    port = free_port()
    uri = f"http://127.0.0.1:{port}"
    server = _start_mlflow_server(tmp_path, port)
    try:
        client = MlflowClient(uri)
        run_id = client.create_run(client.create_experiment("outage")).info.run_id
        give_up_quickly(monkeypatch)
        tracker = RankZeroTracker(uri, run_id)
        tracker.log_metrics({"loss": 1.0}, step=1)
        time.sleep(1.0)
        os.killpg(server.pid, signal.SIGKILL)  # the server dies mid-run
        server.wait(timeout=30)
        started = time.monotonic()
        tracker.log_metrics({"loss": 0.5}, step=2)
        tracker.log_image(np.zeros((4, 4, 1), np.uint8), "samples", step=2)
        tracker.set_tags({"phase": "outage"})
        tracker.log_metrics({"loss": 0.25}, step=3)
        assert time.monotonic() - started < 1.0  # logging never waits for the server
        time.sleep(2.0)
        server = _start_mlflow_server(tmp_path, port)  # back, same store
        tracker.close()
        history = client.get_metric_history(run_id, "loss")
        assert sorted((m.step, m.value) for m in history) == [(1, 1.0), (2, 0.5), (3, 0.25)]
        assert client.get_run(run_id).data.tags["phase"] == "outage"
        images = [a.path for a in client.list_artifacts(run_id, "images")]
        assert len(images) == 2 and all(p.startswith("images/samples+step+2+") for p in images), images
    finally:
        terminate(server)


def test_rank_zero_tracking_against_an_unreachable_server_never_raises(quick_mlflow_http, caplog,
                                                                       monkeypatch) -> None:
    from diffusion_core.adapters.mlflow_tracking import RankZeroTracker

    for name in ("MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD"):
        monkeypatch.delenv(name, raising=False)  # restored after the test: the tracker sets them
    uri = f"http://trainer:s3cr3t-token@127.0.0.1:{free_port()}"  # nothing listens there
    started = time.monotonic()
    with caplog.at_level(logging.WARNING):
        tracker = RankZeroTracker(uri, "0" * 32)
        for step in range(1, 4):
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        tracker.log_image(np.zeros((4, 4, 1), np.uint8), "samples", step=3)
        tracker.close()
    assert time.monotonic() - started < 60
    assert "unavailable" in caplog.text and "not sent" in caplog.text
    assert "s3cr3t" not in caplog.text  # neither in this project's messages nor in MLflow's
    assert os.environ["MLFLOW_TRACKING_PASSWORD"] == "s3cr3t-token"  # where MLflow takes it from


# ---------------------------------------------------------------------------------------- secrets


def test_credentials_in_uris_never_reach_mlflow_params_or_tags(mlflow_store, tmp_path) -> None:
    from diffusion_core.adapters.mlflow_tracking import finish_run, flatten_params
    from diffusion_core.training import TrainConfig

    config = TrainConfig(dataset="s3://bucket/data?X-Amz-Signature=s3cr3t1",
                         tracking_uri="https://trainer:s3cr3t2@mlflow.example/",
                         storage_path="s3://bucket/ray?token=s3cr3t3")
    params = flatten_params(config)
    assert params["tracking_uri"] == "https://trainer:***@mlflow.example/"
    assert not any("s3cr3t" in value for value in params.values()), params
    client = MlflowClient(mlflow_store.tracking_uri)
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    local = config.model_copy(update={"tracking_uri": mlflow_store.tracking_uri})
    finish_run(local, run_id, "s3://bucket/ckpt?X-Amz-Signature=s3cr3t4")
    assert "s3cr3t" not in json.dumps(client.get_run(run_id).data.tags)
