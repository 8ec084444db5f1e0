"""Looking at a finished sweep with real clients: one smoke sweep per module (one-worker
trials, run with `--report`), then
- its report.html in headless Chromium: no console error, every plotly figure drawn, a
  screenshot kept (in $PSDET_TEST_ARTIFACTS, default out/test-artifacts/);
- `tune.py report` on the same sweep seen as interrupted (no results.parquet yet);
- optuna-dashboard on its optuna.journal, through its HTTP API;
- the experiment directory through TensorBoard's own reader: one run per trial, named by
  its id and parameters, with the engine's scalars and the parameters as HParams.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path
from types import SimpleNamespace

import pyarrow.parquet as pq
import pytest
import yaml

from browser_helpers import load_page
from cluster_helpers import TUNE, S3Server
from conftest import REPO
from orchestrate.ray_env import free_port

SMOKE = REPO / "search_spaces" / "smoke.yaml"
ARTIFACTS = Path(os.environ.get("PSDET_TEST_ARTIFACTS", REPO / "out" / "test-artifacts"))
NUM_TRIALS = 4


def run_tune(args: list, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess:
    return subprocess.run([*TUNE, *map(str, args)], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=timeout)


@pytest.fixture(scope="module")
def sweep(ray_cluster, tmp_path_factory) -> SimpleNamespace:
    """smoke.yaml with one-worker trials, four of them one at a time (so ASHA sees them in
    a fixed order and the seeded sweep prunes the same one every run), with --report."""
    root = tmp_path_factory.mktemp("views")
    space = yaml.safe_load(SMOKE.read_text())
    space["experiment"].update(name="views", num_samples=NUM_TRIALS, max_concurrent=1)
    space["resources"] = {"workers": 1, "use_gpu": False, "cpus_per_worker": 0.5}
    space_path = root / "views.yaml"
    space_path.write_text(yaml.safe_dump(space, sort_keys=False))
    env = {**os.environ, "XDG_CACHE_HOME": str(root / "cache"), "PYTHONUNBUFFERED": "1"}
    done = run_tune(["--space", space_path, "--address", ray_cluster.address, "--storage", root / "runs",
                     "--report"], env, timeout=420)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    experiment = root / "runs" / "views"
    rows = pq.read_table(experiment / "results.parquet").to_pylist()
    assert len(rows) == NUM_TRIALS
    return SimpleNamespace(experiment=experiment, rows=rows, out=done.stdout, env=env, root=root)


@pytest.mark.timeout(600)
def test_report_renders_in_a_real_browser(sweep):
    page = sweep.experiment / "report.html"
    assert f"report           {page}" in sweep.out
    html = page.read_text()
    # Self-contained: plotly.js inlined, nothing fetched (plotly.js only names CDNs for maps it is not asked for).
    assert "<script>/**\n* plotly.js v" in html and not re.search(r"<(script|img|link)[^>]+(src|href)=.http", html)
    completed = sum(row["status"] == "completed" for row in sweep.rows)
    # history, point_ap curves, slot AP curves, parallel coordinates, LR/momentum, and importances
    # (PED-ANOVA) when at least two trials completed.
    expected = 5 + (completed >= 2)
    seen = load_page(page, ARTIFACTS / "report.png")
    assert seen["errors"] == []
    assert seen["figures"] == seen["claimed"] == expected, seen
    assert (ARTIFACTS / "report.png").stat().st_size > 50_000
    assert html.count("<figure><img") == 2 * 3  # three validation images: truth and prediction
    for row in sweep.rows:
        assert f"<td>{row['trial_id']}" in html


@pytest.mark.timeout(300)
def test_report_command_on_a_sweep_without_results_yet(sweep, tmp_path):
    copy = tmp_path / "runs" / "views"
    shutil.copytree(sweep.experiment, copy)
    (copy / "results.parquet").unlink()  # as a sweep interrupted before its end leaves it
    (copy / "report.html").unlink()
    done = run_tune(["report", "--storage", tmp_path / "runs", "--name", "views"], sweep.env, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    html = (copy / "report.html").read_text()
    assert "leaderboard from trials.json" in html
    assert html.count("<tr class=") == NUM_TRIALS

    wrong = run_tune(["report", "--storage", tmp_path / "runs", "--name", "nope"], sweep.env, timeout=60)
    assert wrong.returncode == 2
    assert wrong.stderr.strip().splitlines() == [
        f"tune.py: error: report: no sweep at {tmp_path / 'runs' / 'nope'} (no sweep.json there): "
        "check --storage and --name"]


REPORT_READS = ("sweep.json", "trials.json", "results.parquet", "optuna.journal", "best_checkpoint.txt")


@pytest.mark.timeout(300)
def test_report_command_on_s3_storage(sweep):
    """The sweep's records in a bucket (moto on 127.0.0.1) as a sweep on s3:// leaves them:
    the report reads them there, fetches the best checkpoint from there and writes there."""
    import pyarrow.fs

    s3 = S3Server()
    try:
        storage_uri = s3.uri("sweeps")
        fs = s3.filesystem()
        prefix = f"{s3.bucket}/sweeps/views"
        best = Path((sweep.experiment / "best_checkpoint.txt").read_text().strip())
        relative_best = best.relative_to(sweep.experiment).as_posix()
        saved = json.loads((sweep.experiment / "sweep.json").read_text())
        saved["experiment"] = storage_uri.replace("/sweeps?", "/sweeps/views?")
        uploads = {name: (sweep.experiment / name).read_bytes() for name in REPORT_READS}
        uploads["sweep.json"] = json.dumps(saved).encode()
        uploads["best_checkpoint.txt"] = f"s3://{prefix}/{relative_best}\n".encode()  # as Ray reports it: no query
        for row in sweep.rows:
            uploads[f"trial_{row['trial_id']}/result.json"] = (
                sweep.experiment / f"trial_{row['trial_id']}" / "result.json").read_bytes()
        for name, data in uploads.items():
            fs.create_dir(f"{prefix}/{Path(name).parent.as_posix()}".rstrip("/."), recursive=True)
            with fs.open_output_stream(f"{prefix}/{name}") as stream:
                stream.write(data)
        pyarrow.fs.copy_files(str(best), f"{prefix}/{relative_best}", destination_filesystem=fs)

        env = {**sweep.env, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_EC2_METADATA_DISABLED": "true"}
        done = run_tune(["report", "--storage", storage_uri, "--name", "views"], env, timeout=240)
        assert done.returncode == 0, done.stderr[-3000:]
        html = s3.read("sweeps/views/report.html").decode()
    finally:
        s3.stop()
    assert f"s3://{prefix}/{relative_best}" in html
    assert html.count("<figure><img") == 2 * 3  # the checkpoint fetched from the bucket predicted
    assert html.count('class="plotly-graph-div"') >= 5 and "leaderboard from results.parquet" in html


def _get(url: str) -> dict:
    with urllib.request.urlopen(url, timeout=30) as answer:
        return json.load(answer)


@pytest.mark.timeout(300)
def test_optuna_dashboard_reads_the_journal(sweep):
    assert any(row["status"] == "pruned" for row in sweep.rows), "the seeded sweep pruned no trial"
    port = free_port()
    dashboard = subprocess.Popen(
        [str(Path(sys.executable).parent / "optuna-dashboard"), "--host", "127.0.0.1", "--port", str(port),
         "--server", "wsgiref", "--quiet", str(sweep.experiment / "optuna.journal")],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                studies = _get(f"{base}/api/studies")["study_summaries"]
                break
            except (urllib.error.URLError, ConnectionError):
                assert dashboard.poll() is None, dashboard.stdout.read()[-2000:]
                assert time.monotonic() < deadline, "optuna-dashboard did not answer in 120 s"
                time.sleep(0.5)
        (study,) = [s for s in studies if s["study_name"] == "views"]
        detail = _get(f"{base}/api/studies/{study['study_id']}")
    finally:
        dashboard.kill()
        dashboard.wait(timeout=30)

    by_tune_id = {}
    for trial in detail["trials"]:
        attrs = {a["key"]: a["value"] for a in trial["user_attrs"]}
        by_tune_id[attrs["tune_trial_id"]] = (trial, attrs)
    assert set(by_tune_id) == {row["trial_id"] for row in sweep.rows}
    for row in sweep.rows:
        trial, attrs = by_tune_id[row["trial_id"]]
        assert trial["state"] == {"completed": "Complete", "pruned": "Pruned"}[row["status"]]
        steps = [v["step"] for v in trial["intermediate_values"]]
        assert steps == list(range(1, row["epochs"] + 1))
        assert trial["intermediate_values"][-1]["value"] == pytest.approx(row["final_point_ap"])
        assert (attrs.get("baseline") == "True") == row["baseline"]
    baseline_trial, _ = next(by_tune_id[row["trial_id"]] for row in sweep.rows if row["baseline"])
    assert baseline_trial["number"] == 0
    assert {p["name"]: p["param_external_value"] for p in baseline_trial["params"]} == {
        "optim.lr": "0.003", "optim.warmup": "none"}


TRAIN_TAGS = ("train/loss", "train/loss_point", "train/loss_edge", "train/lr", "train/momentum",
              "train/images_per_s")
VAL_TAGS = tuple(f"val/{kind}_{m}" for kind in ("point", "slot") for m in ("precision", "recall", "ap"))


@pytest.mark.timeout(300)
def test_tensorboard_shows_one_run_per_trial_named_by_its_id_and_parameters(sweep):
    from tensorboard.backend.event_processing.plugin_event_multiplexer import EventMultiplexer
    from tensorboard.plugins.hparams import plugin_data_pb2
    from tensorboard.util import tensor_util

    space = yaml.safe_load(SMOKE.read_text())
    steps_per_epoch = 16 // space["experiment"]["overrides"]["data.batch_size"]  # 16 synthetic training images
    log_interval = space["experiment"]["overrides"]["train.log_interval"]
    # What `tensorboard --logdir runs/views` lists: every directory under it that holds event files.
    board = EventMultiplexer(tensor_size_guidance={"scalars": 0})
    board.AddRunsFromDirectory(str(sweep.experiment))
    board.Reload()
    expected = {}
    for row in sweep.rows:
        name = f"lr={row['optim.lr']:.3g},warmup={row['optim.warmup']}"
        if row["optim.warmup_epochs"] is not None:
            name += f",warmup_epochs={row['optim.warmup_epochs']:.3g}"
        expected[f"trial_{row['trial_id']}/{name}"] = row
    assert sorted(board.Runs()) == sorted(expected)  # the engine's run of each trial, and nothing else

    for run_name, row in expected.items():
        events = board.GetAccumulator(run_name)
        tags = set(events.Tags()["tensors"])
        assert set(TRAIN_TAGS) | set(VAL_TAGS) <= tags, sorted(tags)
        epoch_steps = [steps_per_epoch * e for e in range(1, row["epochs"] + 1)]
        for tag in VAL_TAGS + ("train/images_per_s",):
            assert [e.step for e in events.Tensors(tag)] == epoch_steps, tag
        logged = list(range(log_interval, steps_per_epoch * row["epochs"] + 1, log_interval))
        for tag in TRAIN_TAGS[:-1]:
            assert [e.step for e in events.Tensors(tag)] == logged, tag
        final_ap = tensor_util.make_ndarray(events.Tensors("val/point_ap")[-1].tensor_proto).item()
        assert final_ap == pytest.approx(row["final_point_ap"], rel=1e-6)

        # The trial's parameters in the HParams tab.
        start = plugin_data_pb2.HParamsPluginData.FromString(
            events.PluginTagToContent("hparams")["_hparams_/session_start_info"]).session_start_info
        hparams = {key: value.number_value if value.HasField("number_value") else value.string_value
                   for key, value in start.hparams.items()}
        searched = {key: row[key] for key in ("optim.lr", "optim.warmup", "optim.warmup_epochs")
                    if row[key] is not None}
        assert hparams.keys() == searched.keys(), (hparams, searched)
        for key, value in searched.items():
            assert hparams[key] == (pytest.approx(value) if isinstance(value, float) else value), key
