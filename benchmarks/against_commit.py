"""This checkout against an earlier commit, side by side: training speed, the train step, a trial's fixed cost.

    python benchmarks/against_commit.py --base REV [--rounds N] [--no-sweep] [--small] [--config NAME --image-size N]

The base commit's tree is exported (`git archive REV`) into a scratch folder and run with
the same Python and packages as this checkout (its folder first on PYTHONPATH); "head" is
this working tree, uncommitted changes included. Rounds alternate which side runs first.
Each side runs its own code on the same inputs:
1. training: `psdet train` (as `python -m psdet.cli`) of ps_gat_tiny at 128x128 (or
   `--config` at `--image-size`, e.g. ps_gat_cpu_sweep at 256, the demo's) on one
   synthetic dataset (written once, by head's `psdet synth`), one torch thread, 4 epochs; per
   run the process's wall seconds and the median of the engine's images/s over its epochs
   after the first (from its log: an epoch of 200 images is about 4 s, and one epoch's figure
   varies by 10-20% from run to run, so a last-epoch figure is noise);
2. the train step: each side's `benchmarks/train_step.py --small`, the "ours" row of its
   full-step table (ps_gat_tiny 128x128, batch 4), ms;
3. (unless --no-sweep) a trial's fixed cost: each side's `benchmarks/sweep_overhead.py
   --small`, its no-op trial through a TorchTrainer (`trainer_trial_s`) and in the trial's
   own process (`in_process_trial_s`), seconds; a local Ray each run.
The table shows medians over the rounds, head / base (times: above 1 is slower; images/s:
below 1 is slower) and the spread: the larger side's (max - min) / median over the rounds, in
percent, the scale below which a ratio is noise. Last line: `against_commit: train_ratio=... images_ratio=...
step_ratio=... [trainer_trial_ratio=... in_process_trial_ratio=...] base=REV`, every ratio
head / base. `--small` is the CI smoke test: 16 images, one epoch, one round, no sweep.
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT / "benchmarks")]

from common import Column, Table, median, summary_line  # noqa: E402
from psdet.config import load_config  # noqa: E402
from psdet.errors import ConfigError  # noqa: E402

IMAGES_PER_S = re.compile(r"epoch \d+/\d+: loss .*, ([\d.]+) images/s")
LAST_LINE = re.compile(r"^(\w+): (\w+=\S+(?: \w+=\S+)*)$", re.M)


def fail(message: str) -> None:
    print(f"against_commit: {message}", file=sys.stderr)
    raise SystemExit(2)


def export_commit(rev: str, into: Path) -> str:
    """`rev`'s tree into `into`; -> its short hash. A name git does not know exits 2."""
    resolved = subprocess.run(["git", "rev-parse", "--short", f"{rev}^{{commit}}"], cwd=ROOT, capture_output=True,
                              text=True, timeout=30)
    if resolved.returncode != 0:
        fail(f"--base {rev}: not a commit of {ROOT} ({resolved.stderr.strip()})")
    archive = into.with_suffix(".tar")
    subprocess.run(["git", "archive", "--format=tar", f"--output={archive}", resolved.stdout.strip()], cwd=ROOT,
                   check=True, timeout=120)
    with tarfile.open(archive) as tar:
        tar.extractall(into, filter="data")
    archive.unlink()
    return resolved.stdout.strip()


class Side:
    """One checkout's code: `root` first on PYTHONPATH, the same interpreter."""

    def __init__(self, name: str, root: Path) -> None:
        self.name, self.root = name, root

    def run(self, args: list[str], timeout: float) -> tuple[float, str]:
        """-> (wall seconds, stdout + stderr) of `python ARGS` in this checkout."""
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(self.root), os.environ.get("PYTHONPATH", "")]),
               "OMP_NUM_THREADS": "1", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0", "PYTHONUNBUFFERED": "1"}
        start = time.time()
        done = subprocess.run([sys.executable, *args], cwd=self.root, env=env, capture_output=True, text=True,
                              timeout=timeout)
        seconds = time.time() - start
        output = done.stdout + done.stderr
        if done.returncode != 0:
            raise SystemExit(f"against_commit: {self.name}: python {' '.join(args)} exited {done.returncode}:\n"
                             f"{output[-3000:]}")
        return seconds, output


def spread(values: list[float]) -> float:
    """(max - min) / median of one side's figure over the rounds, in percent."""
    return 100.0 * (max(values) - min(values)) / median(values)


def last_line_values(output: str, name: str) -> dict[str, str]:
    found = [match for match in LAST_LINE.finditer(output) if match[1] == name]
    if not found:
        raise SystemExit(f"against_commit: no '{name}: ...' line in:\n{output[-2000:]}")
    return dict(pair.split("=", 1) for pair in found[-1][2].split())


