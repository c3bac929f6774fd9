"""A real Serve app of a random-init digits checkpoint, for the tests of what talks to an endpoint
(the Python clients, the CLI, the page in a browser). Not a test module: imported by them."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx
import torch

from diffusion_core.checkpoint import DataSpec, ModelSpec, save_checkpoint
from diffusion_core.objective import ObjectiveConfig
from diffusion_core.schedule import ScheduleConfig
from diffusion_core.unet import UNet, UNetConfig

DIGIT_NAMES = [str(i) for i in range(10)]


def make_checkpoint(path: Path, label_names: list[str] = DIGIT_NAMES, seed: int = 1) -> Path:
    """A 10-class 8x8 grey digits UNet with a non-zero output layer (so images depend on the weights)."""
    torch.manual_seed(seed)
    config = UNetConfig.digits_default(num_classes=len(label_names))
    model = UNet(config)
    torch.nn.init.normal_(model.conv_out.weight, std=0.05)
    spec = ModelSpec(unet=config, schedule=ScheduleConfig(), objective=ObjectiveConfig(),
                     data=DataSpec(image_size=8, channels=1, label_names=label_names))
    return save_checkpoint(path, model, spec)


@contextmanager
def running_app(settings, env: dict[str, str] | None = None) -> Iterator[str]:
    """Start the app of `settings` (ServeSettings) declaratively on the session's Ray, with 0-CPU
    actors (one torch thread each) and `env` in the replicas' environment -> its URL. Serve is shut
    down afterwards; the session's Ray stays up."""
    from local_services import init_session_ray
    from ray import serve

    from serving import control

    base = control.load_serve_config()
    app = base["applications"][0]
    if env:
        app["runtime_env"] = {"env_vars": env}
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0}
    init_session_ray()  # with its dashboard: start_app goes through Serve's REST API
    try:
        control.start_app(settings, base, timeout_s=240)
        yield settings.url
    finally:
        serve.shutdown()


def one_image(k: int) -> dict:
    return {"num_images": 1, "seed": k}


class LoadClient:
    """Sends /generate (body `request(k)` for the k-th) from a thread until stopped, and records
    (HTTP status, model version) of each answer; status 0 is a request that got no answer at all."""

    def __init__(self, url: str, request: Callable[[int], dict] = one_image) -> None:
        self.url, self._request = url, request
        self.results: list[tuple[int, str | None]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        with httpx.Client(timeout=120) as client:
            k = 0
            while not self._stop.is_set():
                try:
                    response = client.post(f"{self.url}/generate", json=self._request(k))
                except httpx.HTTPError:
                    self.results.append((0, None))
                else:
                    version = response.json()["model"]["version"] if response.status_code == 200 else None
                    self.results.append((response.status_code, version))
                k += 1

    def __enter__(self) -> LoadClient:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=120)

    def failures(self) -> int:
        return sum(code != 200 for code, _ in self.results)

    def summary(self) -> str:
        codes = sorted({code for code, _ in self.results})
        return f"{self.failures()} of {len(self.results)} requests failed (statuses {codes}; 0: no answer)"

    def versions(self) -> list[str | None]:
        return [version for _, version in self.results]
