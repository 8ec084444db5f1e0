"""Every file a user hands us, broken every way we can think of.

For each kind of file (a config, a search space, a `best_config.yaml` fed back to
`psdet train`, a json label, a `.mat` label, an image, a checkpoint's two files, a sweep's `sweep.json`
and its Optuna journal on `--resume`) and each break (random bytes, an empty file, a
truncated file, another text encoding, a directory where the file should be, a file the
user may not read, deeply nested or huge YAML / JSON), the command that reads it ends in
exit code 2 with one line on stderr that names the file, never a traceback, and writes
nothing into `--out` or `--storage`.

Each kind first runs its command on the good file and checks it works, so a break that
"fails" for an unrelated reason would be caught. "Unreadable" drops to uid 65534 in a
forked child when the tests run as root (root reads any file whatever its mode).
"""
from __future__ import annotations

import contextlib
import io
import json
import os
import random
import select
import shutil
import signal
import stat
import tempfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

from orchestrate import tune
from psdet import checkpoint as ckpt
from psdet.cli import main as psdet_main

REPO = Path(__file__).resolve().parents[1]
TINY = ["-o", "data.image_size=128", "-o", "data.batch_size=8", "-o", "train.epochs=1", "-o", "train.progress=false"]
NOBODY = 65534
CHILD_TIMEOUT_S = 60


# ----------------------------------------------------------------------------- breaks


def _random_bytes(path: Path, good: bytes) -> None:
    path.write_bytes(random.Random(0).randbytes(4096))


def _empty(path: Path, good: bytes) -> None:
    path.write_bytes(b"")


def _truncated(path: Path, good: bytes) -> None:
    """Cut near the middle, just before a ':' where there is one, so that a text file ends
    in a key without its value (a cut elsewhere can leave a shorter, valid YAML file)."""
    half = len(good) // 2
    colon = good.rfind(b":", 0, half)
    path.write_bytes(good[: colon if colon > 0 else half])


def _utf16(path: Path, good: bytes) -> None:
    path.write_bytes(good.decode().encode("utf-16"))


def _latin1(path: Path, good: bytes) -> None:
    """The good text with one non-ASCII character, saved as Latin-1 (not UTF-8)."""
    text = good.decode()
    cut = text.index("\n") if "\n" in text else len(text) // 2
    path.write_bytes(text[:cut].encode() + " # caf\u00e9".encode("latin-1") + text[cut:].encode())


def _directory(path: Path, good: bytes) -> None:
    path.mkdir()
    (path / "inside").write_bytes(good)


def _unreadable(path: Path, good: bytes) -> None:
    path.write_bytes(good)
    path.chmod(0)


def _nested_yaml(path: Path, good: bytes) -> None:
    path.write_text("a: " + "[" * 50_000 + "]" * 50_000 + "\n")


def _nested_json(path: Path, good: bytes) -> None:
    path.write_text('{"marks": ' + "[" * 50_000 + "]" * 50_000 + "}")


def _huge_yaml(path: Path, good: bytes) -> None:
    with open(path, "w") as handle:  # 40 MB of one list
        handle.write("numbers:\n")
        handle.write("  - 1234567890123456789\n" * 1_800_000)


def _huge_json(path: Path, good: bytes) -> None:
    with open(path, "w") as handle:
        handle.write('{"marks": [')
        handle.write("[1.0, 2.0, 3.0, 4.0, 0.0],\n" * 1_500_000)
        handle.write("[1.0, 2.0, 3.0, 4.0, 0.0]], \"slots\": []}")


def _not_an_image(path: Path, good: bytes) -> None:
    path.write_bytes(b"P6\n4 4\n255\n" + b"\0" * 7)  # a PPM header with too few pixels


TEXT_BREAKS = {"random bytes": _random_bytes, "empty": _empty, "truncated": _truncated, "utf-16": _utf16,
               "latin-1": _latin1, "directory": _directory, "unreadable": _unreadable}
