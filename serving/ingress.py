"""The HTTP ingress: validates and shapes requests; the model deployment batches and computes.

Routes (relative to the app's route prefix; OpenAPI docs at /docs):
  POST /generate   GenerateRequest -> GenerateResponse   (bearer token when an API key is configured)
  GET  /model      ModelInfo of the version being served  (bearer token when configured)
  GET  /healthz    200 once a model is loaded, 503 before (never needs a token: it is the probe)

Errors: 400 for a body that is not JSON, 422 naming the field and the accepted range for any other
bad input, 401 for a missing or wrong token, 503 (with Retry-After) when the model deployment's
bounded queue is full or its replica failed (Ray error), 504 when /generate got no answer within
`request_timeout_s` (and 503 for /model), so that nothing hangs while no model replica is healthy.
"""


import asyncio
import base64
import logging
import os
import secrets
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Header, HTTPException, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError
from ray.serve.handle import DeploymentHandle

from diffusion_core.errors import ConfigError
from diffusion_core.images import encode_png, to_uint8
from serving.batching import GenerationJob
from serving.config import INGRESS_DEPLOYMENT, ServeSettings
from serving.model_deployment import JobOutcome
from serving.schemas import GenerateRequest, GenerateResponse, ModelInfo, Timings
from serving.validation import effective_sampler, effective_steps, limit_errors

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0  # a probe answers fast or not at all; request_timeout_s is for real work
RETRY_LATER = {"Retry-After": "1"}

api = FastAPI(
    title="Diffusion generation",
    description="Batched reverse sampling of a registered diffusion model. Image i of a request uses "
    "seed + i (a random base seed when seed is null); the seeds used are returned.",
)


def _field_name(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


@api.exception_handler(RequestValidationError)
async def _invalid_request(request: Request, err: RequestValidationError) -> JSONResponse:
    """One readable line per problem: `field: message (got value)`; 400 when the body is not JSON."""
    problems = err.errors()
    if any(p["type"] == "json_invalid" for p in problems):
        return JSONResponse(status_code=400, content={"detail": "body: not valid JSON; accepted: a JSON "
                                                                "object with the GenerateRequest fields"})
    detail = "; ".join(f"{_field_name(p['loc'])}: {p['msg']} (got {p.get('input')!r})" for p in problems)
    return JSONResponse(status_code=422, content={"detail": detail})


def encode_images(images: np.ndarray, fmt: str) -> list[Any]:
    """(N, C, H, W) floats in [0, 1] -> base64 PNG strings, or nested float lists."""
    if fmt == "array":
        return images.tolist()
    return [base64.b64encode(encode_png(img)).decode("ascii") for img in to_uint8(images)]


def draw_seeds(seed: int | None, num_images: int) -> tuple[int, ...]:
    """Seeds seed, seed + 1, ...; a random base seed (reported back to the client) when seed is None."""
    base = secrets.randbelow(2**31) if seed is None else seed
    return tuple(range(base, base + num_images))


def read_api_key(env_name: str | None) -> str | None:
    if env_name is None:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise ConfigError(f"api_key_env: environment variable {env_name!r} is not set or empty",
                          hint="set it in the replica's environment (runtime_env env_vars or a k8s Secret)")
    return key


# Queue bounds are set by serving.app.build_app from ServeSettings.
@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress(api)
class GenerationIngress:
    def __init__(self, model: DeploymentHandle, settings: dict[str, Any]) -> None:
        self._model = model
        self._settings = ServeSettings.model_validate(settings)
        self._api_key = read_api_key(self._settings.api_key_env)

    def _authorize(self, authorization: str | None) -> None:
        if self._api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.encode(), self._api_key.encode()):
            raise HTTPException(401, "authorization: missing or wrong bearer token",
                                headers={"WWW-Authenticate": "Bearer"})

    async def _ask_model(self, call: Any, what: str, timeout_s: float, timeout_status: int) -> Any:
        """Await a model deployment call: a full queue or a failed replica (any Ray error, e.g.
        ActorDiedError) -> 503, no answer within `timeout_s` -> `timeout_status`."""
        try:
            return await asyncio.wait_for(call, timeout_s)
        except BackPressureError:
            raise HTTPException(503, "overloaded: the generation queue is full; retry later",
                                headers=RETRY_LATER) from None
        except RayError as err:
            logger.warning("%s: model deployment failed: %s", what, err)
            raise HTTPException(503, f"{what}: the model deployment failed ({type(err).__name__}); "
                                "retry later", headers=RETRY_LATER) from None
        except TimeoutError:
            raise HTTPException(timeout_status, f"{what}: no answer from the model deployment within "
                                f"{timeout_s:g}s; no healthy replica, or overloaded",
                                headers=RETRY_LATER) from None

    @api.get("/healthz")
    async def healthz(self) -> dict[str, Any]:
        try:
            info = await self._ask_model(self._model.describe.remote(), "healthz", HEALTH_TIMEOUT_S, 503)
        except HTTPException as err:
            raise HTTPException(503, f"not ready: {err.detail}") from None
        return {"status": "ready", "model": info.name, "version": info.version}

    @api.get("/model", response_model=ModelInfo)
    async def model(self, authorization: str | None = Header(None)) -> ModelInfo:
        self._authorize(authorization)
        return await self._ask_model(self._model.describe.remote(), "model",
                                     self._settings.request_timeout_s, 503)

    @api.post("/generate", response_model=GenerateResponse)
    async def generate(self, request: GenerateRequest,
                       authorization: str | None = Header(None)) -> GenerateResponse:
        started = time.perf_counter()
        self._authorize(authorization)
        job = self._job(request)
        outcome: JobOutcome = await self._ask_model(self._model.generate.remote(job), "generate",
                                                    self._settings.request_timeout_s, 504)
        if outcome.error:
            raise HTTPException(422, outcome.error)
        return self._response(request, job, outcome, time.perf_counter() - started)

    def _job(self, request: GenerateRequest) -> GenerationJob:
        errors = limit_errors(request, self._settings)
        if errors:
            raise HTTPException(422, "; ".join(errors))
        settings = self._settings
        return GenerationJob(
            steps=effective_steps(request, settings), sampler=effective_sampler(request, settings),
            guidance_scale=request.guidance_scale, eta=request.eta,
            seeds=draw_seeds(request.seed, request.num_images),
            labels=tuple(request.labels) if request.labels is not None else None,
        )

    @staticmethod
    def _response(request: GenerateRequest, job: GenerationJob, outcome: JobOutcome,
                  total_s: float) -> GenerateResponse:
        images = outcome.images
        return GenerateResponse(
            model=outcome.model, seeds=list(job.seeds),
            labels=list(job.labels) if job.labels is not None else None,
            shape=list(images.shape), format=request.format, images=encode_images(images, request.format),
            timings=Timings(queue_s=outcome.queue_s, sampling_s=outcome.sampling_s, total_s=total_s,
                            batch_images=outcome.batch_images,
                            batch_total_images=outcome.batch_total_images),
        )
