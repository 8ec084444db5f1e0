"""`tune.py --warm-start EXPERIMENT`: the finished trials of an earlier sweep, made into
Optuna trials of the new sweep's space, for `Study.add_trials` before its first suggestion.

EXPERIMENT is the earlier sweep's directory (a local path or a storage URI); its sweep.json
says where its study lives and which space it ran. The earlier sweep must have optimised
the same objectives (metrics and directions, in the same order), else it is refused.
Each COMPLETE or PRUNED trial is taken whose parameters fit the new space: exactly the
parameters the new space samples for those values (its `when` conditions included), each
inside its new range or choices. The rest are left out and counted; when none fits,
the warm start is refused. The earlier study itself is read, never written (a journal is
copied first).
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Any

import optuna
import yaml
from optuna.trial import FrozenTrial, TrialState

from orchestrate import storage, sweep_file
from orchestrate.space import Param, SweepSpec
from psdet.errors import UserError

WARM_START = "warm_start"  # user attr of an added trial: "<earlier sweep>#<its trial number>"


def distribution(param: Param) -> optuna.distributions.BaseDistribution:
    """The Optuna distribution `Param.suggest` samples from."""
    if param.type == "loguniform":
        return optuna.distributions.FloatDistribution(param.low, param.high, log=True)
    if param.type == "uniform":
        return optuna.distributions.FloatDistribution(param.low, param.high)
    if param.type == "int":
        return optuna.distributions.IntDistribution(int(param.low), int(param.high), log=param.log, step=param.step)
    return optuna.distributions.CategoricalDistribution(list(param.values))


def misfit(params: dict[str, Any], spec: SweepSpec) -> str | None:
    """Why `params` are not a point of `spec`'s space, or None when they are."""
    chosen: dict[str, Any] = {}
    for param in spec.search:
        if not param.active(chosen):
            continue
        if param.key not in params:
            return f"no value for {param.key}"
        value = params[param.key]
        if param.type == "choice":
            inside = value in param.values
        elif isinstance(value, bool) or not isinstance(value, (int, float)):
            inside = False
        elif param.type == "int":
            inside = value == int(value) and param.low <= value <= param.high and (value - param.low) % param.step == 0
        else:
            inside = param.low <= value <= param.high
        if not inside:
            return f"{param.key} {value!r} is outside {param.describe()}"
        chosen[param.key] = value
    extra = sorted(set(params) - set(chosen))
    return f"{extra[0]} is not searched here" if extra else None


def _objectives_of(space_text: str) -> tuple[tuple[str, str], ...]:
    experiment = (yaml.safe_load(space_text) or {}).get("experiment") or {}
    if experiment.get("objectives"):
        return tuple((str(m), str(mode)) for m, mode in experiment["objectives"].items())
    return ((experiment.get("metric", "slot_ap"), experiment.get("mode", "max")),)


def _open_study(source: str, saved: dict[str, Any], scratch: Path) -> optuna.Study:
    url = saved["optuna_storage"]
    if "://" in url and not url.startswith("file://"):
        return optuna.load_study(study_name=saved["name"], storage=optuna.storages.RDBStorage(url))
    local = Path(url.removeprefix("file://"))
    copied = storage.join(source, sweep_file.JOURNAL)
    if local.is_file():
        data = local.read_bytes()
    elif storage.exists(copied):
        data = storage.read_bytes(copied)
    else:
        raise UserError(f"--warm-start {source}: its Optuna journal is gone ({url}, nor {copied})")
    journal = scratch / "earlier.journal"
    journal.write_bytes(data)
    backend = optuna.storages.journal.JournalFileBackend(str(journal))
    return optuna.load_study(study_name=saved["name"], storage=optuna.storages.JournalStorage(backend))


def load(source: str, spec: SweepSpec) -> tuple[list[FrozenTrial], str]:
    """(the earlier sweep's fitting finished trials as new Optuna trials, a line saying how
    many were taken); UserError when the earlier sweep cannot seed this one."""
    experiment = storage.normalize(source)
    saved = sweep_file.read(experiment)
    if saved is None:
        raise UserError(f"--warm-start {source}: no sweep there (no {sweep_file.SWEEP_FILE}); give the directory "
                        "of an earlier sweep, such as runs/<name>")
    earlier = _objectives_of(saved["space_text"])
    if earlier != spec.objectives:
        show = lambda objectives: ", ".join(f"{mode} {metric}" for metric, mode in objectives)  # noqa: E731
        raise UserError(f"--warm-start {source}: sweep '{saved['name']}' optimised {show(earlier)}, "
                        f"this space optimises {show(spec.objectives)}; its scores cannot seed this study")
    with tempfile.TemporaryDirectory(prefix="psdet-warm-start-") as scratch:
        study = _open_study(experiment, saved, Path(scratch))
        finished = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE, TrialState.PRUNED))
    by_key = {param.key: param for param in spec.search}
    taken, left_out = [], []
    for frozen in finished:
        why = misfit(frozen.params, spec)
        if why is not None:
            left_out.append(f"trial {frozen.number}: {why}")
            continue
        complete = frozen.state == TrialState.COMPLETE
        taken.append(optuna.create_trial(
            state=frozen.state,
            values=list(frozen.values) if complete else None,
            params=dict(frozen.params),
            distributions={key: distribution(by_key[key]) for key in frozen.params},
            intermediate_values=dict(frozen.intermediate_values),
            user_attrs={WARM_START: f"{saved['name']}#{frozen.number}"},
        ))
    if not taken:
        why = f" ({left_out[0]})" if left_out else ""
        raise UserError(f"--warm-start {source}: none of the {len(finished)} finished trials of sweep "
                        f"'{saved['name']}' fits this space{why}")
    line = (f"warm start: {len(taken)} of {len(finished)} finished trials of sweep '{saved['name']}' "
            f"({source}) fit this space and seed the study")
    if left_out:
        line += f"; {len(left_out)} left out, e.g. {left_out[0]}"
    return taken, line
