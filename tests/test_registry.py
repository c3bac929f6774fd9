"""MLflow registry against real stores: a SQLite store per test and the session `mlflow server`."""

from __future__ import annotations

import re
import threading
from pathlib import Path

import mlflow
import numpy as np
import pytest
from mlflow import MlflowClient
from test_registry_support import make_checkpoint

from diffusion_core.adapters.mlflow_registry import (
    CANDIDATE,
    CHAMPION,
    PREVIOUS_CHAMPION,
    RegistryConfig,
    RegistryError,
    download_checkpoint,
    generation_frame,
    list_versions,
    log_and_register,
    promote,
    promote_if_better,
    registry_lock,
    resolve_version,
    rollback,
)
from diffusion_core.checkpoint import load_checkpoint

pytestmark = pytest.mark.slow  # each registration logs a model (a few seconds)

# Above the default quality floor, not copying, measured by a feature classifier that learned its data.
GOOD_SHARES = {"eval_precision": 0.9, "eval_recall": 0.9, "eval_copy_share": 0.1, "eval_feature_p_value": 0.0}
FEATURES = {"eval_feature_kind": "trained_classifier"}


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny", train_steps=0)


def _register(checkpoint: Path, name: str, uri: str, lock_dir: Path, fd: float | None = None,
              eval_key: str = "key-a", **kwargs) -> str:
    metrics = None if fd is None else {"eval_fd": fd, **GOOD_SHARES}
    info = log_and_register(checkpoint, model_name=name, tracking_uri=uri, metrics=metrics,
                            tags={"eval_key": eval_key, **FEATURES}, lock_dir=lock_dir, **kwargs)
    return info.version


def _alias(uri: str, name: str, alias: str) -> str | None:
    try:
        return str(MlflowClient(uri, uri).get_model_version_by_alias(name, alias).version)
    except mlflow.exceptions.MlflowException:
        return None


def _check_champion_generates(uri: str, name: str, checkpoint: Path) -> None:
    """The champion loaded through pyfunc samples the same images as the checkpoint itself."""
    model = mlflow.pyfunc.load_model(f"models:/{name}@{CHAMPION}")
    frame = generation_frame(3, seed=5, labels=[1, 2, 3])
    images = model.predict(frame, params={"steps": 3, "sampler": "ddim"})
    assert images.shape == (3, 1, 8, 8) and images.dtype == np.float32
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.01
    expected = load_checkpoint(checkpoint).generate(3, steps=3, sampler="ddim", seeds=[5, 6, 7],
                                                    labels=[1, 2, 3])
    np.testing.assert_allclose(images, expected.numpy(), atol=1e-5)


def test_register_tags_candidate_and_champion_loads_via_pyfunc(mlflow_store, checkpoint, tmp_path) -> None:
    uri = mlflow_store.tracking_uri
    info = log_and_register(checkpoint, model_name="digits", tracking_uri=uri,
                            metrics={"eval_fd": 12.5, **GOOD_SHARES},
                            tags={"eval_key": "k", "eval_sampler": "ddim", **FEATURES}, lock_dir=tmp_path)
    assert info.version == "1" and info.aliases == [CANDIDATE]
    assert info.tags["dataset_fingerprint"] == "digits-test" and info.tags["eval_fd"] == "12.5"
    assert info.tags["training_run_id"] == info.run_id
    assert re.fullmatch("[0-9a-f]{40}", info.tags["git_commit"])  # the code's checkout, not the cwd's
    assert MlflowClient(uri).get_run(info.run_id).data.metrics["eval_fd"] == 12.5
    decision = promote_if_better("digits", info.version, tracking_uri=uri, lock_dir=tmp_path)
    assert decision.action == "promoted" and decision.reason == "no champion yet"
    assert resolve_version("digits", CHAMPION, uri).version == "1"
    _check_champion_generates(uri, "digits", checkpoint)


