"""Train-step speed and memory: psdet's vectorised targets and losses against the loop reference.

    python benchmarks/train_step.py [--small] [--cuda-only] [--amp-device cuda|cpu]

Ours = `GatDetector.loss` (psdet/models/targets.py). Reference = the same model, whose
targets and losses are the loops of psdet/testing/reference_loops.py, written like the original.
Both get the same synthetic batches (random marks, 2..max_points per image, entrance
pairs between consecutive marks); nothing is read from disk.

1. Targets + losses alone, batches like ps_gat's (16x16 grid, batch 16, max_points 10).
2. The full CPU train step, `psdet.engine.train_step` itself (schedule, batch to model
   input, forward, loss, backward through the AMP scaler, grad-norm clip, optimizer step),
   of ps_gat_tiny (at its config's size and batch) and ps_gat (VGG16, 512x512, batch 2),
   the reference's loss handed to it as `loss_fn`. One model; ours and the reference
   alternate step by step, so both see the same weights' cost. The phases are marked
   from outside the step (see `StepRunner`).
3. Peak memory: CPU peak RSS (VmHWM: ru_maxrss would carry this parent's peak over
   fork + exec) of each variant in its own fresh process;
   on CUDA, `torch.cuda.max_memory_allocated` over a step.
4. On CUDA (or `--amp-device cpu`, only to check the code path): fp32 against bf16
   autocast + channels_last at ps_gat, 512x512, batch 32, in images/s; prints the card.

CPU timings use one torch thread (a second one on a busy 2-core machine makes every
OpenMP region wait for a descheduled core: steps 2-100x slower and erratic). Variants
interleave, rotating order each round; tables show medians (and +-spread, half the
interquartile range, where there are enough rounds), in wall time and, for the full
step, in process CPU time too (less moved by other work on a shared machine). Targets
and losses of ours and the reference are checked equal before timing. Last line:
`train_step: ratio=... tiny_ratio=... gat_ratio=... cpu_time_ratio=... rss_ratio=...
targets_losses_ratio=... [cuda_bf16_speedup=... cuda_mem_ratio=...]`: ratio = reference
time / ours of the full step at the main size (ps_gat; ps_gat_tiny with --small),
cpu_time_ratio the same in CPU time, rss_ratio = our peak RSS / the reference's (goal
<= 1), targets_losses_ratio = part 1's "all" row, cuda_bf16_speedup = images/s of
bf16 + channels_last / fp32 (goal >= 2), cuda_mem_ratio = our peak / the reference's.
`--cuda-only` (benchmarks/gpu_step.sh) runs part 3's CUDA half and part 4 alone.
`--small` is the CI smoke test: ps_gat_tiny at 128x128, batch 4, a few rounds.
"""
from __future__ import annotations

import argparse
import copy
import math
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path[:0] = [str(ROOT), str(ROOT / "benchmarks")]

from common import (  # noqa: E402
    Column, Table, child_result, interleaved, median, peak_rss_mib, reset_peak_rss, rss_mib, run_child, spread,
    summary_line,
)
from psdet.config import load_config  # noqa: E402
from psdet.distributed import DistContext  # noqa: E402
from psdet.engine import build_run, train_step  # noqa: E402
from psdet.models import build_model  # noqa: E402
from psdet.models.targets import edge_loss, point_loss, point_targets  # noqa: E402
from psdet.testing import reference_loops as ref  # noqa: E402

MAX_POINTS = 10
STEPS_PER_EPOCH = 100  # only feeds the LR schedule


@dataclass(frozen=True)
class Size:
    """A train-step size: config name, network input (pixels) and batch."""

    config: str
    image_size: int
    batch_size: int

    @property
    def label(self) -> str:
        return f"{self.config} {self.image_size}x{self.image_size} b{self.batch_size}"

    @classmethod
    def defaults(cls, config: str) -> "Size":
        """The config's own input size and batch."""
        data = load_config(config).data
        return cls(config, data.image_size, data.batch_size)


