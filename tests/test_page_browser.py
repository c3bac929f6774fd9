"""The page at GET / in a real headless browser: the system's Chromium driven by Playwright.

One app with an API key serves version 1 of a registered random-init digits model (evaluation
numbers as registry tags; one class name is markup, to show that server data reaches the page only
as text). A person's path is followed: the page asks for the key, refuses a wrong one, shows the
model and its numbers, sends the form as a /generate request and shows the images, which must
decode and equal what the API answers to the same request. A screenshot is saved as the test's
artifact (its path is printed).
"""

from __future__ import annotations

import base64
import shutil
from pathlib import Path

import httpx
import numpy as np
import pytest

from diffusion_core.images import decode_png

pytestmark = pytest.mark.slow

MODEL = "page-test-digits"
API_KEY_ENV = "DIFFUSION_PAGE_TEST_KEY"
API_KEY = "page-test-secret"
AUTH = {"Authorization": f"Bearer {API_KEY}"}
HOSTILE_NAME = "<img src=x onerror=\"document.title='pwned'\">nine"
LABEL_NAMES = ["zero", "one", "two", "three", "four", "five", "six", "seven", "eight", HOSTILE_NAME]
METRICS = {"eval_fd": 14.65, "eval_precision": 0.914}
IMAGES_READY = """n => {
    const images = [...document.querySelectorAll('#grid img')];
    return images.length === n && images.every(image => image.complete && image.naturalWidth > 0);
}"""


def chromium_executable() -> str:
    """The system's Chromium (Playwright's own browser download is not used): a missing browser is
    a broken test setup, so it fails rather than skips."""
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    if path is None:
        pytest.fail("no chromium on PATH: install the system package (apt-get install chromium; "
                    ".ci/run does)")
    return path


@pytest.fixture(scope="module")
def app(_ray_session: None, tmp_path_factory: pytest.TempPathFactory):
    """The running app's ServeSettings."""
    from local_services import free_port
    from mlflow import MlflowClient
    from served_app import make_checkpoint, running_app

    from diffusion_core.adapters.mlflow_registry import log_and_register
    from serving.config import ServeSettings

    root = tmp_path_factory.mktemp("page")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    checkpoint = make_checkpoint(root / "v1" / "checkpoint", label_names=LABEL_NAMES)
    version = log_and_register(checkpoint, model_name=MODEL, tracking_uri=uri, metrics=METRICS, lock_dir=root)
    MlflowClient(tracking_uri=uri, registry_uri=uri).set_registered_model_alias(MODEL, "champion",
                                                                                version.version)
    # under a route prefix, as behind a shared gateway: the page must find the API beside itself
    settings = ServeSettings(model_name=MODEL, alias="champion", tracking_uri=uri, port=free_port(),
                             route_prefix="/try",
                             api_key_env=API_KEY_ENV, max_images_per_request=16, max_steps=50,
                             max_work=16 * 10, default_steps=4, max_images_per_batch=16)
    with running_app(settings, env={API_KEY_ENV: API_KEY}):
        yield settings


@pytest.fixture(scope="module")
def browser():
    from playwright.sync_api import sync_playwright

    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=chromium_executable(), headless=True)
        try:
            yield chromium
        finally:
            chromium.close()


@pytest.fixture()
def page(browser, app):
    """A fresh page at the app's URL that records console errors and uncaught exceptions (a CSP
    violation is a console error)."""
    context = browser.new_context(viewport={"width": 1180, "height": 820})
    page = context.new_page()
    page.errors = []
    page.on("console", lambda message: page.errors.append(message.text) if message.type == "error" else None)
    page.on("pageerror", lambda error: page.errors.append(str(error)))
    page.goto(app.url)  # no trailing slash: the page's relative calls must still reach /try/...
    yield page
    context.close()


def expect(locator):
    from playwright.sync_api import expect as playwright_expect

    return playwright_expect(locator)


def enter_key(page, key: str) -> None:
    page.wait_for_selector("#key-form:not([hidden])")
    page.fill("#key", key)
    page.click("#key-submit")


