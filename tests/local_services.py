"""Helpers for tests that start local services: free loopback ports (infra.local_cluster's), waiting
for HTTP, stopping process groups. A plain module, not conftest: `from local_services import ...`
is ambiguous once a subfolder has its own conftest.py, and pytest may resolve it to that one."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

from infra.local_cluster import free_port

# Logical CPUs for the session Ray: more than the 2 physical cores so that two 1-CPU training
# workers and Serve replicas can coexist; the tests are sized so that this does not oversubscribe.
RAY_TEST_CPUS = 4


def wait_http(url: str, proc: subprocess.Popen, timeout: float, log_path: Path) -> None:
    """Wait until `url` answers 200; fail early with the log's tail if `proc` exits."""
    import httpx

    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"server exited early: {log_path.read_text()[-2000:]}")
        try:
            if httpx.get(url, timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.5)
    raise TimeoutError(f"{url} not up after {timeout}s: {log_path.read_text()[-2000:]}")


def terminate(proc: subprocess.Popen) -> None:
    """Stop a process started with start_new_session=True, and its children."""
    if proc.poll() is None:
        try:
            os.killpg(proc.pid, signal.SIGTERM)
            proc.wait(timeout=20)
        except (ProcessLookupError, subprocess.TimeoutExpired):
            os.killpg(proc.pid, signal.SIGKILL)


def init_session_ray() -> None:
    """Start the session's local Ray unless one is connected: RAY_TEST_CPUS logical CPUs, and its
    dashboard on a free loopback port (Serve apps are deployed and switched through the Serve REST
    API there, and the test Ray must never answer at the default 8265 of someone else's)."""
    import ray

    if not ray.is_initialized():
        ray.init(num_cpus=RAY_TEST_CPUS, include_dashboard=True, dashboard_host="127.0.0.1",
                 dashboard_port=free_port(), log_to_driver=True, configure_logging=False)
