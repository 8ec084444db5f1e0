"""Cost metrics (psdet.cost): FLOPs counted by torch's FlopCounterMode, the latency as the
median of the timed runs after the warm-up, and the engine and `psdet eval` reporting them."""
from __future__ import annotations

import itertools
import json
from pathlib import Path

import pytest
import torch

from psdet.cli import main
from psdet.config import load_config
from psdet.cost import CPU_THREADS, TIMED_RUNS, WARMUP_RUNS, CostMeter, forward_gflops, inference_latency_ms
from psdet.models import build_model, count_parameters

TINY = ["-o", "data.image_size=128", "-o", "data.batch_size=8", "-o", "train.epochs=1", "-o", "train.progress=false"]


class OneConv(torch.nn.Module):
    """A 'detector' whose predict is one 3x3 convolution, 3 -> 8 channels, padding 1."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
        self.calls = 0

    def predict(self, image: torch.Tensor) -> torch.Tensor:
        self.calls += 1
        return self.conv(image)


def test_gflops_are_counted_by_torch_two_per_multiply_add():
    # Worked by hand: 16 x 16 outputs x 8 channels, each 3 x 3 x 3 multiply-adds = 55,296 MACs.
    assert forward_gflops(OneConv(), torch.rand(1, 3, 16, 16)) == pytest.approx(2 * 55_296 / 1e9)


def test_latency_is_the_median_of_the_timed_runs_after_the_warmup():
    model = OneConv()
    # A fake clock: run i takes i + 1 ms (start, end pairs), so 20 runs have median 10.5 ms.
    ticks = itertools.chain.from_iterable((0.0, (i + 1) / 1000) for i in range(TIMED_RUNS))
    latency = inference_latency_ms(model, torch.rand(1, 3, 8, 8), clock=lambda: next(ticks))
    assert latency == pytest.approx(10.5)
    assert model.calls == WARMUP_RUNS + TIMED_RUNS
    seen = []
    model.predict = lambda image: seen.append(torch.get_num_threads())
    before = torch.get_num_threads()
    inference_latency_ms(model, torch.rand(1, 3, 8, 8))
    assert set(seen) == {CPU_THREADS} and torch.get_num_threads() == before  # timed on one thread, then put back
    with pytest.raises(ValueError):
        inference_latency_ms(model, torch.rand(1, 3, 8, 8), runs=0)


def test_meter_counts_params_and_flops_once_and_times_every_call():
    cfg = load_config("ps_gat_tiny", ["data.image_size=128"])
    model = build_model(cfg.model, cfg.data.max_points).train()
    meter = CostMeter(model, torch.rand(1, 3, 128, 128))
    calls = []
    original = model.predict
    model.predict = lambda image: calls.append(1) or original(image)
    first = meter.measure()
    assert len(calls) == 1 + WARMUP_RUNS + TIMED_RUNS  # one counted forward, then the timing
    second = meter.measure()
    assert len(calls) == 1 + 2 * (WARMUP_RUNS + TIMED_RUNS)
    assert first["params"] == second["params"] == count_parameters(model)
    assert first["gflops"] == second["gflops"] > 0 and first["latency_ms"] > 0
    assert model.training  # put back as it was


def _gflops(overrides: list[str]) -> tuple[int, float]:
    cfg = load_config("ps_gat_cpu_sweep", overrides)
    model = build_model(cfg.model, cfg.data.max_points).eval()
    size = cfg.data.image_size
    return count_parameters(model), forward_gflops(model, torch.rand(1, 3, size, size))


def test_architecture_keys_change_the_measured_cost():
    params, gflops = _gflops([])
    params_small, gflops_small = _gflops(["data.image_size=128"])
    params_wide, gflops_wide = _gflops(["model.depth_factor=8"])
    assert params_small == params and 3.5 < gflops / gflops_small < 4.1  # convolutions scale with pixels
    assert params_wide > 3 * params and gflops_wide > 3 * gflops  # twice the width, about four times the work


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> tuple[Path, Path]:
    data = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(data), "--train", "16", "--val", "4", "--seed", "1"]) == 0
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "-c", "ps_gat_tiny", "--data", str(data), "--out", str(out), *TINY]) == 0
    return data, out


def test_every_evaluation_reports_cost_and_eval_prints_it(trained_run, capsys):
    data, out = trained_run
    reported = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    cfg = load_config("ps_gat_tiny", ["data.image_size=128"])
    params = count_parameters(build_model(cfg.model, cfg.data.max_points))
    assert reported and all(row["params"] == params and row["gflops"] > 0 and row["latency_ms"] > 0
                            for row in reported)

    capsys.readouterr()
    assert main(["eval", "-c", "ps_gat_tiny", "--data", str(data), "--ckpt", str(out), "--json", *TINY]) == 0
    metrics = json.loads(capsys.readouterr().out)
    assert metrics["params"] == params and metrics["gflops"] == pytest.approx(reported[-1]["gflops"])
    assert metrics["latency_ms"] > 0
    assert main(["eval", "-c", "ps_gat_tiny", "--data", str(data), "--ckpt", str(out), *TINY]) == 0
    text = capsys.readouterr().out
    assert "ms per image at batch 1 on cpu" in text and f"{params:,} parameters" in text and "GFLOPs" in text
