"""Worker scaling: trials per minute with 1 and with 2 Ray workers, real lm-eval, the demo zoo.

Runs the real search (`evomerge.search.search`, the demo config: CMA-ES, population 8) once
with `workers.count: 1` and once with 2, on one local Ray cluster of 2 CPUs. Each pool's actors
are started and have run one trial before the clock starts, so the numbers are the search's
steady pace. Idle share = 1 - (seconds workers spent running trials) / (wall seconds x workers): the
time a worker waited for the driver or for the slowest trial of a generation. Goal: 2 workers
at least 1.7x the trials per minute of 1.

Then dispatch: random search (which allows steady dispatch) with 2 workers, once with
`search.dispatch: generation` (every generation waits for its slowest trial and for the
driver's tell and checkpoint) and once with `steady` (a worker the generation leaves idle
starts on the next one), alternated; the idle shares side by side.
"""

from __future__ import annotations

import time
from pathlib import Path

import harness

GOAL = 1.7


def timed_search(config, run_dir: Path) -> tuple[float, int, float]:
    """(wall seconds, trials, idle share) of one search with started workers."""
    from evomerge.genome import reference_recipes
    from evomerge.run_dir import RunDir
    from evomerge.search import genome_layout, search
    from evomerge.trial import Trial
    from evomerge.workers import WorkerPool

    layout = genome_layout(config)
    pool = WorkerPool(config)
    # One trial per actor first (sources loaded, lm-eval's first-call caches filled), untimed.
    warm = [Trial(-1 - i, 0, reference_recipes(layout.num_experts, layout.num_layers)[0])
            for i in range(config.workers.count)]
    list(pool.run(warm))
    start = time.perf_counter()
    search(config, run_dir, pool=pool)
    wall = time.perf_counter() - start
    records = RunDir.open(run_dir).records()
    busy = sum(r["seconds"].get("total", 0.0) for r in records)
    return wall, len(records), 1 - busy / (wall * config.workers.count)


def measure(zoo, work: Path, name: str, quick: bool, search: dict, workers: dict) -> tuple[float, float, int, float]:
    """(trials per minute, idle share, trials, wall seconds) of one search run."""
    config = harness.demo_config(zoo, work / f"{name}.yaml", limit=8 if quick else None, search=search,
                                 workers=workers)
    wall, trials, idle = timed_search(config, work / f"{name}-{time.strftime('%H%M%S')}")
    print(f"{name}: {trials} trials in {wall:.1f} s = {60 * trials / wall:.1f} trials/min, workers idle {idle:.0%}",
          flush=True)
    return 60 * trials / wall, idle, trials, wall


def main() -> None:
    parse = harness.parser(__doc__.splitlines()[0])
    harness.add_zoo_options(parse)
    parse.add_argument("--generations", type=int, default=None)
    args = parse.parse_args()
    host = harness.machine()
    harness.header("worker scaling", host)

    import ray

    from evomerge.config import WorkersConfig
    from evomerge.workers import start_ray

    work, zoo = harness.work_and_zoo(args)
    generations = args.generations or (1 if args.quick else 4)
    search = {"generations": generations, **({"population": 2} if args.quick else {})}
    start_ray(WorkersConfig(count=2, cpus_per_worker=1))
    pace, steady = {}, {}
    try:
        for count in (1, 2, 1, 2) if not args.quick else (1, 2):  # alternated: both see the same machine
            pace.setdefault(count, []).append(measure(zoo, work, f"scaling-{count}", args.quick, search,
                                                      {"count": count, "cpus_per_worker": 1}))
        for dispatch in ("generation", "steady") * (1 if args.quick else 2):
            runs = steady.setdefault(dispatch, [])
            runs.append(measure(zoo, work, f"dispatch-{dispatch}", args.quick,
                                {**search, "strategy": "random", "dispatch": dispatch, "generations": generations + 2},
                                {"count": 2, "cpus_per_worker": 1}))
    finally:
        ray.shutdown()

    best = {count: max(runs) for count, runs in pace.items()}  # the least disturbed run of each
    ratio = best[2][0] / best[1][0]
    print(f"2 workers / 1 worker: {ratio:.2f}x (goal >= {GOAL}x): {harness.verdict(ratio, GOAL)}")
    fast = {dispatch: max(runs) for dispatch, runs in steady.items()}
    gain = fast["steady"][0] / fast["generation"][0]
    print(f"random search, 2 workers: idle {fast['generation'][1]:.0%} per generation, {fast['steady'][1]:.0%} "
          f"steady; steady / generation trials per minute {gain:.2f}x")
    rows = [[str(count), f"{t:.1f}", f"{rate:.1f}", f"{idle:.0%}", str(n)]
            for count, runs in sorted(pace.items()) for rate, idle, n, t in runs]
    dispatch_rows = [[dispatch, f"{t:.1f}", f"{rate:.1f}", f"{idle:.0%}", str(n)]
                     for dispatch, runs in steady.items() for rate, idle, n, t in runs]
    body = (f"The demo search (`search_spaces/demo.yaml`, CMA-ES population "
            f"{search.get('population', 8)}, {generations} generation(s) including the 5 references, "
            f"eval.limit {'8' if args.quick else '100'}) on {'the quick' if args.quick else 'the demo'} zoo, "
            f"one local Ray cluster of 2 CPUs, workers started and warmed by one trial before the clock; "
            f"runs alternate 1 and 2 "
            f"workers and the faster run of each counts.\n\n"
            + harness.table(rows, ["workers", "wall s", "trials/min", "idle", "trials"])
            + f"\n\n**2 workers / 1 worker: {ratio:.2f}x** (goal >= {GOAL}x): {harness.verdict(ratio, GOAL)}. "
              f"Idle = share of worker time not spent running a trial (waiting for the driver or for "
              f"a generation's slowest trial).\n\n"
              f"Dispatch across generation boundaries: random search, the same settings with "
              f"{generations + 2} generations, 2 workers, `search.dispatch` alternated.\n\n"
            + harness.table(dispatch_rows, ["dispatch", "wall s", "trials/min", "idle", "trials"])
            + f"\n\n**Idle {fast['generation'][1]:.0%} waiting per generation, {fast['steady'][1]:.0%} steady**; "
              f"steady / generation trials per minute {gain:.2f}x.")
    harness.write_section(harness.results_path(args), "Worker scaling", host, body)


if __name__ == "__main__":
    main()
