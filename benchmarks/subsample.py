"""Benchmark 6, cheaper fitness (`eval.subsample`): does a subset rank candidates like the full limit, and
what does a search gain from it at equal cost?

1. Rank correlation: N random candidates of the demo search space (two populations: uniform in the
   genome box, and CMA-like, normal around x0 = 0.5 with sigma 0.2, what one CMA-ES generation looks
   like) are each scored on the subset (the first fraction x limit documents of every task) and on the
   full limit, interleaved so both see the same machine noise. Reported: Spearman's rank correlation,
   how many of the full top quarter the subset's top half keeps (what promotion needs), and the cost
   ratio subset / full in forward FLOPs (evomerge.flops, per evaluated document x documents) and in
   evaluation wall time, side by side. Goal: correlation >= 0.9 at <= 25% of the cost.
2. Equal-cost search: the real search loop (evomerge.search.run_loop, CMA-ES) in this process without
   Ray, once without subsample for G generations and once with it for as many generations as the same
   number of evaluated documents buys; reported: the best full-limit quality each found, and the FLOPs
   and seconds each spent.

    python benchmarks/subsample.py --zoo /tmp/sub-zoo          # the full demo zoo (`evomerge zoo DIR`)
    python benchmarks/subsample.py --quick                     # CI: a quick zoo, a few candidates
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import platform
import re
import shlex
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parents[1]
SECTION = "6. Cheaper fitness (eval.subsample)"
GOAL_CORRELATION, GOAL_COST = 0.9, 0.25


def main(argv: list[str] | None = None) -> int:
    args = parse(argv)
    for key in ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE", "TRANSFORMERS_OFFLINE"):
        os.environ.setdefault(key, "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TQDM_DISABLE", "1")  # lm-eval's and the loop's progress bars
    host = machine()
    print(f"== benchmark {SECTION}\nmachine: {host}\ncommand: {command_line()}", flush=True)
    work = Path(args.work or tempfile.mkdtemp(prefix="evomerge-subsample-"))
    zoo = Path(args.zoo) if args.zoo else work / "zoo"
    if not (zoo / "zoo.json").exists():
        from evomerge.zoo import build_zoo

        print(f"building the {'quick' if args.quick else 'demo'} zoo in {zoo} ...", flush=True)
        build_zoo(zoo, quick=args.quick)
    config = demo_config(zoo, args.limit, args.batch_size)

    from evomerge.search import genome_layout
    from evomerge.workers import CandidateRunner

    layout = genome_layout(config)
    runner = CandidateRunner(config)
    sizes = [len(task.eval_docs) for task in runner.evaluator.tasks["tasks"].values()]

    correlation = {population: rank_study(runner, layout, sizes, config, population, count, args)
                   for population, count in (("uniform", args.candidates), ("cma-like", args.cma_candidates))
                   if count}
    searches = search_study(runner, layout, sizes, config, work, args) if args.generations else []
    report = {"machine": host, "command": command_line(), "limit": config.eval.limit,
              "fraction": args.fraction, "candidates": args.candidates, "population": args.population,
              "correlation": correlation,
              "search": searches, "load_end": os.getloadavg()[0]}
    text = markdown(report)
    print("\n" + text)
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1))
    if args.results:
        write_section(Path(args.results), text)
    return 0


def parse(argv: list[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--zoo", help="the demo zoo folder (`evomerge zoo DIR`); default: built under --work")
    parser.add_argument("--work", help="scratch folder (runs, a built zoo); default: a new temp folder")
    parser.add_argument("--quick", action="store_true", help="quick zoo, 6 candidates, limit 8, one short search")
    parser.add_argument("--candidates", type=int, default=40, help="random candidates, uniform in the genome box")
    parser.add_argument("--cma-candidates", type=int, default=40,
                        help="random candidates around x0 with sigma0 (one CMA-ES generation); 0: none")
    parser.add_argument("--limit", type=int, default=100, help="eval.limit: documents per task (full)")
    parser.add_argument("--fraction", type=float, default=0.25, help="eval.subsample.fraction")
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--generations", type=int, default=6, help="generations of the search without subsample")
    parser.add_argument("--population", type=int, default=8)
    parser.add_argument("--promote", default="0.25,0.5", help="eval.subsample.promote values to compare")
    parser.add_argument("--seeds", default="0", help="search seeds, comma separated")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random candidates")
    parser.add_argument("--out", help="write the numbers as JSON here")
    parser.add_argument("--results", help="rewrite this section of a RESULTS.md (e.g. benchmarks/RESULTS.md)")
    args = parser.parse_args(argv)
    if args.quick:
        args.candidates, args.cma_candidates, args.limit, args.generations, args.population = 6, 6, 8, 1, 4
        args.seeds = "0"
    if args.candidates < 3 or args.cma_candidates in (1, 2):
        parser.error("--candidates, --cma-candidates: expected at least 3 (a rank correlation needs them)")
    return args


# -- the setup ---------------------------------------------------------------------------------

def demo_config(zoo: Path, limit: int, batch_size: int):
    """search_spaces/demo.yaml over this zoo, on the CPU."""
    import yaml

    from evomerge.config import resolve_paths, validate
    from evomerge.zoo import SKILLS

    raw = yaml.safe_load((REPO / "search_spaces" / "demo.yaml").read_text())
    raw["models"].update(base=str(zoo / "base"), experts=[str(zoo / skill) for skill in SKILLS], device="cpu")
    raw["eval"].update(include_path=str(REPO / "evals" / "demo"), limit=limit, batch_size=batch_size)
    return resolve_paths(validate(raw, source="demo.yaml"), REPO)


def documents(sizes: list[int], limit: int | float | None) -> int:
    """Documents lm-eval evaluates over all tasks at `limit` (its semantics: < 1 is a fraction)."""
    if limit is None:
        return sum(sizes)
    return sum(min(n, math.ceil(n * limit) if limit < 1 else int(limit)) for n in sizes)


@dataclasses.dataclass
class Cost:
    flops: float = 0.0
    seconds: float = 0.0
    documents: int = 0

    def add(self, result, count: int) -> None:
        if result.ok:
            self.flops += result.flops * count
            self.seconds += result.seconds["eval"]
            self.documents += count


class LocalPool:
    """The search's Pool, in this process and in order (no Ray), counting what it evaluates; it
    starts nothing of the next generation early (`then`), as a pool may."""

    def __init__(self, runner, sizes: list[int], full_limit: int):
        self.runner, self.sizes, self.full_limit, self.cost = runner, sizes, full_limit, Cost()

    def run(self, trials, then=()):
        for trial in trials:
            result = self.runner.run(trial)
            self.cost.add(result, documents(self.sizes, trial.limit or self.full_limit))
            yield trial, result

    def close(self) -> None:
        pass


# -- 1. rank correlation -------------------------------------------------------------------------

def rank_study(runner, layout, sizes, config, population: str, count: int, args) -> dict:
    from evomerge.trial import Trial

    rng = np.random.default_rng(args.seed + (0 if population == "uniform" else 1))
    limit = config.eval.limit
    subset_limit = max(1, math.ceil(round(args.fraction * limit, 9)))
    subset, full, cost_subset, cost_full = [], [], Cost(), Cost()
    for i in range(count):
        genome = rng.random(layout.size) if population == "uniform" else np.clip(
            0.5 + 0.2 * rng.standard_normal(layout.size), 0.0, 1.0)
        trial = Trial(i, 0, layout.decode(genome), tuple(map(float, genome)))
        cheap = dataclasses.replace(trial, limit=subset_limit)
        order = [(cheap, subset, cost_subset, subset_limit), (trial, full, cost_full, limit)]
        for candidate, qualities, cost, at in (order if i % 2 == 0 else order[::-1]):  # interleaved
            result = runner.run(candidate)
            if not result.ok:
                raise SystemExit(f"candidate {i} failed: {result.error}")
            qualities.append(result.quality)
            cost.add(result, documents(sizes, at))
        print(f"  {population} {i + 1}/{count}: subset {subset[-1]:.4f} full {full[-1]:.4f}", flush=True)
    top_full = set(np.argsort(-np.asarray(full), kind="stable")[: max(1, len(full) // 4)])
    top_subset = set(np.argsort(-np.asarray(subset), kind="stable")[: max(1, math.ceil(len(subset) / 2))])
    return {"candidates": count, "subset_limit": subset_limit, "spearman": spearman(subset, full),
            "top_quarter_kept": len(top_full & top_subset) / len(top_full),
            "flops_ratio": cost_subset.flops / cost_full.flops,
            "seconds_ratio": cost_subset.seconds / cost_full.seconds,
            "seconds": [cost_subset.seconds, cost_full.seconds],
            "full_range": [min(full), max(full)], "subset": subset, "full": full}


def spearman(a, b) -> float:
    """Spearman's rank correlation (evomerge.racing's, what `evomerge report` shows); NaN where undefined."""
    from evomerge.racing import spearman as rank_correlation

    value = rank_correlation([float(x) for x in a], [float(y) for y in b])
    return math.nan if value is None else value


# -- 2. equal-cost search ------------------------------------------------------------------------

def search_study(runner, layout, sizes, config, work: Path, args) -> list[dict]:
    from evomerge.config import validate
    from evomerge.run_dir import RunDir
    from evomerge.search import run_loop

    limit, population = config.eval.limit, args.population
    full_docs = documents(sizes, limit)
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for promote in [None, *[float(p) for p in args.promote.split(",")]]:
            raw = config.to_yaml_dict()
            raw["seed"] = seed
            raw["search"].update(population=population, generations=args.generations)
            generations = args.generations
            if promote is not None:
                raw["eval"]["subsample"] = {"fraction": args.fraction, "promote": promote}
                probe = validate(raw)
                per_generation = (population * documents(sizes, probe.eval.subset_limit)
                                  + math.ceil(round(promote * population, 9)) * full_docs)
                generations = max(1, int(args.generations * population * full_docs // per_generation))
                raw["search"]["generations"] = generations
            run_config = validate(raw)
            name = f"seed{seed}-" + ("full" if promote is None else f"promote{promote}")
            run = RunDir.create(work / "runs" / name, run_config, layout.describe())
            pool = LocalPool(runner, sizes, limit)
            started = time.perf_counter()
            summary = run_loop(run, run_config, layout, pool)
            rows.append({"seed": seed, "promote": promote, "generations": generations,
                         "trials": summary["trials"],
                         "full_evaluations": summary["trials"] - summary.get("subset_only", 0),
                         "best": summary["best_evolved"]["quality"], "flops": pool.cost.flops,
                         "documents": pool.cost.documents, "eval_seconds": pool.cost.seconds,
                         "wall_seconds": time.perf_counter() - started})
            print(f"  search {name}: {generations} generations, best {rows[-1]['best']:.4f}, "
                  f"{pool.cost.documents} documents, {pool.cost.flops:.3g} FLOPs", flush=True)
    return rows


# -- the report ----------------------------------------------------------------------------------

def markdown(report: dict) -> str:
    lines = [f"Demo zoo, `eval.limit` {report['limit']} documents per task (3 tasks), subset "
             f"`fraction` {report['fraction']}; random candidates (uniform in the genome box, or CMA-like: "
             f"x0 0.5, sigma 0.2), each scored on both (interleaved). "
             f"Goal: Spearman >= {GOAL_CORRELATION} at <= {GOAL_COST:.0%} of the cost.",
             "", "| candidates | N | subset docs/task | Spearman | full top quarter in subset top half | "
             "cost: FLOPs | cost: eval seconds | full-limit quality range | verdict |",
             "|---|---|---|---|---|---|---|---|---|"]
    for population, row in report["correlation"].items():
        ok = row["spearman"] >= GOAL_CORRELATION and row["flops_ratio"] <= GOAL_COST + 0.005
        lines.append(f"| {population} | {row['candidates']} | {row['subset_limit']} | {row['spearman']:.3f} | "
                     f"{row['top_quarter_kept']:.0%} | "
                     f"{row['flops_ratio']:.1%} | {row['seconds_ratio']:.1%} | "
                     f"{row['full_range'][0]:.3f}-{row['full_range'][1]:.3f} | {'pass' if ok else 'FAIL'} |")
    if report["search"]:
        full = [r for r in report["search"] if r["promote"] is None]
        lines += ["", f"Equal-cost search (CMA-ES, the real loop in one process, population {report['population']}, "
                  f"{full[0]['generations']} generations without subsample; "
                  "with subsample as many generations as the same documents buy). Best = best full-limit quality "
                  "of an evolved candidate (the references are the same in every run).", "",
                  "| seed | eval.subsample | generations | trials (full-limit) | best quality | documents | "
                  "FLOPs | eval seconds |", "|---|---|---|---|---|---|---|---|"]
        for r in report["search"]:
            kind = "none" if r["promote"] is None else f"fraction {report['fraction']}, promote {r['promote']}"
            lines.append(f"| {r['seed']} | {kind} | {r['generations']} | {r['trials']} ({r['full_evaluations']}) | "
                         f"{r['best']:.4f} | {r['documents']} | {r['flops']:.3g} | {r['eval_seconds']:.0f} |")
    return "\n".join(lines)


def write_section(path: Path, body: str) -> None:
    """Replace (or append) this benchmark's section of RESULTS.md, between its begin/end markers."""
    measured = time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())
    section = (f"<!-- begin {SECTION} -->\n## {SECTION}\n\nMeasured {measured} on {machine()}.\n\n"
               f"```bash\n{command_line()}\n```\n\n{body.strip()}\n<!-- end {SECTION} -->\n")
    text = path.read_text(encoding="utf-8") if path.exists() else ""
    pattern = re.compile(rf"<!-- begin {re.escape(SECTION)} -->.*?<!-- end {re.escape(SECTION)} -->\n?", re.S)
    text = pattern.sub(lambda _: section, text) if pattern.search(text) else (text.rstrip("\n") + "\n\n" + section
                                                                              if text.strip() else section)
    path.write_text(text, encoding="utf-8")
    print(f"wrote section {SECTION!r} of {path}")


def machine() -> str:
    import torch

    names = re.findall(r"^model name\s*:\s*(.+)$", Path("/proc/cpuinfo").read_text(), flags=re.M) \
        if Path("/proc/cpuinfo").exists() else []
    return (f"{names[0].strip() if names else platform.machine()}, {os.cpu_count()} cores, torch {torch.__version__} "
            f"({torch.get_num_threads()} threads), Python {platform.python_version()}, "
            f"load average {os.getloadavg()[0]:.1f}")


def command_line() -> str:
    script = Path(sys.argv[0]).resolve()
    shown = script.relative_to(REPO) if script.is_relative_to(REPO) else script
    return " ".join(["python", shlex.quote(str(shown)), *map(shlex.quote, sys.argv[1:])])


if __name__ == "__main__":
    sys.exit(main())
