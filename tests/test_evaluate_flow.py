"""The `evaluate_and_register` flow and the CLI on real digits, real MLflow and Prefect's engine.

A briefly trained tiny model must score better than a random-init one, and the gate must act on
that: the bad models fall below the quality floor even with no champion to beat, the trained one
becomes champion, and the bad one registered again is rejected.
"""

from __future__ import annotations

import json
import logging
import tempfile
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
    # The tiny test models reach precision 0.26 at best (random init and 20 steps: 0.0): a floor
    # between them.
    registry = RegistryConfig(tracking_uri=mlflow_store.tracking_uri, model_name="digits", lock_dir=tmp_path,
                              min_precision=0.15)
    run = lambda name: evaluate_and_register(models[name], dataset, eval_config, registry)  # noqa: E731
    bad, barely, good = run("random init"), run("barely trained"), run("trained")
    for name, outcome in (("random init", bad), ("barely trained", barely), ("trained", good)):
        e = outcome.evaluation
        logger.warning("flow %-15s fd=%8.2f precision=%.3f recall=%.3f entropy=%.3f label_acc=%.3f -> %s",
                       name, e.fd, e.precision, e.recall, e.class_entropy, e.label_accuracy,
                       outcome.decision.action)
    assert bad.decision.action == "rejected" and "quality floor" in bad.decision.reason
    assert barely.decision.action == "rejected" and "quality floor" in barely.decision.reason
    assert good.evaluation.fd < 0.75 * bad.evaluation.fd
    reference = reference_from_dataset(dataset)  # real images vs the same validation split
    real = evaluate_samples(reference.train_images[:200], reference.val_images,
                            feature_extractor_for(reference, eval_config))
    logger.warning("flow real training images fd=%8.2f", real["fd"])
    assert barely.evaluation.fd > 5 * real["fd"] and bad.evaluation.fd > 5 * real["fd"]
    assert good.evaluation.label_accuracy > bad.evaluation.label_accuracy
    assert good.decision.action == "promoted" and good.decision.reason == "no champion yet"
    again = evaluate_and_register(models["random init"], dataset, eval_config, registry)
    assert again.decision.action == "rejected" and again.evaluation.fd == bad.evaluation.fd  # deterministic
    client = MlflowClient(mlflow_store.tracking_uri)
    assert str(client.get_model_version_by_alias("digits", CHAMPION).version) == good.version.version
    artifacts = [a.path for a in client.list_artifacts(good.version.run_id, "feature_classifier")]
    assert sorted(Path(a).name for a in artifacts) == ["meta.json", "weights.safetensors"]
    assert good.version.tags["eval_key"] == bad.version.tags["eval_key"]


def cli(*args: str) -> int:
    """Run the console script in-process; its exit code (0 when it returns without exiting)."""
    try:
        main(list(args))
    except SystemExit as stop:
        return int(stop.code or 0)
    return 0


def test_cli_evaluate_register_promote_rollback(mlflow_store, dataset, models, feature_cache, tmp_path,
                                                capsys, monkeypatch) -> None:
    config = tmp_path / "config.yaml"
    config.write_text(
        f"evaluate: {{num_samples: 100, steps: 4, sampler: ddim, cache_dir: '{feature_cache}'}}\n"
        f"registry: {{model_name: cli-digits, lock_dir: '{tmp_path}'}}\n")
    run = lambda *args: cli("--config", str(config), *args)  # noqa: E731
    for name in ("random init", "trained"):
        assert run("register", str(models[name])) == 0  # MLFLOW_TRACKING_URI from the fixture
    downloads = tmp_path / "tmp"  # where the evaluate command downloads registry models
    downloads.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(downloads))
    result = tmp_path / "eval.json"
    assert run("evaluate", "models:/cli-digits/2", dataset, "--output", str(result)) == 0
    assert list(downloads.iterdir()) == []  # the downloaded checkpoint is deleted after loading
    assert run("evaluate", str(models["trained"]), str(tmp_path / "no-dataset")) == 2  # fails after loading
    assert (models["trained"] / "spec.json").is_file()  # a local checkpoint is the user's: never deleted
    numbers = json.loads(result.read_text())
    assert numbers["fd"] > 0 and 0 <= numbers["precision"] <= 1 and numbers["inception_fid"] is None
    assert run("promote", "1", "--force") == 0
    assert run("promote", "2", "--force") == 0
    assert run("rollback") == 0
    out = capsys.readouterr().out
    assert "forced" in out and "rolled_back" in out
    client = MlflowClient(mlflow_store.tracking_uri)
    assert str(client.get_model_version_by_alias("cli-digits", CHAMPION).version) == "1"
    for version, fd in (("1", "10.0"), ("2", "50.0")):  # comparable numbers: version 2 is worse
        tags = {"eval_fd": fd, "eval_key": "same-settings", "eval_precision": "0.9", "eval_recall": "0.9",
                "eval_copy_share": "0.1", "eval_feature_kind": "trained_classifier",
                "eval_feature_p_value": "0"}
        for key, value in tags.items():
            client.set_model_version_tag("cli-digits", version, key, value)
    assert run("promote", "2") == 1  # the gate rejects: the documented exit code
    assert "rejected" in capsys.readouterr().out
