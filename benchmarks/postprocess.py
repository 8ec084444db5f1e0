"""Post-processing speed: psdet.postprocess (vectorised) against the originals' loops.

    python benchmarks/postprocess.py [--small] [--device cpu|cuda] [--repeats N]

Point maps shaped like a Darknet GAT's (3 channels after sigmoid) at 256x256 (8x8 cells)
and 512x512 (16x16), batch 16, in two cases:
- untrained: every cell above the confidence threshold, ~U(0.4, 0.6), offsets ~U(0, 1);
- trained: 4-8 confident peaks per image, each with weaker neighbours for NMS to
  remove, every other cell near 0.
Ours = `decode_point_map` + `slots_from_edges` on the whole batch. Reference = the
original's post-processing per image (gcn-parking-slot PointDetector.post_processing
without the model call): the loops of psdet/testing/reference_postprocess.py per cell and per
pair of candidates on the map moved to numpy once, with the same top-k cap as ours so
the outputs can be compared; the points padded into the graph's input tensor; then a
loop over the edge predictor's output tensor, one pair at a time.

Both get the same edge probabilities: a tiny psdet GAT's edge predictor on the decoded
points when psdet.models imports, else uniform random. Runs interleave, ours repeated to
last as long as one reference run (so both see the same load from other processes), one
torch thread, garbage collection off while timing (as timeit); the table shows medians;
the outputs must be identical. With --device cuda the maps, ours and the edge tensor live
on the GPU; the reference moves each map to the host and reads the edge tensor pair by
pair, as the original did. The last line is
`postprocess: ratio=X untrained_ratio=X trained_ratio=X`, ratio = reference time / ours
for the untrained maps at 16x16, batch 16.
"""
from __future__ import annotations

import argparse
import gc
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from psdet.config import ModelConfig, load_config  # noqa: E402
from psdet.postprocess import decode_point_map, slots_from_edges  # noqa: E402
from psdet.testing import reference_postprocess as ref  # noqa: E402

BATCH = 16
MAX_POINTS = 10


def make_point_map(case: str, grid: int, generator: torch.Generator) -> torch.Tensor:
    """[BATCH, 3, grid, grid]: confidence, dx, dy."""
    point_map = torch.rand(BATCH, 3, grid, grid, generator=generator)
    if case == "untrained":
        point_map[:, 0] = 0.4 + 0.2 * point_map[:, 0]
        return point_map
    point_map[:, 0] *= 0.004
    for image in point_map:
        num_peaks = int(torch.randint(4, 9, (1,), generator=generator))
        for cell in torch.randperm(grid * grid, generator=generator)[:num_peaks].tolist():
            row, col = divmod(cell, grid)
            rows, cols = slice(max(row - 1, 0), row + 2), slice(max(col - 1, 0), col + 2)
            shoulder = 0.01 + 0.2 * torch.rand(image[0, rows, cols].shape, generator=generator)
            image[0, rows, cols] = torch.maximum(image[0, rows, cols], shoulder)
            image[0, row, col] = 0.8 + 0.2 * torch.rand((), generator=generator)
    return point_map


