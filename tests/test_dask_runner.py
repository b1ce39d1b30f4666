"""The app's cluster runner keeps its connection: a Dask client that gave up reconnecting is
replaced, and a client that reconnected by itself is subscribed again (an in-process
``LocalCluster``; the real processes are drilled in ``test_app_cluster``)."""

from __future__ import annotations

import pytest

pytest.importorskip("distributed")
from conftest import wait_until  # noqa: E402
from distributed import LocalCluster  # noqa: E402

from app_support.cluster import DaskRunner  # noqa: E402


@pytest.fixture
def cluster():
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as c:
        yield c


def test_a_lost_client_is_replaced_and_capacity_comes_back(cluster) -> None:
    runner = DaskRunner(cluster.scheduler_address, check_s=0.2)
    runner.start()
    try:
        wait_until(lambda: runner.capacity() == 1, 60, 0.2, "the worker usable")
        first = runner.client
        first.close()  # what Dask does after failing to reconnect for its timeout
        wait_until(lambda: runner.client is not None and runner.client is not first
                   and runner.capacity() == 1, 60, 0.2, "a new client")
        assert runner.starts == 2 and runner.health()["error"] is None
        second = runner.client
        runner._comm = None  # as after Dask's own reconnection: a new scheduler connection
        wait_until(lambda: runner._comm is second.scheduler_comm, 30, 0.2, "subscribed again")
        assert runner.client is second and runner.starts == 2  # the same client kept
    finally:
        runner.stop()
