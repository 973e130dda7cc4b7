"""Search efficiency: evaluations cma, random and tpe need to reach 95% of the best quality found.

Runs the real search (`evomerge.search.search`, the demo config: per-layer task arithmetic over
the demo zoo's experts, Ray workers, lm-eval) once per strategy and seed, each with the same
budget (the demo's generations x population, plus the 5 references of generation 0). The target
is 95% of the best quality any of these runs found; a run's count is the number of trials, in
the order the optimiser asked for them (trial ids, references included), up to and including the
first one at or above the target. A run that never reaches it is censored: counted as budget + 1
and shown as "> budget", so a mean over censored runs is a lower bound. Goal: cma's mean at most
half of random's. With `--dispatch steady,generation` each strategy runs once per dispatch mode
(`search.dispatch`) and the rows are the pairs (its own section of RESULTS.md); `--target` fixes
the target instead (e.g. to compare with an earlier table).
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import harness

STRATEGIES = ("cma", "random", "tpe")
GOAL = 0.5  # cma's mean evaluations / random's
TARGET_SHARE = 0.95


def run_search(config, run_dir: Path) -> list[dict]:
    """The journal of one real search, in trial-id order (the order the strategy asked)."""
    from evomerge.run_dir import RunDir
    from evomerge.search import search

    search(config, run_dir)
    return sorted(RunDir.open(run_dir).records(), key=lambda r: r["trial"])


def evaluations_to(records: list[dict], target: float) -> int | None:
    """Trials up to and including the first complete one with quality >= target (None: never)."""
    for count, record in enumerate(records, start=1):
        if record["state"] == "complete" and record["quality"] >= target - 1e-12:
            return count
    return None


def best_quality(records: list[dict]) -> float:
    return max(r["quality"] for r in records if r["state"] == "complete")


def main() -> None:
    parse = harness.parser(__doc__.splitlines()[0])
    harness.add_zoo_options(parse)
    parse.add_argument("--seeds", type=int, default=None, help="seeds 0 .. N-1 (default 3)")
    parse.add_argument("--generations", type=int, default=None, help="default: the demo's 12")
    parse.add_argument("--strategies", default=",".join(STRATEGIES))
    parse.add_argument("--dispatch", default="steady", help="search.dispatch mode(s), comma separated")
    parse.add_argument("--target", type=float, default=None,
                       help=f"the quality to reach (default: {TARGET_SHARE:.0%} of the best any run found)")
    args = parse.parse_args()
    host = harness.machine()
    harness.header("search efficiency", host)

    import ray

    from evomerge.config import WorkersConfig
    from evomerge.workers import start_ray

    work, zoo = harness.work_and_zoo(args)
    seeds = list(range(args.seeds or (1 if args.quick else 3)))
    names = [s.strip() for s in args.strategies.split(",") if s.strip()]
    dispatches = [d.strip() for d in args.dispatch.split(",") if d.strip()]
    # one row per (strategy, dispatch); named by the strategy alone when there is one dispatch mode
    variants = {(f"{name} ({mode})" if len(dispatches) > 1 else name): (name, mode)
                for name in names for mode in dispatches}
    strategies = list(variants)
    search = {"generations": args.generations or (2 if args.quick else 12),
              **({"population": 3} if args.quick else {})}
    limit = 8 if args.quick else None
    stamp = time.strftime("%Y%m%d-%H%M%S")

    journals: dict[tuple[str, int], list[dict]] = {}
    start_ray(WorkersConfig(count=2, cpus_per_worker=1))  # one local cluster for every run
    try:
        for seed in seeds:
            for strategy, (name, mode) in variants.items():
                config = harness.demo_config(zoo, work / f"efficiency-{name}-{mode}-{seed}.yaml", limit=limit,
                                             search={**search, "strategy": name, "dispatch": mode})
                config = config.model_copy(update={"seed": seed})
                started = time.perf_counter()
                records = run_search(config, work / f"efficiency-{stamp}" / f"{name}-{mode}-{seed}")
                journals[strategy, seed] = records
                print(f"{strategy:6s} seed {seed}: {len(records)} trials in {time.perf_counter() - started:.0f} s, "
                      f"best {best_quality(records):.4f}", flush=True)
    finally:
        ray.shutdown()

    budget = max(len(records) for records in journals.values())
    best = max(best_quality(records) for records in journals.values())
    target = TARGET_SHARE * best if args.target is None else args.target
    counts = {key: evaluations_to(records, target) for key, records in journals.items()}
    means = {s: statistics.mean(budget + 1 if counts[s, seed] is None else counts[s, seed] for seed in seeds)
             for s in strategies}
    censored = {s: any(counts[s, seed] is None for seed in seeds) for s in strategies}

    def shown(count: int | None) -> str:
        return f"> {budget}" if count is None else str(count)

    rows = []
    for strategy in strategies:
        per_seed = [shown(counts[strategy, seed]) for seed in seeds]
        bests = [f"{best_quality(journals[strategy, seed]):.4f}" for seed in seeds]
        mean = ("> " if censored[strategy] else "") + f"{means[strategy]:.1f}"
        rows.append([strategy, *per_seed, f"**{mean}**", ", ".join(bests)])
    lines = [f"{s}: mean {('>= ' if censored[s] else '')}{means[s]:.1f} evaluations to {target:.4f}"
             for s in strategies]
    print("\n".join(lines))

    verdict_line = ""
    if "cma" in strategies and "random" in strategies:
        ratio = means["cma"] / means["random"]
        # Censored random runs make random's mean a lower bound, so the ratio is an upper bound.
        bound = "at most " if censored["random"] and not censored["cma"] else ""
        if censored["cma"]:
            ratio_text, verdict = f"{ratio:.2f} (cma censored: not conclusive)", "FAIL"
        else:
            ratio_text, verdict = f"{bound}{ratio:.2f}", harness.verdict(ratio, GOAL, higher_is_better=False)
        print(f"cma / random: {ratio_text} (goal <= {GOAL}): {verdict}")
        verdict_line = f"\n\n**cma / random: {ratio_text}** (goal <= {GOAL}): {verdict}."

    body = (f"The demo search (`search_spaces/demo.yaml`: per-layer task arithmetic, 3 experts, 3 tasks, "
            f"eval.limit {limit or 100}, population {search.get('population', 8)}, {search['generations']} "
            f"generations; {budget} trials per run with the 5 references) on "
            f"{'the quick' if args.quick else 'the demo'} "
            f"zoo, 2 Ray workers, once per strategy{' and dispatch mode' if len(dispatches) > 1 else ''} and "
            f"seed. Target: "
            + (f"{TARGET_SHARE:.0%} of the best quality any run found ({best:.4f}) = {target:.4f}"
               if args.target is None else f"{target:.4f} (given; the best any of these runs found: {best:.4f})")
            + f". Evaluations = trials in the order the strategy asked for "
            f"them, references included, up to the first at the target; \"> {budget}\": never reached "
            f"(counted as {budget + 1}, so that mean is a lower bound).\n\n"
            + harness.table(rows, ["strategy", *[f"seed {seed}" for seed in seeds], "mean evaluations",
                                   "best quality per seed"])
            + verdict_line)
    section = "Search efficiency" + (": dispatch" if len(dispatches) > 1 else "")
    harness.write_section(harness.results_path(args), section, host, body)


if __name__ == "__main__":
    main()
