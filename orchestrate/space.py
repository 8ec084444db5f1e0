"""Search-space YAML -> a validated `SweepSpec` -> an Optuna define-by-run function.

A space file has five sections (documented with examples in search_spaces/README.md):

    experiment:       base config, fixed overrides, metric and mode (or several objectives),
                      budgets (trials, seconds, GPU- or CPU-hours, epochs), seed, baseline trial
    search:           dotted config key -> {type: loguniform|uniform|int|choice, ..., when: {...}}
    sampler:          Optuna's TPE (startup trials, multivariate, group, constant liar), NSGA-II or random
    scheduler:        asha (MO-ASHA when there are several objectives) or none
    resources:        workers per trial, GPUs, CPUs
    fault_tolerance:  worker and trial retries, checkpoints kept

Everything is checked before Ray starts: every mistake raises `ConfigError` with one
line naming the file and the key. Parameter values are also checked against the
detector config itself (a value the config would reject fails here, not in trial 7).
"""
from __future__ import annotations

import copy
import dataclasses
import difflib
import re
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from psdet.config import (
    Config,
    build_dataclass,
    config_from_dict,
    load_config,
    read_yaml,
    set_dotted,
    to_dict,
    yaml_number,
)
from psdet.errors import ConfigError
from psdet.reporting import COST_METRICS, EVAL_METRICS, LOSS_TERMS

# What the engine reports once per evaluation (docs/CONTRACTS.md) and can be optimised.
METRICS = (*EVAL_METRICS, *COST_METRICS, *LOSS_TERMS)
MODES = ("max", "min")
BUDGET_UNITS = ("gpu_hours", "cpu_hours", "epochs", "wall_hours")
PARAM_TYPES = ("loguniform", "uniform", "int", "choice")
SECTIONS = ("experiment", "search", "sampler", "scheduler", "resources", "fault_tolerance")


@dataclass(frozen=True)
class SyntheticData:
    """The dataset synthesized (once, cached) when tune.py gets no --data."""

    train: int = 64
    val: int = 16
    seed: int = 0


@dataclass(frozen=True)
class Budget:
    """What the sweep may spend, in any of these units (orchestrate/budget.py counts them):
    GPU- or CPU-hours (resources held x wall time, summed over trials), epochs (summed over
    trials), hours of the sweep's own wall time. No new trial starts once it would cross a
    limit; running trials finish, or with `stop_running` stop at their next rung."""

    gpu_hours: float | None = None
    cpu_hours: float | None = None
    epochs: float | None = None
    wall_hours: float | None = None
    stop_running: bool = False

    def limits(self) -> dict[str, float]:
        """The units that are set -> their limit."""
        return {unit: getattr(self, unit) for unit in BUDGET_UNITS if getattr(self, unit) is not None}


@dataclass(frozen=True)
class Experiment:
    name: str | None = None  # default: the space file's stem
    base_config: str = ""  # a shipped config name or a YAML path (relative to the space file or cwd)
    metric: str = "slot_ap"
    mode: Literal["max", "min"] = "max"
    num_samples: int = 10
    seed: int = 0  # TPE sampler seed
    max_concurrent: int = 1
    time_budget_s: float | None = None
    synthetic_data: SyntheticData = field(default_factory=SyntheticData)
    baseline: bool = True  # the first trial runs the base config's own value of every searched key
    # Several objectives, {metric: max|min} in file order (then `metric`/`mode` are the first).
    objectives: tuple[tuple[str, str], ...] = ()
    budget: Budget = field(default_factory=Budget)
    # A pretrained psdet (or `psdet convert`ed) checkpoint every trial starts from
    # (train.init_from: its model weights, weights_only, a fresh optimizer); a path relative
    # to the space file or the working directory, on storage every node sees.
    init_from: str = ""


