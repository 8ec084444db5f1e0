"""Real components for tests/test_cluster.py, and the promise that a test stops every
process it started, even when it fails.

- `cluster_env`: the environment every process gets: loopback only, token auth with a
  token of the test's own, a private cache, fake S3 credentials, the venv first on PATH.
- `LocalCluster`: `cluster/local.sh up / add / kill / down` with a private state dir;
  `stop()` runs `down` and then kills whatever is left of the recorded process trees.
- `S3Server`: moto in server mode on 127.0.0.1, one bucket.
- `Driver`: a command (tune.py, mostly) in a session of its own, its output read line by
  line on a thread; `kill()` SIGKILLs its whole process tree.
- `wait_until`: poll a condition instead of sleeping a fixed time;
  `tune_trial_statuses`: the trial statuses in Tune's saved experiment state.

Everything here is loopback: Ray nodes and dashboards on 127.0.0.1, moto on 127.0.0.1,
`AWS_EC2_METADATA_DISABLED` so no S3 client ever asks 169.254.169.254.
"""
from __future__ import annotations

import json
import os
import queue
import re
import secrets
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path

import psutil

from orchestrate.ray_env import free_port

REPO = Path(__file__).resolve().parents[1]
LOCAL_SH = REPO / "cluster" / "local.sh"
VENV_BIN = Path(sys.executable).parent
TUNE = [sys.executable, str(REPO / "orchestrate" / "tune.py")]


# ----------------------------------------------------------------------------- processes


def descendants(root: int) -> list[int]:
    """`root` and every live process below it (psutil's parent links); [] if it is gone."""
    try:
        process = psutil.Process(root)
        return [root, *(child.pid for child in process.children(recursive=True))]
    except psutil.NoSuchProcess:
        return []


def running(pid: int) -> bool:
    """The process exists and is not a zombie (a killed process whose parent has not
    reaped it, as happens under a PID 1 that does not reap)."""
    try:
        return psutil.Process(pid).status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def kill_tree(root: int) -> None:
    """SIGKILL `root` and all its descendants, noted before the first one dies."""
    for pid in descendants(root):
        try:
            os.kill(pid, signal.SIGKILL)
        except (ProcessLookupError, PermissionError):
            pass


def processes_mentioning(text: str) -> list[int]:
    """PIDs whose command line contains `text` (a test's private directory)."""
    found = []
    for process in psutil.process_iter(["cmdline", "status"]):
        cmdline = " ".join(process.info["cmdline"] or ())
        if process.pid != os.getpid() and text in cmdline and process.info["status"] != psutil.STATUS_ZOMBIE:
            found.append(process.pid)
    return found


def listening_sockets(pids: list[int]) -> list[tuple[int, str, int]]:
    """(pid, address, port) of every TCP socket in the LISTEN state that one of `pids` holds."""
    wanted = set(pids)
    return sorted((conn.pid, conn.laddr.ip, conn.laddr.port) for conn in psutil.net_connections(kind="tcp")
                  if conn.status == psutil.CONN_LISTEN and conn.pid in wanted)


def off_loopback(sockets: list[tuple[int, str, int]]) -> list[tuple[int, str, int]]:
    """The sockets bound outside 127.0.0.0/8 and ::1 (0.0.0.0 and :: included: they take every
    address); an IPv4-mapped address counts as its IPv4 one."""
    import ipaddress

    def loopback(ip: str) -> bool:
        address = ipaddress.ip_address(ip.split("%")[0])
        mapped = getattr(address, "ipv4_mapped", None)  # ::ffff:127.0.0.1 is 127.0.0.1
        return (mapped or address).is_loopback

    return [s for s in sockets if not loopback(s[1])]


def _die_with_parent() -> None:
    """preexec_fn: SIGKILL this child when the test process dies, however it dies."""
    import ctypes

    ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG


class Driver:
    """A command in a session of its own, whose output lines are read on a thread. It is
    SIGKILLed if the test process dies without stopping it."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path = REPO) -> None:
        self.args = [str(arg) for arg in args]
        self.proc = subprocess.Popen(self.args, cwd=cwd, env=env, stdout=subprocess.PIPE,
                                     stderr=subprocess.STDOUT, text=True, start_new_session=True,
                                     preexec_fn=_die_with_parent)
        self.lines: queue.Queue[str] = queue.Queue()
        self.seen: list[str] = []
        self._reader = threading.Thread(target=self._pump, daemon=True)
        self._reader.start()

    def _pump(self) -> None:
        for line in self.proc.stdout:
            self.lines.put(line.rstrip("\n"))

    def _drain(self) -> None:
        while True:
            try:
                self.seen.append(self.lines.get_nowait())
            except queue.Empty:
                return

    def tail(self, count: int = 60) -> str:
        self._drain()
        return "\n".join(self.seen[-count:])

    def wait_for(self, pattern: str, timeout: float) -> re.Match:
        """The first new output line matching `pattern`; AssertionError after `timeout` s or on exit."""
        regex = re.compile(pattern)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=1)
            except queue.Empty:
                if self.proc.poll() is not None and self.lines.empty():
                    break
                continue
            self.seen.append(line)
            match = regex.search(line)
            if match:
                return match
        raise AssertionError(f"{self.args[1:3]}: no line matching {pattern!r} within {timeout:.0f} s "
                             f"(exit code {self.proc.poll()}); last output:\n{self.tail()}")

    def wait(self, timeout: float) -> int:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"{self.args[1:3]}: still running after {timeout:.0f} s; "
                                 f"last output:\n{self.tail()}") from None
        self._reader.join(timeout=10)  # it ends at the output's end, every line queued
        self._drain()
        return code

    def kill(self) -> None:
        """SIGKILL the command and everything it started (a local Ray included)."""
        kill_tree(self.proc.pid)
        try:
            self.proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            pass


def wait_until(condition: Callable[[], bool], timeout: float, what: str, poll_s: float = 0.5) -> None:
    """Return as soon as `condition()` holds; AssertionError naming `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() > deadline:
            raise AssertionError(f"not within {timeout:.0f} s: {what}")
        time.sleep(poll_s)


def tune_trial_statuses(experiment_state: bytes) -> dict[str, str]:
    """Trial id -> status (PENDING, RUNNING, TERMINATED, ERROR) in one of Tune's
    `experiment_state-*.json` files: what a driver resumed from it restores."""
    trials = (json.loads(trial_state) for trial_state, _ in json.loads(experiment_state)["trial_data"])
    return {trial["trial_id"]: trial["status"] for trial in trials}


# ----------------------------------------------------------------------------- environment


def cluster_env(workdir: Path) -> dict[str, str]:
    """The environment of every cluster process and driver in a test module."""
    token = workdir / "auth_token"
    scratch = workdir / "tmp"
    scratch.mkdir(exist_ok=True)
    if not token.exists():
        token.write_text(secrets.token_hex(32))
    env = {key: value for key, value in os.environ.items()
           if not key.startswith(("RAY_ADDRESS", "RAY_API_SERVER_ADDRESS", "RAY_AUTH", "AWS_"))}
    env.update({
        "PATH": f"{VENV_BIN}{os.pathsep}{env.get('PATH', '')}",  # `python` and `ray` are the venv's
        "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
        "RAY_AUTH_MODE": "token",
        "RAY_AUTH_TOKEN_PATH": str(token),
        "RAY_USAGE_STATS_ENABLED": "0",
        "XDG_CACHE_HOME": str(workdir / "cache"),  # the synthetic dataset, made once per module
        "TMPDIR": str(scratch),  # drivers' and workers' scratch files (e.g. a remote sweep's journal)
        "PYTHONUNBUFFERED": "1",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_EC2_METADATA_DISABLED": "true",
    })
    return env


def short_tmpdir(prefix: str) -> Path:
    """A directory under /tmp with a short path: Ray puts unix sockets below a node's
    temp dir, and a socket path may not exceed 107 bytes."""
    return Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))


# ----------------------------------------------------------------------------- Ray cluster


class LocalCluster:
    """A cluster made by cluster/local.sh; use as a context manager or call stop().

    Its nodes run in sessions of their own, so they would outlive a test process that is
    killed outright; a watchdog (a shell loop in its own session) runs `local.sh down`
    as soon as the test process is gone, and stop() ends the watchdog."""

    def __init__(self, workers: int, env: dict[str, str], head_cpus: int = 1, worker_cpus: int = 1,
                 private_dir: Path | None = None) -> None:
        self.state_dir = short_tmpdir("pc-")
        self.env = {**env, "PSDET_CLUSTER_DIR": str(self.state_dir), "HEAD_CPUS": str(head_cpus),
                    "WORKER_CPUS": str(worker_cpus), "OBJECT_STORE_MB": "150",
                    "RAY_PORT": str(free_port()), "DASHBOARD_PORT": str(free_port())}
        if private_dir is not None:
            self.env["WORKER_PRIVATE_DIR"] = str(private_dir)
        self.token = Path(env["RAY_AUTH_TOKEN_PATH"]).read_text().strip()
        self.workers = workers
        self.leftovers: list[int] = []
        self.watchdog: subprocess.Popen | None = None
        self.address = ""
        self.dashboard = ""

    def __enter__(self) -> "LocalCluster":
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _local_sh(self, *args: str, timeout: float = 240) -> str:
        result = subprocess.run(["bash", str(LOCAL_SH), *args], env=self.env, capture_output=True, text=True,
                                timeout=timeout)
        if result.returncode != 0:
            raise AssertionError(f"local.sh {' '.join(args)} failed ({result.returncode}):\n"
                                 f"{result.stdout}\n{result.stderr}\n{self._logs()}")
        return result.stdout

    def _logs(self) -> str:
        parts = []
        for log in sorted(self.state_dir.glob("*.log")):
            parts.append(f"--- {log.name}\n" + "\n".join(log.read_text(errors="replace").splitlines()[-15:]))
        return "\n".join(parts)

    def start(self) -> None:
        watch = f'while kill -0 {os.getpid()} 2>/dev/null; do sleep 1; done; exec bash "{LOCAL_SH}" down'
        self.watchdog = subprocess.Popen(["bash", "-c", watch], env=self.env, start_new_session=True,
                                         stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.banner = self._local_sh("up", str(self.workers))
        exports = dict(re.findall(r"^export (\w+)=(.*)$", (self.state_dir / "env").read_text(), re.M))
        self.address = exports["RAY_ADDRESS"]
        self.dashboard = exports["RAY_API_SERVER_ADDRESS"]

    def add(self, count: int = 1) -> str:
        return self._local_sh("add", str(count))

    def kill(self, node_name: str) -> str:
        return self._local_sh("kill", node_name, timeout=60)

    def recorded_pids(self) -> list[int]:
        """The PIDs local.sh recorded for this cluster's nodes (each its process group)."""
        pids_file = self.state_dir / "pids"
        if not pids_file.exists():
            return []
        return [int(line.split()[1]) for line in pids_file.read_text().splitlines() if line.strip()]

    def stop(self) -> None:
        """`local.sh down`, then SIGKILL whatever of this cluster it left running; what it
        left is kept in `self.leftovers` (a test may check that `down` alone was enough)."""
        trees = [pid for root in self.recorded_pids() for pid in descendants(root)]
        try:
            subprocess.run(["bash", str(LOCAL_SH), "down"], env=self.env, capture_output=True, timeout=90)
        except subprocess.TimeoutExpired:
            pass
        self.leftovers = sorted({pid for pid in trees + processes_mentioning(f"{self.state_dir}/") if running(pid)})
        for pid in self.leftovers:
            try:
                os.kill(pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        shutil.rmtree(self.state_dir, ignore_errors=True)
        if self.watchdog is not None:
            self.watchdog.kill()
            self.watchdog.wait()
            self.watchdog = None

    # -- the dashboard's HTTP API, with the token

    def http(self, path: str, token: str | None = "default", method: str = "GET") -> tuple[int, bytes]:
        headers = {}
        if token == "default":
            token = self.token
        if token is not None:
            headers["Authorization"] = f"Bearer {token}"
        request = urllib.request.Request(self.dashboard + path, headers=headers, method=method)
        try:
            with urllib.request.urlopen(request, timeout=30) as response:
                return response.status, response.read()
        except urllib.error.HTTPError as error:
            return error.code, error.read()

    def api(self, path: str):
        status, body = self.http(path)
        assert status == 200, f"GET {path}: HTTP {status}: {body[:300]!r}"
        return json.loads(body)

    def state(self, resource: str) -> list[dict]:
        """The State API's list of `resource` (nodes, actors, ...)."""
        return self.api(f"/api/v0/{resource}?limit=10000&detail=true")["data"]["result"]["result"]

    def wait_job(self, submission_id: str, timeout: float) -> dict:
        """The job's info once it is SUCCEEDED, FAILED or STOPPED."""
        deadline = time.monotonic() + timeout
        info: dict = {}
        while time.monotonic() < deadline:
            info = self.api(f"/api/jobs/{submission_id}")
            if info["status"] in ("SUCCEEDED", "FAILED", "STOPPED"):
                return info
            time.sleep(2)
        raise AssertionError(f"job {submission_id} still {info.get('status')} after {timeout:.0f} s:\n"
                             + self.job_logs(submission_id))

    def job_logs(self, submission_id: str, lines: int = 60) -> str:
        status, body = self.http(f"/api/jobs/{submission_id}/logs")
        if status != 200:
            return f"(no logs: HTTP {status})"
        return "\n".join(json.loads(body)["logs"].splitlines()[-lines:])


# ----------------------------------------------------------------------------- S3


class S3Server:
    """moto's S3 in server mode on 127.0.0.1, with one bucket; stop() in a finalizer."""

    def __init__(self, bucket: str = "sweeps") -> None:
        import logging

        from moto.server import ThreadedMotoServer

        logging.getLogger("werkzeug").setLevel(logging.ERROR)  # one line per request otherwise
        self.bucket = bucket
        self.port = free_port()
        self.server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)
        self.server.start()
        import boto3

        self.client = boto3.client("s3", endpoint_url=f"http://127.0.0.1:{self.port}", aws_access_key_id="testing",
                                   aws_secret_access_key="testing", region_name="us-east-1")
        self.client.create_bucket(Bucket=bucket)

    def stop(self) -> None:
        self.server.stop()

    def uri(self, prefix: str) -> str:
        """An s3:// URI pyarrow (and so Ray) resolves to this server."""
        return f"s3://{self.bucket}/{prefix}?endpoint_override=127.0.0.1:{self.port}&scheme=http"

    def filesystem(self):
        import pyarrow.fs

        return pyarrow.fs.S3FileSystem(access_key="testing", secret_key="testing", region="us-east-1",
                                       endpoint_override=f"127.0.0.1:{self.port}", scheme="http")

    def keys(self, prefix: str) -> list[str]:
        """Object keys under `prefix` (relative to the bucket)."""
        import pyarrow.fs

        fs = self.filesystem()
        infos = fs.get_file_info(pyarrow.fs.FileSelector(f"{self.bucket}/{prefix}", recursive=True,
                                                         allow_not_found=True))
        return sorted(info.path[len(self.bucket) + 1:] for info in infos if info.type == pyarrow.fs.FileType.File)

    def read(self, key: str) -> bytes:
        """The object's bytes in one GET: one whole version even while a driver replaces it
        (pyarrow's HEAD-then-GET read can mix two)."""
        return self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
