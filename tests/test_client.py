"""The Python clients and `diffusion-pipeline generate`: retries of 503 answers, batch jobs split
under the server's per-request cap, and what a user sees when no server answers.

Unit tests of the retry arithmetic and the splitting run without a server. The rest talk to one real
Serve app (a random-init 10-class digits checkpoint, no API key) whose limits are small: 8 images
per request, and a model deployment that holds 8 ongoing + 2 queued requests, beyond which Serve
refuses at once (the ingress then answers 503 with Retry-After: 1): a few requests queued behind a
slow one make the server answer real 503s.
"""

from __future__ import annotations

import asyncio
import logging
import time
from pathlib import Path

import httpx
import numpy as np
import pytest

from diffusion_core.images import decode_png, to_uint8
from serving.client import (
    AsyncGenerationClient,
    GenerationClient,
    GenerationError,
    GenerationResult,
    RetryPolicy,
    join_results,
    parse_retry_after,
    request_size,
    retry_delay,
    split,
)

CAP = 8  # images per request on the test server
SLOW_STEPS = 800  # one image with this many steps keeps the model busy for seconds
LIMITS = {"max_images_per_request": 64, "max_work": 3200, "default_steps": 20}


# ------------------------------------------------------------------------------------ unit tests


def test_retry_after_is_read_as_seconds_or_an_http_date():
    assert parse_retry_after("3") == 3.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after("Wed, 21 Oct 2015 07:28:00 GMT", now=1445412490.0) == 0.0  # in the past
    assert [parse_retry_after(value) for value in (None, "soon", "-1")] == [None, None, None]


def test_the_wait_doubles_up_to_its_cap_and_never_undercuts_retry_after():
    policy = RetryPolicy(backoff_s=0.5, max_backoff_s=4.0)
    waits = [retry_delay(None, attempt, policy, jitter=0.0) for attempt in (1, 2, 3, 4, 5)]
    assert waits == [0.5, 1, 2, 4, 4]
    assert retry_delay(None, 3, policy, jitter=0.999) == pytest.approx(1.0, abs=0.01)  # half taken off
    assert retry_delay(7.0, 1, policy, jitter=0.0) == 7.0
    assert retry_delay(1.0, 5, policy, jitter=0.0) == 4.0


@pytest.mark.parametrize(("steps", "cap", "size"), [(None, None, 64), (100, None, 32), (20, 10, 10),
                                                     (5000, None, 1)])
def test_a_request_holds_at_most_the_servers_images_and_work(steps, cap, size):
    assert request_size(LIMITS, steps, cap) == size


def test_a_job_is_split_into_consecutive_requests():
    assert split(1000, 64) == [range(i, min(i + 64, 1000)) for i in range(0, 1000, 64)]
    assert [len(part) for part in split(20, 8)] == [8, 8, 4]


def test_a_server_without_limits_is_refused_by_name():
    with pytest.raises(GenerationError, match="no request limits"):
        request_size(None, None)


def result(version: str, seeds: list[int]) -> GenerationResult:
    return GenerationResult(images=np.zeros((len(seeds), 2, 2, 1), np.uint8), seeds=seeds, labels=None,
                            model={"name": "m", "version": version}, timings={})


def test_parts_from_two_model_versions_are_not_joined():
    joined = join_results([result("1", [0, 1]), result("1", [2])], total_s=1.0)
    assert joined.seeds == [0, 1, 2] and joined.requests == 2 and joined.images.shape == (3, 2, 2, 1)
    with pytest.raises(GenerationError, match="model changed during the job"):
        join_results([result("1", [0, 1]), result("2", [2])], total_s=1.0)


def test_generate_against_a_stopped_server_says_how_to_start_one(tmp_path: Path, capsys):
    from local_services import free_port

    from flows.cli import main

    url = f"http://127.0.0.1:{free_port()}"  # nothing listens there
    with pytest.raises(SystemExit) as done:
        main(["generate", "--url", url, "-n", "2", "--out", str(tmp_path)])
    err = capsys.readouterr().err
    assert done.value.code == 2
    assert f"error: no endpoint answers at {url}" in err and "diffusion-pipeline serve" in err
    assert "ConnectError" not in err and "--debug" not in err and "generating" not in err