@dataclass(frozen=True)
class Sampler:
    """How Optuna proposes the next trial. `tpe` draws `n_startup_trials` at random, then
    models good and bad trials (with several objectives: by non-dominated rank); `nsga2` is
    Optuna's genetic NSGA-II (generations of `population_size`); `random` never stops
    drawing at random."""

    type: Literal["tpe", "nsga2", "random"] = "tpe"
    n_startup_trials: int = 10  # Optuna's default; a 12-trial sweep wants fewer
    multivariate: bool = False  # one joint density over the parameters instead of one each
    group: bool = False  # with multivariate: separate densities per set of co-occurring (conditional) parameters
    constant_liar: bool = False  # running trials count as bad, so concurrent trials spread out
    population_size: int = 50  # nsga2: trials per generation (Optuna's default)


@dataclass(frozen=True)
class Scheduler:
    type: Literal["asha", "none"] = "asha"
    grace_period: int = 1  # epochs before ASHA may stop a trial
    reduction_factor: float = 2.0


@dataclass(frozen=True)
class Resources:
    workers: int = 2  # Ray Train workers (DDP ranks) per trial
    use_gpu: Literal["auto", True, False] = "auto"  # auto: when a whole trial's GPUs fit on the cluster
    cpus_per_worker: float = 1.0
    gpus_per_worker: float = 1.0  # only when GPUs are used; fractions share a card
    driver_cpus: float = 0.1  # the trial's own driver process (Ray rejects 0)


@dataclass(frozen=True)
class FaultTolerance:
    worker_max_failures: int = 2  # Ray Train worker-group restarts per trial (-1: unlimited)
    trial_max_failures: int = 1  # Tune retries of a failed trial (-1: unlimited)
    checkpoints_kept: int = 2  # per trial, newest first


@dataclass(frozen=True)
class Param:
    """One searched config key. `when` maps an earlier choice parameter to the values that enable this one."""

    key: str
    type: str
    low: float | int | None = None
    high: float | int | None = None
    values: tuple = ()
    log: bool = False
    step: int = 1
    when: tuple[tuple[str, tuple], ...] = ()

    def active(self, chosen: dict[str, Any]) -> bool:
        return all(key in chosen and chosen[key] in allowed for key, allowed in self.when)

    def suggest(self, trial) -> Any:
        if self.type == "loguniform":
            return trial.suggest_float(self.key, self.low, self.high, log=True)
        if self.type == "uniform":
            return trial.suggest_float(self.key, self.low, self.high)
        if self.type == "int":
            return trial.suggest_int(self.key, self.low, self.high, step=self.step, log=self.log)
        return trial.suggest_categorical(self.key, list(self.values))

    def describe(self) -> str:
        if self.type == "choice":
            text = f"choice {list(self.values)}"
        else:
            extra = (" log" if self.log else "") + (f" step {self.step}" if self.step != 1 else "")
            text = f"{self.type} [{self.low}, {self.high}]{extra}"
        if self.when:
            text += "  when " + ", ".join(f"{k} in {list(v)}" for k, v in self.when)
        return text


@dataclass(frozen=True)
class SweepSpec:
    """A validated search space. `base_tree` is the resolved base config with the fixed
    overrides applied, as a plain dict: trials never read config files again."""

    path: str
    name: str
    experiment: Experiment
    overrides: dict[str, Any]
    search: tuple[Param, ...]
    sampler: Sampler
    scheduler: Scheduler
    resources: Resources
    fault_tolerance: FaultTolerance
    base_tree: dict

    @property
    def objectives(self) -> tuple[tuple[str, str], ...]:
        """(metric, mode) of every objective: one for a single-objective space."""
        e = self.experiment
        return e.objectives or ((e.metric, e.mode),)

    @property
    def multi_objective(self) -> bool:
        return len(self.objectives) > 1

    @property
    def max_epochs(self) -> int:
        """The most epochs any trial can run (ASHA's max_t)."""
        for param in self.search:
            if param.key == "train.epochs":
                return int(param.high if param.type == "int" else max(param.values))
        return int(self.base_tree["train"]["epochs"])


