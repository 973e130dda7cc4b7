"""The run directory: everything a run writes, readable after a crash at any instant.

    RUN/
      config.yaml       the resolved config (absolute paths), written once at creation
      genome.json       the genome layout: index -> group, expert, gene, bounds
      genome.dfs.json   the genome of a dfs stage that follows a ps stage (written when it starts)
      journal.jsonl     one line per finished trial, appended, flushed and fsynced
      subsample.jsonl   with eval.subsample: each candidate's subset score (evomerge/racing.py), appended likewise
      estimate.jsonl    with eval.estimate: each candidate's anchor results and estimate (evomerge/estimate.py)
      checkpoint.pkl    optimiser + RNG state after the last finished generation (temp file + rename)
      summary.json      best trial, references, per-generation stats (rewritten each generation)
      run.log           the driver's log
      driver.lock       the pid of the driver working on the run (one driver per run directory)

A truncated last journal line (a crash mid-append) is ignored when reading.
"""

from __future__ import annotations

import json
import logging
import os
import pickle
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

from evomerge.config import RunConfig, apply_override, dump_config, read_yaml, validate
from evomerge.errors import ConfigError, ResumeError

logger = logging.getLogger(__name__)

SCHEMA_VERSION = 1
# Config fields a resumed run may change: the budget, not what a trial means.
RESUMABLE_CHANGES = ("search.generations", "dataflow.generations", "workers.", "eval.limit", "eval.batch_size",
                     "tracking.")
CONFIG, GENOME, JOURNAL, CHECKPOINT, SUMMARY, LOG, LOCK = (
    "config.yaml", "genome.json", "journal.jsonl", "checkpoint.pkl", "summary.json", "run.log", "driver.lock")
SUBSAMPLE = "subsample.jsonl"


@dataclass(frozen=True)
class Checkpoint:
    generation: int  # generations finished
    next_trial_id: int
    strategy_state: bytes
    schema: int = SCHEMA_VERSION
    stage: int = 0  # index into config.stages of the stage the strategy state belongs to
    # Steady dispatch: the next generation's genomes, asked before this one was told (the strategy
    # state already holds that ask); None when the next generation is still to be asked.
    ahead: list[list[float]] | None = None


