"""Python clients of the generation API.

    from serving.client import AsyncGenerationClient, GenerationClient

    with GenerationClient("http://127.0.0.1:8000", api_key=None) as client:
        result = client.generate(num_images=16, steps=20, seed=0)   # one request: a GenerationResult
    result.images        # uint8 (N, H, W, C) decoded from the PNGs
    result.seeds         # image i used seed + i (or the random base seed the server drew)

    async with AsyncGenerationClient("http://127.0.0.1:8000") as client:
        result = await client.generate_many(1000, seed=0, progress=lambda done, total: ...)

`generate_many` splits a job into requests under the server's per-request limits (GET /model:
`limits`), sends at most `concurrency` at a time and joins the answers in order. Image i uses seed
`seed + i` whatever request carried it, and the server's sampler draws each image's noise (and, with
no labels, its class) from its own seed alone, so the images are those of one large request (up to
the float rounding that a different batch size can bring on some CPU kernels).

Both clients retry answers 503 (the server is overloaded or has no model replica ready) with
exponential backoff, waiting at least what the answer's `Retry-After` asks, within the total time
budget of `RetryPolicy`; other answers are never retried (a 504 may still be sampling). A server
that does not answer at all raises `EndpointUnreachableError`.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import math
import random
import secrets
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from email.utils import parsedate_to_datetime
from typing import Any

import httpx
import numpy as np

from diffusion_core.errors import ConfigError, DiffusionPipelineError
from diffusion_core.images import decode_png
from diffusion_core.redact import strip_credentials
from diffusion_core.sampling_defaults import DEFAULT_GUIDANCE_SCALE

logger = logging.getLogger(__name__)

RANDOM_SEED_BOUND = 2**31  # a base seed drawn for the caller, in the range the server draws from
Progress = Callable[[int, int], None]  # (images done, images in all)


class GenerationError(DiffusionPipelineError):
    """The server refused or failed a request; `status_code` is the HTTP status (None when the
    answers were fine one by one but cannot be joined)."""

    def __init__(self, message: str, status_code: int | None) -> None:
        hint = {401: "pass the API key (--api-key-file, or the env var named by serve.api_key_env)",
                503: "the server is overloaded or still loading its model; retry later or give the "
                     "client a larger retry budget"}.get(status_code)
        super().__init__(message, hint=hint)
        self.status_code = status_code


class EndpointUnreachableError(DiffusionPipelineError):
    """Nothing accepts connections at the URL (no server running there, or a wrong URL)."""

    def __init__(self, url: str) -> None:
        super().__init__(f"no endpoint answers at {url}",
                         hint="start one with `diffusion-pipeline serve` (it prints its URL), or give the "
                              "URL of a running one with --url")


@dataclass(frozen=True)
class RetryPolicy:
    """Retries of 503 answers: waits of `backoff_s * 2**(attempt - 1)` (at most `max_backoff_s`,
    with up to half of it taken off at random so that many clients spread out), never shorter than
    the answer's Retry-After; no retry whose wait would end later than `budget_s` after the call
    started. `budget_s=0` turns retries off."""

    budget_s: float = 60.0
    backoff_s: float = 0.5
    max_backoff_s: float = 8.0


def parse_retry_after(value: str | None, now: float | None = None) -> float | None:
    """Seconds to wait from a Retry-After header: delta-seconds or an HTTP date; None if absent or
    unreadable."""
    if value is None:
        return None
    value = value.strip()
    if value.isdigit():
        return float(value)
    try:
        when = parsedate_to_datetime(value).timestamp()
    except (TypeError, ValueError, IndexError):
        return None
    return max(0.0, when - (time.time() if now is None else now))


def retry_delay(retry_after: float | None, attempt: int, policy: RetryPolicy, jitter: float) -> float:
    """The wait before retry number `attempt` (1, 2, ...); `jitter` in [0, 1) takes off up to half
    of the backoff."""
    backoff = min(policy.max_backoff_s, policy.backoff_s * 2 ** (attempt - 1)) * (1.0 - jitter / 2)
    return max(backoff, retry_after or 0.0)


class _Retries:
    """One call's retry state: after each answer, how long to wait before trying again, or None."""

    def __init__(self, policy: RetryPolicy) -> None:
        self._policy = policy
        self._started = time.monotonic()
        self.attempts = 0

    def wait_after(self, response: httpx.Response) -> float | None:
        self.attempts += 1
        if response.status_code != 503:
            return None
        delay = retry_delay(parse_retry_after(response.headers.get("retry-after")), self.attempts,
                            self._policy, random.random())
        if time.monotonic() + delay > self._started + self._policy.budget_s:
            return None
        logger.info("%s %s: HTTP 503, retry %d in %.1fs", response.request.method, response.request.url.path,
                    self.attempts, delay)
        return delay

    def summary(self) -> str:
        return (f"gave up after {self.attempts} attempts in {time.monotonic() - self._started:.1f}s "
                f"(retry budget {self._policy.budget_s:g}s)")


