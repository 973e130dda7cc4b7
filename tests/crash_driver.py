"""A search driver that SIGKILLs itself at a chosen point (run as a child process by test_crash.py).

    python crash_driver.py RUN_DIR start|resume [POINT N] [--subsample | --steady]

POINT is one of mid_generation (after N results), journal_append (half-way through the N-th
journal line), checkpoint_write (half-way through the checkpoint of generation N),
between_generations (right after the checkpoint of generation N). `--subsample` runs with
eval.subsample (the N-th journal line may then be a subsample.jsonl line); `--steady` runs TPE with
steady dispatch, the pool finishing trials of the next generation while one runs. The loop, the
run directory and the strategies are the real ones; only the pool is the deterministic fake one.
"""

from __future__ import annotations

import json
import os
import pickle
import signal
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

from evomerge.config import validate  # noqa: E402
from evomerge.genome import GenomeLayout  # noqa: E402
from evomerge.run_dir import CHECKPOINT, JOURNAL, Checkpoint, RunDir  # noqa: E402
from evomerge.search import run_loop  # noqa: E402

from fakes import FakePool, make_config  # noqa: E402

BOUNDS = {"weight": (0.0, 1.5), "density": (0.1, 1.0), "t": (0.0, 1.0)}


def die() -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class CrashingRunDir(RunDir):
    def __init__(self, path: Path, point: str, count: int):
        super().__init__(path)
        self.point, self.count, self.appends = point, count, 0

    def append(self, record: dict, file: str = JOURNAL) -> None:
        self.appends += 1
        if self.point == "journal_append" and self.appends == self.count:
            line = json.dumps(record, sort_keys=True)
            with open(self.path / file, "a") as handle:
                handle.write(line[: len(line) // 2])
                handle.flush()
                os.fsync(handle.fileno())
            die()
        super().append(record, file)

    def save_checkpoint(self, checkpoint: Checkpoint) -> None:
        if self.point == "checkpoint_write" and checkpoint.generation == self.count:
            data = pickle.dumps(checkpoint)
            with open(self.path / f".{CHECKPOINT}.tmp", "wb") as handle:
                handle.write(data[: len(data) // 2])
                handle.flush()
            die()
        super().save_checkpoint(checkpoint)
        if self.point == "between_generations" and checkpoint.generation == self.count:
            die()


class CrashingPool(FakePool):
    def __init__(self, count: int, log: Path, backfill: bool):
        super().__init__(backfill=backfill)
        self.count, self.log = count, log

    def run(self, trials, then=()):
        for trial, result in super().run(trials, then):
            with open(self.log, "a") as handle:
                handle.write(f"{trial.id}\n")
            yield trial, result
            if len(self.evaluated) == self.count:
                die()


def main() -> None:
    args = [arg for arg in sys.argv[1:] if not arg.startswith("--")]
    run_dir, mode = Path(args[0]), args[1]
    point, count = (args[2], int(args[3])) if len(args) > 2 else ("none", -1)
    steady = "--steady" in sys.argv  # the next generation backfilled while one runs
    config = make_config("tpe" if steady else "cma", generations=4)
    if "--subsample" in sys.argv:
        raw = config.to_yaml_dict()
        raw["eval"].update(limit=100, subsample={"fraction": 0.25, "promote": 0.5})
        config = validate(raw)
    layout = GenomeLayout.build("task_arithmetic", "layer", 3, 2, BOUNDS)
    if mode == "start":
        RunDir.create(run_dir, config, layout.describe())
    run = CrashingRunDir(run_dir, point, count)
    pool = CrashingPool(count if point == "mid_generation" else -1, run_dir / "evaluated.log", backfill=steady)
    run_loop(run, config, layout, pool)


if __name__ == "__main__":
    main()
