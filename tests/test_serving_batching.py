"""Packing requests into homogeneous sampler runs and splitting results back (no Ray needed)."""

from __future__ import annotations

import numpy as np
import pytest

from serving.batching import GenerationJob, largest_run_per_job, plan_runs, scatter_results
from serving.config import ServeSettings
from serving.schemas import GenerateRequest
from serving.validation import label_errors, limit_errors


def job(n: int, first_seed: int, sampler: str = "dpmpp_2m", steps: int = 4, guidance: float = 1.0,
        labels: tuple[int, ...] | None = None) -> GenerationJob:
    return GenerationJob(steps=steps, sampler=sampler, guidance_scale=guidance, eta=0.0,
                         seeds=tuple(range(first_seed, first_seed + n)), labels=labels)


def fake_sampler(run) -> np.ndarray:
    """Stand-in for a sampler run whose image k is a constant equal to its seed."""
    return np.asarray(run.seeds, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 2, 2), np.float32)


def test_one_and_twelve_image_requests_share_one_run():
    runs = plan_runs([job(1, 100), job(12, 200)], max_images=32)
    assert len(runs) == 1 and runs[0].num_images == 13
    assert runs[0].seeds == [100, *range(200, 212)]


def test_runs_are_homogeneous_bounded_and_cover_every_image_once():
    jobs = [job(5, 0), job(3, 10, sampler="ddim"), job(9, 20), job(2, 40, steps=8), job(7, 50, guidance=3.0),
            job(4, 60, labels=(1, 2, 3, 4)), job(6, 70)]
    runs = plan_runs(jobs, max_images=8)
    assert all(1 <= r.num_images <= 8 for r in runs)
    for run in runs:
        assert {jobs[j].run_key for j, _ in run.slots} == {run.key}
    slots = sorted(s for r in runs for s in r.slots)
    assert slots == sorted((j, i) for j, jb in enumerate(jobs) for i in range(jb.num_images))
    # the default-settings jobs (5 + 9 + 6 = 20 images) fill runs of 8, 8, 4
    default_runs = [r.num_images for r in runs if r.key == jobs[0].run_key]
    assert default_runs == [8, 8, 4]


def test_scatter_returns_each_jobs_images_in_seed_order():
    jobs = [job(3, 0), job(11, 100, sampler="ddpm"), job(1, 500), job(4, 900, labels=(0, 1, 2, 3))]
    runs = plan_runs(jobs, max_images=4)
    per_job = scatter_results(jobs, runs, [fake_sampler(r) for r in runs])
    for jb, images in zip(jobs, per_job, strict=True):
        assert images.shape == (jb.num_images, 1, 2, 2)
        np.testing.assert_array_equal(images[:, 0, 0, 0], np.asarray(jb.seeds, dtype=np.float32))


def test_labels_follow_their_images_into_runs():
    jobs = [job(2, 0, labels=(7, 8)), job(3, 10, labels=(1, 2, 3))]
    runs = plan_runs(jobs, max_images=4)
    assert [r.labels for r in runs] == [[7, 8, 1, 2], [3]]
    assert largest_run_per_job(2, runs) == [4, 4]


def test_plan_rejects_a_zero_run_size():
    with pytest.raises(ValueError, match="max_images"):
        plan_runs([job(1, 0)], max_images=0)


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_images": 0}, "num_images: 0 is out of range; accepted: 1..8"),
    ({"num_images": 9}, "num_images: 9 is out of range; accepted: 1..8"),
    ({"steps": 51}, "steps: 51 is out of range; accepted: 1..50"),
    ({"num_images": 8, "steps": 40}, "exceeds the per-request work cap; accepted: <= 100"),
    ({"num_images": 2, "labels": [1]}, "labels: 1 labels for num_images=2"),
])
def test_limit_errors_name_the_field_and_the_accepted_range(fields, message):
    settings = ServeSettings(max_images_per_request=8, max_steps=50, max_work=100, default_steps=10,
                             max_images_per_batch=8)
    errors = limit_errors(GenerateRequest(**fields), settings)
    assert len(errors) == 1 and message in errors[0]


def test_label_errors_against_the_model():
    assert label_errors(None, None) == [] and label_errors([0, 9], 10) == []
    assert "unconditional" in label_errors([0], None)[0]
    assert "[-1, 10] are not classes of this model; accepted: 0..9" in label_errors([-1, 3, 10], 10)[0]


def test_settings_refuse_a_queue_that_would_cap_batches():
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        ServeSettings(max_images_per_batch=32, max_ongoing_requests=5)