class DefineByRun:
    """Optuna define-by-run space: samples each parameter whose `when` holds, in file order.

    A module-level class holding plain data, so it pickles with Tune's searcher state.
    """

    def __init__(self, params: tuple[Param, ...]) -> None:
        self.params = params

    def __call__(self, trial) -> None:
        chosen: dict[str, Any] = {}
        for param in self.params:
            if param.active(chosen):
                chosen[param.key] = param.suggest(trial)


def baseline_params(spec: SweepSpec) -> dict[str, Any]:
    """The base config's own value of every searched key that is active for those values:
    the first trial of a sweep, so that every sweep says how much it improved on it.
    ConfigError (file and key) if one lies outside its searched range or choices."""
    chosen: dict[str, Any] = {}
    for param in spec.search:
        if not param.active(chosen):
            continue
        node: Any = spec.base_tree
        for part in param.key.split("."):
            node = node[part]
        inside = node in param.values if param.type == "choice" else param.low <= node <= param.high
        if not inside:
            searched = list(param.values) if param.type == "choice" else f"[{param.low:g}, {param.high:g}]"
            raise ConfigError(f"{spec.path}: 'search.{param.key}': the base config's value {node!r} is outside "
                              f"{searched}, so it cannot be the baseline trial; widen the range or set "
                              "'experiment.baseline: false'")
        chosen[param.key] = node
    return chosen


def trial_config(spec: SweepSpec, params: dict[str, Any], data_root: str | None = None) -> Config:
    """The full detector config of one trial: base + fixed overrides + sampled params (+ data root)."""
    tree = copy.deepcopy(spec.base_tree)
    for key, value in params.items():
        set_dotted(tree, key, value)
    if data_root is not None:
        set_dotted(tree, "data.root", str(data_root))
    return config_from_dict(tree, source=f"{spec.path} (trial params {params})")


# ----------------------------------------------------------------------------- loading


def load_space(path: str | Path) -> SweepSpec:
    """Read and validate a search-space file; `ConfigError` (one line: file and key) on any mistake."""
    path = Path(path)
    where = str(path)
    raw = _read(path)
    unknown = [key for key in raw if key not in SECTIONS]
    if unknown:
        raise ConfigError(f"{where}: unknown section '{unknown[0]}'{_hint(str(unknown[0]), SECTIONS)}")
    for section in ("experiment", "search"):
        if section not in raw:
            raise ConfigError(f"{where}: missing section '{section}'")
    for section in SECTIONS:
        if section in raw and not isinstance(raw[section], dict):
            raise ConfigError(f"{where}: section '{section}' must be a mapping, got {raw[section]!r}")

    experiment_raw = dict(raw["experiment"])
    objectives = _parse_objectives(where, experiment_raw)
    overrides = experiment_raw.pop("overrides", None) or {}
    if not isinstance(overrides, dict):
        raise ConfigError(f"{where}: 'experiment.overrides' must be a mapping of dotted config keys, got {overrides!r}")
    experiment = build_dataclass(Experiment, experiment_raw, {}, "experiment.", where)
    if objectives:
        experiment = dataclasses.replace(experiment, objectives=objectives, metric=objectives[0][0],
                                         mode=objectives[0][1])
    sampler = build_dataclass(Sampler, raw.get("sampler") or {}, {}, "sampler.", where)
    scheduler = build_dataclass(Scheduler, raw.get("scheduler") or {}, {}, "scheduler.", where)
    resources = build_dataclass(Resources, raw.get("resources") or {}, {}, "resources.", where)
    fault_tolerance = build_dataclass(FaultTolerance, raw.get("fault_tolerance") or {}, {}, "fault_tolerance.", where)
    _check_ranges(where, experiment, scheduler, resources, fault_tolerance)
    _check_sampler(where, sampler)

    if experiment.init_from:
        overrides = {**overrides, "train.init_from": _init_from_path(where, path, experiment, overrides)}
    base_tree = _base_tree(where, path, experiment.base_config, overrides)
    search = _parse_search(where, raw["search"], overrides, base_tree)
    if experiment.init_from:
        architecture = [p.key for p in search if p.key.startswith("model.") or p.key == "data.max_points"]
        if architecture:
            raise ConfigError(f"{where}: 'experiment.init_from': a pretrained checkpoint fits one architecture, "
                              f"but '{architecture[0]}' is searched; search the training recipe only")
    spec = SweepSpec(
        path=where,
        name=experiment.name or path.stem,
        experiment=experiment,
        overrides=dict(overrides),
        search=search,
        sampler=sampler,
        scheduler=scheduler,
        resources=resources,
        fault_tolerance=fault_tolerance,
        base_tree=base_tree,
    )
    if scheduler.type == "asha" and scheduler.grace_period > spec.max_epochs:
        raise ConfigError(f"{where}: 'scheduler.grace_period' ({scheduler.grace_period}) is longer than "
                          f"a trial ({spec.max_epochs} epochs)")
    if experiment.baseline:
        baseline_params(spec)  # the base config's values must lie inside the searched ranges
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.-]*", spec.name):
        raise ConfigError(f"{where}: 'experiment.name' {spec.name!r} must be letters, digits, '_', '-' or '.'")
    return spec


