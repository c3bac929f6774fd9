"""The MLflow pyfunc model of a diffusion checkpoint, logged as "models from code".

MLflow stores this file's source with the model and executes it on `mlflow.pyfunc.load_model`, so
nothing is pickled (a `PythonModel` instance would be cloudpickled otherwise). The `diffusion_core`
package it imports travels with the model (`code_paths`, see `packaging.py`). The `set_model` call
at the bottom is that contract: it registers the model object when MLflow runs the file; it
creates nothing and opens no connection.

Request format (one row per image; result[i] depends only on row i and the params):

    predict(pd.DataFrame({"seed": [0, 1, 2], "label": [3, 3, -1]}),
            params={"steps": 20, "sampler": "dpmpp_2m", "guidance_scale": 2.0})
    -> float32 array (N, C, H, W) in [0, 1]

`label` is optional, as over HTTP: without the column (or for a row left empty), a class-conditional
model draws the image's class from its class prior by the image's seed (`LoadedModel.default_labels`:
a sample of the model's marginal); -1 (sampling_defaults.NULL_LABEL) asks for the null label.
`packaging.generation_frame(num_images, seed, labels)` builds the frame. This file is only ever
executed by MLflow, never imported by the library.
"""

from __future__ import annotations

from typing import Any

import mlflow
import numpy as np
import pandas as pd
from mlflow.pyfunc import PythonModel

from diffusion_core.sampling_defaults import NULL_LABEL, check_labels


class DiffusionSampler(PythonModel):
    """Wraps `checkpoint.load_checkpoint(...).generate(...)`; device from the model_config."""

    def load_context(self, context: Any) -> None:
        from diffusion_core.checkpoint import load_checkpoint

        device = (context.model_config or {}).get("device", "cpu")
        self.loaded = load_checkpoint(context.artifacts["checkpoint"], device=device)

    def predict(
        self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None
    ) -> np.ndarray:
        # MLflow fills every param left out from the ParamSchema defaults of the logged signature.
        settings = params or {}
        seeds = [int(s) for s in model_input["seed"]]
        images = self.loaded.generate(
            len(seeds), steps=int(settings["steps"]), sampler=str(settings["sampler"]), seeds=seeds,
            labels=self._labels(model_input), guidance_scale=float(settings["guidance_scale"]),
        )
        return images.numpy()

    def _labels(self, model_input: pd.DataFrame) -> list[int] | None:
        """The label column, its empty rows filled with the class drawn for their seed; None without
        a column (generate() then draws every image's class). ConfigError by `check_labels`."""
        if "label" not in model_input or model_input["label"].isna().all():
            return None
        seeds = [int(s) for s in model_input["seed"]]
        drawn = self.loaded.default_labels(seeds) or [NULL_LABEL] * len(seeds)
        labels = [d if pd.isna(v) else int(v) for v, d in zip(model_input["label"], drawn, strict=True)]
        check_labels(labels, len(seeds), self.loaded.spec.unet.num_classes)
        return labels


mlflow.models.set_model(DiffusionSampler())
