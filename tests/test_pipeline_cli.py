"""Commands that agree: one work dir, store and model name for every command; `config show`; the
commands `run` prints; errors that say where to look; what the terminal shows."""

from __future__ import annotations

import io
import logging
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffusion_core.data.manifest import DatasetManifest
from diffusion_core.errors import ConfigError
from diffusion_core.unet import UNetConfig
from flows.cli import app, main
from flows.cli.context import CliContext
from flows.pipeline_config import load_pipeline_config, train_defaults_for

SECRET = "pw-123"


@pytest.fixture()
def folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """A fresh working folder with no MLflow/Ray/config environment."""
    for var in ("MLFLOW_TRACKING_URI", "RAY_ADDRESS", "DIFFUSION_PIPELINE_CONFIG"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.chdir(tmp_path)
    return tmp_path


def test_every_command_takes_the_store_and_model_that_run_uses(folder: Path) -> None:
    context = CliContext()
    store = f"sqlite:///{folder}/diffusion-pipeline-work/mlflow.db"
    run = context.pipeline_config({})
    serve, _ = context.serve_settings()
    registry = context.registry_config()
    assert run.resolved_tracking_uri() == serve.tracking_uri == registry.tracking_uri == store
    assert run.resolved_model_name() == serve.model_name == registry.model_name == "diffusion-digits"
    moved, _ = context.serve_settings(overrides={"work_dir": "elsewhere"})
    assert moved.tracking_uri == f"sqlite:///{folder}/elsewhere/mlflow.db"


def test_the_default_model_name_follows_the_dataset(folder: Path) -> None:
    assert load_pipeline_config(None, {"source": "data/shapes/"}).resolved_model_name() == "diffusion-shapes"
    assert load_pipeline_config(None, {"source": "my pics.npz"}).resolved_model_name() == "diffusion-my-pics"
    named = load_pipeline_config(None, {"source": "data/shapes/", "model_name": "mine"})
    assert named.resolved_model_name() == named.registry_config().model_name == "mine"


def test_environment_and_flags_override_a_shared_setting_from_any_file_section(
        folder: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    config = folder / "c.yaml"
    config.write_text("registry: {tracking_uri: 'sqlite:///file.db'}\nserve: {tracking_uri: 'sqlite:///file.db'}\n")
    assert load_pipeline_config(config).resolved_tracking_uri() == "sqlite:///file.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:5000")
    assert CliContext(config=config).registry_config().tracking_uri == "http://env:5000"
    flagged, _ = CliContext(config=config).serve_settings(overrides={"tracking_uri": "http://flag:1"})
    assert flagged.tracking_uri == "http://flag:1"
    config.write_text("registry: {tracking_uri: 'sqlite:///a.db'}\nserve: {tracking_uri: 'sqlite:///b.db'}\n")
    with pytest.raises(ConfigError, match=r"registry\.tracking_uri.*serve\.tracking_uri"):
        load_pipeline_config(config)


def test_config_show_gives_each_value_and_where_it_came_from(folder: Path,
                                                             monkeypatch: pytest.MonkeyPatch) -> None:
    config = folder / "c.yaml"
    config.write_text("pipeline: {source: shapes/}\ntrain: {steps: 300}\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"https://bob:{SECRET}@mlflow.example")
    out = CliRunner().invoke(app, ["--config", str(config), "config", "show", "--model-name", "m1"])
    assert out.exit_code == 0, out.output
    rows = {line.split()[0]: line for line in out.output.splitlines() if not line.startswith("#")}
    assert rows["pipeline.model_name"].endswith("[flag]") and " m1 " in rows["pipeline.model_name"]
    assert rows["pipeline.tracking_uri"].endswith("[env]") and "bob:***@" in rows["pipeline.tracking_uri"]
    assert rows["pipeline.source"].endswith("[file]") and rows["train.steps"].endswith("[file]")
    assert rows["prepare.size"].endswith("[default]")
    assert "derived" in rows["pipeline.dataset_uri"] and "/datasets/shapes" in rows["pipeline.dataset_uri"]
    assert SECRET not in out.output


def manifest(size: int, channels: int, classes: int | None) -> DatasetManifest:
    fields = {name: None for name in DatasetManifest.model_fields}
    fields.update(image_size=size, channels=channels,
                  label_names=[str(i) for i in range(classes)] if classes else None)
    return DatasetManifest.model_construct(**fields)


def test_training_defaults_follow_the_dataset_and_the_machine() -> None:
    digits = train_defaults_for(manifest(8, 1, 10), {})
    assert digits["unet"] == UNetConfig.digits_default(10).model_dump() and "batch_size" not in digits
    rgb = train_defaults_for(manifest(32, 3, None), {})
    unet = UNetConfig(**rgb["unet"])
    assert (unet.image_size, unet.in_channels, unet.num_classes) == (32, 3, None)
    assert (unet.base_channels, unet.num_res_blocks, unet.feature_sides()) == (32, 1, [32, 16, 8, 4])
    assert unet.attention_resolutions == (4,) and rgb["batch_size"] == 64
    gpu = train_defaults_for(manifest(32, 3, None), {"use_gpu": True})
    assert UNetConfig(**gpu["unet"]).base_channels == 64 and gpu["batch_size"] == 128
    given = train_defaults_for(manifest(32, 3, None), {"batch_size": 16, "unet": {"base_channels": 48}})
    assert given["batch_size"] == 16 and given["unet"]["base_channels"] == 48


def test_local_cpu_workers_share_the_cores_and_cluster_workers_keep_one_cpu() -> None:
    """On this machine's own Ray a worker runs torch on every core (split among the workers); on a
    cluster, on GPUs or when set, cpus_per_worker is left to TrainConfig or the user."""
    from diffusion_core.adapters.ray_cluster import machine_cpus

    digits = manifest(8, 1, 10)
    assert train_defaults_for(digits, {}, local=True)["cpus_per_worker"] == machine_cpus()
    two = train_defaults_for(digits, {"num_workers": 2}, local=True)["cpus_per_worker"]
    assert two == max(1, machine_cpus() // 2)
    assert "cpus_per_worker" not in train_defaults_for(digits, {}, local=False)
    assert "cpus_per_worker" not in train_defaults_for(digits, {"use_gpu": True}, local=True)
    assert train_defaults_for(digits, {"cpus_per_worker": 0.5}, local=True)["cpus_per_worker"] == 0.5


def test_the_pipeline_trains_locally_only_without_a_ray_address(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert load_pipeline_config(None, {}).trains_locally()
    assert not load_pipeline_config(None, {"ray_address": "head:6379"}).trains_locally()
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert not load_pipeline_config(None, {}).trains_locally()


@pytest.mark.parametrize("size", [8, 10, 12, 16, 20, 24, 28, 32, 40, 48, 64])
@pytest.mark.parametrize("use_gpu", [False, True])
def test_the_derived_unet_is_valid_for_every_size(size: int, use_gpu: bool) -> None:
    fields = train_defaults_for(manifest(size, 3, 5), {"use_gpu": use_gpu})["unet"]
    assert UNetConfig(**fields).image_size == size


def test_a_missing_model_error_names_the_store_and_a_store_nearby_that_has_it(folder: Path) -> None:
    from mlflow import MlflowClient

    from flows.stores import registered_version

    other = MlflowClient(f"sqlite:///{folder}/other-work/mlflow.db")
    other.create_registered_model("diffusion-digits")
    version = other.create_model_version("diffusion-digits", source=str(folder / "src"))
    other.set_registered_model_alias("diffusion-digits", "champion", version.version)
    default_store = folder / "diffusion-pipeline-work" / "mlflow.db"
    with pytest.raises(ConfigError) as err:
        registered_version("diffusion-digits", f"sqlite:///{default_store}", alias="champion")
    assert str(default_store) in str(err.value) and "does not exist" in str(err.value)
    assert "other-work/mlflow.db" in err.value.hint and "--work-dir other-work" in err.value.hint
    assert not default_store.exists()  # looking did not create an empty store


def test_serve_with_no_model_in_the_default_store_says_where_it_looked(
        folder: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_info:
        main(["serve"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "diffusion-digits@champion" in err and "diffusion-pipeline-work/mlflow.db" in err
    assert "diffusion-pipeline run" in err


def test_a_pinned_version_claims_no_alias() -> None:
    from flows.cli.serve import without_alias_when_pinned
    from serving.config import ServeSettings

    assert without_alias_when_pinned(ServeSettings(version="2")).alias is None
    assert without_alias_when_pinned(ServeSettings()).alias == "champion"


def test_run_prints_the_serve_command_with_only_the_flags_serve_needs(folder: Path) -> None:
    from flows.cli.run import serve_command

    context = CliContext()
    assert serve_command(context, context.pipeline_config({})) == "diffusion-pipeline serve"
    shapes = context.pipeline_config({"source": "shapes/", "work_dir": "w2", "serving.port": 9123})
    assert serve_command(context, shapes) == \
        "diffusion-pipeline serve --work-dir w2 --model-name diffusion-shapes --port 9123"
    Path("c.yaml").write_text("serve: {port: 9200}\n")
    flagged = CliContext(config=Path("c.yaml"), config_from_flag=True)
    from_env = CliContext(config=Path("c.yaml"))
    assert serve_command(flagged, flagged.pipeline_config({})) == "diffusion-pipeline --config c.yaml serve"
    assert serve_command(from_env, from_env.pipeline_config({})) == "diffusion-pipeline serve"


@pytest.fixture()
def terminal() -> io.StringIO:
    """The terminal handler writing into a buffer; the logging configuration is restored afterwards."""
    import sys

    from flows.cli.console import TerminalHandler, Verbosity, configure_console

    root = logging.getLogger()
    saved = root.level, {n: logging.getLogger(n).level for n in ("flows", "diffusion_core")}
    buffer, stderr = io.StringIO(), sys.stderr
    sys.stderr = buffer
    try:
        configure_console(Verbosity.DEFAULT)
    finally:
        sys.stderr = stderr
    yield buffer
    root.handlers = [h for h in root.handlers if not isinstance(h, TerminalHandler)]
    root.setLevel(saved[0])
    for name, level in saved[1].items():
        logging.getLogger(name).setLevel(level)


def test_the_terminal_shows_progress_and_problems_but_not_library_chatter(terminal: io.StringIO) -> None:
    logging.getLogger("flows.pipeline").info("[2/4] train: run r")
    logging.getLogger("diffusion_core.metrics").info("evaluation sampling 40/40 images")
    logging.getLogger("httpx").info("HTTP Request: POST http://127.0.0.1/api/logs")
    logging.getLogger("prefect.flow_runs").info("Finished in state Completed()")
    logging.getLogger("some.library").warning("disk almost full")
    shown = terminal.getvalue()
    assert "[2/4] train: run r" in shown and "evaluation sampling 40/40" in shown
    assert "disk almost full" in shown
    assert "HTTP Request" not in shown and "Finished in state" not in shown


def test_resumed_training_logs_no_step_twice(mlflow_store) -> None:
    import mlflow

    from diffusion_core.adapters.mlflow_tracking import RankZeroTracker

    client = mlflow.MlflowClient(mlflow_store.tracking_uri)
    run_id = client.create_run(client.create_experiment("resume")).info.run_id
    for steps in ([10, 20, 30], [20, 30, 40]):  # the second attempt resumed from step 10's checkpoint
        tracker = RankZeroTracker(mlflow_store.tracking_uri, run_id)
        for step in steps:
            tracker.log_metrics({"loss": 1.0 / step}, step=step)
        tracker.close()
    history = client.get_metric_history(run_id, "loss")
    assert sorted(m.step for m in history) == [10, 20, 30, 40]
