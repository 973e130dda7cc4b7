"""Cheaper fitness at equal compute: does a search with `eval.estimate` find better candidates?

The demo search space on a demo zoo, the real search loop (evomerge.search.run_loop, CMA-ES,
population 8) in this process without Ray, in three arms per seed that score about the same number of
documents: full evaluation for `--generations` generations; `eval.subsample` (first 25% of the
documents, the best half again on the full limit) and `eval.estimate` (10% anchors by the default
method, the best quarter again on the full limit) for as many generations as those documents buy.
Reported per run: generations, trials, full-limit evaluations, documents scored (anchors and subsets
counted by their documents), and the best full-limit (measured) quality of an evolved candidate; the
references (the same in every run) are not counted as evolved.

    python benchmarks/estimate_search.py --zoo runs/zoo --seeds 0,1,2
"""

from __future__ import annotations

import math
import time

import harness
import numpy as np

from evomerge.run_dir import RunDir

SECTION = "6d. Cheaper fitness at equal compute (eval.estimate vs eval.subsample vs full)"


class CountingPool:
    """The search's Pool in this process, in order, counting the documents each trial was scored on."""

    def __init__(self, runner, sizes: dict[str, int]):
        self.runner, self.sizes, self.documents = runner, sizes, 0

    def run(self, trials, then=()):
        for trial in trials:
            result = self.runner.run(trial)
            if trial.documents is not None:
                self.documents += sum(len(docs) for _, docs in trial.documents)
            elif trial.limit is not None:
                self.documents += sum(min(n, int(trial.limit)) for n in self.sizes.values())
            else:
                self.documents += sum(self.sizes.values())
            yield trial, result

    def close(self) -> None:
        pass


def main() -> None:
    parse = harness.parser(__doc__.splitlines()[0])
    harness.add_zoo_options(parse)
    parse.add_argument("--seeds", default="0,1,2")
    parse.add_argument("--generations", type=int, default=8, help="generations of the full-evaluation arm")
    parse.add_argument("--arms", default="full,subsample,estimate")
    parse.add_argument("--limit", type=int, default=None, help="eval.limit (default: the demo's 100)")
    parse.add_argument("--section", default=SECTION, help="the RESULTS.md section to write")
    parse.add_argument("--space", choices=("demo", "second"), default="demo",
                       help="the demo zoo, or the second zoo (evomerge.zoo.second) given by --zoo")
    parse.add_argument("--documents", type=int, default=None,
                       help="test documents per demo task, written under --work (default: evals/demo's 200)")
    args = parse.parse_args()
    if args.quick:
        args.seeds, args.generations = "0", 2
    host = harness.machine()
    harness.header("cheaper fitness at equal compute", host)

    from evomerge.config import validate
    from evomerge.search import genome_layout, run_loop
    from evomerge.workers import CandidateRunner

    if args.space == "second":
        if args.zoo is None:
            raise SystemExit("--space second needs --zoo: a second zoo (python -m evomerge.cli zoo --second DIR)")
        work = args.work / "full"
        work.mkdir(parents=True, exist_ok=True)
        zoo = {"base": args.zoo / "base"}
        config = harness.second_config(args.zoo, work / "estimate_search.yaml", limit=args.limit,
                                       documents=args.documents)
    else:
        work, zoo = harness.work_and_zoo(args)
        config = harness.demo_config(zoo, work / "estimate_search.yaml", limit=8 if args.quick else args.limit,
                                     documents=args.documents)
    layout = genome_layout(config)
    runner = CandidateRunner(config, threads=max(1, int(config.workers.cpus_per_worker)))
    limit, population = config.eval.limit, config.search.population
    sizes = {task.name: limit for task in config.eval.tasks}
    full_docs = sum(sizes.values())
    arms = {"full": ({}, 1.0),
            "subsample": ({"subsample": {"fraction": 0.25, "promote": 0.5}}, None),
            "estimate": ({"estimate": {"anchors": 0.1, "promote": 0.25, "refit": True}}, None)}
    rows = []
    for seed in [int(s) for s in args.seeds.split(",")]:
        for arm in args.arms.split(","):
            extra, _ = arms[arm]
            raw = config.to_yaml_dict()
            raw["seed"] = seed
            raw["eval"].update(extra)
            raw["search"].update(population=population, generations=args.generations)
            probe = validate(raw)
            per_candidate = 1.0
            if probe.eval.subsample is not None:
                per_candidate = (probe.eval.subset_limit / limit
                                 + math.ceil(round(probe.eval.subsample.promote * population, 9)) / population)
            elif probe.eval.estimate is not None:
                per_candidate = (math.ceil(round(probe.eval.estimate.anchors * limit, 9)) / limit
                                 + math.ceil(round(probe.eval.estimate.promote * population, 9)) / population)
            generations = max(1, int(args.generations / per_candidate))
            raw["search"]["generations"] = generations
            run_config = validate(raw)
            run = RunDir.create(work / "runs" / f"{arm}{seed}", run_config, layout.describe())
            pool = CountingPool(runner, sizes)
            started = time.perf_counter()
            summary = run_loop(run, run_config, layout, pool)
            best = (summary.get("best_evolved") or {}).get("quality")
            measured = sum(1 for r in run.records() if r.get("state") == "complete" and r.get("label") is None)
            rows.append([str(seed), arm, str(generations), str(summary["trials"]), str(measured), str(pool.documents),
                         f"{pool.documents / full_docs:.0f}", "n/a" if best is None else f"{best:.4f}",
                         f"{time.perf_counter() - started:.0f}"])
            print("  " + " | ".join(rows[-1]), flush=True)
    means = []
    for arm in args.arms.split(","):
        found = [float(r[7]) for r in rows if r[1] == arm and r[7] != "n/a"]
        means.append(f"{arm} {np.mean(found):.4f}" if found else f"{arm} n/a")
    body = (f"The {args.space} search space (`search_spaces/demo.yaml`'s search, eval.limit {limit}, "
            f"{len(sizes)} tasks) on "
            f"the zoo `{zoo['base'].parent.name}`, CMA-ES population {population}, the real loop in one process "
            f"(no Ray). Documents = every document scored (anchors and subsets by their own count), references "
            f"included; full-eval equivalents = documents / {full_docs}. Best = the best full-limit (measured) "
            f"quality of an evolved candidate.\n\n"
            + harness.table(rows, ["seed", "arm", "generations", "trials", "full-limit evaluations (evolved)",
                                   "documents", "full-eval equivalents", "best (measured)", "wall s"])
            + f"\n\nMean best over seeds: {', '.join(means)}.")
    harness.write_section(harness.results_path(args), args.section, host, body)


if __name__ == "__main__":
    main()
