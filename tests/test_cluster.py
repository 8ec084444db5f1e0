"""The sweep on real Ray clusters made by cluster/local.sh, every process on 127.0.0.1 and
token auth on.

On a head node alone (`ray start --head`, dashboard on):
- job submission: `ray job submit --working-dir . -- python orchestrate/tune.py --space
  search_spaces/smoke.yaml ...` reaches SUCCEEDED; while it runs the dashboard's HTTP API
  shows the job, its trial actors and a trial's Train run with its two workers, and after
  it every trial's Train run (the API turns away a request without the token, or with a
  wrong one); its results are on disk;
- S3: the smoke sweep with `--storage s3://...?endpoint_override=...` (moto, server mode)
  writes checkpoints, results.parquet and best_config.yaml there; its driver is SIGKILLed
  after the first trial finishes, its local Optuna journal deleted (a new head has none),
  and `--resume` against the same URI finishes the sweep with the whole study.

On a head and two worker nodes:
- node loss: a trial's two workers run on two nodes; one of those nodes is killed
  mid-trial (its whole process tree, SIGKILL: a host dying) and a replacement joins, as an
  autoscaler would add one; the trial finishes from its checkpoint and results.parquet
  records the restart;
- a local --storage that the worker nodes cannot see is refused with one line and exit 2;
- `local.sh down` stops every process of the cluster and nothing else.

And the cluster configs: aws.yaml passes Ray's cluster-launcher schema; the KubeRay
manifests have a CPU head, a GPU worker group, token auth, and a RayJob that runs the sweep.

Every process a test starts is stopped in a finalizer (tests/cluster_helpers.py), even
when the test fails.
"""
from __future__ import annotations

import io
import json
import shutil
import subprocess
import uuid
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cluster_helpers import (REPO, TUNE, VENV_BIN, Driver, LocalCluster, S3Server, cluster_env, descendants,
                             listening_sockets, off_loopback, running,
                             short_tmpdir, tune_trial_statuses, wait_until)

SMOKE = REPO / "search_spaces" / "smoke.yaml"
FINISHED = r"^trial (\S+) (completed|pruned) after"


