"""The Prefect flow (reuse while up to date, artifacts) and the `diffusion-pipeline prepare` command."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffusion_core.data.config import PrepareConfig
from diffusion_core.data.manifest import MANIFEST_NAME, read_manifest
from diffusion_core.data.prepare import summary_rows


def artifact_rows(key: str = "dataset-summary") -> list[dict[str, str]]:
    """The latest summary table artifact's rows (stored as JSON text)."""
    import json

    from prefect.artifacts import Artifact

    return json.loads(Artifact.get(key).data)


@pytest.mark.slow
def test_flow_reuses_an_up_to_date_dataset_and_publishes_artifacts(prefect_harness, tmp_path: Path) -> None:
    from prefect.artifacts import Artifact

    from flows.prepare import prepare_dataset

    config = PrepareConfig(output=str(tmp_path / "ds"))
    first = prepare_dataset(config)
    stamp = (tmp_path / "ds" / MANIFEST_NAME).stat().st_mtime_ns
    first_summary = artifact_rows()
    second = prepare_dataset(config)
    second_summary = artifact_rows()
    assert second.manifest == first.manifest == read_manifest(str(tmp_path / "ds"))
    assert not first.reused and second.reused
    assert first_summary == summary_rows(first) and second_summary == summary_rows(second)
    assert first_summary != second_summary  # the status row tells a rebuilt dataset from a reused one
    assert {"item": "fingerprint", "value": first.manifest.fingerprint} in second_summary
    assert (tmp_path / "ds" / MANIFEST_NAME).stat().st_mtime_ns == stamp
    assert "data:image/png;base64," in Artifact.get("dataset-examples").data


@pytest.mark.slow
def test_flow_rebuilds_a_dataset_that_is_gone(prefect_harness, tmp_path: Path) -> None:
    import shutil

    from flows.prepare import prepare_dataset

    config = PrepareConfig(output=str(tmp_path / "ds"), val_fraction=0.2)
    first = prepare_dataset(config)
    shutil.rmtree(tmp_path / "ds")
    second = prepare_dataset(config)
    assert read_manifest(str(tmp_path / "ds")).fingerprint == second.manifest.fingerprint
    assert second.manifest == first.manifest and not second.reused
    assert artifact_rows() == summary_rows(second)


def test_cli_prepares_and_prints_the_summary(tmp_path: Path) -> None:
    from flows.cli import app

    out = tmp_path / "ds"
    result = CliRunner().invoke(app, ["prepare", "digits", str(out), "--val-fraction", "0.2"])
    assert result.exit_code == 0, result.output
    manifest = read_manifest(str(out))
    assert manifest.parameters.val_fraction == 0.2
    assert manifest.fingerprint[:20] in result.output
    assert f"{manifest.counts['train']}" in result.output


def test_cli_reads_the_config_file_and_flags_override_it(tmp_path: Path) -> None:
    from flows.cli import app

    (tmp_path / "pipeline.yaml").write_text("prepare:\n  size: 4\n  val_fraction: 0.3\n")
    out = tmp_path / "ds"
    args = ["--config", str(tmp_path / "pipeline.yaml"), "prepare", "digits", str(out), "--size", "6"]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert read_manifest(str(out)).parameters.model_dump(include={"size", "val_fraction"}) == {
        "size": 6, "val_fraction": 0.3}


def test_cli_bad_parameter_names_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli import main

    with pytest.raises(SystemExit) as exit_info:
        main(["prepare", "digits", str(tmp_path / "ds"), "--channels", "2"])
    assert exit_info.value.code == 2
    assert "prepare.channels" in capsys.readouterr().err
    assert not (tmp_path / "ds").exists()


def test_cli_debug_given_before_the_subcommand_shows_the_exception(tmp_path: Path) -> None:
    from diffusion_core.errors import ConfigError
    from flows.cli import main

    with pytest.raises(ConfigError, match=r"prepare\.channels"):
        main(["--debug", "prepare", "digits", str(tmp_path / "ds"), "--channels", "2"])


@pytest.mark.slow
def test_cli_flow_force_rebuilds_an_up_to_date_dataset(prefect_harness, tmp_path: Path) -> None:
    import json

    from flows.cli import app

    out = tmp_path / "ds"
    args = ["prepare", "digits", str(out), "--flow"]
    assert CliRunner().invoke(app, args).exit_code == 0
    original = read_manifest(str(out))
    # Damage what the up-to-date check does not look at (source and parameters stay equal).
    manifest_path = out / MANIFEST_NAME
    damaged = json.loads(manifest_path.read_text())
    damaged["mean"] = [0.0 for _ in damaged["mean"]]
    manifest_path.write_text(json.dumps(damaged))
    unforced = CliRunner().invoke(app, args)
    assert unforced.exit_code == 0, unforced.output
    assert read_manifest(str(out)).mean != original.mean  # up to date: nothing rebuilt
    forced = CliRunner().invoke(app, [*args, "--force"])
    assert forced.exit_code == 0, forced.output
    assert read_manifest(str(out)) == original
