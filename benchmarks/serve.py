"""Throughput and latency of the Serve app for 1-image requests, batching on and off, against calling
the sampler directly on the same batch size.

    python -m benchmarks.serve [--steps 20] [--seconds 8] [--batch-wait S] [--device cpu]

For each mode (batching on: max_images_per_batch=32; off: 1) and concurrency (1, 8, 32 clients,
each sending its next request when the previous answer arrives), it measures images/s and p50/p95
latency over `--seconds`. "Direct" is `LoadedModel.generate` (diffusion_core.sample) in this process
with the replica's thread count (one), at batch 1, 8 and 32; the serving efficiency is served
images/s at concurrency c divided by direct images/s at batch c. The model is a random-init default
digits UNet served from a local checkpoint (no registry), so the numbers are the cost of sampling
plus serving.

The summary also gives the HTTP path at c=1 (mean served latency minus one direct batch-1 sampler
call, and minus the replica's own sampling time in the same run) and, from the timings the
server reports with each answer (schemas.Timings), where each request's time went: client + HTTP
proxy (latency - ingress total), the ingress itself (validation, PNG encoding: total - handle), the
handle call's transport and Serve's queue in front of the model replica (handle - model), the
replica's batcher queue (including the batch wait) and the sampling (model = queue + sampling).

"Platform floor" is the same closed loop against a no-op app of the same shape (Serve's HTTP proxy
-> a FastAPI ingress -> a handle call -> a deployment that returns an 8x8 array at once): what Ray
Serve itself costs per request on this machine, and how many requests per second it can pass at
all. In a closed loop of c clients and a batch of c images, the model idles while the c answers and
the c next requests pass the HTTP path, so served/direct at c is at most
t_batch / (t_batch + c / floor_rps); the summary reports that bound beside the measured ratio.
Writes benchmarks/results/serve.json with machine info and os.getloadavg() before and after.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import tempfile
import time
from pathlib import Path

import httpx
import numpy as np
import torch

from benchmarks.measure import untrained_digits_checkpoint
from diffusion_core.atomic_io import atomic_write_text
from diffusion_core.checkpoint import LoadedModel, load_checkpoint
from diffusion_core.sampling_defaults import DEFAULT_SAMPLER, DEFAULT_STEPS
from infra.local_cluster import free_port
from serving.config import ServeSettings
from serving.schemas import Timings

logger = logging.getLogger("benchmarks.serve")
RESULTS = Path(__file__).parent / "results" / "serve.json"
CONCURRENCY = (1, 8, 32)
MODES = {"batching_on": 32, "batching_off": 1}
REPLICA_CPUS = 1


def percentile_ms(latencies: list[float], q: float) -> float:
    return round(float(np.percentile(latencies, q)) * 1000, 2)


async def closed_loop(url: str, concurrency: int, steps: int, seconds: float) -> dict[str, float]:
    """`concurrency` clients, each sending 1-image requests back to back for `seconds`."""
    latencies: list[float] = []
    timings: list[dict[str, float]] = []  # the server's own account of each request (schemas.Timings)
    failures = 0
    payload = {"num_images": 1, "steps": steps}

    async def client_loop(client: httpx.AsyncClient, k: int, deadline: float) -> None:
        nonlocal failures
        i = 0
        while time.perf_counter() < deadline:
            start = time.perf_counter()
            response = await client.post(f"{url}/generate", json={**payload, "seed": k * 100_000 + i})
            i += 1
            if response.status_code == 200:
                latencies.append(time.perf_counter() - start)
                timings.append({**response.json()["timings"], "latency_s": latencies[-1]})
            else:
                failures += 1

    limits = httpx.Limits(max_connections=concurrency + 1)
    async with httpx.AsyncClient(timeout=120, limits=limits) as client:
        for _ in range(3):  # warm-up: connections, first batch
            (await client.post(f"{url}/generate", json=payload)).raise_for_status()
        started = time.perf_counter()
        await asyncio.gather(*(client_loop(client, k, started + seconds) for k in range(concurrency)))
        elapsed = time.perf_counter() - started
    return {"images_per_s": round(len(latencies) / elapsed, 2), "p50_ms": percentile_ms(latencies, 50),
            "p95_ms": percentile_ms(latencies, 95), "requests": len(latencies), "failures": failures,
            **server_side_means(timings)}


def server_side_means(timings: list[dict[str, float]]) -> dict[str, float]:
    """Where the time went (means, ms): each part is the difference of two nested timings."""
    def mean_ms(part) -> float:
        return round(float(np.mean([part(t) for t in timings])) * 1000, 2)

    return {
        "mean_batch_images": round(float(np.mean([t["batch_images"] for t in timings])), 2),
        "mean_batch_total_images": round(float(np.mean([t["batch_total_images"] for t in timings])), 2),
        "mean_client_and_proxy_ms": mean_ms(lambda t: t["latency_s"] - t["total_s"]),
        "mean_ingress_ms": mean_ms(lambda t: t["total_s"] - t["handle_s"]),
        "mean_handle_transport_ms": mean_ms(lambda t: t["handle_s"] - t["model_s"]),
        "mean_queue_ms": mean_ms(lambda t: t["queue_s"]),
        "mean_sampling_ms": mean_ms(lambda t: t["sampling_s"]),
        "mean_ingress_total_ms": mean_ms(lambda t: t["total_s"]),
        "mean_latency_ms": mean_ms(lambda t: t["latency_s"]),
    }


def direct_rate(loaded: LoadedModel, batch: int, steps: int, seconds: float) -> float:
    """Images/s of LoadedModel.generate at batch size `batch` (what one sampler run costs)."""
    loaded.generate(batch, steps=steps, seeds=list(range(batch)))  # warm-up
    images, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds or images == 0:
        loaded.generate(batch, steps=steps, seeds=list(range(images, images + batch)))
        images += batch
    return round(images / (time.perf_counter() - started), 2)


def serve_mode(checkpoint: Path, max_images_per_batch: int, args: argparse.Namespace) -> dict[str, dict]:
    from ray import serve

    from serving import control

    settings = ServeSettings(checkpoint_dir=str(checkpoint), port=args.port, device=args.device,
                             max_images_per_batch=max_images_per_batch, max_ongoing_requests=64,
                             batch_wait_timeout_s=args.batch_wait,
                             max_queued_requests=128, default_steps=args.steps)
    base = control.load_serve_config()
    for deployment in base["applications"][0]["deployments"]:
        model = deployment["name"] == "DiffusionModel"
        deployment["ray_actor_options"] = {"num_cpus": REPLICA_CPUS if model else 0,
                                           "num_gpus": 1 if model and args.device.startswith("cuda") else 0}
    control.start_app(settings, base)
    try:
        results = {}
        for concurrency in args.concurrency:
            results[str(concurrency)] = asyncio.run(closed_loop(settings.url, concurrency, args.steps,
                                                                args.seconds))
            logger.info("batch<=%d concurrency %d: %s", max_images_per_batch, concurrency,
                        results[str(concurrency)])
        return results
    finally:
        serve.shutdown()


def platform_floor(args: argparse.Namespace) -> dict[str, dict]:
    """The closed loop against a no-op app of the served app's shape (see the module docstring)."""
    from fastapi import FastAPI
    from ray import serve

    api = FastAPI()

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=64)
    class NoOpModel:
        async def generate(self, body: dict) -> np.ndarray:
            return np.zeros((1, 1, 8, 8), np.float32)

    @serve.deployment(ray_actor_options={"num_cpus": 0}, max_ongoing_requests=256)
    @serve.ingress(api)
    class NoOpIngress:
        def __init__(self, model) -> None:
            self._model = model

        @api.post("/generate")
        async def generate(self, body: dict) -> dict:
            image = await self._model.generate.remote(body)
            return {"shape": list(image.shape), "timings": dict.fromkeys(Timings.model_fields, 0.0)}

    serve.start(http_options={"host": "127.0.0.1", "port": args.port})
    serve.run(NoOpIngress.bind(NoOpModel.bind()), name="floor", route_prefix="/")
    url = f"http://127.0.0.1:{args.port}"
    try:
        results = {}
        for concurrency in args.concurrency:
            loop = asyncio.run(closed_loop(url, concurrency, args.steps, args.seconds))
            results[str(concurrency)] = {"requests_per_s": loop["images_per_s"], "p50_ms": loop["p50_ms"],
                                         "mean_latency_ms": loop["mean_latency_ms"]}
            logger.info("platform floor, concurrency %d: %s", concurrency, results[str(concurrency)])
        return results
    finally:
        serve.shutdown()


