"""psdet.optim: optimizers, schedules as pure functions of the step, warmup, bad combinations."""
from __future__ import annotations

import dataclasses
import json
import math
import random
import re
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch

from psdet.config import OptimConfig, load_config, resolve_config_path
from psdet.errors import ConfigError
from psdet.optim import (
    apply_schedule,
    build_optimizer,
    effective_scheduler,
    lr_at,
    lr_curve,
    momentum_at,
    momentum_curve,
)

SCHEDULERS = ["onecycle", "cosine", "step", "poly", "constant"]


def make_cfg(**changes) -> OptimConfig:
    return dataclasses.replace(OptimConfig(), **changes)


def small_model() -> torch.nn.Module:
    torch.manual_seed(0)
    return torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3), torch.nn.BatchNorm2d(4), torch.nn.ReLU(),
                               torch.nn.Flatten(), torch.nn.Linear(4 * 6 * 6, 2))


# ----------------------------------------------------------------------------- reference OneCycle
# A straight transcription of the original (OpenPCDet learning_schedules_fastai.py):
# LRSchedulerStep + OneCycle driving a fake fastai optimizer with `.lr` and `.mom`.


def reference_annealing_cos(start, end, pct):
    return end + (start - end) / 2 * (math.cos(math.pi * pct) + 1)


class FakeOptim:
    lr = 0.0
    mom = 0.0


class ReferenceOneCycle:
    def __init__(self, optimizer, total_step, lr_max, moms, div_factor, pct_start):
        low_lr = lr_max / div_factor
        lr_phases = ((0, partial(reference_annealing_cos, low_lr, lr_max)),
                     (pct_start, partial(reference_annealing_cos, lr_max, low_lr / 1e4)))
        mom_phases = ((0, partial(reference_annealing_cos, *moms)),
                      (pct_start, partial(reference_annealing_cos, *moms[::-1])))
        optimizer.lr, optimizer.mom = low_lr, moms[0]
        self.optimizer = optimizer
        self.lr_phases = self._phases(lr_phases, total_step)
        self.mom_phases = self._phases(mom_phases, total_step)

    @staticmethod
    def _phases(phases, total_step):
        out = []
        for i, (start, func) in enumerate(phases):
            end = int(phases[i + 1][0] * total_step) if i < len(phases) - 1 else total_step
            out.append((int(start * total_step), end, func))
        return out

    def step(self, step):
        for start, end, func in self.lr_phases:
            if step >= start:
                self.optimizer.lr = func((step - start) / (end - start))
        for start, end, func in self.mom_phases:
            if step >= start:
                self.optimizer.mom = func((step - start) / (end - start))


@pytest.mark.parametrize("steps_per_epoch, epochs, pct_start, div_factor", [
    (10, 10, 0.4, 10.0),   # the shipped defaults on a 100-step run
    (37, 3, 0.3, 25.0),    # phase boundary not on an epoch
    (10, 10, 0.57, 10.0),  # int(100 * 0.57) == 56: the original's rounding is kept
    (7, 1, 0.5, 4.0),
])
def test_onecycle_matches_the_original_at_every_step(steps_per_epoch, epochs, pct_start, div_factor):
    cfg = make_cfg(scheduler="onecycle", lr=0.003, pct_start=pct_start, div_factor=div_factor,
                   final_div_factor=1e4, moms=[0.95, 0.85])
    n = steps_per_epoch * epochs
    fake = FakeOptim()
    reference = ReferenceOneCycle(fake, n, cfg.lr, cfg.moms, div_factor, pct_start)
    expected_lr, expected_mom = [], []
    for step in range(n):
        reference.step(step)
        expected_lr.append(fake.lr)
        expected_mom.append(fake.mom)
    np.testing.assert_allclose(lr_curve(cfg, steps_per_epoch, epochs), expected_lr, rtol=1e-12)
    np.testing.assert_allclose(momentum_curve(cfg, steps_per_epoch, epochs), expected_mom, rtol=1e-12)
    for step in (0, int(n * pct_start), n - 1):
        assert lr_at(cfg, step, steps_per_epoch, epochs) == pytest.approx(expected_lr[step], rel=1e-12)
        assert momentum_at(cfg, step, steps_per_epoch, epochs) == pytest.approx(expected_mom[step], rel=1e-12)