def test_registration_keeps_artifacts_beside_the_database(mlflow_store, checkpoint, tmp_path,
                                                         monkeypatch) -> None:
    cwd = tmp_path / "elsewhere"  # where a CLI might run: nothing may be written here
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    info = log_and_register(checkpoint, model_name="tidy", tracking_uri=mlflow_store.tracking_uri,
                            lock_dir=tmp_path)
    assert list(cwd.iterdir()) == []
    client = MlflowClient(mlflow_store.tracking_uri)
    experiment = client.get_experiment(client.get_run(info.run_id).info.experiment_id)
    assert experiment.artifact_location == mlflow_store.artifact_root
    stored = {p.name for p in (tmp_path / "mlartifacts").rglob("*") if p.is_file()}
    assert {"MLmodel", "model.safetensors", "spec.json"} <= stored


def test_operations_use_the_given_store_and_leave_the_process_wide_uris_alone(
        mlflow_store, checkpoint, tmp_path, monkeypatch) -> None:
    """With MLflow's process-wide URIs pointing at a decoy store, every operation given an explicit
    URI works on that store only, and the process-wide URIs are unchanged afterwards."""
    decoy = f"sqlite:///{tmp_path / 'decoy.db'}"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", decoy)
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", decoy)
    mlflow.set_tracking_uri(decoy)
    mlflow.set_registry_uri(decoy)
    try:
        uri = mlflow_store.tracking_uri
        v1 = _register(checkpoint, "scoped", uri, tmp_path, fd=10.0)
        assert promote_if_better("scoped", v1, tracking_uri=uri, lock_dir=tmp_path).promoted
        local = download_checkpoint("models:/scoped@champion", tmp_path / "dl", tracking_uri=uri)
        assert (local / "spec.json").is_file()
        with pytest.raises(RegistryError, match="no previous champion"):
            rollback("scoped", tracking_uri=uri, lock_dir=tmp_path)
        assert (mlflow.get_tracking_uri(), mlflow.get_registry_uri()) == (decoy, decoy)
        assert MlflowClient(decoy, decoy).search_registered_models() == []
    finally:
        mlflow.set_tracking_uri(None)  # monkeypatch puts the environment back
        mlflow.set_registry_uri(None)


def test_a_held_registry_lock_times_out_naming_its_file(mlflow_store, tmp_path) -> None:
    uri = mlflow_store.tracking_uri
    with registry_lock(uri, tmp_path):
        lock_file = next(tmp_path.glob("mlflow-registry-*.lock"))
        message = f"{re.escape(str(lock_file))} still held after 0.3s"
        with pytest.raises(RegistryError, match=message):
            rollback("m", tracking_uri=uri, lock_dir=tmp_path, lock_timeout_s=0.3)
    with pytest.raises(RegistryError, match="has no champion"):  # released: rollback gets to the store
        rollback("m", tracking_uri=uri, lock_dir=tmp_path, lock_timeout_s=0.3)


def test_download_checkpoint_round_trips_the_weights(mlflow_store, checkpoint, tmp_path) -> None:
    uri = mlflow_store.tracking_uri
    _register(checkpoint, "digits", uri, tmp_path)
    local = download_checkpoint("models:/digits@candidate", tmp_path / "dl", tracking_uri=uri)
    assert local == tmp_path / "dl"
    for name in ("model.safetensors", "spec.json"):
        assert (local / name).read_bytes() == (checkpoint / name).read_bytes()
    with pytest.raises(RegistryError, match="no version with alias 'champion'"):
        resolve_version("digits", CHAMPION, uri)


