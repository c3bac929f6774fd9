"""PipelineConfig: one config file for every stage, one value per shared setting."""

from __future__ import annotations

from pathlib import Path

import pytest

from diffusion_core.data.manifest import DatasetManifest
from diffusion_core.errors import ConfigError
from flows.config import build_config
from flows.pipeline_config import PipelineConfig, load_pipeline_config, training_key, unet_fields_for

FILE = """
pipeline:
  work_dir: {work}
  model_name: digits-a
prepare:
  source: digits
  output: {work}/ds
  size: 8
train:
  dataset: ignored-by-the-pipeline
  steps: 300
  lr: 0.001
registry:
  gate_margin: 0.1
serve:
  port: 8123
"""


def build(**fields: object) -> PipelineConfig:
    """As every command builds it (file data -> ConfigError naming the field)."""
    return build_config(PipelineConfig, fields, "pipeline", environ={})


def write_config(tmp_path: Path, text: str = FILE) -> Path:
    path = tmp_path / "pipeline.yaml"
    path.write_text(text.format(work=tmp_path))
    return path


def test_stage_sections_flow_into_the_pipeline(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    config = load_pipeline_config(write_config(tmp_path), {"train.steps": 400, "serve": True})
    assert config.dataset_uri == f"{tmp_path}/ds" and config.source == "digits"
    assert config.train == {"steps": 400, "lr": 0.001}  # the flag wins; `dataset` is the pipeline's
    assert config.registry_config().gate_margin == 0.1 and config.serve_settings().port == 8123
    assert config.registry_config().model_name == config.serve_settings().model_name == "digits-a"
    assert config.resolved_tracking_uri() == f"sqlite:///{tmp_path}/mlflow.db"


def test_environment_fills_the_tracking_uri_and_the_config_file(tmp_path: Path,
                                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("DIFFUSION_PIPELINE_CONFIG", str(write_config(tmp_path)))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://mlflow.internal:5000")
    config = load_pipeline_config()
    assert config.resolved_model_name() == "digits-a"  # read from the file named by the env var
    assert config.registry_config().tracking_uri == "http://mlflow.internal:5000"


def test_conflicting_values_are_named(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"pipeline\.tracking_uri=.*registry\.tracking_uri="):
        build(tracking_uri="sqlite:///a.db", registry={"tracking_uri": "sqlite:///b.db"})
    with pytest.raises(ConfigError, match=r"model_name"):
        build(model_name="a", serving={"model_name": "b"})
    same = PipelineConfig(tracking_uri="sqlite:///a.db", registry={"tracking_uri": "sqlite:///a.db"})
    assert same.resolved_tracking_uri() == "sqlite:///a.db"


@pytest.mark.parametrize("field", ["dataset", "run_name", "warm_start"])
def test_pipeline_owned_train_fields_are_refused(field: str) -> None:
    with pytest.raises(ConfigError, match=rf"train\.{field}"):
        build(train={field: "x"})


def manifest(size: int, channels: int, labels: list[str] | None) -> DatasetManifest:
    fields = {name: None for name in DatasetManifest.model_fields}
    fields.update(image_size=size, channels=channels, label_names=labels)
    return DatasetManifest.model_construct(**fields)


def test_unet_follows_the_dataset_unless_set() -> None:
    digits = unet_fields_for(manifest(8, 1, [str(i) for i in range(10)]), {})
    assert (digits["image_size"], digits["in_channels"], digits["num_classes"]) == (8, 1, 10)
    rgb = unet_fields_for(manifest(32, 3, None), {"base_channels": 32})
    got = (rgb["image_size"], rgb["in_channels"], rgb["num_classes"], rgb["base_channels"])
    assert got == (32, 3, None, 32)


def test_training_key_ignores_placement_but_not_what_is_learned() -> None:
    config = PipelineConfig()
    m = manifest(8, 1, [str(i) for i in range(10)])
    base = training_key("fp", config.train_config(m, "/data/a", "run-a", None))
    moved = PipelineConfig(train={"num_workers": 2, "storage_path": "s3://b/r"})
    assert training_key("fp", moved.train_config(m, "s3://x/ds", "run-b", None)) == base
    assert training_key("fp2", config.train_config(m, "/data/a", "run-a", None)) != base
    relearned = PipelineConfig(train={"lr": 1e-4})
    assert training_key("fp", relearned.train_config(m, "/data/a", "run-a", None)) != base