# ----------------------------------------------------------------------------- data


def make_batch(batch_size: int, image_size: int, generator: torch.Generator) -> dict:
    """A collated batch as docs/CONTRACTS.md describes: 2..MAX_POINTS marks per image,
    marks 2k -> 2k+1 a slot entrance with probability 0.7."""
    num_marks = torch.randint(2, MAX_POINTS + 1, (batch_size,), generator=generator)
    xy = 0.05 + 0.9 * torch.rand(batch_size, MAX_POINTS, 2, generator=generator)
    direction = (2 * torch.rand(batch_size, MAX_POINTS, 1, generator=generator) - 1) * math.pi
    shape = torch.randint(0, 2, (batch_size, MAX_POINTS, 1), generator=generator).float()
    real = torch.arange(MAX_POINTS) < num_marks.unsqueeze(1)
    marks = torch.cat([xy, direction, shape], dim=-1) * real.unsqueeze(-1)
    adjacency = torch.zeros(batch_size, MAX_POINTS, MAX_POINTS, dtype=torch.bool)
    for b, count in enumerate(num_marks.tolist()):
        for first in range(0, count - 1, 2):
            adjacency[b, first, first + 1] = bool(torch.rand((), generator=generator) < 0.7)
    return {
        "image": torch.rand(batch_size, 3, image_size, image_size, generator=generator),
        "marks": marks,
        "num_marks": num_marks,
        "slot_adjacency": adjacency,
    }


def to_device(batch: dict, device: torch.device, channels_last: bool = False) -> dict:
    moved = {key: value.to(device) for key, value in batch.items()}
    if channels_last:
        moved["image"] = moved["image"].contiguous(memory_format=torch.channels_last)
    return moved


# ----------------------------------------------------------------------------- losses


def our_loss(model, outputs: dict, batch: dict):
    return model.loss(outputs, batch)


def reference_loss(model, outputs: dict, batch: dict):
    """GatDetector.loss with the original's loops (targets built on the CPU, as it did)."""
    point_map = outputs["point_map"]
    targets, mask = ref.point_targets_loop(batch["marks"], batch["num_marks"], *point_map.shape[-2:])
    loss_point = ref.point_loss_loop(point_map, targets.to(point_map.device), mask.to(point_map.device))
    loss_edge = ref.edge_loss_loop(outputs["edge_logits"], batch["slot_adjacency"], batch["num_marks"])
    total = model.cfg.weight_point * loss_point + model.cfg.weight_edge * loss_edge
    return total, {"loss_point": loss_point, "loss_edge": loss_edge}


LOSSES = {"ours": our_loss, "reference": reference_loss}


def check_losses_agree(model, batch: dict) -> None:
    """Ours and the reference on the same outputs; exits if they differ."""
    with torch.no_grad():
        outputs = model(batch["image"], batch["marks"], batch["num_marks"])
        ours, our_terms = our_loss(model, outputs, batch)
        reference, reference_terms = reference_loss(model, outputs, batch)
    for name in ("loss_point", "loss_edge"):
        if not torch.allclose(our_terms[name].float(), reference_terms[name].float(), rtol=1e-4, atol=1e-6):
            raise SystemExit(f"train_step: {name} differs: ours {float(our_terms[name])}, "
                             f"reference {float(reference_terms[name])}")


# ----------------------------------------------------------------------------- one step


