"""benchmarks/chaos.py at its smallest (one fault of each kind, a fixed seed): the sweep
survives every fault, loses and duplicates no trial, and every completed trial ends with the
weights of its fault-free twin. The invariants are read from the benchmark's last line and its
table; nothing is timed."""
from __future__ import annotations

import re
import sys

import pytest

from test_benchmarks import _run

KINDS = ("worker", "node", "driver", "corrupt", "outage")


def _summary(stdout: str) -> dict[str, str]:
    last = stdout.strip().splitlines()[-1]
    assert last.startswith("chaos: "), last
    return dict(pair.split("=", 1) for pair in last.removeprefix("chaos: ").split())


@pytest.mark.timeout(900)
def test_chaos_smoke_every_fault_survived_nothing_lost_all_bit_exact():
    stdout = _run([sys.executable, "benchmarks/chaos.py", "--small"], timeout=880, env={"OMP_NUM_THREADS": "1"})
    values = _summary(stdout)
    table = {m[1]: (int(m[2]), int(m[3])) for m in re.finditer(r"^(\w+)\s+(\d+)\s+(\d+)\s", stdout, re.M)
             if m[1] in KINDS}
    assert table == {kind: (1, 1) for kind in KINDS}, stdout  # one of each injected, each survived
    assert values["faults"] == values["scheduled"] == values["survived"] == "5", values
    assert values["lost"] == "0" and values["duplicated"] == "0", values
    completed, of = values["exact"].split("/")
    assert completed == of == "3", stdout  # every trial completed, each bit for bit like its twin
    # work lost is measured, not bounded: a corrupted newest checkpoint costs two intervals, and a
    # driver resumed from Tune's state (saved every 5 s) may restart a trial from an older one
    assert 0 <= float(values["lost_steps_median"]) <= int(values["lost_steps_max"]), values
    assert int(values["ckpt_interval_steps"]) == 4, values  # 32 images in batches of 8, a report per epoch