def _parse_objectives(where: str, experiment_raw: dict) -> tuple[tuple[str, str], ...]:
    """Pop `experiment.objectives` ({metric: max|min}, two or more) off the raw section."""
    if "objectives" not in experiment_raw:
        return ()
    objectives = experiment_raw.pop("objectives")
    at = f"{where}: 'experiment.objectives'"
    if not isinstance(objectives, dict) or len(objectives) < 2:
        raise ConfigError(f"{at} must map two or more reported metrics to max or min, e.g. "
                          f"{{slot_ap: max, latency_ms: min}}, got {objectives!r} (for one objective use "
                          "'experiment.metric' and 'experiment.mode')")
    for key in ("metric", "mode"):
        if key in experiment_raw:
            raise ConfigError(f"{where}: 'experiment.{key}' goes with one objective; with "
                              "'experiment.objectives' drop it")
    parsed = []
    for metric, mode in objectives.items():
        metric = str(metric)
        if metric not in METRICS:
            raise ConfigError(f"{where}: 'experiment.objectives.{metric}' is not a reported metric"
                              f"{_hint(metric, METRICS)}")
        if mode not in MODES:
            raise ConfigError(f"{where}: 'experiment.objectives.{metric}' must be max or min, got {mode!r}")
        parsed.append((metric, mode))
    return tuple(parsed)


def _read(path: Path) -> dict:
    loaded = read_yaml(path, what="search space")
    if not isinstance(loaded, dict):
        raise ConfigError(f"{path}: a search space must be a mapping of sections ({', '.join(SECTIONS)})")
    return loaded


def _hint(key: str, valid) -> str:
    match = difflib.get_close_matches(key, list(valid), n=1, cutoff=0.5)
    return f" (did you mean '{match[0]}'?)" if match else f" (valid: {', '.join(valid)})"


