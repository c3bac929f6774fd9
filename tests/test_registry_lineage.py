"""Lineage and what the Models page shows, against a real SQLite MLflow store.

A registered model holds one kind of data: a checkpoint of other data is refused unless the caller
named the model for it, and the gate then never compares the two. Each version says in its
description what it is and how it was gated, and its evaluation is tied to the evaluation split.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from mlflow import MlflowClient
from test_registry_support import make_checkpoint, make_shapes_checkpoint

from diffusion_core.adapters.mlflow_registry import (
    CHAMPION,
    DATA_SPEC_TAG,
    DataSpecKey,
    EvaluationDataset,
    RegistryError,
    champion_data_spec,
    list_versions,
    log_and_register,
    promote_if_better,
    resolve_version,
    rollback,
)

pytestmark = pytest.mark.slow  # each registration logs a model (a few seconds)

# Above the default quality floor, not copying, measured by a feature classifier that learned its data.
GOOD = {"eval_precision": 0.9, "eval_recall": 0.9, "eval_copy_share": 0.1, "eval_feature_p_value": 0.0}
FEATURES = {"eval_feature_kind": "trained_classifier"}
DIGITS = DataSpecKey(image_size=8, channels=1, label_names=[str(i) for i in range(10)])


@pytest.fixture(scope="module")
def digits(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_checkpoint(tmp_path_factory.mktemp("digits") / "ckpt", train_steps=0)


@pytest.fixture(scope="module")
def shapes(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_shapes_checkpoint(tmp_path_factory.mktemp("shapes") / "ckpt")


def never_called(model_uri: str) -> float:
    raise AssertionError(f"the gate measured {model_uri}: a champion of other data must not be re-evaluated")


def test_other_data_is_refused_unless_named_and_then_never_compared(mlflow_store, digits, shapes,
                                                                    tmp_path) -> None:
    uri = mlflow_store.tracking_uri
    client = MlflowClient(uri)
    v1 = log_and_register(digits, model_name="diffusion-digits", tracking_uri=uri, lock_dir=tmp_path,
                          metrics={"eval_fd": 10.0, **GOOD}, tags={**FEATURES, "eval_key": "digits-key"})
    assert promote_if_better("diffusion-digits", v1.version, tracking_uri=uri, lock_dir=tmp_path).promoted
    assert champion_data_spec("diffusion-digits", uri) == DIGITS
    assert champion_data_spec("no-such-model", uri) is None

    # Refused before anything is uploaded, naming the model, the fields, and a name to use instead.
    logged_before = len(client.search_logged_models([client.get_run(v1.run_id).info.experiment_id]))
    with pytest.raises(RegistryError) as refused:
        log_and_register(shapes, model_name="diffusion-digits", tracking_uri=uri, lock_dir=tmp_path,
                         evaluation_dataset=EvaluationDataset.split_of("/data/shapes", "shapes-test"))
    message = str(refused.value)
    assert "'diffusion-digits'" in message and "champion version 1" in message
    assert "differs in image_size, channels, label_names" in message
    assert "--model-name diffusion-shapes" in refused.value.hint
    assert [v.version for v in list_versions("diffusion-digits", uri)] == ["1"]
    assert len(client.search_logged_models([client.get_run(v1.run_id).info.experiment_id])) == logged_before

    # The user named the model for it: registered, but the gate neither measures nor compares.
    v2 = log_and_register(shapes, model_name="diffusion-digits", tracking_uri=uri, lock_dir=tmp_path,
                          metrics={"eval_fd": 0.5, **GOOD}, tags={**FEATURES, "eval_key": "shapes-key"},
                          allow_new_data_spec=True)
    decision = promote_if_better("diffusion-digits", v2.version, tracking_uri=uri, lock_dir=tmp_path,
                                 reevaluate_champion=never_called)
    assert decision.action == "rejected" and decision.champion_version == "1"
    assert decision.reason.startswith("not comparable with the champion: the data spec differs in "
                                      "image_size, channels, label_names")
    assert resolve_version("diffusion-digits", CHAMPION, uri).version == "1"
    description = client.get_model_version("diffusion-digits", v2.version).description
    assert "16x16 RGB class-conditional UNet" in description
    assert "not promoted: not comparable" in description and description.endswith("champion stays v1")

    # Forced, it starts the model's new data spec; digits are now the other data.
    forced = promote_if_better("diffusion-digits", v2.version, tracking_uri=uri, lock_dir=tmp_path,
                               force=True)
    assert forced.action == "forced" and champion_data_spec("diffusion-digits", uri).image_size == 16
    with pytest.raises(RegistryError, match="differs in image_size, channels, label_names"):
        log_and_register(digits, model_name="diffusion-digits", tracking_uri=uri, lock_dir=tmp_path)


def test_a_champion_registered_without_the_tag_is_read_from_its_checkpoint(mlflow_store, digits, shapes,
                                                                           tmp_path) -> None:
    """Versions registered before versions recorded their data spec keep their lineage: the
    checkpoint's spec.json says what they are."""
    uri = mlflow_store.tracking_uri
    client = MlflowClient(uri)
    v1 = log_and_register(digits, model_name="legacy", tracking_uri=uri, lock_dir=tmp_path,
                          metrics={"eval_fd": 10.0, **GOOD}, tags={**FEATURES, "eval_key": "k"})
    promote_if_better("legacy", v1.version, tracking_uri=uri, lock_dir=tmp_path)
    client.delete_model_version_tag("legacy", v1.version, DATA_SPEC_TAG)
    assert champion_data_spec("legacy", uri) == DIGITS
    with pytest.raises(RegistryError, match="differs in image_size, channels, label_names"):
        log_and_register(shapes, model_name="legacy", tracking_uri=uri, lock_dir=tmp_path)


