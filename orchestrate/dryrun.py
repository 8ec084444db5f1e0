"""`tune.py --dry-run`: what a sweep would do, without training anything.

Prints the validated space, the trial budget, the resources of one trial and how many
fit at once on the cluster (orchestrate.placement, as the live sweep places them), and
the LR (warmup included) of the first configs the sweep will sample, as text or, with
`--plot`, as a PNG drawn with Pillow.

Importing this module imports Ray (the searcher, the connection): call
`orchestrate.ray_env.prepare` first.
"""
from __future__ import annotations

import math
import os
import textwrap
from pathlib import Path
from typing import Any

import numpy as np
import optuna
import ray
import torch
from PIL import Image, ImageDraw

from orchestrate import connection, placement
from orchestrate.data import LABEL_DIR, check_dataset, synthetic_root
from orchestrate.search import build_searcher, strip_baseline
from orchestrate.space import SweepSpec, describe_space, trial_config
from psdet.optim import lr_curve, warmup_steps
from psdet.sampler import ResumableSampler

SPARK = "▁▂▃▄▅▆▇█"
COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]


def sample_params(spec: SweepSpec, count: int) -> list[dict[str, Any]]:
    """The first `count` parameter sets a fresh sweep draws: its own searcher (same
    sampler, same seed, the baseline first) over a throwaway in-memory study."""
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    searcher = build_searcher(spec, optuna.storages.InMemoryStorage())
    return [strip_baseline(searcher.suggest(f"preview{index}"))[0] for index in range(count)]


