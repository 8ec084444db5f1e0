"""The benchmarks that start a local Ray (sweep_overhead, recovery), once each at their
smallest size, as tests/test_benchmarks.py runs the others: both sides of each comparison
ran, and the last line's figures are the table's. No timing is asserted."""
from __future__ import annotations

import re

import pytest

from test_benchmarks import run_small


def sweep_overhead_compared(stdout: str, values: dict[str, float]) -> None:
    """A no-op trial timed bare, ours and in process; a report with a checkpoint timed."""
    totals = {}
    for variant in ("bare", "ours", "ours, 1 worker"):
        row = re.search(rf"^{re.escape(variant)}\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)\s+([\d.]+)$", stdout, re.M)
        assert row, (variant, stdout)
        totals[variant] = [float(v) for v in row.groups()]
        assert totals[variant][3] > 0, totals
    assert values["ratio"] == pytest.approx(totals["ours"][4], abs=0.006)  # the table's "/ bare"
    assert values["trainer_trial_s"] == totals["ours"][3] and values["in_process_trial_s"] == totals["ours, 1 worker"][3]
    assert re.search(r"^ours: RayReporter\.report with the checkpoint\s+[\d.]+", stdout, re.M), stdout
    assert values["report_ckpt_s"] > 0


def recovery_compared(stdout: str, values: dict[str, float]) -> None:
    """The kill was measured: a restarted worker group resumed within one checkpoint interval."""
    kills = re.findall(r"^ours\s+\d+\s+\d+\s+\d+\s+\d+\s", stdout, re.M)
    assert len(kills) == 1, stdout  # --small: one kill of ours
    said = re.search(r"^ours: recovery \(median\) ([\d.]+) s; most steps lost (\d+), checkpoint interval (\d+) steps",
                     stdout, re.M)
    assert said and [float(v) for v in said.groups()] == [values["recovery_s"], values["lost_steps"],
                                                           values["ckpt_interval_steps"]], stdout
    assert values["recovery_s"] > 0 and 0 <= values["lost_steps"] <= values["ckpt_interval_steps"], values


@pytest.mark.parametrize("name, compared, timeout", [
    ("sweep_overhead", sweep_overhead_compared, 900),
    ("recovery", recovery_compared, 600),
])
def test_benchmark_computes_its_comparison(name, compared, timeout):
    run_small(name, [], compared, timeout)