class StepRunner:
    """One run (model, optimizer, AMP scaler) stepped by `psdet.engine.train_step`, the
    engine's own step, with a chosen loss.

    `step(loss_name)` runs one step and records its phases' seconds in
    `self.phases[loss_name]`, marked from outside psdet: the loss function passed to
    `train_step` marks where the forward ended and where the loss ended; torch's
    post-accumulate-grad hooks on the parameters mark where the backward ended (the last to
    fire); the rest, up to the end of the step, is the clip and the optimizer step.
    """

    def __init__(self, config: str, device: torch.device, autocast_dtype: torch.dtype | None = None,
                 channels_last: bool = False, model: torch.nn.Module | None = None) -> None:
        cfg = load_config(config)
        if model is None:
            torch.manual_seed(0)
            model = build_model(cfg.model, MAX_POINTS)
        self.run = build_run(cfg, DistContext(rank=0, world_size=1, local_rank=0, device=device), STEPS_PER_EPOCH,
                             raw_model=model)
        self.run.raw_model.train()
        # The engine takes both from the config, on CUDA only; the benchmark sets them on any device.
        if channels_last:
            self.run.raw_model.to(memory_format=torch.channels_last)
        self.run.channels_last = channels_last
        self.run.autocast_dtype = autocast_dtype
        self.device = device
        self.global_step = 0
        self.phases: dict[str, list[dict[str, float]]] = {}
        self.batch: dict | None = None
        self._backward_done = 0.0
        for parameter in self.run.raw_model.parameters():
            parameter.register_post_accumulate_grad_hook(self._mark_backward)

    @property
    def model(self) -> torch.nn.Module:
        return self.run.raw_model

    @property
    def autocast_dtype(self) -> torch.dtype | None:
        return self.run.autocast_dtype

    @autocast_dtype.setter
    def autocast_dtype(self, dtype: torch.dtype | None) -> None:
        self.run.autocast_dtype = dtype

    def _mark_backward(self, parameter: torch.Tensor) -> None:
        self._backward_done = time.perf_counter()

    def set_batch(self, batch: dict) -> None:
        self.batch = to_device(batch, self.device, self.run.channels_last)

    def step(self, loss_name: str = "ours") -> None:
        # Phases are host times: exact on the CPU; on CUDA only the whole step is (one sync at the end).
        sync = torch.cuda.synchronize if self.device.type == "cuda" else (lambda: None)
        loss = LOSSES[loss_name]
        marks: dict[str, float] = {}

        def timed_loss(outputs: dict, batch: dict):
            marks["forward"] = time.perf_counter()
            result = loss(self.run.raw_model, outputs, batch)
            marks["loss"] = time.perf_counter()
            return result

        start = time.perf_counter()
        train_step(self.run, self.batch, self.global_step, loss_fn=timed_loss)
        sync()
        end = time.perf_counter()
        self.global_step += 1
        self.phases.setdefault(loss_name, []).append({
            "forward": marks["forward"] - start, "loss": marks["loss"] - marks["forward"],
            "backward": self._backward_done - marks["loss"], "optimizer": end - self._backward_done,
        })


# ----------------------------------------------------------------------------- 1. targets + losses


