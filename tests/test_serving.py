"""The Serve app over real HTTP: one app on a local Ray (free port), shared by the module's tests.

The model comes from a real MLflow registry (SQLite store in a temp dir): version 1 is a conditional
10-class digits UNet (alias champion), version 2 an unconditional one that the hot-swap tests switch
the `swap` app to (their switches name that app only: every app serving a model follows a switch
that names none). Both are random-init with a non-zero output layer, so that images depend on the
weights. Served images are compared with `LoadedModel.generate` called directly with the same seeds.
A third app serves a local checkpoint whose class prior is one-hot.
"""

from __future__ import annotations

import asyncio
import base64
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch

from diffusion_core.checkpoint import DataSpec, ModelSpec, load_checkpoint, save_checkpoint
from diffusion_core.images import decode_png
from diffusion_core.objective import ObjectiveConfig
from diffusion_core.schedule import ScheduleConfig
from diffusion_core.unet import UNet, UNetConfig

pytestmark = pytest.mark.slow

MODEL = "serve-test-digits"
API_KEY_ENV = "DIFFUSION_SERVE_TEST_KEY"
API_KEY = "test-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
STEPS = 4


def free_port() -> int:
    from local_services import free_port as conftest_free_port

    return conftest_free_port()


def make_checkpoint(path: Path, num_classes: int | None, seed: int,
                    class_prior: list[float] | None = None) -> Path:
    torch.manual_seed(seed)
    config = UNetConfig.digits_default(num_classes=num_classes)
    model = UNet(config)
    torch.nn.init.normal_(model.conv_out.weight, std=0.05)  # zero-init would ignore the weights
    names = [str(i) for i in range(num_classes)] if num_classes else None
    spec = ModelSpec(unet=config, schedule=ScheduleConfig(), objective=ObjectiveConfig(),
                     data=DataSpec(image_size=8, channels=1, label_names=names, class_prior=class_prior))
    return save_checkpoint(path, model, spec)


