"""Shared test setup. Everything stays on loopback: this runs before any test imports Ray,
so every Ray a test starts (and every subprocess it runs) uses 127.0.0.1 as its node
address, and dashboards bind to 127.0.0.1."""
from __future__ import annotations

import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from orchestrate.ray_env import free_port  # imports nothing of Ray

os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
os.environ.setdefault("PYTHONUNBUFFERED", "1")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Two test processes share two cores (make test): torch's OpenMP threads, two per process
    # and the psdet subprocesses they start, would spin waiting on each other (measured 0.5
    # against 23.7 images/s on a loaded VM). One thread each, set before torch is imported.
    os.environ.setdefault("OMP_NUM_THREADS", "1")

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ray_cluster():
    """One local Ray per test module (2 logical CPUs, dashboard on 127.0.0.1), always shut
    down. Yields `address` (GCS host:port, for `--address` / `ray.init(address=...)`) and
    `dashboard` (http URL). Subprocesses join it with `--address`."""
    import ray

    port = free_port()
    dashboard = f"http://127.0.0.1:{port}"
    context = ray.init(
        address="local", num_cpus=2, include_dashboard=True, dashboard_host="127.0.0.1",
        dashboard_port=port, object_store_memory=256 * 1024**2, log_to_driver=False,
        # The State API inside the cluster must find this instance even if other Ray
        # instances run on the machine.
        runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": dashboard}},
    )
    try:
        yield SimpleNamespace(address=context.address_info["gcs_address"], dashboard=dashboard)
    finally:
        ray.shutdown()


# The slow tier, slowest first: the Ray sweeps and clusters, the benchmark smoke runs, the
# learning test, the report's browser and client tests. Its tests are marked `slow` (`make
# test-fast` runs -m "not slow"), and under pytest-xdist's --dist loadfile they are one unit of
# work (pytest_xdist_make_scheduler below): in `make test` (-n 2) one process runs them one
# module after another, each module with its own Ray, while the other runs the fast tier.
SLOW_MODULES = ["test_cluster.py", "test_sweep.py", "test_chaos.py", "test_benchmarks_on_ray.py", "test_benchmarks.py",
                "test_learning.py", "test_report.py", "test_search_quality_replay.py", "test_search_quality.py",
                "test_sweep_objectives.py"]
# Then the slowest of the fast tier, so that its other modules fill the gaps at the end.
SLOWEST_FIRST = [*SLOW_MODULES, "test_engine_processes.py", "test_fuzz.py", "test_engine.py"]


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: the slow tier (tests/conftest.py SLOW_MODULES), left out of make test-fast")


@pytest.hookimpl(optionalhook=True)  # a hook of pytest-xdist's: no error where it is not installed
def pytest_xdist_make_scheduler(config, log):
    """--dist loadfile, with the whole slow tier as one file. (xdist's own --dist loadgroup
    does not group under pytest 9: it renames `item._nodeid`, which pytest 9 no longer reads.)"""
    if config.getoption("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class SlowTierInOneProcess(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            module = nodeid.split("::", 1)[0]
            return "the slow tier" if Path(module).name in SLOW_MODULES else module

    return SlowTierInOneProcess(config, log)


def pytest_collection_modifyitems(session, config, items):
    for item in items:
        if item.path.name in SLOW_MODULES:
            item.add_marker(pytest.mark.slow)
    rank = {name: index for index, name in enumerate(SLOWEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: order within a module kept
