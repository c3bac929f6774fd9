"""What the Prefect UI shows for a pipeline run: the project's log lines on the task that wrote them,
and links to the MLflow run and model version."""

from __future__ import annotations

import logging

import pytest

from flows.pipeline import PipelineResult

pytestmark = pytest.mark.slow

RESULT = PipelineResult(
    dataset_uri="/data/ds", dataset_fingerprint="f" * 64, dataset_reused=True, trained=True,
    training_run_id="run-1", checkpoint_path="/ckpt", model_name="digits a", version="3",
    became_champion=True, is_champion=True, decision="promoted", metrics={"eval_fd": 12.5},
)


def test_project_logs_reach_the_task_that_wrote_them(prefect_harness) -> None:
    from prefect import flow, task
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.filters import LogFilter, LogFilterFlowRunId
    from prefect.context import get_run_context

    from flows.prefect_logs import project_logs_to_prefect

    @task
    def stage() -> str:
        logging.getLogger("diffusion_core.example").info("evaluation sampling 40/40 images")
        return str(get_run_context().task_run.id)

    @flow
    def pipeline() -> tuple[str, str]:
        with project_logs_to_prefect():
            task_run_id = stage()
        return str(get_run_context().flow_run.id), task_run_id

    from prefect.logging.handlers import APILogHandler, APILogWorker

    flow_run_id, task_run_id = pipeline()
    assert not any(isinstance(h, APILogHandler) for h in logging.getLogger("diffusion_core").handlers)
    APILogWorker.drain_all(timeout=30)  # logs are sent in the background
    with get_client(sync_client=True) as client:
        logs = client.read_logs(LogFilter(flow_run_id=LogFilterFlowRunId(any_=[flow_run_id])))
    ours = [log for log in logs if log.name == "diffusion_core.example"]
    assert [(log.message, str(log.task_run_id)) for log in ours] == \
        [("evaluation sampling 40/40 images", task_run_id)]


def test_a_flow_run_links_to_its_mlflow_run_and_model_version(prefect_harness) -> None:
    from prefect import flow
    from prefect.artifacts import Artifact

    from flows.pipeline import _publish_summary

    flow(name="publish-summary")(_publish_summary)(RESULT, "http://mlflow.internal:5000/")
    assert Artifact.get("mlflow-model-version").data == \
        "[digits a version 3](http://mlflow.internal:5000/#/models/digits%20a/versions/3)"
    assert Artifact.get("mlflow-training-run").data == \
        "[training run run-1](http://mlflow.internal:5000/#/runs/run-1)"
    flow(name="publish-summary")(_publish_summary)(RESULT, "sqlite:////work/mlflow.db")
    local = Artifact.get("mlflow-model-version")
    assert "(http://127.0.0.1:5000/#/models/digits%20a/versions/3)" in local.data
    assert "mlflow ui --backend-store-uri sqlite:////work/mlflow.db" in local.description