def closed_loop_bound(concurrency: int, direct_images_per_s: float, floor_requests_per_s: float) -> float:
    """Served/direct at most: one batch's sampling time over it plus the HTTP path of its requests."""
    sampling_s = concurrency / direct_images_per_s
    return round(sampling_s / (sampling_s + concurrency / floor_requests_per_s), 3)


def summarize(served: dict[str, dict], direct: dict[str, float], floor: dict[str, dict]) -> dict[str, object]:
    """Batching speedup at the highest concurrency, served / direct images/s at each level (with the
    closed-loop bound the platform floor sets), and the HTTP path of one request at the lowest."""
    on, off = served["batching_on"], served["batching_off"]
    top, low = max(on, key=int), min(on, key=int)
    summary: dict[str, object] = {
        f"batching_speedup_at_{top}": round(on[top]["images_per_s"] / off[top]["images_per_s"], 2),
        "served_over_direct": {c: round(on[c]["images_per_s"] / direct[c], 3) for c in on},
        "closed_loop_bound": {c: closed_loop_bound(int(c), direct[c], floor[c]["requests_per_s"])
                              for c in on if c in floor},
    }
    if low == "1":
        summary["http_path_ms_at_1"] = round(on["1"]["mean_latency_ms"] - 1000 / direct["1"], 2)
        same_run = on["1"]["mean_latency_ms"] - on["1"]["mean_sampling_ms"]
        summary["http_path_ms_at_1_same_run"] = round(same_run, 2)
        summary["platform_floor_ms_at_1"] = floor["1"]["mean_latency_ms"] if "1" in floor else None
    return summary