# --------------------------------------------------------------------------- against a real server


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from served_app import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("client") / "checkpoint")


@pytest.fixture(scope="module")
def server(_ray_session: None, checkpoint: Path) -> str:
    from local_services import free_port
    from served_app import running_app

    from serving.config import ServeSettings

    settings = ServeSettings(
        model_name="client-test-digits", alias=None, checkpoint_dir=str(checkpoint), port=free_port(),
        max_images_per_request=CAP, max_steps=SLOW_STEPS, max_work=SLOW_STEPS, default_steps=2,
        max_images_per_batch=CAP, max_ongoing_requests=CAP, max_queued_requests=2)
    with running_app(settings) as url:
        yield url


@pytest.fixture(scope="module")
def reference(checkpoint: Path):
    """The checkpoint loaded here: images sampled directly, for comparison."""
    from diffusion_core.checkpoint import load_checkpoint

    return load_checkpoint(checkpoint)


def sampled_directly(reference, seeds: list[int], steps: int = 2) -> np.ndarray:
    return to_uint8(reference.generate(len(seeds), steps=steps, seeds=seeds))


@pytest.mark.slow
def test_a_split_job_equals_one_large_request_bit_for_bit(server: str):
    async def split_job() -> GenerationResult:
        async with AsyncGenerationClient(server) as client:
            return await client.generate_many(CAP, seed=500, max_images_per_request=3, concurrency=1)

    many = asyncio.run(split_job())
    with GenerationClient(server) as client:
        one = client.generate(CAP, seed=500)
    assert many.requests == 3 and many.seeds == one.seeds == list(range(500, 500 + CAP))
    assert many.images.dtype == np.uint8 and np.array_equal(many.images, one.images)


@pytest.mark.slow
def test_a_job_over_the_servers_cap_is_split_by_it_with_progress(server: str, reference):
    calls: list[tuple[int, int]] = []

    async def job() -> GenerationResult:
        async with AsyncGenerationClient(server) as client:
            return await client.generate_many(20, seed=7, labels=[i % 10 for i in range(20)], concurrency=3,
                                              progress=lambda done, total: calls.append((done, total)))

    result = asyncio.run(job())
    assert result.requests == 3 and result.seeds == list(range(7, 27))
    assert result.labels == [i % 10 for i in range(20)] and result.images.shape == (20, 8, 8, 1)
    done = [done for done, _ in calls]  # planned, then after each request in the order they finished
    assert len(calls) == 4 and done[0] == 0 and done == sorted(set(done)) and calls[-1] == (20, 20)
    assert all(total == 20 for _, total in calls)
    labels = [i % 10 for i in range(20)]
    direct = to_uint8(reference.generate(20, steps=2, seeds=list(range(7, 27)), labels=labels))
    assert np.abs(result.images.astype(int) - direct).max() <= 1  # float rounding of another batch size


async def fill_the_server(raw: httpx.AsyncClient) -> list[asyncio.Task]:
    """Make the test server refuse requests for a while, as a busy one does -> the requests in flight.

    One slow request occupies the model; once its turn has started, cheap ones queue behind it in
    the replica, one at a time, until the replica holds 8 (max_ongoing_requests) and Serve's queue
    in front of it 2 (max_queued_requests). The replica's stats are themselves a call that takes one
    of the 8 places, so they are read until 6 requests wait (the slow one plus 6 plus the stats call
    make 8); the last cheap one then fills the replica and two more fill Serve's queue."""
    from ray import serve

    stats = serve.get_deployment_handle("DiffusionModel", app_name="diffusion").stats

    def send(steps: int, seed: int) -> asyncio.Task:
        body = {"num_images": 1, "steps": steps, "seed": seed}
        return asyncio.create_task(raw.post("/generate", json=body))

    async def until(condition) -> None:
        deadline = time.monotonic() + 60
        while not condition(await stats.remote()):
            assert time.monotonic() < deadline, "the test server did not fill up as planned"
            await asyncio.sleep(0.01)

    in_flight = [send(SLOW_STEPS, 0)]
    await until(lambda now: now.queued_work >= SLOW_STEPS and now.queued_jobs == 0)  # being sampled
    for waiting in range(1, 7):
        in_flight.append(send(1, waiting))
        await until(lambda now, waiting=waiting: now.queued_jobs >= waiting)
    for seed in (7, 8, 9):  # each alone, so that Serve assigns or queues it before the next
        in_flight.append(send(1, seed))
        await asyncio.sleep(0.1)
    return in_flight