def write_atomic(path: Path, data: bytes) -> None:
    """Write to a temp file, fsync, rename over `path`: readers see the old or the new file, never half."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.unlink(missing_ok=True)  # a leftover of a crash, or a planted link: removed, never followed
    with os.fdopen(os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o644), "wb") as handle:
        handle.write(data)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class RunDir:
    def __init__(self, path: Path):
        self.path = Path(path)
        self.check_links()

    def check_links(self) -> None:
        """Refuse a run directory whose files are links leading outside it: evomerge appends to
        and rewrites them, and must never write into the run directory's parents or elsewhere."""
        root = self.path.resolve()
        for path in sorted(self.path.iterdir()) if self.path.is_dir() else []:  # every file, temp files too
            if path.is_symlink() and not path.resolve().is_relative_to(root):
                raise ConfigError(f"{path}: a link to {path.resolve()}, outside the run directory; "
                                  f"evomerge writes only inside {root}")

    @classmethod
    def create(cls, path: str | Path, config: RunConfig, layout: list[dict[str, Any]]) -> RunDir:
        path = Path(path)
        if path.exists() and not path.is_dir():
            raise ConfigError(f"--run-dir: {path} exists and is not a directory")
        if (path / JOURNAL).exists() or (path / CONFIG).exists():
            raise ConfigError(f"--run-dir: {path} already holds a run; use `evomerge resume {path}` "
                              f"or choose another --run-dir")
        path.mkdir(parents=True, exist_ok=True)
        run = cls(path)
        dump_config(config, path / CONFIG)
        write_atomic(path / GENOME, json.dumps(layout, indent=1).encode())
        (path / JOURNAL).touch()
        return run

    @classmethod
    def open(cls, path: str | Path) -> RunDir:
        path = Path(path)
        if not (path / CONFIG).is_file():
            raise ResumeError(f"{path}: not a run directory (no {CONFIG})")
        return cls(path)

    def config(self) -> RunConfig:
        return validate(read_yaml(self.path / CONFIG), source=str(self.path / CONFIG))

    def update_config(self, overrides: list[str] | tuple[str, ...], force: bool = False) -> RunConfig:
        """Apply `a.b=value` overrides at resume. Budget fields may change; others only with force."""
        old = self.config()
        raw = old.to_yaml_dict()
        for override in overrides:
            apply_override(raw, override)
        new = validate(raw, source="--set")
        changed = changed_fields(old.to_yaml_dict(), new.to_yaml_dict())
        refused = [f for f in changed if not f.startswith(RESUMABLE_CHANGES)]
        if "eval.limit" in changed and not force and self.records():
            raise ResumeError(f"{self.path}: eval.limit {old.eval.limit} -> {new.eval.limit} would score the next "
                              f"trials on other documents than the {len(self.records())} journaled ones, and "
                              f"their qualities would not compare; --force to change it anyway (earlier trials are "
                              f"then left out of the best, the front and the hypervolume, the references scored again)")
        if refused and not force:
            raise ResumeError(f"{self.path}: changing {', '.join(refused)} would invalidate the run's trials; "
                              f"only {', '.join(RESUMABLE_CHANGES)} may change (--force to override)")
        for field in changed:
            logger.warning("resume: %s changes from %r to %r", field, _get(old.to_yaml_dict(), field),
                           _get(new.to_yaml_dict(), field))
        dump_config(new, self.path / CONFIG)
        return new

    # -- one driver at a time --------------------------------------------------------------
    def lock(self) -> None:
        """Claim the run for this process; a lock left by a dead process is taken over with a warning."""
        path = self.path / LOCK
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            owner = _lock_owner(path)
            if owner == os.getpid():
                return  # this process holds it already
            if owner is not None and _alive(owner):
                raise ResumeError(f"{self.path}: another driver (pid {owner}) is working on this run; "
                                  f"stop it first, or delete {path} if that process is not evomerge") from None
            logger.warning("%s: taking over a stale lock left by pid %s", self.path, owner)
            path.unlink(missing_ok=True)
            return self.lock()
        with os.fdopen(fd, "w") as handle:
            handle.write(str(os.getpid()))

    def unlock(self) -> None:
        if _lock_owner(self.path / LOCK) == os.getpid():
            (self.path / LOCK).unlink(missing_ok=True)

    # -- journal -------------------------------------------------------------------------
    def append(self, record: dict[str, Any], file: str = JOURNAL) -> None:
        line = json.dumps(record, sort_keys=True, allow_nan=False) + "\n"
        with open(self.path / file, "a", encoding="utf-8") as handle:
            handle.write(line)
            handle.flush()
            os.fsync(handle.fileno())

    def repair_journal(self, file: str = JOURNAL) -> None:
        """Cut a torn last line (a crash mid-append) so the next append starts on a fresh line."""
        path = self.path / file
        data = path.read_bytes() if path.exists() else b""
        if data and not data.endswith(b"\n"):
            keep = data.rfind(b"\n") + 1
            logger.warning("%s: dropping a torn last line (%d bytes); its trial runs again", path, len(data) - keep)
            with open(path, "r+b") as handle:
                handle.truncate(keep)
                handle.flush()
                os.fsync(handle.fileno())

    def records(self, file: str = JOURNAL) -> list[dict[str, Any]]:
        """One record per trial: the last line written for it (a trial of a generation whose
        candidates all failed is evaluated again at resume, see `search.stalled`), in the order
        trials were first written."""
        return list({record["trial"]: record for record in self.lines(file)}.values())

    def lines(self, file: str = JOURNAL) -> list[dict[str, Any]]:
        """Every complete journal line, in the order written; a torn last line is skipped."""
        path = self.path / file
        if not path.exists():
            return []
        records = []
        lines = path.read_text(encoding="utf-8").split("\n")
        for number, line in enumerate(lines, start=1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number >= len(lines) - 1:  # the last line, cut short by a crash
                    logger.warning("%s: ignoring a truncated last line", path)
                    continue
                raise ResumeError(f"{path}: line {number} is not valid JSON") from None
            if record.get("fidelity") == "subset" and record.get("state") == "complete":  # before PRUNED existed
                record["state"] = "pruned"
            records.append(record)
        return records

    def finished(self, file: str = JOURNAL) -> dict[int, dict[str, Any]]:
        return {record["trial"]: record for record in self.records(file)}

    # -- checkpoint and summary ------------------------------------------------------------
    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        write_atomic(self.path / CHECKPOINT, pickle.dumps(checkpoint))

    def load_checkpoint(self) -> Checkpoint | None:
        path = self.path / CHECKPOINT
        if not path.exists():
            return None
        try:
            checkpoint = pickle.loads(path.read_bytes())
        except Exception as exc:  # noqa: BLE001 - any unreadable file is the same problem for the user
            raise ResumeError(f"{path}: unreadable checkpoint ({type(exc).__name__})") from None
        if getattr(checkpoint, "schema", None) != SCHEMA_VERSION:
            raise ResumeError(f"{path}: checkpoint schema {getattr(checkpoint, 'schema', None)}, "
                              f"this evomerge reads {SCHEMA_VERSION}")
        return checkpoint

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_atomic(self.path / SUMMARY, json.dumps(summary, indent=1, sort_keys=True).encode())


def changed_fields(old: dict[str, Any], new: dict[str, Any], prefix: str = "") -> list[str]:
    """Dotted names of the leaves that differ between two config dicts."""
    fields = []
    for key in sorted(set(old) | set(new)):
        a, b, name = old.get(key), new.get(key), f"{prefix}{key}"
        if isinstance(a, dict) and isinstance(b, dict):
            fields += changed_fields(a, b, name + ".")
        elif a != b:
            fields.append(name)
    return fields


def _get(data: dict[str, Any], dotted: str) -> Any:
    for part in dotted.split("."):
        data = data.get(part) if isinstance(data, dict) else None
    return data


def _lock_owner(path: Path) -> int | None:
    try:
        return int(path.read_text().strip())
    except (OSError, ValueError):
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def canonical(records: Iterable[dict[str, Any]]) -> list[dict[str, Any]]:
    """Journal records without the fields that vary between identical runs (timings, worker, order)."""
    volatile = {"seconds", "worker", "traceback"}
    return sorted(({k: v for k, v in r.items() if k not in volatile} for r in records), key=lambda r: r["trial"])