def test_gate_promotes_better_rejects_worse_records_numbers(mlflow_store, checkpoint, tmp_path) -> None:
    uri, name = mlflow_store.tracking_uri, "gated"
    gate = dict(tracking_uri=uri, lock_dir=tmp_path, policy=RegistryConfig(gate_margin=0.02).gate_policy())
    v1 = _register(checkpoint, name, uri, tmp_path, fd=100.0)
    assert promote_if_better(name, v1, **gate).action == "promoted"
    v2 = _register(checkpoint, name, uri, tmp_path, fd=50.0)
    better = promote_if_better(name, v2, **gate)
    assert (better.action, better.champion_fd, better.candidate_fd) == ("promoted", 100.0, 50.0)
    v3 = _register(checkpoint, name, uri, tmp_path, fd=49.5)  # better, but by less than the 2 % margin
    worse = promote_if_better(name, v3, **gate)
    assert worse.action == "rejected" and worse.champion_version == v2
    assert _alias(uri, name, CHAMPION) == v2 and _alias(uri, name, PREVIOUS_CHAMPION) == v1
    assert _alias(uri, name, CANDIDATE) == v3
    tags = MlflowClient(uri).get_model_version(name, v3).tags
    assert tags["gate.decision"] == "rejected"
    assert (float(tags["gate.candidate_fd"]), float(tags["gate.champion_fd"])) == (49.5, 50.0)
    run = MlflowClient(uri).get_run(MlflowClient(uri).get_model_version(name, v3).run_id)
    assert run.data.metrics["gate_promoted"] == 0.0 and run.data.metrics["gate_champion_fd"] == 50.0
    forced = promote(name, v3, force=True, tracking_uri=uri, lock_dir=tmp_path)
    assert forced.action == "forced" and _alias(uri, name, CHAMPION) == v3


def test_gate_reevaluates_champion_measured_differently(mlflow_store, checkpoint, tmp_path) -> None:
    uri, name = mlflow_store.tracking_uri, "rekeyed"
    v1 = _register(checkpoint, name, uri, tmp_path, fd=10.0, eval_key="old-settings")
    promote_if_better(name, v1, tracking_uri=uri, lock_dir=tmp_path)
    v2 = _register(checkpoint, name, uri, tmp_path, fd=30.0, eval_key="new-settings")
    with pytest.raises(RegistryError, match="not comparable"):
        promote_if_better(name, v2, tracking_uri=uri, lock_dir=tmp_path)
    asked: list[str] = []
    # Under the new settings the old champion scores 40: the candidate's 30 now wins.
    decision = promote_if_better(name, v2, tracking_uri=uri, lock_dir=tmp_path,
                                 reevaluate_champion=lambda model_uri: asked.append(model_uri) or 40.0)
    assert asked == [f"models:/{name}/{v1}"]
    assert decision.action == "promoted" and decision.champion_fd == 40.0
    assert "re-evaluated" in decision.reason


def test_gate_measures_the_champion_unlocked_and_again_if_it_changed(mlflow_store, checkpoint,
                                                                     tmp_path) -> None:
    uri, name = mlflow_store.tracking_uri, "moving"
    v1 = _register(checkpoint, name, uri, tmp_path, fd=10.0, eval_key="old-settings")
    promote_if_better(name, v1, tracking_uri=uri, lock_dir=tmp_path)
    v2 = _register(checkpoint, name, uri, tmp_path, fd=30.0, eval_key="new-settings")
    v3 = _register(checkpoint, name, uri, tmp_path, fd=5.0, eval_key="old-settings")
    fd_under_new_settings = {f"models:/{name}/{v1}": 40.0, f"models:/{name}/{v3}": 20.0}
    asked: list[str] = []

    def reevaluate(model_uri: str) -> float:
        asked.append(model_uri)
        if len(asked) == 1:  # another process promotes v3 meanwhile; it needs the lock within 1 s
            promote(name, v3, force=True, tracking_uri=uri, lock_dir=tmp_path, lock_timeout_s=1.0)
        return fd_under_new_settings[model_uri]

    decision = promote_if_better(name, v2, tracking_uri=uri, lock_dir=tmp_path, lock_timeout_s=1.0,
                                 reevaluate_champion=reevaluate)
    assert asked == [f"models:/{name}/{v1}", f"models:/{name}/{v3}"]
    # 30 would beat v1's 40, but the gate decides against the champion it finds under the lock: v3.
    assert (decision.action, decision.champion_fd) == ("rejected", 20.0) and decision.champion_version == v3
    assert _alias(uri, name, CHAMPION) == v3