def test_onecycle_by_hand():
    cfg = make_cfg(scheduler="onecycle", lr=0.003, pct_start=0.4, div_factor=10.0, final_div_factor=1e4)
    lr = partial(lr_at, cfg, steps_per_epoch=10, total_epochs=10)
    mom = partial(momentum_at, cfg, steps_per_epoch=10, total_epochs=10)
    assert lr(step=0) == pytest.approx(0.0003)
    assert lr(step=20) == pytest.approx((0.0003 + 0.003) / 2)  # halfway up the cosine
    assert lr(step=40) == pytest.approx(0.003)  # the peak, at pct_start of 100 steps
    assert lr(step=70) == pytest.approx((0.003 + 3e-8) / 2)  # halfway down
    assert lr(step=100) == pytest.approx(3e-8)  # the end: lr / div_factor / final_div_factor
    assert lr(step=10_000) == pytest.approx(3e-8)  # past the end: stays at the end value
    assert [mom(step=s) for s in (0, 20, 40, 70, 100)] == pytest.approx([0.95, 0.90, 0.85, 0.90, 0.95])


def test_onecycle_too_short_to_rise_starts_at_the_peak():
    cfg = make_cfg(scheduler="onecycle", pct_start=0.4)
    # 2 steps: int(2 * 0.4) == 0 rising steps (the original divided by zero here)
    assert lr_curve(cfg, 2, 1) == pytest.approx([cfg.lr, (cfg.lr + cfg.lr / 10 / 1e4) / 2])


# ----------------------------------------------------------------------------- other schedulers


def test_cosine_by_hand():
    cfg = make_cfg(scheduler="cosine", lr=0.01, lr_clip=1e-4)
    lr = partial(lr_at, cfg, steps_per_epoch=5, total_epochs=20)  # 100 steps
    assert lr(step=0) == pytest.approx(0.01)
    assert lr(step=25) == pytest.approx(1e-4 + (0.01 - 1e-4) * (1 + math.cos(math.pi / 4)) / 2)
    assert lr(step=50) == pytest.approx((0.01 + 1e-4) / 2)
    assert lr(step=100) == pytest.approx(1e-4)
    assert momentum_at(cfg, 50, 5, 20) is None


def test_step_decays_at_epoch_boundaries():
    cfg = make_cfg(scheduler="step", lr=0.01, decay_step_list=[2, 5], lr_decay=0.1, lr_clip=1e-7)
    lr = partial(lr_at, cfg, steps_per_epoch=10, total_epochs=8)
    assert [lr(step=s) for s in (0, 19, 20, 49, 50, 79)] == pytest.approx([0.01, 0.01, 1e-3, 1e-3, 1e-4, 1e-4])


def test_step_is_floored_at_lr_clip():
    cfg = make_cfg(scheduler="step", lr=0.01, decay_step_list=[1, 2, 3], lr_decay=0.1, lr_clip=5e-5)
    assert [lr_at(cfg, s, 10, 4) for s in (9, 10, 20, 30)] == pytest.approx([0.01, 1e-3, 1e-4, 5e-5])


def test_poly_by_hand():
    cfg = make_cfg(scheduler="poly", lr=0.02, poly_power=0.9, lr_clip=1e-6)
    lr = partial(lr_at, cfg, steps_per_epoch=10, total_epochs=10)
    assert lr(step=0) == pytest.approx(0.02)
    assert lr(step=50) == pytest.approx(0.02 * 0.5 ** 0.9)
    assert lr(step=75) == pytest.approx(0.02 * 0.25 ** 0.9)
    assert lr(step=100) == pytest.approx(1e-6)  # (1 - 1) ** p == 0, floored


