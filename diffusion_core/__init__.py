"""diffusion_core: the math of denoising diffusion, the denoiser, and the data it learns from.

Public API (see README): `NoiseSchedule`, `sample`, `UNet`, `UNetConfig`, `EMA`,
`save_checkpoint`, `load_checkpoint`.
"""

from __future__ import annotations

__all__: list[str] = []
