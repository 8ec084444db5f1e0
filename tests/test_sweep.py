"""The sweep end to end, through `python orchestrate/tune.py` joined to one local Ray per module.

Both ways a trial trains are covered: on a Ray Train worker group (2 workers, a
TorchTrainer) and in the trial's own process (1 worker).
- smoke: search_spaces/smoke.yaml (3 trials, ASHA) writes a leaderboard that starts with
  the baseline trial and ends with the best-against-baseline, epochs and goodput lines,
  results.parquet, best_config.yaml and an Optuna study that matches it;
- worker kill: the rank-0 worker (for one worker: the trial process) SIGKILLed mid-trial
  is restarted, the trial resumes from its checkpoint and ends with the same metrics as an
  uninterrupted twin;
- driver kill (one-worker trials; the two-worker path is killed in tests/test_cluster.py's
  S3 test): tune.py SIGKILLed after its first trial finishes, then `--resume`, finishes
  the sweep without rerunning, duplicating or losing a trial.
"""
from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from cluster_helpers import (TUNE, Driver, S3Server, descendants, listening_sockets, off_loopback,
                             tune_trial_statuses, wait_until)
from conftest import REPO

# The preemption test's storage is moto's S3 on 127.0.0.1: this module's Ray (tests/conftest.py,
# started from this process) and its workers take these test credentials from here, and no S3
# client asks the EC2 metadata address.
for _key, _value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                     "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}.items():
    os.environ.setdefault(_key, _value)

SMOKE = REPO / "search_spaces" / "smoke.yaml"
FINISHED = re.compile(r"^trial (\S+) (completed|pruned) after")


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """The synthetic dataset cache is per module: the first sweep makes it, later ones reuse it."""
    return {**os.environ, "XDG_CACHE_HOME": str(tmp_path_factory.mktemp("cache")), "PYTHONUNBUFFERED": "1"}