def test_constant():
    cfg = make_cfg(scheduler="constant", lr=0.005)
    assert set(lr_curve(cfg, 10, 3).tolist()) == {0.005}


# ----------------------------------------------------------------------------- warmup


@pytest.mark.parametrize("scheduler", SCHEDULERS)
@pytest.mark.parametrize("warmup", ["linear", "cosine"])
def test_warmup_scales_every_scheduler(scheduler, warmup):
    spe, epochs = 10, 10  # 100 steps; warmup 2 epochs = 20 steps
    plain = make_cfg(scheduler=scheduler, decay_step_list=[1, 5], warmup="none")
    warmed = dataclasses.replace(plain, warmup=warmup, warmup_epochs=2.0, warmup_start_factor=0.25)
    scheduled = lr_curve(plain, spe, epochs)
    curve = lr_curve(warmed, spe, epochs)
    assert curve[0] == pytest.approx(0.25 * scheduled[0])
    half_factor = 0.25 + 0.75 * 0.5  # linear and half-cosine agree at the midpoint
    assert curve[10] == pytest.approx(half_factor * scheduled[10])
    quarter = 0.25 if warmup == "linear" else (1 - math.cos(math.pi / 4)) / 2
    assert curve[5] == pytest.approx((0.25 + 0.75 * quarter) * scheduled[5])
    np.testing.assert_array_equal(curve[20:], scheduled[20:])  # after warmup: the schedule, exactly
    assert (curve[:20] < scheduled[:20]).all()


def test_fractional_warmup_epochs_round_to_steps():
    cfg = make_cfg(scheduler="constant", lr=1.0, warmup="linear", warmup_epochs=0.5, warmup_start_factor=0.1)
    curve = lr_curve(cfg, 7, 2)  # round(3.5) == 4 warmup steps
    assert curve[:5] == pytest.approx([0.1, 0.325, 0.55, 0.775, 1.0])


# ----------------------------------------------------------------------------- purity


@pytest.mark.parametrize("scheduler", SCHEDULERS)
def test_schedules_are_pure_functions_of_the_step(scheduler):
    cfg = make_cfg(scheduler=scheduler, warmup="cosine", warmup_epochs=1.0, decay_step_list=[2, 4])
    spe, epochs = 6, 5
    in_order = [(lr_at(cfg, s, spe, epochs), momentum_at(cfg, s, spe, epochs)) for s in range(spe * epochs)]
    steps = list(range(spe * epochs))
    random.Random(0).shuffle(steps)
    shuffled = {s: (lr_at(cfg, s, spe, epochs), momentum_at(cfg, s, spe, epochs)) for s in steps}
    assert [shuffled[s] for s in range(spe * epochs)] == in_order
    assert lr_curve(cfg, spe, epochs).tolist() == [lr for lr, _ in in_order]

    # apply_schedule in any order leaves the optimizer exactly as a fresh one at that step
    optimizer = build_optimizer(small_model(), cfg)
    for s in steps:
        logged = apply_schedule(optimizer, cfg, s, spe, epochs)
        assert logged["lr"] == in_order[s][0]
        assert optimizer.param_groups[0]["lr"] == in_order[s][0]


# ----------------------------------------------------------------------------- optimizers


