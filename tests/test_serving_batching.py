"""Packing requests into homogeneous sampler runs and splitting results back (no Ray needed)."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest

from serving.batching import GenerationJob, RunCoalescer, largest_run_per_job, plan_runs, scatter_results
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


# ------------------------------------------------------------------------------- the RunCoalescer


class GatedSampler:
    """A `sample` for RunCoalescer that records each run and holds it until the test opens the gate."""

    def __init__(self) -> None:
        self.runs: list[list[str]] = []
        self.gate = asyncio.Event()
        self.fail_next = False

    async def __call__(self, items: list[str]) -> list[str]:
        self.runs.append(list(items))
        await self.gate.wait()
        if self.fail_next:
            self.fail_next = False
            raise RuntimeError("sampler broke")
        return [f"image of {item}" for item in items]


async def _settle() -> None:
    for _ in range(5):
        await asyncio.sleep(0)


def test_batches_closed_during_a_run_share_the_next_run() -> None:
    """Serve's closed batches ([a], then [b], [c, d] while a samples) become runs [a], [b, c, d]."""

    async def scenario() -> tuple[list, list]:
        coalescer, sampler = RunCoalescer(weight=lambda _: 1), GatedSampler()
        submit = lambda items: asyncio.create_task(coalescer.run(items, 32, sampler))  # noqa: E731
        first = submit(["a"])
        await _settle()
        later = [submit(["b"]), submit(["c", "d"])]
        await _settle()
        sampler.gate.set()
        results = await asyncio.gather(first, *later)
        return sampler.runs, results

    runs, results = asyncio.run(scenario())
    assert runs == [["a"], ["b", "c", "d"]]
    assert results == [["image of a"], ["image of b"], ["image of c", "image of d"]]


def test_runs_respect_the_weight_limit_oldest_first() -> None:
    async def scenario() -> list:
        weights = {"big": 20, "x": 10, "y": 10, "z": 20, "w": 1}
        coalescer, sampler = RunCoalescer(weight=weights.__getitem__), GatedSampler()
        tasks = [asyncio.create_task(coalescer.run(["big"], 32, sampler))]
        await _settle()
        for name in ("x", "y", "z", "w"):
            tasks.append(asyncio.create_task(coalescer.run([name], 32, sampler)))
        await _settle()
        sampler.gate.set()
        await asyncio.gather(*tasks)
        return sampler.runs

    # "w" would fit beside x and y, but it arrived after z: nothing is skipped, so nothing starves.
    assert asyncio.run(scenario()) == [["big"], ["x", "y"], ["z", "w"]]


def test_a_failed_run_fails_its_items_and_the_next_run_still_happens() -> None:
    async def scenario() -> tuple[list, object, object]:
        coalescer, sampler = RunCoalescer(weight=lambda _: 1), GatedSampler()
        first = asyncio.create_task(coalescer.run(["a"], 32, sampler))
        await _settle()
        sampler.fail_next = True
        sampler.gate.set()
        failed = await asyncio.gather(first, return_exceptions=True)
        ok = await coalescer.run(["b"], 32, sampler)
        return sampler.runs, failed[0], ok

    runs, failed, ok = asyncio.run(scenario())
    assert isinstance(failed, RuntimeError) and "sampler broke" in str(failed)
    assert runs == [["a"], ["b"]] and ok == ["image of b"]


def test_cancelling_the_batch_that_runs_does_not_strand_the_others() -> None:
    async def scenario() -> object:
        coalescer, sampler = RunCoalescer(weight=lambda _: 1), GatedSampler()
        runner = asyncio.create_task(coalescer.run(["a"], 32, sampler))
        await _settle()
        waiting = asyncio.create_task(coalescer.run(["b"], 32, sampler))
        await _settle()
        runner.cancel()  # while it holds the model; "b" then runs in its own turn
        await _settle()
        sampler.gate.set()
        return await asyncio.wait_for(waiting, timeout=5)

    assert asyncio.run(scenario()) == ["image of b"]