YAML_BREAKS = {**TEXT_BREAKS, "deeply nested": _nested_yaml, "huge": _huge_yaml}
JSON_BREAKS = {**TEXT_BREAKS, "deeply nested": _nested_json, "huge": _huge_json}
BINARY_BREAKS = {"random bytes": _random_bytes, "empty": _empty, "truncated": _truncated,
                 "directory": _directory, "unreadable": _unreadable}


# ----------------------------------------------------------------------------- running a command


@dataclass
class Outcome:
    code: int
    err: str


def _call(command: Callable[[list[str]], int], argv: list[str]) -> Outcome:
    err = io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        try:
            code = command(argv)
        except SystemExit as exc:  # argparse
            code = exc.code if isinstance(exc.code, int) else 1
        except BaseException as exc:  # noqa: BLE001 - a traceback is what the test looks for
            import traceback

            return Outcome(-1, "Traceback (most recent call last):\n" + "".join(traceback.format_exception(exc)))
    return Outcome(code, err.getvalue())


def _call_as_nobody(command: Callable[[list[str]], int], argv: list[str]) -> Outcome:
    """The command in a forked child that has dropped to uid/gid 65534 (root reads any file)."""
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: never returns into pytest
        try:
            os.close(read_end)
            import torch

            torch.set_num_threads(1)  # the parent's OpenMP pool does not survive fork(): stay serial
            os.setgroups([])
            os.setgid(NOBODY)
            os.setuid(NOBODY)
            outcome = _call(command, argv)
            os.write(write_end, json.dumps([outcome.code, outcome.err]).encode())
        finally:
            os._exit(0)
    os.close(write_end)
    chunks = []
    with os.fdopen(read_end, "rb") as pipe:
        while select.select([pipe], [], [], CHILD_TIMEOUT_S)[0]:
            chunk = os.read(pipe.fileno(), 1 << 16)
            if not chunk:
                break
            chunks.append(chunk)
        else:
            os.kill(pid, signal.SIGKILL)
            os.waitpid(pid, 0)
            pytest.fail(f"the command as uid {NOBODY} did not finish in {CHILD_TIMEOUT_S} s: {argv}")
    os.waitpid(pid, 0)
    code, err = json.loads(b"".join(chunks))
    return Outcome(code, err)


def _run(command: Callable[[list[str]], int], argv: list[str], as_nobody: bool) -> Outcome:
    return _call_as_nobody(command, argv) if as_nobody and os.geteuid() == 0 else _call(command, argv)


def _tree(root: Path) -> dict[str, tuple[int, int]]:
    """Every file under `root` with its size and mtime: what "nothing was written" compares."""
    if not root.exists():
        return {}
    return {str(p.relative_to(root)): (p.stat().st_size, p.stat().st_mtime_ns) for p in root.rglob("*")}


