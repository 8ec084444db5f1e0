"""The environment Ray reads when it is imported, and a free loopback port.

Ray reads `RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER` into a constant when it is first imported,
so `prepare` runs before anything imports Ray, and this module imports nothing of it.
"""
from __future__ import annotations

import os
import socket
from pathlib import Path


def address(cli_address: str | None) -> str | None:
    """The cluster to join: `--address`, else $RAY_ADDRESS, else None (a local Ray)."""
    return cli_address or os.environ.get("RAY_ADDRESS")


def prepare(address: str | None) -> None:
    """Loopback for a local Ray; token auth for a cluster joined with a token at hand; none
    of Tune's own TensorBoard files."""
    # Tune adds its CSV, JSON and TensorBoard loggers unless told not to; orchestrate.tuner
    # passes the first two itself. Tune's per-trial event files would show in TensorBoard beside
    # the engine's run of each trial, which has the per-step scalars and the trial's HParams.
    os.environ.setdefault("TUNE_DISABLE_AUTO_CALLBACK_LOGGERS", "1")
    if not address or is_loopback(address):
        # A local Ray binds its node and dashboard to 127.0.0.1 only.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    if address:
        # Ray turns token auth on by itself only for a cluster it finds; joining an explicit
        # address with a token at hand (~/.ray/auth_token, RAY_AUTH_TOKEN[_PATH]) uses it.
        token_file = Path(os.environ.get("RAY_AUTH_TOKEN_PATH") or Path.home() / ".ray" / "auth_token")
        if "RAY_AUTH_MODE" not in os.environ and (os.environ.get("RAY_AUTH_TOKEN") or _is_file(token_file)):
            os.environ["RAY_AUTH_MODE"] = "token"


def _is_file(path: Path) -> bool:
    try:
        return path.is_file()
    except OSError:  # a home this user cannot read (Python 3.11 raises where 3.12 says False)
        return False


def is_loopback(address: str) -> bool:
    host = address.split("://")[-1].rsplit(":", 1)[0]
    return host.startswith("127.") or host == "localhost"


def free_port() -> int:
    """A TCP port free on 127.0.0.1 just now (for a dashboard, a Ray node, a test server)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]
