"""Where a sweep's trials go on a cluster, given its nodes' resources: how many trials fit
at once, whether they train on GPUs, and how many the sweep runs at a time.

Pure functions of the space and a list of nodes (`{"CPU": 8.0, "GPU": 1.0, ...}` each), so
`--dry-run` (this machine, or a cluster it asks) and the live sweep place trials alike.
"""
from __future__ import annotations

from orchestrate.space import SweepSpec
from psdet.errors import ConfigError


def trials_that_fit(spec: SweepSpec, use_gpu: bool, nodes: list[dict[str, float]], limit: int = 1000) -> int:
    """How many trials can hold their resources at once: each places its driver (none for a
    one-worker trial, which trains in its own process) and its workers' bundles (which may
    spread over nodes) greedily on what is left."""
    r = spec.resources
    free = [dict(node) for node in nodes]
    worker_bundle = {"CPU": r.cpus_per_worker, **({"GPU": r.gpus_per_worker} if use_gpu else {})}
    eps = 1e-9

    def place(bundle: dict[str, float], pool: list[dict[str, float]]) -> bool:
        for node in sorted(pool, key=lambda n: -n.get("CPU", 0)):
            if all(node.get(k, 0) + eps >= v for k, v in bundle.items()):
                for k, v in bundle.items():
                    node[k] = node.get(k, 0) - v
                return True
        return False

    count = 0
    while count < limit:
        trial_pool = [dict(node) for node in free]
        if r.workers > 1 and not place({"CPU": r.driver_cpus}, trial_pool):  # one worker: no separate driver
            break
        if not all(place(worker_bundle, trial_pool) for _ in range(r.workers)):
            break
        free = trial_pool
        count += 1
    return count


def use_gpu(spec: SweepSpec, nodes: list[dict[str, float]]) -> bool:
    """`use_gpu: auto` means GPUs when one trial's worth of them fits on the cluster; when
    the cluster has GPUs but too few, a line says so and the trials train on CPU."""
    if spec.resources.use_gpu != "auto":
        return bool(spec.resources.use_gpu)
    if trials_that_fit(spec, True, nodes) > 0:
        return True
    gpus = sum(node.get("GPU", 0) for node in nodes)
    if gpus:
        r = spec.resources
        print(f"use_gpu auto: a trial needs {r.workers * r.gpus_per_worker:g} GPU(s) and the cluster has {gpus:g}; "
              "training on CPU (lower resources.workers to use them)")
    return False


def concurrency(spec: SweepSpec, nodes: list[dict[str, float]], use_gpu: bool, joined: bool) -> int:
    """Trials at once: max_concurrent, capped to what fits (a waiting trial's workers would
    time out). Not one fitting is an error on a local Ray; a joined cluster may still grow."""
    fit = trials_that_fit(spec, use_gpu, nodes)
    if fit == 0:
        r = spec.resources
        driver = r.driver_cpus if r.workers > 1 else 0
        message = (f"{spec.path}: one trial needs {driver + r.workers * r.cpus_per_worker:g} CPU"
                   + (f" and {r.workers * r.gpus_per_worker:g} GPU" if use_gpu else "")
                   + f" but the cluster's nodes offer {nodes}; lower 'resources.workers' or "
                   "'resources.cpus_per_worker'")
        if not joined:
            raise ConfigError(message)
        print(f"warning: {message} (waiting for the cluster to grow)")
    return min(spec.experiment.max_concurrent, max(fit, 1))
