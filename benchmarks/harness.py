"""What every benchmark shares: the machine it ran on, its command line, tiny models, RESULTS.md.

Each script measures ratios side by side in one run (the machines are noisy), prints them with
the machine and the command that repeats them, and rewrites its own section of
`benchmarks/RESULTS.md` (between `<!-- begin NAME -->` and `<!-- end NAME -->`).
"""

from __future__ import annotations

import argparse
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import yaml

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "RESULTS.md"
RESULTS_HEADER = """# Benchmark results

Each section is written by its script (`python benchmarks/NAME.py`); rerun the command shown to
reproduce it. Ratios are measured side by side in one run, so they hold on a noisy machine better
than absolute times do.
"""


def parser(description: str) -> argparse.ArgumentParser:
    """An argument parser with the options every benchmark has."""
    parse = argparse.ArgumentParser(description=description)
    parse.add_argument("--quick", action="store_true", help="tiny sizes, runs in seconds (what the tests run)")
    parse.add_argument("--results", type=Path, default=None,
                       help=f"RESULTS.md to update (default: {RESULTS.relative_to(REPO)} for a full run, "
                            "none with --quick)")
    return parse


def add_zoo_options(parse: argparse.ArgumentParser) -> None:
    """--zoo and --work, for the benchmarks that run the demo zoo."""
    parse.add_argument("--zoo", type=_absolute, default=None,
                       help="a built demo zoo (default: built once under --work)")
    parse.add_argument("--work", type=_absolute, default=Path(tempfile.gettempdir()) / "evomerge-bench")


def _absolute(path: str) -> Path:
    """A path option, absolute: the configs written under --work would resolve it against their folder."""
    return Path(path).resolve()


def work_and_zoo(args: argparse.Namespace) -> tuple[Path, dict[str, Path]]:
    """The benchmark's work folder (quick or full, created) and the demo zoo (--zoo, or built there once)."""
    work = args.work / ("quick" if args.quick else "full")
    work.mkdir(parents=True, exist_ok=True)
    return work, ensure_zoo(args.zoo or work / "zoo", args.quick)


def results_path(args: argparse.Namespace) -> Path | None:
    return args.results if args.results is not None else (None if args.quick else RESULTS)


def command_line() -> str:
    """The command that repeats this run, from the repository root."""
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return " ".join(["python", shlex.quote(str(shown)), *map(shlex.quote, sys.argv[1:])])


@dataclass(frozen=True)
class Machine:
    cpu: str
    cores: int
    torch: str
    python: str
    load_before: float  # 1-minute load average when the benchmark started

    def describe(self) -> str:
        return (f"{self.cpu}, {self.cores} cores, torch {self.torch}, Python {self.python}, "
                f"load average {self.load_before:.2f} at start")

    def loaded(self, load_now: float) -> bool:
        """True when other work competed for the cores during the run."""
        return max(self.load_before, load_now) > 0.5 * self.cores


def machine() -> Machine:
    import torch

    cpu = platform.processor() or platform.machine()
    cpuinfo = Path("/proc/cpuinfo")
    if cpuinfo.exists():
        names = re.findall(r"^model name\s*:\s*(.+)$", cpuinfo.read_text(), flags=re.M)
        cpu = names[0].strip() if names else cpu
    return Machine(cpu=cpu, cores=os.cpu_count() or 1, torch=torch.__version__,
                   python=platform.python_version(), load_before=load_average())


def load_average() -> float:
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else 0.0


def header(name: str, host: Machine) -> None:
    print(f"== {name}")
    print(f"machine: {host.describe()}")
    print(f"command: {command_line()}")


def verdict(value: float, goal: float, higher_is_better: bool = True) -> str:
    ok = value >= goal if higher_is_better else value <= goal
    return "pass" if ok else "FAIL"


def write_section(path: Path | None, name: str, host: Machine, body: str) -> None:
    """Replace (or append) the section `name` of RESULTS.md with the body and the run's context."""
    if path is None:
        return
    load_now = load_average()
    note = (f"The machine was loaded during this run (load average {host.load_before:.2f} at start, "
            f"{load_now:.2f} at end, on {host.cores} cores): absolute times are noisy, ratios less so.\n"
            if host.loaded(load_now) else "")
    section = (f"<!-- begin {name} -->\n## {name}\n\n"
               f"Measured {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())} on {host.describe()}.\n"
               f"{note}\n```bash\n{command_line()}\n```\n\n{body.strip()}\n<!-- end {name} -->\n")
    text = path.read_text(encoding="utf-8") if path.exists() else RESULTS_HEADER
    pattern = re.compile(rf"<!-- begin {re.escape(name)} -->.*?<!-- end {re.escape(name)} -->\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else text.rstrip("\n") + "\n\n" + section
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text, encoding="utf-8")
    print(f"wrote section {name!r} of {path}")


