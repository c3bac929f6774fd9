"""The batcher and the request rules, without Ray: planning runs, turns, order, cancellation,
admission by work, non-finite outputs; the request schema's limits and messages."""

from __future__ import annotations

import asyncio
import threading

import numpy as np
import pytest
from pydantic import ValidationError

from diffusion_core.errors import ConfigError
from serving.batching import Batcher, Run, WorkRate, admission, plan_runs, run_key
from serving.config import ServeSettings
from serving.jobs import Failure, Generated, GenerationJob
from serving.schemas import ModelRef, request_model


def job(n: int, first_seed: int, sampler: str = "dpmpp_2m", steps: int = 4, guidance: float = 1.0,
        labels: tuple[int, ...] | None = None) -> GenerationJob:
    return GenerationJob(steps=steps, sampler=sampler, guidance_scale=guidance, eta=0.0,
                         seeds=tuple(range(first_seed, first_seed + n)), labels=labels)


# ---------------------------------------------------------------------------------- planning runs


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
        assert {run_key(jobs[j]) for j, _ in run.slots} == {run.key}
    slots = sorted(s for r in runs for s in r.slots)
    assert slots == sorted((j, i) for j, jb in enumerate(jobs) for i in range(jb.num_images))
    # the default-settings jobs (5 + 9 + 6 = 20 images) fill runs of 8, 8, 4
    default_runs = [r.num_images for r in runs if r.key == run_key(jobs[0])]
    assert default_runs == [8, 8, 4]


def test_labels_follow_their_images_into_runs_and_out_of_them():
    runs = plan_runs([job(2, 0, labels=(7, 8)), job(3, 10, labels=(1, 2, 3))], max_images=4)
    assert [r.labels for r in runs] == [[7, 8, 1, 2], [3]]
    rest = runs[0].without({0})
    assert (rest.seeds, rest.labels, rest.slots) == ([10, 11], [1, 2], [(1, 0), (1, 1)])


def test_plan_rejects_a_zero_run_size():
    with pytest.raises(ValueError, match="max_images"):
        plan_runs([job(1, 0)], max_images=0)


# ------------------------------------------------------------------------------------ the batcher


class GatedModel:
    """A TurnModel whose image k is a constant equal to its seed. Each run is recorded and, while
    `gate` is closed, held in its worker thread (as a long sampler run would be)."""

    ref = ModelRef(name="m", version="1", alias=None)

    def __init__(self, nan_seeds: frozenset[int] = frozenset(), refuse_sampler: str | None = None) -> None:
        self.runs: list[list[int]] = []
        self.run_labels: list[list[int] | None] = []
        self.gate = threading.Event()
        self.gate.set()
        self.nan_seeds, self.refuse_sampler = nan_seeds, refuse_sampler

    def labels_for(self, job: GenerationJob) -> tuple[int, ...] | None:
        """Given labels as they are; without labels, seed % 10 (as a class prior drawn by seed would
        be: a function of the seed alone); -1 for every image of an unconditional request."""
        if job.labels is not None:
            if any(label > 9 for label in job.labels):
                raise ConfigError("labels: each must be a class of this model")
            return job.labels
        return tuple(-1 if job.unconditional else seed % 10 for seed in job.seeds)

    def sample(self, run: Run) -> np.ndarray:
        self.runs.append(list(run.seeds))
        self.run_labels.append(run.labels)
        self.gate.wait(timeout=30)
        if run.key.sampler == self.refuse_sampler:
            raise ConfigError("sampler: refused for this test")
        values = [np.nan if seed in self.nan_seeds else float(seed) for seed in run.seeds]
        return np.asarray(values, dtype=np.float32)[:, None, None, None] * np.ones((1, 1, 2, 2), np.float32)


def batcher_for(model: GatedModel, max_images: int = 32, wait_s: float = 0.0, horizon_s: float = 300.0,
                rate: WorkRate | None = None) -> Batcher:
    return Batcher(lambda: model, max_images=max_images, wait_s=wait_s, horizon_s=horizon_s, rate=rate)