def bench_targets_and_losses(repeats: int, inner: int) -> float:
    """Part 1; returns reference time / ours of targets + both losses, forward and backward."""
    batch_size, grid = 16, 16
    generator = torch.Generator().manual_seed(1)
    batch = make_batch(batch_size, 32, generator)
    marks, num_marks, adjacency = batch["marks"], batch["num_marks"], batch["slot_adjacency"]
    point_map = torch.rand(batch_size, 3, grid, grid, generator=generator).requires_grad_()
    edge_logits = torch.randn(batch_size, MAX_POINTS, MAX_POINTS, generator=generator).requires_grad_()
    targets, mask = point_targets(marks, num_marks, grid, grid)
    loop_targets, loop_mask = ref.point_targets_loop(marks, num_marks, grid, grid)
    directional = point_targets(marks, num_marks, grid, grid, directional=True)
    loop_directional = ref.point_targets_loop(marks, num_marks, grid, grid, directional=True)
    same = (torch.allclose(targets, loop_targets, atol=1e-6) and torch.equal(mask, loop_mask)
            and torch.allclose(directional[0], loop_directional[0], atol=1e-6)
            and torch.allclose(edge_loss(edge_logits, adjacency, num_marks),
                               ref.edge_loss_loop(edge_logits, adjacency, num_marks), rtol=1e-5)
            and torch.allclose(point_loss(point_map, targets, mask), ref.point_loss_loop(point_map, loop_targets, loop_mask)))
    if not same:
        raise SystemExit("train_step: vectorised targets or losses differ from the loop reference")

    def both_losses(targets_fn, point_loss_fn, edge_loss_fn) -> None:
        t, m = targets_fn(marks, num_marks, grid, grid)
        total = 100 * point_loss_fn(point_map, t, m) + edge_loss_fn(edge_logits, adjacency, num_marks)
        total.backward()

    cases: dict[str, tuple[Callable[[], object], Callable[[], object]]] = {
        "point targets": (lambda: point_targets(marks, num_marks, grid, grid),
                          lambda: ref.point_targets_loop(marks, num_marks, grid, grid)),
        "point targets, dmpr": (lambda: point_targets(marks, num_marks, grid, grid, directional=True),
                                lambda: ref.point_targets_loop(marks, num_marks, grid, grid, directional=True)),
        "point loss": (lambda: point_loss(point_map, targets, mask),
                       lambda: ref.point_loss_loop(point_map, loop_targets, loop_mask)),
        "edge loss": (lambda: edge_loss(edge_logits, adjacency, num_marks),
                      lambda: ref.edge_loss_loop(edge_logits, adjacency, num_marks)),
        "all, fwd + bwd": (lambda: both_losses(point_targets, point_loss, edge_loss),
                           lambda: both_losses(ref.point_targets_loop, ref.point_loss_loop, ref.edge_loss_loop)),
    }
    print(f"1. targets + losses: batch {batch_size}, {grid}x{grid} grid, max_points {MAX_POINTS}, "
          f"{float(num_marks.float().mean()):.1f} marks/image; median of {repeats}")
    table = Table(Column("part", "<20"), Column("reference ms", "12.3f"), Column("ours ms", "8.3f"), Column("ratio", "7.1f"))
    table.print_header()
    overall = float("nan")
    for name, (ours, reference) in cases.items():
        times = interleaved({"reference": reference, "ours": lambda ours=ours: [ours() for _ in range(inner)]}, repeats)
        reference_ms, ours_ms = 1e3 * median(times["reference"]), 1e3 * median(times["ours"]) / inner
        table.print_row(name, reference_ms, ours_ms, reference_ms / ours_ms)
        overall = reference_ms / ours_ms
    print("targets and losses equal to the reference\n")
    return overall


# ----------------------------------------------------------------------------- 2. full CPU step


def bench_cpu_step(size: Size, repeats: int, table: Table) -> tuple[float, float]:
    """Part 2 for one size; prints one row per variant; -> reference / ours in wall time and in CPU time."""
    runner = StepRunner(size.config, torch.device("cpu"))
    runner.set_batch(make_batch(size.batch_size, size.image_size, torch.Generator().manual_seed(2)))
    check_losses_agree(runner.model, runner.batch)
    cpu_times: dict[str, list[float]] = {}
    times = interleaved({name: (lambda name=name: runner.step(name)) for name in LOSSES}, repeats, cpu_times=cpu_times)
    totals = {name: median(values) for name, values in times.items()}
    cpu_totals = {name: median(values) for name, values in cpu_times.items()}
    for name in LOSSES:
        phases = runner.phases[name][-repeats:]
        parts = [1e3 * median([p[key] for p in phases]) for key in ("forward", "loss", "backward", "optimizer")]
        noise = spread(times[name])
        table.print_row(size.label, name, *parts, 1e3 * totals[name], 1e3 * cpu_totals[name],
                        "" if math.isnan(noise) else f"+-{100 * noise:.0f}%")
    ratio = totals["reference"] / totals["ours"]
    cpu_ratio = cpu_totals["reference"] / cpu_totals["ours"]
    print(f"{'':>{table.columns[0].width}} reference / ours = {ratio:.2f} (wall), {cpu_ratio:.2f} (CPU time)", flush=True)
    return ratio, cpu_ratio


# ----------------------------------------------------------------------------- 3. memory