def steps_per_epoch(num_train_images: int, batch_size: int, workers: int) -> int:
    """Optimizer steps per epoch of a trial: full batches per rank, as the engine's sampler counts them."""
    return ResumableSampler(num_train_images, max(batch_size // workers, 1), seed=0,
                            world_size=workers).batches_per_epoch


def asha_rungs(spec: SweepSpec) -> list[int]:
    rungs, epoch = [], spec.scheduler.grace_period
    while epoch < spec.max_epochs:
        rungs.append(int(epoch))
        epoch *= spec.scheduler.reduction_factor
    return rungs


def lr_curves(spec: SweepSpec, samples: list[dict[str, Any]], num_train_images: int) -> list[dict[str, Any]]:
    curves = []
    for params in samples:
        cfg = trial_config(spec, params)
        steps = steps_per_epoch(num_train_images, cfg.data.batch_size, spec.resources.workers)
        lr = lr_curve(cfg.optim, steps, cfg.train.epochs) if steps > 0 else np.zeros(0)
        curves.append({"params": params, "lr": lr, "steps_per_epoch": steps, "epochs": cfg.train.epochs,
                       "warmup_steps": warmup_steps(cfg.optim, steps) if steps > 0 else 0})
    return curves


def sparkline(values: np.ndarray, width: int = 48) -> str:
    if len(values) == 0:
        return ""
    picks = values[np.linspace(0, len(values) - 1, min(width, len(values))).round().astype(int)]
    top = float(picks.max()) or 1.0
    return "".join(SPARK[min(int(v / top * (len(SPARK) - 1) + 0.5), len(SPARK) - 1)] for v in picks)


def curve_text(curve: dict[str, Any]) -> str:
    lr = curve["lr"]
    if len(lr) == 0:
        return "     (the training set is smaller than one batch: no steps)"
    peak = int(np.argmax(lr))
    warm = curve["warmup_steps"]
    return (f"     lr {sparkline(lr)}  {lr[0]:.3g} -> peak {lr[peak]:.3g} at epoch "
            f"{peak / curve['steps_per_epoch']:.2f} -> {lr[-1]:.3g}"
            f"{f'; warmup {warm} steps' if warm else ''} ({curve['steps_per_epoch']} steps/epoch)")


def plot_curves(curves: list[dict[str, Any]], path: Path, title: str) -> None:
    """LR (log scale) against epoch for each sampled config, one colour each, legend below."""
    legends = [textwrap.wrap(f"{i + 1}. {_params_text(c['params'])}", 140) for i, c in enumerate(curves)]
    width, left, right, top, plot_h = 900, 80, 20, 30, 300
    height = top + plot_h + 50 + 16 * sum(len(lines) for lines in legends)
    image = Image.new("RGB", (width, height), "white")
    draw = ImageDraw.Draw(image)
    plot_w = width - left - right
    positive = np.concatenate([c["lr"][c["lr"] > 0] for c in curves] or [np.ones(1)])
    if positive.size == 0:
        positive = np.ones(1)
    log_low, log_high = math.floor(math.log10(positive.min())), math.ceil(math.log10(positive.max()))
    log_high = max(log_high, log_low + 1)
    max_epochs = max((c["epochs"] for c in curves), default=1)

    def y_of(lr: np.ndarray) -> np.ndarray:
        clipped = np.log10(np.clip(lr, 10.0**log_low, None))
        return top + plot_h - plot_h * (clipped - log_low) / (log_high - log_low)

    draw.text((left, 8), title, fill="black")
    draw.rectangle([left, top, left + plot_w, top + plot_h], outline="black")
    for power in range(log_low, log_high + 1):
        y = float(y_of(np.array([10.0**power]))[0])
        draw.line([left - 4, y, left, y], fill="black")
        draw.text((8, y - 6), f"1e{power}", fill="black")
    tick = max(1, math.ceil(max_epochs / 12))
    for epoch in range(0, max_epochs + 1, tick):
        x = left + plot_w * epoch / max_epochs
        draw.line([x, top + plot_h, x, top + plot_h + 4], fill="black")
        draw.text((x - 3, top + plot_h + 6), str(epoch), fill="black")
    draw.text((left + plot_w // 2 - 20, top + plot_h + 20), "epoch", fill="black")
    y_text = top + plot_h + 40
    for index, (curve, lines) in enumerate(zip(curves, legends)):
        colour = COLOURS[index % len(COLOURS)]
        lr, steps = curve["lr"], curve["steps_per_epoch"]
        if len(lr) > 1:
            xs = left + plot_w * (np.arange(len(lr)) / steps) / max_epochs
            draw.line(list(zip(xs.tolist(), y_of(lr).tolist())), fill=colour, width=2)
        for line in lines:
            draw.text((left, y_text), line, fill=colour)
            y_text += 16
    path.parent.mkdir(parents=True, exist_ok=True)
    image.save(path)


def _params_text(params: dict[str, Any]) -> str:
    return ", ".join(f"{k}={v:.3g}" if isinstance(v, float) else f"{k}={v}" for k, v in params.items())


def report(spec: SweepSpec, *, cluster: str, nodes: list[dict[str, float]], use_gpu: bool, fit: int,
           num_train_images: int, data_note: str, plot: Path | None = None, samples: int = 3) -> str:
    """The whole dry-run text (and the PNG when `plot` is given)."""
    r = spec.resources
    in_process = r.workers == 1
    per_trial_cpu = (0 if in_process else r.driver_cpus) + r.workers * r.cpus_per_worker
    per_trial_gpu = r.workers * r.gpus_per_worker if use_gpu else 0
    at_once = min(fit, spec.experiment.max_concurrent)
    totals = {key: sum(node.get(key, 0) for node in nodes) for key in ("CPU", "GPU")}
    rungs = asha_rungs(spec) if spec.scheduler.type == "asha" else []
    lines = [
        describe_space(spec),
        "",
        "budget",
        f"  {spec.experiment.num_samples} trials x up to {spec.max_epochs} epochs = at most "
        f"{spec.experiment.num_samples * spec.max_epochs} trial-epochs"
        + (f"; ASHA may stop a trial after epoch {', '.join(map(str, rungs))}" if rungs else ""),
        f"  time budget {spec.experiment.time_budget_s:g} s" if spec.experiment.time_budget_s else "  no time budget",
        "",
        "resources",
        (f"  one trial: {per_trial_cpu:g} CPU, one worker in the trial's own process (no TorchTrainer)"
         if in_process else
         f"  one trial: {per_trial_cpu:g} CPU ({r.driver_cpus:g} driver + {r.workers} workers x {r.cpus_per_worker:g})")
        + (f", {per_trial_gpu:g} GPU" if use_gpu else ", no GPU"),
        f"  {cluster}: {len(nodes)} node(s), {totals['CPU']:g} CPU, {totals['GPU']:g} GPU",
        f"  {fit} trial(s) fit at once; the sweep runs {at_once} at a time (max_concurrent "
        f"{spec.experiment.max_concurrent})" + ("  <-- NOT ONE TRIAL FITS" if fit == 0 else ""),
        "",
        f"data: {data_note}",
        "",
        f"LR of the first {samples} sampled configs (warmup included):",
    ]
    curves = lr_curves(spec, sample_params(spec, samples), num_train_images)
    for index, curve in enumerate(curves, start=1):
        lines += [f"  {index}. {_params_text(curve['params'])}", curve_text(curve)]
    if plot is not None:
        plot_curves(curves, plot, f"{spec.name}: LR of the first {samples} sampled configs")
        lines.append(f"plot: {plot}")
    return "\n".join(lines)


def count_training_images(data_root: Path, train_split: str) -> int:
    return len(list((data_root / LABEL_DIR / train_split).glob("*.json")))



def run(spec: SweepSpec, address: str | None, data: str | None, plot: Path | None) -> int:
    """`tune.py --dry-run`: the cluster at `address` (asked, then left), else this machine
    as a local Ray would see it; prints `report` and returns the exit code."""
    if address:
        description = connection.connect(address)
        try:
            nodes = connection.alive_nodes()
        finally:
            ray.shutdown()
        cluster = f"cluster at {address}"
    else:
        nodes = [{"CPU": float(os.cpu_count() or 1), "GPU": float(torch.cuda.device_count())}]
        cluster = "this machine (no cluster given; a local Ray would get these)"
        description = None
    use_gpu = placement.use_gpu(spec, nodes)
    train_split = spec.base_tree["data"]["train_split"]
    if data:
        root = check_dataset(data)
        num_train = count_training_images(root, train_split)
        data_note = f"{root} ({num_train} training images)"
    else:
        synth = spec.experiment.synthetic_data
        num_train = synth.train
        data_note = (f"synthetic, {synth.train} training + {synth.val} validation images, made on the first "
                     f"real run into {synthetic_root(synth)}")
    if description:
        print(description)
    print(report(spec, cluster=cluster, nodes=nodes, use_gpu=use_gpu,
                 fit=placement.trials_that_fit(spec, use_gpu, nodes), num_train_images=num_train,
                 data_note=data_note, plot=plot))
    return 0