def _check_ranges(where: str, experiment: Experiment, scheduler: Scheduler, resources: Resources,
                  fault_tolerance: FaultTolerance) -> None:
    def fail(key: str, why: str) -> None:
        raise ConfigError(f"{where}: '{key}' {why}")

    if not experiment.base_config:
        fail("experiment.base_config", "is required (a shipped config name such as ps_gat_tiny, or a YAML path)")
    if experiment.metric not in METRICS:
        fail("experiment.metric", f"{experiment.metric!r} is not a reported metric{_hint(experiment.metric, METRICS)}")
    if experiment.num_samples < 1:
        fail("experiment.num_samples", f"must be >= 1, got {experiment.num_samples}")
    if experiment.max_concurrent < 1:
        fail("experiment.max_concurrent", f"must be >= 1, got {experiment.max_concurrent}")
    if experiment.time_budget_s is not None and experiment.time_budget_s <= 0:
        fail("experiment.time_budget_s", f"must be positive, got {experiment.time_budget_s}")
    for unit, limit in experiment.budget.limits().items():
        if limit <= 0:
            fail(f"experiment.budget.{unit}", f"must be positive, got {limit}")
    if experiment.budget.stop_running and not experiment.budget.limits():
        fail("experiment.budget.stop_running", f"needs a limit ({', '.join(BUDGET_UNITS)})")
    synth = experiment.synthetic_data
    if synth.train < 1 or synth.val < 1:
        fail("experiment.synthetic_data", f"needs at least one training and one validation image, got {synth}")
    if scheduler.grace_period < 1:
        fail("scheduler.grace_period", f"must be >= 1 epoch, got {scheduler.grace_period}")
    if scheduler.reduction_factor <= 1:
        fail("scheduler.reduction_factor", f"must be > 1, got {scheduler.reduction_factor}")
    if resources.workers < 1:
        fail("resources.workers", f"must be >= 1, got {resources.workers}")
    for key in ("cpus_per_worker", "gpus_per_worker", "driver_cpus"):
        if getattr(resources, key) <= 0:
            fail(f"resources.{key}", f"must be positive, got {getattr(resources, key)}")
    if resources.gpus_per_worker > 1 and resources.gpus_per_worker != int(resources.gpus_per_worker):
        fail("resources.gpus_per_worker", f"above 1 must be a whole number, got {resources.gpus_per_worker}")
    if resources.use_gpu is not False and resources.workers > 1 and resources.gpus_per_worker < 1:
        fail("resources.gpus_per_worker", f"({resources.gpus_per_worker:g}) below 1 with {resources.workers} workers "
                                          "would put two DDP ranks on one GPU, which NCCL refuses")
    for key in ("worker_max_failures", "trial_max_failures"):
        if getattr(fault_tolerance, key) < -1:
            fail(f"fault_tolerance.{key}", f"must be >= 0, or -1 for unlimited, got {getattr(fault_tolerance, key)}")
    if fault_tolerance.checkpoints_kept < 1:
        fail("fault_tolerance.checkpoints_kept", f"must be >= 1, got {fault_tolerance.checkpoints_kept}")


def _check_sampler(where: str, sampler: Sampler) -> None:
    if sampler.type == "nsga2" and sampler.population_size < 2:
        raise ConfigError(f"{where}: 'sampler.population_size' must be >= 2, got {sampler.population_size}")
    if sampler.type != "nsga2" and sampler.population_size != Sampler.population_size:
        raise ConfigError(f"{where}: 'sampler.population_size' is an nsga2 setting (sampler.type is {sampler.type})")
    if sampler.type == "nsga2" and (sampler.multivariate or sampler.group or sampler.constant_liar):
        raise ConfigError(f"{where}: 'sampler.type' nsga2 takes no TPE settings (multivariate, group, constant_liar)")
    if sampler.n_startup_trials < 0:
        raise ConfigError(f"{where}: 'sampler.n_startup_trials' must be >= 0, got {sampler.n_startup_trials}")
    if sampler.group and not sampler.multivariate:
        raise ConfigError(f"{where}: 'sampler.group' needs 'sampler.multivariate: true' (Optuna's TPE)")
    if sampler.type == "random" and (sampler.multivariate or sampler.group or sampler.constant_liar):
        raise ConfigError(f"{where}: 'sampler.type' random takes no TPE settings "
                          "(multivariate, group, constant_liar)")


_PREFIX = re.compile(r"^(override|\S+\.ya?ml): ")


def _strip_source(message: str) -> str:
    """Drop the 'override: ' / 'path.yaml: ' prefix of a psdet.config error we re-attribute."""
    return _PREFIX.sub("", message, count=1)


def _init_from_path(where: str, space_path: Path, experiment: Experiment, overrides: dict) -> str:
    """`experiment.init_from` as an absolute path (beside the space file, else from the
    working directory); ConfigError when it is not there or overrides set it as well."""
    if "train.init_from" in overrides:
        raise ConfigError(f"{where}: set 'experiment.init_from' or the override 'train.init_from', not both")
    given = Path(experiment.init_from).expanduser()
    for candidate in ([given] if given.is_absolute() else [space_path.parent / given, given]):
        if candidate.exists():
            return str(candidate.resolve())
    raise ConfigError(f"{where}: 'experiment.init_from': no checkpoint at {experiment.init_from}")


