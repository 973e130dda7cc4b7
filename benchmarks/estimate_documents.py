"""Cheaper fitness against documents per task: how well `eval.estimate` ranks a run's own candidates at N.

Within one search run the candidates are near-duplicates: their full-limit qualities differ by about
as much as the full score's own sampling noise at the demo's 100 documents per task, so no rule that
sees 10% of the documents can rank them (benchmarks/RESULTS.md, 6c). Both sides of that bar move with
the number of documents N: the full score's noise falls as 1/sqrt(N) while the candidates' true
differences stay, and a 10% sample holds 0.1 N documents.

This replays full-evaluation runs (`--replay RUN_DIR`, every candidate scored on a large eval.limit
with its per-document results in the journal; benchmarks/estimate_search.py `--arms full --limit L
--documents L` writes one) at several N: each candidate's values cut to every task's first N documents
(what a run at eval.limit N would have measured: lm-eval's limit takes the first documents), then the
replay of benchmarks/estimate.py (`replay_rows`: generation by generation, each estimator fitted on the
references and the candidates it promoted earlier, estimating each candidate from its anchor documents)
at 5% and 10% of N. Reported per N: Spearman, Kendall (over the run and within a generation), MAE
against the quality on those N documents, how often the generation's best was promoted; and the
spread of the candidates' quality beside a random 10% sample's noise.

Estimators (`--methods`): `subsample (first)` (the first documents' mean, what eval.subsample scores),
`gp-irt`, `genome` (fitted on the promoted candidates only), `genome+pruned` (also on the earlier
candidates' anchor results: what `method: genome` with `refit` does in a run), and two that were tried
and not shipped: `genome-diff` (the first documents' mean corrected by the genome model's prediction)
and `strata` (half the anchors where the model is least sure, counted as they are; half the first
other documents, standing for the rest).

    python benchmarks/estimate_search.py --zoo runs/zoo --arms full --seeds 0 --generations 40 \\
        --limit 2000 --documents 2000 --work runs/s2000 --results /tmp/unused.md
    python benchmarks/estimate_documents.py --replay runs/s2000/full/runs/full0 --documents 100,300,1000,2000
"""

from __future__ import annotations

import math

import harness
from estimate import REPLAY_METHODS, load_run, replay_rows

GOAL, GOAL_COST = 0.9, 0.10
SECTION = "6e. Cheaper fitness vs documents per task"


def main() -> None:
    parse = harness.parser(__doc__.splitlines()[0])
    parse.add_argument("--replay", type=harness._absolute, action="append", required=True,
                       help="a run directory searched with full evaluation at a large eval.limit (repeatable)")
    parse.add_argument("--documents", default="100,300,1000",
                       help="documents per task to replay at (those above a run's eval.limit are left out)")
    parse.add_argument("--fractions", default="0.05,0.1", help="anchor shares of N")
    parse.add_argument("--methods", default=",".join(REPLAY_METHODS))
    parse.add_argument("--gp-irt-max", type=int, default=300,
                       help="gp-irt only up to this N (its lambda is chosen by leaving each fitted model out: "
                            "hours at 2000 documents and 80 fitted)")
    parse.add_argument("--promote", type=float, default=0.25, help="the replay's promote share")
    parse.add_argument("--seed", type=int, default=0, help="the noise floor's random draws")
    args = parse.parse_args()
    host = harness.machine()
    harness.header("cheaper fitness vs documents per task", host)
    fractions = [float(f) for f in args.fractions.split(",")]
    methods = args.methods.split(",")
    body, reached = [], {}
    for run in args.replay:
        data = load_run(run)
        raw, generations, genome = data["raw"], data["generations"], data["genome"]
        rows, spreads = [], []
        limit = min(v.shape[1] for v in data["values"].values())
        sizes = [n for n in (int(n) for n in args.documents.split(",")) if n <= limit] or [limit]
        for documents in sizes:  # those the run has (a smaller run: its own eval.limit)
            found, stats = replay_rows(data, args, fractions, documents,
                                       [m for m in methods if m != "gp-irt" or documents <= args.gp_irt_max])
            n = found[0][0]
            rows += found
            spreads.append([n, f"{stats['sd']:.4f}", f"{stats['within_sd']:.4f}", stats["floor"][1], stats["floor"][2]])
            for row in found:
                cost = float(row[1].split("%")[0]) / 100
                if cost <= GOAL_COST + 1e-9 and row[4] != "n/a" and float(row[4]) >= GOAL:
                    key = (run.name, row[2])
                    reached[key] = min(reached.get(key, math.inf), int(n))
        count = sum(map(len, generations.values()))
        body.append(
            f"Replay of `{run.name}` ({raw.get('name')}: {raw['merge']['method']}, "
            f"{len(next(iter(genome.values())))} genes, {len(data['tasks'])} tasks, searched at eval.limit "
            f"{raw['eval'].get('limit')}, CMA-ES population {raw['search'].get('population')}, seed "
            f"{raw.get('seed')}; {count} candidates in {len(generations)} generations, all scored on the full "
            f"limit), promote {args.promote}, at N = each task's first N documents:\n\n"
            + harness.table(rows, ["N (docs/task)", "cost (docs/task)", "estimator", "estimated", "Spearman",
                                   "Kendall", "Spearman within a generation (mean)", "MAE",
                                   "generation's best promoted"])
            + "\n\nSpread of the candidates' quality on N documents against a random 10% sample's noise "
              "(benchmarks/estimate.py's noise floor):\n\n"
            + harness.table(spreads, ["N (docs/task)", "sd over the run", "sd within a generation (mean)",
                                      "10% sample's relative noise (sd)", "Spearman that allows (over the run)"]))
    verdict = "; ".join(f"{run} {method}: from N = {n}" for (run, method), n in sorted(reached.items()))
    body.append(f"**Spearman >= {GOAL} at <= {GOAL_COST:.0%} of the documents (over the run)**: "
                + (verdict if verdict else "not reached at any N replayed") + ".")
    harness.write_section(harness.results_path(args), SECTION, host, "\n\n".join(body))


if __name__ == "__main__":
    main()
