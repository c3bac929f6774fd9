"""`diffusion-pipeline generate --url URL -n 16 --out DIR`: ask a running server for images and
write them as PNGs (image_<i>_seed<seed>.png) plus grid.png.

The API key is a secret, so it never travels on the command line (where `ps` and shell history
show it): it is read from `--api-key-file`, else from the environment variable named by the
config's `serve.api_key_env`.
"""

from __future__ import annotations

import os
from pathlib import Path

import typer

from flows.cli.context import cli_context
from serving.config import SERVE_CONFIG_PATH


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


def generate_command(
    ctx: typer.Context,
    out: Path = typer.Option(..., "--out", "-o", help="Directory for the PNGs and grid.png."),
    num_images: int = typer.Option(16, "--num-images", "-n", help="Images to generate."),
    url: str | None = typer.Option(None, "--url", help="Server URL (default: what `serve` would use)."),
    steps: int | None = typer.Option(None, "--steps", help="Sampler steps (server default when unset)."),
    sampler: str | None = typer.Option(None, "--sampler", help="dpmpp_2m, ddim or ddpm."),
    guidance_scale: float = typer.Option(1.0, "--guidance-scale", help="Classifier-free guidance w."),
    labels: str | None = typer.Option(None, "--labels", help="Comma-separated class per image; one value "
                                      "applies to all images."),
    seed: int | None = typer.Option(None, "--seed", help="Image i uses seed + i (random when unset)."),
    nrow: int = typer.Option(8, "--nrow", help="Images per grid row."),
    api_key_file: Path | None = typer.Option(None, "--api-key-file", help="File holding the bearer token "
                                             "(default: the env var named by serve.api_key_env)."),
    serve_config: Path = typer.Option(SERVE_CONFIG_PATH, "--serve-config", help="Ray Serve config file "
                                      "(with the config file's serve section: the default URL and key)."),
) -> None:
    """Generate images with a running server and save them."""
    from diffusion_core.images import make_grid, save_png
    from serving.client import GenerationClient

    settings, _ = cli_context(ctx).serve_settings(serve_config)
    key = read_api_key(api_key_file, settings.api_key_env)
    label_list = parse_labels(labels)
    if label_list is not None and len(label_list) == 1:
        label_list = label_list * num_images
    with GenerationClient(url or settings.url, api_key=key) as client:
        result = client.generate(num_images, steps=steps, sampler=sampler, guidance_scale=guidance_scale,
                                 labels=label_list, seed=seed)
    for i, (image, image_seed) in enumerate(zip(result.images, result.seeds, strict=True)):
        save_png(out / f"image_{i:03d}_seed{image_seed}.png", image)
    grid = save_png(out / "grid.png", make_grid(result.images, nrow=nrow))
    model = result.model
    typer.echo(f"{len(result.seeds)} images from {model['name']} v{model['version']} -> {out} (grid: {grid})")