def check_init_from(spec: SweepSpec) -> None:
    """Before any trial starts: the sweep's pretrained checkpoint loads (weights_only) into
    the base config's model; CheckpointError naming it and the space otherwise."""
    init_from = spec.base_tree["train"].get("init_from")
    if not init_from:
        return
    from psdet.checkpoint import load_model_weights
    from psdet.models import build_model

    cfg = config_from_dict(copy.deepcopy(spec.base_tree), source=spec.path)
    load_model_weights(build_model(cfg.model, cfg.data.max_points), Path(init_from),
                       f"the base config of {spec.path} ('{cfg.name}')")


def _base_tree(where: str, space_path: Path, base_config: str, overrides: dict) -> dict:
    candidate = space_path.parent / base_config
    base = candidate if candidate.is_file() else base_config
    try:
        cfg = load_config(base, overrides)
    except ConfigError as exc:
        key = "experiment.overrides" if overrides and "override" in str(exc) else "experiment.base_config"
        raise ConfigError(f"{where}: '{key}': {_strip_source(str(exc))}") from None
    # Fully resolved, so a trial on another node reads no config file.
    return to_dict(cfg)


def _config_field(key: str) -> Any:
    """The annotation of dotted config key `key`; ConfigError text (no file) if it is not one."""
    cls: Any = Config
    parts = key.split(".")
    for depth, part in enumerate(parts):
        hints = typing.get_type_hints(cls)
        names = [f.name for f in dataclasses.fields(cls)]
        prefix = ".".join(parts[:depth])
        if part not in names:
            valid = [f"{prefix}.{n}" if prefix else n for n in names]
            raise ConfigError(f"is not a config key{_hint(key, valid)}")
        annotation = hints[part]
        if depth < len(parts) - 1:
            if not dataclasses.is_dataclass(annotation):
                raise ConfigError(f"is not a config key ('{'.'.join(parts[:depth + 1])}' is a value, not a section)")
            cls = annotation
        elif dataclasses.is_dataclass(annotation):
            raise ConfigError("is a config section; search one of its keys")
    return annotation


_PARAM_KEYS = {
    "loguniform": ("type", "low", "high", "when"),
    "uniform": ("type", "low", "high", "when"),
    "int": ("type", "low", "high", "log", "step", "when"),
    "choice": ("type", "values", "when"),
}


def _number(value: Any, where: str, integer: bool = False) -> float | int:
    value = yaml_number(value)
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ConfigError(f"{where} must be a number, got {value!r}")
    if integer:
        if value != int(value):
            raise ConfigError(f"{where} must be an integer, got {value!r}")
        return int(value)
    return float(value)


def _parse_search(where: str, search: dict, overrides: dict, base_tree: dict) -> tuple[Param, ...]:
    if not search:
        raise ConfigError(f"{where}: section 'search' has no parameters")
    params: list[Param] = []
    for key, body in search.items():
        key = str(key)
        at = f"{where}: 'search.{key}'"
        try:
            annotation = _config_field(key)
        except ConfigError as exc:
            raise ConfigError(f"{at} {exc}") from None
        if key in overrides:
            raise ConfigError(f"{at} is also fixed in 'experiment.overrides'; search it or fix it, not both")
        if key == "data.root":
            raise ConfigError(f"{at} cannot be searched (tune.py --data sets it)")
        if not isinstance(body, dict):
            raise ConfigError(f"{at} must be a mapping like {{type: loguniform, low: 1e-4, high: 1e-2}}, got {body!r}")
        kind = body.get("type")
        if kind not in PARAM_TYPES:
            raise ConfigError(f"{where}: 'search.{key}.type' must be one of {', '.join(PARAM_TYPES)}, got {kind!r}")
        for sub in body:
            if sub not in _PARAM_KEYS[kind]:
                raise ConfigError(f"{where}: unknown key 'search.{key}.{sub}' for type {kind}"
                                  f"{_hint(str(sub), _PARAM_KEYS[kind])}")
        param = _parse_param(where, key, kind, body, annotation)
        param = dataclasses.replace(param, when=_parse_when(where, key, body.get("when"), params))
        params.append(param)
    for param in params:
        _check_against_config(where, param, params, base_tree)
    return tuple(params)