def _checked(response: httpx.Response, retries: _Retries) -> Any:
    """The answer's JSON, or GenerationError with the server's message."""
    if response.status_code < 400:
        return response.json()
    try:
        detail = response.json().get("detail", response.text)
    except ValueError:
        detail = response.text
    message = f"HTTP {response.status_code}: {detail}"
    if response.status_code == 503:
        message += f"; {retries.summary()}"
    raise GenerationError(message, response.status_code)


@dataclass(frozen=True)
class GenerationResult:
    """images: uint8 (N, H, W, C) for format="png", float32 (N, C, H, W) in [0, 1] for "array".

    seeds[i] and labels[i] (None: the model's default) are image i's; `model` is the version that
    sampled them; `timings` is the server's account of its one request (schemas.Timings), or for
    `generate_many` {"total_s": the whole job as the client saw it}; `requests` is how many requests
    carried the job."""

    images: np.ndarray
    seeds: list[int]
    labels: list[int] | None
    model: dict[str, Any]
    timings: dict[str, float]
    requests: int = 1


def decode_images(body: dict[str, Any]) -> np.ndarray:
    if body["format"] == "array":
        return np.asarray(body["images"], dtype=np.float32)
    return np.stack([decode_png(base64.b64decode(png)) for png in body["images"]])


def _result(body: dict[str, Any]) -> GenerationResult:
    return GenerationResult(images=decode_images(body), seeds=body["seeds"], labels=body["labels"],
                            model=body["model"], timings=body["timings"])


def _payload(num_images: int, steps: int | None, sampler: str | None, guidance_scale: float, eta: float,
             labels: Sequence[int] | None, seed: int | None, format: str) -> dict[str, Any]:
    return {"num_images": num_images, "steps": steps, "sampler": sampler, "guidance_scale": guidance_scale,
            "eta": eta, "labels": None if labels is None else list(labels), "seed": seed, "format": format}


CONNECT_TIMEOUT_S = 10.0  # a server that is up accepts at once; sampling may take timeout_s
UNREACHABLE = (httpx.ConnectError, httpx.ConnectTimeout)


def _http_options(url: str, api_key: str | None, timeout_s: float) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    return {"base_url": url.rstrip("/"), "headers": headers,
            "timeout": httpx.Timeout(timeout_s, connect=min(timeout_s, CONNECT_TIMEOUT_S))}


