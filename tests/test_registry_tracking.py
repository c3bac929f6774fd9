"""Training-run tracking: when rank 0 records curve points, and what a resumed run's tracker sends."""

from __future__ import annotations

import re

import numpy as np
from mlflow import MlflowClient

from diffusion_core.adapters.mlflow_tracking import LogCadence, RankZeroTracker


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_log_cadence_adds_a_point_every_interval_between_the_scheduled_steps() -> None:
    clock = FakeClock()
    cadence = LogCadence(every_steps=100, last_step=250, interval_s=2.0, clock=clock)
    logged = []
    for step in range(1, 251):
        clock.now += 0.3  # a slow model: 0.3 s per step
        if cadence.due(step):
            logged.append(step)
    # 7 steps (2.1 s) after each point, and the schedule's steps (100, 200, the last), which restart
    # the interval
    assert logged == [*range(7, 99, 7), 100, *range(107, 199, 7), 200, *range(207, 250, 7), 250]


def test_log_cadence_keeps_a_fast_run_to_its_schedule_plus_one_point_per_interval() -> None:
    clock = FakeClock()
    cadence = LogCadence(every_steps=50, last_step=1000, interval_s=2.0, clock=clock)
    logged = []
    for step in range(1, 1001):
        clock.now += 0.01  # 100 steps/s: the schedule alone gives a point every 0.5 s
        if cadence.due(step):
            logged.append(step)
    assert logged == list(range(50, 1001, 50))
    assert cadence.on_schedule(50) and not cadence.on_schedule(51) and cadence.on_schedule(1000)


def test_a_resumed_run_logs_each_step_once_and_images_by_step(mlflow_store) -> None:
    client = MlflowClient(mlflow_store.tracking_uri)
    run_id = client.create_run(client.get_experiment_by_name("Default").experiment_id).info.run_id
    first = RankZeroTracker(mlflow_store.tracking_uri, run_id, system_metrics_interval_s=None)
    for step in range(1, 6):
        first.log_metrics({"loss": 1.0 / step}, step=step)
    first.log_image(np.zeros((4, 4, 1), np.uint8), "samples", step=5)
    first.close()

    # A retried worker group resumes at the step-3 checkpoint and repeats steps 4 and 5.
    second = RankZeroTracker(mlflow_store.tracking_uri, run_id, system_metrics_interval_s=None)
    for step in range(4, 8):
        second.log_metrics({"loss": 10.0 + step}, step=step)
    second.log_image(np.full((4, 4, 1), 255, np.uint8), "samples", step=5)  # repeated: not logged
    second.log_image(np.full((4, 4, 3), 255, np.uint8), "samples", step=7)
    second.close()

    history = sorted((m.step, m.value) for m in client.get_metric_history(run_id, "loss"))
    assert history == [(1, 1.0), (2, 0.5), (3, 1 / 3), (4, 0.25), (5, 0.2), (6, 16.0), (7, 17.0)]
    names = [a.path for a in client.list_artifacts(run_id, "images") if a.path.endswith(".png")]
    steps = sorted(int(re.match(r"images/samples\+step\+(\d+)\+", n).group(1)) for n in names)
    assert steps == [5, 7]  # MLflow's step-slider files: one full-size PNG per logged step
    assert client.get_run(run_id).data.tags["mlflow.loggedImages"] == "True"