def machine_info() -> dict[str, object]:
    return {"platform": platform.platform(), "cpu_count": os.cpu_count(), "torch": torch.__version__,
            "replica_cpus": REPLICA_CPUS, "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available()
            else None}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--seconds", type=float, default=8.0)
    parser.add_argument("--port", type=int, default=0, help="HTTP port (0: a free one)")
    parser.add_argument("--device", default="cpu")
    default_wait = ServeSettings.model_fields["batch_wait_timeout_s"].default
    parser.add_argument("--batch-wait", type=float, default=default_wait)
    parser.add_argument("--concurrency", type=int, nargs="+", default=list(CONCURRENCY))
    parser.add_argument("--modes", nargs="+", choices=list(MODES), default=list(MODES))
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args()
    args.port = args.port or free_port()
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    import ray

    loadavg_before = os.getloadavg()
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = untrained_digits_checkpoint(Path(tmp))
        torch.set_num_threads(REPLICA_CPUS)
        loaded = load_checkpoint(checkpoint, device=args.device)
        direct = {str(b): direct_rate(loaded, b, args.steps, args.seconds / 2) for b in args.concurrency}
        logger.info("direct images/s by batch size: %s", direct)
        # the dashboard carries Serve's REST API, through which the app is deployed
        ray.init(num_cpus=max(2, REPLICA_CPUS + 1), include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=free_port(), configure_logging=False, log_to_driver=False)
        try:
            served = {mode: serve_mode(checkpoint, MODES[mode], args) for mode in args.modes}
            floor = platform_floor(args)
        finally:
            ray.shutdown()
    result = {
        "benchmark": "serve", "steps": args.steps, "sampler": DEFAULT_SAMPLER,
        "batch_wait_timeout_s": args.batch_wait, "seconds_per_level": args.seconds,
        "request": "1 image, PNG response", "model": "random-init digits_default UNet",
        "direct_images_per_s": direct, "served": served, "platform_floor": floor,
        "summary": summarize(served, direct, floor) if len(served) == len(MODES) else None,
        "machine": machine_info(), "loadavg_before": loadavg_before, "loadavg_after": os.getloadavg(),
    }
    atomic_write_text(args.out, json.dumps(result, indent=2) + "\n")
    logger.info("summary: %s -> %s", result["summary"], args.out)


if __name__ == "__main__":
    main()
