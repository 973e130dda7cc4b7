"""Command line: search | resume | report | export | merge | zoo | demo, each a thin call into the package.

Exit codes: 0 success, 2 user or usage error (one line on stderr naming what is wrong), 1 internal failure
(one line; -v adds the traceback), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path
from typing import Callable, NoReturn

from evomerge.errors import EvomergeError

logger = logging.getLogger("evomerge")
DEMO_CONFIG = Path("search_spaces/demo.yaml")


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)  # a usage error exits here: one line, code 2
    setup_logging(args.verbose)
    return run(args.func, args)


def run(handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace) -> int:
    """Call a command's handler and map what it raises to an exit code and one line on stderr."""
    try:
        return handler(args) or 0
    except EvomergeError as exc:
        print(f"evomerge: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("evomerge: interrupted; the run directory is intact: `evomerge resume RUN` continues it",
              file=sys.stderr)
        return 130
    except Exception as exc:  # noqa: BLE001 - the last resort: an internal failure
        # The traceback goes to run.log (when a run directory is open); to stderr only with -v.
        logger.error("internal error", exc_info=True, extra={TRACEBACK_ONLY: True})
        text = _one_line(str(exc))
        print(f"evomerge: internal error: {type(exc).__name__}{': ' + text if text else ''} "
              f"(rerun with -v for the traceback)", file=sys.stderr)
        return 1