def tiny_gat_edges(device: torch.device):
    """edges(points_xy, generator) -> [BATCH, P, P] from a tiny psdet GAT's edge predictor, or None.

    Optional: uses GatDetector.edge_logits, which is not part of the models contract.
    """
    try:
        from psdet.models import build_model

        torch.manual_seed(0)
        model = build_model(load_config("ps_gat_tiny").model, MAX_POINTS).eval().to(device)
        descriptor_dim, edge_logits = model.cfg.descriptor_dim, model.edge_logits
    except (ImportError, AttributeError):
        return None

    def edges(points_xy: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        descriptor_map = torch.randn(BATCH, descriptor_dim, 8, 8, generator=generator).to(points_xy.device)
        with torch.no_grad():
            return torch.sigmoid(edge_logits(descriptor_map, points_xy))

    return edges


def random_edges(points_xy: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    return torch.rand(BATCH, MAX_POINTS, MAX_POINTS, generator=generator).to(points_xy.device)


def candidates_per_image(point_map: torch.Tensor, cfg: ModelConfig) -> float:
    point_map = point_map.cpu()
    grid = point_map.shape[-1]
    cells = torch.arange(grid, dtype=torch.float32)
    x, y = (cells + point_map[:, 1]) / grid, (cells[:, None] + point_map[:, 2]) / grid
    low, high = cfg.boundary_thresh, 1 - cfg.boundary_thresh
    is_candidate = (point_map[:, 0] >= cfg.point_thresh) & (x >= low) & (x <= high) & (y >= low) & (y <= high)
    return float(is_candidate.sum(dim=(1, 2)).float().mean())


def run_ours(point_map, edges, cfg: ModelConfig):
    points = decode_point_map(point_map, cfg, MAX_POINTS)
    return slots_from_edges(edges, points, cfg.edge_thresh)


def run_reference(point_map, edges, cfg: ModelConfig):
    """Per image, as gcn-parking-slot's PointDetector.post_processing, minus the model call."""
    results = []
    for image, image_edges in zip(point_map, edges):
        points = ref.decode_image(
            image.detach().cpu().numpy(), cfg.point_thresh, cfg.boundary_thresh, cfg.nms_radius, cfg.max_candidates, MAX_POINTS
        )
        # The original padded the points into the graph's input tensor, then read the edge
        # predictor's output tensor pair by pair.
        points_np = np.array([p[2][:2] for p in points]).reshape(-1, 2)
        points_full = np.zeros((MAX_POINTS, 2))
        points_full[: len(points)] = points_np
        graph_input = torch.Tensor(points_full).unsqueeze(0).to(point_map.device)
        slots = ref.slots_from_edges_image(points, image_edges, cfg.edge_thresh)
        results.append((points, slots, graph_input))
    return results


def identical(ours, reference) -> bool:
    for prediction, (points, slots, _) in zip(ours, reference, strict=True):
        xy = np.array([p[2][:2] for p in points], dtype=np.float64).reshape(-1, 2)
        scores = np.array([p[0] for p in points], dtype=np.float64)
        entrances = np.array([s[1] for s in slots], dtype=np.float64).reshape(-1, 4)
        slot_scores = np.array([float(s[0]) for s in slots], dtype=np.float64)
        if not (
            np.array_equal(prediction.point_xy, xy)
            and np.array_equal(prediction.point_scores, scores)
            and np.array_equal(prediction.slot_entrances, entrances)
            and np.array_equal(prediction.slot_scores, slot_scores)
        ):
            return False
    return True


def time_calls(calls: int, function, *args) -> float:
    """Seconds per call over `calls` back-to-back calls, results dropped, GC off (as timeit)."""
    gc.collect()
    gc.disable()
    try:
        start = time.perf_counter()
        for _ in range(calls):
            function(*args)
        return (time.perf_counter() - start) / calls
    finally:
        gc.enable()


def measure(case: str, grid: int, repeats: int, max_calls: int, cfg: ModelConfig, edge_source, seed: int, device) -> dict:
    generator = torch.Generator().manual_seed(seed)
    point_map = make_point_map(case, grid, generator).to(device)
    points = decode_point_map(point_map, cfg, MAX_POINTS)
    edges = edge_source(points.xy, generator)
    ours, reference = run_ours(point_map, edges, cfg), run_reference(point_map, edges, cfg)
    if not identical(ours, reference):
        raise SystemExit(f"postprocess: outputs differ from the reference ({case}, {grid}x{grid})")
    # Ours is timed over as many calls as fill one reference run: equally long windows.
    reference_once = time_calls(1, run_reference, point_map, edges, cfg)
    ours_once = min(time_calls(1, run_ours, point_map, edges, cfg) for _ in range(3))
    calls = max(1, min(max_calls, round(reference_once / ours_once)))
    reference_times, our_times = [], []
    for _ in range(repeats):  # interleaved
        reference_times.append(time_calls(1, run_reference, point_map, edges, cfg))
        our_times.append(time_calls(calls, run_ours, point_map, edges, cfg))
    return {
        "candidates": candidates_per_image(point_map, cfg),
        "points": float(np.mean([len(p.point_xy) for p in ours])),
        "slots": float(np.mean([len(p.slot_scores) for p in ours])),
        "reference_ms": 1e3 * statistics.median(reference_times),
        "ours_ms": 1e3 * statistics.median(our_times),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--small", action="store_true", help="few, short repeats: a smoke test that takes seconds")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu", help="where the maps and ours run (default cpu)")
    parser.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 21; 3 with --small)")
    args = parser.parse_args()
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("postprocess: --device cuda, but torch sees no CUDA device")
    device = torch.device(args.device)
    torch.set_num_threads(1)
    repeats, max_calls = (3, 5) if args.small else (21, 1000)
    repeats = args.repeats or repeats
    cfg = ModelConfig()  # the original inference settings: 0.008, 0.05 border, 1/16 NMS, 64 candidates, 0.5 edges
    edge_source = tiny_gat_edges(device)
    edge_name = "tiny psdet GAT edge predictor" if edge_source else "uniform random"
    edge_source = edge_source or random_edges

    print(f"post-processing, batch {BATCH}, max_points {MAX_POINTS}, max_candidates {cfg.max_candidates}, "
          f"edges: {edge_name}, torch {torch.__version__}, "
          f"{torch.cuda.get_device_name() if device.type == 'cuda' else 'CPU'}, 1 CPU thread, median of {repeats}")
    header = f"{'input':>9} {'grid':>5} {'case':>9} {'cand/img':>8} {'pts/img':>7} {'slots/img':>9} {'reference ms':>12} {'ours ms':>8} {'ratio':>7}"
    print(header)
    print("-" * len(header))
    ratios = {}
    for seed, (size, grid) in enumerate([(256, 8), (512, 16)]):
        for case in ("untrained", "trained"):
            row = measure(case, grid, repeats, max_calls, cfg, edge_source, seed=100 * seed + len(case), device=device)
            ratio = row["reference_ms"] / row["ours_ms"]
            ratios[(grid, case)] = ratio
            print(f"{size:>5}x{size:<3} {grid:>2}x{grid:<2} {case:>9} {row['candidates']:>8.1f} {row['points']:>7.1f} "
                  f"{row['slots']:>9.1f} {row['reference_ms']:>12.2f} {row['ours_ms']:>8.3f} {ratio:>6.1f}x", flush=True)
    print("outputs identical to the reference in every case")
    untrained, trained = ratios[(16, "untrained")], ratios[(16, "trained")]
    print(f"postprocess: ratio={untrained:.2f} untrained_ratio={untrained:.2f} trained_ratio={trained:.2f}")


if __name__ == "__main__":
    main()
