"""Prefect flows that chain the pipeline's stages, and the `diffusion-pipeline` CLI."""