def test_the_page_is_public_and_holds_no_secret_or_model_detail(app):
    response = httpx.get(f"{app.url}/", timeout=30)
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/html")
    for secret_or_detail in (API_KEY, MODEL, "eval_fd", "zero", "14.65"):
        assert secret_or_detail not in response.text
    policy = response.headers["content-security-policy"]
    assert "default-src 'none'" in policy and "connect-src 'self'" in policy
    assert "unsafe-inline" not in policy and "unsafe-eval" not in policy and "http" not in policy
    assert "src=\"http" not in response.text and "@import" not in response.text  # nothing from outside
    assert response.headers["x-content-type-options"] == "nosniff"
    assert httpx.get(f"{app.url}/model", timeout=30).status_code == 401  # the details still need the key


def test_a_person_generates_a_grid_of_digits(page, app, tmp_path: Path, capsys):
    enter_key(page, "not-the-key")
    expect(page.locator("#key-message")).to_contain_text("refused")
    enter_key(page, API_KEY)
    expect(page.locator("#model-line")).to_contain_text("version 1")
    assert page.is_hidden("#key-form")
    assert MODEL in page.text_content("#model-line") and "@champion" in page.text_content("#model-line")
    metrics = page.eval_on_selector_all("#metrics dt, #metrics dd", "items => items.map(i => i.textContent)")
    assert metrics == ["eval_fd", "14.65", "eval_precision", "0.914"]
    options = page.eval_on_selector_all("#labels option", "options => options.map(o => o.textContent)")
    assert options == ["random (the model's default)", "every class in turn", *LABEL_NAMES]
    samplers = page.eval_on_selector_all("#sampler option", "options => options.map(o => o.value)")
    assert samplers == ["dpmpp_2m", "ddim", "ddpm"]

    page.fill("#num-images", "12")
    page.select_option("#labels", label="every class in turn")
    page.select_option("#sampler", "ddim")
    page.fill("#steps", "6")
    page.fill("#guidance", "2")
    page.fill("#seed", "42")
    with page.expect_request("**/generate") as sent:
        page.click("#generate")
    request = sent.value
    payload = {"num_images": 12, "steps": 6, "sampler": "ddim", "guidance_scale": 2, "seed": 42,
               "labels": [i % 10 for i in range(12)], "format": "png"}
    assert request.post_data_json == payload and request.headers["authorization"] == f"Bearer {API_KEY}"
    page.wait_for_function(IMAGES_READY, arg=12, timeout=60_000)

    sources = page.eval_on_selector_all("#grid img", "images => images.map(i => i.src)")
    shown = np.stack([decode_png(base64.b64decode(src.split(",", 1)[1])) for src in sources])
    answer = httpx.post(f"{app.url}/generate", json=payload, headers=AUTH, timeout=120).json()
    direct = np.stack([decode_png(base64.b64decode(png)) for png in answer["images"]])
    assert shown.shape == (12, 8, 8, 1) and np.array_equal(shown, direct)
    sizes = page.eval_on_selector_all("#grid img", "images => images.map(i => [i.naturalWidth, i.width])")
    assert sizes == [[8, 64]] * 12  # decoded at 8 px, shown enlarged
    captions = page.eval_on_selector_all("#grid figcaption", "c => c.map(x => x.textContent)")
    assert captions[0] == "seed 42 · zero" and captions[9] == f"seed 51 · {HOSTILE_NAME}"
    assert "12 images" in page.text_content("#status")

    # server data stayed text: the hostile class name made no element and ran nothing
    assert page.title() == "Diffusion model" and page.locator("img").count() == 12
    # the key lives in the page's memory only
    assert page.evaluate("localStorage.length + sessionStorage.length") == 0
    assert page.evaluate("document.cookie") == ""
    expected = "Failed to load resource: the server responded with a status of 401"  # the key prompts
    assert [error for error in page.errors if not error.startswith(expected)] == []
    screenshot = tmp_path / "page.png"
    page.screenshot(path=str(screenshot), full_page=True)
    with capsys.disabled():  # shown in the CI log whatever pytest captures
        print(f"\nscreenshot of the page: {screenshot}")
    assert decode_png(screenshot.read_bytes()).shape[1] == 1180


def test_a_refused_request_shows_the_servers_reason(page, app):
    enter_key(page, API_KEY)
    expect(page.locator("#controls")).to_be_enabled()
    page.fill("#num-images", "16")
    page.fill("#steps", "20")  # 320 image-steps > max_work 160
    page.click("#generate")
    expect(page.locator("#status")).to_have_class("error")
    status = page.text_content("#status")
    assert status.startswith("HTTP 422: num_images * steps: exceeds the per-request work cap")
    assert page.locator("#grid img").count() == 0 and not page.is_disabled("#generate")