def table(rows: list[list[str]], head: list[str]) -> str:
    """A markdown table."""
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(lines)


def offline_environment() -> dict[str, str]:
    """This process's environment with everything that would reach the network switched off."""
    env = dict(os.environ)
    env.update({"HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                "RAY_AUTH_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false"})
    env["PYTHONPATH"] = os.pathsep.join([str(REPO), *filter(None, [env.get("PYTHONPATH")])])
    return env


def build_llama(folder: Path, *, hidden: int, layers: int, intermediate: int, vocab: int,
                seed: int, like: Path | None = None, noise: float = 0.01) -> Path:
    """A random Llama-style model saved as safetensors; with `like`, that model plus small noise
    (an "expert" of it, the way fine-tunes relate to their base)."""
    import torch
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                                      num_hidden_layers=layers, num_attention_heads=max(1, hidden // 64),
                                      num_key_value_heads=max(1, hidden // 128), tie_word_embeddings=False)
    generator = torch.Generator().manual_seed(seed)
    if like is None:
        model = transformers.LlamaForCausalLM(config)
        with torch.no_grad():
            for p in model.parameters():
                p.copy_(torch.randn(p.shape, generator=generator) * 0.02)
    else:
        model = transformers.LlamaForCausalLM.from_pretrained(like, dtype=torch.float32)
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn(p.shape, generator=generator) * noise)
    model.save_pretrained(folder, safe_serialization=True)
    return folder


def folder_bytes(folder: Path) -> int:
    return sum(f.stat().st_size for f in folder.glob("*.safetensors"))


def ensure_zoo(folder: Path, quick: bool) -> dict[str, Path]:
    """The demo zoo under `folder` (built once; the full one takes a few minutes)."""
    from evomerge.zoo import SKILLS, build_zoo

    names = ["base", *SKILLS]
    if (folder / "zoo.json").exists() and all((folder / name / "config.json").exists() for name in names):
        return {name: folder / name for name in names}
    print(f"building the {'quick' if quick else 'demo'} zoo in {folder} ...", flush=True)
    return {name: Path(path) for name, path in build_zoo(folder, quick=quick).items()}


def _written(raw: dict, path: Path, limit: int | None, sections: dict):
    """`raw` with a smaller eval.limit if given and its sections updated, written to `path` and loaded."""
    from evomerge.config import load_config

    if limit is not None:
        raw["eval"]["limit"] = limit
    for section, values in sections.items():
        raw[section].update(values)
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def second_config(folder: Path, path: Path, limit: int | None = None, documents: int | None = None, **sections):
    """demo_config's search (search_spaces/demo.yaml: per-layer task arithmetic, CMA-ES) on the second zoo
    built in `folder` (evomerge.zoo.second: Qwen2 models, tasks second_max/succ/even/mix), its tasks
    from the zoo's tasks/ or, with `documents`, written beside `path` with that many test documents."""
    from evomerge.zoo.second import MULTIPLE_CHOICE, SKILLS, TASKS, write_second_tasks

    raw = yaml.safe_load((REPO / "search_spaces" / "demo.yaml").read_text())
    raw["name"] = "second"
    raw["models"].update(base=str(folder / "base"), experts=[str(folder / s) for s in SKILLS], device="cpu")
    tasks = folder / "tasks"
    if documents is not None:
        tasks = path.parent / f"second-tasks-{documents}"
        write_second_tasks(tasks, n=documents)
    raw["eval"]["include_path"] = str(tasks)
    raw["eval"]["tasks"] = [{"name": task, "metric": "acc" if task in MULTIPLE_CHOICE else "exact_match"}
                            for task in TASKS]
    return _written(raw, path, limit, sections)


def demo_config(zoo: dict[str, Path], path: Path, limit: int | None = None, documents: int | None = None,
                **sections):
    """search_spaces/demo.yaml with this zoo, on the CPU (a smaller eval.limit if given, sections updated),
    written to `path` and loaded. `documents`: the demo tasks written beside `path` with that many test
    documents per task (evals/demo has 200), for measurements at a larger eval.limit."""
    from evomerge.zoo import write_demo_tasks

    raw = yaml.safe_load((REPO / "search_spaces" / "demo.yaml").read_text())
    raw["models"].update(base=str(zoo["base"]), experts=[str(p) for name, p in zoo.items() if name != "base"],
                         device="cpu")
    raw["eval"]["include_path"] = str(REPO / "evals" / "demo")
    if documents is not None:
        tasks = path.parent / f"demo-tasks-{documents}"
        write_demo_tasks(tasks, n=documents)
        raw["eval"]["include_path"] = str(tasks)
    return _written(raw, path, limit, sections)