@pytest.fixture(scope="module")
def world_root():
    """Scratch space uid 65534 can enter (pytest's tmp_path lives under a 0700 directory)."""
    path = Path(tempfile.mkdtemp(prefix="psdet-fuzz-"))
    path.chmod(0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


@pytest.fixture
def world_dir(world_root, request):
    path = world_root / request.node.name.replace("[", "-").replace("]", "")
    path.mkdir()
    path.chmod(0o755)
    return path


def _open_up(path: Path) -> None:
    """Let uid 65534 read the good files of a case (but not the broken one, which decides)."""
    for entry in [path, *path.rglob("*")]:
        mode = entry.stat().st_mode
        if mode & 0o777:  # the unreadable break set 0
            entry.chmod(mode | stat.S_IROTH | (stat.S_IXOTH if entry.is_dir() else 0))


def assert_one_line_naming(outcome: Outcome, path: Path, case: str) -> None:
    assert "Traceback" not in outcome.err, (case, outcome.err[-3000:])
    lines = outcome.err.strip().splitlines()
    assert outcome.code == 2, (case, outcome.code, outcome.err[-2000:])
    assert len(lines) == 1, (case, outcome.err[-2000:])
    assert str(path) in lines[0], (case, lines[0])


# ----------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def synth_data(world_root) -> Path:
    root = world_root / "synth"
    assert psdet_main(["synth", "--out", str(root), "--train", "8", "--val", "2", "--seed", "3"]) == 0
    _open_up(root)
    return root


@pytest.fixture(scope="module")
def trained_run(synth_data, world_root) -> Path:
    out = world_root / "run"
    assert psdet_main(["train", "-c", "ps_gat_tiny", "--data", str(synth_data), "--out", str(out), *TINY]) == 0
    _open_up(out)
    return out


# ----------------------------------------------------------------------------- the kinds of file


def test_every_break_of_a_config(world_dir):
    good = (REPO / "psdet" / "configs" / "ps_gat_tiny.yaml").read_bytes()
    (world_dir / "ps_gat_tiny.yaml").write_bytes(good)
    assert _call(psdet_main, ["describe", "-c", str(world_dir / "ps_gat_tiny.yaml")]).code == 0
    for name, brk in YAML_BREAKS.items():
        case = world_dir / name.replace(" ", "_")
        case.mkdir()
        path = case / "my_config.yaml"
        brk(path, good)
        _open_up(case)
        outcome = _run(psdet_main, ["describe", "-c", str(path)], as_nobody=name == "unreadable")
        assert_one_line_naming(outcome, path, name)


def test_every_break_of_best_config_fed_back_to_train(world_dir, synth_data):
    """`psdet train -c runs/<sweep>/best_config.yaml` (a full config dump) writes no run dir."""
    from psdet.config import load_config, to_dict

    cfg = load_config("ps_gat_tiny", [f"data.root={synth_data}", "train.epochs=1"])
    good = yaml.safe_dump(to_dict(cfg), sort_keys=False).encode()
    for name, brk in YAML_BREAKS.items():
        case = world_dir / name.replace(" ", "_")
        case.mkdir()
        path, out = case / "best_config.yaml", case / "out"
        brk(path, good)
        _open_up(case)
        outcome = _run(psdet_main, ["train", "-c", str(path), "--out", str(out)], as_nobody=name == "unreadable")
        assert_one_line_naming(outcome, path, name)
        assert not out.exists(), (name, _tree(out))


def test_every_break_of_a_search_space(world_dir):
    from orchestrate.space import load_space

    good = (REPO / "search_spaces" / "smoke.yaml").read_bytes()
    (world_dir / "good.yaml").write_bytes(good)
    assert load_space(world_dir / "good.yaml").name == "good"  # the good file loads
    for name, brk in YAML_BREAKS.items():
        case = world_dir / name.replace(" ", "_")
        case.mkdir()
        path, storage = case / "space.yaml", case / "runs"
        brk(path, good)
        _open_up(case)
        argv = ["--space", str(path), "--storage", str(storage)]
        outcome = _run(tune.main, argv, as_nobody=name == "unreadable")
        assert_one_line_naming(outcome, path, name)
        assert not storage.exists(), (name, _tree(storage))


def _eval_argv(data: Path, trained_run: Path) -> list[str]:
    return ["eval", "-c", "ps_gat_tiny", "--data", str(data), "--ckpt", str(trained_run), "-o", "data.image_size=128"]


def _first_val_sample(data: Path) -> tuple[Path, Path]:
    """(label, image) of the validation split's first sample: the first the eval reads."""
    from psdet.config import load_config
    from psdet.data.labels import list_samples

    first = list_samples(data, load_config("ps_gat_tiny").data.val_split)[0]
    return Path(first.label_path), Path(first.image_path)


def _break_each_label(world_dir: Path, dataset: Path, trained_run: Path, breaks: dict, suffix: str) -> None:
    """`psdet eval` on a copy of `dataset` per break, its first validation label broken."""
    assert _call(psdet_main, _eval_argv(dataset, trained_run)).code == 0
    for name, brk in breaks.items():
        data = world_dir / name.replace(" ", "_")
        shutil.copytree(dataset, data)
        label, _ = _first_val_sample(data)
        assert label.suffix == suffix, label
        good = label.read_bytes()
        label.unlink()
        brk(label, good)
        _open_up(data)
        outcome = _run(psdet_main, _eval_argv(data, trained_run), as_nobody=name == "unreadable")
        assert_one_line_naming(outcome, label, name)


def test_every_break_of_a_label(world_dir, synth_data, trained_run):
    _break_each_label(world_dir, synth_data, trained_run, JSON_BREAKS, ".json")


@pytest.fixture(scope="module")
def synth_mat_data(world_root) -> Path:
    """The same synthetic set in ps2.0's own layout: `.mat` labels under annotations/."""
    root = world_root / "synth-mat"
    assert psdet_main(["synth", "--out", str(root), "--train", "8", "--val", "2", "--seed", "3",
                       "--format", "mat"]) == 0
    _open_up(root)
    return root


def test_every_break_of_a_mat_label(world_dir, synth_mat_data, trained_run):
    """ps2.0's `.mat` labels (binary, so no text encodings): one line naming the file, exit 2."""
    _break_each_label(world_dir, synth_mat_data, trained_run, BINARY_BREAKS, ".mat")


def test_every_break_of_an_image(world_dir, synth_data, trained_run):
    for name, brk in {**BINARY_BREAKS, "not an image": _not_an_image}.items():
        data = world_dir / name.replace(" ", "_")
        shutil.copytree(synth_data, data)
        _, image = _first_val_sample(data)
        good = image.read_bytes()
        image.unlink()
        brk(image, good)
        _open_up(data)
        outcome = _run(psdet_main, _eval_argv(data, trained_run), as_nobody=name == "unreadable")
        assert_one_line_naming(outcome, image, name)


@pytest.mark.parametrize("which", [ckpt.STATE_FILE, ckpt.META_FILE])
def test_every_break_of_a_checkpoint(world_dir, synth_data, trained_run, which):
    newest = ckpt.list_checkpoints(trained_run / "checkpoints")[-1]
    breaks = BINARY_BREAKS if which == ckpt.STATE_FILE else JSON_BREAKS
    assert _call(psdet_main, _eval_argv(synth_data, newest)).code == 0
    for name, brk in breaks.items():
        case = world_dir / name.replace(" ", "_") / newest.name
        shutil.copytree(newest, case)
        target = case / which
        good = target.read_bytes()
        target.unlink()
        brk(target, good)
        _open_up(case.parent)
        outcome = _run(psdet_main, _eval_argv(synth_data, case), as_nobody=name == "unreadable")
        assert_one_line_naming(outcome, case, name)  # the checkpoint the user gave


@pytest.fixture
def started_sweep(world_dir):
    """An experiment directory as a driver leaves it after two trials (sweep.json, the Optuna
    journal, the ledger), without running Ray: the files `--resume` reads before it connects."""
    import optuna

    from orchestrate import sweep_file

    space = world_dir / "smoke.yaml"
    space.write_bytes((REPO / "search_spaces" / "smoke.yaml").read_bytes())
    experiment = world_dir / "runs" / "smoke"
    experiment.mkdir(parents=True)
    journal = experiment / sweep_file.JOURNAL
    sweep_file.write(str(experiment), name="smoke", space_path=str(space), space_text=space.read_text(),
                     data_root=str(world_dir), synthetic=True, optuna_storage=str(journal))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(study_name="smoke", direction="maximize", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    for value in (0.1, 0.2):
        trial = study.ask({"optim.lr": optuna.distributions.FloatDistribution(1e-4, 1e-2, log=True)})
        study.tell(trial, value)
    (experiment / sweep_file.LEDGER).write_text(json.dumps({"t1": {"status": "completed"}, "t2": {"status": "running"}}))
    sweep_file.check_journal(str(journal), "smoke", 2)  # the good files pass the checks
    assert len(sweep_file.read_ledger(str(experiment))) == 2
    _open_up(world_dir)
    return space, experiment


def _resume_argv(space: Path, experiment: Path) -> list[str]:
    """`tune.py --resume` of the started sweep, at an address with nothing behind it: a check
    that lets a broken file through fails on connecting, not on the file."""
    return ["--space", str(space), "--storage", str(experiment.parent), "--resume", "--address", "127.0.0.1:1"]


RESUME_FILES = {"sweep.json": JSON_BREAKS, "optuna.journal": {**TEXT_BREAKS, "huge": _huge_json},
                "trials.json": JSON_BREAKS}


@pytest.mark.parametrize("which", sorted(RESUME_FILES))
def test_every_break_of_a_sweep_file_on_resume(started_sweep, which):
    """`--resume` over a broken sweep.json, journal or ledger: one line naming it, before Ray
    (the address has nothing behind it), and the experiment directory untouched."""
    space, experiment = started_sweep
    target = experiment / which
    good = target.read_bytes()
    argv = _resume_argv(space, experiment)
    for name, brk in RESUME_FILES[which].items():
        if target.is_dir():
            shutil.rmtree(target)
        else:
            target.unlink()
        brk(target, good)
        _open_up(experiment)
        before = _tree(experiment)
        outcome = _run(tune.main, argv, as_nobody=name == "unreadable")
        assert_one_line_naming(outcome, target, name)
        assert _tree(experiment) == before, name


def test_a_journal_without_the_study_or_its_trials_is_refused(started_sweep):
    import optuna

    from orchestrate import sweep_file

    space, experiment = started_sweep
    journal = experiment / sweep_file.JOURNAL
    argv = _resume_argv(space, experiment)
    ledger = json.loads((experiment / sweep_file.LEDGER).read_text())
    (experiment / sweep_file.LEDGER).write_text(json.dumps({**ledger, "t3": {"status": "running"}}))
    outcome = _call(tune.main, argv)
    assert_one_line_naming(outcome, journal, "fewer trials than the ledger")
    assert "holds 2 trials but the sweep started 3" in outcome.err

    journal.unlink()
    optuna.create_study(study_name="another", storage=optuna.storages.JournalStorage(
        optuna.storages.journal.JournalFileBackend(str(journal))))
    outcome = _call(tune.main, argv)
    assert_one_line_naming(outcome, journal, "another study")
    assert "holds no study 'smoke' (it has: another)" in outcome.err


# ----------------------------------------------------------------------------- code in files


def test_yaml_tags_that_build_objects_are_refused_and_never_run(world_dir):
    marker = world_dir / "payload-ran"
    payload = f'!!python/object/apply:os.system ["touch {marker}"]'
    config = world_dir / "evil_config.yaml"
    config.write_text(f"_base_: ps_gat_tiny.yaml\nname: {payload}\n")
    outcome = _call(psdet_main, ["describe", "-c", str(config)])
    assert_one_line_naming(outcome, config, "config")
    assert "python/object/apply:os.system is refused" in outcome.err and "safe loader" in outcome.err
    space = world_dir / "evil_space.yaml"
    space.write_text((REPO / "search_spaces" / "smoke.yaml").read_text().replace("seed: 0", f"seed: {payload}"))
    outcome = _call(tune.main, ["--space", str(space), "--dry-run"])
    assert_one_line_naming(outcome, space, "space")
    assert "is refused" in outcome.err
    assert not marker.exists()


class _Payload:
    """Unpickling this runs `touch MARKER` (what a crafted checkpoint would do)."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_checkpoint_carrying_a_pickle_payload_is_refused_and_never_runs(world_dir, trained_run, synth_data):
    import hashlib

    import torch

    newest = ckpt.list_checkpoints(trained_run / "checkpoints")[-1]
    evil = world_dir / newest.name
    shutil.copytree(newest, evil)
    marker = world_dir / "payload-ran"
    torch.save({"model": _Payload(marker)}, evil / ckpt.STATE_FILE)  # a full pickle, as torch.save writes it
    meta = json.loads((evil / ckpt.META_FILE).read_text())
    data = (evil / ckpt.STATE_FILE).read_bytes()
    meta.update(state_bytes=len(data), state_sha256=hashlib.sha256(data).hexdigest())  # the checksums pass
    (evil / ckpt.META_FILE).write_text(json.dumps(meta))
    image = next(p for p in (synth_data / "training").rglob("*") if p.is_file())
    for argv in (_eval_argv(synth_data, evil), ["predict", "--ckpt", str(evil), str(image)]):
        outcome = _call(psdet_main, argv)
        assert_one_line_naming(outcome, evil, argv[0])
        assert "is refused unrun" in outcome.err
    assert not marker.exists()

