"""`psdet train | eval | synth | describe | predict | convert`.

A mistake the user can make (bad config, bad override, missing data, missing or
corrupt checkpoint) ends in one line on stderr and exit code 2.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from psdet.errors import NonFiniteLossError, UserError
from psdet.preemption import EXIT_PREEMPTED, Preempted

EXIT_USER_ERROR = 2


def _add_config_args(parser: argparse.ArgumentParser, required: bool = True) -> None:
    parser.add_argument("-c", "--config", required=required,
                        help="a shipped config name (ps_gat, ps_dmpr, ps_gat_tiny) or a YAML path")
    parser.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                        help="dotted override, e.g. -o optim.lr=0.001 (repeatable)")


def _score(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"'{text}' is not a number") from None
    if not 0.0 <= value <= 1.0:
        raise argparse.ArgumentTypeError(f"{text} is outside [0, 1]")
    return value


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="psdet", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="train one model (torchrun for several processes)")
    _add_config_args(train)
    train.add_argument("--data", help="dataset root, json or .mat layout, detected (sets data.root)")
    train.add_argument("--out", help="run directory (default: runs/train/<config name>)")
    train.add_argument("--resume", action="store_true", help="continue from the newest valid checkpoint in --out")
    train.add_argument("--init", metavar="CKPT",
                       help="start from these model weights (a psdet checkpoint or a `psdet convert` output; "
                            "sets train.init_from), with a fresh optimizer at epoch 0")

    evaluate = commands.add_parser("eval", help="point and slot precision / recall / AP of a checkpoint")
    _add_config_args(evaluate)
    evaluate.add_argument("--data", help="dataset root, json or .mat layout, detected (sets data.root)")
    evaluate.add_argument("--ckpt", required=True, help="checkpoint directory, its state.pt, or a run directory")
    evaluate.add_argument("--split", help="split to evaluate (default: data.val_split)")
    evaluate.add_argument("--json", action="store_true", help="print metrics as JSON")
    evaluate.add_argument("--protocol", choices=("one_to_one", "original"), default="one_to_one",
                          help="matching: one_to_one (default: each prediction is the true positive of at "
                               "most one truth) or original (gcn-parking-slot's, where one prediction can "
                               "match two truths; docs/FIDELITY.md)")

    synth = commands.add_parser("synth", help="render a seeded synthetic dataset in the ps2.0 layout")
    synth.add_argument("--out", required=True, help="dataset root to write")
    synth.add_argument("--train", type=int, default=200, help="training images (default 200)")
    synth.add_argument("--val", type=int, default=50, help="validation images (default 50)")
    synth.add_argument("--seed", type=int, default=0)
    synth.add_argument("--format", choices=("json", "mat", "psv"), default="json",
                       help="label layout: json (ps_json_label/, default), mat (the ps2.0 release's "
                            "annotations/*.mat) or psv (the PSV dataset's annotations/ and images/)")
    synth.add_argument("--workers", type=int, default=os.cpu_count() or 1,
                       help="processes rendering at once (default: every CPU); the files are the same for any count")

    describe = commands.add_parser("describe", help="print the model and its parameter count")
    _add_config_args(describe)

    convert = commands.add_parser("convert", help="turn an original gcn-parking-slot checkpoint into a psdet one")
    convert.add_argument("original", metavar="ORIGINAL.pth", help="the original's checkpoint (its model_state)")
    convert.add_argument("out", metavar="OUT", help="psdet checkpoint directory to write (must not exist)")
    convert.add_argument("-c", "--config", help="config for everything the weights do not say (default: ps_gat, "
                                                "or ps_dmpr for a DMPR checkpoint); the architecture is read "
                                                "from the checkpoint")
    convert.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                         help="dotted override, e.g. -o data.max_points=15 (repeatable)")

    predict = commands.add_parser("predict", help="detect slots in images; prints JSON")
    predict.add_argument("--ckpt", required=True, help="checkpoint directory, its state.pt, or a run directory")
    predict.add_argument("images", nargs="+", metavar="IMAGE")
    predict.add_argument("--draw", metavar="OUT.png",
                         help="draw the detections (with several images: OUT-0.png, OUT-1.png, ...)")
    predict.add_argument("--min-score", type=_score, default=0.5, metavar="S",
                         help="print and draw only points and slots scoring at least S (default 0.5; "
                              "0 keeps every detection the post-processing keeps, as eval sees them)")
    predict.add_argument("-o", "--override", action="append", default=[], metavar="KEY=VALUE",
                         help="dotted override of the checkpoint's config, e.g. model.edge_thresh=0.6")
    return parser


def _load(args: argparse.Namespace):
    from psdet.config import load_config

    overrides = list(args.override)
    if getattr(args, "data", None):
        overrides.append(f"data.root={args.data}")
    if getattr(args, "init", None):
        overrides.append(f"train.init_from={json.dumps(str(args.init))}")
    return load_config(args.config, overrides)


def cmd_train(args: argparse.Namespace) -> int:
    from psdet import engine
    from psdet.checkpoint import LocalResume
    from psdet.data import list_samples
    from psdet.reporting import LocalReporter

    cfg = _load(args)
    for split in (cfg.data.train_split, cfg.data.val_split):  # fail before any log output
        list_samples(Path(cfg.data.root), split, cfg.data.format)
    if cfg.train.init_from:  # a checkpoint that does not fit fails here, before any log output
        from psdet.checkpoint import load_model_weights
        from psdet.models import build_model

        load_model_weights(build_model(cfg.model, cfg.data.max_points), Path(cfg.train.init_from),
                           f"config '{cfg.name}'")
    out = Path(args.out or Path("runs") / "train" / cfg.name)
    is_main = int(os.environ.get("RANK", "0")) == 0
    resume = LocalResume(out / "checkpoints") if args.resume else None
    metrics = engine.train(cfg, out, LocalReporter(out, is_main=is_main), resume=resume)
    if is_main:
        print(json.dumps({"out": str(out), **metrics}))
    return 0


def _model_from_checkpoint(path: str, cfg=None, overrides: list[str] | None = None):
    """(model in eval mode on the chosen device, its config, checkpoint dir)."""
    import yaml

    from psdet import checkpoint as ckpt
    from psdet.config import config_from_dict, load_config
    from psdet.distributed import choose_device
    from psdet.models import build_model

    ckpt_dir = ckpt.resolve_checkpoint(Path(path))
    state, _ = ckpt.load_checkpoint(ckpt_dir)
    if cfg is None:
        stored = ckpt_dir / ckpt.CONFIG_FILE
        cfg = load_config(stored, overrides) if overrides else config_from_dict(yaml.safe_load(stored.read_text()), str(stored))
    device = choose_device(cfg.train.device)
    model = build_model(cfg.model, cfg.data.max_points)
    try:
        model.load_state_dict(ckpt.delivered_weights(state))
    except RuntimeError as exc:
        from psdet.errors import CheckpointError

        first = str(exc).strip().splitlines()[0]
        raise CheckpointError(f"checkpoint '{ckpt_dir}' does not fit config '{cfg.name}': {first}") from None
    return model.to(device).eval(), cfg, ckpt_dir


def cmd_eval(args: argparse.Namespace) -> int:
    from psdet.data import build_dataset
    from psdet.distributed import DistContext
    from psdet.engine import cost_meter, measure_cost, run_evaluation, setup_logging

    cfg = _load(args)
    setup_logging(None, True)
    model, cfg, ckpt_dir = _model_from_checkpoint(args.ckpt, cfg)
    dataset = build_dataset(cfg.data, args.split or cfg.data.val_split, train=False, seed=cfg.train.seed)
    device = next(model.parameters()).device
    ctx = DistContext(0, 1, 0, device)
    metrics = run_evaluation(model, dataset, cfg, ctx, protocol=args.protocol)
    metrics.update(measure_cost(cost_meter(model, dataset, cfg, ctx), ctx))
    if args.json:
        print(json.dumps({"checkpoint": str(ckpt_dir), "images": len(dataset), "protocol": args.protocol, **metrics}))
    else:
        print(f"checkpoint {ckpt_dir}, {len(dataset)} images, {args.protocol} matching")
        print(f"{'':8}{'precision':>11}{'recall':>9}{'AP':>9}")
        for kind in ("point", "slot"):
            print(f"{kind:8}{metrics[kind + '_precision']:>11.4f}{metrics[kind + '_recall']:>9.4f}"
                  f"{metrics[kind + '_ap']:>9.4f}")
        if "latency_ms" in metrics:
            print(f"cost    {metrics['latency_ms']:.2f} ms per image at batch 1 on {device.type} (median, "
                  f"post-processing included), {metrics['params']:,} parameters, {metrics['gflops']:.3f} GFLOPs")
    return 0


def cmd_synth(args: argparse.Namespace) -> int:
    from psdet.data.synth import generate

    if args.train < 0 or args.val < 0:
        raise UserError("--train and --val must be >= 0")
    if args.workers < 1:
        raise UserError("--workers must be >= 1")
    fmt = {"json": "json", "mat": "ps2_mat", "psv": "psv_mat"}[args.format]
    summary = generate(Path(args.out), args.train, args.val, args.seed, fmt=fmt, workers=args.workers)
    print(f"wrote {args.train} training and {args.val} validation images ({summary['marks']} marks, "
          f"{summary['slots']} slots) to {args.out} in {summary['seconds']:.1f} s")
    return 0


def cmd_describe(args: argparse.Namespace) -> int:
    from psdet.models import build_model, count_parameters, describe

    cfg = _load(args)
    model = build_model(cfg.model, cfg.data.max_points)
    print(describe(model))
    print(f"{cfg.name}: {count_parameters(model):,} parameters")
    return 0


def cmd_convert(args: argparse.Namespace) -> int:
    from psdet import checkpoint as ckpt
    from psdet import convert
    from psdet.config import dump_yaml, load_config, parse_override
    from psdet.models import build_model

    original, out = Path(args.original), Path(args.out)
    if out.exists():
        raise UserError(f"{out}: already exists; choose a new directory for the converted checkpoint")
    checkpoint = convert.read_original(original)
    architecture = convert.detect_architecture(checkpoint["model_state"], str(original))
    overrides = dict(parse_override(text) for text in args.override)
    clashing = [key for key, value in overrides.items() if key in architecture and architecture[key] != value]
    if clashing:
        raise UserError(f"{original}: holds {', '.join(f'{k}={architecture[k]}' for k in clashing)}, "
                        f"not what -o asks for ({', '.join(f'{k}={overrides[k]}' for k in clashing)})")
    name = args.config or ("ps_dmpr" if architecture["model.detector"] == "dmpr" else "ps_gat")
    cfg = load_config(name, {**overrides, **architecture})
    model = build_model(cfg.model, cfg.data.max_points)
    state = convert.convert_model_state(checkpoint["model_state"], model, backbone=cfg.model.backbone,
                                        detector=cfg.model.detector, source=str(original))
    model.load_state_dict(state)  # strict: the mapping is complete
    epoch = int(checkpoint.get("epoch") or 0)
    step = int(checkpoint.get("it") or 0)
    ckpt.write_checkpoint_dir(out, ckpt.Position(epoch, step, 0),
                              {"model": model.state_dict(), "epoch": epoch, "step": step,
                               "converted_from": str(original)}, dump_yaml(cfg), {})
    print(json.dumps({"out": str(out), "config": name, "architecture": architecture, "tensors": len(state),
                      "epoch": epoch, "step": step}))
    return 0


def cmd_predict(args: argparse.Namespace) -> int:
    import torch

    from psdet.data import load_image
    from psdet.draw import draw_detections

    model, cfg, ckpt_dir = _model_from_checkpoint(args.ckpt, overrides=args.override)
    device = next(model.parameters()).device
    results = []
    for index, image_path in enumerate(args.images):
        image, (width, height) = load_image(Path(image_path), cfg.data.image_size)
        with torch.no_grad():
            (prediction,) = model.predict(image.unsqueeze(0).to(device))
        scale = [width, height, width, height]
        slots = [[*(float(v) * s for v, s in zip(entrance, scale)), float(score)]
                 for entrance, score in zip(prediction.slot_entrances, prediction.slot_scores)
                 if score >= args.min_score]
        points = [[float(x) * width, float(y) * height, float(score)]
                  for (x, y), score in zip(prediction.point_xy, prediction.point_scores)
                  if score >= args.min_score]
        results.append({"image": image_path, "width": width, "height": height, "points": points, "slots": slots})
        if args.draw:
            target = Path(args.draw)
            if len(args.images) > 1:
                target = target.with_name(f"{target.stem}-{index}{target.suffix}")
            draw_detections(Path(image_path), points, slots, target)
    print(json.dumps(results if len(results) > 1 else results[0], indent=1))
    return 0


COMMANDS = {"train": cmd_train, "eval": cmd_eval, "synth": cmd_synth, "describe": cmd_describe,
            "predict": cmd_predict, "convert": cmd_convert}


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args)
    except UserError as exc:
        print(f"psdet {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        print(f"psdet {args.command}: interrupted", file=sys.stderr)
        return 130
    except NonFiniteLossError as exc:
        print(f"psdet {args.command}: {exc}", file=sys.stderr)
        return 1
    except Preempted as exc:
        print(f"psdet {args.command}: {exc}; the same command with --resume continues it", file=sys.stderr)
        return EXIT_PREEMPTED


if __name__ == "__main__":
    sys.exit(main())