async def until(condition, timeout_s: float = 10.0) -> None:
    """Yield to the loop (and the sampling thread) until `condition()` holds."""
    for _ in range(int(timeout_s / 0.005)):
        if condition():
            return
        await asyncio.sleep(0.005)
    raise AssertionError("condition not reached")


def seeds_of(result) -> list[int]:
    assert isinstance(result, Generated), result
    return [int(v) for v in result.images[:, 0, 0, 0]]


def test_jobs_that_arrive_while_a_run_samples_share_the_next_turn():
    async def scenario():
        model = GatedModel()
        batcher = batcher_for(model)
        model.gate.clear()
        first = asyncio.create_task(batcher.submit(job(1, 0)))
        await until(lambda: len(model.runs) == 1)
        later = [asyncio.create_task(batcher.submit(j)) for j in (job(1, 10), job(2, 20))]
        await asyncio.sleep(0.05)
        model.gate.set()
        return model.runs, await asyncio.gather(first, *later)

    runs, results = asyncio.run(scenario())
    assert runs == [[0], [10, 20, 21]]
    assert [seeds_of(r) for r in results] == [[0], [10], [20, 21]]
    assert [r.timings.batch_total_images for r in results] == [1, 3, 3]


def test_a_turn_takes_jobs_oldest_first_up_to_the_cap_never_skipping_one():
    async def scenario():
        model = GatedModel()
        batcher = batcher_for(model, max_images=32)
        model.gate.clear()
        tasks = [asyncio.create_task(batcher.submit(job(20, 0)))]
        await until(lambda: len(model.runs) == 1)
        for n, seed in ((10, 100), (10, 200), (20, 300), (1, 400)):
            tasks.append(asyncio.create_task(batcher.submit(job(n, seed))))
            await asyncio.sleep(0)
        model.gate.set()
        await asyncio.gather(*tasks)
        return [(run[0], len(run)) for run in model.runs]

    # the 1-image job would fit beside the two 10-image ones, but it arrived after the 20-image one
    assert asyncio.run(scenario()) == [(0, 20), (100, 20), (300, 21)]


def test_a_job_larger_than_the_cap_is_sampled_alone_in_several_runs():
    async def scenario():
        model = GatedModel()
        result = await batcher_for(model, max_images=4).submit(job(10, 0))
        return model.runs, result

    runs, result = asyncio.run(scenario())
    assert [len(r) for r in runs] == [4, 4, 2] and seeds_of(result) == list(range(10))


def test_a_full_cap_starts_the_turn_without_waiting_for_the_window():
    async def scenario():
        model = GatedModel()
        batcher = batcher_for(model, max_images=4, wait_s=60.0)
        jobs = [asyncio.create_task(batcher.submit(job(1, i))) for i in range(4)]
        return await asyncio.wait_for(asyncio.gather(*jobs), timeout=20), model.runs

    results, runs = asyncio.run(scenario())
    assert runs == [[0, 1, 2, 3]] and [seeds_of(r) for r in results] == [[0], [1], [2], [3]]


def test_a_cancelled_job_leaves_the_queue_and_is_never_sampled():
    async def scenario():
        model = GatedModel()
        batcher = batcher_for(model)
        model.gate.clear()
        running = asyncio.create_task(batcher.submit(job(1, 0)))
        await until(lambda: len(model.runs) == 1)
        abandoned = asyncio.create_task(batcher.submit(job(3, 500)))
        kept = asyncio.create_task(batcher.submit(job(1, 7)))
        await asyncio.sleep(0.01)
        abandoned.cancel()  # what Serve does when the client disconnects or the ingress times out
        await asyncio.sleep(0.01)
        queued = batcher.stats()
        model.gate.set()
        await asyncio.gather(running, kept)
        return model.runs, queued, batcher.stats()

    runs, queued, after = asyncio.run(scenario())
    assert runs == [[0], [7]]
    assert queued.queued_jobs == 1 and queued.queued_work == 2 * 4  # the running job and the kept one
    assert after.jobs_cancelled == 1 and after.queued_work == 0 and after.images_sampled == 2


