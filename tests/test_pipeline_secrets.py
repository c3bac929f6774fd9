"""Secrets stay out of what the flows and the CLI show or record: URIs are redacted wherever they
are printed or published, and the API key is read from a file or the environment, never a flag."""

from __future__ import annotations

import http.server
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import pytest
from typer.testing import CliRunner

from diffusion_core.errors import ConfigError
from flows.cli import app
from flows.pipeline import PipelineResult
from flows.pipeline_config import PipelineConfig

SECRET = "s3cret-pw"
CREDENTIAL_URI = f"https://alice:{SECRET}@mlflow.example:5000"
RESULT = PipelineResult(
    dataset_uri="/data/ds", dataset_fingerprint="f" * 64, dataset_reused=True, trained=True,
    training_run_id="run-1", checkpoint_path="/ckpt", model_name="digits", version="3",
    became_champion=True, is_champion=True, decision="promoted", metrics={"eval_fd": 12.5},
)


def test_run_summary_redacts_the_tracking_uri(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from flows.cli.context import CliContext
    from flows.cli.run import Grid, _print_summary

    config = PipelineConfig(tracking_uri=CREDENTIAL_URI, work_dir=str(tmp_path))
    grid = Grid(path=tmp_path / "grid.png", model_name="digits", version="3", alias="champion", num_images=4)
    _print_summary(CliContext(), config, RESULT, grid, 12.0, serving=False)
    out = capsys.readouterr().out
    assert SECRET not in out
    assert "https://alice:***@mlflow.example:5000" in out


@pytest.mark.slow
def test_retrain_artifact_redacts_the_tracking_uri(prefect_harness) -> None:
    from prefect import flow
    from prefect.artifacts import Artifact

    from flows.pipeline import _publish_summary

    flow(name="publish-summary")(_publish_summary)(RESULT, CREDENTIAL_URI)
    text = Artifact.get("retrain-result").data
    assert SECRET not in text and "https://alice:***@mlflow.example:5000" in text


def test_schedule_never_stores_credentials_in_deployment_parameters() -> None:
    from flows.schedule import deployment_parameters

    with pytest.raises(ConfigError, match=r"tracking_uri") as err:
        deployment_parameters(PipelineConfig(tracking_uri=CREDENTIAL_URI))
    assert SECRET not in str(err.value)
    clean = PipelineConfig(tracking_uri="https://mlflow.example:5000")
    assert deployment_parameters(clean)["config"]["tracking_uri"] == "https://mlflow.example:5000"


class _RecordingHandler(http.server.BaseHTTPRequestHandler):
    """Answers every request with 401 and records its Authorization header."""

    seen: list[str | None]

    def do_POST(self) -> None:
        self.seen.append(self.headers.get("Authorization"))
        body = json.dumps({"detail": "unauthorized"}).encode()
        self.send_response(401)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


@contextmanager
def recording_server() -> Iterator[tuple[str, list[str | None]]]:
    seen: list[str | None] = []
    handler = type("Handler", (_RecordingHandler,), {"seen": seen})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def test_generate_reads_the_api_key_from_a_file_or_the_environment_not_a_flag(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    key_file = tmp_path / "api-key"
    key_file.write_text(SECRET + "\n")
    config = tmp_path / "pipeline.yaml"
    config.write_text("serve:\n  api_key_env: TEST_GENERATE_KEY\n")
    runner = CliRunner()
    with recording_server() as (url, seen):
        on_command_line = runner.invoke(app, ["generate", "--url", url, "--out", str(tmp_path / "a"),
                                              "--api-key", SECRET])
        assert on_command_line.exit_code == 2 and "No such option" in on_command_line.output
        assert seen == []  # refused before any request
        from_file = runner.invoke(app, ["generate", "--url", url, "--out", str(tmp_path / "b"),
                                        "--api-key-file", str(key_file)])
        monkeypatch.setenv("TEST_GENERATE_KEY", "from-env")
        from_env = runner.invoke(app, ["--config", str(config), "generate", "--url", url,
                                       "--out", str(tmp_path / "c")])
    assert seen == [f"Bearer {SECRET}", "Bearer from-env"]
    assert isinstance(from_file.exception, Exception) and isinstance(from_env.exception, Exception)
    assert SECRET not in from_file.output