class GenerationClient:
    """Synchronous client; one connection pool per instance (use as a context manager or close())."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0,
                 retry: RetryPolicy | None = None) -> None:
        self._url = strip_credentials(url)
        self._retry = retry or RetryPolicy()
        self._http = httpx.Client(**_http_options(url, api_key, timeout_s))

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        retries = _Retries(self._retry)
        while True:
            try:
                response = self._http.request(method, path, **kwargs)
            except UNREACHABLE:
                raise EndpointUnreachableError(self._url) from None
            delay = retries.wait_after(response)
            if delay is None:
                return _checked(response, retries)
            time.sleep(delay)

    def generate(
        self,
        num_images: int = 1,
        *,
        steps: int | None = None,
        sampler: str | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        eta: float = 0.0,
        labels: Sequence[int] | None = None,
        seed: int | None = None,
        format: str = "png",
    ) -> GenerationResult:
        """One POST /generate (within the server's per-request limits); GenerationError on a 4xx/5xx
        answer (with the server's message), after retrying 503s."""
        payload = _payload(num_images, steps, sampler, guidance_scale, eta, labels, seed, format)
        return _result(self._request("POST", "/generate", json=payload))

    def model_info(self) -> dict[str, Any]:
        """GET /model: the served version, its evaluation numbers and the endpoint's `limits`."""
        return self._request("GET", "/model")

    def healthy(self) -> bool:
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False


class AsyncGenerationClient:
    """asyncio client; `generate_many` for jobs larger than one request. One connection pool per
    instance (use as an async context manager or aclose())."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0,
                 retry: RetryPolicy | None = None) -> None:
        self._url = strip_credentials(url)
        self._retry = retry or RetryPolicy()
        self._http = httpx.AsyncClient(**_http_options(url, api_key, timeout_s))

    async def __aenter__(self) -> AsyncGenerationClient:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        await self._http.aclose()

    async def _request(self, method: str, path: str, **kwargs: Any) -> Any:
        retries = _Retries(self._retry)
        while True:
            try:
                response = await self._http.request(method, path, **kwargs)
            except UNREACHABLE:
                raise EndpointUnreachableError(self._url) from None
            delay = retries.wait_after(response)
            if delay is None:
                return _checked(response, retries)
            await asyncio.sleep(delay)

    async def model_info(self) -> dict[str, Any]:
        return await self._request("GET", "/model")

    async def generate(self, num_images: int = 1, *, steps: int | None = None, sampler: str | None = None,
                       guidance_scale: float = DEFAULT_GUIDANCE_SCALE, eta: float = 0.0,
                       labels: Sequence[int] | None = None,
                       seed: int | None = None, format: str = "png") -> GenerationResult:
        """One POST /generate, as `GenerationClient.generate`."""
        payload = _payload(num_images, steps, sampler, guidance_scale, eta, labels, seed, format)
        return _result(await self._request("POST", "/generate", json=payload))

    async def generate_many(
        self,
        num_images: int,
        *,
        steps: int | None = None,
        sampler: str | None = None,
        guidance_scale: float = DEFAULT_GUIDANCE_SCALE,
        eta: float = 0.0,
        labels: Sequence[int] | None = None,
        seed: int | None = None,
        format: str = "png",
        concurrency: int = 4,
        max_images_per_request: int | None = None,
        progress: Progress | None = None,
    ) -> GenerationResult:
        """`num_images` images as if from one request (image i: seed + i, labels[i]), sent as requests
        within the server's limits (and `max_images_per_request`, when smaller), at most
        `concurrency` at a time. `progress(done, total)` is called once the job is planned (done = 0)
        and as each request's images arrive.
        A random base seed is drawn here when `seed` is None (result.seeds says which). A failed
        request cancels the others and raises its GenerationError."""
        if num_images < 1 or concurrency < 1:
            raise ConfigError("num_images/concurrency: accepted: at least 1")
        if labels is not None and len(labels) != num_images:
            raise ConfigError("labels: one label per image; accepted: exactly num_images labels, or none")
        size = request_size((await self.model_info()).get("limits"), steps, max_images_per_request)
        base = secrets.randbelow(RANDOM_SEED_BOUND) if seed is None else seed
        started, done = time.monotonic(), 0
        if progress is not None:
            progress(0, num_images)  # planned: the requests start now
        semaphore = asyncio.Semaphore(concurrency)

        async def one(part: range) -> GenerationResult:
            nonlocal done
            async with semaphore:
                result = await self.generate(
                    len(part), steps=steps, sampler=sampler, guidance_scale=guidance_scale, eta=eta,
                    labels=None if labels is None else labels[part.start:part.stop], seed=base + part.start,
                    format=format)
            done += len(part)
            if progress is not None:
                progress(done, num_images)
            return result

        parts = await _all_or_none([one(part) for part in split(num_images, size)])
        return join_results(parts, time.monotonic() - started)


def request_size(limits: dict[str, Any] | None, steps: int | None, cap: int | None = None) -> int:
    """Images per request under the server's limits: at most `max_images_per_request`, and
    images * steps at most `max_work` (the server's default steps when `steps` is None)."""
    if not limits:
        raise GenerationError("GET /model: the answer has no request limits (a server older than this "
                              "client); accepted: a server that publishes `limits`", status_code=None)
    by_work = limits["max_work"] // (steps or limits["default_steps"])
    return int(max(1, min(limits["max_images_per_request"], by_work, cap or math.inf)))


def split(num_images: int, size: int) -> list[range]:
    """Consecutive index ranges of at most `size` images covering 0..num_images-1."""
    return [range(start, min(start + size, num_images)) for start in range(0, num_images, size)]


async def _all_or_none(calls: list[Any]) -> list[GenerationResult]:
    """Every call's result in order; on the first failure the others are cancelled and it is raised."""
    tasks = [asyncio.ensure_future(call) for call in calls]
    try:
        return await asyncio.gather(*tasks)
    except BaseException:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        raise


def join_results(parts: list[GenerationResult], total_s: float) -> GenerationResult:
    """The parts of one job, in order, as one result; all must come from one model version (a hot
    swap during the job would otherwise mix two models in one result)."""
    models = {(p.model.get("name"), p.model.get("version")) for p in parts}
    if len(models) > 1:
        raise GenerationError(f"the served model changed during the job ({sorted(models, key=str)}); its "
                              "images would mix versions: run it again", status_code=None)
    labels = None if parts[0].labels is None else [label for p in parts for label in p.labels]
    return GenerationResult(images=np.concatenate([p.images for p in parts]),
                            seeds=[s for p in parts for s in p.seeds], labels=labels, model=parts[0].model,
                            timings={"total_s": total_s}, requests=len(parts))