def test_adam_onecycle_is_adamw_with_the_onecycle_schedule():
    run = load_config("ps_gat", ["optim.scheduler=cosine"])  # the shipped recipe; its scheduler is ignored
    cfg, epochs, spe = run.optim, run.train.epochs, 10
    assert cfg.optimizer == "adam_onecycle" and effective_scheduler(cfg) == "onecycle"
    model = small_model()
    optimizer = build_optimizer(model, cfg)
    assert type(optimizer) is torch.optim.AdamW
    (group,) = optimizer.param_groups
    assert group["betas"] == (0.9, 0.99) and group["weight_decay"] == 0.01
    # every parameter, BatchNorm included (the original's bn_wd=True)
    assert {id(p) for p in group["params"]} == {id(p) for p in model.parameters()}

    logged = apply_schedule(optimizer, cfg, 0, spe, epochs)
    assert logged == pytest.approx({"lr": 0.0003, "momentum": 0.95})
    assert group["betas"] == pytest.approx((0.95, 0.99))  # beta1 cycles, beta2 stays
    peak = int(spe * epochs * 0.4)
    apply_schedule(optimizer, cfg, peak, spe, epochs)
    assert group["lr"] == pytest.approx(0.003) and group["betas"] == pytest.approx((0.85, 0.99))


