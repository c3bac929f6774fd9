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
