"""The command line's contract: every command has --help, a usage error is one line on stderr with
exit code 2, a user error one line with 2, an internal failure one line with 1, Ctrl-C 130."""

from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from evomerge import cli
from evomerge.cli import TRACEBACK_ONLY, run
from evomerge.errors import ConfigError

COMMANDS = ("search", "resume", "report", "export", "serve", "calibrate", "merge", "zoo", "demo")
ENV = {**os.environ, "PYTHONPATH": os.pathsep.join([str(Path(__file__).resolve().parents[1]),
                                                    os.environ.get("PYTHONPATH", "")])}


def evomerge(*args: str, cwd: Path | None = None, entry_point: bool = False) -> subprocess.CompletedProcess:
    """The CLI in a fresh process: `python -m evomerge.cli`, or the installed `evomerge` script."""
    script = Path(sys.executable).with_name("evomerge")
    command = [str(script)] if entry_point else [sys.executable, "-m", "evomerge.cli"]
    return subprocess.run([*command, *args], cwd=cwd, capture_output=True, text=True, timeout=60)


def test_help_lists_every_command() -> None:
    done = evomerge("--help", entry_point=True)
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith("usage: evomerge ")
    listed = re.findall(r"^ {4}(\w+) ", done.stdout, flags=re.MULTILINE)  # "    search       start a search ..."
    assert tuple(listed) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help(command) -> None:
    done = evomerge(command, "--help")
    assert done.returncode == 0 and done.stderr == ""
    assert done.stdout.startswith(f"usage: evomerge {command} ")
    assert "-h, --help" in done.stdout


def test_resume_help_lists_what_set_may_change() -> None:
    from evomerge.run_dir import RESUMABLE_CHANGES

    done = evomerge("resume", "--help")
    text = " ".join(done.stdout.split())
    assert "extend a finished one" in evomerge("--help").stdout
    for field in RESUMABLE_CHANGES:  # the budget fields update_config lets through
        assert (field + "*" if field.endswith(".") else field) in text, (field, text)
    assert "--force" in text and "search.generations=N" in text


@pytest.mark.parametrize("args, prefix, facts", [
    (["export", "runs/x"], "export", ["--out"]),
    (["merge"], "merge", ["config", "--out"]),
    ([], "", ["COMMAND"]),
    (["serch", "c.yaml"], "", ["COMMAND", "'serch'", *COMMANDS]),
    (["report", "runs/x", "--bogus"], "", ["--bogus"]),
    (["--bogus", "report", "runs/x"], "", ["--bogus"]),
    (["export", "runs/x", "--out", "out", "--trial", "best"], "export", ["--trial", "int", "'best'"]),
    (["merge", "m.yaml", "--out", "out", "--device", "tpu"], "merge", ["--device", "'tpu'", "cpu", "cuda", "auto"]),
], ids=["missing-option", "missing-arguments", "no-command", "unknown-command", "unknown-option",
        "unknown-global-option", "bad-int", "bad-choice"])
def test_usage_errors_are_one_line_with_exit_code_2(args, prefix, facts, tmp_path) -> None:
    """One line, `evomerge: [COMMAND: ]` first, naming the argument, the wrong value and what is
    allowed (argparse's own wording is not pinned)."""
    done = evomerge(*args, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stdout == ""
    assert done.stderr.endswith("\n") and len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith(f"evomerge: {prefix}: " if prefix else "evomerge: "), done.stderr
    for fact in facts:
        assert re.search(rf"(?<![\w-]){re.escape(fact)}(?![\w-])", done.stderr), (fact, done.stderr)
    assert list(tmp_path.iterdir()) == []  # nothing ran


def _args(verbose: bool = False) -> argparse.Namespace:
    return argparse.Namespace(verbose=verbose)


def _fail(exc: BaseException):
    def handler(args: argparse.Namespace) -> int:
        raise exc
    return handler


def test_an_internal_failure_is_one_line_with_exit_code_1(capsys, caplog) -> None:
    assert run(_fail(RuntimeError("shapes [2, 3] and\n[4] do not broadcast")), _args()) == 1
    out, err = capsys.readouterr()
    assert out == ""
    assert err == ("evomerge: internal error: RuntimeError: shapes [2, 3] and [4] do not broadcast "
                   "(rerun with -v for the traceback)\n")
    (record,) = caplog.records  # the traceback is logged (for run.log), marked to stay off stderr
    assert record.exc_info[0] is RuntimeError and getattr(record, TRACEBACK_ONLY)

    assert run(_fail(KeyError()), _args()) == 1  # no message: the type alone
    assert capsys.readouterr().err == "evomerge: internal error: KeyError (rerun with -v for the traceback)\n"


FAILING_DRIVER = """
import argparse, logging, sys
from evomerge.cli import run, setup_logging
setup_logging(sys.argv[1] == "-v")
handler = logging.FileHandler(sys.argv[2])  # what log_to_run_dir adds for run.log
logging.getLogger("evomerge").addHandler(handler)
def handler_that_fails(args):
    raise ZeroDivisionError("division by zero")
sys.exit(run(handler_that_fails, argparse.Namespace(verbose=sys.argv[1] == "-v")))
"""


@pytest.mark.parametrize("verbose", [False, True])
def test_an_internal_failure_keeps_its_traceback_in_run_log(tmp_path, verbose) -> None:
    log = tmp_path / "run.log"
    done = subprocess.run([sys.executable, "-c", FAILING_DRIVER, "-v" if verbose else "-", str(log)],
                          capture_output=True, text=True, env=ENV, timeout=120)
    assert done.returncode == 1
    assert "Traceback" in log.read_text() and "ZeroDivisionError: division by zero" in log.read_text()
    if verbose:
        assert "Traceback" in done.stderr
    else:
        assert done.stderr == ("evomerge: internal error: ZeroDivisionError: division by zero "
                               "(rerun with -v for the traceback)\n")


def test_user_errors_and_interrupts_keep_their_exit_codes(capsys) -> None:
    assert run(_fail(ConfigError("search.generations: must be >= 1\n(got 0)")), _args()) == 2
    assert capsys.readouterr().err == "evomerge: error: search.generations: must be >= 1 (got 0)\n"
    assert run(_fail(KeyboardInterrupt()), _args()) == 130
    assert capsys.readouterr().err == "evomerge: interrupted; no run directory was written yet\n"
    cli.remember_run(Path("runs/mine"))
    try:
        assert run(_fail(KeyboardInterrupt()), _args()) == 130
    finally:
        cli.RUN_PATH = None
    assert capsys.readouterr().err == ("evomerge: interrupted; the run directory is intact: "
                                       "`evomerge resume runs/mine` continues it\n")
    assert run(lambda args: None, _args()) == 0
    assert run(lambda args: 1, _args()) == 1  # a handler's own code is kept (export --verify)