def _parse_param(where: str, key: str, kind: str, body: dict, annotation: Any) -> Param:
    at = f"{where}: 'search.{key}"
    if kind == "choice":
        values = body.get("values")
        if not isinstance(values, list) or not values:
            raise ConfigError(f"{at}.values' must be a non-empty list, got {values!r}")
        for value in values:
            if not isinstance(value, (str, int, float, bool)):
                raise ConfigError(f"{at}.values' must hold plain values (numbers, strings, booleans), got {value!r}")
        if len(set(map(repr, values))) != len(values):
            raise ConfigError(f"{at}.values' lists a value twice: {values}")
        return Param(key, kind, values=tuple(values))

    for bound in ("low", "high"):
        if bound not in body:
            raise ConfigError(f"{at}.{bound}' is required for type {kind}")
    integer = kind == "int"
    low = _number(body["low"], f"{at}.low'", integer)
    high = _number(body["high"], f"{at}.high'", integer)
    if integer and annotation not in (int, float):
        raise ConfigError(f"{at}' has type int but config key {key} is {_type_name(annotation)}")
    if not integer and annotation is not float:
        raise ConfigError(f"{at}' has type {kind} but config key {key} is {_type_name(annotation)} "
                          f"(use {'int' if annotation is int else 'choice'})")
    if low > high or (low == high and not integer):
        raise ConfigError(f"{at}.low' ({low}) must be below 'high' ({high})")
    log = body.get("log", False)
    if not isinstance(log, bool):
        raise ConfigError(f"{at}.log' must be true or false, got {log!r}")
    if (kind == "loguniform" or log) and low <= 0:
        raise ConfigError(f"{at}.low' must be positive for a log scale, got {low}")
    step = _number(body.get("step", 1), f"{at}.step'", integer=True)
    if step < 1 or (log and step != 1):
        raise ConfigError(f"{at}.step' must be >= 1 (and 1 with log: true), got {step}")
    if integer and (high - low) % step:
        raise ConfigError(f"{at}.high' ({high}) must be 'low' ({low}) plus a whole number of steps ({step})")
    return Param(key, kind, low=low, high=high, log=log, step=int(step))


def _type_name(annotation: Any) -> str:
    return getattr(annotation, "__name__", None) or str(annotation).replace("typing.", "")


def _parse_when(where: str, key: str, when: Any, earlier: list[Param]) -> tuple[tuple[str, tuple], ...]:
    if when is None:
        return ()
    at = f"{where}: 'search.{key}.when'"
    if not isinstance(when, dict) or not when:
        raise ConfigError(f"{at} must map an earlier choice parameter to its enabling value(s), got {when!r}")
    by_key = {p.key: p for p in earlier}
    conditions = []
    for ref, allowed in when.items():
        ref = str(ref)
        if ref not in by_key:
            raise ConfigError(f"{at} refers to '{ref}', which is not a search parameter listed above it"
                              f"{_hint(ref, list(by_key)) if by_key else ''}")
        target = by_key[ref]
        if target.type != "choice":
            raise ConfigError(f"{at} refers to '{ref}', a {target.type} parameter; conditions need a choice")
        allowed = tuple(allowed) if isinstance(allowed, list) else (allowed,)
        impossible = [value for value in allowed if value not in target.values]
        if impossible:
            raise ConfigError(f"{at}: '{ref}' never takes {impossible[0]!r} (its values: {list(target.values)})")
        conditions.append((ref, allowed))
    return tuple(conditions)