def train(side: Side, data: Path, out: Path, epochs: int, config: str, image_size: int) -> dict[str, float]:
    seconds, output = side.run(["-m", "psdet.cli", "train", "-c", config, "--data", str(data), "--out", str(out),
                                "-o", f"data.image_size={image_size}", "-o", f"train.epochs={epochs}",
                                "-o", "train.progress=false"], timeout=1800)
    speeds = IMAGES_PER_S.findall(output)
    if not speeds:
        raise SystemExit(f"against_commit: {side.name}: no 'images/s' in psdet train's output:\n{output[-2000:]}")
    speeds = [float(speed) for speed in speeds]
    return {"train_s": seconds, "images_per_s": median(speeds[1:] or speeds)}


def train_step(side: Side) -> dict[str, float]:
    _, output = side.run(["benchmarks/train_step.py", "--small"], timeout=900)
    row = re.search(r"^ps_gat_tiny 128x128 b4\s+ours\s+(?:[\d.]+\s+){4}([\d.]+)", output, re.M)
    if not row:
        raise SystemExit(f"against_commit: {side.name}: no 'ours' row in train_step's table:\n{output[-2000:]}")
    return {"step_ms": float(row[1])}


def sweep_overhead(side: Side) -> dict[str, float]:
    _, output = side.run(["benchmarks/sweep_overhead.py", "--small"], timeout=1800)
    values = last_line_values(output, "sweep_overhead")
    return {"trainer_trial_s": float(values["trainer_trial_s"]), "in_process_trial_s": float(values["in_process_trial_s"])}


# each figure's row title and its ratio's name in the last line
FIGURES = {
    "train_s": ("psdet train, wall s", "train_ratio"),
    "images_per_s": ("psdet train, images/s", "images_ratio"),
    "step_ms": ("train step (ours row), ms", "step_ratio"),
    "trainer_trial_s": ("no-op TorchTrainer trial, s", "trainer_trial_ratio"),
    "in_process_trial_s": ("no-op one-worker trial, s", "in_process_trial_ratio"),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--base", required=True, help="the commit to compare against (any name git knows)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds, each running both sides (default 3)")
    parser.add_argument("--no-sweep", action="store_true", help="leave out part 3 (it starts a local Ray per run)")
    parser.add_argument("--small", action="store_true", help="CI smoke test: 16 images, 1 epoch, 1 round, no sweep")
    parser.add_argument("--config", default="ps_gat_tiny", help="the config part 1 trains (default ps_gat_tiny)")
    parser.add_argument("--image-size", type=int, default=128, help="its data.image_size (default 128)")
    args = parser.parse_args()
    if args.rounds < 1:
        fail(f"--rounds {args.rounds}: at least 1")
    try:
        load_config(args.config, [f"data.image_size={args.image_size}"])
    except ConfigError as exc:
        fail(f"--config {args.config} --image-size {args.image_size}: {exc}")
    rounds, images, epochs = (1, 16, 1) if args.small else (args.rounds, 200, 4)
    with_sweep = not (args.small or args.no_sweep)

    with tempfile.TemporaryDirectory(prefix="psdet-against-commit-") as tmp:
        scratch = Path(tmp)
        base_hash = export_commit(args.base, scratch / "base")
        sides = [Side("base", scratch / "base"), Side("head", ROOT)]
        data = scratch / "data"
        sides[1].run(["-m", "psdet.cli", "synth", "--out", str(data), "--train", str(images), "--val", "8"], timeout=600)
        print(f"this checkout ({ROOT}) against {args.base} ({base_hash}): {args.config} at {args.image_size}x"
              f"{args.image_size}, {images} + 8 synthetic images, {epochs} epoch(s); {rounds} round(s), one torch "
              f"thread, {os.cpu_count()} cores", flush=True)
        figures: dict[str, dict[str, list[float]]] = {side.name: {} for side in sides}
        for index in range(rounds):
            for side in sides if index % 2 == 0 else sides[::-1]:
                run = scratch / f"run-{side.name}-{index}"
                measured = {**train(side, data, run, epochs, args.config, args.image_size), **train_step(side)}
                if with_sweep:
                    measured.update(sweep_overhead(side))
                for key, value in measured.items():
                    figures[side.name].setdefault(key, []).append(value)
                print(f"round {index + 1} {side.name}: " + ", ".join(f"{k} {v:.2f}" for k, v in measured.items()),
                      flush=True)

    print(f"\nmedians over {rounds} round(s); head / base: for times above 1 is slower, for images/s below 1 is")
    table = Table(Column("figure", "<34"), Column("base", "10.2f"), Column("head", "10.2f"), Column("head / base", "11.3f"),
                  Column("spread %", "8.1f"))
    table.print_header()
    ratios = {}
    for key in figures["head"]:
        base, head = median(figures["base"][key]), median(figures["head"][key])
        title, ratio_name = FIGURES[key]
        ratios[ratio_name] = head / base
        table.print_row(title, base, head, head / base, max(spread(figures[side][key]) for side in figures))
    print(summary_line("against_commit", **{name: f"{value:.3f}" for name, value in ratios.items()}, base=base_hash))


if __name__ == "__main__":
    main()
