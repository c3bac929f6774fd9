"""connect_ray: one rule for who owns the cluster, checked against real Ray clusters."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from diffusion_core.adapters.ray_cluster import (
    RAY_ADDRESS_ENV,
    connect_ray,
    machine_cpus,
    ray_is_reachable,
    stop_ray,
)

pytestmark = pytest.mark.slow


@pytest.fixture()
def no_ray(_ray_session: None, monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """No Ray connection in this process and no RAY_ADDRESS; the session Ray (if any) is replaced."""
    import ray

    if ray.is_initialized():
        from ray import serve

        serve.shutdown()
        ray.shutdown()
    monkeypatch.delenv(RAY_ADDRESS_ENV, raising=False)
    yield
    if ray.is_initialized():
        ray.shutdown()


def test_without_an_address_this_process_starts_and_stops_its_own_ray(no_ray: None) -> None:
    import ray

    assert not ray_is_reachable()
    connection = connect_ray(num_cpus=1, include_dashboard=False)
    assert connection.started and ray.is_initialized()
    assert ray.cluster_resources()["CPU"] == 1  # the start options reached ray.init
    again = connect_ray()
    assert again.how == "reused" and not again.started
    stop_ray(again)  # the owner stops it, not a later user
    assert ray.is_initialized()
    stop_ray(connection)
    assert not ray.is_initialized()


def test_a_local_ray_has_a_cpu_beyond_the_cores_for_ray_data_reads(no_ray: None) -> None:
    """A worker may hold every core (pipeline_config.train_defaults_for) while a read task starts."""
    import ray

    connection = connect_ray(include_dashboard=False)
    try:
        assert ray.cluster_resources()["CPU"] == machine_cpus() + 1
    finally:
        stop_ray(connection)


def test_with_an_address_the_cluster_is_someone_elses(no_ray: None, monkeypatch: pytest.MonkeyPatch) -> None:
    import ray
    from ray.cluster_utils import Cluster

    cluster = Cluster(initialize_head=True, head_node_args={"num_cpus": 1, "include_dashboard": False})
    try:
        monkeypatch.setenv(RAY_ADDRESS_ENV, cluster.address)
        assert ray_is_reachable()
        connection = connect_ray(num_cpus=3)  # start options are ignored: nothing is started
        assert connection.how == "connected" and not connection.started
        assert ray.cluster_resources()["CPU"] == 1
        stop_ray(connection)
        assert not ray.is_initialized()
        ray.init(address=cluster.address)  # the cluster outlived the disconnect
        assert ray.cluster_resources()["CPU"] == 1
        ray.shutdown()
    finally:
        cluster.shutdown()
