"""Helpers every benchmark shares: interleaved timing, medians, a table, memory, the last line.

A benchmark compares variants measured side by side in one run: `interleaved` runs each
variant once per round, rotating the order every round so that a load change on a shared
machine hits all of them alike, and the table shows medians. The last printed line is
`NAME: key=value ...` (`summary_line`); tests/test_benchmarks.py parses it.

For the Ray benchmarks: a fresh local Ray on loopback (`local_ray`), a deadline on any
blocking fit (`deadline`), wall-clock stamps that Ray workers leave for the driver
(`write_stamp`), and a Tune trial built as orchestrate/trial.py builds one, with the
training loop the benchmark chooses (`ours_trial`, `run_tuner`). Ray and orchestrate are
imported only inside those, so train_step.py runs where Ray is not installed.
"""
from __future__ import annotations

import contextlib
import json
import os
import resource
import signal
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MIB = 1024 * 1024


def timed(function: Callable[[], Any]) -> float:
    """Seconds `function()` takes."""
    start = time.perf_counter()
    function()
    return time.perf_counter() - start


def interleaved(variants: dict[str, Callable[[], Any]], repeats: int, warmup: int = 1,
                cpu_times: dict[str, list[float]] | None = None) -> dict[str, list[float]]:
    """Wall seconds per call of each variant: `warmup` untimed rounds, then `repeats` timed rounds.

    Every round calls each variant once; the order rotates by one each round. With
    `cpu_times`, the process CPU seconds of each call are recorded there too: on a machine
    shared with other work they move less than wall time does.
    """
    names = list(variants)
    for _ in range(warmup):
        for name in names:
            variants[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_index in range(repeats):
        shift = round_index % len(names)
        for name in names[shift:] + names[:shift]:
            cpu_start = time.process_time()
            times[name].append(timed(variants[name]))
            if cpu_times is not None:
                cpu_times.setdefault(name, []).append(time.process_time() - cpu_start)
    return times


def median(values: list[float]) -> float:
    return statistics.median(values)


def spread(values: list[float]) -> float:
    """Half the interquartile range relative to the median, a noise figure for the table (0.05 = +-5%)."""
    if len(values) < 4:
        return float("nan")
    quartiles = statistics.quantiles(values, n=4)
    return (quartiles[2] - quartiles[0]) / 2 / statistics.median(values)


# ----------------------------------------------------------------------------- output


@dataclass(frozen=True)
class Column:
    """A table column: `title`, and `spec`, the format spec of its values ("8.2f", ">10", "<12")."""

    title: str
    spec: str = ">10"

    @property
    def width(self) -> int:
        digits = "".join(c for c in self.spec.split(".")[0] if c.isdigit())
        return max(len(self.title), int(digits) if digits else 0)


class Table:
    """A fixed-width table printed row by row, as results come in (like benchmarks/postprocess.py)."""

    def __init__(self, *columns: Column) -> None:
        self.columns = columns

    def print_header(self) -> None:
        header = " ".join(f"{c.title:>{c.width}}" for c in self.columns)
        print(header)
        print("-" * len(header), flush=True)

    def print_row(self, *values: Any) -> None:
        cells = []
        for column, value in zip(self.columns, values, strict=True):
            if isinstance(value, str):
                align = "<" if column.spec.startswith("<") else ">"
                cells.append(f"{value:{align}{column.width}}")
            else:
                cells.append(f"{value:{column.spec}}".rjust(column.width))
        print(" ".join(cells), flush=True)


def summary_line(name: str, **values: Any) -> str:
    """`name: key=value ...`; floats with two decimals unless given as preformatted strings."""
    parts = [f"{key}={value:.2f}" if isinstance(value, float) else f"{key}={value}" for key, value in values.items()]
    return f"{name}: " + " ".join(parts)


# ----------------------------------------------------------------------------- memory


def peak_rss_mib() -> float:
    """This process's peak resident set size, MiB.

    Linux: VmHWM of /proc/self/status. Not ru_maxrss: Linux keeps ru_maxrss across
    fork + exec, so a child started by a 2 GiB parent reports at least 2 GiB.
    """
    try:
        with open("/proc/self/status") as handle:
            for line in handle:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024  # kB
    except OSError:
        pass
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak / MIB if sys.platform == "darwin" else peak / 1024  # bytes on macOS, KiB on Linux


def reset_peak_rss() -> bool:
    """Restart the peak (VmHWM) at the current RSS, so the next `peak_rss_mib` covers what
    follows only. False where the kernel does not offer it (then the peak keeps counting)."""
    try:
        with open("/proc/self/clear_refs", "w") as handle:
            handle.write("5")
        return True
    except OSError:
        return False


def rss_mib() -> float:
    """This process's current resident set size, MiB."""
    try:
        with open("/proc/self/statm") as handle:
            resident_pages = int(handle.read().split()[1])
        return resident_pages * os.sysconf("SC_PAGE_SIZE") / MIB
    except OSError:
        import psutil  # ray depends on it; only needed off Linux

        return psutil.Process().memory_info().rss / MIB


# ----------------------------------------------------------------------------- child processes


def run_child(script: Path, args: list[str], timeout: float, env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python SCRIPT ARGS` and return the JSON object its last stdout line holds.

    Used where a measurement needs a fresh process (peak RSS). A failure raises with the
    child's stderr tail.
    """
    command = [sys.executable, str(script), *args]
    completed = subprocess.run(command, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                               env={**os.environ, **(env or {})})
    lines = completed.stdout.strip().splitlines()
    if completed.returncode != 0 or not lines:
        raise RuntimeError(f"{' '.join(command)} exited {completed.returncode}:\n{completed.stderr[-3000:]}")
    return json.loads(lines[-1])


def child_result(result: dict[str, Any]) -> None:
    """What a child process prints last, for `run_child`."""
    print(json.dumps(result), flush=True)


# ----------------------------------------------------------------------------- Ray


@contextlib.contextmanager
def local_ray(num_cpus: float) -> Iterator[str]:
    """A fresh local Ray with `num_cpus` CPUs, on loopback only, started as orchestrate/tune.py
    starts one (dashboard on 127.0.0.1, its address handed to every worker so Train V2's
    State API calls find this instance among others on the machine). Yields the dashboard URL;
    always shut down."""
    os.environ["RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"] = "0"
    os.environ.setdefault("TUNE_GLOBAL_CHECKPOINT_S", "5")  # as tune.py
    import ray

    from orchestrate.ray_env import free_port

    dashboard = f"http://127.0.0.1:{free_port()}"
    python_path = os.pathsep.join([str(ROOT), str(ROOT / "benchmarks"), os.environ.get("PYTHONPATH", "")])
    ray.init(address="local", num_cpus=num_cpus, include_dashboard=True, dashboard_host="127.0.0.1",
             dashboard_port=int(dashboard.rsplit(":", 1)[1]), log_to_driver=False,
             object_store_memory=256 * MIB,  # a shared machine: not the default 30% of RAM
             runtime_env={"env_vars": {"RAY_API_SERVER_ADDRESS": dashboard, "PYTHONPATH": python_path.rstrip(os.pathsep)}})
    try:
        yield dashboard
    finally:
        ray.shutdown()


@contextlib.contextmanager
def deadline(seconds: int, what: str) -> Iterator[None]:
    """Raise TimeoutError in the main thread if the block runs past `seconds` (a hung fit()).
    Nests: an enclosing deadline keeps counting and fires no later than it would have."""

    def expired(signum, frame):
        raise TimeoutError(f"{what} did not finish within {seconds} s")

    started = time.monotonic()
    outer_left = signal.alarm(0)
    previous = signal.signal(signal.SIGALRM, expired)
    signal.alarm(min(seconds, outer_left) if outer_left else seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)
        if outer_left:
            signal.alarm(max(1, round(outer_left - (time.monotonic() - started))))


def write_stamp(directory: str | Path, name: str, **values: Any) -> None:
    """Record wall-clock stamps (time.time()) from a Ray worker for the driver: one JSON file each."""
    path = Path(directory) / f"{name}.json"
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(values))
    tmp.rename(path)


def read_stamp(directory: str | Path, name: str) -> dict[str, Any]:
    return json.loads((Path(directory) / f"{name}.json").read_text())


def trial_setup(space: Path, experiment_uri: str, data_root: str = ""):
    """orchestrate.trial.TrialSetup for `space` on CPU, as orchestrate/tune.py makes it."""
    from orchestrate.space import load_space
    from orchestrate.trial import TrialSetup

    return TrialSetup(spec=load_space(space), experiment_uri=experiment_uri, data_root=data_root, synthetic=None,
                      use_gpu=False)


def ours_trial(params: dict, setup, loop: Callable[[dict], None], loop_config: dict) -> None:
    """orchestrate.trial.run_trial with the training loop chosen by the benchmark: the trial's
    TorchTrainer from `orchestrate.trial.build_trainer`. `{trial_id}` in loop_config["label"]
    is filled in; loop_config["out_dir"] and ["resume_from_engine"] are set as for a trial."""
    from ray import tune

    from orchestrate import trial

    trial_id = tune.get_context().get_trial_id()
    config = dict(loop_config, label=loop_config["label"].format(trial_id=trial_id),
                  **trial.engine_dirs(setup, trial_id))
    trial.build_trainer(setup, trial_id, config, train_loop=loop).fit()


def run_tuner(function, storage_path: str, name: str, driver_cpus: float, timeout_s: int,
              num_samples: int = 1, callbacks: list | None = None, reuse_actors: bool = False) -> None:
    """A Tuner as orchestrate/tune.py builds one, without searcher or scheduler (nothing is
    searched); Tune's console output goes to stderr, the benchmark's table stays on stdout.
    `reuse_actors` is Tune's (tune.py leaves it at its default, False)."""
    from ray import tune

    from orchestrate import trial

    tuner = tune.Tuner(
        tune.with_resources(function, {"CPU": driver_cpus}),
        tune_config=tune.TuneConfig(num_samples=num_samples, max_concurrent_trials=1, reuse_actors=reuse_actors,
                                    trial_dirname_creator=trial.trial_dirname),
        run_config=tune.RunConfig(name=name, storage_path=storage_path, verbose=0, callbacks=callbacks or []),
    )
    with deadline(timeout_s, f"Tuner '{name}'"), contextlib.redirect_stdout(sys.stderr):
        results = tuner.fit()
    if results.errors:
        raise RuntimeError(f"Tuner '{name}': a trial failed: {results.errors[0]}")
