"""`diffusion-pipeline generate --url URL -n 16 --out DIR`: ask a running server for images and
write them as PNGs (image_<i>_seed<seed>.png) plus grid.png."""

from __future__ import annotations

import os
from pathlib import Path

import typer

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
        raise typer.BadParameter(f"labels: expected comma-separated integers, got {text!r}") from None


def generate_command(
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
    api_key: str | None = typer.Option(None, "--api-key", help="Bearer token (default: the env var named "
                                       "by serve.api_key_env)."),
    serve_config: Path = typer.Option(SERVE_CONFIG_PATH, "--serve-config", help="Ray Serve config file "
                                      "(with the config file's serve section: the default URL and key)."),
) -> None:
    """Generate images with a running server and save them."""
    from diffusion_core.images import make_grid, save_png
    from flows.cli.serve import load_serve_settings
    from serving.client import GenerationClient

    settings, _ = load_serve_settings(serve_config)
    key = api_key or (os.environ.get(settings.api_key_env) if settings.api_key_env else None)
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