def rss_child(variant: str, size: Size, steps: int) -> None:
    """In a fresh process: build, then `steps` steps of one variant; print the peaks of RSS."""
    runner = StepRunner(size.config, torch.device("cpu"))
    runner.set_batch(make_batch(size.batch_size, size.image_size, torch.Generator().manual_seed(2)))
    build_peak, after_build = peak_rss_mib(), rss_mib()
    reset = reset_peak_rss()
    for _ in range(steps):
        runner.step(variant)
    steps_peak = peak_rss_mib()
    child_result({"peak_rss_mib": max(build_peak, steps_peak), "after_build_mib": after_build,
                  "steps_peak_mib": steps_peak if reset else float("nan")})


def bench_cpu_rss(sizes: list[Size], rounds: int, steps: int) -> dict[str, float]:
    """Part 3, CPU: peak RSS of each variant in its own process, alternating; -> ours / reference per size."""
    print(f"3. CPU peak RSS (VmHWM), each variant in a fresh process, {steps} steps; median of {rounds}")
    table = Table(Column("size", "<26"), Column("variant", "<10"), Column("peak MiB", "9.0f"),
                  Column("after build MiB", "15.0f"), Column("steps peak MiB", "14.0f"), Column("steps add MiB", "13.0f"))
    table.print_header()
    ratios = {}
    for size in sizes:
        results: dict[str, list[dict]] = {name: [] for name in LOSSES}
        for round_index in range(rounds):
            order = list(LOSSES) if round_index % 2 == 0 else list(LOSSES)[::-1]
            for name in order:
                args = ["--child-rss", name, "--config", size.config, "--image-size", str(size.image_size),
                        "--batch-size", str(size.batch_size), "--steps", str(steps)]
                results[name].append(run_child(Path(__file__), args, timeout=1800))
        peaks = {}
        for name in LOSSES:
            peaks[name] = median([r["peak_rss_mib"] for r in results[name]])
            after_build = median([r["after_build_mib"] for r in results[name]])
            steps_peak = median([r["steps_peak_mib"] for r in results[name]])
            table.print_row(size.label, name, peaks[name], after_build, steps_peak, steps_peak - after_build)
        ratios[size.config] = peaks["ours"] / peaks["reference"]
    print()
    return ratios


def bench_device_losses(device: torch.device, size: Size, repeats: int) -> tuple[float, float]:
    """Part 3, CUDA: step time and torch.cuda.max_memory_allocated of ours and the reference,
    fp32, one model. -> (reference time / ours, our peak / the reference's; nan off CUDA)."""
    cuda = device.type == "cuda"
    runner = StepRunner(size.config, device)
    runner.set_batch(make_batch(size.batch_size, size.image_size, torch.Generator().manual_seed(2)))
    check_losses_agree(runner.model, runner.batch)
    peaks: dict[str, list[float]] = {name: [] for name in LOSSES}

    def measured(name: str) -> None:
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        runner.step(name)
        peaks[name].append(torch.cuda.max_memory_allocated() / 2**20 if cuda else float("nan"))

    times = interleaved({name: (lambda name=name: measured(name)) for name in LOSSES}, repeats)
    print(f"3b. {device.type.upper()} fp32 step and torch.cuda.max_memory_allocated, {size.label}; median of {repeats}")
    table = Table(Column("variant", "<10"), Column("step ms", "9.1f"), Column("loss ms", "8.2f"), Column("peak MiB", "9.0f"))
    table.print_header()
    for name in LOSSES:
        loss_ms = 1e3 * median([p["loss"] for p in runner.phases[name][-repeats:]])
        table.print_row(name, 1e3 * median(times[name]), loss_ms, median(peaks[name]))
    print()
    del runner
    if cuda:
        torch.cuda.empty_cache()
    return median(times["reference"]) / median(times["ours"]), median(peaks["ours"]) / median(peaks["reference"])


# ----------------------------------------------------------------------------- 4. mixed precision