def test_rollback_walks_back_the_champion_chain(mlflow_store, checkpoint, tmp_path) -> None:
    uri, name = mlflow_store.tracking_uri, "chain"
    versions = [_register(checkpoint, name, uri, tmp_path, fd=fd) for fd in (30.0, 20.0, 10.0)]
    for v in versions:
        assert promote_if_better(name, v, tracking_uri=uri, lock_dir=tmp_path).promoted
    first = rollback(name, tracking_uri=uri, lock_dir=tmp_path)
    assert first.champion_version == versions[1] and _alias(uri, name, CHAMPION) == versions[1]
    assert _alias(uri, name, PREVIOUS_CHAMPION) == versions[0]
    rollback(name, tracking_uri=uri, lock_dir=tmp_path)
    assert _alias(uri, name, CHAMPION) == versions[0] and _alias(uri, name, PREVIOUS_CHAMPION) is None
    with pytest.raises(RegistryError, match="no previous champion"):
        rollback(name, tracking_uri=uri, lock_dir=tmp_path)
    history = MlflowClient(uri).get_registered_model(name).tags["champion_history"]
    assert history.count("rolled_back") == 2 and history.count("promoted") == 3


def _register_concurrently(checkpoint: Path, name: str, uri: str, lock_dir: Path, count: int) -> list[str]:
    results: list[str] = []
    errors: list[BaseException] = []
    barrier = threading.Barrier(count)

    def worker(i: int) -> None:
        try:
            barrier.wait()
            results.append(_register(checkpoint, name, uri, lock_dir, fd=float(i)))
        except BaseException as err:  # noqa: BLE001 - re-raised in the main thread below
            errors.append(err)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=300)
    assert not errors, errors
    return results


def test_concurrent_registrations_get_distinct_versions(mlflow_store, checkpoint, tmp_path) -> None:
    uri = mlflow_store.tracking_uri
    versions = _register_concurrently(checkpoint, "racy", uri, tmp_path, count=2)
    assert sorted(versions) == ["1", "2"]
    infos = list_versions("racy", uri)
    assert len({v.run_id for v in infos}) == 2
    assert _alias(uri, "racy", CANDIDATE) == "2"  # the version created last, not a torn write


# -------------------------------------------------------------------------------- the MLflow server


def test_server_register_gate_pyfunc_concurrency(mlflow_server, checkpoint, tmp_path, monkeypatch) -> None:
    uri = mlflow_server.tracking_uri
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)  # for mlflow.pyfunc.load_model("models:/...")
    versions = _register_concurrently(checkpoint, "served", uri, tmp_path, count=2)
    assert sorted(versions) == ["1", "2"]
    by_fd = sorted(list_versions("served", uri), key=lambda v: float(v.tags["eval_fd"]))
    best, worst = by_fd[0].version, by_fd[1].version
    assert promote_if_better("served", worst, tracking_uri=uri, lock_dir=tmp_path).action == "promoted"
    assert promote_if_better("served", best, tracking_uri=uri, lock_dir=tmp_path).action == "promoted"
    assert promote_if_better("served", worst, tracking_uri=uri, lock_dir=tmp_path).action == "rejected"
    _check_champion_generates(uri, "served", checkpoint)
    local = download_checkpoint("models:/served@champion", tracking_uri=uri)
    assert (local / "model.safetensors").read_bytes() == (checkpoint / "model.safetensors").read_bytes()
    assert rollback("served", tracking_uri=uri, lock_dir=tmp_path).champion_version == worst
