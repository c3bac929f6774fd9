"""What a person finds in MLflow after the default `run`, read through the tracking server's REST API.

A tiny `retrain` (the flow `diffusion-pipeline run` calls) trains, evaluates and registers against
the session's `mlflow server`; the test then asks the server, as the UI does, for: the sample grids
as images logged with steps, the loss curve, the evaluation split as an input of the run, the
logged model's metrics tied to that split, and the version's description.
"""

from __future__ import annotations

import json
import re
from pathlib import Path

import httpx
import pytest

from diffusion_core.data.manifest import read_manifest
from diffusion_core.image_grids import MIN_TILE_PX
from diffusion_core.images import decode_png
from flows.pipeline import PipelineResult, retrain
from flows.pipeline_config import PipelineConfig

pytestmark = pytest.mark.slow

STEPS = 40
TINY_TRAIN = {
    "steps": STEPS, "batch_size": 32, "lr": 2e-3, "warmup_steps": 5, "checkpoint_every": 20,
    "log_every": 10, "sample_every": 20, "num_workers": 1, "cpus_per_worker": 1, "num_sample_images": 20,
    "sample_steps": 5, "unet": {"base_channels": 16, "num_res_blocks": 1},
}
IMAGE_FILE = re.compile(r"images/(?P<key>[\w.-]+)\+step\+(?P<step>\d+)\+timestamp\+\d+\+[0-9a-f-]+\.png")


@pytest.fixture(scope="module")
def default_run(mlflow_server, prefect_harness, tmp_path_factory) -> tuple[PipelineConfig, PipelineResult]:
    work = tmp_path_factory.mktemp("rest-run")
    config = PipelineConfig(
        source="digits", work_dir=str(work), train=TINY_TRAIN, model_name="rest-digits",
        tracking_uri=mlflow_server.tracking_uri,
        registry={"min_precision": 0.0, "min_recall": 0.0},  # a 40-step model: plumbing, not quality
        evaluate={"num_samples": 40, "steps": 5, "batch_size": 40, "cache_dir": str(work / "fcache"),
                  "feature_net": {"steps": 50}},
    )
    return config, retrain(config)


def rest(server: str, endpoint: str, **params: str) -> dict:
    response = httpx.get(f"{server}/api/2.0/mlflow/{endpoint}", params=params, timeout=30)
    assert response.status_code == 200, response.text
    return response.json()


def as_dict(pairs: list[dict]) -> dict[str, str]:
    return {p["key"]: p["value"] for p in pairs}


def test_the_server_shows_images_curves_evaluation_and_description(default_run, mlflow_server) -> None:
    config, result = default_run
    server = mlflow_server.tracking_uri
    fingerprint = read_manifest(config.resolved_dataset_uri()).fingerprint
    assert result.trained and result.became_champion and result.training_run_id

    # Sample grids are MLflow images with steps (the run page's step slider): training samples at
    # every sample_every steps and the final EMA grid, plus the evaluation grid at the final step.
    run = rest(server, "runs/get", run_id=result.training_run_id)["run"]
    assert as_dict(run["data"]["tags"])["mlflow.loggedImages"] == "True"
    files = [f["path"] for f in rest(server, "artifacts/list", run_id=result.training_run_id,
                                     path="images")["files"]]
    steps = sorted((m["key"], int(m["step"])) for f in files if (m := IMAGE_FILE.fullmatch(f)))
    assert steps == [("evaluation", STEPS), ("samples", 20), ("samples", STEPS)], files
    final = next(f for f in files if (m := IMAGE_FILE.fullmatch(f)) and m["key"] == "samples"
                 and int(m["step"]) == STEPS)
    grid = decode_png(httpx.get(f"{server}/get-artifact", params={"path": final,
                                "run_uuid": result.training_run_id}, timeout=30).content)
    assert grid.shape[1] >= 10 * MIN_TILE_PX  # ten classes side by side, each tile enlarged

    # The loss curve has at least a point every log_every steps.
    loss = rest(server, "metrics/get-history", run_id=result.training_run_id, metric_key="loss")["metrics"]
    assert {10, 20, 30, 40} <= {int(m["step"]) for m in loss}

    # The validation split is an evaluation input of the run, its digest the dataset's fingerprint.
    evaluation_inputs = [i for i in run["inputs"]["dataset_inputs"]
                         if as_dict(i["tags"])["mlflow.data.context"] == "evaluation"]
    assert [(i["dataset"]["name"], i["dataset"]["digest"]) for i in evaluation_inputs] == \
        [("digits-val", fingerprint[:36])]

    # The logged model's metrics are tied to that dataset, and the model names its version.
    (output,) = run["outputs"]["model_outputs"]
    model = rest(server, f"logged-models/{output['model_id']}")["model"]
    metrics = {m["key"]: m for m in model["data"]["metrics"]}
    assert metrics["eval_fd"]["value"] == pytest.approx(result.metrics["eval_fd"])
    assert {(m["dataset_name"], m["dataset_digest"]) for m in metrics.values()} == \
        {("digits-val", fingerprint[:36])}
    linked = json.loads(as_dict(model["info"]["tags"])["mlflow.modelVersions"])
    assert [(e["name"], str(e["version"])) for e in linked] == [("rest-digits", result.version)]

    # The version says what it is and how it was gated.
    version = rest(server, "model-versions/get", name="rest-digits", version=result.version)["model_version"]
    assert re.fullmatch(
        rf"8x8 grey class-conditional UNet \([\d.]+[kM] params\) trained on digits@{fingerprint[:12]}, "
        r"FD [\d.]+ \(precision [\d.]+, recall [\d.]+, copy share [\d.]+\) on digits-val, "
        r"label accuracy [\d.]+, null label FD [\d.]+, guidance 2 FD [\d.]+; promoted: first champion",
        version["description"]), version["description"]


def test_the_evaluation_grid_shows_one_column_per_class(default_run, mlflow_server, tmp_path: Path) -> None:
    _, result = default_run
    server = mlflow_server.tracking_uri
    files = [f["path"] for f in rest(server, "artifacts/list", run_id=result.training_run_id,
                                     path="images")["files"]]
    (path,) = [f for f in files if (m := IMAGE_FILE.fullmatch(f)) and m["key"] == "evaluation"]
    grid = decode_png(httpx.get(f"{server}/get-artifact", params={"path": path,
                                "run_uuid": result.training_run_id}, timeout=30).content)
    # 40 evaluation samples of 10 classes: 10 columns of 4 enlarged tiles under a header
    assert grid.shape[1] == 2 + 10 * (MIN_TILE_PX + 2)
    assert grid.shape[0] > 4 * (MIN_TILE_PX + 2)