def bench_amp(device: torch.device, size: Size, repeats: int, steps_per_round: int) -> dict[str, float]:
    """Part 4: images/s of fp32 and bf16 autocast, contiguous and channels_last; -> images/s by variant."""
    torch.manual_seed(0)
    cfg = load_config(size.config)
    initial = build_model(cfg.model, MAX_POINTS)
    batch = make_batch(size.batch_size, size.image_size, torch.Generator().manual_seed(3))
    contiguous = StepRunner(size.config, device, model=copy.deepcopy(initial))
    channels_last = StepRunner(size.config, device, channels_last=True, model=copy.deepcopy(initial))
    contiguous.set_batch(batch)
    channels_last.set_batch(batch)
    cuda = device.type == "cuda"
    tf32 = torch.backends.cudnn.allow_tf32
    # name -> (runner, autocast dtype, cudnn.benchmark, cudnn.allow_tf32); "fp32" is what
    # psdet.engine runs with train.precision fp32: torch's defaults (TF32 convolutions allowed).
    variants = {
        "fp32": (contiguous, None, False, tf32),
        "fp32 + channels_last": (channels_last, None, False, tf32),
        "bf16": (contiguous, torch.bfloat16, False, tf32),
        "bf16 + channels_last": (channels_last, torch.bfloat16, False, tf32),
    }
    if cuda:
        variants["fp32, TF32 off (strict)"] = (contiguous, None, False, False)
        variants["bf16 + channels_last + cudnn.benchmark"] = (channels_last, torch.bfloat16, True, tf32)
    peaks: dict[str, float] = {}

    def run(name: str) -> None:
        runner, dtype, benchmark, allow_tf32 = variants[name]
        runner.autocast_dtype = dtype
        if cuda:
            torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = benchmark, allow_tf32
            torch.cuda.reset_peak_memory_stats()
        for _ in range(steps_per_round):
            runner.step()
        if cuda:
            peaks[name] = max(peaks.get(name, 0.0), torch.cuda.max_memory_allocated() / 2**20)
            torch.backends.cudnn.benchmark, torch.backends.cudnn.allow_tf32 = False, tf32

    if cuda:
        print(f"4. CUDA mixed precision on {torch.cuda.get_device_name()}, torch {torch.__version__}, "
              f"{size.label}, defaults cudnn.allow_tf32={tf32}, "
              f"matmul.allow_tf32={torch.backends.cuda.matmul.allow_tf32}")
    else:
        print(f"4. mixed precision on the CPU (a check of the code path, not a figure), {size.label}")
    print(f"   {steps_per_round} steps per round, median of {repeats} rounds")
    times = interleaved({name: (lambda name=name: run(name)) for name in variants}, repeats, warmup=1)
    images_per_s = {name: steps_per_round * size.batch_size / median(values) for name, values in times.items()}
    table = Table(Column("variant", "<38"), Column("step ms", "9.1f"), Column("images/s", "9.1f"),
                  Column("speedup", "8.2f"), Column("peak MiB", "9.0f"))
    table.print_header()
    for name in variants:
        table.print_row(name, 1e3 * median(times[name]) / steps_per_round, images_per_s[name],
                        images_per_s[name] / images_per_s["fp32"], peaks.get(name, float("nan")))
    print()
    return images_per_s