@pytest.fixture(scope="module")
def registry(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Versions 1 (conditional, champion, fd tag 1.5) and 2 (unconditional) of MODEL."""

    from diffusion_core.adapters.mlflow_registry import log_and_register

    root = tmp_path_factory.mktemp("serve_registry")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    # log_and_register points MLflow's process-wide URIs at `uri` only while it registers (it must:
    # a `models:/m-...` source resolves through them) and the app is given `uri` explicitly, so
    # nothing here touches the process-wide URIs.
    return _register_versions(root, uri, log_and_register)


def _register_versions(root: Path, uri: str, log_and_register) -> dict:
    from mlflow import MlflowClient

    # named "checkpoint": download_checkpoint finds the artifact by that directory name
    conditional = make_checkpoint(root / "v1" / "checkpoint", num_classes=10, seed=1)
    unconditional = make_checkpoint(root / "v2" / "checkpoint", num_classes=None, seed=2)
    v1 = log_and_register(conditional, model_name=MODEL, tracking_uri=uri, metrics={"fd": 1.5},
                          lock_dir=root)
    v2 = log_and_register(unconditional, model_name=MODEL, tracking_uri=uri, lock_dir=root)
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(MODEL, "champion", v1.version)
    return {"uri": uri, "v1": v1.version, "v2": v2.version, "checkpoint_v1": conditional}


@pytest.fixture(scope="module")
def settings(registry: dict):
    from serving.config import ServeSettings

    return ServeSettings(
        model_name=MODEL, alias="champion", tracking_uri=registry["uri"], port=free_port(),
        api_key_env=API_KEY_ENV, max_images_per_request=16, max_steps=50, max_work=16 * 10,
        default_steps=STEPS, max_images_per_batch=16, max_ongoing_requests=32, max_queued_requests=48,
        # long enough that the requests of one burst from this process share a turn on a busy CI
        # machine, which the merged-batch tests need; serving's default is far shorter
        batch_wait_timeout_s=0.1,
    )


@pytest.fixture(scope="module")
def serve_config(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The packaged Serve config with test-sized actor options and the API key in the replicas' env."""
    import yaml

    from serving import control

    base = control.load_serve_config()
    app = base["applications"][0]
    app["runtime_env"] = {"env_vars": {API_KEY_ENV: API_KEY}}
    for deployment in app["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 1 if deployment["name"] == "DiffusionModel" else 0}
    path = tmp_path_factory.mktemp("serve_config") / "serve_config.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.fixture(scope="module")
def server(_ray_session: None, settings, serve_config: Path) -> str:
    """The app, started by the deploy task (declaratively, as `diffusion-pipeline serve` does) from
    the packaged Serve config with test-sized actor options -> its URL."""
    from local_services import init_session_ray
    from ray import serve

    from flows.deploy import deploy

    init_session_ray()
    try:
        result = deploy.fn(MODEL, alias="champion", settings=settings, start_if_not_running=True,
                           serve_config=serve_config, timeout_s=240)
        assert result.action == "started" and result.url == settings.url
        yield settings.url
    finally:
        serve.shutdown()


@pytest.fixture(scope="module")
def reference(registry: dict):
    """The champion checkpoint loaded here, to generate the expected images directly."""
    return load_checkpoint(registry["checkpoint_v1"])


def expected(reference, seeds: list[int], labels: list[int] | None = None, steps: int = STEPS) -> np.ndarray:
    return reference.generate(len(seeds), steps=steps, seeds=seeds, labels=labels).numpy()


def post(url: str, payload: dict, headers: dict | None = AUTH) -> httpx.Response:
    return httpx.post(f"{url}/generate", json=payload, headers=headers, timeout=120)


async def post_many(url: str, payloads: list[dict], timeout: float = 300) -> list[httpx.Response]:
    async with httpx.AsyncClient(timeout=timeout, headers=AUTH,
                                 limits=httpx.Limits(max_connections=len(payloads) + 1)) as client:
        return await asyncio.gather(*(client.post(f"{url}/generate", json=p) for p in payloads))


# ------------------------------------------------------------------------------------ happy paths


def test_healthz_and_model_info(server: str, registry: dict):
    health = httpx.get(f"{server}/healthz", timeout=30)  # no token needed for probes
    assert health.status_code == 200 and health.json() == {"status": "ready"}
    info = httpx.get(f"{server}/model", headers=AUTH, timeout=30).json()
    assert (info["name"], info["version"], info["alias"]) == (MODEL, registry["v1"], "champion")
    assert info["image_shape"] == [1, 8, 8] and info["num_classes"] == 10
    assert info["label_names"] == [str(i) for i in range(10)]
    assert info["class_prior"] == [0.1] * 10  # no class counts recorded: uniform
    assert info["metrics"]["fd"] == 1.5
    assert info["limits"] == {"max_images_per_request": 16, "max_steps": 50, "max_work": 160,
                              "default_steps": STEPS, "default_sampler": "dpmpp_2m",
                              "samplers": ["dpmpp_2m", "ddim", "ddpm"]}


def test_array_output_matches_a_direct_sampler_call(server: str, reference, registry: dict):
    response = post(server, {"num_images": 3, "seed": 11, "labels": [0, 5, 9], "format": "array"})
    assert response.status_code == 200, response.text
    body = response.json()
    images = np.asarray(body["images"], dtype=np.float32)
    assert images.shape == (3, 1, 8, 8) == tuple(body["shape"])
    assert images.min() >= 0.0 and images.max() <= 1.0 and images.std() > 0.01
    assert body["seeds"] == [11, 12, 13] and body["labels"] == [0, 5, 9]
    assert body["model"] == {"name": MODEL, "version": registry["v1"], "alias": "champion"}
    np.testing.assert_allclose(images, expected(reference, [11, 12, 13], [0, 5, 9]), atol=1e-4)
    assert set(body["timings"]) == {"queue_s", "sampling_s", "model_s", "handle_s", "total_s", "batch_images",
                                    "batch_total_images"}
    timings = body["timings"]
    assert timings["queue_s"] + timings["sampling_s"] <= timings["model_s"] <= timings["handle_s"]
    assert timings["handle_s"] <= timings["total_s"]


def test_png_output_is_the_rounded_array(server: str, reference):
    body = post(server, {"num_images": 2, "seed": 3}).json()
    pngs = np.stack([decode_png(base64.b64decode(p)) for p in body["images"]])
    assert pngs.shape == (2, 8, 8, 1) and pngs.dtype == np.uint8
    direct = np.rint(expected(reference, [3, 4]) * 255).transpose(0, 2, 3, 1)
    assert np.abs(pngs.astype(int) - direct).max() <= 1  # rounding at a .5 boundary at most


def test_random_seed_is_reported_and_reproduces_the_images(server: str):
    first = post(server, {"num_images": 2, "format": "array"}).json()
    seeds = first["seeds"]
    assert seeds[1] == seeds[0] + 1
    again = post(server, {"num_images": 2, "seed": seeds[0], "format": "array"}).json()
    np.testing.assert_array_equal(np.asarray(first["images"]), np.asarray(again["images"]))


def test_an_image_is_identical_alone_and_inside_a_merged_batch(server: str, settings):
    alone = post(server, {"num_images": 1, "seed": 7, "labels": [3], "format": "array"}).json()
    assert alone["timings"]["batch_images"] == 1
    payloads = [{"num_images": 1, "seed": 7, "labels": [3], "format": "array"},
                {"num_images": 12, "seed": 100, "labels": [i % 10 for i in range(12)], "format": "array"},
                *({"num_images": 1, "seed": 500 + i, "labels": [i], "format": "array"} for i in range(6))]
    responses = asyncio.run(post_many(server, payloads))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    merged = responses[0].json()
    assert merged["timings"]["batch_images"] > 1  # it really shared a run
    # 19 images in 8 requests: a batch is capped by images (16), not by requests
    totals = [r.json()["timings"]["batch_total_images"] for r in responses]
    assert max(totals) <= settings.max_images_per_batch, totals
    # equal up to float32 rounding (CPU kernels may sum in another order for another batch size);
    # a different seed or a mixed-up slot differs by ~0.5
    np.testing.assert_allclose(np.asarray(merged["images"]), np.asarray(alone["images"]), atol=1e-4)


def test_an_unlabelled_image_is_identical_alone_and_inside_a_merged_batch(server: str, reference):
    """Issue 13: the class each unlabelled image gets is drawn from its seed alone."""
    alone = post(server, {"num_images": 1, "seed": 9, "format": "array"}).json()
    assert alone["timings"]["batch_images"] == 1
    payloads = [{"num_images": 6, "seed": 6, "format": "array"},  # holds seed 9 as its image 3
                {"num_images": 5, "seed": 300, "labels": [1, 2, 3, 4, 5], "format": "array"},
                *({"num_images": 1, "seed": 700 + i, "format": "array"} for i in range(4))]
    responses = asyncio.run(post_many(server, payloads))
    assert all(r.status_code == 200 for r in responses), [r.text for r in responses if r.status_code != 200]
    merged = responses[0].json()
    assert merged["timings"]["batch_images"] > 6  # it really shared a run with other requests
    assert merged["labels"][3] == alone["labels"][0]
    np.testing.assert_allclose(np.asarray(merged["images"])[3:4], np.asarray(alone["images"]), atol=1e-4)
    # the labels reported are the ones sampled: a direct call with them gives the same images
    np.testing.assert_allclose(np.asarray(merged["images"]), expected(reference, list(range(6, 12)),
                                                                      merged["labels"]), atol=1e-4)
    drawn = [label for r in responses for label in r.json()["labels"]]
    assert all(0 <= label < 10 for label in drawn) and len(set(drawn)) > 1


def test_unconditional_requests_use_the_null_label(server: str, reference):
    explicit = post(server, {"num_images": 2, "seed": 21, "unconditional": True, "format": "array"}).json()
    per_image = post(server, {"num_images": 2, "seed": 21, "labels": [-1, -1], "format": "array"}).json()
    assert explicit["labels"] == per_image["labels"] == [-1, -1]
    direct = reference.generate(2, steps=STEPS, seeds=[21, 22], unconditional=True).numpy()
    np.testing.assert_allclose(np.asarray(explicit["images"]), direct, atol=1e-4)
    np.testing.assert_allclose(np.asarray(per_image["images"]), direct, atol=1e-4)
    response = post(server, {"num_images": 1, "labels": [2], "unconditional": True})
    assert response.status_code == 422
    assert "unconditional: accepted: true only without labels" in response.json()["detail"]


@pytest.fixture(scope="module")
def one_hot_app(server: str, settings, serve_config: Path, tmp_path_factory: pytest.TempPathFactory):
    """An app serving a local checkpoint whose class prior puts all mass on class 7 -> its URL."""
    from ray import serve

    from serving import control

    prior = [0.0] * 10
    prior[7] = 1.0
    checkpoint = make_checkpoint(tmp_path_factory.mktemp("one_hot") / "checkpoint", num_classes=10, seed=3,
                                 class_prior=prior)
    one_hot = settings.model_copy(update={"app_name": "one-hot", "route_prefix": "/one-hot", "alias": None,
                                          "checkpoint_dir": str(checkpoint)})
    base = control.load_serve_config(serve_config)
    for deployment in base["applications"][0]["deployments"]:
        deployment["ray_actor_options"] = {"num_cpus": 0}
    control.start_app(one_hot, base, timeout_s=240)
    try:
        yield one_hot.url, load_checkpoint(checkpoint)
    finally:
        serve.delete(one_hot.app_name)


def test_unlabelled_requests_of_a_one_hot_prior_all_get_its_class(one_hot_app):
    url, model = one_hot_app
    info = httpx.get(f"{url}/model", headers=AUTH, timeout=30).json()
    assert info["class_prior"] == [0.0] * 7 + [1.0] + [0.0] * 2
    body = post(url, {"num_images": 12, "seed": 40, "format": "array"}).json()
    assert body["labels"] == [7] * 12
    direct = model.generate(12, steps=STEPS, seeds=list(range(40, 52)), labels=[7] * 12).numpy()
    np.testing.assert_allclose(np.asarray(body["images"]), direct, atol=1e-4)


def test_32_concurrent_clients_all_get_their_own_images(server: str, reference):
    payloads = [{"num_images": 1, "seed": 1000 + i, "labels": [i % 10], "format": "array"} for i in range(32)]
    responses = asyncio.run(post_many(server, payloads))
    assert [r.status_code for r in responses] == [200] * 32
    bodies = [r.json() for r in responses]
    assert [b["seeds"] for b in bodies] == [[1000 + i] for i in range(32)]
    assert max(b["timings"]["batch_images"] for b in bodies) > 1
    served = np.concatenate([np.asarray(b["images"], dtype=np.float32) for b in bodies])
    direct = expected(reference, [1000 + i for i in range(32)], [i % 10 for i in range(32)])
    np.testing.assert_allclose(served, direct, atol=1e-4)


def test_mixed_samplers_in_one_burst_each_match_their_own_run(server: str, reference):
    payloads = [{"num_images": 2, "seed": 40, "sampler": "ddim", "eta": 0.5, "format": "array"},
                {"num_images": 2, "seed": 40, "sampler": "ddpm", "steps": 6, "format": "array"},
                {"num_images": 2, "seed": 40, "guidance_scale": 3.0, "labels": [1, 2], "format": "array"}]
    responses = asyncio.run(post_many(server, payloads))
    assert [r.status_code for r in responses] == [200] * 3
    ddim, ddpm, guided = (np.asarray(r.json()["images"], dtype=np.float32) for r in responses)
    np.testing.assert_allclose(ddim, reference.generate(2, steps=STEPS, sampler="ddim", seeds=[40, 41],
                                                        eta=0.5).numpy(), atol=1e-4)
    np.testing.assert_allclose(ddpm, reference.generate(2, steps=6, sampler="ddpm", seeds=[40, 41]).numpy(),
                               atol=1e-4)
    np.testing.assert_allclose(guided, reference.generate(2, steps=STEPS, seeds=[40, 41], labels=[1, 2],
                                                          guidance_scale=3.0).numpy(), atol=1e-4)


def test_client_and_generate_cli_write_pngs_and_a_grid(server: str, tmp_path: Path):
    from flows.cli import main
    from serving.client import GenerationClient, GenerationError

    with GenerationClient(server, api_key=API_KEY) as client:
        result = client.generate(4, seed=5, labels=[1, 2, 3, 4])
        assert result.images.shape == (4, 8, 8, 1) and result.seeds == [5, 6, 7, 8]
        assert client.model_info()["name"] == MODEL and client.healthy()
    with GenerationClient(server) as anonymous, pytest.raises(GenerationError) as err:
        anonymous.generate(1)
    assert err.value.status_code == 401
    (tmp_path / "api-key").write_text(API_KEY)
    with pytest.raises(SystemExit) as done:  # main() exits with the command's status
        main(["generate", "--url", server, "-n", "5", "--seed", "0", "--out", str(tmp_path),
              "--api-key-file", str(tmp_path / "api-key"), "--nrow", "4"])
    assert done.value.code == 0
    pngs = sorted(p.name for p in tmp_path.glob("image_*.png"))
    assert pngs == [f"image_{i:03d}_seed{i}.png" for i in range(5)]
    grid = decode_png((tmp_path / "grid.png").read_bytes())
    assert grid.shape == (2 * 34 + 2, 4 * 34 + 2, 1)  # 2 rows x 4 of 8x8 tiles zoomed to 32, 2 px padding


# ------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(("payload", "status", "field"), [
    ({"sampler": "euler"}, 422, "sampler"),
    ({"num_images": 0}, 422, "num_images: Input should be greater than or equal to 1"),
    ({"num_images": 17}, 422, "num_images: Input should be less than or equal to 16"),
    ({"steps": 0}, 422, "steps: Input should be greater than or equal to 1"),
    ({"steps": 51}, 422, "steps: Input should be less than or equal to 50"),
    ({"num_images": 16, "steps": 20}, 422, "work cap; accepted: <= 160"),
    ({"num_images": 2, "labels": [1]}, 422, "labels: one label per image"),
    ({"num_images": 2, "labels": [1, 10]}, 422, "labels: each must be a class of this model; accepted: "
                                                "integers 0..9"),
    ({"eta": 0.5}, 422, "eta: only used by ddim"),
    ({"seed": -1}, 422, "seed"),
    ({"format": "jpeg"}, 422, "format"),
    ({"num_image": 2}, 422, "body: unknown field; accepted fields: num_images"),
])
def test_bad_input_gets_4xx_naming_the_field(server: str, payload: dict, status: int, field: str):
    response = post(server, payload)
    assert response.status_code == status, response.text
    assert field in response.json()["detail"]


