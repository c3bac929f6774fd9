"""Soak test of the Serve app under a mix of valid and hostile requests.

    python -m benchmarks.abuse [--seconds 120] [--clients 8] [--out benchmarks/results/abuse.json]

Starts the app on a local Ray (random-init default digits UNet from a local checkpoint, an API key,
the packaged limits), then `--clients` clients each send requests back to back for `--seconds`,
drawing the kind of each from a fixed mix (seeded): valid requests (1-4 images, default steps) and
the bad inputs of the service review: a 5 MB body without a token, an oversized body with one, wrong
JSON types, unknown fields, a labels list far longer than any request, a body without content type,
invalid JSON, deep nesting, a 5000-digit number, labels the model does not have, the docs without
the key, requests at the per-request work cap, and requests whose client gives up after 0.2 s.

Reports, per kind, the answers' status codes, p50/p95 latency and largest answer; the valid
requests' success rate and p95 latency; the peak memory (PSS, else RSS) of the server's processes
(every process Ray started: GCS, raylet, Serve controller, proxy, replicas), sampled every second;
and whether the app is healthy at the end (GET /healthz and one valid request). Writes JSON.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import random
import tempfile
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx
import numpy as np

from benchmarks.measure import TreeMemory, untrained_digits_checkpoint
from diffusion_core.atomic_io import atomic_write_text
from infra.local_cluster import free_port
from serving.config import ServeSettings

logger = logging.getLogger("benchmarks.abuse")
RESULTS = Path(__file__).parent / "results" / "abuse.json"
API_KEY_ENV = "DIFFUSION_ABUSE_BENCH_KEY"
API_KEY = "abuse-bench-key"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
JSON = {"Content-Type": "application/json"}
FIVE_MB = b'{"labels": [' + b",".join([b'"xxxxxxxxxx"'] * 400_000) + b"]}"
ONE_MB = FIVE_MB[: 1 << 20]

# kind -> (weight, method, path, headers, body, client timeout). Bodies: dict -> JSON, bytes -> raw.
MIX: dict[str, tuple[float, str, str, dict, Any, float]] = {
    "valid": (0.50, "POST", "/generate", {**AUTH}, None, 120.0),  # body drawn per request
    "no_token_5mb": (0.04, "POST", "/generate", {**JSON}, FIVE_MB, 120.0),
    "oversize_1mb": (0.04, "POST", "/generate", {**AUTH, **JSON}, ONE_MB, 120.0),
    "wrong_types": (0.05, "POST", "/generate", {**AUTH}, {"num_images": "2", "steps": True}, 120.0),
    "unknown_fields": (0.04, "POST", "/generate", {**AUTH}, {"<script>x</script>": 1, "num_image": 2}, 120.0),
    "long_labels": (0.04, "POST", "/generate", {**AUTH}, {"num_images": 1, "labels": [0] * 4000}, 120.0),
    "no_content_type": (0.04, "POST", "/generate", {**AUTH}, b'{"num_images": 1}', 120.0),
    "invalid_json": (0.04, "POST", "/generate", {**AUTH, **JSON}, b'{"num_images": 1', 120.0),
    "deep_nesting": (0.03, "POST", "/generate", {**AUTH, **JSON}, b"[" * 6000 + b"]" * 6000, 120.0),
    "huge_number": (0.03, "POST", "/generate", {**AUTH, **JSON}, b'{"seed": 1' + b"9" * 5000 + b"}", 120.0),
    "unknown_labels": (0.04, "POST", "/generate", {**AUTH}, {"num_images": 2, "labels": [3, 99]}, 120.0),
    "docs_without_key": (0.03, "GET", "/openapi.json", {}, None, 120.0),
    "max_work": (0.04, "POST", "/generate", {**AUTH}, {"num_images": 64, "steps": 50}, 300.0),
    "abandoned": (0.04, "POST", "/generate", {**AUTH}, {"num_images": 32, "steps": 50}, 0.2),
}


def valid_body(rng: random.Random) -> dict:
    n = rng.randint(1, 4)
    body: dict[str, Any] = {"num_images": n, "seed": rng.randrange(1 << 30)}
    if rng.random() < 0.5:
        body["labels"] = [rng.randrange(10) for _ in range(n)]
    return body


async def one_request(client: httpx.AsyncClient, url: str, kind: str, rng: random.Random) -> dict:
    _, method, path, headers, body, timeout = MIX[kind]
    if kind == "valid":
        body = valid_body(rng)
    kwargs: dict[str, Any] = {"headers": headers, "timeout": timeout}
    if isinstance(body, dict):
        kwargs["json"] = body
    elif body is not None:
        kwargs["content"] = body
    started = time.perf_counter()
    try:
        response = await client.request(method, f"{url}{path}", **kwargs)
        status, size = response.status_code, len(response.content)
    except httpx.TimeoutException:
        status, size = "client_timeout", 0
    except httpx.TransportError as err:  # e.g. the server closed while a large body was being sent
        status, size = f"transport:{type(err).__name__}", 0
    return {"kind": kind, "status": status, "latency_s": time.perf_counter() - started, "bytes": size}


async def soak(url: str, clients: int, seconds: float, seed: int) -> list[dict]:
    kinds, weights = list(MIX), [MIX[k][0] for k in MIX]
    records: list[dict] = []
    deadline = time.perf_counter() + seconds

    async def client_loop(client: httpx.AsyncClient, k: int) -> None:
        rng = random.Random(seed * 1000 + k)
        while time.perf_counter() < deadline:
            records.append(await one_request(client, url, rng.choices(kinds, weights)[0], rng))

    async with httpx.AsyncClient(limits=httpx.Limits(max_connections=clients * 2)) as client:
        await asyncio.gather(*(client_loop(client, k) for k in range(clients)))
    return records


def summarize(records: list[dict]) -> dict[str, Any]:
    by_kind: dict[str, list[dict]] = defaultdict(list)
    for record in records:
        by_kind[record["kind"]].append(record)
    kinds = {}
    for kind, rows in sorted(by_kind.items()):
        latencies = [r["latency_s"] for r in rows]
        kinds[kind] = {"requests": len(rows), "status": dict(Counter(str(r["status"]) for r in rows)),
                       "p50_ms": round(float(np.percentile(latencies, 50)) * 1000, 1),
                       "p95_ms": round(float(np.percentile(latencies, 95)) * 1000, 1),
                       "max_answer_bytes": max(r["bytes"] for r in rows)}
    valid = by_kind.get("valid", [])
    ok_latencies = [r["latency_s"] for r in valid if r["status"] == 200]
    return {
        "valid_success_rate": round(len(ok_latencies) / len(valid), 4) if valid else None,
        "valid_p95_ms": round(float(np.percentile(ok_latencies, 95)) * 1000, 1) if ok_latencies else None,
        "answers_500": sum(1 for r in records if r["status"] == 500),
        "by_kind": kinds,
    }


def healthy(url: str) -> dict[str, Any]:
    health = httpx.get(f"{url}/healthz", timeout=30)
    check = httpx.post(f"{url}/generate", json={"num_images": 1, "seed": 0}, headers=AUTH, timeout=120)
    return {"healthz": health.status_code, "valid_request": check.status_code,
            "healthy": health.status_code == 200 and check.status_code == 200}


def start_app(checkpoint: Path, port: int) -> ServeSettings:
    from serving import control

    settings = ServeSettings(checkpoint_dir=str(checkpoint), alias=None, port=port, api_key_env=API_KEY_ENV)
    base = control.load_serve_config()
    app = base["applications"][0]
    app["runtime_env"] = {"env_vars": {API_KEY_ENV: API_KEY}}
    control.start_app(settings, base)
    return settings


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=120.0)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import ray
    from ray import serve

    loadavg_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = untrained_digits_checkpoint(Path(tmp))
        # the dashboard carries Serve's REST API, through which the app is deployed
        ray.init(num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=free_port(),
                 configure_logging=False, log_to_driver=False)
        try:
            with TreeMemory() as memory:
                settings = start_app(checkpoint, free_port())
                logger.info("app up at %s; %d clients for %.0f s", settings.url, args.clients, args.seconds)
                records = asyncio.run(soak(settings.url, args.clients, args.seconds, args.seed))
                end = healthy(settings.url)
        finally:
            serve.shutdown()
            ray.shutdown()
    result = {
        "benchmark": "abuse", "seconds": args.seconds, "clients": args.clients, "seed": args.seed,
        "mix": {kind: spec[0] for kind, spec in MIX.items()}, **summarize(records),
        f"peak_server_memory_mb_{memory.metric}": round(memory.peak_bytes / 2**20, 1),
        "peak_memory_by_process_mb": dict(memory.peak_top),
        "end": end, "machine": {"platform": platform.platform(), "cpu_count": os.cpu_count()},
        "loadavg_before": loadavg_before, "loadavg_after": os.getloadavg(),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    logger.info("valid success %.3f, p95 %s ms, peak server memory %.0f MB, healthy at end: %s -> %s",
                result["valid_success_rate"] or 0, result["valid_p95_ms"], memory.peak_bytes / 2**20,
                end["healthy"], args.out)


if __name__ == "__main__":
    main()
