"""The vocabulary of a sampling request, without torch: sampler names, the defaults, the seed range
and the null label.

Everything that validates or documents a request (the HTTP front end, the CLI, the MLflow model
signature, configs) reads these; `samplers.SAMPLERS` implements exactly `SAMPLER_NAMES` (checked at
import there). Keeping them here lets a process that never samples (the Serve ingress) validate
requests without loading torch or the network.
"""

from __future__ import annotations

from typing import Literal, get_args

SamplerName = Literal["dpmpp_2m", "ddim", "ddpm"]
SAMPLER_NAMES: tuple[str, ...] = get_args(SamplerName)
DEFAULT_SAMPLER: SamplerName = "dpmpp_2m"
DEFAULT_STEPS = 20
# Samplers whose stochasticity `eta` is a free parameter (the others require eta = 0).
ETA_SAMPLERS: tuple[str, ...] = ("ddim",)
# Seeds seed torch.Generator, which takes a signed 64-bit integer.
MAX_SEED = 2**63 - 1
# A label meaning "no class": the UNet maps it to its null class embedding (classifier-free guidance).
NULL_LABEL = -1