def _enabling_context(param: Param, by_key: dict[str, Param]) -> dict[str, Any]:
    """Values of the parameters `param` depends on (transitively) that make it active."""
    context: dict[str, Any] = {}
    for ref, allowed in param.when:
        context.update(_enabling_context(by_key[ref], by_key))
        context[ref] = allowed[0]
    return context


def _check_against_config(where: str, param: Param, params: list[Param], base_tree: dict) -> None:
    """Each bound / choice must give a config the detector accepts, with its conditions met."""
    context = _enabling_context(param, {p.key: p for p in params})
    values = param.values if param.type == "choice" else (param.low, param.high)
    if param.type == "int" and not param.log and param.low + param.step <= param.high:
        values = (*values, param.low + param.step)  # a value between the bounds: data.image_size needs step 32
    for value in values:
        tree = copy.deepcopy(base_tree)
        for key, fixed in {**context, param.key: value}.items():
            set_dotted(tree, key, fixed)
        try:
            config_from_dict(tree, source="search")
        except ConfigError as exc:
            raise ConfigError(f"{where}: 'search.{param.key}': {value!r} is rejected by the config: "
                              f"{_strip_source(str(exc)).removeprefix('search: ')}") from None


def _describe_sampler(sampler: Sampler) -> str:
    if sampler.type == "random":
        return "random"
    if sampler.type == "nsga2":
        return f"NSGA-II, population {sampler.population_size}"
    flags = [name for name in ("multivariate", "group", "constant_liar") if getattr(sampler, name)]
    return f"TPE, {sampler.n_startup_trials} random startup trials" + (f", {', '.join(flags)}" if flags else "")


def _describe_objectives(spec: SweepSpec) -> str:
    if not spec.multi_objective:
        return f"{spec.experiment.mode} {spec.experiment.metric}"
    return "Pareto front of " + ", ".join(f"{mode} {metric}" for metric, mode in spec.objectives)


def _describe_budget(budget: Budget) -> str:
    names = {"gpu_hours": "GPU-hours", "cpu_hours": "CPU-hours", "epochs": "epochs", "wall_hours": "wall hours"}
    limits = ", ".join(f"{limit:g} {names[unit]}" for unit, limit in budget.limits().items())
    then = "running trials stop at their next rung" if budget.stop_running else "running trials finish"
    return f"{limits}; no new trial once the next would cross it, {then}"


def describe_space(spec: SweepSpec) -> str:
    """The validated space as a short, human-readable block."""
    e, s, r, f = spec.experiment, spec.scheduler, spec.resources, spec.fault_tolerance
    lines = [
        f"sweep '{spec.name}' from {spec.path}",
        f"  base config   {e.base_config}" + (f"  + {spec.overrides}" if spec.overrides else ""),
        f"  objective     {_describe_objectives(spec)}, {e.num_samples} trials, {e.max_concurrent} at a time, "
        f"seed {e.seed}" + (f", time budget {e.time_budget_s:g} s" if e.time_budget_s else "")
        + (", first trial = the base config's values" if e.baseline else ""),
        *([f"  budget        {_describe_budget(e.budget)}"] if e.budget.limits() else []),
        f"  sampler       {_describe_sampler(spec.sampler)}",
        "  search",
        *[f"    {p.key:<28} {p.describe()}" for p in spec.search],
        f"  scheduler     {'MO-ASHA' if s.type == 'asha' and spec.multi_objective else s.type}" + (f" (grace {s.grace_period} epochs, reduction {s.reduction_factor:g}, "
                                       f"max {spec.max_epochs} epochs)" if s.type == "asha" else ""),
        f"  resources     {r.workers} workers x {r.cpus_per_worker:g} CPU"
        + (f" + {r.gpus_per_worker:g} GPU" if r.use_gpu is not False else "")
        + f" (use_gpu {r.use_gpu})"
        + (f", driver {r.driver_cpus:g} CPU" if r.workers > 1 else ", in the trial's own process"),
        f"  faults        worker restarts {f.worker_max_failures}, trial retries {f.trial_max_failures}, "
        f"keep {f.checkpoints_kept} checkpoints",
    ]
    return "\n".join(lines)
