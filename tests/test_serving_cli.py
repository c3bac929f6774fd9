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


def test_the_serve_config_names_the_deployments_that_build_app_creates():
    """Serve applies a config's deployment options (replicas, CPUs) by deployment name."""
    from serving import control
    from serving.ingress import GenerationIngress
    from serving.model_deployment import DiffusionModel

    names = {d["name"] for d in control.load_serve_config()["applications"][0]["deployments"]}
    assert names == {GenerationIngress.name, DiffusionModel.name} == {"GenerationIngress", "DiffusionModel"}


def test_the_http_front_end_loads_neither_torch_nor_the_model():
    """The ingress replicas validate and encode only: importing them must not load torch or the UNet."""
    import subprocess
    import sys
    from pathlib import Path

    heavy = ("torch", "serving.model_deployment", "diffusion_core.unet", "diffusion_core.samplers")
    code = f"import sys, serving.ingress; print([m for m in {heavy!r} if m in sys.modules])"
    root = Path(__file__).resolve().parent.parent
    out = subprocess.run([sys.executable, "-c", code], cwd=root, capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout


@pytest.fixture()
def never_started(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test, instead of serving until interrupted, should `serve` get as far as starting."""
    import flows.cli.serve as serve_module

    def started(*args, **kwargs) -> None:
        raise AssertionError("serve started Ray and the app")

    monkeypatch.setattr(serve_module, "serve_until_interrupted", started)


def test_serve_refuses_a_public_host_without_an_api_key(never_started):
    """Before: `serve --host 0.0.0.0` served anyone who reached the port."""
    result = CliRunner().invoke(app, ["serve", "--host", "0.0.0.0"])
    assert isinstance(result.exception, ConfigError), result.exception
    assert "api_key_env: required when host is not a loopback address" in str(result.exception)


def test_serve_refuses_an_api_key_variable_that_is_not_set(never_started, monkeypatch, tmp_path):
    monkeypatch.delenv("DIFFUSION_UNSET_SERVE_KEY", raising=False)
    args = ["serve", "--host", "0.0.0.0", "--api-key-env", "DIFFUSION_UNSET_SERVE_KEY",
            "--checkpoint", str(tmp_path)]  # a checkpoint: no registry lookup before starting
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, ConfigError), result.exception
    assert "'DIFFUSION_UNSET_SERVE_KEY' is not set or empty" in str(result.exception)
    monkeypatch.setenv("DIFFUSION_UNSET_SERVE_KEY", "a-key")
    result = CliRunner().invoke(app, args)
    assert isinstance(result.exception, AssertionError)  # it got as far as starting
