"""The driver's Ray: join a cluster or start a local one, and ask it what the sweep needs
(the live nodes' resources; whether every node sees a local `--storage` path).

Importing this module imports Ray: call `orchestrate.ray_env.prepare` first.
"""
from __future__ import annotations

import os
from pathlib import Path

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from orchestrate import storage
from orchestrate.ray_env import free_port
from psdet.errors import UserError


def connect(address: str | None) -> str:
    """Join `address` or start a local Ray on loopback; returns a one-line description.

    Worker output stays in the trial directories (train.log) and Ray's session logs:
    the console gets one line per trial event instead of every worker's log. RAY_TRAIN_*
    variables set for this command (e.g. RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S) reach
    the trials, whose trainers read them; Train state tracking is on unless one says
    otherwise. A submitted job's runtime env is the job's own: pass it there.
    """
    # Train state tracking on by default, so the dashboard's Train page lists each trial's runs
    # and workers (Ray 2.60 leaves it off); RAY_TRAIN_ENABLE_STATE_TRACKING=0 turns it off.
    env_vars = {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1",
                **{key: value for key, value in os.environ.items() if key.startswith("RAY_TRAIN_")}}
    if address:
        if "RAY_JOB_CONFIG_JSON_ENV_VAR" in os.environ or "://" in address or address == "auto":
            runtime_env = None  # a submitted job (or Ray Client) already has its runtime env
        else:
            # The State API (Train V2 uses it to clean up after a dead controller) must
            # find this cluster even when several Ray instances run on the machine.
            runtime_env = {"env_vars": {**env_vars, "RAY_ADDRESS": address}}
        ray.init(address=address, runtime_env=runtime_env, log_to_driver=False)
        return f"joined the Ray cluster at {address}"
    port = free_port()
    dashboard = f"http://127.0.0.1:{port}"
    # address="local": always a new instance, never one that `ray start` left on this machine.
    ray.init(address="local", include_dashboard=True, dashboard_host="127.0.0.1", dashboard_port=port,
             runtime_env={"env_vars": {**env_vars, "RAY_API_SERVER_ADDRESS": dashboard}}, log_to_driver=False)
    return f"started a local Ray on 127.0.0.1 (dashboard {dashboard})"


def alive_nodes() -> list[dict[str, float]]:
    """The resources (CPU, GPU, ...) of every live node of the connected cluster."""
    return [dict(node["Resources"]) for node in ray.nodes() if node.get("Alive")]


@ray.remote(num_cpus=0)
def _sees(path: str) -> bool:
    return os.path.exists(path)


def check_shared(experiment: str) -> None:
    """A local --storage path on a cluster of several nodes must be one they all see (NFS):
    each node looks for a marker the driver writes there."""
    nodes = [node for node in ray.nodes() if node.get("Alive")]
    if storage.is_remote(experiment) or len(nodes) < 2:
        return
    marker = Path(experiment, f".shared-check-{os.getpid()}")
    marker.parent.mkdir(parents=True, exist_ok=True)
    marker.touch()
    try:
        checks = [_sees.options(scheduling_strategy=NodeAffinitySchedulingStrategy(node["NodeID"], soft=False))
                  .remote(str(marker)) for node in nodes]
        blind = [node["NodeManagerAddress"] for node, ok in zip(nodes, ray.get(checks, timeout=120)) if not ok]
    finally:
        marker.unlink()
    if blind:
        raise UserError(f"--storage {experiment} is a local path that node(s) {', '.join(blind)} of this "
                        f"{len(nodes)}-node cluster cannot see; use a shared mount or s3://, gs://")
