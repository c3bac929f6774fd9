"""Connecting to Ray, with one rule for who owns the cluster and so must stop it.

    Ray already initialised in this process  -> use it; whoever initialised it stops it
    an address (argument, else RAY_ADDRESS)  -> connect; the cluster is someone else's, so
                                                stopping only disconnects this driver
    no address                               -> start a local Ray owned by this process;
                                                stopping shuts down its Serve apps and Ray

`auto` as the address connects to the latest cluster that `ray start` launched on this machine.

A cluster's dashboard URL (`http://head:8265`) is no address to connect to: work for such a
cluster is submitted as Ray Jobs (`job_submission_url` is the one rule, `ray_jobs` the submitter),
so the process that submits needs no Ray connection at all. `ray://` (Ray Client) still connects,
but Ray advises against it for long work such as Ray Train: the driver then lives outside the
cluster and a dropped connection ends the run.

A local Ray started here counts one logical CPU more than this machine has cores
(`local_cluster_cpus`), so that training workers can run torch on every core
(`local_worker_cpus`) while Ray Data's read tasks, which each need a CPU of their own to be
scheduled, still start. The reads are short and run ahead of the steps, so the one core they share
costs little; without that CPU a worker holding all cores would wait for a read that never starts.

Ownership is decided from the address before `ray.init` runs: Ray has no public way to ask
afterwards whether `ray.init` started the cluster. For the same reason a missing address starts
a cluster explicitly (`address="local"`) instead of leaving the choice to `ray.init()`, which
would silently attach to a `ray start` cluster that this process must then not shut down.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from typing import Any, Literal

import ray

from diffusion_core.errors import ConfigError

logger = logging.getLogger(__name__)

RAY_ADDRESS_ENV = "RAY_ADDRESS"


@dataclass(frozen=True)
class RayConnection:
    """How this process reached Ray: `started` a local cluster it owns, `connected` to an address,
    or `reused` a connection made earlier in the process."""

    how: Literal["started", "connected", "reused"]

    @property
    def started(self) -> bool:
        return self.how == "started"


def machine_cpus() -> int:
    """The cores this process may run on (its CPU affinity, which container limits set)."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def local_cluster_cpus() -> int:
    """Logical CPUs of a Ray started here: the cores plus one for Ray Data's reads (module docstring)."""
    return machine_cpus() + 1


def local_worker_cpus(num_workers: int) -> int:
    """CPUs (and so torch threads) per training worker on a Ray started here: the cores shared
    among the workers, at least one each."""
    return max(1, machine_cpus() // max(1, num_workers))


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to connect to: `address`, else RAY_ADDRESS; None means start a local one."""
    return address or os.environ.get(RAY_ADDRESS_ENV) or None


def job_submission_url(address: str | None = None) -> str | None:
    """The dashboard URL to submit Ray Jobs to when the cluster address (`address`, else
    RAY_ADDRESS) is an `http://` or `https://` URL (a cluster's dashboard, `http://head:8265`);
    None for every other address (None, `auto`, `host:6379`, `ray://...`), which runs work in this
    process's Ray connection."""
    target = cluster_address(address)
    if target is not None and target.lower().startswith(("http://", "https://")):
        return target.rstrip("/")
    return None


def ray_is_reachable(address: str | None = None) -> bool:
    """Whether a Ray is there without starting one: this process is connected, or an address is set."""
    return ray.is_initialized() or cluster_address(address) is not None


def connect_ray(address: str | None = None, log_to_driver: bool = True,
                **start_options: Any) -> RayConnection:
    """Connect to Ray by the module's rule. `log_to_driver`: whether the output of this driver's
    tasks and actors is copied to its stderr. `start_options` (e.g. `num_cpus`,
    `include_dashboard`) are passed to `ray.init` only when this call starts the cluster; `num_cpus`
    defaults to `local_cluster_cpus()`."""
    if ray.is_initialized():
        return RayConnection("reused")
    if job_submission_url(address) is not None:
        raise ConfigError("ray_address: a dashboard URL (http:// or https://) takes Ray Jobs, not a "
                          "driver connection; this step needs the cluster's GCS address "
                          "(host:6379) or none",
                          hint="training submits itself as a Ray Job to a dashboard URL; steps that "
                          "drive Ray in-process need RAY_ADDRESS=host:6379 on a cluster node")
    target = cluster_address(address)
    if target is not None:
        ray.init(address=target, configure_logging=False, log_to_driver=log_to_driver)
        return RayConnection("connected")
    start_options.setdefault("num_cpus", local_cluster_cpus())
    ray.init(address="local", configure_logging=False, log_to_driver=log_to_driver, **start_options)
    return RayConnection("started")


def stop_ray(connection: RayConnection) -> None:
    """Undo `connect_ray`: shut down Serve and Ray when this process started them, disconnect when
    it only connected, nothing when the connection was reused."""
    if connection.how == "reused":
        return
    if connection.started:
        from ray import serve

        try:
            serve.shutdown()  # replicas drain before the processes under them are killed
        finally:
            ray.shutdown()
        return
    ray.shutdown()
