"""YAML -> typed config: `_base_` inheritance, dotted `key=value` overrides, loud errors.

A config file is a nested mapping whose sections mirror the dataclasses below. An
unknown key, a value of the wrong type or a value outside its choices raises
`ConfigError` naming the file, the dotted key and, for a typo, the closest valid key.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from psdet import userfiles
from psdet.errors import ConfigError

CONFIG_DIR = Path(__file__).parent / "configs"


@dataclass
class DataConfig:
    """Where the dataset lives, in which layout, and how it is loaded and augmented.

    `format` names the label layout (psdet.data.layouts): `json` (DMPR-PS's
    ps_json_label), `ps2_mat` (the official ps2.0 release's annotations/*.mat), `psv_mat`
    (the PSV dataset's annotations/*.mat); `auto` picks whichever `root` holds for the split.
    """

    root: str = "data/synth"
    format: Literal["auto", "json", "ps2_mat", "psv_mat"] = "auto"
    train_split: str = "training"
    val_split: str = "testing/all"
    image_size: int = 512  # square network input, pixels; a multiple of 32
    max_points: int = 10  # marking points per image, padded; more is a data error
    batch_size: int = 64  # global: divided across workers under DDP
    val_batch_size: int = 16  # per worker
    num_workers: int = 2  # DataLoader processes per training worker
    cache_images: bool = False  # keep decoded, resized images in memory (small datasets)
    color_jitter: float = 0.1  # brightness/contrast/saturation/hue strength; 0 = off
    rotate: bool = True  # random rotation that keeps every mark inside the image (the original: off)
    max_rotation_deg: float = 180.0
    drop_last: bool = True  # drop each epoch's partial last batch (the original keeps it)


@dataclass
class GraphConfig:
    """Graph encoder over the detected marking points."""

    type: Literal["gat", "dgcnn"] = "gat"
    point_encoder_layers: list[int] = field(default_factory=lambda: [32, 64])
    gat_layers: int = 3
    num_heads: int = 4
    k: int = 10  # DGCNN neighbours
    proj_dim: int = 64


@dataclass
class DmprConfig:
    """DMPR-PS rule-based pairing of directional marking points.

    The `*_dist` bands are SQUARED normalised distances (as in DMPR-PS); the angle
    differences are radians."""

    vslot_min_dist: float = 0.044771278151623496
    vslot_max_dist: float = 0.1099427457599304
    hslot_min_dist: float = 0.15057789144568634
    hslot_max_dist: float = 0.44449496544202816
    slot_suppression_dot_product_thresh: float = 0.8
    bridge_angle_diff: float = 0.09757113548987695 + 0.1384059287593468
    separator_angle_diff: float = 0.284967562063968 + 0.1384059287593468


@dataclass
class ModelConfig:
    """The detector. `gat`: graph-attention slot detector; `dmpr`: DMPR-PS directional points."""

    detector: Literal["gat", "dmpr"] = "gat"
    backbone: Literal["vgg16", "darknet", "resnet18", "resnet50"] = "vgg16"
    depth_factor: int = 32  # backbone width: the feature map has 32 * depth_factor channels
    descriptor_dim: int = 128
    use_gnn: bool = True
    graph: GraphConfig = field(default_factory=GraphConfig)
    edge_layers: list[int] = field(default_factory=lambda: [256, 128])
    edge_dropout: float = 0.5
    weight_point: float = 100.0
    weight_edge: float = 1.0
    point_thresh: float = 0.008  # confidence for a candidate cell
    boundary_thresh: float = 0.05  # candidates this close to the border are dropped
    nms_radius: float = 0.0625  # 1/16 of the image
    max_candidates: int = 64  # top-k cap on candidate cells before NMS; 0 = no cap (the original)
    # NMS survivors kept: `max_points` = the data.max_points most confident (a fixed-size
    # graph); `all` = every survivor, the graph sized to them (the original)
    nms_keep: Literal["max_points", "all"] = "max_points"
    edge_thresh: float = 0.5
    # GAT slot score: `edge_x_min_point` = edge probability x the lower point confidence;
    # `edge` = the edge probability alone (the original)
    slot_score: Literal["edge_x_min_point", "edge"] = "edge_x_min_point"
    dmpr: DmprConfig = field(default_factory=DmprConfig)


@dataclass
class OptimConfig:
    """Optimizer, LR schedule and warmup. Every schedule is a pure function of the global step."""

    optimizer: Literal["adam", "adamw", "sgd", "adam_onecycle"] = "adam"
    lr: float = 0.003
    weight_decay: float = 0.01
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    momentum: float = 0.9  # sgd
    nesterov: bool = False  # sgd
    scheduler: Literal["onecycle", "cosine", "step", "poly", "constant"] = "onecycle"
    pct_start: float = 0.4  # onecycle: fraction of steps spent rising
    div_factor: float = 10.0  # onecycle: start lr = lr / div_factor
    final_div_factor: float = 1e4  # onecycle: final lr = start lr / final_div_factor
    moms: list[float] = field(default_factory=lambda: [0.95, 0.85])  # onecycle momentum cycle
    decay_step_list: list[int] = field(default_factory=lambda: [50, 100])  # step: epochs
    lr_decay: float = 0.1  # step: factor at each decay epoch
    lr_clip: float = 1e-7  # cosine/step/poly: lower bound on lr
    poly_power: float = 0.9
    warmup: Literal["none", "linear", "cosine"] = "none"
    warmup_epochs: float = 1.0
    warmup_start_factor: float = 0.1  # lr multiplier at step 0 of warmup
    grad_norm_clip: float = 10.0  # 0 = off


@dataclass
class TrainConfig:
    """The training loop: length, evaluation, checkpoints, device and precision."""

    epochs: int = 200
    seed: int = 0  # the original: 100
    eval_interval: int = 1  # epochs between evaluations (and reports)
    ckpt_interval: int = 1  # epochs between checkpoints
    ckpt_every_steps: int = 0  # also checkpoint every N steps mid-epoch; 0 = off
    keep_checkpoints: int = 5  # newest N checkpoints kept
    # start from these model weights (a psdet checkpoint, or one `psdet convert` made from an
    # original), with a fresh optimizer at epoch 0; ignored when the run resumes. "" = none
    init_from: str = ""
    sync_bn: bool = False
    # Evaluate, and deliver, an exponential moving average of the weights (and BatchNorm
    # statistics), updated after every optimizer step: ema = decay * ema + (1 - decay) * weights.
    # 0 = off (the original: it evaluates the weights themselves). psdet.engine.Run.eval_model.
    ema_decay: float = 0.0
    device: Literal["auto", "cpu", "cuda"] = "auto"
    # autocast: bf16 on CUDA and on a CPU with bf16 in hardware, fp16 on CUDA (fp32 elsewhere)
    precision: Literal["fp32", "bf16", "fp16"] = "fp32"
    channels_last: bool = False  # on CUDA, and on the CPU under bf16 (psdet.engine.uses_channels_last)
    log_interval: int = 10  # steps between TensorBoard scalars
    progress: bool = True  # progress bar on rank 0
    # TensorBoard: the event directory ("" = OUT/tensorboard; its name is the run's name in
    # TensorBoard) and the dotted config keys whose values the run records as its HParams.
    # A sweep sets both per trial (orchestrate/trial.py).
    tensorboard_dir: str = ""
    tensorboard_hparams: list[str] = field(default_factory=list)


@dataclass
class Config:
    """A whole training run."""

    name: str = "psdet"
    data: DataConfig = field(default_factory=DataConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)


# ----------------------------------------------------------------------------- loading


def resolve_config_path(name_or_path: str | Path) -> Path:
    """A shipped config name (`ps_gat`) or a path to a YAML file."""
    text = str(name_or_path)
    candidates = [Path(text)]
    if not text.endswith((".yaml", ".yml")):
        candidates.append(Path(text + ".yaml"))
    candidates += [CONFIG_DIR / text, CONFIG_DIR / (text + ".yaml")]
    for path in candidates:
        if path.is_file():
            return path
    shipped = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))
    hint = difflib.get_close_matches(text, shipped, n=1)
    suggestion = f" (did you mean '{hint[0]}'?)" if hint else ""
    raise ConfigError(f"config '{text}' is neither a file nor a shipped config{suggestion}; shipped: {', '.join(shipped)}")


def read_yaml(path: Path, what: str = "") -> Any:
    """The parsed YAML of `path` (safe loader); a one-line ConfigError naming the file if it
    cannot be read or parsed (`what` names the kind of file, default a config file)."""
    return userfiles.read_yaml(path, what or "config file", ConfigError)


def _read_yaml(path: Path) -> dict:
    loaded = read_yaml(path)
    if loaded is None:
        raise ConfigError(f"{path}: empty config file (a config is a YAML mapping, e.g. `_base_: ps_gat_tiny.yaml`)")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: top level must be a mapping, got {type(loaded).__name__}")
    return loaded


def _deep_merge(base: dict, update: dict) -> dict:
    merged = dict(base)
    for key, value in update.items():
        if isinstance(value, dict) and isinstance(merged.get(key), dict):
            merged[key] = _deep_merge(merged[key], value)
        else:
            merged[key] = value
    return merged


def read_config_tree(path: Path, _seen: tuple[Path, ...] = ()) -> tuple[dict, dict[str, Path]]:
    """Read a YAML file with its `_base_` chain: (merged mapping, dotted key -> file that set it)."""
    path = path.resolve()
    if path in _seen:
        raise ConfigError(f"{path}: _base_ cycle through {' -> '.join(str(p) for p in _seen)}")
    raw = _read_yaml(path)
    merged: dict = {}
    origin: dict[str, Path] = {}
    base_ref = raw.pop("_base_", None)
    if base_ref is not None:
        bases = base_ref if isinstance(base_ref, list) else [base_ref]
        for ref in bases:
            base_path = (path.parent / str(ref))
            if not base_path.is_file():
                try:
                    base_path = resolve_config_path(str(ref))
                except ConfigError:
                    raise ConfigError(f"{path}: _base_ '{ref}' not found next to it or among shipped configs") from None
            base_tree, base_origin = read_config_tree(base_path, _seen + (path,))
            merged = _deep_merge(merged, base_tree)
            origin.update(base_origin)
    merged = _deep_merge(merged, raw)
    for key in _dotted_keys(raw):
        origin[key] = path
    return merged, origin


def _dotted_keys(tree: dict, prefix: str = "") -> list[str]:
    keys = []
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        keys.append(dotted)
        if isinstance(value, dict):
            keys += _dotted_keys(value, dotted + ".")
    return keys


def _field_types(cls: type) -> dict[str, Any]:
    hints = typing.get_type_hints(cls)
    return {f.name: hints[f.name] for f in dataclasses.fields(cls)}


def _closest(key: str, valid: list[str], prefix: str = "") -> str:
    hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.5)
    if hint:
        return f" (did you mean '{prefix}{hint[0]}'?)"
    return f" (valid keys under '{prefix or '.'}': {', '.join(valid)})"


def yaml_number(value: Any) -> Any:
    """A string that reads as a float becomes one (YAML 1.1 reads `1e-4`, without a dot,
    as a string); anything else is returned unchanged for the caller to check."""
    if isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    return value


def _coerce(value: Any, annotation: Any, where: str) -> Any:
    """Check `value` against a field's type; ints are accepted where floats are expected."""
    origin = get_origin(annotation)
    if origin is Literal:
        choices = get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{where}: {value!r} is not one of {', '.join(map(str, choices))}")
        return value
    if origin in (typing.Union, types.UnionType):
        args = [a for a in get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _coerce(value, args[0], where)
    if origin is list:
        (item_type,) = get_args(annotation)
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"{where}: expected a list, got {value!r}")
        return [_coerce(v, item_type, f"{where}[{i}]") for i, v in enumerate(value)]
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{where}: expected true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{where}: expected an integer, got {value!r}")
        return value
    if annotation is float:
        value = yaml_number(value)
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{where}: expected a number, got {value!r}")
        return float(value)
    if annotation is str:
        if not isinstance(value, str):
            raise ConfigError(f"{where}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation!r} at {where}")


def build_dataclass(cls: type, tree: dict, origin: dict[str, Path], prefix: str = "", source: str = "") -> Any:
    """Turn a mapping into `cls`, recursively; errors name the file that set the bad key."""
    types_by_name = _field_types(cls)
    kwargs = {}
    for key, value in tree.items():
        dotted = f"{prefix}{key}"
        where_file = origin.get(dotted, source)
        if key not in types_by_name:
            raise ConfigError(f"{where_file}: unknown key '{dotted}'{_closest(key, list(types_by_name), prefix)}")
        annotation = types_by_name[key]
        if dataclasses.is_dataclass(annotation):
            if not isinstance(value, dict):
                raise ConfigError(f"{where_file}: '{dotted}' must be a mapping, got {value!r}")
            kwargs[key] = build_dataclass(annotation, value, origin, dotted + ".", source)
        else:
            kwargs[key] = _coerce(value, annotation, f"{where_file}: '{dotted}'")
    return cls(**kwargs)


def parse_override(text: str) -> tuple[str, Any]:
    """`model.backbone=darknet` -> ('model.backbone', 'darknet'); the value is read as YAML."""
    if "=" not in text:
        raise ConfigError(f"override '{text}' must look like key=value, e.g. optim.lr=0.001")
    key, raw = text.split("=", 1)
    key = key.strip()
    if not key:
        raise ConfigError(f"override '{text}' has an empty key")
    try:
        value = yaml.safe_load(raw) if raw.strip() else ""
    except yaml.YAMLError:
        value = raw
    return key, value


def set_dotted(tree: dict, key: str, value: Any) -> None:
    node = tree
    parts = key.split(".")
    for part in parts[:-1]:
        node = node.setdefault(part, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override '{key}': '{part}' is not a section")
    node[parts[-1]] = value


def load_config(name_or_path: str | Path, overrides: list[str] | dict[str, Any] | None = None) -> Config:
    """Load a shipped config name or a YAML path, apply dotted overrides, validate."""
    path = resolve_config_path(name_or_path)
    tree, origin = read_config_tree(path)
    items = overrides.items() if isinstance(overrides, dict) else [parse_override(o) for o in overrides or []]
    for key, value in items:
        set_dotted(tree, key, value)
        origin[key] = Path("override")
    cfg = build_dataclass(Config, tree, origin, source=str(path))
    validate(cfg, str(path))
    return cfg


def config_from_dict(tree: dict, source: str = "<dict>") -> Config:
    """Rebuild a config from `to_dict` output (e.g. the copy stored in a checkpoint)."""
    cfg = build_dataclass(Config, tree, {}, source=source)
    validate(cfg, source)
    return cfg


def validate(cfg: Config, source: str) -> None:
    """Cross-field checks that types alone cannot express."""

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{source}: '{key}' {why}")

    if cfg.data.image_size <= 0 or cfg.data.image_size % 32:
        fail("data.image_size", f"must be a positive multiple of 32, got {cfg.data.image_size}")
    for key in ("max_points", "batch_size", "val_batch_size"):
        if getattr(cfg.data, key) <= 0:
            fail(f"data.{key}", "must be positive")
    if cfg.data.num_workers < 0:
        fail("data.num_workers", "must be >= 0")
    if cfg.model.depth_factor <= 0:
        fail("model.depth_factor", "must be positive")
    if cfg.model.descriptor_dim % cfg.model.graph.num_heads:
        fail("model.graph.num_heads", f"must divide model.descriptor_dim ({cfg.model.descriptor_dim})")
    if cfg.model.detector == "dmpr" and cfg.model.backbone != "darknet":
        fail("model.backbone", "must be darknet for the dmpr detector")
    if not 0 < cfg.model.edge_dropout < 1 and cfg.model.edge_dropout != 0:
        fail("model.edge_dropout", "must be in [0, 1)")
    if not 0 <= cfg.model.boundary_thresh < 0.5:
        fail("model.boundary_thresh", "must be in [0, 0.5)")
    if cfg.model.nms_radius <= 0:
        fail("model.nms_radius", "must be positive")
    if cfg.model.max_candidates < 0:
        fail("model.max_candidates", "must be >= 0 (0 = no cap)")
    if cfg.model.max_candidates != 0 and cfg.model.max_candidates < cfg.data.max_points:
        fail("model.max_candidates", f"must be 0 (no cap) or >= data.max_points ({cfg.data.max_points})")
    for key in ("epochs", "eval_interval", "ckpt_interval", "keep_checkpoints"):
        if getattr(cfg.train, key) <= 0:
            fail(f"train.{key}", "must be positive")
    if not 0 <= cfg.train.ema_decay < 1:
        fail("train.ema_decay", f"must be in [0, 1) (0 = off), got {cfg.train.ema_decay}")
    for key in cfg.train.tensorboard_hparams:
        try:
            config_value(cfg, key)
        except KeyError:
            fail("train.tensorboard_hparams", f"names {key!r}, which is no config key")
    try:
        validate_optim(cfg.optim, total_epochs=cfg.train.epochs)
    except ConfigError as exc:
        raise ConfigError(f"{source}: {exc}") from None


def config_value(cfg: Any, key: str) -> Any:
    """The value of dotted `key` (`optim.lr`) in a config dataclass; KeyError if it names none."""
    value = cfg
    for part in key.split("."):
        if not dataclasses.is_dataclass(value) or part not in {f.name for f in dataclasses.fields(value)}:
            raise KeyError(key)
        value = getattr(value, part)
    return value


def effective_scheduler(cfg: OptimConfig) -> str:
    """The scheduler a run uses: `adam_onecycle` always means `onecycle` (see psdet/optim.py)."""
    return "onecycle" if cfg.optimizer == "adam_onecycle" else cfg.scheduler


def validate_optim(cfg: OptimConfig, steps_per_epoch: int | None = None, total_epochs: int | None = None) -> None:
    """Raise ConfigError for optimizer, schedule and warmup settings that cannot work together.

    The one place these rules live. It runs when a config is loaded (`validate`, which
    names the file), and once more where psdet.optim takes an `OptimConfig` that may have
    been built in code: `build_optimizer` and the curve functions. Never per step.
    With `steps_per_epoch` and `total_epochs` it also checks the run's shape.
    """

    def fail(key: str, why: str) -> None:
        raise ConfigError(f"'optim.{key}' {why}")

    if cfg.lr <= 0 or not math.isfinite(cfg.lr):
        fail("lr", f"must be a positive number, got {cfg.lr}")
    if cfg.weight_decay < 0:
        fail("weight_decay", f"must be >= 0, got {cfg.weight_decay}")
    if len(cfg.betas) != 2 or not all(0 <= b < 1 for b in cfg.betas):
        fail("betas", f"must be two values in [0, 1), got {cfg.betas}")
    if len(cfg.moms) != 2 or not all(0 <= m < 1 for m in cfg.moms):
        fail("moms", f"must be two values in [0, 1), got {cfg.moms}")
    if not 0 <= cfg.momentum < 1:
        fail("momentum", f"must be in [0, 1), got {cfg.momentum}")
    if cfg.nesterov:
        if cfg.optimizer != "sgd":
            fail("nesterov", f"applies only to optimizer sgd, not {cfg.optimizer}")
        if cfg.momentum <= 0:
            fail("nesterov", f"needs optim.momentum > 0 (Nesterov momentum with momentum {cfg.momentum} "
                             "is plain SGD); set optim.momentum or nesterov: false")
        if effective_scheduler(cfg) == "onecycle" and min(cfg.moms) <= 0:
            fail("nesterov", f"needs every onecycle momentum in optim.moms > 0, got {cfg.moms}")
    if not 0 < cfg.pct_start < 1:
        fail("pct_start", f"must be in (0, 1), got {cfg.pct_start}")
    if cfg.div_factor <= 0 or cfg.final_div_factor <= 0:
        fail("div_factor", f"and optim.final_div_factor must be positive, got {cfg.div_factor}, {cfg.final_div_factor}")
    if not 0 <= cfg.lr_clip <= cfg.lr:
        fail("lr_clip", f"must be in [0, optim.lr = {cfg.lr}], got {cfg.lr_clip}")
    if cfg.lr_decay <= 0:
        fail("lr_decay", f"must be positive, got {cfg.lr_decay}")
    if any(epoch < 0 for epoch in cfg.decay_step_list):
        fail("decay_step_list", f"must hold epochs >= 0, got {cfg.decay_step_list}")
    if cfg.poly_power <= 0:
        fail("poly_power", f"must be positive, got {cfg.poly_power}")
    if cfg.warmup_epochs < 0:
        fail("warmup_epochs", f"must be >= 0, got {cfg.warmup_epochs}")
    if not 0 < cfg.warmup_start_factor <= 1:
        fail("warmup_start_factor", f"must be in (0, 1], got {cfg.warmup_start_factor}")
    if steps_per_epoch is not None and steps_per_epoch <= 0:
        raise ConfigError(f"an epoch has {steps_per_epoch} steps: the training set is smaller than one batch "
                          "(check data.root and data.batch_size)")
    if total_epochs is not None:
        if total_epochs <= 0:
            raise ConfigError(f"'train.epochs' must be positive, got {total_epochs}")
        if cfg.warmup != "none" and cfg.warmup_epochs > total_epochs:
            fail("warmup_epochs", f"({cfg.warmup_epochs}) is longer than the run (train.epochs = {total_epochs})")


def to_dict(cfg: Any) -> dict:
    """Plain nested dict of a config (for YAML, checkpoints and Ray)."""
    return dataclasses.asdict(cfg)


def dump_yaml(cfg: Config) -> str:
    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
