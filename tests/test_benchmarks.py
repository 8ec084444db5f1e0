"""Each benchmark runs once at its smallest size and ends with its `NAME: key=value ...` line.

Smoke tests: they show that every benchmark still runs against the current code and
prints what the README's figures are read from. No timing is asserted.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAST_LINE = re.compile(r"^(?P<name>\w+): (?P<pairs>\w+=\S+(?: \w+=\S+)*)$")


def _last_line_values(stdout: str, name: str) -> dict[str, float]:
    lines = stdout.strip().splitlines()
    assert lines, "the benchmark printed nothing"
    match = LAST_LINE.match(lines[-1])
    assert match and match["name"] == name, f"last line is not '{name}: key=value ...': {lines[-1]!r}"
    return {key: float(value) for key, value in (pair.split("=", 1) for pair in match["pairs"].split())}


def _run(command: list[str], timeout: float, env: dict[str, str] | None = None) -> str:
    completed = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=timeout,
                               env={**os.environ, "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", **(env or {})})
    assert completed.returncode == 0, f"{' '.join(command)} exited {completed.returncode}:\n" \
                                      f"{completed.stdout[-2000:]}\n{completed.stderr[-3000:]}"
    return completed.stdout


@pytest.mark.parametrize("name, extra_args, keys, timeout", [
    ("postprocess", [], ["ratio", "untrained_ratio", "trained_ratio"], 300),
    ("train_step", [], ["ratio", "tiny_ratio", "rss_ratio", "targets_losses_ratio"], 300),
    ("sweep_overhead", [], ["ratio", "report_ckpt_s", "report_pct_of_epoch", "rss_growth_pct"], 900),
    ("recovery", [], ["recovery_s", "lost_steps"], 600),
    ("input_pipeline", ["--workers", "0", "2"], ["ratio", "ours_img_s", "ref_img_s"], 300),
])
def test_benchmark_prints_its_last_line(name, extra_args, keys, timeout):
    stdout = _run([sys.executable, f"benchmarks/{name}.py", "--small", *extra_args], timeout)
    values = _last_line_values(stdout, name)
    assert set(keys) <= set(values), f"missing {set(keys) - set(values)} in {values}"
    assert all(math.isfinite(values[key]) for key in keys), values
    # every figure is a time, a ratio, a count or a share, except a growth, which the driver's
    # RSS may show as a small shrink
    assert all(values[key] >= 0 for key in keys if not key.endswith("_growth_pct")), values
    if name == "recovery":  # not a timing: a restarted worker group resumes within one checkpoint interval
        assert values["lost_steps"] <= values["ckpt_interval_steps"], values


def test_gpu_script_runs_end_to_end_on_cpu(tmp_path):
    stdout = _run(["bash", "benchmarks/gpu_step.sh"], timeout=600, env={
        "OUT": str(tmp_path), "PYTHON": sys.executable,
        "TRAIN_STEP_ARGS": "--small --amp-device cpu", "POSTPROCESS_ARGS": "--small",
    })
    assert "last lines:" in stdout
    assert sorted(p.name for p in tmp_path.iterdir()) == ["gpu.txt", "postprocess.txt", "train_step.txt"]
    _last_line_values((tmp_path / "train_step.txt").read_text(), "train_step")
    _last_line_values((tmp_path / "postprocess.txt").read_text(), "postprocess")


def test_gpu_train_script_runs_end_to_end_on_cpu(tmp_path):
    """benchmarks/gpu_train.sh (the CLI on CUDA) at its smallest, on the CPU."""
    stdout = _run(["bash", "benchmarks/gpu_train.sh"], timeout=300, env={
        "OUT": str(tmp_path), "PYTHON": sys.executable, "DEVICE": "cpu", "OMP_NUM_THREADS": "1",
        "TRAIN": "8", "VAL": "2", "EPOCHS": "1", "BIG_BATCH": "4", "BIG_SIZE": "128", "BIG_WORKERS": "0",
        "INPUT_ARGS": "--small",
    })
    _last_line_values((tmp_path / "input_pipeline.txt").read_text(), "input_pipeline")
    assert stdout.strip().splitlines()[-1] == "gpu_train: ok device=cpu"
    for run in ("tiny_fp32", "tiny_bf16", "tiny_fp16", "ps_gat_bf16"):
        assert re.search(r"epoch 1/1: loss .* images/s", (tmp_path / f"{run}.log").read_text()), run
    evaluated = json.loads((tmp_path / "tiny_bf16_eval.json").read_text())
    assert evaluated["images"] == 2 and "slot_ap" in evaluated
    predicted = json.loads((tmp_path / "predict.json").read_text())
    assert [Path(p["image"]).name for p in predicted] == ["test_000000.jpg", "test_000001.jpg"]
    assert (tmp_path / "predict-0.png").stat().st_size > 0 and (tmp_path / "predict-1.png").stat().st_size > 0