@pytest.fixture(scope="module")
def workdir():
    path = short_tmpdir("pct-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="module")
def env(workdir) -> dict[str, str]:
    return cluster_env(workdir)


def smoke_rows_ok(rows: list[dict], num_samples: int = 3) -> None:
    assert len(rows) == num_samples
    assert len({row["trial_id"] for row in rows}) == num_samples
    assert {row["status"] for row in rows} <= {"completed", "pruned"}, rows
    assert any(row["status"] == "completed" for row in rows)
    assert len({tuple(sorted((k, v) for k, v in row.items() if "." in k and v is not None)) for row in rows}) \
        == num_samples  # no parameter set twice


def _train_runs(head) -> list[dict]:
    """The dashboard's Train V2 runs (its Train page); none before the first trainer made
    the Train state actor (HTTP 500 saying so)."""
    status, body = head.http("/api/train/v2/runs/v1")
    if status == 500 and b"Train state data is not available" in body:
        return []
    assert status == 200, f"GET /api/train/v2/runs/v1: HTTP {status}: {body[:300]!r}"
    return json.loads(body)["train_runs"]


# ----------------------------------------------------------------------------- one head node


@pytest.fixture(scope="class")
def head(env):
    """A head node alone, 2 CPUs; it stops when the tests of its class are done."""
    with LocalCluster(workers=0, env=env, head_cpus=2) as cluster:
        yield cluster


@pytest.fixture
def s3():
    """moto's S3 on 127.0.0.1, one bucket ("sweeps")."""
    server = S3Server()
    yield server
    server.stop()


class TestHeadNode:
    @pytest.mark.timeout(360)
    def test_job_submission(self, head, env, workdir):
        storage = workdir / "job-runs"
        submission_id = f"psdet-smoke-{uuid.uuid4().hex[:8]}"
        submit = subprocess.run(
            [str(VENV_BIN / "ray"), "job", "submit", "--address", head.dashboard, "--submission-id", submission_id,
             "--working-dir", ".", "--no-wait",
             # Ray 2.60 keeps Train runs for the dashboard's Train page only with state tracking on.
             "--runtime-env-json", json.dumps({"env_vars": {"RAY_TRAIN_ENABLE_STATE_TRACKING": "1"}}), "--",
             "python", "orchestrate/tune.py", "--space", "search_spaces/smoke.yaml", "--num-samples", "2",
             "--storage", str(storage), "--name", "smoke-job"],
            cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
        assert submit.returncode == 0, submit.stdout + submit.stderr
        assert "Uploading package" in submit.stderr or "already exists" in submit.stderr, submit.stderr
        assert working_dir_package_bytes() < 5 * 2**20  # no .venv, .git, runs/ or data/ in it

        # While it runs, the dashboard's API shows the job, its trial actors and a trial's Train run with
        # its two workers.
        live: dict = {}

        def dashboard_shows_a_trial_training() -> bool:
            job = head.api(f"/api/jobs/{submission_id}")
            if job["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                raise AssertionError(f"the job ended before the dashboard showed a trial training: {job['status']}")
            try:
                actors = [a for a in head.state("actors") if a.get("job_id") == job.get("job_id")]
                runs = [r for r in _train_runs(head) if r["job_id"] == job.get("job_id")]
            except TimeoutError:  # a dashboard slow to gather actors on a loaded machine: ask again
                return False
            live.update(job=job, actors=actors, runs=runs)
            alive = {a["class_name"] for a in actors if a["state"] == "ALIVE"}
            training = [r for r in runs if r["status"] == "RUNNING" and r["attempts"]
                        and len(r["attempts"][-1]["workers"]) == 2]
            return job["status"] == "RUNNING" and {"ImplicitFunc", "TrainController", "RayTrainWorker"} <= alive \
                and bool(training)

        wait_until(dashboard_shows_a_trial_training, timeout=300, what="the dashboard showing a trial training",
                   poll_s=1)
        workers = live["runs"][0]["attempts"][-1]["workers"]
        assert all(w["actor_id"] in {a["actor_id"] for a in live["actors"]} for w in workers), workers

        info = head.wait_job(submission_id, timeout=300)
        assert info["status"] == "SUCCEEDED", head.job_logs(submission_id)

        listed = {job["submission_id"]: job for job in head.api("/api/jobs/")}
        assert listed[submission_id]["status"] == "SUCCEEDED"
        assert "orchestrate/tune.py --space search_spaces/smoke.yaml" in listed[submission_id]["entrypoint"]
        status, _ = head.http("/api/jobs/", token=None)
        assert status == 401  # token auth is on
        status, _ = head.http("/api/jobs/", token="not-the-token")
        assert status == 403

        experiment = storage / "smoke-job"
        rows = pq.read_table(experiment / "results.parquet").to_pylist()
        smoke_rows_ok(rows, num_samples=2)
        from psdet.config import load_config

        best = next(row for row in rows if row["status"] == "completed")
        assert load_config(experiment / "best_config.yaml").optim.lr == pytest.approx(rows[0]["optim.lr"])
        assert rows[0]["trial_id"] == best["trial_id"]
        for row in rows:  # each trial's checkpoints, from its Train run on the cluster
            assert list((experiment / f"trial_{row['trial_id']}" / "train").glob("checkpoint_*")), row
        # Every trial's Train run is on the dashboard's Train page, found by its storage path (the trial's directory).
        runs = [r for r in _train_runs(head) if r["job_id"] == info["job_id"]]
        by_trial = {Path(r["run_settings"]["run_config"]["storage_path"]).name: r for r in runs}
        assert set(by_trial) == {f"trial_{row['trial_id']}" for row in rows}, sorted(by_trial)
        # A completed trial's run is FINISHED: its last report does not stop the trial, so fit() returns first
        # (orchestrate.moasha.is_last_report). One ASHA stopped early was killed mid-run: its recorded state
        # is still RUNNING with its controller actor gone, which the dashboard calls ABORTED.
        assert {name: r["status"] for name, r in by_trial.items()} == {
            f"trial_{row['trial_id']}": "FINISHED" if row["status"] == "completed" else "ABORTED" for row in rows}
        assert all(len(r["attempts"][-1]["workers"]) == 2 for r in runs)

    @pytest.mark.timeout(600)
    def test_s3_storage_survives_a_killed_driver(self, head, s3, env, workdir):
        first = second = None
        try:
            uri = s3.uri("sweeps")
            args = [*TUNE, "--space", SMOKE, "--address", head.address, "--storage", uri, "--name", "s3-smoke"]
            first = Driver(args, env, cwd=workdir)
            done_before_kill = first.wait_for(FINISHED, timeout=240).group(1)
            # Kill the driver once S3 holds the finished trial both in the ledger (rewritten on
            # every trial event) and in Tune's experiment state (saved every
            # TUNE_GLOBAL_CHECKPOINT_S, the journal mirrored with it): the resumed driver must
            # not train it again.
            wait_until(lambda: _ledger_status(s3, done_before_kill) in ("completed", "pruned")
                       and _tune_status(s3, done_before_kill) == "TERMINATED", timeout=60,
                       what=f"trial {done_before_kill} finished in trials.json and in Tune's state in S3")
            first.kill()
            assert first.proc.returncode not in (0, None)
            assert "sweeps/s3-smoke/results.parquet" not in s3.keys("sweeps/s3-smoke/")  # it did not finish
            # The study's journal lives on the driver's disk and is mirrored to S3. Resume as
            # a driver on a new head would: without the local copy.
            journal = Path(json.loads(s3.read("sweeps/s3-smoke/sweep.json"))["optuna_storage"])
            assert "sweeps/s3-smoke/optuna.journal" in s3.keys("sweeps/s3-smoke/")
            journal.unlink()

            second = Driver([*args, "--resume"], env, cwd=workdir)
            assert second.wait(timeout=300) == 0, second.tail()
        finally:
            for driver in (first, second):
                if driver is not None:
                    driver.kill()

        prefix = "sweeps/s3-smoke/"
        keys = s3.keys("sweeps/")
        for name in ("results.parquet", "best_config.yaml", "best_checkpoint.txt", "sweep.json", "tuner.pkl"):
            assert prefix + name in keys, keys
        assert any("/train/checkpoint_" in key for key in keys), keys  # Train V2 wrote checkpoints to S3
        assert not (workdir / "s3-smoke").exists() and not (workdir / "runs").exists()  # nothing landed locally

        rows = pq.read_table(io.BytesIO(s3.read(prefix + "results.parquet"))).to_pylist()
        smoke_rows_ok(rows)
        assert done_before_kill in {row["trial_id"] for row in rows}
        best_config = yaml.safe_load(s3.read(prefix + "best_config.yaml"))
        assert best_config["optim"]["lr"] == pytest.approx(rows[0]["optim.lr"])

        # The study kept its history across the two drivers, through S3: every trial is in
        # the mirrored journal once.
        import optuna

        mirrored = workdir / "optuna-from-s3.journal"
        mirrored.write_bytes(s3.read(prefix + "optuna.journal"))
        journal.unlink(missing_ok=True)
        storage = optuna.storages.JournalStorage(optuna.storages.journal.JournalFileBackend(str(mirrored)))
        (study_name,) = optuna.get_all_study_names(storage)
        trials = optuna.load_study(study_name=study_name, storage=storage).trials
        finished = [t for t in trials if t.state.name in ("COMPLETE", "PRUNED")]
        study_text = "\n".join(f"optuna #{t.number} {t.state.name} {t.user_attrs} {t.params}" for t in trials)
        assert sorted(t.user_attrs["tune_trial_id"] for t in finished) == sorted(row["trial_id"] for row in rows), \
            f"study:\n{study_text}\nrows: {[(r['trial_id'], r['status']) for r in rows]}\n" \
            f"first driver:\n{first.tail(25)}\nsecond driver:\n{second.tail(40)}"
        assert done_before_kill in {t.user_attrs["tune_trial_id"] for t in finished}


def working_dir_package_bytes() -> int:
    """The size of the zip `ray job submit --working-dir .` uploads from this checkout."""
    import tempfile

    import ray._private.ray_constants as ray_constants
    from ray._private.runtime_env.packaging import create_package

    with tempfile.TemporaryDirectory() as scratch:
        package = Path(scratch) / "package.zip"
        create_package(str(REPO), package, include_gitignore=True,
                       excludes=ray_constants.get_runtime_env_default_excludes(), logger=None)
        return package.stat().st_size


def _ledger_status(s3: S3Server, trial_id: str) -> str | None:
    key = "sweeps/s3-smoke/trials.json"
    if key not in s3.keys("sweeps/s3-smoke/"):
        return None
    return json.loads(s3.read(key)).get(trial_id, {}).get("status")


def _tune_status(s3: S3Server, trial_id: str) -> str | None:
    """The trial's status in the newest experiment state Tune has uploaded to S3."""
    prefix = "sweeps/s3-smoke/experiment_state-"
    states = sorted(key for key in s3.keys("sweeps/s3-smoke/") if key.startswith(prefix) and key.endswith(".json"))
    return tune_trial_statuses(s3.read(states[-1])).get(trial_id) if states else None


# ----------------------------------------------------------------------------- head + 2 worker nodes


@pytest.fixture(scope="class")
def private_dir():
    """A directory the head sees and the worker nodes do not (they get an empty tmpfs over it)."""
    path = short_tmpdir("pcp-")
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture(scope="class")
def nodes(env, private_dir):
    """A head and two worker nodes of 1 CPU each; it stops when the tests of its class are done."""
    with LocalCluster(workers=2, env=env, head_cpus=1, worker_cpus=1, private_dir=private_dir) as cluster:
        yield cluster


class TestThreeNodes:

    @pytest.mark.timeout(420)
    def test_node_lost_mid_trial(self, nodes, env, workdir):
        smoke = yaml.safe_load(SMOKE.read_text())
        space = {
            **smoke,
            "experiment": {**smoke["experiment"], "name": "nodeloss", "num_samples": 1, "max_concurrent": 1,
                           "overrides": {**smoke["experiment"]["overrides"], "train.epochs": 3}},
            "search": {"optim.lr": {"type": "choice", "values": [0.003]}},
            "scheduler": {"type": "none"},
            # One CPU per worker on nodes of one CPU each: the two workers cannot share a node.
            "resources": {"workers": 2, "use_gpu": False, "cpus_per_worker": 1},
            "fault_tolerance": {"worker_max_failures": 3, "trial_max_failures": 1, "checkpoints_kept": 2},
        }
        space_path = workdir / "nodeloss.yaml"
        space_path.write_text(yaml.safe_dump(space, sort_keys=False))
        storage = workdir / "node-runs"

        driver = Driver([*TUNE, "--space", space_path, "--address", nodes.address, "--storage", storage], env)
        try:
            driver.wait_for(r"^trial \S+ epoch 1/3", timeout=240)  # a checkpoint is in storage
            actors = [actor for actor in nodes.state("actors") if actor["state"] == "ALIVE"]
            workers = [actor for actor in actors if actor["class_name"] == "RayTrainWorker"]
            assert len(workers) == 2 and len({w["node_id"] for w in workers}) == 2, workers  # spans two nodes
            node_names = {node["node_id"]: _local_sh_name(node) for node in nodes.state("nodes")}
            # Lose a node that runs a Train worker, and neither the trial's driver nor Train's controller.
            keep = {actor["node_id"] for actor in actors if actor["class_name"] in ("ImplicitFunc", "TrainController")}
            victims = [w["node_id"] for w in workers if w["node_id"] not in keep and node_names[w["node_id"]] != "head"]
            assert victims, (actors, node_names)
            nodes.kill(node_names[victims[0]])
            nodes.add(1)  # a replacement node, as an autoscaler would bring
            assert driver.wait(timeout=300) == 0, driver.tail()
        finally:
            driver.kill()

        (row,) = pq.read_table(storage / "nodeloss" / "results.parquet").to_pylist()
        assert row["status"] == "completed" and row["epochs"] == 3, row
        assert row["worker_restarts"] >= 1 and row["restarts"] >= 1, row  # restarted, from a checkpoint
        assert f"{row['restarts']}/{row['worker_restarts']}" in driver.tail(200)  # on the leaderboard too

    @pytest.mark.timeout(120)
    def test_unshared_local_storage_is_refused(self, nodes, env, private_dir):
        driver = Driver([*TUNE, "--space", SMOKE, "--address", nodes.address,
                         "--storage", private_dir / "runs", "--name", "unshared"], env)
        try:
            code = driver.wait(timeout=75)  # refused before any trial runs: no training time
        finally:
            driver.kill()
        errors = [line for line in driver.seen if line.startswith("tune.py: error:")]
        assert code == 2 and len(errors) == 1, driver.tail()
        assert "--storage" in errors[0] and "cannot see" in errors[0], errors
        assert not list(private_dir.glob("runs/unshared/trial_*"))  # refused before any trial ran

    def test_every_listening_socket_of_the_cluster_is_on_loopback(self, nodes):
        pids = [pid for root in nodes.recorded_pids() for pid in descendants(root)]
        sockets = listening_sockets(pids)
        assert len({pid for pid, _, _ in sockets}) >= 3, sockets  # GCS, raylets, dashboard... seen
        assert off_loopback(sockets) == [], sockets

    @pytest.mark.timeout(120)
    def test_down_stops_all_it_started_and_nothing_else(self, nodes):
        bystander = subprocess.Popen(["sleep", "300"], start_new_session=True)  # not the cluster's
        try:
            pids = nodes.recorded_pids()
            assert len(pids) >= 3 and any(running(pid) for pid in pids)
            nodes.stop()  # local.sh down (the fixture's own stop() later is a no-op)
            assert nodes.leftovers == []  # `down` alone stopped every process of the cluster
            assert not any(running(pid) for pid in pids)
            assert bystander.poll() is None
        finally:
            bystander.kill()
            bystander.wait()


def _local_sh_name(node: dict) -> str:
    """local.sh's name of a node (head, worker<i>) from the custom resource it offers."""
    resources = node.get("resources_total", {})
    if "psdet_head" in resources:
        return "head"
    return next(f"worker{key.rsplit('_', 1)[1]}" for key in resources if key.startswith("psdet_node_"))


# ----------------------------------------------------------------------------- the cluster configs


def test_aws_yaml_is_a_valid_cluster_launcher_config():
    from ray.autoscaler._private.util import fillout_defaults, validate_config

    config = fillout_defaults(yaml.safe_load((REPO / "cluster" / "aws.yaml").read_text()))
    validate_config(config)  # Ray's own schema, as `ray up` checks it
    head = config["available_node_types"][config["head_node_type"]]
    assert "InstanceMarketOptions" not in head["node_config"]  # the head (and the driver) on demand
    (worker,) = [t for name, t in config["available_node_types"].items() if name != config["head_node_type"]]
    assert worker["node_config"]["InstanceType"].startswith(("g", "p"))  # a GPU instance
    assert 0 <= worker["min_workers"] <= worker["max_workers"]
    assert any("pip install" in c and "-e '.[sweep]'" in c for c in config["setup_commands"])
    assert config["file_mounts"]["~/psdet-sweep"] == "."
    for commands in (config["head_start_ray_commands"], config["worker_start_ray_commands"]):
        assert any("RAY_AUTH_MODE=token" in c and "ray start" in c for c in commands)


def test_kuberay_manifests():
    docs = list(yaml.safe_load_all((REPO / "cluster" / "kuberay" / "raycluster.yaml").read_text()))
    (cluster,) = [d for d in docs if d and d["kind"] == "RayCluster"]
    (rayjob,) = yaml.safe_load_all((REPO / "cluster" / "kuberay" / "rayjob.yaml").read_text())
    assert cluster["apiVersion"] == rayjob["apiVersion"] == "ray.io/v1" and rayjob["kind"] == "RayJob"
    for spec in (cluster["spec"], rayjob["spec"]["rayClusterSpec"]):
        assert spec["authOptions"] == {"mode": "token", "secretName": "psdet-ray-token"}
        head = spec["headGroupSpec"]["template"]["spec"]["containers"][0]
        assert "nvidia.com/gpu" not in head["resources"]["limits"]
        (gpu,) = spec["workerGroupSpecs"]
        assert gpu["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
        assert 0 <= gpu["minReplicas"] <= gpu["maxReplicas"]
    job = rayjob["spec"]
    assert job["shutdownAfterJobFinishes"] is True
    assert "python orchestrate/tune.py --space search_spaces/full.yaml" in job["entrypoint"]
    assert "--resume" in job["entrypoint"] and "s3://" in job["entrypoint"]
    runtime_env = yaml.safe_load(job["runtimeEnvYAML"])
    assert runtime_env["working_dir"] and runtime_env["env_vars"]["PYTHONUNBUFFERED"] == "1"
