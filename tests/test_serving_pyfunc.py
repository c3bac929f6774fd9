"""The registered MLflow pyfunc samples the way the HTTP API does: without labels each image's class
is drawn from the class prior by its seed, -1 asks for the null label, and the label rule is
`sampling_defaults.check_labels`. A one-hot class prior makes the drawn classes known in advance."""

from __future__ import annotations

import numpy as np
import pytest

from diffusion_core.checkpoint import load_checkpoint

STEPS = 2
PARAMS = {"steps": STEPS, "sampler": "ddim"}


@pytest.fixture(scope="module")
def registered(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """One conditional model (all prior mass on class 4) and one unconditional model, registered and
    loaded back as pyfuncs."""
    import mlflow
    from test_serving import make_checkpoint

    from diffusion_core.adapters.mlflow_registry import log_and_register

    root = tmp_path_factory.mktemp("pyfunc")
    uri = f"sqlite:///{root / 'mlflow.db'}"
    prior = [0.0] * 10
    prior[4] = 1.0
    models = {}
    for name, classes, class_prior in (("conditional", 10, prior), ("unconditional", None, None)):
        checkpoint = make_checkpoint(root / name / "checkpoint", num_classes=classes, seed=5,
                                     class_prior=class_prior)
        version = log_and_register(checkpoint, model_name=f"pyfunc-{name}", tracking_uri=uri, lock_dir=root)
        mlflow.set_tracking_uri(uri)
        try:
            models[name] = (mlflow.pyfunc.load_model(version.model_uri), load_checkpoint(checkpoint))
        finally:
            mlflow.set_tracking_uri(None)
    return models


@pytest.mark.slow
def test_without_labels_each_image_takes_the_class_drawn_from_the_prior(registered: dict):
    from diffusion_core.adapters.mlflow_registry import generation_frame

    pyfunc, model = registered["conditional"]
    frame = generation_frame(3, seed=8)
    assert "label" not in frame
    images = pyfunc.predict(frame, params=PARAMS)
    direct = model.generate(3, steps=STEPS, sampler="ddim", seeds=[8, 9, 10], labels=[4, 4, 4]).numpy()
    np.testing.assert_allclose(images, direct, atol=1e-4)


@pytest.mark.slow
def test_minus_one_asks_for_the_null_label(registered: dict):
    from diffusion_core.adapters.mlflow_registry import generation_frame

    pyfunc, model = registered["conditional"]
    images = pyfunc.predict(generation_frame(2, seed=8, labels=[-1, 2]), params=PARAMS)
    direct = model.generate(2, steps=STEPS, sampler="ddim", seeds=[8, 9], labels=[-1, 2]).numpy()
    null = model.generate(1, steps=STEPS, sampler="ddim", seeds=[8], unconditional=True).numpy()
    np.testing.assert_allclose(images, direct, atol=1e-4)
    np.testing.assert_allclose(images[:1], null, atol=1e-4)


@pytest.mark.slow
@pytest.mark.parametrize(("name", "labels", "rule"), [
    ("conditional", [10], "labels: each must be a class of this model; accepted: integers 0..9"),
    ("unconditional", [-1], "labels: this model is unconditional"),
])
def test_labels_follow_the_serving_rule(registered: dict, name: str, labels: list[int], rule: str):
    from diffusion_core.adapters.mlflow_registry import generation_frame

    pyfunc, _ = registered[name]
    with pytest.raises(Exception, match=rule):  # MLflow may wrap the ConfigError
        pyfunc.predict(generation_frame(1, labels=labels), params=PARAMS)


@pytest.mark.slow
def test_an_unconditional_model_samples_without_labels(registered: dict):
    from diffusion_core.adapters.mlflow_registry import generation_frame

    pyfunc, model = registered["unconditional"]
    images = pyfunc.predict(generation_frame(2, seed=3), params=PARAMS)
    np.testing.assert_allclose(images, model.generate(2, steps=STEPS, sampler="ddim", seeds=[3, 4]).numpy(),
                               atol=1e-4)

