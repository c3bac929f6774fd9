"""The rehearsal's services, real and on loopback: PostgreSQL, S3 (moto), MLflow server, Prefect server
and worker, a two-node Ray cluster with token auth (infra/rehearsal.py, the same stack as
infra/rehearse.sh).

One stack per test session, started on first use: `rehearsal` is the whole stack, the other
fixtures its typed handles (URLs, credentials, `client_env()`). Teardown stops every service and
fails if any of their processes survives.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from pathlib import Path

import pytest

from infra.rehearsal import (
    MlflowHandle,
    PostgresHandle,
    PrefectHandle,
    PrefectWorkerHandle,
    RayHandle,
    Rehearsal,
    S3Handle,
)

logger = logging.getLogger(__name__)
REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def rehearsal() -> Iterator[Rehearsal]:
    stack = Rehearsal(worker_cwd=REPO)
    stack.start()
    logger.info("rehearsal stack up in %.1f s; per service: %s", stack.startup_s, stack.startup_times())
    try:
        yield stack
    finally:
        stack.stop()
        assert stack.survivors() == [], "processes of the rehearsal outlived it"


@pytest.fixture(scope="session")
def rehearsal_env(rehearsal: Rehearsal) -> dict[str, str]:
    """What a pipeline process adds to its environment: MLflow, S3, Ray and Prefect clients."""
    return rehearsal.client_env()


@pytest.fixture(scope="session")
def rehearsal_postgres(rehearsal: Rehearsal) -> PostgresHandle:
    return rehearsal.postgres


@pytest.fixture(scope="session")
def rehearsal_s3(rehearsal: Rehearsal) -> S3Handle:
    return rehearsal.s3


@pytest.fixture(scope="session")
def rehearsal_mlflow(rehearsal: Rehearsal) -> MlflowHandle:
    return rehearsal.mlflow


@pytest.fixture(scope="session")
def rehearsal_prefect(rehearsal: Rehearsal) -> PrefectHandle:
    return rehearsal.prefect


@pytest.fixture(scope="session")
def rehearsal_prefect_worker(rehearsal: Rehearsal) -> PrefectWorkerHandle:
    return rehearsal.worker


@pytest.fixture(scope="session")
def rehearsal_ray(rehearsal: Rehearsal) -> RayHandle:
    return rehearsal.ray
