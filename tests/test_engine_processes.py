"""The engine as separate processes: `psdet train` killed (SIGKILL) or preempted (SIGTERM)
and resumed ends bit for bit like a run never interrupted; the preemption notice in and
off the main thread; two ranks under torchrun. The slowest of the engine's tests, kept in
their own module so that the fast tier's two processes share the engine tests out evenly.
"""
from __future__ import annotations

import os
import re
import signal
import socket
import subprocess
import sys
import time

import torch

from cluster_helpers import wait_until
from engine_helpers import FAST, REPO, _assert_same_weights, _final_weights, _psdet, synth_data  # noqa: F401 (a fixture)
from psdet import checkpoint as ckpt


def test_resume_after_sigkill_mid_epoch_is_exact(synth_data, tmp_path):
    overrides = [f"-o={o}" for o in [*FAST, "train.ckpt_every_steps=2", "train.epochs=4"]]
    common = ["train", "-c", "ps_gat_tiny", "--data", str(synth_data), *overrides]
    clean, killed = tmp_path / "clean", tmp_path / "killed"
    subprocess.run(_psdet(*common, "--out", str(clean)), check=True, timeout=300, cwd=REPO,
                   stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    victim = subprocess.Popen(_psdet(*common, "--out", str(killed)), cwd=REPO,
                              stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 240
    try:
        # Kill as soon as a mid-epoch checkpoint of the second epoch exists.
        while time.monotonic() < deadline and victim.poll() is None:
            names = [p.name for p in ckpt.list_checkpoints(killed / "checkpoints")]
            if any(n.startswith("ckpt-e0001") for n in names):
                break
            time.sleep(0.02)
        assert victim.poll() is None, "the run ended before it could be killed"
        victim.send_signal(signal.SIGKILL)
        victim.wait(timeout=30)
    finally:
        if victim.poll() is None:
            victim.kill()
    assert victim.returncode == -signal.SIGKILL
    interrupted_at = ckpt.latest_valid(killed / "checkpoints")
    assert interrupted_at is not None and ckpt.read_meta(interrupted_at)["epoch"] < 4

    resumed = subprocess.run(_psdet(*common, "--out", str(killed), "--resume"), timeout=300, cwd=REPO,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stderr
    _assert_same_weights(_final_weights(clean), _final_weights(killed))



def test_sigterm_is_a_preemption_notice_no_step_lost(synth_data, tmp_path):
    """SIGTERM mid-run: the step in flight finishes, a checkpoint of exactly that step is
    written, the run exits 143 saying so; `--resume` ends bit for bit like a run never stopped."""
    overrides = [f"-o={o}" for o in [*FAST, "train.epochs=4"]]  # no periodic mid-epoch checkpoints
    common = ["train", "-c", "ps_gat_tiny", "--data", str(synth_data), *overrides]
    clean, stopped = tmp_path / "clean", tmp_path / "stopped"
    reference = subprocess.Popen(_psdet(*common, "--out", str(clean)), cwd=REPO,
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    log = tmp_path / "stopped.err"
    with open(log, "w") as err_file:
        victim = subprocess.Popen(_psdet(*common, "--out", str(stopped)), cwd=REPO, stdout=subprocess.DEVNULL,
                                  stderr=err_file)
    try:  # the notice comes once the first epoch is done
        wait_until(lambda: "epoch 1/4: loss" in log.read_text() or victim.poll() is not None, timeout=240,
                   what="the first epoch's log line", poll_s=0.1)
        assert victim.poll() is None, "the run ended before the notice"
        victim.send_signal(signal.SIGTERM)
        victim.wait(timeout=180)
        assert reference.wait(timeout=300) == 0
    finally:
        for process in (victim, reference):
            if process.poll() is None:
                process.kill()
    err = log.read_text()
    assert victim.returncode == 143, err[-2000:]
    said = re.search(r"psdet train: preempted \(SIGTERM\): stopped after step (\d+) with a checkpoint at (\S+); "
                     r"the same command with --resume continues it", err)
    assert said, err[-2000:]
    newest = ckpt.latest_valid(stopped / "checkpoints")
    assert str(newest) == said[2] and ckpt.read_meta(newest)["step"] == int(said[1])  # no step after the checkpoint
    assert 6 <= int(said[1]) < 24  # after the first epoch of 6 steps, before the last

    resumed = subprocess.run(_psdet(*common, "--out", str(stopped), "--resume"), timeout=300, cwd=REPO,
                             capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert f"resumed from {newest}" in resumed.stderr
    _assert_same_weights(_final_weights(clean), _final_weights(stopped))



def test_the_preemption_notice_takes_sigterm_in_the_main_thread():
    from psdet.distributed import DistContext
    from psdet.preemption import PreemptionNotice

    before = signal.getsignal(signal.SIGTERM)
    with PreemptionNotice() as notice:
        assert notice.active and signal.getsignal(signal.SIGTERM) != before
        assert not notice.requested(DistContext(0, 1, 0, torch.device("cpu")))
        os.kill(os.getpid(), signal.SIGTERM)
        assert notice.requested(DistContext(0, 1, 0, torch.device("cpu")))
    assert signal.getsignal(signal.SIGTERM) == before



# A host that runs the loop in a thread and ends its process on SIGTERM as Ray's workers do
# (ray._private.worker.Worker.main_loop: SystemExit raised in the main thread).
THREAD_HOST = """
import signal, sys, threading, time
import torch
from psdet.distributed import DistContext
from psdet.preemption import PreemptionNotice

def on_sigterm(signum, frame):
    raise SystemExit(1)

signal.signal(signal.SIGTERM, on_sigterm)
steps = []

def loop():
    with PreemptionNotice(exit_grace_s=60) as notice:
        print("handler kept", signal.getsignal(signal.SIGTERM) is on_sigterm, flush=True)
        for step in range(1, 100000):
            time.sleep(0.01)
            steps.append(step)
            if notice.requested(DistContext(0, 1, 0, torch.device("cpu")), step):
                time.sleep(0.5)  # the checkpoint
                print("checkpoint after step", step, flush=True)
                return

threading.Thread(target=loop, daemon=True).start()
while len(steps) < 5:
    time.sleep(0.01)
print("ready", flush=True)
time.sleep(600)
"""



def test_off_the_main_thread_an_exit_on_sigterm_waits_for_the_checkpoint(tmp_path):
    """Where the loop runs in a thread and the host's SIGTERM handler exits the process (Ray's
    workers), the notice holds the exit until the loop has checkpointed the step in flight."""
    host = subprocess.Popen([sys.executable, "-c", THREAD_HOST], cwd=REPO, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        assert host.stdout.readline() == "handler kept True\n"  # a thread cannot take SIGTERM over
        assert host.stdout.readline() == "ready\n"
        host.send_signal(signal.SIGTERM)
        out, err = host.communicate(timeout=120)
    finally:
        if host.poll() is None:
            host.kill()
    assert host.returncode == 1, err
    assert re.fullmatch(r"checkpoint after step \d+\n", out), (out, err)
    assert "the process is exiting (SIGTERM?) while training" in err



def test_torchrun_two_processes_on_gloo(synth_data, tmp_path):
    out = tmp_path / "ddp"
    env = dict(os.environ, OMP_NUM_THREADS="1")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = str(probe.getsockname()[1])
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
         "--master_port", port, "-m", "psdet", "train", "-c", "ps_gat_tiny", "--data", str(synth_data),
         "--out", str(out), *[f"-o={o}" for o in FAST], "-o", "train.epochs=1", "-o", "train.sync_bn=true"],
        capture_output=True, text=True, timeout=300, cwd=REPO, env=env,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    log_text = (out / "train.log").read_text()
    assert "rank 0 of 2" in log_text and "batch size 4 per worker, 8 in total" in log_text
    assert "SyncBatchNorm needs CUDA" in log_text
    (only,) = ckpt.list_checkpoints(out / "checkpoints")
    state, _ = ckpt.load_checkpoint(only)
    # 48 images / 2 ranks / 4 per batch = 6 steps per epoch on each rank.
    assert state["step"] == 6
