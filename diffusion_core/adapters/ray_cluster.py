"""Connecting to Ray, with one rule for who owns the cluster and so must stop it.

    Ray already initialised in this process  -> use it; whoever initialised it stops it
    an address (argument, else RAY_ADDRESS)  -> connect; the cluster is someone else's, so
                                                stopping only disconnects this driver
    no address                               -> start a local Ray owned by this process;
                                                stopping shuts down its Serve apps and Ray

`auto` as the address connects to the latest cluster that `ray start` launched on this machine.

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


def cluster_address(address: str | None = None) -> str | None:
    """The cluster to connect to: `address`, else RAY_ADDRESS; None means start a local one."""
    return address or os.environ.get(RAY_ADDRESS_ENV) or None


def ray_is_reachable(address: str | None = None) -> bool:
    """Whether a Ray is there without starting one: this process is connected, or an address is set."""
    return ray.is_initialized() or cluster_address(address) is not None


def connect_ray(address: str | None = None, log_to_driver: bool = True,
                **start_options: Any) -> RayConnection:
    """Connect to Ray by the module's rule. `log_to_driver`: whether the output of this driver's
    tasks and actors is copied to its stderr. `start_options` (e.g. `num_cpus`,
    `include_dashboard`) are passed to `ray.init` only when this call starts the cluster."""
    if ray.is_initialized():
        return RayConnection("reused")
    target = cluster_address(address)
    if target is not None:
        ray.init(address=target, configure_logging=False, log_to_driver=log_to_driver)
        return RayConnection("connected")
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
