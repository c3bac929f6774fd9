"""The one configuration system: defaults < file section < environment < flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from pydantic import BaseModel, ConfigDict

from diffusion_core.errors import ConfigError
from flows.config import build_config, load_config, read_config_file


class Nested(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    width: int = 8


class Example(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")
    steps: int = 10
    tracking_uri: str | None = None
    ray_address: str | None = None
    nested: Nested = Nested()


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_precedence_defaults_file_env_flags(tmp_path: Path) -> None:
    path = write(tmp_path, "c.yaml", "example:\n  steps: 20\n  tracking_uri: sqlite:///file.db\n")
    env = {"MLFLOW_TRACKING_URI": "http://env:5000", "RAY_ADDRESS": "ray://env:10001"}
    assert load_config(Example, "example").steps == 10
    assert load_config(Example, "example", path, environ={}).steps == 20
    from_env = load_config(Example, "example", path, environ=env)
    assert from_env.tracking_uri == "http://env:5000" and from_env.ray_address == "ray://env:10001"
    flagged = load_config(Example, "example", path, {"tracking_uri": "http://flag", "steps": None}, env)
    assert flagged.tracking_uri == "http://flag" and flagged.steps == 20  # None = flag not given


def test_toml_and_dotted_overrides(tmp_path: Path) -> None:
    path = write(tmp_path, "c.toml", "[example]\nsteps = 3\n[example.nested]\nwidth = 16\n")
    cfg = load_config(Example, "example", path, {"nested.width": 32}, environ={})
    assert (cfg.steps, cfg.nested.width) == (3, 32)


def test_overrides_do_not_mutate_file_data() -> None:
    data = {"nested": {"width": 16}}
    build_config(Example, data, "example", {"nested.width": 64}, environ={})
    assert data == {"nested": {"width": 16}}


@pytest.mark.parametrize(("text", "needle"), [
    ("example:\n  steps: -x\n", "example.steps"),
    ("example:\n  unknown_field: 1\n", "example.unknown_field"),
    ("example:\n  nested: {width: wide}\n", "example.nested.width"),
])
def test_bad_values_name_the_field(tmp_path: Path, text: str, needle: str) -> None:
    with pytest.raises(ConfigError, match=needle.replace(".", r"\.")):
        load_config(Example, "example", write(tmp_path, "c.yaml", text), environ={})


def test_missing_or_unsupported_files(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="does not exist"):
        read_config_file(tmp_path / "nope.yaml")
    with pytest.raises(ConfigError, match=r"\.yaml, \.yml, \.toml"):
        read_config_file(write(tmp_path, "c.ini", "[x]"))
