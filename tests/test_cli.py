"""`psdet` as a user runs it: every user mistake is one line on stderr and exit code 2."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from psdet.cli import main

REPO = Path(__file__).resolve().parents[1]
TINY = ["-o", "data.image_size=128", "-o", "data.batch_size=8", "-o", "train.epochs=1", "-o", "train.progress=false"]


@pytest.fixture(scope="module")
def synth_data(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("synth")
    assert main(["synth", "--out", str(root), "--train", "16", "--val", "4", "--seed", "1"]) == 0
    return root


@pytest.fixture(scope="module")
def trained_run(synth_data, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("run")
    assert main(["train", "-c", "ps_gat_tiny", "--data", str(synth_data), "--out", str(out), *TINY]) == 0
    return out


def _one_line_error(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert "Traceback" not in err
    for needle in needles:
        assert needle in err, err
    return err


@pytest.mark.parametrize(
    ("argv", "needles"),
    [
        (["train", "-c", "ps_gatt"], ["ps_gatt", "did you mean 'ps_gat'"]),
        (["train", "-c", "ps_gat_tiny", "-o", "optim.lrr=0.1"], ["optim.lrr", "did you mean 'optim.lr'"]),
        (["train", "-c", "ps_gat_tiny", "-o", "optim.lr"], ["key=value"]),
        (["train", "-c", "ps_gat_tiny", "-o", "train.epochs=many"], ["train.epochs", "integer"]),
        (["train", "-c", "ps_gat_tiny", "-o", "model.backbone=vgg19"], ["model.backbone", "vgg16"]),
        (["train", "-c", "ps_gat_tiny", "--data", "/nonexistent/ps2.0"], ["/nonexistent/ps2.0"]),
        (["eval", "-c", "ps_gat_tiny", "--ckpt", "/nonexistent/ckpt"], ["/nonexistent/ckpt"]),
        (["describe", "-c", "ps_gat", "-o", "data.image_size=500"], ["data.image_size", "multiple of 32"]),
        (["synth", "--out", "/nonexistent/synth", "--workers", "0"], ["--workers must be >= 1"]),
    ],
)
def test_user_mistakes_exit_2_with_one_line(argv, needles, capsys, tmp_path):
    argv = [a.replace("/nonexistent", str(tmp_path / "nonexistent")) for a in argv]
    needles = [n.replace("/nonexistent", str(tmp_path / "nonexistent")) for n in needles]
    assert main([*argv, "--out", str(tmp_path / "out")] if argv[0] == "train" else argv) == 2
    _one_line_error(capsys, *needles)


def test_bad_yaml_file_names_the_file(tmp_path, capsys):
    bad = tmp_path / "bad.yaml"
    bad.write_text("_base_: ps_gat_tiny.yaml\nmodel: {backbone: darknet\n")
    assert main(["describe", "-c", str(bad)]) == 2
    _one_line_error(capsys, str(bad), "invalid YAML")


def test_unknown_key_in_file_names_file_and_closest_key(tmp_path, capsys):
    bad = tmp_path / "typo.yaml"
    bad.write_text("_base_: ps_gat_tiny.yaml\nmodel:\n  graph:\n    gat_layer: 2\n")
    assert main(["describe", "-c", str(bad)]) == 2
    _one_line_error(capsys, str(bad), "model.graph.gat_layer", "did you mean 'model.graph.gat_layers'")


def test_base_inheritance(tmp_path):
    from psdet.config import load_config

    child = tmp_path / "child.yaml"
    child.write_text("_base_: ps_gat.yaml\noptim:\n  lr: 0.001\n")
    cfg = load_config(child)
    assert cfg.optim.lr == 0.001 and cfg.model.backbone == "vgg16" and cfg.optim.pct_start == 0.4


def test_corrupt_checkpoint_exits_2(trained_run, tmp_path, capsys):
    import shutil

    from psdet import checkpoint as ckpt

    (newest,) = ckpt.list_checkpoints(trained_run / "checkpoints")
    broken = tmp_path / newest.name
    shutil.copytree(newest, broken)
    (broken / ckpt.STATE_FILE).write_bytes(b"not a checkpoint")
    assert main(["eval", "-c", "ps_gat_tiny", "--ckpt", str(broken)]) == 2
    _one_line_error(capsys, str(broken), "corrupt")


@pytest.mark.parametrize(
    ("config", "overrides", "expected"),
    [
        ("ps_gat", [], "38,773,985"),
        ("ps_gat", ["-o", "model.backbone=darknet"], "41,508,609"),
        ("ps_dmpr", [], "30,307,168"),
    ],
)
def test_describe_parameter_counts_match_the_original(config, overrides, expected, capsys):
    assert main(["describe", "-c", config, *overrides]) == 0
    assert capsys.readouterr().out.strip().splitlines()[-1].endswith(f"{expected} parameters")


def test_eval_json_and_predict_draw(trained_run, synth_data, tmp_path, capsys):
    assert main(["eval", "-c", "ps_gat_tiny", "--data", str(synth_data), "--ckpt", str(trained_run), "--json",
                 *TINY]) == 0
    metrics = json.loads(capsys.readouterr().out)
    for key in ("point_precision", "point_recall", "point_ap", "slot_precision", "slot_recall", "slot_ap"):
        assert 0.0 <= metrics[key] <= 1.0
    assert metrics["images"] == 4

    images = sorted((synth_data / "testing" / "all").glob("*.jpg"))[:2]
    drawn = tmp_path / "drawn.png"
    assert main(["predict", "--ckpt", str(trained_run), *map(str, images), "--draw", str(drawn)]) == 0
    results = json.loads(capsys.readouterr().out)
    assert [r["image"] for r in results] == list(map(str, images))
    assert all(r["width"] == 600 and r["height"] == 600 for r in results)
    assert (tmp_path / "drawn-0.png").is_file() and (tmp_path / "drawn-1.png").is_file()
    assert all(entry[-1] >= 0.5 for r in results for entry in r["points"] + r["slots"])

    assert main(["predict", "--ckpt", str(trained_run), str(images[0]), "--min-score", "0"]) == 0
    everything = json.loads(capsys.readouterr().out)
    assert len(everything["points"]) > len(results[0]["points"])  # the tiny run leaves low-score points
    kept = [p for p in everything["points"] if p[-1] >= 0.5]
    assert kept == results[0]["points"] and len(everything["slots"]) >= len(results[0]["slots"])


@pytest.mark.parametrize("value", ["1.5", "-0.1", "high"])
def test_predict_min_score_out_of_range_exits_2(value, tmp_path, capsys):
    with pytest.raises(SystemExit) as exit_info:
        main(["predict", "--ckpt", str(tmp_path), "image.jpg", "--min-score", value])
    assert exit_info.value.code == 2
    assert "--min-score" in capsys.readouterr().err


def test_module_entry_point_exits_2_without_traceback(tmp_path):
    result = subprocess.run([sys.executable, "-m", "psdet", "eval", "-c", "ps_gat_tiny", "--ckpt",
                             str(tmp_path / "missing")], capture_output=True, text=True, timeout=120, cwd=REPO)
    assert result.returncode == 2
    assert result.stderr.strip().splitlines() == [
        f"psdet eval: error: checkpoint '{tmp_path / 'missing'}' does not exist"
    ]