@pytest.mark.slow
def test_503_is_retried_after_retry_after_within_the_budget(server: str, caplog):
    """While the server is full it answers 503 with Retry-After: 1. A client whose budget is shorter
    than that gives up without waiting; one with a larger budget waits as asked and gets its image
    once the requests ahead of it are done."""

    async def scenario() -> tuple[int, GenerationError, GenerationResult, list[int]]:
        async with httpx.AsyncClient(base_url=server, timeout=300) as raw:
            in_flight = await fill_the_server(raw)
            probe = (await raw.post("/generate", json={"num_images": 1, "steps": 1})).status_code
            async with AsyncGenerationClient(server, retry=RetryPolicy(budget_s=0.5)) as hasty:
                with pytest.raises(GenerationError) as refused:
                    await hasty.generate(1, seed=3)
            async with AsyncGenerationClient(server, retry=RetryPolicy(budget_s=120)) as patient:
                result = await patient.generate(1, seed=3)
            return probe, refused.value, result, [r.status_code for r in await asyncio.gather(*in_flight)]

    with caplog.at_level(logging.INFO, logger="serving.client"):
        probe, refused, result, in_flight_codes = asyncio.run(scenario())
    assert probe == 503 and in_flight_codes == [200] * 10  # the server was full, and only just
    # waiting the 1 s asked for would have overrun its budget: no second attempt
    assert refused.status_code == 503 and "gave up after 1 attempts" in str(refused)
    assert "retry budget 0.5s" in str(refused)
    waits = [float(r.getMessage().rsplit(" in ", 1)[1].rstrip("s")) for r in caplog.records
             if "HTTP 503, retry" in r.getMessage()]
    assert waits and all(wait >= 1.0 for wait in waits)  # Retry-After: 1 honoured
    assert result.seeds == [3]


@pytest.mark.slow
def test_generate_cli_splits_a_job_over_the_cap_and_enlarges_the_grid(server: str, tmp_path: Path, capsys):
    from flows.cli import main

    with pytest.raises(SystemExit) as done:
        main(["generate", "--url", server, "-n", "20", "--seed", "3", "--nrow", "5", "--out", str(tmp_path)])
    out, err = capsys.readouterr()
    assert done.value.code == 0, err
    assert "20 images from client-test-digits" in out and "in 3 requests" in out
    assert "20/20" in err and "images/s" in err  # the progress bar's last state
    names = sorted(p.name for p in tmp_path.glob("image_*.png"))
    assert names == [f"image_{i:03d}_seed{3 + i}.png" for i in range(20)]
    with GenerationClient(server) as client:
        first = client.generate(CAP, seed=3)  # the job's first request, alone
    saved = np.stack([decode_png((tmp_path / names[i]).read_bytes()) for i in range(CAP)])
    assert np.array_equal(saved, first.images)
    grid = decode_png((tmp_path / "grid.png").read_bytes())
    assert grid.shape == (4 * 34 + 2, 5 * 34 + 2, 1)  # 4 rows x 5 of 8 px images zoomed to 32, padding 2
    tile = grid[2:34, 2:34, 0]
    assert np.array_equal(tile, first.images[0, :, :, 0].repeat(4, axis=0).repeat(4, axis=1))
