"""It learns: ps_gat_tiny trained briefly on synthetic parking lots finds slots.

This is the slowest test of psdet (a few minutes on 2 cores): 1000 synthetic training
images, the shipped tiny config (8 epochs), then the ps2.0 metrics on 100 held-out
images, against the same metrics of the untrained model.
"""
from __future__ import annotations

import json

import pytest
import torch

from psdet.cli import main
from psdet.config import load_config
from psdet.data import build_dataset
from psdet.distributed import DistContext
from psdet.engine import run_evaluation
from psdet.models import build_model


@pytest.mark.timeout(1800)
def test_tiny_detector_learns_slots(tmp_path, capsys):
    data, run = tmp_path / "synth", tmp_path / "run"
    assert main(["synth", "--out", str(data), "--train", "1000", "--val", "100", "--seed", "0"]) == 0
    assert main(["train", "-c", "ps_gat_tiny", "--data", str(data), "--out", str(run),
                 "-o", "train.progress=false", "-o", "train.eval_interval=8"]) == 0
    capsys.readouterr()
    assert main(["eval", "-c", "ps_gat_tiny", "--data", str(data), "--ckpt", str(run), "--json"]) == 0
    trained = json.loads(capsys.readouterr().out)

    cfg = load_config("ps_gat_tiny", [f"data.root={data}"])
    torch.manual_seed(cfg.train.seed)
    untrained_model = build_model(cfg.model, cfg.data.max_points).eval()
    val_set = build_dataset(cfg.data, cfg.data.val_split, train=False, seed=0)
    untrained = run_evaluation(untrained_model, val_set, cfg, DistContext(0, 1, 0, torch.device("cpu")))

    print(f"trained {trained}\nuntrained {untrained}")
    assert trained["images"] == 100
    assert trained["slot_ap"] >= 0.5, trained
    assert trained["slot_ap"] >= untrained["slot_ap"] + 0.4, (trained, untrained)
    assert trained["point_ap"] >= untrained["point_ap"] + 0.4, (trained, untrained)
