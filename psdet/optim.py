"""Optimizers, LR schedules and warmup; every schedule is a pure function of the global step.

There are no torch LR-scheduler objects. The engine calls, before every optimizer step,

    apply_schedule(optimizer, cfg, global_step, steps_per_epoch, total_epochs)

which writes the lr and the momentum (SGD `momentum`, Adam/AdamW `betas[0]`) of that
step into every param group. The only schedule state is the global step, so resuming
is "load the optimizer, carry on from the saved step", and `lr_curve` draws the exact
curve a run will get (`--dry-run`).

The rules on which settings work together live in `psdet.config.validate_optim`. They
run when a config is loaded, and once per run in `build_optimizer` (and per call of the
curve functions) for an `OptimConfig` built in code; never in `apply_schedule`.

Steps are counted from 0; a run has `steps_per_epoch * total_epochs` steps. Steps at
or past the end get the final value (the original kept evaluating its cosine past
the end and the lr climbed again).

Optimizers (`optim.optimizer`), all over every trainable parameter in one group,
BatchNorm and biases included:
- `adam`: `torch.optim.Adam`, weight decay COUPLED (L2 added to the gradient), as the
  original's `adam` was. Use `adamw` for decoupled decay.
- `adamw`: `torch.optim.AdamW` (decoupled decay).
- `sgd`: `torch.optim.SGD` with `momentum` and `nesterov` (coupled decay).
- `adam_onecycle`: the original's recipe, see below.

`adam_onecycle` in the original (OpenPCDet `build_optimizer` / `build_scheduler`, used
unchanged by gcn-parking-slot) is fastai's `OptimWrapper` around
`Adam(betas=(0.9, 0.99))` with `true_wd=True, bn_wd=True`: before each Adam step (run
with weight_decay 0) every parameter, BatchNorm ones included, is multiplied by
`1 - lr * wd`. That is exactly `torch.optim.AdamW` (same decay, same order, same moments)
with one param group. It always ran the `OneCycle` schedule (beta1 cycled through
`moms`) and ignored any warmup. Here it maps to:
    AdamW(betas=optim.betas, weight_decay=optim.weight_decay) + scheduler `onecycle`,
whatever `optim.scheduler` says (`effective_scheduler`). Residual differences:
- the original stepped its scheduler after `optimizer.step()` in gcn-parking-slot
  (OpenPCDet steps before), so its step k used the lr of step k-1; here step k uses step k;
- the original gave only parameters of leaf modules to the optimizer (a parameter owned
  by a module that also has children was never trained) and decayed parameters that got
  no gradient that step; here every trainable parameter is optimised and AdamW skips
  parameters without a gradient;
- the original split params into a non-BN and a BN group with identical settings; one
  group here (optimizer state_dicts are not interchangeable with the original's);
- `optim.warmup`, if set, composes with the one-cycle here; the original ignored it.

Schedulers (`optim.scheduler`), with t = step / total_steps:
- `onecycle`: the original `OneCycle`. Phase 1, steps [0, a) with
  a = int(total_steps * pct_start): cosine from lr/div_factor up to lr. Phase 2, steps
  [a, total_steps): cosine from lr down to lr/div_factor/final_div_factor. Momentum runs
  cosine moms[0] -> moms[1], then moms[1] -> moms[0], on the same phases. With
  `sgd` and momentum 0 the momentum is not cycled (plain SGD stays plain).
- `cosine`: lr_clip + (lr - lr_clip) * (1 + cos(pi t)) / 2.
- `step`: lr * lr_decay ** (number of epochs in decay_step_list already reached), at
  least lr_clip; the decay happens at step epoch * steps_per_epoch.
- `poly`: max(lr * (1 - t) ** poly_power, lr_clip).
- `constant`: lr.
Only `onecycle` cycles momentum; otherwise the momentum is the configured one
(`optim.momentum` for sgd, `optim.betas[0]` for adam/adamw).

Warmup (`optim.warmup`) multiplies the scheduled lr, for the first
w = round(warmup_epochs * steps_per_epoch) steps, by a factor going from
warmup_start_factor at step 0 to 1 at step w: linearly (`linear`) or along a half cosine
(`cosine`). It composes with every scheduler, which keeps running underneath.
"""
from __future__ import annotations

import numpy as np
import torch

from psdet.config import OptimConfig, effective_scheduler, validate_optim


