"""The outcome of a real-zoo search: each source, the uniform merge, task arithmetic at 1.0 and the best evolved.

    python -m evomerge.cli search search_spaces/real.yaml --set search.generations=11   # 93 evaluations
    python benchmarks/real_outcome.py runs/real

The sources, the uniform merge and the best evolved trial come from the run's journal (one sample:
the run's documents). Task arithmetic at 1.0 (every expert's weight 1 on every layer) is not in the
search's box as a reference, so it is scored here with the workers' own code (`CandidateRunner`) on
the run's config and documents, and compared with the best evolved trial by the report's paired
test (per-document differences, bootstrap interval).
"""

from __future__ import annotations

import json
import time

import harness

SECTION = "On a real model: search outcome"


def main() -> None:
    parse = harness.parser(__doc__.splitlines()[0])
    parse.add_argument("run", type=harness._absolute, help="the run directory of a real-zoo search")
    args = parse.parse_args()
    host = harness.machine()
    harness.header("search outcome on the real zoo", host)

    from evomerge import samples
    from evomerge.genome import ALL, Recipe
    from evomerge.run_dir import RunDir
    from evomerge.trial import Trial, best
    from evomerge.workers import CandidateRunner

    run = RunDir.open(args.run)
    config = run.config()
    tasks = [task.name for task in config.eval.tasks]
    weights = {task.name: task.weight for task in config.eval.tasks}
    records = samples.ranked(run.records())
    references = sorted((r for r in records if r.get("label")), key=lambda r: r["trial"])
    evolved = best([r for r in records if not r.get("label")])
    assert evolved is not None, f"{args.run}: no evolved trial"

    start = time.perf_counter()
    runner = CandidateRunner(config, threads=1)
    weights_at_one = {ALL: {"weight": [1.0] * len(config.models.experts)}}
    recipe = Recipe("task_arithmetic", "global", runner.model.config.num_hidden_layers, weights_at_one,
                    label="task arithmetic 1.0")
    result = runner.run(Trial(10_000, 0, recipe))
    assert result.ok, result.error
    seconds = time.perf_counter() - start
    arithmetic = {"trial": "-", "label": "task arithmetic at 1.0", "quality": result.quality,
                  "metrics": result.metrics, "stderr": result.stderr, "sample": result.sample,
                  "per_doc": result.per_doc}

    rows = []
    for record in [*references, arithmetic, evolved]:
        label = record.get("label") or f"best evolved (trial {record['trial']})"
        errors = record.get("stderr") or {}
        rows.append([str(label), str(record["trial"]),
                     *(f"{record['metrics'][t]:.2f}" for t in tasks),
                     f"{record['quality']:.4f} ± {errors.get('quality', float('nan')):.4f}"])
    signs = {t: 1.0 for t in tasks}
    tests = [samples.paired_test(evolved, other, weights, signs) for other in
             (max(references, key=lambda r: r["quality"]), arithmetic)]
    lines = [harness.table(rows, ["model", "trial", *tasks, "quality ± s.e."]), ""]
    for test, name in zip(tests, ("the best source", "task arithmetic at 1.0")):
        if test is None:
            lines.append(f"- against {name}: no paired test (other documents)")
            continue
        lines.append(f"- best evolved against {name}: {test['delta']:+.4f} ± {test['stderr']:.4f} (paired s.e.), "
                     f"95% bootstrap interval [{test['interval'][0]:+.4f}, {test['interval'][1]:+.4f}], "
                     f"p = {test['p_value']:.3f}")
    trials = len(run.records())
    lines.append(f"\n{trials} evaluations in the run (references included); config {config.name}, "
                 f"method {config.merge.method} per {config.merge.granularity}, strategy {config.search.strategy}, "
                 f"limit {config.eval.limit} per task; task arithmetic scored here in {seconds:.0f} s "
                 f"(sources loaded, merged, evaluated)")
    body = "\n".join(lines)
    print(body)
    print(json.dumps({"arithmetic": arithmetic["quality"], "evolved": evolved["quality"]}))
    harness.write_section(harness.results_path(args), SECTION, host, body)


if __name__ == "__main__":
    main()