def test_a_job_cancelled_during_its_turn_loses_the_runs_not_yet_started():
    async def scenario():
        model = GatedModel()
        batcher = batcher_for(model, max_images=2)
        model.gate.clear()
        large = asyncio.create_task(batcher.submit(job(5, 0)))  # runs of 2, 2, 1
        await until(lambda: len(model.runs) == 1)
        large.cancel()
        await asyncio.sleep(0.01)
        model.gate.set()
        await asyncio.gather(large, return_exceptions=True)
        other = await batcher.submit(job(1, 9))
        return model.runs, other

    runs, other = asyncio.run(scenario())
    assert runs == [[0, 1], [9]] and seeds_of(other) == [9]


def test_admission_by_work_refuses_what_would_not_finish_in_time():
    assert admission(queued_work=0, work=10_000, rate=100.0, horizon_s=1.0) is None  # empty queue admits
    assert admission(queued_work=50, work=50, rate=100.0, horizon_s=1.0) is None
    assert admission(queued_work=50, work=60, rate=100.0, horizon_s=1.0) == 1.0
    assert admission(queued_work=400, work=100, rate=100.0, horizon_s=1.0) == 4.0  # 4 s to drain the excess

    async def scenario():
        model = GatedModel()
        batcher = batcher_for(model, horizon_s=1.0, rate=WorkRate(prior=100.0))
        model.gate.clear()
        first = asyncio.create_task(batcher.submit(job(10, 0, steps=5)))  # work 50
        await until(lambda: len(model.runs) == 1)
        refused = await batcher.submit(job(12, 100, steps=5))  # 50 + 60 > 100 * 1 s
        admitted = asyncio.create_task(batcher.submit(job(8, 200, steps=5)))  # 50 + 40 fits
        await asyncio.sleep(0.01)
        model.gate.set()
        return refused, await first, await admitted, batcher.stats()

    refused, first, admitted, stats = asyncio.run(scenario())
    assert isinstance(refused, Failure) and refused.kind == "overloaded" and refused.retry_after_s >= 1
    assert isinstance(first, Generated) and isinstance(admitted, Generated)
    assert stats.jobs_refused == 1 and stats.work_per_s > 0


def test_work_rate_is_recent_work_over_recent_time():
    rate = WorkRate(prior=7.0, window=2)
    assert rate.per_second() == 7.0
    rate.observe(100, 1.0)
    rate.observe(300, 1.0)
    rate.observe(600, 2.0)  # the first run falls out of the window
    assert rate.per_second() == pytest.approx(900 / 3.0)


def test_non_finite_images_fail_their_job_only_and_count_against_health():
    async def scenario():
        model = GatedModel(nan_seeds=frozenset({5}))
        batcher = batcher_for(model, wait_s=0.05)
        both = await asyncio.gather(batcher.submit(job(1, 5)), batcher.submit(job(1, 6)))
        failing_after_nan = batcher.failing_runs
        await batcher.submit(job(1, 7))
        return both, failing_after_nan, batcher.failing_runs

    (bad, good), failing_after_nan, failing_after_good = asyncio.run(scenario())
    assert isinstance(bad, Failure) and bad.kind == "model_output" and "non-finite" in bad.message
    assert seeds_of(good) == [6]
    assert (failing_after_nan, failing_after_good) == (1, 0)


def test_a_run_the_sampler_refuses_fails_only_its_jobs():
    async def scenario():
        model = GatedModel(refuse_sampler="ddim")
        batcher = batcher_for(model, wait_s=0.05)
        results = await asyncio.gather(batcher.submit(job(1, 0, sampler="ddim")), batcher.submit(job(1, 1)))
        return results, batcher

    (refused, ok), batcher = asyncio.run(scenario())
    assert isinstance(refused, Failure) and refused.kind == "invalid" and "sampler" in refused.message
    assert seeds_of(ok) == [1] and batcher.failing_runs == 0