class Parser(argparse.ArgumentParser):
    """argparse with one-line usage errors (`evomerge: export: the following arguments are required: --out`)."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog.replace(' ', ': ')}: {_one_line(message)}\n")


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="evomerge", description=__doc__.splitlines()[0])
    parser.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND", parser_class=Parser)

    cmd = commands.add_parser("search", help="start a search from a config file")
    cmd.add_argument("config", type=Path, help="YAML config (see search_spaces/)")
    cmd.add_argument("--run-dir", type=Path, help="output folder (default: runs/<name>)")
    cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="override a config field, e.g. --set search.generations=5 (repeatable)")
    cmd.set_defaults(func=cmd_search)

    cmd = commands.add_parser(
        "resume", help="continue a stopped run, or extend a finished one (--set search.generations=N)",
        description="Continue RUN_DIR from its checkpoint and journal: journaled trials are not evaluated "
                    "again (but a generation whose candidates all failed is), trials the stop cut off run "
                    "again, and the run ends as one that never stopped would. A finished run goes on with a "
                    "larger budget (--set search.generations=N, more than it ran); without --set it "
                    "evaluates nothing and prints its summary.")
    cmd.add_argument("run_dir", type=Path, metavar="RUN_DIR", help="the run's folder (search --run-dir)")
    cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE",
                     help="change the budget (repeatable): search.generations, dataflow.generations, workers.*, "
                          "eval.limit, eval.batch_size; any other field only with --force")
    cmd.add_argument("--force", action="store_true",
                     help="allow --set to change other fields too; the journal keeps the trials scored before")
    cmd.set_defaults(func=cmd_resume)

    cmd = commands.add_parser("report", help="summarise a run (best trial, references, progress)")
    cmd.add_argument("run_dir", type=Path)
    cmd.add_argument("--json", action="store_true", help="print one JSON object")
    cmd.add_argument("--no-plots", action="store_true", help="skip pareto.png and progress.png")
    cmd.set_defaults(func=cmd_report)

    cmd = commands.add_parser("export", help="write a trial as an HF model folder + mergekit YAML + recipe")
    cmd.add_argument("run_dir", type=Path)
    cmd.add_argument("--out", type=Path, required=True, help="target folder (must be empty unless --force)")
    cmd.add_argument("--trial", type=int, help="trial id (default: the best trial)")
    cmd.add_argument("--force", action="store_true", help="write into a non-empty folder")
    cmd.add_argument("--verify", action="store_true", help="re-evaluate the exported folder and compare")
    cmd.set_defaults(func=cmd_export)

    cmd = commands.add_parser("merge", help="run a mergekit merge config with evomerge's methods; write an HF folder")
    cmd.add_argument("config", type=Path, help="mergekit YAML (merge_method, base_model, models, parameters, ...)")
    cmd.add_argument("--out", type=Path, required=True, help="target folder (must be empty unless --force)")
    cmd.add_argument("--force", action="store_true", help="write into a non-empty folder")
    cmd.add_argument("--seed", type=int, default=0, help="seed of the random-drop masks (dare_*)")
    cmd.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="where to merge")
    cmd.set_defaults(func=cmd_merge)

    cmd = commands.add_parser("zoo", help="build the tiny demo models (tokenizer, base, experts)")
    cmd.add_argument("out", type=Path, nargs="?", default=Path("runs/zoo"))
    cmd.add_argument("--quick", action="store_true", help="few training steps (for tests)")
    cmd.set_defaults(func=cmd_zoo)

    cmd = commands.add_parser("demo", help="build the demo zoo if missing, then run search_spaces/demo.yaml")
    cmd.add_argument("--config", type=Path, default=DEMO_CONFIG)
    cmd.add_argument("--run-dir", type=Path, default=Path("runs/demo"),
                     help="output folder; an existing demo run is resumed (and just reported if finished)")
    cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cmd.set_defaults(func=cmd_demo)
    return parser


TRACEBACK_ONLY = "evomerge_traceback_only"  # a log record for run.log, shown on stderr only with -v


def _not_traceback_only(record: logging.LogRecord) -> bool:
    return not getattr(record, TRACEBACK_ONLY, False)


def setup_logging(verbose: bool) -> None:
    root = logging.getLogger()
    before = list(root.handlers)
    logging.basicConfig(level=logging.DEBUG if verbose else logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s", datefmt="%H:%M:%S")
    if not verbose:  # the stderr handler made here (none when the host application has its own)
        for handler in root.handlers:
            if handler not in before:
                handler.addFilter(_not_traceback_only)
    for noisy in ("transformers", "lm_eval", "lm-eval", "ray", "datasets", "urllib3", "filelock", "httpx"):
        logging.getLogger(noisy).setLevel(logging.WARNING if verbose else logging.ERROR)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")


def log_to_run_dir(run_dir: Path) -> None:
    from evomerge.run_dir import LOG, RunDir

    RunDir(run_dir)  # refuses run files that link outside the run directory, before any write
    handler = logging.FileHandler(run_dir / LOG, encoding="utf-8")
    handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.getLogger("evomerge").addHandler(handler)


def cmd_search(args: argparse.Namespace) -> int:
    from evomerge.config import load_config
    from evomerge.search import search

    config = load_config(args.config, args.overrides)
    run_dir = args.run_dir or Path("runs") / config.name
    summary = search(config, run_dir, on_created=log_to_run_dir)
    print(_text(summary))
    return 0


def cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.search import resume

    if (args.run_dir / "config.yaml").is_file():
        log_to_run_dir(args.run_dir)
    print(_text(resume(args.run_dir, args.overrides, force=args.force)))
    return 0


def cmd_report(args: argparse.Namespace) -> int:
    from evomerge.report import format_markdown, plot, summarize
    from evomerge.run_dir import RunDir, write_atomic

    run = RunDir.open(args.run_dir)
    records = run.records()
    summary = summarize(records, run.config())
    print(json.dumps(summary, indent=1) if args.json else _text(summary))
    written: list = []
    if not args.no_plots:
        try:
            written = plot(summary, records, run.path)
        except ImportError:
            logger.warning("matplotlib is not installed (pip install 'evomerge[report]'): no plots written")
    write_atomic(run.path / "report.md", format_markdown(summary, [str(p) for p in written]).encode())
    logger.info("wrote %s", ", ".join(str(p) for p in [*written, run.path / "report.md"]))
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from evomerge.export import evaluate_folder, export
    from evomerge.run_dir import RunDir

    record = export(args.run_dir, args.out, trial_id=args.trial, force=args.force)
    print(f"exported trial {record['trial']} (quality {record['quality']:.4f}) to {args.out}")
    if args.verify:
        reproduced = evaluate_folder(RunDir.open(args.run_dir).config(), args.out, limit=record.get("limit"))
        same = reproduced == record["quality"]
        print(f"re-evaluated: quality {reproduced:.4f} ({'equal to' if same else 'DIFFERS from'} the journal"
              f"{'' if same or not _scaled_path(record) else _SCALED_PATH_NOTE})")
        return 0 if same else 1
    return 0


_SCALED_PATH_NOTE = ("; a scaled layer path is exported with its scales folded into the layers' output "
                     "projections, the same function up to the norms' epsilon and rounding: docs/dataflow.md")


def _scaled_path(record: dict) -> bool:
    from evomerge.dataflow import path_of

    dataflow = (record.get("recipe") or {}).get("dataflow")
    return bool(dataflow) and any(step.scale != 1.0 for step in path_of(dataflow))


def cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.merge.mergekit import run_merge

    out = run_merge(args.config, args.out, force=args.force, seed=args.seed, device=args.device)
    print(f"merged {args.config} into {out}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    from evomerge.zoo import build_zoo

    paths = build_zoo(args.out, quick=args.quick)
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from evomerge.config import load_config, read_yaml
    from evomerge.search import resume, search
    from evomerge.zoo import build_zoo

    if not args.config.is_file():
        raise EvomergeError(f"--config: {args.config} not found; run `evomerge demo` from the repository root "
                            f"or pass --config path/to/search_spaces/demo.yaml")
    raw = read_yaml(args.config)
    zoo_dir = (args.config.resolve().parent / str(raw.get("models", {}).get("base", ""))).parent
    if not (zoo_dir / "zoo.json").is_file():
        logger.info("building the demo zoo in %s (about two minutes)", zoo_dir)
        build_zoo(zoo_dir)
    if (args.run_dir / "config.yaml").is_file():
        logger.info("%s holds a demo run already: resuming it (a finished run is only reported)", args.run_dir)
        log_to_run_dir(args.run_dir)
        summary = resume(args.run_dir)
    else:
        summary = search(load_config(args.config, args.overrides), args.run_dir, on_created=log_to_run_dir)
    print(_text(summary))
    print(f"\nexport the best trial: evomerge export {args.run_dir} --out {args.run_dir}/export --verify")
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())  # one line, whatever the message carries


def _text(summary: dict) -> str:
    from evomerge.report import format_text

    return format_text(summary)


if __name__ == "__main__":
    sys.exit(main())
