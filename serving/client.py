"""Python client of the generation API.

    client = GenerationClient("http://127.0.0.1:8000", api_key=None)
    result = client.generate(num_images=16, steps=20, seed=0)
    result.images        # uint8 (N, H, W, C) decoded from the PNGs
    result.seeds         # seed i = seed + i (or the random base the server drew)
"""

from __future__ import annotations

import base64
import logging
from dataclasses import dataclass
from typing import Any

import httpx
import numpy as np

from diffusion_core.errors import DiffusionPipelineError
from diffusion_core.images import decode_png

logger = logging.getLogger(__name__)


class GenerationError(DiffusionPipelineError):
    """The server refused or failed a request; `status_code` is the HTTP status."""

    def __init__(self, message: str, status_code: int) -> None:
        hint = {401: "pass the API key (--api-key-file, or the env var named by serve.api_key_env)",
                503: "the server is overloaded or still loading its model; retry later"}.get(status_code)
        super().__init__(message, hint=hint)
        self.status_code = status_code


@dataclass(frozen=True)
class GenerationResult:
    """images: uint8 (N, H, W, C) for format="png", float32 (N, C, H, W) in [0, 1] for "array"."""

    images: np.ndarray
    seeds: list[int]
    labels: list[int] | None
    model: dict[str, Any]
    timings: dict[str, float]


def decode_images(body: dict[str, Any]) -> np.ndarray:
    if body["format"] == "array":
        return np.asarray(body["images"], dtype=np.float32)
    return np.stack([decode_png(base64.b64decode(png)) for png in body["images"]])


class GenerationClient:
    """Synchronous client; one connection pool per instance (use as a context manager or close())."""

    def __init__(self, url: str, api_key: str | None = None, timeout_s: float = 300.0) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=url.rstrip("/"), headers=headers, timeout=timeout_s)

    def __enter__(self) -> GenerationClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def close(self) -> None:
        self._http.close()

    def _checked(self, response: httpx.Response) -> dict[str, Any]:
        if response.status_code >= 400:
            try:
                detail = response.json().get("detail", response.text)
            except ValueError:
                detail = response.text
            raise GenerationError(f"HTTP {response.status_code}: {detail}", response.status_code)
        return response.json()

    def generate(
        self,
        num_images: int = 1,
        *,
        steps: int | None = None,
        sampler: str | None = None,
        guidance_scale: float = 1.0,
        eta: float = 0.0,
        labels: list[int] | None = None,
        seed: int | None = None,
        format: str = "png",
    ) -> GenerationResult:
        """POST /generate; GenerationError on a 4xx/5xx answer (with the server's message)."""
        payload = {"num_images": num_images, "steps": steps, "sampler": sampler,
                   "guidance_scale": guidance_scale, "eta": eta, "labels": labels, "seed": seed,
                   "format": format}
        body = self._checked(self._http.post("/generate", json=payload))
        return GenerationResult(images=decode_images(body), seeds=body["seeds"], labels=body["labels"],
                                model=body["model"], timings=body["timings"])

    def model_info(self) -> dict[str, Any]:
        return self._checked(self._http.get("/model"))

    def healthy(self) -> bool:
        try:
            return self._http.get("/healthz").status_code == 200
        except httpx.HTTPError:
            return False
