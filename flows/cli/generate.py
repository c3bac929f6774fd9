"""`diffusion-pipeline generate --url URL -n 16 --out DIR`: ask a running server for images and
write them as PNGs (image_<i>_seed<seed>.png) plus grid.png, enlarged so that small images are
readable.

Any number of images: the job is split into requests within the server's per-request limits
(`AsyncGenerationClient.generate_many`: image i uses seed + i whichever request carries it), sent a
few at a time, with a progress bar (images, rate, ETA). Answers 503 are retried with backoff.

The API key is a secret, so it never travels on the command line (where `ps` and shell history
show it): it is read from `--api-key-file`, else from the environment variable named by the
config's `serve.api_key_env`.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

import typer

from flows.cli.context import cli_context
from serving.config import SERVE_CONFIG_PATH

if TYPE_CHECKING:
    from serving.client import GenerationResult, Progress


def register(app: typer.Typer) -> None:
    app.command("generate")(generate_command)


def parse_labels(text: str | None) -> list[int] | None:
    """"3,1,4" -> [3, 1, 4]; a single value is repeated by the caller's num_images."""
    if text is None:
        return None
    try:
        return [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise typer.BadParameter("labels: expected comma-separated integers") from None


def read_api_key(key_file: Path | None, env_var: str | None) -> str | None:
    """The bearer token: the first line of `key_file`, else the value of `env_var`, else None."""
    if key_file is not None:
        try:
            key = key_file.read_text().strip()
        except OSError as err:
            raise typer.BadParameter(f"cannot read the file ({err.strerror})",
                                     param_hint="--api-key-file") from None
        if not key:
            raise typer.BadParameter("the file is empty; accepted: a file holding the key",
                                     param_hint="--api-key-file")
        return key
    return (os.environ.get(env_var) or None) if env_var else None


@contextmanager
def progress_bar() -> Iterator[Progress]:
    """A terminal progress bar (images done, rate, ETA) on stderr -> its `progress(done, total)`. The
    bar appears at the first call (the job has been planned), so a job that fails before it starts
    (no server there) prints only its error."""
    from rich.console import Console
    from rich.progress import BarColumn, MofNCompleteColumn, TextColumn, TimeRemainingColumn
    from rich.progress import Progress as Bar

    columns = (TextColumn("generating"), BarColumn(), MofNCompleteColumn(),
               TextColumn("{task.fields[rate]}"), TextColumn("ETA"), TimeRemainingColumn())
    bar = Bar(*columns, console=Console(stderr=True))

    def update(done: int, total: int) -> None:
        if not bar.tasks:
            bar.start()
            bar.add_task("generate", total=total, rate="")
        task = bar.tasks[0]
        bar.update(task.id, completed=done, rate=f"{task.speed:.1f} images/s" if task.speed else "")

    try:
        yield update
    finally:
        bar.stop()


def generate_command(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the PNGs and grid.png."),
    num_images: int = typer.Option(16, "--num-images", "-n", min=1, help="Images to generate; more than "
                                   "the server takes in one request are split into several."),
    url: str | None = typer.Option(None, "--url", help="Server URL (default: what `serve` would use)."),
    steps: int | None = typer.Option(None, "--steps", help="Sampler steps (server default when unset)."),
    sampler: str | None = typer.Option(None, "--sampler", help="dpmpp_2m, ddim or ddpm."),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", help="Classifier-free guidance w."),
    labels: str | None = typer.Option(None, "--labels", help="Comma-separated class per image; one value "
                                      "applies to all images."),
    seed: int | None = typer.Option(None, "--seed", help="Image i uses seed + i (random when unset)."),
    nrow: int | None = typer.Option(None, "--nrow", min=1, help="Images per grid row (default: a square "
                                    "grid)."),
    concurrency: int = typer.Option(4, "--concurrency", min=1, help="Requests in flight at once."),
    api_key_file: Path | None = typer.Option(None, "--api-key-file", help="File holding the bearer token "
                                             "(default: the env var named by serve.api_key_env)."),
    serve_config: Path = typer.Option(SERVE_CONFIG_PATH, "--serve-config", help="Ray Serve config file "
                                      "(with the config file's serve section: the default URL and key)."),
) -> None:
    """Generate images with a running server and save them."""
    from serving.client import AsyncGenerationClient

    context = cli_context(ctx)
    if not context.debug:  # one log line per request would scroll the progress bar away
        logging.getLogger("httpx").setLevel(logging.WARNING)
    settings, _ = context.serve_settings(serve_config)
    key = read_api_key(api_key_file, settings.api_key_env)
    label_list = parse_labels(labels)
    if label_list is not None and len(label_list) == 1:
        label_list = label_list * num_images

    async def job(progress: Progress) -> GenerationResult:
        async with AsyncGenerationClient(url or settings.url, api_key=key) as client:
            return await client.generate_many(num_images, steps=steps, sampler=sampler,
                                              guidance_scale=guidance_scale, labels=label_list, seed=seed,
                                              concurrency=concurrency, progress=progress)

    with progress_bar() as progress:
        result = asyncio.run(job(progress))
    grid = save_images(result, out, nrow or math.ceil(math.sqrt(len(result.seeds))))
    model = result.model
    typer.echo(f"{len(result.seeds)} images from {model['name']} v{model['version']} in {result.requests} "
               f"requests ({result.timings['total_s']:.1f}s) -> {out} (grid: {grid})")


def save_images(result: GenerationResult, out: Path, nrow: int) -> Path:
    """image_<i>_seed<seed>.png at their own size, and grid.png enlarged -> the grid's path."""
    from diffusion_core.images import enlarge, make_grid, save_png

    width = max(3, len(str(len(result.seeds) - 1)))  # names sort in image order
    for i, (image, image_seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        save_png(out / f"image_{i:0{width}d}_seed{image_seed}.png", image)
    return save_png(out / "grid.png", make_grid(enlarge(result.images), nrow=nrow, padding=2))
