"""Each benchmark runs once at its smallest size and ends with its `NAME: key=value ...` line.

Smoke tests: every benchmark still runs against the current code, prints what the
README's figures are read from, and computes its comparison: both sides ran (each has its
row in the table), the outputs agree where the benchmark checks agreement, and the last
line's figures are the table's. Only the printed output is read; no timing is asserted.
The benchmarks that start a Ray are in tests/test_benchmarks_on_ray.py.
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


def postprocess_compared(stdout: str, values: dict[str, float]) -> None:
    """Both sides ran on all four cases, on maps with points to compare, and agreed."""
    rows = re.findall(r"^\s*\d+x\d+\s+(\d+)x\d+\s+(untrained|trained)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+"
                      r"([\d.]+)\s+([\d.]+)\s+([\d.]+)x$", stdout, re.M)
    table = {(int(grid), case): [float(v) for v in rest] for grid, case, *rest in rows}
    assert sorted(table) == [(8, "trained"), (8, "untrained"), (16, "trained"), (16, "untrained")], stdout
    for candidates, points, slots, reference_ms, ours_ms, ratio in table.values():
        assert points > 0 and reference_ms > 0 and ours_ms > 0, table
    assert sum(row[2] for row in table.values()) > 0, table  # some slots were paired and compared
    assert "outputs identical to the reference in every case" in stdout
    assert values["ratio"] == pytest.approx(table[(16, "untrained")][5], abs=0.051)
    assert values["trained_ratio"] == pytest.approx(table[(16, "trained")][5], abs=0.051)


def train_step_compared(stdout: str, values: dict[str, float]) -> None:
    """Targets and losses checked against the loops; the full step timed for both variants."""
    assert "targets and losses equal to the reference" in stdout
    for variant in ("reference", "ours"):  # forward, loss, backward, optim, step, step CPU (ms)
        row = re.search(rf"^ps_gat_tiny 128x128 b4\s+{variant}\s+((?:[\d.]+\s+){{5}}[\d.]+)", stdout, re.M)
        assert row, (variant, stdout)
        forward, loss, backward, optim, step, step_cpu = map(float, row[1].split())
        assert forward > 0 and backward > 0 and step > 0 and step_cpu > 0, row[0]
    wall = re.search(r"reference / ours = ([\d.]+) \(wall\)", stdout)
    assert wall and float(wall[1]) == values["ratio"] == values["tiny_ratio"], stdout


def input_pipeline_compared(stdout: str, values: dict[str, float]) -> None:
    """Both loaders ran at each worker count, and their first batches agreed."""
    rows = re.findall(r"^\s*(\d+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+(\S+e[-+]\d+)$", stdout, re.M)
    assert [int(row[0]) for row in rows] == [0, 2], stdout
    for workers, reference, ours, ratio, max_diff in rows:
        assert float(reference) > 0 and float(ours) > 0 and 0 <= float(max_diff) <= 2e-5, rows
    assert values["workers"] == 2 and values["ratio"] == pytest.approx(float(rows[-1][3]), abs=0.006)


@pytest.mark.parametrize("name, extra_args, compared, timeout", [
    ("postprocess", [], postprocess_compared, 300),
    ("train_step", [], train_step_compared, 300),
    ("input_pipeline", ["--workers", "0", "2"], input_pipeline_compared, 300),
])
def test_benchmark_computes_its_comparison(name, extra_args, compared, timeout):
    run_small(name, extra_args, compared, timeout)


def run_small(name: str, extra_args: list[str], compared, timeout: float) -> None:
    """`benchmarks/NAME.py --small`; its last line's figures finite and sane, then `compared`."""
    stdout = _run([sys.executable, f"benchmarks/{name}.py", "--small", *extra_args], timeout)
    values = _last_line_values(stdout, name)
    assert all(math.isfinite(value) for value in values.values()), values
    # every figure is a time, a ratio, a count or a share, except a growth, which the driver's
    # RSS may show as a small shrink
    assert all(value >= 0 for key, value in values.items() if not key.endswith("_growth_pct")), values
    compared(stdout, values)


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


def test_against_commit_runs_both_sides_and_reports_their_ratios():
    """benchmarks/against_commit.py at its smallest, against HEAD: the exported commit and this
    checkout each trained and timed a step, and every ratio is the table's head / base."""
    stdout = _run([sys.executable, "benchmarks/against_commit.py", "--base", "HEAD", "--small"], timeout=600)
    for side in ("base", "head"):
        assert re.search(rf"^round 1 {side}: train_s [\d.]+, images_per_s [\d.]+, step_ms [\d.]+$", stdout, re.M), stdout
    last = re.fullmatch(r"against_commit: train_ratio=(\S+) images_ratio=(\S+) step_ratio=(\S+) base=(\w+)",
                        stdout.strip().splitlines()[-1])
    head = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=REPO, capture_output=True, text=True,
                          timeout=30, check=True).stdout.strip()
    assert last and last[4] == head, stdout[-1000:]
    rows = re.findall(r"^(?:psdet train, wall s|psdet train, images/s|train step \(ours row\), ms)\s+"
                      r"([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", stdout, re.M)
    assert len(rows) == 3, stdout
    for (base_value, head_value, ratio, spread), said in zip(rows, last.groups()[:3]):
        assert float(spread) == 0.0  # one round
        base, head_ = float(base_value), float(head_value)
        assert base > 0 and head_ > 0
        # The ratio is of the unrounded values: within what rounding the two printed ones allows
        # (CI saw 1.042 printed against 1.0398 from the rounded pair), plus the ratio's own rounding.
        half_unit = max(_half_unit(base_value), _half_unit(head_value))
        assert float(ratio) == pytest.approx(head_ / base, abs=half_unit / base * (1 + head_ / base) + 0.0005)
        assert float(said) == pytest.approx(float(ratio), abs=0.002)


def _half_unit(printed: str) -> float:
    """Half the last printed digit of `printed`: how far rounding may have moved it."""
    decimals = len(printed.split(".")[1]) if "." in printed else 0
    return 0.5 * 10 ** -decimals


def test_against_commit_names_a_base_git_does_not_know_in_one_line_and_exits_2():
    done = subprocess.run([sys.executable, "benchmarks/against_commit.py", "--base", "no-such-commit", "--small"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("against_commit: --base no-such-commit: not a commit of "), line


def test_against_commit_names_a_config_it_cannot_load_in_one_line_and_exits_2():
    done = subprocess.run([sys.executable, "benchmarks/against_commit.py", "--base", "HEAD", "--config", "ps_gat_tiny",
                           "--image-size", "100"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stdout + done.stderr
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("against_commit: --config ps_gat_tiny --image-size 100: ") and "multiple of 32" in line, line