def total_steps(steps_per_epoch: int, total_epochs: int) -> int:
    return steps_per_epoch * total_epochs


def warmup_steps(cfg: OptimConfig, steps_per_epoch: int) -> int:
    """Steps over which warmup scales the lr; 0 when warmup is off."""
    if cfg.warmup == "none":
        return 0
    return int(round(cfg.warmup_epochs * steps_per_epoch))


# ----------------------------------------------------------------------------- optimizers


def build_optimizer(model: torch.nn.Module, cfg: OptimConfig) -> torch.optim.Optimizer:
    """One param group over every trainable parameter of `model`, lr = optim.lr.

    The lr and momentum are placeholders until `apply_schedule` sets those of the step.
    `cfg` is checked here, once per run (`psdet.config.validate_optim`); `apply_schedule`
    then trusts it.
    """
    validate_optim(cfg)
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ValueError("the model has no trainable parameters")
    if cfg.optimizer == "adam":
        return torch.optim.Adam(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer in ("adamw", "adam_onecycle"):
        return torch.optim.AdamW(params, lr=cfg.lr, betas=tuple(cfg.betas), weight_decay=cfg.weight_decay)
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(params, lr=cfg.lr, momentum=cfg.momentum, nesterov=cfg.nesterov,
                               weight_decay=cfg.weight_decay)
    raise AssertionError(f"unhandled optimizer {cfg.optimizer!r}")  # the config's Literal forbids it


# ----------------------------------------------------------------------------- schedules
# The array versions are the only implementation; the scalar functions and apply_schedule
# call them with one step, so a curve and the values a run gets cannot disagree. The public
# curves check the config first; apply_schedule, run every step, does not.


def _annealing_cos(start: float, end: float, pct: np.ndarray) -> np.ndarray:
    """Cosine from `start` (pct 0) to `end` (pct 1), as the original's `annealing_cos`."""
    return end + (start - end) / 2 * (np.cos(np.pi * pct) + 1)


def _one_cycle(steps: np.ndarray, n_steps: int, pct_start: float,
               start: float, peak: float, end: float) -> np.ndarray:
    """The original `OneCycle` phases: start -> peak over [0, a), peak -> end over [a, n)."""
    rise = int(n_steps * pct_start)  # the original's phase boundary, int() included
    fall = n_steps - rise  # >= 1 because pct_start < 1
    rising = _annealing_cos(start, peak, steps / max(rise, 1))
    falling = _annealing_cos(peak, end, (steps - rise) / fall)
    return np.where(steps < rise, rising, falling)


def _scheduled_lr(cfg: OptimConfig, steps: np.ndarray, steps_per_epoch: int, n_steps: int) -> np.ndarray:
    scheduler = effective_scheduler(cfg)
    t = steps / n_steps
    if scheduler == "onecycle":
        start = cfg.lr / cfg.div_factor
        return _one_cycle(steps, n_steps, cfg.pct_start, start, cfg.lr, start / cfg.final_div_factor)
    if scheduler == "cosine":
        return cfg.lr_clip + (cfg.lr - cfg.lr_clip) * (1 + np.cos(np.pi * t)) / 2
    if scheduler == "step":
        boundaries = np.asarray(cfg.decay_step_list, dtype=np.int64) * steps_per_epoch
        decays = (steps[..., None] >= boundaries).sum(axis=-1)
        return np.maximum(cfg.lr * cfg.lr_decay ** decays, cfg.lr_clip)
    if scheduler == "poly":
        return np.maximum(cfg.lr * (1 - t) ** cfg.poly_power, cfg.lr_clip)
    if scheduler == "constant":
        return np.full(steps.shape, cfg.lr)
    raise AssertionError(f"unhandled scheduler {scheduler!r}")


def _warmup_factor(cfg: OptimConfig, steps: np.ndarray, steps_per_epoch: int) -> np.ndarray:
    n_warmup = warmup_steps(cfg, steps_per_epoch)
    if n_warmup == 0:
        return np.ones(steps.shape)
    progress = np.minimum(steps / n_warmup, 1.0)
    if cfg.warmup == "cosine":
        progress = (1 - np.cos(np.pi * progress)) / 2
    return cfg.warmup_start_factor + (1 - cfg.warmup_start_factor) * progress


def _as_steps(steps, n_steps: int) -> np.ndarray:
    steps = np.asarray(steps, dtype=np.int64)
    if (steps < 0).any():
        raise ValueError(f"steps must be >= 0, got {steps.min()}")
    return np.minimum(steps, n_steps)  # past the end: the final value


def _lr(cfg: OptimConfig, steps, steps_per_epoch: int, total_epochs: int) -> np.ndarray:
    n_steps = total_steps(steps_per_epoch, total_epochs)
    steps = _as_steps(np.arange(n_steps) if steps is None else steps, n_steps)
    return _scheduled_lr(cfg, steps, steps_per_epoch, n_steps) * _warmup_factor(cfg, steps, steps_per_epoch)


def _momentum(cfg: OptimConfig, steps, steps_per_epoch: int, total_epochs: int) -> np.ndarray | None:
    if not cycles_momentum(cfg):
        return None
    n_steps = total_steps(steps_per_epoch, total_epochs)
    steps = _as_steps(np.arange(n_steps) if steps is None else steps, n_steps)
    high, low = cfg.moms
    return _one_cycle(steps, n_steps, cfg.pct_start, high, low, high)


def lr_curve(cfg: OptimConfig, steps_per_epoch: int, total_epochs: int, steps=None) -> np.ndarray:
    """lr at each of `steps` (default: every step of the run), float64 `[len(steps)]`."""
    validate_optim(cfg, steps_per_epoch, total_epochs)
    return _lr(cfg, steps, steps_per_epoch, total_epochs)


def momentum_curve(cfg: OptimConfig, steps_per_epoch: int, total_epochs: int, steps=None) -> np.ndarray | None:
    """Momentum (SGD) or beta1 (Adam/AdamW) at each of `steps`; None when it is not scheduled."""
    validate_optim(cfg, steps_per_epoch, total_epochs)
    return _momentum(cfg, steps, steps_per_epoch, total_epochs)


def cycles_momentum(cfg: OptimConfig) -> bool:
    """Whether the momentum / beta1 follows a schedule (onecycle, except SGD without momentum)."""
    if effective_scheduler(cfg) != "onecycle":
        return False
    return not (cfg.optimizer == "sgd" and cfg.momentum == 0)


def lr_at(cfg: OptimConfig, step: int, steps_per_epoch: int, total_epochs: int) -> float:
    """The lr of global step `step` (0-based), warmup included."""
    return float(lr_curve(cfg, steps_per_epoch, total_epochs, steps=[step])[0])


def momentum_at(cfg: OptimConfig, step: int, steps_per_epoch: int, total_epochs: int) -> float | None:
    """SGD momentum or Adam/AdamW beta1 of global step `step`; None when the schedule does not cycle it."""
    curve = momentum_curve(cfg, steps_per_epoch, total_epochs, steps=[step])
    return None if curve is None else float(curve[0])


def base_momentum(cfg: OptimConfig) -> float:
    """The momentum / beta1 used when it is not scheduled."""
    return cfg.momentum if cfg.optimizer == "sgd" else cfg.betas[0]


def apply_schedule(optimizer: torch.optim.Optimizer, cfg: OptimConfig, step: int,
                   steps_per_epoch: int, total_epochs: int) -> dict[str, float]:
    """Set every param group's lr and momentum/beta1 for global step `step`; call before `optimizer.step()`.

    Both are written every step, scheduled or not, so the optimizer's hyperparameters
    depend on (cfg, step) only, never on what a loaded state_dict carried.
    Returns {"lr": ..., "momentum": ...} (the momentum or beta1 in effect) for logging.
    It runs every step, so it does not check `cfg` again: `build_optimizer` did, once.
    """
    lr = float(_lr(cfg, [step], steps_per_epoch, total_epochs)[0])
    cycled = _momentum(cfg, [step], steps_per_epoch, total_epochs)
    momentum = base_momentum(cfg) if cycled is None else float(cycled[0])
    key = "momentum" if cfg.optimizer == "sgd" else "betas"
    for group in optimizer.param_groups:
        if key not in group:
            raise TypeError(f"optimizer {type(optimizer).__name__} has no '{key}' for optim.optimizer "
                            f"{cfg.optimizer!r}: was it built by build_optimizer from this config?")
        group["lr"] = lr
        group[key] = momentum if key == "momentum" else (momentum, cfg.betas[1])
    return {"lr": lr, "momentum": momentum}
