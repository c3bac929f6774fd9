"""Where a person looks at the runs and models: the MLflow UI for a tracking URI.

A tracking server (http/https) is its own UI. A local store (SQLite) has none until someone runs
`mlflow ui`, so its address is that of the command this module prints (port MLFLOW_UI_PORT). Links
never carry credentials; commands show URIs redacted.
"""

from __future__ import annotations

from dataclasses import dataclass
from urllib.parse import quote

from diffusion_core.redact import redact_uri, strip_credentials

MLFLOW_UI_PORT = 5000


@dataclass(frozen=True)
class MlflowUi:
    url: str             # base address of the UI
    command: str | None  # the command that serves it; None when a tracking server already does

    def version_url(self, model_name: str, version: str) -> str:
        return f"{self.url}/#/models/{quote(model_name, safe='')}/versions/{quote(version, safe='')}"

    def run_url(self, run_id: str) -> str:
        """The UI's direct route to a run (it redirects to the run's page in its experiment)."""
        return f"{self.url}/#/runs/{quote(run_id, safe='')}"


def mlflow_ui(tracking_uri: str) -> MlflowUi:
    if tracking_uri.startswith(("http://", "https://")):
        return MlflowUi(strip_credentials(tracking_uri).rstrip("/"), None)
    # One worker process: enough for one person, and light next to the pipeline (the default is 4).
    return MlflowUi(f"http://127.0.0.1:{MLFLOW_UI_PORT}", f"mlflow ui --backend-store-uri "
                    f"{redact_uri(tracking_uri)} --workers 1 --port {MLFLOW_UI_PORT}")
