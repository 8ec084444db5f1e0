"""Reading the text files a user hands us (configs, search spaces, labels, checkpoint
metadata), so that every way such a file can be broken ends in one `UserError` line that
names it: missing, a directory, unreadable, too large, not UTF-8, nested too deeply,
not valid YAML / JSON, or carrying a YAML tag that would build a Python object.

YAML is always read with the safe loader; a `!!python/...` tag is refused, not run.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml

from psdet.errors import UserError

MAX_TEXT_BYTES = 8 << 20  # 8 MiB: a config or a space is a few KB, a label a few KB, meta.json 1 KB


def read_text(path: Path, what: str, error: type[UserError] = UserError, max_bytes: int = MAX_TEXT_BYTES) -> str:
    """The UTF-8 text of `path`; `error` naming the file and `what` it should be otherwise."""
    path = Path(path)
    try:
        if path.is_dir():
            raise error(f"{path}: cannot read {what}: it is a directory")
        size = path.stat().st_size
        if size > max_bytes:
            raise error(f"{path}: {size:,} bytes is too large for a {what} (the limit is {max_bytes >> 20} MiB)")
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: cannot read {what}: no such file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read {what}: {exc.strerror or exc}") from None
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        raise error(f"{path}: not UTF-8 text (byte {exc.start}); save the {what} as UTF-8") from None


def read_yaml(path: Path, what: str, error: type[UserError] = UserError) -> Any:
    """The parsed YAML of `path` (safe loader); `error`, one line naming the file, otherwise."""
    text = read_text(path, what, error)
    try:
        return yaml.safe_load(text)
    except yaml.constructor.ConstructorError as exc:
        mark = f" (line {exc.problem_mark.line + 1})" if exc.problem_mark else ""
        tag = str(exc.problem).split("tag")[-1].strip(" '") if exc.problem else "?"
        raise error(f"{path}{mark}: the YAML tag {tag} is refused: a {what} is plain YAML "
                    "(read with the safe loader, which builds no Python objects)") from None
    except yaml.YAMLError as exc:
        raise error(f"{path}: invalid YAML: {' '.join(str(exc).split())}") from None
    except RecursionError:
        raise error(f"{path}: nested too deeply to be a {what}") from None


def read_json(path: Path, what: str, error: type[UserError] = UserError) -> Any:
    """The parsed JSON of `path`; `error`, one line naming the file, otherwise."""
    text = read_text(path, what, error)
    try:
        return json.loads(text)
    except json.JSONDecodeError as exc:
        raise error(f"{path}: unreadable JSON {what}: {exc.msg} at line {exc.lineno} column {exc.colno}") from None
    except RecursionError:
        raise error(f"{path}: nested too deeply to be a {what}") from None