def run_tune(args: list[str], env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([*TUNE, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


def tail(result: subprocess.CompletedProcess, lines: int = 40) -> str:
    return "\n".join((result.stdout + result.stderr).splitlines()[-lines:])


ONE_WORKER = {"workers": 1, "use_gpu": False, "cpus_per_worker": 0.5}


def space_file(path: Path, **changes) -> Path:
    """smoke.yaml with some sections changed (each change replaces a whole section key)."""
    space = yaml.safe_load(SMOKE.read_text())
    for dotted, value in changes.items():
        section, key = dotted.split("__")
        if key == "ALL":
            space[section] = value
        else:
            space[section][key] = value
    path.write_text(yaml.safe_dump(space, sort_keys=False))
    return path


def ledger(experiment: Path) -> dict[str, dict]:
    path = experiment / "trials.json"
    return json.loads(path.read_text()) if path.exists() else {}


def results(experiment: Path) -> list[dict]:
    return pq.read_table(experiment / "results.parquet").to_pylist()


def study_trials(experiment: Path, name: str):
    import optuna

    backend = optuna.storages.journal.JournalFileBackend(str(experiment / "optuna.journal"))
    return optuna.load_study(study_name=name, storage=optuna.storages.JournalStorage(backend)).trials


def params_of(row: dict) -> tuple:
    return tuple(sorted((k, v) for k, v in row.items() if "." in k and v is not None))


@pytest.mark.timeout(300)
@pytest.mark.parametrize("workers", [2, 1])
def test_smoke_sweep(ray_cluster, env, tmp_path, workers):
    space = SMOKE if workers == 2 else space_file(tmp_path / "smoke.yaml", resources__ALL=ONE_WORKER)
    storage = tmp_path / "runs"
    result = run_tune(["--space", space, "--address", ray_cluster.address, "--storage", storage], env, timeout=280)
    assert result.returncode == 0, tail(result)
    out = result.stdout
    said = re.search(r"^no --data given: (synthesized|using the cached).* (\S+/train16-val8-seed0-\w+)", out, re.M)
    assert said and (Path(said.group(2)) / "ps_json_label" / "training").is_dir(), out[:2000]

    experiment = storage / "smoke"
    rows = results(experiment)
    assert len(rows) == 3
    assert len({row["trial_id"] for row in rows}) == 3
    assert {row["status"] for row in rows} <= {"completed", "pruned"}
    assert any(row["status"] == "completed" for row in rows)
    for row in rows:
        assert row["total_epochs"] == 3 and 1 <= row["epochs"] <= 3
        assert (row["epochs"] == 3) == (row["status"] == "completed")
        assert row["final_point_ap"] is not None and row["best_point_ap"] >= row["final_point_ap"] - 1e-12
        assert row["restarts"] == 0 and row["worker_restarts"] == 0 and row["wall_time_s"] > 0
        (run,) = (experiment / f"trial_{row['trial_id']}").glob("run-*")  # one run per trial, not resumed
        assert f"rank 0 of {workers}," in (run / "train.log").read_text()  # DDP over two workers, or one
        checkpoints = "train/checkpoint_*" if workers == 2 else "checkpoint_*"  # Ray Train's, or Tune's
        assert list((experiment / f"trial_{row['trial_id']}").glob(checkpoints)), row
        # TensorBoard's events: the engine's, in the trial's run named by its parameters; none of Tune's.
        trial_dir = experiment / f"trial_{row['trial_id']}"
        (board,) = [path for path in trial_dir.iterdir() if any(path.glob("events.out.tfevents.*"))]
        assert board.name.startswith(f"lr={row['optim.lr']:.3g},warmup={row['optim.warmup']}"), board
        assert not list(trial_dir.glob("events.out.tfevents.*"))

    board = out[out.index("leaderboard of 'smoke'"):]
    for row in rows:
        assert re.search(rf"^{row['rank']}\s+{row['trial_id']}\s+{row['status']}\s", board, re.M), board

    # The first trial is the baseline: ps_gat_tiny's own values of the searched keys.
    (baseline,) = [row for row in rows if row["baseline"]]
    assert baseline["optim.lr"] == 0.003 and baseline["optim.warmup"] == "none"
    assert baseline.get("optim.warmup_epochs") is None  # not searched without warmup
    assert re.search(rf"^\d+\s+{baseline['trial_id']}\s.*<- baseline$", board, re.M), board
    summary = board.strip().splitlines()[-3:]
    assert summary[0].startswith("best against baseline: trial "), summary
    spent = sum(row["epochs"] for row in rows)
    assert summary[1].startswith(f"epochs: {spent} spent, against 9 without early stopping"), summary
    goodput = re.match(r"goodput: (\d+)% \((\d+) s of engine training \+ evaluation over (\d+) s wall x 2 trial", summary[2])
    assert goodput and 0 < int(goodput[1]) <= 100, summary
    assert float(goodput[2]) == pytest.approx(sum(row["engine_s"] for row in rows), abs=1), summary

    best = rows[0]
    assert best["status"] == "completed"
    from psdet.config import load_config

    cfg = load_config(experiment / "best_config.yaml")
    assert cfg.optim.lr == pytest.approx(best["optim.lr"])
    assert cfg.train.epochs == 3 and cfg.data.image_size == 128 and Path(cfg.data.root).is_dir()
    checkpoint = Path((experiment / "best_checkpoint.txt").read_text().strip())
    assert checkpoint == Path(best["checkpoint"]) and (checkpoint / "meta.json").is_file()
    assert f"best checkpoint  {checkpoint}" in out

    # ASHA's early stops are PRUNED in Optuna, with one intermediate value per epoch run.
    by_trial = {t.user_attrs["tune_trial_id"]: t for t in study_trials(experiment, "smoke")}
    assert set(by_trial) == {row["trial_id"] for row in rows}
    assert by_trial[baseline["trial_id"]].user_attrs["baseline"] is True and by_trial[baseline["trial_id"]].number == 0
    for row in rows:
        trial = by_trial[row["trial_id"]]
        assert trial.state.name == {"completed": "COMPLETE", "pruned": "PRUNED"}[row["status"]]
        assert sorted(trial.intermediate_values) == list(range(1, row["epochs"] + 1))
        assert trial.value == pytest.approx(row["final_point_ap"])


def twin_space(path: Path, workers: int, overrides: dict, **changes) -> Path:
    """Two trials of one config (lr 0.003) side by side on `workers` workers, no early
    stopping, two worker restarts and no trial retry; the experiment is named after `path`."""
    resources = {} if workers == 2 else {"resources__ALL": ONE_WORKER}
    return space_file(
        path, **resources, **changes,
        experiment__name=path.stem, experiment__num_samples=2, experiment__max_concurrent=2,
        experiment__overrides={**yaml.safe_load(SMOKE.read_text())["experiment"]["overrides"], **overrides},
        search__ALL={"optim.lr": {"type": "choice", "values": [0.003]}},
        scheduler__ALL={"type": "none"},
        fault_tolerance__ALL={"worker_max_failures": 2, "trial_max_failures": 0, "checkpoints_kept": 2},
    )


def rank0_pid(trial_dir: Path) -> int:
    """The process of rank 0 of the trial in `trial_dir` (a Ray Train worker, or the trial's
    own process for one worker), as the engine logs it."""
    (log,) = trial_dir.glob("run-*/train.log")
    match = re.search(r"rank 0 of \d+, pid (\d+)", log.read_text())
    assert match, log.read_text()[:2000]
    return int(match[1])


@pytest.mark.timeout(240)
def test_every_listening_socket_of_a_local_sweep_is_on_loopback(env, tmp_path):
    """tune.py without --address starts its own Ray (as on a laptop): while a trial trains,
    every TCP socket that Ray, its dashboard and the trial's processes listen on is on 127.0.0.1."""
    space = space_file(tmp_path / "sockets.yaml", resources__ALL=ONE_WORKER, experiment__name="sockets",
                       experiment__num_samples=1)
    local_env = {key: value for key, value in env.items() if key != "RAY_ADDRESS"}
    sweep = Driver([*TUNE, "--space", space, "--storage", tmp_path / "runs"], local_env)
    try:
        sweep.wait_for(r"^trial \S+ epoch 1/3", timeout=200)  # Ray, its dashboard and a trial are up
        sockets = listening_sockets(descendants(sweep.proc.pid))
    finally:
        sweep.kill()
    assert len({pid for pid, _, _ in sockets}) >= 3, sockets  # GCS, raylet, dashboard, the trial's worker...
    assert off_loopback(sockets) == [], sockets


@pytest.mark.timeout(360)
@pytest.mark.parametrize("workers", [2, 1])
def test_worker_killed_mid_trial_resumes_exactly(ray_cluster, env, tmp_path, workers):
    # Twin trials of one config, side by side; rank 0 of the first to finish an epoch is killed.
    space = twin_space(tmp_path / "twins.yaml", workers, {"train.epochs": 4})
    storage = tmp_path / "runs"
    experiment = storage / "twins"
    sweep = Driver([*TUNE, "--space", space, "--address", ray_cluster.address, "--storage", storage], env)
    try:
        killed_id = sweep.wait_for(r"^trial (\S+) epoch 1/4", timeout=200).group(1)
        os.kill(rank0_pid(experiment / f"trial_{killed_id}"), signal.SIGKILL)
        sweep.wait_for(r"^results ", timeout=300)
        assert sweep.wait(timeout=60) == 0, sweep.tail(40)
    finally:
        sweep.kill()

    rows = {row["trial_id"]: row for row in results(experiment)}
    assert len(rows) == 2 and killed_id in rows
    killed, clean = rows.pop(killed_id), next(iter(rows.values()))
    assert killed["status"] == clean["status"] == "completed"
    assert (killed["restarts"], killed["worker_restarts"]) == (1, 1)
    assert (clean["restarts"], clean["worker_restarts"]) == (0, 0)
    timings = ("final_images_per_s", "final_train_s", "final_eval_s", "final_latency_ms")
    same = [key for key in killed if key.startswith("final_") and key not in (*timings, "final_restarts")]
    assert len(same) >= 10
    assert {key: killed[key] for key in same} == {key: clean[key] for key in same}  # bit for bit


@pytest.mark.timeout(420)
def test_driver_killed_then_resumed_finishes_the_sweep(ray_cluster, env, tmp_path):
    space = space_file(tmp_path / "resumable.yaml", experiment__name="resumable", experiment__num_samples=3,
                       resources__ALL=ONE_WORKER)
    storage = tmp_path / "runs"
    experiment = storage / "resumable"
    args = ["--space", space, "--address", ray_cluster.address, "--storage", storage]

    driver = Driver([*TUNE, *args], env)
    try:
        driver.wait_for(FINISHED, timeout=240)
    finally:
        driver.kill()
    before = ledger(experiment)
    finished_before = {tid: r for tid, r in before.items() if r["status"] in ("completed", "pruned")}
    midflight = {tid for tid, r in before.items() if r["status"] == "running" and r["epochs"] >= 1}
    assert finished_before
    states = sorted(experiment.glob("experiment_state-*.json"))
    assert states, "the killed driver left no experiment state to resume from"
    known_to_tune = tune_trial_statuses(states[-1].read_bytes())  # what --resume restores

    rerun = run_tune(args, env, timeout=30)  # the same command without --resume refuses to overwrite
    assert rerun.returncode == 2 and "--resume" in rerun.stderr

    resumed = run_tune([*args, "--resume"], env, timeout=300)
    assert resumed.returncode == 0, tail(resumed)
    assert "resuming sweep 'resumable'" in resumed.stdout

    rows = results(experiment)
    assert len(rows) == 3
    assert len({row["trial_id"] for row in rows}) == 3
    assert len({params_of(row) for row in rows}) == 3
    assert {row["status"] for row in rows} <= {"completed", "pruned"}, (
        [(row["trial_id"], row["status"], row.get("error")) for row in rows], tail(resumed))
    by_id = {row["trial_id"]: row for row in rows}
    for trial_id, record in finished_before.items():  # not trained again, results kept
        row = by_id[trial_id]
        assert row["status"] == record["status"] and row["epochs"] == record["epochs"]
        assert {k: row[f"final_{k}"] for k in record["final"]} == record["final"]
        assert len(list((experiment / f"trial_{trial_id}").glob("run-*"))) == 1
    for trial_id in midflight:
        runs = sorted((experiment / f"trial_{trial_id}").glob("run-*"))
        if trial_id in known_to_tune:  # run again by the resumed driver, from its checkpoint
            assert len(runs) == 2 and "resumed from" in (runs[-1] / "train.log").read_text(), runs
        else:  # started after Tune last saved its state: a new trial took its place
            assert trial_id not in by_id and len(runs) == 1, (trial_id, sorted(by_id), runs)
            record = ledger(experiment)[trial_id]
            assert record["status"] == "abandoned"
            successor = record.get("continued_by")
            if successor is not None:  # its parameters drawn again: started from its checkpoint
                assert ledger(experiment)[successor]["continues"] == trial_id
                first = sorted((experiment / f"trial_{successor}").glob("run-*"))[0]
                assert "resumed from" in (first / "train.log").read_text()

    study = study_trials(experiment, "resumable")
    tracked = {t.user_attrs.get("tune_trial_id"): t for t in study if t.state.name in ("COMPLETE", "PRUNED")}
    assert set(tracked) == set(by_id)
    assert not [t for t in study if t.state.name == "RUNNING"]
    for trial_id, row in by_id.items():
        assert tracked[trial_id].state.name == {"completed": "COMPLETE", "pruned": "PRUNED"}[row["status"]]
        assert tracked[trial_id].params == {k: v for k, v in params_of(row)}


@pytest.mark.timeout(300)
def test_a_trial_tune_errors_with_retries_left_is_run_again(ray_cluster, tmp_path, capsys):
    """Ray 2.60 errors a trial whose retry is pending when a second failure reaches it, with
    retries left: here the `reset` of the reused actor fails once, as a cached actor on a node
    that just died does (benchmarks/chaos.py met it). `orchestrate.sweep.fit` runs the
    stranded trial again from the saved experiment, and both trials complete."""
    from ray import tune

    from orchestrate.results import TrialLedger, stranded
    from orchestrate.sweep import fit
    from psdet.reporting import TOTAL_EPOCHS

    class FailsOneReset(tune.Trainable):  # defined here, so Ray ships it by value
        def setup(self, config):
            self.epoch = 0

        def step(self):
            self.epoch += 1
            return {"epoch": self.epoch, "slot_ap": 0.1 * self.config["x"], TOTAL_EPOCHS: 2, "done": self.epoch >= 2}

        def save_checkpoint(self, checkpoint_dir):
            Path(checkpoint_dir, "epoch").write_text(str(self.epoch))

        def load_checkpoint(self, checkpoint_dir):
            self.epoch = int(Path(checkpoint_dir, "epoch").read_text())

        def reset_config(self, new_config):
            marker = Path(new_config["marker"])
            if not marker.exists():
                marker.write_text("failed once")
                raise RuntimeError("the reused actor's reset failed")
            self.epoch = 0
            return True

    experiment = tmp_path / "runs" / "stranded"
    tuner = tune.Tuner(
        FailsOneReset,
        param_space={"marker": str(tmp_path / "marker"), "x": tune.grid_search([1, 2])},
        tune_config=tune.TuneConfig(max_concurrent_trials=1, reuse_actors=True),
        run_config=tune.RunConfig(name="stranded", storage_path=str(tmp_path / "runs"), verbose=0,
                                  failure_config=tune.FailureConfig(max_failures=3),
                                  callbacks=[TrialLedger(str(experiment), "slot_ap", "max")]),
    )
    fit(tuner, str(experiment), FailsOneReset)
    out = capsys.readouterr().out
    assert "1 trial(s) errored with retries left" in out, out  # the first fit stranded the second trial
    records = ledger(experiment)
    assert sorted(record["status"] for record in records.values()) == ["completed", "completed"], records
    assert stranded(records) == []
    assert sorted(record["final"]["slot_ap"] for record in records.values()) == pytest.approx([0.1, 0.2])


def test_journal_mirror_copies_the_journal_whenever_tune_saves_the_experiment(tmp_path):
    """Tune calls every callback's get_state right after saving the searcher's state and
    before syncing the experiment to storage: the mirrored journal is never older than the
    searcher state a resumed driver reads (a local path stands in for S3 here)."""
    from orchestrate.search import JournalMirror

    local, remote = tmp_path / "optuna.journal", tmp_path / "storage" / "optuna.journal"
    remote.parent.mkdir()
    mirror = JournalMirror(str(local), str(remote), period_s=3600)
    assert mirror.get_state() is None and not remote.exists()  # no journal yet: nothing to copy
    for record in (b'{"op": 0}\n', b'{"op": 4}\n'):
        with open(local, "ab") as journal:
            journal.write(record)
        assert mirror.get_state() is None  # nothing for Tune to keep: the journal is the state
        assert remote.read_bytes() == local.read_bytes()


@pytest.mark.timeout(600)
@pytest.mark.parametrize("workers", [1, 2])
def test_sigterm_to_a_worker_is_a_preemption_no_step_lost(ray_cluster, env, tmp_path, workers):
    """SIGTERM to rank 0 mid-epoch (a spot notice) inside Ray, the sweep's storage on S3 (moto):
    the step in flight finishes, the engine checkpoints exactly that step, reports it and stops;
    the trial's next attempt starts at the step after it from the reported copy (with remote
    storage the engine's own checkpoints are node-local scratch, which no retry reads), and
    ends bit for bit like an uninterrupted twin."""
    name = f"preempted-{workers}-{os.urandom(3).hex()}"  # its scratch under /tmp is the test's own
    space = twin_space(tmp_path / f"{name}.yaml", workers, {"train.epochs": 3, "train.ckpt_every_steps": 2},
                       experiment__synthetic_data={"train": 48, "val": 8, "seed": 0})
    s3 = S3Server()
    sweep = Driver([*TUNE, "--space", space, "--address", ray_cluster.address, "--storage", s3.uri("runs")], env)
    scratch = Path(tempfile.gettempdir(), "psdet-sweeps", name)
    try:
        # 6 steps an epoch: the notice comes after the mid-epoch checkpoint at step 8 (epoch 2, batch
        # 2), while the loop trains, not while it evaluates or reports. Watched in the scratch, not
        # through the driver's "epoch 1/3" line: an epoch takes about 2 s, and a result reaches the
        # driver through Train's 2 s poll, so that line can come after step 10 has pruned step 8's.
        found: list[Path] = []
        wait_until(lambda: found.extend(scratch.glob("trial_*/run-*/checkpoints/ckpt-e0001-s00000008")) or found,
                   timeout=400, what="a trial's mid-epoch checkpoint at step 8", poll_s=0.05)
        trial_dir = found[0].parents[2]
        stopped_id = trial_dir.name.removeprefix("trial_")
        os.kill(rank0_pid(trial_dir), signal.SIGTERM)
        sweep.wait_for(r"^results ", timeout=300)
        assert sweep.wait(timeout=60) == 0, sweep.tail(40)
        rows = {row["trial_id"]: row for row in
                pq.read_table(io.BytesIO(s3.read(f"runs/{name}/results.parquet"))).to_pylist()}
        text = "\n".join(log.read_text() for log in sorted(trial_dir.glob("run-*/train.log")))
    finally:
        sweep.kill()
        s3.stop()
        shutil.rmtree(scratch, ignore_errors=True)

    said = re.search(r"preempted \(SIGTERM\): stopped after step (\d+) with a checkpoint at (\S+)", text)
    assert said, text[-3000:]
    stopped_step, checkpoint = int(said[1]), said[2]
    assert 8 <= stopped_step <= 12 and checkpoint.endswith(f"-s{stopped_step:08d}")
    resumed = re.search(r"resumed from (\S+): epoch (\d+), step (\d+), batch (\d+)", text)
    assert resumed, text[-3000:]
    assert int(resumed[3]) == stopped_step  # the next attempt's first step is the one after it: none lost
    assert not resumed[1].startswith(str(scratch))  # from the reported copy in storage, not the scratch

    stopped, clean = rows.pop(stopped_id), next(iter(rows.values()))
    assert stopped["status"] == clean["status"] == "completed"
    assert stopped["restarts"] == 1 and clean["restarts"] == 0
    timings = ("final_images_per_s", "final_train_s", "final_eval_s", "final_latency_ms")
    same = [key for key in stopped if key.startswith("final_") and key not in (*timings, "final_restarts")]
    assert len(same) >= 10
    assert {key: stopped[key] for key in same} == {key: clean[key] for key in same}  # bit for bit


def test_a_storage_outage_leaves_the_driver_running_and_the_copies_catch_up(tmp_path):
    """While storage fails (benchmarks/chaos.py stops the S3 endpoint for 20 s), the journal
    mirror and the ledger warn instead of ending the sweep, and write again on the next trial
    event once it is back (a file in place of the experiment directory stands in for the outage)."""
    from orchestrate.results import TrialLedger
    from orchestrate.search import JournalMirror

    local, experiment = tmp_path / "optuna.journal", tmp_path / "storage"
    local.write_bytes(b'{"op": 0}\n')
    experiment.write_text("not a directory")  # every write below it fails, as against a stopped endpoint
    mirror = JournalMirror(str(local), str(experiment / "optuna.journal"), period_s=3600)
    ledger = TrialLedger(str(experiment), "point_ap", "max")
    ledger.records = {"t1": {"status": "running"}}
    mirror.get_state()
    ledger._save(None)
    experiment.unlink()
    experiment.mkdir()  # storage is back
    mirror.on_trial_result(0, [], None, {})  # within period_s, but the last copy failed
    assert (experiment / "optuna.journal").read_bytes() == local.read_bytes()
    ledger._save(None)
    assert json.loads((experiment / "trials.json").read_text()) == {"t1": {"status": "running"}}


class _ReplacedWhileRead:
    """An object store whose object is replaced by `versions[1:]`, one per read, after the
    reader has asked for its size: as S3 answers a HEAD then a ranged GET that a writer
    raced (the bytes of the new version, cut to the old size)."""

    def __init__(self, *versions: bytes) -> None:
        self.versions, self.current, self.reads = list(versions), 0, 0
        self.mtimes_ns = [1_000_000_000 * (i + 1) for i in range(len(versions))]

    def get_file_info(self, path):
        import pyarrow.fs

        data = self.versions[self.current]
        return pyarrow.fs.FileInfo(path, pyarrow.fs.FileType.File, size=len(data), mtime_ns=self.mtimes_ns[self.current])

    def open_input_stream(self, path):
        import pyarrow as pa

        size = len(self.versions[self.current])  # pyarrow's HEAD
        self.reads += 1
        self.current = min(self.current + 1, len(self.versions) - 1)  # the writer's PUT lands
        return pa.BufferReader(self.versions[self.current][:size])  # the GET


def test_a_read_of_an_object_being_replaced_returns_one_whole_version():
    """CI read Tune's experiment state from S3 while the driver replaced it, and got the new
    version cut to the old one's length (a JSONDecodeError). storage.read_file reads again."""
    from orchestrate import storage

    old, new = json.dumps({"trials": [1]}).encode(), json.dumps({"trials": [1, 2, 3]}).encode()
    fs = _ReplacedWhileRead(old, new)
    with fs.open_input_stream("x") as stream:  # what a plain read gets
        torn = stream.readall()
    assert torn == new[:len(old)]
    fs = _ReplacedWhileRead(old, new)
    assert storage.read_file(fs, "exp/experiment_state.json") == new and fs.reads == 2
    same_size = json.dumps({"trials": [9]}).encode()  # replaced by a version of the same size: told by its time
    fs = _ReplacedWhileRead(old, same_size)
    assert storage.read_file(fs, "exp/experiment_state.json") == same_size and fs.reads == 2
    fs = _ReplacedWhileRead(*[json.dumps(list(range(n))).encode() for n in range(storage.READ_TRIES + 2)])
    with pytest.raises(OSError, match="exp/experiment_state.json: replaced during each of"):
        storage.read_file(fs, "exp/experiment_state.json")


def test_a_trial_waits_out_a_storage_outage_instead_of_spending_its_retries(monkeypatch):
    """Tune retries a failed trial at once; a trial that failed on every storage call during a
    20 s outage spent all its retries in it (benchmarks/chaos.py). It waits instead, and a
    missing file is still an answer."""
    from orchestrate import storage

    monkeypatch.setattr(storage.time, "sleep", lambda seconds: None)
    answers = iter([OSError("AWS Error NETWORK_CONNECTION"), OSError("Could not connect to server"), {"t1": {}}])

    def read():
        answer = next(answers)
        if isinstance(answer, Exception):
            raise answer
        return answer

    assert storage.patiently(read, "reading the trial's records") == {"t1": {}}
    with pytest.raises(FileNotFoundError):
        storage.patiently(lambda: open("/nonexistent/trials.json"), "reading the trial's records")
    with pytest.raises(OSError, match="still down"):
        storage.patiently(lambda: (_ for _ in ()).throw(OSError("still down")), "reading", wait_s=0)