# ----------------------------------------------------------------------------- main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="CI smoke test: ps_gat_tiny at 128x128, seconds")
    parser.add_argument("--cuda-only", action="store_true",
                        help="only the device parts, 3b and 4 (benchmarks/gpu_step.sh)")
    parser.add_argument("--amp-device", choices=["cuda", "cpu"], default=None,
                        help="device for part 4 (default: cuda when present, else skipped); cpu checks the code path")
    parser.add_argument("--child-rss", choices=list(LOSSES), help=argparse.SUPPRESS)
    parser.add_argument("--config", default="ps_gat_tiny", help=argparse.SUPPRESS)
    parser.add_argument("--image-size", type=int, default=128, help=argparse.SUPPRESS)
    parser.add_argument("--batch-size", type=int, default=4, help=argparse.SUPPRESS)
    parser.add_argument("--steps", type=int, default=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    torch.set_num_threads(1)  # two threads on a shared 2-core machine stall in every OpenMP region
    if args.child_rss:
        rss_child(args.child_rss, Size(args.config, args.image_size, args.batch_size), args.steps)
        return

    amp_device = args.amp_device or ("cuda" if torch.cuda.is_available() else None)
    if args.cuda_only and amp_device is None:
        raise SystemExit("train_step: --cuda-only needs a CUDA device (or --amp-device cpu, to check the code path)")
    results: dict[str, object] = {}
    print(f"train step, torch {torch.__version__}, {torch.get_num_threads()} CPU thread(s)")
    if not args.cuda_only:
        if args.small:
            sizes, repeats, rss_rounds, rss_steps = [Size("ps_gat_tiny", 128, 4)], 3, 1, 2
            micro_repeats, micro_inner = 3, 3
        else:
            sizes, repeats, rss_rounds, rss_steps = [Size.defaults("ps_gat_tiny"), Size("ps_gat", 512, 2)], 11, 2, 2
            micro_repeats, micro_inner = 21, 20
        targets_ratio = bench_targets_and_losses(micro_repeats, micro_inner)
        gat_repeats = max(repeats // 2, 3)
        print(f"2. full CPU train step (schedule, forward, loss, backward, clip, optimizer), ms, "
              f"median of {repeats}" + ("" if args.small else f" (ps_gat: {gat_repeats})"))
        table = Table(Column("size", "<26"), Column("variant", "<10"), Column("forward", "8.1f"), Column("loss", "7.2f"),
                      Column("backward", "9.1f"), Column("optim", "7.1f"), Column("step", "8.1f"),
                      Column("step CPU", "8.1f"), Column("spread", ">7"))
        table.print_header()
        ratios, cpu_ratios = {}, {}
        for size in sizes:
            size_repeats = repeats if size.config == "ps_gat_tiny" else gat_repeats
            ratios[size.config], cpu_ratios[size.config] = bench_cpu_step(size, size_repeats, table)
        print()
        rss_ratios = bench_cpu_rss(sizes, rss_rounds, rss_steps)
        main_size = sizes[-1].config
        results["ratio"] = ratios[main_size]
        results["tiny_ratio"] = ratios["ps_gat_tiny"]
        if "ps_gat" in ratios:
            results["gat_ratio"] = ratios["ps_gat"]
        results["cpu_time_ratio"] = cpu_ratios[main_size]
        results["rss_ratio"] = rss_ratios[main_size]
        results["targets_losses_ratio"] = f"{targets_ratio:.1f}"

    if amp_device == "cuda":
        size = Size("ps_gat", 512, 32)
        cuda_ratio, cuda_mem_ratio = bench_device_losses(torch.device("cuda"), size, repeats=3 if args.small else 5)
        images_per_s = bench_amp(torch.device("cuda"), size, repeats=3 if args.small else 5, steps_per_round=5)
        results["cuda_bf16_speedup"] = images_per_s["bf16 + channels_last"] / images_per_s["fp32"]
        results["cuda_fp32_images_per_s"] = f"{images_per_s['fp32']:.1f}"
        results["cuda_bf16_images_per_s"] = f"{images_per_s['bf16 + channels_last']:.1f}"
        results["cuda_ratio"] = cuda_ratio
        results["cuda_mem_ratio"] = cuda_mem_ratio
    elif amp_device == "cpu":
        bench_device_losses(torch.device("cpu"), Size("ps_gat_tiny", 64, 2), repeats=2)
        images_per_s = bench_amp(torch.device("cpu"), Size("ps_gat_tiny", 64, 2), repeats=2, steps_per_round=1)
        results["cpu_bf16_speedup"] = images_per_s["bf16 + channels_last"] / images_per_s["fp32"]
    print(summary_line("train_step", **results))


if __name__ == "__main__":
    main()
