"""The HTTP ingress: validates and shapes requests; the model deployment batches and computes.

It imports neither torch nor the model (tools/import_graph.py checks), so it stays a light process.

Routes (relative to the app's route prefix):
  GET  /               a page to try the model from a browser (serving/page.py); public: it holds
                       no secret and no model detail, and calls the two routes below
  POST /generate       GenerateRequest -> GenerateResponse
  GET  /model          ModelInfo of the version being served, with this endpoint's RequestLimits
  GET  /healthz        {"status": "ready"} once a healthy model replica answers, 503 before (the probe)
  GET  /docs, /openapi.json
When an API key is configured every route but /healthz and / needs `Authorization: Bearer <key>`.

Before a body is read, `http_guard.RequestGuard` answers 401 (token), 415 (not JSON) and 413 (too
large). The body is then validated against `schemas.request_model(settings)`: strict JSON types,
ranges from the settings (the same ones the OpenAPI schema shows), and the rules that combine
fields. A bad request gets 400 (not JSON) or 422 with one line per problem naming the field and the
rule. What the model deployment answers is a typed `jobs.JobResult`; `HTTP_STATUS` maps each failure
kind to its status, in one place.
"""

import asyncio
import base64
import logging
import math
import os
import secrets
import time
from typing import Any

import numpy as np
from fastapi import FastAPI, Security
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response
from fastapi.security import HTTPBearer
from pydantic import BaseModel
from ray import serve
from ray.exceptions import RayError
from ray.serve.exceptions import BackPressureError, RayServeException
from ray.serve.handle import DeploymentHandle, DeploymentResponse

from diffusion_core.errors import ConfigError
from diffusion_core.images import encode_png, to_uint8
from serving.config import INGRESS_DEPLOYMENT, ServeSettings
from serving.http_guard import RequestGuard
from serving.jobs import Failure, FailureKind, Generated, GenerationJob
from serving.page import load_page
from serving.schemas import (
    GenerateRequest,
    GenerateResponse,
    Health,
    ModelInfo,
    RequestLimits,
    Timings,
    request_model,
)

logger = logging.getLogger(__name__)

HEALTH_TIMEOUT_S = 5.0  # a probe answers fast or not at all; request_timeout_s is for real work
MAX_PROBLEMS = 5  # lines in one 422 answer: enough to fix a request, bounded whatever was sent
PUBLIC_PATHS = frozenset({"/healthz", "/"})

HTTP_STATUS: dict[FailureKind, int] = {
    "invalid": 422, "overloaded": 503, "unavailable": 503, "timeout": 504,
    "model_output": 500, "model_error": 500,
}


class ErrorBody(BaseModel):
    detail: str


def error_response(failure: Failure) -> JSONResponse:
    headers = {} if failure.retry_after_s is None else {"Retry-After": str(math.ceil(failure.retry_after_s))}
    return JSONResponse({"detail": failure.message}, status_code=HTTP_STATUS[failure.kind], headers=headers)


def describe_problem(problem: dict[str, Any], fields: list[str]) -> str:
    """One 422 line: `field: rule`. Built from the field's name and the rule only, never from the
    input (pydantic's messages for the types used here quote none)."""
    cause = (problem.get("ctx") or {}).get("error")
    if isinstance(cause, ConfigError):  # a cross-field rule that already names its field
        return str(cause)
    loc = [str(part) for part in problem["loc"] if part != "body"]
    if not loc:
        return f"body: {problem['msg']}; accepted: a JSON object with the GenerateRequest fields"
    if loc[0] not in fields:
        return f"body: unknown field; accepted fields: {', '.join(fields)}"
    if problem["type"] == "too_long":
        return f"{loc[0]}: too many items; accepted: at most {problem['ctx']['max_length']}"
    return f"{'.'.join(loc)}: {problem['msg']}"


def encode_images(images: np.ndarray, fmt: str) -> list[Any]:
    """(N, C, H, W) floats in [0, 1] -> base64 PNG strings, or nested float lists."""
    if fmt == "array":
        return images.tolist()
    return [base64.b64encode(encode_png(img)).decode("ascii") for img in to_uint8(images)]


def draw_seeds(seed: int | None, num_images: int) -> tuple[int, ...]:
    """Seeds seed, seed + 1, ...; a random base seed (reported back to the client) when seed is None."""
    base = secrets.randbelow(2**31) if seed is None else seed
    return tuple(range(base, base + num_images))


def to_job(request: GenerateRequest) -> GenerationJob:
    """A request validated by `request_model` (server defaults filled in) -> the job to sample."""
    return GenerationJob(steps=request.steps, sampler=request.sampler, guidance_scale=request.guidance_scale,
                         eta=request.eta, seeds=draw_seeds(request.seed, request.num_images),
                         labels=None if request.labels is None else tuple(request.labels),
                         unconditional=request.unconditional)


def read_api_key(env_name: str | None) -> str | None:
    if env_name is None:
        return None
    key = os.environ.get(env_name)
    if not key:
        raise ConfigError(f"api_key_env: environment variable {env_name!r} is not set or empty",
                          hint="set it in the replica's environment (runtime_env env_vars or a k8s Secret)")
    return key


