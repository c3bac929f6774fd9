"""Ray Train integration: real local Ray, real MLflow SQLite store, the built-in digits dataset.

Each TorchTrainer.fit() costs ~25 s of start-up, so every test combines several checks in few runs:
- two workers, one injected worker failure, MLflow contents, checkpoints loadable by diffusion_core;
- one worker, the whole run stopped and rerun under the same name: resumes from its checkpoint's step
  and data position, and ends with exactly the weights of an uninterrupted in-process run of the
  same steps on the same rows (the split in memory, in data_order's order);
- two nodes of a local multi-node cluster, one worker on each.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import mlflow
import pytest
import torch
from mlflow.tracking import MlflowClient
from tiny_models import TINY_UNET

from diffusion_core.adapters.ray_train import TrainResult, run_training
from diffusion_core.checkpoint import load_checkpoint
from diffusion_core.data.readers import read_split_table
from diffusion_core.data_order import stream_row_indices
from diffusion_core.errors import ConfigError
from diffusion_core.training import (
    FaultInjection,
    TrainConfig,
    build_train_state,
    read_training_step,
    train_step,
    training_windows,
)

pytestmark = pytest.mark.slow


def tiny_config(dataset: str, tmp_path: Path, store, **overrides: object) -> TrainConfig:
    base = dict(
        dataset=dataset, storage_path=str(tmp_path / "ray"), tracking_uri=store.tracking_uri,
        artifact_location=store.artifact_root, experiment_name="test-train", unet=TINY_UNET,
        num_workers=2, cpus_per_worker=1, batch_size=32, lr=3e-3, warmup_steps=2, steps=24,
        checkpoint_every=8, log_every=4, num_sample_images=10, sample_steps=4, seed=0,
    )
    return TrainConfig(**{**base, **overrides})


def metric_history(run_id: str, key: str) -> list[float]:
    return [m.value for m in sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)]


def test_two_workers_survive_a_failure_and_track_everything_in_mlflow(ray_local, mlflow_store,
                                                                      prepared_digits, tmp_path) -> None:
    marker = tmp_path / "fault_fired"
    config = tiny_config(prepared_digits, tmp_path, mlflow_store, run_name="two-workers", max_failures=1,
                         fault_injection=FaultInjection(at_step=12, marker_path=str(marker), rank=1))
    result = run_training(config, tags={"prefect.flow_run_id": "flow-123"})

    # The injected failure fired once; the retry resumed at the step-8 checkpoint, not at 0.
    assert marker.exists()
    assert (result.metrics["start_step"], result.metrics["step"]) == (8, 24)
    assert result.metrics["world_size"] == 2

    # Checkpoints: the final one loads through diffusion_core and holds the training state.
    assert read_training_step(result.checkpoint_path) == 24
    loaded = load_checkpoint(result.checkpoint_path)
    assert loaded.spec.data.dataset_fingerprint
    images = loaded.generate(4, steps=4, seeds=[0, 1, 2, 3], labels=[0, 1, 2, 3])
    assert images.shape == (4, 1, 8, 8) and torch.isfinite(images).all()
    kept = sorted(p.name for p in Path(result.checkpoint_path).parent.glob("checkpoint_*") if p.is_dir())
    assert kept == ["checkpoint_0000016", "checkpoint_0000024"]  # num_to_keep=2

    # MLflow: params, falling loss, the other metrics, sample grids, dataset input, tags, status.
    run = MlflowClient().get_run(result.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["unet.base_channels"] == "8" and run.data.params["steps"] == "24"
    assert run.data.tags["prefect.flow_run_id"] == "flow-123"
    assert run.data.tags["checkpoint_path"] == result.checkpoint_path
    losses = metric_history(result.run_id, "loss")
    assert losses[-1] < 0.7 * losses[0], losses
    assert {"lr", "grad_norm", "images_per_s", "nonfinite_steps"} <= set(run.data.metrics)
    images = [a.path for a in MlflowClient().list_artifacts(result.run_id, "images")]
    assert any(p.startswith("images/samples+step+24+") and p.endswith(".png") for p in images), images
    assert run.inputs.dataset_inputs[0].dataset.digest == loaded.spec.data.dataset_fingerprint[:36]
    assert Path(mlflow.get_experiment(run.info.experiment_id).artifact_location.removeprefix("file://")) \
        == Path(mlflow_store.artifact_root.removeprefix("file://"))


def reference_weights(config: TrainConfig, dataset: str) -> dict[str, torch.Tensor]:
    """The same training in this process, without Ray or streaming: the whole train split in memory,
    read in the order that data_order assigns to a single worker."""
    from diffusion_core.adapters.ray_data import decode_batch, row_group_rows

    table, manifest = read_split_table(dataset, "train")
    images, labels = decode_batch({c: table.column(c).to_numpy(zero_copy_only=False)
                                   for c in ("image", "label")}, manifest)
    windows = training_windows(config, math.prod(manifest.image_shape), row_group_rows(dataset, "train"),
                               rank=0, world=1, start_step=0)
    order = torch.from_numpy(stream_row_indices(windows))
    torch.set_num_threads(1)  # the worker's thread count (cpus_per_worker=1): same kernels, same sums
    state = build_train_state(config)
    while state.step < config.steps:
        rows = order[state.step * config.batch_size : (state.step + 1) * config.batch_size]
        train_step(state, config, images[rows], labels[rows])
    return state.model.state_dict()


def test_stopped_run_resumes_under_its_name_and_matches_an_uninterrupted_run(
        ray_local, mlflow_store, prepared_digits, tmp_path) -> None:
    from ray.train import TrainingFailedError

    marker = tmp_path / "fault_fired"
    config = tiny_config(prepared_digits, tmp_path, mlflow_store, run_name="stop-and-rerun", num_workers=1,
                         steps=16, max_failures=0, sample_steps=2,
                         fault_injection=FaultInjection(at_step=10, marker_path=str(marker)))
    with pytest.raises(TrainingFailedError):
        run_training(config)
    result: TrainResult = run_training(config)  # same run name: Ray restores its checkpoint history

    assert (result.metrics["start_step"], result.metrics["step"]) == (8, 16)
    runs = MlflowClient().search_runs([mlflow.get_experiment_by_name("test-train").experiment_id])
    assert [r.info.run_id for r in runs] == [result.run_id]  # the rerun reattached to the same run

    reference = reference_weights(config, prepared_digits)
    resumed = load_checkpoint(result.checkpoint_path, use_ema=False).model.state_dict()
    diffs = {k: (reference[k] - resumed[k]).abs().max().item() for k in reference}
    assert max(diffs.values()) < 1e-6, diffs


def test_prefect_flow_trains_on_two_nodes(fresh_ray_cluster, prefect_harness, mlflow_store, prepared_digits,
                                          tmp_path) -> None:
    import ray

    from flows.train import PREFECT_FLOW_RUN_TAG, train

    fresh_ray_cluster.add_node(num_cpus=2)  # one CPU for a worker, one for Ray Data's reads
    ray.init(address=fresh_ray_cluster.address)
    config = tiny_config(prepared_digits, tmp_path, mlflow_store, run_name="two-nodes", steps=8,
                         placement_strategy="STRICT_SPREAD", sample_steps=2)
    state = train(config, return_state=True)
    result = state.result()
    tags = MlflowClient().get_run(result.run_id).data.tags
    assert tags[PREFECT_FLOW_RUN_TAG] == str(state.state_details.flow_run_id)
    node_ids = result.metrics["worker_node_ids"].split(",")
    assert len(node_ids) == 2 and node_ids[0] != node_ids[1]
    assert read_training_step(result.checkpoint_path) == 8
    assert json.loads((Path(result.checkpoint_path) / "spec.json").read_text())["unet"]["base_channels"] == 8


def test_requests_the_cluster_cannot_meet_are_refused(ray_local, mlflow_store, prepared_digits,
                                                      tmp_path) -> None:
    # Either would otherwise wait forever: Ray Data's reads need a free CPU; GPUs must exist.
    with pytest.raises(ConfigError, match="cpus_per_worker"):
        run_training(tiny_config(prepared_digits, tmp_path, mlflow_store, num_workers=2, cpus_per_worker=2))
    with pytest.raises(ConfigError, match="use_gpu"):
        run_training(tiny_config(prepared_digits, tmp_path, mlflow_store, use_gpu=True))
