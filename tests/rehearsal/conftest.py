"""The rehearsal's services, real and on loopback: PostgreSQL, S3 (moto), MLflow server, Prefect server
and worker, a two-node Ray cluster with token auth (infra/rehearsal.py, the same stack as
infra/rehearse.sh).

One stack per test session, started on first use: `rehearsal` is the whole stack, the other
fixtures its typed handles (URLs, credentials, `client_env()`). Teardown stops every service and
fails if any of their processes survives.

`rehearsal_timeline` records how long each step of a scenario took: logged as it goes, written as
JSON under the test's tmp dir, and shown as a table in pytest's terminal summary (with or without
`-s`).
"""

from __future__ import annotations

import contextlib
import json
import logging
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from diffusion_core.atomic_io import atomic_write_text
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


class Timeline:
    """The steps of a scenario with their wall-clock seconds, rewritten to `path` after each one."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.steps: list[dict[str, Any]] = []

    @contextlib.contextmanager
    def step(self, name: str) -> Iterator[dict[str, Any]]:
        """Time the block; what it puts in the yielded dict is recorded beside the time. A step that
        raises is recorded as failed, and the error goes on."""
        detail: dict[str, Any] = {}
        logger.info("step %d: %s", len(self.steps) + 1, name)
        started = time.monotonic()
        try:
            yield detail
        except BaseException:
            self._record(name, started, {**detail, "failed": True})
            raise
        self._record(name, started, detail)

    def add(self, name: str, seconds: float, **detail: Any) -> None:
        """A step timed elsewhere (e.g. the shared stack's start-up)."""
        self.steps.append({"step": name, "seconds": round(seconds, 1), **detail})
        self._write()

    def _record(self, name: str, started: float, detail: dict[str, Any]) -> None:
        self.add(name, time.monotonic() - started, **detail)
        logger.info("step %d: %s took %.1f s", len(self.steps), name, self.steps[-1]["seconds"])

    def _write(self) -> None:
        atomic_write_text(self.path, json.dumps({"steps": self.steps}, indent=2) + "\n")

    def table(self) -> list[str]:
        width = max(len(s["step"]) for s in self.steps)
        lines = [f"{'step':<{width}}  seconds"]
        for s in self.steps:
            lines.append(f"{s['step']:<{width}}  {s['seconds']:>7.1f}{'  FAILED' if s.get('failed') else ''}")
        return [*lines, f"{'total':<{width}}  {sum(s['seconds'] for s in self.steps):>7.1f}"]


TIMELINES = pytest.StashKey[dict[str, Timeline]]()


@pytest.fixture()
def rehearsal_timeline(request: pytest.FixtureRequest, tmp_path: Path) -> Timeline:
    timeline = Timeline(tmp_path / "rehearsal_steps.json")
    request.config.stash.setdefault(TIMELINES, {})[request.node.nodeid] = timeline
    return timeline


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    for nodeid, timeline in config.stash.get(TIMELINES, {}).items():
        if not timeline.steps:
            continue
        terminalreporter.write_sep("-", f"rehearsal steps: {nodeid}")
        for line in timeline.table():
            terminalreporter.write_line(line)
        terminalreporter.write_line(f"(JSON: {timeline.path})")


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
