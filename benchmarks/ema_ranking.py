"""Does a moving average of the weights make an early epoch's slot AP rank configurations?

    python benchmarks/ema_ranking.py [--space search_spaces/lr.yaml] [--ids 57,9,20,...] [--configs 14]
        [--decays 0.95 0.98 0.99] [--synthetic TRAIN VAL] [--jobs 2] [--out ema_ranking.json]

ASHA stops a trial on its score at a rung, so the score after epoch k has to rank
configurations the way their final score does. Each configuration (of the same Sobol draw
as `search_quality.py record`: config 0 is the baseline, `--ids` picks from the draw, else
the first `--configs`) trains once with `train.ema_decay=0`; a hook keeps one moving
average per `--decays` value (torch's AveragedModel, updated after every step, as the engine's
`train.ema_decay` does) and scores each of them at every evaluation beside the weights
themselves. The variants are side by side on the same runs, so the only difference between
them is what is scored.

Prints, per variant: the mean final slot AP, and Spearman's rank correlation of slot AP after
each epoch with the weights' own final slot AP, over the configurations. The last line is
`ema_ranking: configs=N rho_epoch3_raw=... rho_epoch3_ema0.95=... ...` (the first decay).
`--out` keeps every run's figures (JSON); a rerun with it trains only the missing configs.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import multiprocessing
import os
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.common import ROOT, summary_line  # noqa: E402
from benchmarks.search_quality import draw_configs, spearman, with_overrides, with_synthetic  # noqa: E402
from orchestrate.space import load_space, trial_config  # noqa: E402
from psdet.errors import ConfigError, UserError  # noqa: E402
from psdet.config import to_dict  # noqa: E402


def train_scoring_averages(config_id: int, tree: dict, decays: list[float]) -> dict[str, Any]:
    """Train one configuration (train.ema_decay forced to 0); -> per evaluation, the weights'
    and each moving average's slot AP."""
    import torch
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from psdet.config import config_from_dict
    from psdet.data import build_dataset
    from psdet.engine import run_evaluation, train
    from psdet.hooks import Hook

    torch.set_num_threads(1)
    cfg = config_from_dict(tree, source=f"config {config_id}")
    cfg.train.device, cfg.train.ema_decay = "cpu", 0.0
    epochs: list[dict[str, float]] = []

    class ScoreAverages(Hook):
        def before_train(self, run):
            self.val_set = build_dataset(cfg.data, cfg.data.val_split, train=False, seed=cfg.train.seed)
            self.averages = {decay: AveragedModel(run.raw_model, multi_avg_fn=get_ema_multi_avg_fn(decay),
                                                  use_buffers=True) for decay in decays}

        def after_step(self, run, step):
            for average in self.averages.values():
                average.update_parameters(run.raw_model)

        def on_evaluation(self, run, metrics, checkpoint):
            scores = {"epoch": int(metrics["epoch"]), "raw": float(metrics["slot_ap"])}
            for decay, average in self.averages.items():
                scores[f"ema{decay}"] = float(run_evaluation(average.module, self.val_set, cfg, run.ctx)["slot_ap"])
            epochs.append(scores)

    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix=f"ema-ranking-{config_id}-") as out:
        with open(Path(out) / "console.log", "w") as console, contextlib.redirect_stderr(console):
            train(cfg, Path(out), reporter=_Discard(), hooks=[ScoreAverages()])
    return {"config_id": config_id, "epochs": epochs, "wall_s": time.perf_counter() - started}


class _Discard:
    def report(self, metrics, checkpoint) -> None:
        pass


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--space", default=str(ROOT / "search_spaces" / "lr.yaml"))
    parser.add_argument("--ids", default="", help="config ids of the record draw, comma-separated")
    parser.add_argument("--configs", type=int, default=14, help="without --ids: the first N of the draw")
    parser.add_argument("--seed", type=int, default=0, help="the draw's seed (record's --seed)")
    parser.add_argument("--decays", type=float, nargs="+", default=[0.95, 0.98, 0.99])
    parser.add_argument("--synthetic", type=int, nargs=2, metavar=("TRAIN", "VAL"))
    parser.add_argument("--overrides", nargs="*", default=[])
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--out", default="")
    args = parser.parse_args(argv)
    try:
        if not Path(args.space).is_file():
            raise UserError(f"--space {args.space}: no such file")
        if not all(0 < decay < 1 for decay in args.decays):
            raise UserError(f"--decays {args.decays}: each must be in (0, 1)")
        spec = with_synthetic(with_overrides(load_space(Path(args.space)), args.overrides), args.synthetic)
        ids = [int(part) for part in args.ids.split(",") if part] if args.ids else list(range(args.configs))
        draw = draw_configs(spec, max(ids) + 1, "sobol", args.seed)
        from orchestrate.data import ensure_synthetic

        data_root, _ = ensure_synthetic(spec.experiment.synthetic_data)
        trees = {config_id: to_dict(trial_config(spec, draw[config_id], data_root)) for config_id in ids}
    except (UserError, ConfigError) as exc:
        print(f"ema_ranking: {exc}", file=sys.stderr)
        return 2

    out = Path(args.out) if args.out else None
    done: dict[str, Any] = json.loads(out.read_text()) if out and out.is_file() else {}
    todo = [config_id for config_id in ids if str(config_id) not in done]
    print(f"ema ranking: {len(ids)} configs of {args.space}, decays {args.decays}; {len(todo)} to train, "
          f"{args.jobs} at a time", flush=True)
    os.environ["OMP_NUM_THREADS"] = "1"
    with ProcessPoolExecutor(args.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = [pool.submit(train_scoring_averages, config_id, trees[config_id], args.decays) for config_id in todo]
        for future in as_completed(futures):
            result = future.result()
            done[str(result["config_id"])] = result
            if out:
                tmp = out.with_name(out.name + ".tmp")
                tmp.write_text(json.dumps(done))
                os.replace(tmp, out)
            final = result["epochs"][-1]
            print(f"config {result['config_id']:>3}: final " + " ".join(f"{k} {v:.3f}" for k, v in final.items()
                                                                       if k != "epoch")
                  + f", {result['wall_s']:.0f} s", flush=True)

    runs = [done[str(config_id)]["epochs"] for config_id in ids]
    epochs = min(len(run) for run in runs)
    finals = [run[epochs - 1]["raw"] for run in runs]
    variants = ["raw", *(f"ema{decay}" for decay in args.decays)]
    print(f"\n{'variant':>10} {'final':>6}  rank correlation of slot AP after epoch k with the final (raw), k = 1..{epochs}")
    rho3: dict[str, float] = {}
    for variant in variants:
        rhos = [spearman([run[k][variant] for run in runs], finals) for k in range(epochs)]
        rho3[variant] = rhos[min(2, epochs - 1)]
        mean_final = sum(run[epochs - 1][variant] for run in runs) / len(runs)
        print(f"{variant:>10} {mean_final:6.3f}  " + " ".join(f"{rho:5.2f}" for rho in rhos))
    print(summary_line("ema_ranking", configs=len(ids), **{f"rho_epoch3_{v}": f"{rho3[v]:.2f}" for v in variants[:2]}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
