"""Overhead per candidate: where one candidate's wall time goes on the demo zoo.

Runs the worker's own code (`CandidateRunner`, the demo search's config) in this process on a
few candidates and splits each one's time into merge (straight into the model), lm-eval setup,
forward passes, serving (batching, tokenisation and the generation loop between forwards),
scoring, and journaling (appending the trial's record to a run journal, fsynced, as the driver
does). The phases come from the journal's `seconds` (evomerge.clock times forward calls with
hooks). Goal: everything but forward passes under 15% of the total.
"""

from __future__ import annotations

import time

import harness
import numpy as np

GOAL = 0.15
PHASES = ("merge", "eval_setup", "forward", "serving", "scoring", "journal")


def candidates(config, count: int, seed: int = 0):
    """`count` random candidates of the demo's genome (trial ids from 0)."""
    from evomerge.search import genome_layout
    from evomerge.trial import Trial

    layout = genome_layout(config)
    rng = np.random.default_rng(seed)
    return layout, [Trial(i, 0, layout.decode(x), tuple(map(float, x)))
                    for i, x in enumerate(rng.uniform(0, 1, size=(count, layout.size)))]


def main() -> None:
    parse = harness.parser(__doc__.splitlines()[0])
    harness.add_zoo_options(parse)
    parse.add_argument("--candidates", type=int, default=None)
    args = parse.parse_args()
    host = harness.machine()
    harness.header("overhead per candidate", host)

    from evomerge.run_dir import RunDir
    from evomerge.trial import record
    from evomerge.workers import CandidateRunner

    work, zoo = harness.work_and_zoo(args)
    config = harness.demo_config(zoo, work / "overhead.yaml", limit=8 if args.quick else None)
    count = args.candidates or (2 if args.quick else 8)
    layout, trials = candidates(config, count + 1)
    run_path = work / f"run-{time.strftime('%Y%m%d-%H%M%S')}"
    run = RunDir.create(run_path, config, layout.describe())
    runner = CandidateRunner(config, threads=max(1, int(config.workers.cpus_per_worker)))
    print(f"zoo {zoo['base'].parent}, eval.limit {config.eval.limit}, batch {config.eval.batch_size}, "
          f"{len(config.eval.tasks)} tasks, {count} candidates after one warm-up", flush=True)

    rows = []
    for trial in trials:
        result = runner.run(trial)
        if not result.ok:
            raise SystemExit(f"trial {trial.id} failed: {result.error}")
        start = time.perf_counter()
        run.append(record(trial, result))
        seconds = {**result.seconds, "journal": time.perf_counter() - start}
        if trial.id > 0:  # the first call warms caches (lm-eval's dataset objects, allocator)
            rows.append(seconds)
        print(f"trial {trial.id}: " + ", ".join(f"{p} {seconds[p]:.3f}" for p in PHASES)
              + f" (worker total {seconds['total']:.3f}) quality {result.quality:.3f}", flush=True)

    mean = {p: float(np.mean([r[p] for r in rows])) for p in PHASES}
    total = sum(mean.values())
    unaccounted = float(np.mean([r["total"] for r in rows])) + mean["journal"] - total
    overhead = (total - mean["forward"]) / total
    shares = {p: mean[p] / total for p in PHASES}
    print("mean per candidate: " + ", ".join(f"{p} {mean[p]:.3f} s ({shares[p]:.0%})" for p in PHASES)
          + f"; unaccounted {unaccounted:.3f} s")
    print(f"overhead (all but forward passes): {overhead:.1%} of {total:.3f} s (goal < {GOAL:.0%}): "
          f"{harness.verdict(overhead, GOAL, higher_is_better=False)}")

    body = (f"The demo config (`search_spaces/demo.yaml`: per-layer task arithmetic over 3 experts, "
            f"3 tasks, eval.limit {config.eval.limit}, batch {config.eval.batch_size}) on "
            f"{'the quick' if args.quick else 'the demo'} zoo, one worker thread, mean of {len(rows)} "
            f"candidates after one warm-up. Forward = time inside the model's forward calls (hooks); "
            f"serving = between the first and the last forward but outside them (batching, "
            f"tokenisation, the generation loop); journal = appending the record, fsynced.\n\n"
            + harness.table([[p, f"{mean[p]:.3f}", f"{shares[p]:.1%}"] for p in PHASES],
                            ["phase", "seconds", "share"])
            + f"\n\n**Everything but forward passes: {overhead:.1%}** of {total:.3f} s per candidate "
              f"(goal < {GOAL:.0%}): {harness.verdict(overhead, GOAL, higher_is_better=False)}.")
    harness.write_section(harness.results_path(args), "Overhead per candidate", host, body)


if __name__ == "__main__":
    main()
