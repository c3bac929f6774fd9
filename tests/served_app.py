"""A real Serve app of a random-init digits checkpoint, for the tests of what talks to an endpoint
(the Python clients, the CLI, the page in a browser). Not a test module: imported by them."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

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
    import ray
    from local_services import RAY_TEST_CPUS
    from ray import serve

    from serving import control

    base = control.load_serve_config()
    app = base["applications"][0]
    if env:
        app["runtime_env"] = {"env_vars": env}
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0}
    if not ray.is_initialized():
        ray.init(num_cpus=RAY_TEST_CPUS, include_dashboard=False, configure_logging=False)
    try:
        control.start_app(settings, base, timeout_s=240)
        yield settings.url
    finally:
        serve.shutdown()