def test_the_models_page_shows_scores_on_the_named_split_and_how_each_version_was_gated(
        mlflow_store, digits, tmp_path) -> None:
    uri = mlflow_store.tracking_uri
    client = MlflowClient(uri)
    fingerprint = "digits-test"  # the checkpoint's training data: the split is of the same dataset
    split = EvaluationDataset.split_of(str(tmp_path / "datasets" / "digits"), fingerprint, "val")

    def register(fd: float) -> str:
        return log_and_register(digits, model_name="described", tracking_uri=uri, lock_dir=tmp_path,
                                metrics={"eval_fd": fd, **GOOD}, tags={**FEATURES, "eval_key": "k"},
                                evaluation_dataset=split).version

    v1 = register(14.6)
    described = client.get_model_version("described", v1)
    assert described.description == ("8x8 grey class-conditional UNet (12k params) trained on "
                                      "digits@digits-test, FD 14.6 (precision 0.90, recall 0.90, "
                                      "copy share 0.10) on digits-val; candidate, not gated yet")
    promote_if_better("described", v1, tracking_uri=uri, lock_dir=tmp_path)
    assert client.get_model_version("described", v1).description.endswith("; promoted: first champion")
    v2 = register(13.8)
    promote_if_better("described", v2, tracking_uri=uri, lock_dir=tmp_path)
    assert client.get_model_version("described", v2).description.endswith(
        "FD 13.8 (precision 0.90, recall 0.90, copy share 0.10) on digits-val; "
        "promoted over v1 (FD 14.6)")
    rollback("described", tracking_uri=uri, lock_dir=tmp_path)
    assert client.get_model_version("described", v1).description.endswith(
        "; champion again by rollback from v2")

    # The scores are metrics of the version's logged model, on the evaluation split, which is an
    # input of the run (context "evaluation") with the dataset's fingerprint as its digest.
    version = client.get_model_version("described", v2)
    (output,) = client.get_run(version.run_id).outputs.model_outputs
    logged = client.get_logged_model(output.model_id)
    assert json.loads(logged.tags["mlflow.modelVersions"]) == [{"name": "described", "version": v2}]
    metrics = {m.key: m for m in logged.metrics}
    assert metrics["eval_fd"].value == 13.8
    assert {(m.dataset_name, m.dataset_digest) for m in metrics.values()} == {("digits-val", fingerprint)}
    inputs = client.get_run(version.run_id).inputs.dataset_inputs
    evaluation = [i for i in inputs
                  if {t.key: t.value for t in i.tags}["mlflow.data.context"] == "evaluation"]
    assert [(i.dataset.name, i.dataset.digest) for i in evaluation] == [("digits-val", fingerprint)]


def test_the_pipeline_refuses_other_data_before_training(prefect_harness, mlflow_store, digits,
                                                         tmp_path) -> None:
    """`run --source shapes.npz --size 16 --channels 3` into the digits model stops at the registry
    check, before any training, naming the problem and the way out."""
    from flows.pipeline import PipelineStageError, retrain
    from flows.pipeline_config import PipelineConfig

    uri = mlflow_store.tracking_uri
    v1 = log_and_register(digits, model_name="diffusion-digits", tracking_uri=uri, lock_dir=tmp_path,
                          metrics={"eval_fd": 10.0, **GOOD}, tags={**FEATURES, "eval_key": "k"})
    promote_if_better("diffusion-digits", v1.version, tracking_uri=uri, lock_dir=tmp_path)
    rng = np.random.default_rng(0)
    shapes = tmp_path / "shapes.npz"
    np.savez(shapes, images=rng.integers(0, 256, (40, 16, 16, 3), dtype=np.uint8), labels=np.arange(40) % 2)
    config = PipelineConfig(source=str(shapes), work_dir=str(tmp_path / "work"), tracking_uri=uri,
                            model_name="diffusion-digits", prepare={"size": 16, "channels": 3},
                            registry={"lock_dir": str(tmp_path)})
    with pytest.raises(PipelineStageError) as refused:
        retrain(config)
    assert refused.value.stage == "registry"
    assert "differs in image_size, channels, label_names" in str(refused.value)
    assert "--model-name diffusion-shapes" in refused.value.hint
    assert not (tmp_path / "work" / "ray_results").exists()  # nothing was trained
    assert [v.version for v in list_versions("diffusion-digits", uri)] == ["1"]
