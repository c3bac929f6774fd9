"""A registered version's description: one line saying what the model is and how it was gated.

    8x8 grey class-conditional UNet (1.1M params) trained on digits@3f2a1b4c5d6e, FD 13.8
    (precision 0.91, recall 0.92, copy share 0.09) on digits-val, label accuracy 0.97, null label
    FD 21.4, guidance 2 FD 15.0; promoted over v1 (FD 14.6)

The FD and its parenthesis are the headline (requests without labels, what the gate compares);
the numbers after it are the evaluation's side passes (metrics.EvalResult), each only when recorded.

The first half (`model_summary`) is written at registration and kept as the version's
`model_summary` tag; the second half starts as "candidate, not gated yet" and is rewritten by every
gate decision and rollback (`gate_outcome`). MLflow shows the description on the model version page.
"""

from __future__ import annotations

import contextlib
from collections.abc import Mapping
from typing import TYPE_CHECKING

from mlflow import MlflowClient

from diffusion_core.adapters.mlflow_registry.config import SUMMARY_TAG
from diffusion_core.adapters.mlflow_registry.lineage import DataSpecKey
from diffusion_core.adapters.mlflow_store import with_retries
from diffusion_core.checkpoint import ModelSpec

if TYPE_CHECKING:
    from diffusion_core.adapters.mlflow_registry.promotion import PromotionDecision

NOT_GATED = "candidate, not gated yet"


def parameter_count(spec: ModelSpec) -> int:
    """The UNet's parameter count, from its config alone (built on the meta device: no memory)."""
    import torch

    from diffusion_core.unet import UNet

    with torch.device("meta"):
        return sum(p.numel() for p in UNet(spec.unet).parameters())


def model_summary(spec: ModelSpec, metrics: Mapping[str, float] | None = None,
                  dataset_name: str | None = None, evaluation_name: str | None = None,
                  guided_scale: str | None = None) -> str:
    """What the model is and how it scored (the module docstring's first half); guided_scale: the
    guidance scale of the eval_guided_* metrics (the version's eval_guided_scale tag)."""
    key = DataSpecKey.of(spec.data)
    kind = "class-conditional" if spec.unet.num_classes else "unconditional"
    shape = key.describe().split(",")[0]
    fingerprint = (spec.data.dataset_fingerprint or "unknown")[:12]
    text = (f"{shape} {kind} UNet ({_count(parameter_count(spec))} params) trained on "
            f"{dataset_name or 'dataset'}@{fingerprint}")
    return text + _scores(metrics or {}, evaluation_name, guided_scale)


def gate_outcome(decision: PromotionDecision) -> str:
    """How the gate (or a forced promotion) treated the candidate, in a few words."""
    before = decision.previous_champion_version
    champion_fd = f" (FD {decision.champion_fd:.4g})" if decision.champion_fd is not None else ""
    if decision.action == "promoted":
        return f"promoted over v{before}{champion_fd}" if before else "promoted: first champion"
    if decision.action == "forced":
        return f"made champion by --force over v{before}" if before else "made champion by --force"
    if decision.action == "rejected":
        stays = f"; champion stays v{before}" if before else ""
        return f"not promoted: {decision.reason}{stays}"
    return decision.action


def version_description(summary: str, outcome: str) -> str:
    return f"{summary}; {outcome}" if summary else outcome


def describe_version(client: MlflowClient, name: str, version: str, tags: Mapping[str, str],
                     outcome: str) -> None:
    """Set the description of `version` to its summary (the `model_summary` tag) and `outcome`."""
    text = version_description(tags.get(SUMMARY_TAG, ""), outcome)
    with_retries(lambda: client.update_model_version(name, version, description=text), "description")


def _count(n: int) -> str:
    if n >= 1_000_000:
        return f"{n / 1e6:.1f}M"
    return f"{n / 1e3:.0f}k" if n >= 1000 else str(n)


def _scores(metrics: Mapping[str, float], evaluation_name: str | None, guided_scale: str | None) -> str:
    if "eval_fd" not in metrics:
        return ", not evaluated"
    shares = [f"{name.replace('_', ' ')} {metrics[f'eval_{name}']:.2f}"
              for name in ("precision", "recall", "copy_share") if f"eval_{name}" in metrics]
    text = f", FD {metrics['eval_fd']:.3g}" + (f" ({', '.join(shares)})" if shares else "")
    text += f" on {evaluation_name}" if evaluation_name else ""
    guided = "guided"
    with contextlib.suppress(ValueError):  # a hand-edited tag: the numbers still say what they are
        guided = f"guidance {float(guided_scale):g}" if guided_scale else guided
    beside = {"eval_label_accuracy": ("label accuracy", ".2f"), "eval_null_fd": ("null label FD", ".3g"),
              "eval_guided_fd": (f"{guided} FD", ".3g")}
    return text + "".join(f", {name} {metrics[key]:{spec}}" for key, (name, spec) in beside.items()
                          if key in metrics)