def test_a_turn_resolves_labels_with_its_model_and_the_answer_reports_them():
    async def scenario():
        model = GatedModel()
        batcher = batcher_for(model, wait_s=0.05)
        unconditional = GenerationJob(steps=4, sampler="dpmpp_2m", guidance_scale=1.0, eta=0.0, seeds=(5,),
                                      unconditional=True)
        results = await asyncio.gather(batcher.submit(job(2, 13)), batcher.submit(job(1, 40, labels=(4,))),
                                       batcher.submit(unconditional), batcher.submit(job(1, 0, labels=(12,))))
        return results, model

    (drawn, given, null, refused), model = asyncio.run(scenario())
    assert (drawn.labels, given.labels, null.labels) == ((3, 4), (4,), (-1,))
    assert isinstance(refused, Failure) and refused.kind == "invalid" and "labels" in refused.message
    assert model.run_labels == [[3, 4, 4, -1]]  # one run: every job was conditional once resolved


# --------------------------------------------------------------------------------- request schema


SETTINGS = ServeSettings(max_images_per_request=8, max_steps=50, max_work=100, default_steps=10,
                         max_images_per_batch=8)


@pytest.mark.parametrize(("fields", "message"), [
    ({"num_images": 0}, "num_images"),
    ({"num_images": 9}, "num_images"),
    ({"steps": 51}, "steps"),
    ({"num_images": 8, "steps": 40},
     "num_images * steps: exceeds the per-request work cap; accepted: <= 100"),
    ({"num_images": 2, "labels": [1]}, "labels: one label per image"),
    ({"labels": [1] * 9}, "labels"),
    ({"eta": 0.5}, "eta: only used by ddim"),
    ({"num_images": 2, "seed": 2**63 - 1}, "seed: seed + num_images - 1 must not exceed"),
    ({"num_images": True}, "num_images"),
    ({"num_images": "2"}, "num_images"),
    ({"guidance_scale": "1"}, "guidance_scale"),
    ({"labels": [True]}, "labels"),
])
def test_requests_outside_the_limits_are_refused_naming_the_field(fields: dict, message: str):
    with pytest.raises(ValidationError) as err:
        request_model(SETTINGS).model_validate(fields)
    assert message in str(err.value)


def test_unconditional_is_refused_beside_labels():
    with pytest.raises(ValidationError, match="unconditional: accepted: true only without labels"):
        request_model(SETTINGS).model_validate({"num_images": 1, "labels": [3], "unconditional": True})
    assert request_model(SETTINGS).model_validate({"unconditional": True}).unconditional


def test_a_valid_request_gets_the_server_defaults():
    fields = {"num_images": 2, "labels": [0, -1], "guidance_scale": 2}
    request = request_model(SETTINGS).model_validate(fields)
    assert (request.steps, request.sampler, request.guidance_scale) == (10, "dpmpp_2m", 2.0)


@pytest.mark.parametrize("host", ["0.0.0.0", "::", "10.1.2.3", "serve.example.com"])
def test_settings_refuse_a_non_loopback_host_without_an_api_key(host: str):
    with pytest.raises(ValueError, match="api_key_env: required when host is not a loopback address"):
        ServeSettings(host=host)
    assert ServeSettings(host=host, api_key_env="SERVE_KEY").host == host


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.2", "::1", "localhost"])
def test_settings_accept_a_loopback_host_without_an_api_key(host: str):
    assert ServeSettings(host=host).api_key_env is None


def test_settings_refuse_a_queue_that_would_cap_batches():
    with pytest.raises(ValueError, match="max_ongoing_requests"):
        ServeSettings(max_images_per_batch=32, max_ongoing_requests=5)
