"""The registry's error."""

from __future__ import annotations

from diffusion_core.errors import DiffusionPipelineError


class RegistryError(DiffusionPipelineError):
    """The registry is not in a state that allows the requested operation."""
