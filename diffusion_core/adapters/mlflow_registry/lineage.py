"""Lineage: the versions of one registered model generate the same kind of data.

Serving swaps a model's versions behind one API, and the gate compares scores measured on one kind
of data: a model of 16x16 RGB shapes neither stands in for an 8x8 grey digits model nor compares
with it. A model's kind of data is its data spec (`DataSpecKey`: image size, channels, labels), so

- every version records it as the `data_spec` tag at registration (versions registered without
  the tag are read from their checkpoint's spec.json);
- a registration whose data spec differs from the champion's is refused (`check_lineage`: the
  error names the model and the fields, and suggests a model name) unless the caller allows it,
  which it does when the user named this model explicitly;
- the gate never compares across data specs (`gate.decide` with the fields that differ).

The dataset fingerprint is not part of the data spec: a model retrained on an updated dataset of
the same shape and labels belongs to the same lineage. Its scores become comparable through the
eval key (which covers the fingerprint and the feature network): the gate re-evaluates the
champion under the candidate's settings.
"""

from __future__ import annotations

import json
import logging

from mlflow import MlflowClient
from mlflow.exceptions import MlflowException
from pydantic import BaseModel, ConfigDict, ValidationError

from diffusion_core.adapters.mlflow_registry.config import CHAMPION, DATA_SPEC_TAG
from diffusion_core.adapters.mlflow_registry.download import download_spec
from diffusion_core.adapters.mlflow_registry.errors import RegistryError
from diffusion_core.adapters.mlflow_registry.versions import ModelVersionInfo, version_by_alias
from diffusion_core.adapters.mlflow_store import client_for, dataset_name
from diffusion_core.checkpoint import DataSpec
from diffusion_core.data.manifest import DatasetManifest
from diffusion_core.errors import DiffusionPipelineError

logger = logging.getLogger(__name__)

UNREADABLE = "data_spec (unreadable)"  # what differs when a version's data spec cannot be read
_CHANNEL_WORDS = {1: "grey", 3: "RGB", 4: "RGBA"}


class DataSpecKey(BaseModel):
    """The part of a checkpoint's DataSpec that decides whether two models are interchangeable."""

    model_config = ConfigDict(frozen=True, extra="forbid")

    image_size: int
    channels: int
    label_names: list[str] | None

    @classmethod
    def of(cls, data: DataSpec) -> DataSpecKey:
        return cls(image_size=data.image_size, channels=data.channels, label_names=data.label_names)

    @classmethod
    def of_manifest(cls, manifest: DatasetManifest) -> DataSpecKey:
        """The data spec of a model trained on `manifest`'s dataset (as ray_train.model_spec_for
        builds it): known before training."""
        return cls(image_size=manifest.image_size, channels=manifest.channels,
                   label_names=manifest.label_names)

    @classmethod
    def from_tag(cls, text: str | None) -> DataSpecKey | None:
        """The key recorded in a `data_spec` tag; None when absent or not a valid key."""
        if text is None:
            return None
        try:
            return cls.model_validate_json(text)
        except ValidationError:
            return None

    def to_tag(self) -> str:
        return json.dumps(self.model_dump(mode="json"), sort_keys=True)

    def differences(self, other: DataSpecKey) -> list[str]:
        """The fields in which `other` differs (label_names covers their number and their names)."""
        return [field for field in type(self).model_fields if getattr(self, field) != getattr(other, field)]

    def describe(self) -> str:
        """E.g. "8x8 grey, 10 labels" or "16x16 RGB, unlabelled"."""
        colour = _CHANNEL_WORDS.get(self.channels, f"{self.channels}-channel")
        labels = f"{len(self.label_names)} labels" if self.label_names else "unlabelled"
        return f"{self.image_size}x{self.image_size} {colour}, {labels}"

    def slug(self) -> str:
        """E.g. "16x16-rgb": a model-name suffix."""
        colour = _CHANNEL_WORDS.get(self.channels, f"{self.channels}ch").lower()
        return f"{self.image_size}x{self.image_size}-{colour}"


def spec_differences(candidate: DataSpecKey | None, champion: DataSpecKey | None) -> list[str]:
    """What differs between two versions' data specs; an unreadable one differs in everything."""
    if candidate is None or champion is None:
        return [UNREADABLE]
    return candidate.differences(champion)


def version_data_spec(client: MlflowClient, version: ModelVersionInfo) -> DataSpecKey | None:
    """A version's data spec: its `data_spec` tag, else its checkpoint's spec.json (versions
    registered before the tag existed); None when neither can be read."""
    recorded = DataSpecKey.from_tag(version.tags.get(DATA_SPEC_TAG))
    if recorded is not None:
        return recorded
    try:
        return DataSpecKey.of(download_spec(client, version.name, version.version).data)
    except (MlflowException, DiffusionPipelineError, OSError, ValueError) as err:
        logger.warning("model %s version %s: data spec unreadable (%s)", version.name, version.version,
                       type(err).__name__)
        return None


def champion_data_spec(model_name: str, tracking_uri: str | None = None) -> DataSpecKey | None:
    """The data spec of `model_name`'s champion; None when the model has no champion (or does not
    exist). RegistryError when there is a champion whose data spec cannot be read."""
    client = client_for(tracking_uri)
    champion = version_by_alias(client, model_name, CHAMPION)
    if champion is None:
        return None
    key = version_data_spec(client, champion)
    if key is None:
        raise RegistryError(f"model {model_name!r}: the data spec of champion version {champion.version} "
                            "cannot be read")
    return key


def require_same_lineage(model_name: str, candidate: DataSpecKey, *, tracking_uri: str | None = None,
                         allow_new_data_spec: bool = False, dataset_uri: str | None = None) -> None:
    """`check_lineage` against the store at `tracking_uri`, for a caller that has no client, e.g.
    a pipeline before training: a registration that would be refused is refused before the
    training it would waste. dataset_uri: the candidate's dataset, for the suggested model name."""
    check_lineage(client_for(tracking_uri), model_name, candidate, allow_new_data_spec,
                  dataset_name(dataset_uri) if dataset_uri else None)


def check_lineage(client: MlflowClient, model_name: str, candidate: DataSpecKey, allow_new_data_spec: bool,
                  dataset_name: str | None = None) -> None:
    """RegistryError when `candidate` differs from the data spec of `model_name`'s champion, unless
    `allow_new_data_spec` (the user named this model for it). No champion: nothing to differ from."""
    if allow_new_data_spec:
        return
    champion = version_by_alias(client, model_name, CHAMPION)
    if champion is None:
        return
    champion_key = version_data_spec(client, champion)
    differing = spec_differences(candidate, champion_key)
    if not differing:
        return
    held = champion_key.describe() if champion_key is not None else "unreadable"
    raise RegistryError(
        f"model_name: model {model_name!r} is a lineage of {held} models (champion version "
        f"{champion.version}); this checkpoint ({candidate.describe()}) differs in "
        f"{', '.join(differing)}, so it is a different model, not a new version of this one",
        hint=f"register it under its own name, e.g. --model-name "
             f"{suggest_model_name(model_name, candidate, dataset_name)}; or name {model_name!r} explicitly "
             "(--model-name) to add this data spec to it: the gate then never compares it with the champion")


def suggest_model_name(model_name: str, candidate: DataSpecKey, dataset_name: str | None = None) -> str:
    """A model name for `candidate` other than `model_name`: `diffusion-<dataset name>` when the
    dataset is known, else `model_name` with the data spec appended."""
    if dataset_name and f"diffusion-{dataset_name}" != model_name:
        return f"diffusion-{dataset_name}"
    return f"{model_name}-{candidate.slug()}"