@pytest.mark.parametrize("body", ['{"guidance_scale": NaN}', '{"guidance_scale": Infinity}',
                                  '{"guidance_scale": 1e400}'])
def test_non_finite_guidance_is_rejected(server: str, body: str):
    response = httpx.post(f"{server}/generate", content=body, timeout=30,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 422 and "guidance_scale" in response.json()["detail"]


def test_non_json_body_is_a_400(server: str):
    response = httpx.post(f"{server}/generate", content=b"num_images=3", timeout=30,
                          headers={**AUTH, "Content-Type": "application/json"})
    assert response.status_code == 400 and "JSON" in response.json()["detail"]


@pytest.mark.parametrize("headers", [None, {"Authorization": "Bearer wrong"}, {"Authorization": API_KEY}])
def test_missing_or_wrong_api_key_is_a_401(server: str, headers: dict | None):
    assert post(server, {"num_images": 1}, headers=headers).status_code == 401
    assert httpx.get(f"{server}/model", headers=headers, timeout=30).status_code == 401


# -------------------------------------------------------------------------------------- overload


def test_overload_gets_503_quickly_and_the_replica_survives(server: str, settings):
    n = 240  # far more than max_ongoing_requests (32) + max_queued_requests (48)
    started = time.perf_counter()

    async def timed(client: httpx.AsyncClient, i: int) -> tuple[int, float]:
        response = await client.post(f"{server}/generate", json={"num_images": 1, "seed": i, "steps": 10})
        return response.status_code, time.perf_counter() - started

    async def burst() -> list[tuple[int, float]]:
        async with httpx.AsyncClient(timeout=300, headers=AUTH, limits=httpx.Limits(max_connections=n)) as c:
            return await asyncio.gather(*(timed(c, i) for i in range(n)))

    results = asyncio.run(burst())
    codes = [code for code, _ in results]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(503) >= n // 3
    assert codes.count(200) >= 1
    rejected_after = sorted(t for code, t in results if code == 503)
    assert rejected_after[len(rejected_after) // 2] < 10.0  # turned away at once, not after a wait
    assert httpx.get(f"{server}/healthz", timeout=30).status_code == 200
    assert post(server, {"num_images": 1, "seed": 0}).status_code == 200


# ---------------------------------------------------------------------- other apps, failures


def test_a_second_app_started_and_stopped_by_the_cli_leaves_the_first_running(
        server: str, settings, serve_config: Path, registry: dict):
    """start_app keeps the other declaratively deployed apps (Ray deletes those a config lacks), and
    the CLI's exit deletes only its own app when it did not start Ray."""
    import ray

    from flows.cli.context import CliContext
    from flows.cli.serve import serve_until_interrupted
    from serving import control
    from serving.config import ServeSettings

    base = control.load_serve_config(serve_config)
    second = ServeSettings.model_validate({
        **settings.model_dump(), "app_name": "second", "route_prefix": "/second",
        "checkpoint_dir": str(registry["checkpoint_v1"]), "alias": None})
    seen: list[set[str]] = []

    def while_serving() -> None:
        seen.append(set(control.running_app_names()))
        control.start_app(second, base, timeout_s=120)  # the same name again: replaced, others kept
        seen.append(set(control.running_app_names()))
        assert httpx.get(f"{second.url}/healthz", timeout=30).status_code == 200
        raise KeyboardInterrupt

    before = set(control.running_app_names())
    assert settings.app_name in before and "second" not in before
    serve_until_interrupted(CliContext(), second, base, ray_address=None, block=while_serving)
    assert seen == [before | {"second"}] * 2
    assert set(control.running_app_names()) == before and ray.is_initialized()
    assert httpx.get(f"{server}/healthz", timeout=30).status_code == 200


def test_a_dead_or_silent_model_replica_gets_503_or_504_not_500_or_a_hang(server: str):
    """An ingress in front of a model whose replica dies on describe and never answers generate."""
    import os

    from ray import serve

    from serving.config import ServeSettings
    from serving.ingress import GenerationIngress

    @serve.deployment(ray_actor_options={"num_cpus": 0})
    class BrokenModel:
        async def describe(self) -> None:
            os._exit(1)  # the replica process dies: the ingress sees ActorDiedError

        async def generate(self, job) -> None:
            await asyncio.sleep(3600)

    settings = ServeSettings(request_timeout_s=1.5, default_steps=STEPS)
    ingress = GenerationIngress.options(ray_actor_options={"num_cpus": 0})
    serve.run(ingress.bind(BrokenModel.bind(), settings.model_dump(mode="json")), name="broken",
              route_prefix="/broken")
    url = server.rstrip("/") + "/broken"
    try:
        started = time.perf_counter()
        response = httpx.post(f"{url}/generate", json={"num_images": 1}, timeout=60)
        assert response.status_code == 504 and "1.5s" in response.json()["detail"]
        assert time.perf_counter() - started < 30
        response = httpx.get(f"{url}/healthz", timeout=60)
        assert response.status_code == 503 and "not ready" in response.json()["detail"]
        assert httpx.get(f"{url}/model", timeout=60).status_code == 503
    finally:
        serve.delete("broken")


def test_deploy_to_a_named_app_that_does_not_run_fails_naming_it(server: str, settings, registry: dict):
    from flows.deploy import DeployError, deploy
    from serving.config import RayTarget

    other = settings.model_copy(update={"targets": [RayTarget(app_name="not-deployed")]})
    with pytest.raises(DeployError, match=r"'not-deployed'.*does not run there"):
        deploy.fn(MODEL, alias="champion", settings=other)


# ------------------------------------------------------------------------------------- hot swap


@pytest.fixture(scope="module")
def swap_app(server: str, settings, serve_config: Path):
    """An app of its own for the tests that switch the model version, so that the shared app serves
    version 1 whatever the order of the tests. -> its ServeSettings."""
    from ray import serve

    from flows.deploy import deploy
    from serving.config import RayTarget

    swap = settings.model_copy(update={"app_name": "swap", "route_prefix": "/swap",
                                       "targets": [RayTarget(app_name="swap")]})
    result = deploy.fn(MODEL, alias="champion", settings=swap, start_if_not_running=True,
                       serve_config=serve_config, timeout_s=240)
    assert result.action == "started"
    try:
        yield swap
    finally:
        serve.delete(swap.app_name)


def serving_version(swap_app, registry: dict, version: str):
    """Switch the swap app to `version` (a no-op when it serves it already) -> the switch report."""
    from serving.switch import switch_to_version

    return switch_to_version(MODEL, version, None, swap_app.targets, timeout_s=180)


def model_info(url: str) -> dict:
    return httpx.get(f"{url}/model", headers=AUTH, timeout=30).json()


def test_a_version_that_cannot_load_fails_the_switch_by_name_and_switching_back_recovers(
        swap_app, registry: dict):
    """A replica that cannot load the pinned version is replaced rather than left serving another
    one; Serve then marks the deployment failed, and the switch names the app."""
    serving_version(swap_app, registry, registry["v1"])
    report = serving_version(swap_app, registry, "999")  # no such version: every load fails
    [failure] = report.failures
    assert failure.app_name == "swap" and "DEPLOY_FAILED" in failure.message
    report = serving_version(swap_app, registry, registry["v1"])
    assert [(o.app_name, o.action) for o in report.outcomes] == [("swap", "switched")]
    assert model_info(swap_app.url)["version"] == registry["v1"]


def test_hot_swap_under_load_drops_nothing(swap_app, registry: dict, server: str):
    """deploy() switches the running app from v1 to v2 while 6 clients keep requesting."""
    from flows.deploy import deploy

    serving_version(swap_app, registry, registry["v1"])
    url = swap_app.url
    stop = threading.Event()
    seen: list[tuple[int, str | None]] = []

    async def client_loop(client: httpx.AsyncClient, k: int) -> None:
        while not stop.is_set():
            response = await client.post(f"{url}/generate", json={"num_images": 2, "seed": k})
            version = response.json()["model"]["version"] if response.status_code == 200 else None
            seen.append((response.status_code, version))

    async def load() -> None:
        async with httpx.AsyncClient(timeout=120, headers=AUTH) as client:
            await asyncio.gather(*(client_loop(client, k) for k in range(6)))

    replica_before = httpx.get(f"{url}/model", headers=AUTH, timeout=30).json()["replica"]
    worker = threading.Thread(target=lambda: asyncio.run(load()))
    worker.start()
    try:
        time.sleep(1.0)
        result = deploy.fn(MODEL, alias=None, version=registry["v2"], settings=swap_app)
        time.sleep(1.0)
    finally:
        stop.set()
        worker.join(timeout=120)
    assert result.action == "switched" and result.version == registry["v2"]
    codes = [code for code, _ in seen]
    assert codes and set(codes) == {200}, f"{len(codes) - codes.count(200)} failed of {len(codes)}"
    versions = [v for _, v in seen]
    assert registry["v1"] in versions and versions[-1] == registry["v2"]
    info = httpx.get(f"{url}/model", headers=AUTH, timeout=30).json()
    assert info["version"] == registry["v2"] and info["num_classes"] is None
    assert info["replica"] == replica_before  # reconfigured in place, not replaced
    # version 2 is unconditional: labels are now refused
    response = post(url, {"num_images": 1, "labels": [3]})
    assert response.status_code == 422 and "unconditional" in response.json()["detail"]
    assert deploy.fn(MODEL, alias=None, version=registry["v2"], settings=swap_app).action == "unchanged"
    # the shared app serves the same model: a switch that names only `swap` left it alone
    assert model_info(server)["version"] == registry["v1"]