def test_adam_onecycle_steps_like_the_original_true_weight_decay():
    """fastai OptimWrapper(true_wd=True): p *= 1 - lr * wd, then Adam with weight_decay 0."""
    cfg = make_cfg(optimizer="adam_onecycle", lr=0.01, weight_decay=0.1)
    ours_model, reference_model = small_model(), small_model()
    ours = build_optimizer(ours_model, cfg)
    reference = torch.optim.Adam(reference_model.parameters(), lr=0.0, betas=(0.9, 0.99), weight_decay=0.0)
    batch = torch.randn(4, 3, 8, 8)
    for step in range(6):
        lr, mom = lr_at(cfg, step, 2, 3), momentum_at(cfg, step, 2, 3)
        apply_schedule(ours, cfg, step, 2, 3)
        for group in reference.param_groups:
            group["lr"], group["betas"] = lr, (mom, 0.99)
        for model, optimizer in ((ours_model, ours), (reference_model, reference)):
            optimizer.zero_grad()
            model(batch).square().sum().backward()
        with torch.no_grad():
            for p in reference_model.parameters():
                p.mul_(1 - lr * cfg.weight_decay)
        ours.step()
        reference.step()
    for p, q in zip(ours_model.parameters(), reference_model.parameters()):
        torch.testing.assert_close(p, q, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("optimizer, expected", [("adam", 0.9), ("adamw", 0.999)])
def test_adam_decay_is_coupled_and_adamw_decoupled(optimizer, expected):
    # zero gradient: coupled L2 makes the gradient wd * p, so Adam moves p by ~lr;
    # decoupled decay only shrinks p by lr * wd
    cfg = make_cfg(optimizer=optimizer, scheduler="constant", lr=0.1, weight_decay=0.01)
    weight = torch.nn.Parameter(torch.ones(1))
    opt = build_optimizer(torch.nn.ParameterList([weight]), cfg)
    apply_schedule(opt, cfg, 0, 1, 1)
    weight.grad = torch.zeros(1)
    opt.step()
    assert weight.item() == pytest.approx(expected, rel=1e-4)


def test_sgd_nesterov():
    cfg = make_cfg(optimizer="sgd", momentum=0.9, nesterov=True, scheduler="cosine", weight_decay=1e-4)
    optimizer = build_optimizer(small_model(), cfg)
    assert type(optimizer) is torch.optim.SGD
    (group,) = optimizer.param_groups
    assert group["nesterov"] is True and group["momentum"] == 0.9 and group["weight_decay"] == 1e-4
    assert apply_schedule(optimizer, cfg, 5, 10, 2)["momentum"] == 0.9  # cosine leaves momentum alone

    cycling = dataclasses.replace(cfg, scheduler="onecycle")
    logged = apply_schedule(optimizer, cycling, 0, 10, 2)
    assert logged["momentum"] == group["momentum"] == pytest.approx(0.95)


def test_sgd_without_momentum_is_not_given_one_by_onecycle():
    cfg = make_cfg(optimizer="sgd", momentum=0.0, scheduler="onecycle")
    assert momentum_at(cfg, 3, 10, 2) is None
    optimizer = build_optimizer(small_model(), cfg)
    assert apply_schedule(optimizer, cfg, 3, 10, 2)["momentum"] == 0.0
    assert optimizer.param_groups[0]["momentum"] == 0.0


def test_plain_adam_with_onecycle_cycles_beta1():
    cfg = make_cfg(optimizer="adam", scheduler="onecycle", betas=[0.9, 0.999])
    optimizer = build_optimizer(small_model(), cfg)
    apply_schedule(optimizer, cfg, 0, 10, 10)
    assert optimizer.param_groups[0]["betas"] == pytest.approx((0.95, 0.999))
    assert apply_schedule(optimizer, dataclasses.replace(cfg, scheduler="poly"), 0, 10, 10)["momentum"] == 0.9


# ----------------------------------------------------------------------------- bad combinations


@pytest.mark.parametrize("changes, message", [
    (dict(optimizer="sgd", momentum=0.0, nesterov=True), "needs optim.momentum > 0"),
    (dict(optimizer="adam", nesterov=True), "applies only to optimizer sgd"),
    (dict(optimizer="sgd", momentum=0.9, nesterov=True, scheduler="onecycle", moms=[0.9, 0.0]),
     "onecycle momentum"),
    (dict(momentum=1.0), "'optim.momentum' must be in [0, 1)"),
    (dict(moms=[0.95, 1.2]), "'optim.moms'"),
    (dict(betas=[0.9]), "'optim.betas'"),
    (dict(weight_decay=-0.1), "'optim.weight_decay'"),
    (dict(lr_clip=0.1, lr=0.01), "'optim.lr_clip'"),
    (dict(pct_start=1.0), "'optim.pct_start'"),
])
def test_bad_combinations_raise_config_error(changes, message):
    cfg = make_cfg(**changes)
    with pytest.raises(ConfigError, match=re.escape(message)):
        build_optimizer(small_model(), cfg)
    with pytest.raises(ConfigError, match=re.escape(message)):
        lr_at(cfg, 0, 10, 10)
    # the same rule, met where a user meets it: loading a config, the error naming the file
    overrides = [f"optim.{key}={json.dumps(value)}" for key, value in changes.items()]
    source = re.escape(str(resolve_config_path("ps_gat_tiny")))
    with pytest.raises(ConfigError, match=rf"^{source}: .*{re.escape(message)}"):
        load_config("ps_gat_tiny", overrides)


def test_apply_schedule_trusts_the_config_build_optimizer_checked():
    """The rules run once per run (build_optimizer, and when the config is loaded), not in
    apply_schedule, which runs every step."""
    cfg = make_cfg(scheduler="cosine", lr=0.01, lr_clip=1e-4)
    optimizer = build_optimizer(small_model(), cfg)
    unchecked = dataclasses.replace(cfg, lr_clip=0.1)  # above lr: rejected wherever the rules run
    with pytest.raises(ConfigError, match="'optim.lr_clip'"):
        lr_at(unchecked, 0, 10, 10)
    assert apply_schedule(optimizer, unchecked, 0, 10, 10)["lr"] == pytest.approx(0.01)


def test_the_config_module_does_not_import_optim():
    """config.py holds the optimizer rules; optim.py imports config, never the other way round."""
    probe = ("import sys; from psdet.config import load_config; load_config('ps_gat_tiny'); "
             "print('psdet.optim' in sys.modules)")
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            cwd=Path(__file__).resolve().parents[1])
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "False"


def test_run_shape_errors():
    with pytest.raises(ConfigError, match="longer than the run"):
        lr_at(make_cfg(warmup="linear", warmup_epochs=5.0), 0, 10, 4)
    with pytest.raises(ConfigError, match="smaller than one batch"):
        lr_curve(make_cfg(), 0, 4)
    with pytest.raises(ValueError, match="steps must be >= 0"):
        lr_at(make_cfg(), -1, 10, 4)
