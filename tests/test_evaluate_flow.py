"""The `evaluate_and_register` flow and the CLI on real digits, real MLflow and Prefect's engine.

A briefly trained tiny model must score better than a random-init one, and the gate must act on
that: the bad model first becomes champion (there is none), the trained one replaces it, and the
bad one registered again is rejected.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
from mlflow import MlflowClient
from test_registry_support import make_checkpoint

from diffusion_core.adapters.mlflow_registry import CHAMPION, RegistryConfig
from diffusion_core.data.config import PrepareConfig
from diffusion_core.data.prepare import prepare
from diffusion_core.metrics import EvalConfig, evaluate_samples, feature_extractor_for, reference_from_dataset
from flows.cli import main
from flows.evaluate import evaluate_and_register

logger = logging.getLogger(__name__)
pytestmark = pytest.mark.slow

EVAL = dict(num_samples=200, steps=8, sampler="ddim", seed=0)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = str(tmp_path_factory.mktemp("data") / "digits")
    prepare(PrepareConfig(source="digits", output=out, val_fraction=0.2))
    return out


@pytest.fixture(scope="module")
def feature_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("features")


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("models")
    return {"random init": make_checkpoint(root / "random", train_steps=0),
            "barely trained": make_checkpoint(root / "barely", train_steps=20),
            "trained": make_checkpoint(root / "trained", train_steps=120)}


def test_flow_evaluates_registers_and_gates(prefect_harness, mlflow_store, dataset, models, feature_cache,
                                            tmp_path) -> None:
    eval_config = EvalConfig(**EVAL, cache_dir=feature_cache)
    registry = RegistryConfig(tracking_uri=mlflow_store.tracking_uri, model_name="digits", lock_dir=tmp_path)
    run = lambda name: evaluate_and_register(models[name], dataset, eval_config, registry)  # noqa: E731
    bad, barely, good = run("random init"), run("barely trained"), run("trained")
    for name, outcome in (("random init", bad), ("barely trained", barely), ("trained", good)):
        e = outcome.evaluation
        logger.warning("flow %-15s fd=%8.2f precision=%.3f recall=%.3f entropy=%.3f label_acc=%.3f -> %s",
                       name, e.fd, e.precision, e.recall, e.class_entropy, e.label_accuracy,
                       outcome.decision.action)
    assert bad.decision.action == "promoted" and bad.decision.reason == "no champion yet"
    assert good.evaluation.fd < 0.75 * bad.evaluation.fd
    reference = reference_from_dataset(dataset)  # real images vs the same validation split
    real = evaluate_samples(reference.train_images[:200], reference.val_images,
                            feature_extractor_for(reference, eval_config))
    logger.warning("flow real training images fd=%8.2f", real["fd"])
    assert barely.evaluation.fd > 5 * real["fd"] and bad.evaluation.fd > 5 * real["fd"]
    assert good.evaluation.label_accuracy > bad.evaluation.label_accuracy
    assert good.decision.action == "promoted"
    again = evaluate_and_register(models["random init"], dataset, eval_config, registry)
    assert again.decision.action == "rejected" and again.evaluation.fd == bad.evaluation.fd  # deterministic
    client = MlflowClient(mlflow_store.tracking_uri)
    assert str(client.get_model_version_by_alias("digits", CHAMPION).version) == good.version.version
    artifacts = [a.path for a in client.list_artifacts(good.version.run_id, "feature_classifier")]
    assert sorted(Path(a).name for a in artifacts) == ["meta.json", "weights.safetensors"]
    assert good.version.tags["eval_key"] == bad.version.tags["eval_key"]


def test_cli_evaluate_register_promote_rollback(mlflow_store, dataset, models, feature_cache, tmp_path,
                                                capsys) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"evaluate: {{num_samples: 100, steps: 4, sampler: ddim, cache_dir: '{feature_cache}'}}\n"
        f"registry: {{model_name: cli-digits, lock_dir: '{tmp_path}'}}\n")
    result = tmp_path / "eval.json"
    main(["--config", str(config), "evaluate", str(models["trained"]), dataset, "--output", str(result)])
    numbers = json.loads(result.read_text())
    assert numbers["fd"] > 0 and 0 <= numbers["precision"] <= 1 and numbers["inception_fid"] is None
    for name in ("random init", "trained"):
        main(["--config", str(config), "register", str(models[name])])  # MLFLOW_TRACKING_URI from fixture
    main(["--config", str(config), "promote", "1", "--force"])
    main(["--config", str(config), "promote", "2", "--force"])
    main(["--config", str(config), "rollback"])
    out = capsys.readouterr().out
    assert "forced" in out and "rolled_back" in out
    champion = MlflowClient(mlflow_store.tracking_uri).get_model_version_by_alias("cli-digits", CHAMPION)
    assert str(champion.version) == "1"