async def ask_model(call: DeploymentResponse, what: str, timeout_s: float) -> Any:
    """The model deployment's answer, or a Failure: a full queue or a failed replica (any Ray or
    Serve error, e.g. ActorDiedError) is "unavailable", no answer within `timeout_s` a "timeout". A call that
    times out or whose caller goes away is cancelled, which drops its job from the replica's queue."""
    try:
        return await asyncio.wait_for(call, timeout_s)
    except BackPressureError:
        return Failure("unavailable", "overloaded: the generation queue is full; retry later",
                       retry_after_s=1)
    except (RayError, RayServeException) as err:
        logger.warning("%s: model deployment failed: %s", what, err)
        return Failure("unavailable", f"{what}: the model deployment failed ({type(err).__name__}); "
                       "retry later", retry_after_s=1)
    except TimeoutError:
        call.cancel()
        return Failure("timeout", f"{what}: no answer from the model deployment within {timeout_s:g}s; "
                       "no healthy replica, or overloaded", retry_after_s=1)
    except asyncio.CancelledError:
        call.cancel()
        raise


def build_api(model: DeploymentHandle, settings: ServeSettings, api_key: str | None) -> FastAPI:
    """The FastAPI app of one ingress replica: routes, validation and the request guard."""
    Request = request_model(settings)  # noqa: N806 - a class, used as the body's annotation
    limits, page = RequestLimits.of(settings), load_page()
    fields = list(GenerateRequest.model_fields)
    guarded = [Security(HTTPBearer(auto_error=False))] if api_key else []  # documents the scheme;
    # RequestGuard has checked the token before the body was read
    errors = {status: {"model": ErrorBody} for status in (400, 401, 413, 415, 422, 500, 503, 504)}
    api = FastAPI(title="Diffusion generation", description=(
        "Batched reverse sampling of a registered diffusion model. Image i of a request uses seed + i "
        "(a random base seed when seed is null); the seeds used are returned."))
    api.add_middleware(RequestGuard, api_key=api_key, max_body_bytes=settings.max_body_bytes,
                       public_paths=PUBLIC_PATHS)
    _publish_exact_request_schema(api, Request)

    @api.exception_handler(RequestValidationError)
    async def invalid_request(_: Any, err: RequestValidationError) -> JSONResponse:
        problems = err.errors()
        if any(p["type"] == "json_invalid" for p in problems):
            return JSONResponse({"detail": "body: not valid JSON; accepted: a JSON object with the "
                                 "GenerateRequest fields"}, status_code=400)
        lines = [describe_problem(p, fields) for p in problems[:MAX_PROBLEMS]]
        if len(problems) > MAX_PROBLEMS:
            lines.append(f"and {len(problems) - MAX_PROBLEMS} more problems")
        return JSONResponse({"detail": "; ".join(lines)}, status_code=422)

    @api.get("/healthz", response_model=Health, responses={503: {"model": ErrorBody}})
    async def healthz() -> Any:
        answer = await ask_model(model.check_health.remote(), "healthz", HEALTH_TIMEOUT_S)
        if isinstance(answer, Failure):
            return JSONResponse({"detail": "not ready"}, status_code=503, headers={"Retry-After": "1"})
        return Health(status="ready")

    @api.get("/", response_class=HTMLResponse, include_in_schema=False)
    async def try_page() -> HTMLResponse:
        return HTMLResponse(page.html, headers=page.headers)

    @api.get("/model", response_model=ModelInfo, dependencies=guarded, responses=errors)
    async def model_info() -> Any:
        answer = await ask_model(model.describe.remote(), "model", settings.request_timeout_s)
        if isinstance(answer, Failure):
            return error_response(answer)
        return answer.model_copy(update={"limits": limits})

    @api.post("/generate", response_model=GenerateResponse, dependencies=guarded, responses=errors)
    async def generate(request: Request) -> Any:
        started = time.perf_counter()
        job = to_job(request)
        result = await ask_model(model.generate.remote(job), "generate", settings.request_timeout_s)
        if isinstance(result, Failure):
            return error_response(result)
        handle_s = time.perf_counter() - started
        return _response(request, job, result, handle_s, started)

    return api


def _publish_exact_request_schema(api: FastAPI, request: type[GenerateRequest]) -> None:
    """/openapi.json with pydantic's own schema of the request body: FastAPI's OpenAPI models store
    numeric bounds as floats, which would round the seed's maximum (2**63 - 1) up to 2**63."""
    generate_openapi = api.openapi

    def openapi() -> dict[str, Any]:
        if api.openapi_schema is None:
            document = generate_openapi()
            document["components"]["schemas"]["GenerateRequest"] = request.model_json_schema(
                ref_template="#/components/schemas/{model}")
        return api.openapi_schema

    api.openapi = openapi


def _response(request: GenerateRequest, job: GenerationJob, result: Generated, handle_s: float,
              started: float) -> Response:
    images, sampled = encode_images(result.images, request.format), result.timings
    body = GenerateResponse(
        model=result.model, seeds=list(job.seeds),
        labels=None if result.labels is None else list(result.labels),
        shape=list(result.images.shape), format=request.format, images=images,
        timings=Timings(queue_s=sampled.queue_s, sampling_s=sampled.sampling_s, model_s=sampled.model_s,
                        handle_s=handle_s, total_s=time.perf_counter() - started,
                        batch_images=sampled.batch_images, batch_total_images=sampled.batch_total_images),
    )
    return Response(body.model_dump_json(), media_type="application/json")


# Queue bounds are set by serving.app.build_app from ServeSettings.
@serve.deployment(name=INGRESS_DEPLOYMENT)
@serve.ingress()
class GenerationIngress:
    """The app is built per replica (`__serve_build_asgi_app__`, called by Serve after __init__),
    because its request schema and guard follow the settings."""

    def __init__(self, model: DeploymentHandle, settings: dict[str, Any]) -> None:
        settings = ServeSettings.model_validate(settings)
        self._api = build_api(model, settings, read_api_key(settings.api_key_env))

    def __serve_build_asgi_app__(self) -> FastAPI:
        return self._api
