"""The serving subcommands are registered and validate their settings before starting anything."""

from __future__ import annotations

import pytest
from typer.testing import CliRunner

from diffusion_core.errors import ConfigError
from flows.cli import app


@pytest.mark.parametrize("command", ["serve", "generate"])
def test_subcommand_is_registered(command: str):
    result = CliRunner().invoke(app, [command, "--help"])
    assert result.exit_code == 0 and "Usage" in result.output


def test_serve_rejects_bad_settings_before_starting_ray(tmp_path):
    config = tmp_path / "pipeline.yaml"
    config.write_text("serve:\n  max_images_per_batch: 16\n  max_ongoing_requests: 4\n")
    result = CliRunner().invoke(app, ["--config", str(config), "serve"])
    assert isinstance(result.exception, ConfigError)
    assert "max_ongoing_requests" in str(result.exception)


def test_build_app_args_errors_name_the_field():
    from serving.app import parse_settings

    with pytest.raises(ConfigError, match=r"serve\.port"):
        parse_settings({"port": 0})
    assert parse_settings({"model_name": "m", "port": "9000"}).port == 9000  # CLI args arrive as strings


def test_serve_settings_layer_serve_config_args_then_config_file_then_env_then_flags(tmp_path, monkeypatch):
    import yaml

    from flows.cli.context import CliContext
    from serving import control

    serve_config = control.load_serve_config()
    app = serve_config["applications"][0]
    app.update(name="from-yaml", route_prefix="/yaml")
    app["args"].update(max_steps=77, default_steps=7, tracking_uri="http://yaml:1")
    serve_config["http_options"]["port"] = 8123
    serve_path = tmp_path / "serve_config.yaml"
    serve_path.write_text(yaml.safe_dump(serve_config))
    pipeline = tmp_path / "pipeline.yaml"
    pipeline.write_text("serve:\n  max_steps: 88\n  tracking_uri: http://file:2\n")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", "http://env:3")
    settings, base = CliContext(config=pipeline).serve_settings(serve_path, {"port": 9001, "host": None})
    assert (settings.app_name, settings.route_prefix, settings.default_steps) == ("from-yaml", "/yaml", 7)
    assert settings.max_steps == 88 and settings.tracking_uri == "http://env:3" and settings.port == 9001
    assert base["applications"][0]["args"]["max_steps"] == 77
    deployed = control.serve_deploy_config(settings, base)
    assert deployed["applications"][0]["args"]["max_steps"] == 88
    assert deployed["http_options"]["port"] == 9001


def test_serve_looks_in_the_store_run_writes_while_the_packaged_config_leaves_it_to_mlflow(
        tmp_path, monkeypatch):
    from flows.cli.context import CliContext
    from serving import control

    monkeypatch.delenv("MLFLOW_TRACKING_URI", raising=False)
    monkeypatch.chdir(tmp_path)
    settings, base = CliContext().serve_settings()
    assert settings.tracking_uri == f"sqlite:///{tmp_path}/diffusion-pipeline-work/mlflow.db"
    assert settings.model_name == "diffusion-digits" and settings.max_images_per_batch == 32
    assert control.settings_fields(base)["tracking_uri"] is None  # `serve run`: MLflow's own default


def test_deployment_decorators_take_their_defaults_from_serve_settings():
    from serving.config import ServeSettings
    from serving.ingress import GenerationIngress
    from serving.model_deployment import DiffusionModel

    defaults = ServeSettings()
    batch = DiffusionModel.func_or_class._generate_batch
    assert batch._get_max_batch_size() == defaults.max_images_per_batch
    assert batch._get_batch_wait_timeout_s() == defaults.batch_wait_timeout_s
    assert GenerationIngress.name == "GenerationIngress" and DiffusionModel.name == "DiffusionModel"


def test_a_batch_counts_images_and_a_large_request_at_most_a_whole_batch():
    from serving.batching import GenerationJob
    from serving.model_deployment import _Pending, batch_weight

    def pending(n: int, cap: int) -> _Pending:
        job = GenerationJob(steps=4, sampler="ddim", guidance_scale=1.0, eta=0.0, seeds=tuple(range(n)))
        return _Pending(job, 0.0, min(n, cap))

    assert batch_weight([pending(1, 32), pending(12, 32), pending(3, 32)]) == 16
    assert batch_weight([pending(64, 32)]) == 32  # fits a batch alone instead of being refused
