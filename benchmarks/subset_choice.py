"""Cheaper fitness, which documents: does choosing the subset well rank candidates better than the first ones?

`eval.subsample` scores every candidate on the first `fraction` x `eval.limit` documents of each
task. This benchmark asks whether a better choice of documents would reach the 0.9 rank
correlation at 25% of the cost that the first documents miss (benchmarks/subsample.py). It scores
the references (the sources and the uniform merge) and random candidates of the demo search space
once on the full limit, keeping every document's result (lm-eval's logged samples), and then
compares, on the same candidates, the Spearman correlation between the full-limit quality and the
quality on subsets of the same size chosen by each rule:

- first: the first documents (what eval.subsample does);
- random: uniform draws (mean and 10th-90th percentile over many draws);
- strata: proportional draws within groups of documents the references answer alike;
- disagree: draws among the documents the references do not all answer alike, topped up;
- variable: the documents whose results vary most over the references and `--history` other
  candidates scored on the full limit (what a search knows after a few generations).

And, for random draws, how the correlation grows with the subset's size. Goal: 0.9 at 25%.

    python benchmarks/subset_choice.py --zoo runs/zoo
    python benchmarks/subset_choice.py --quick          # CI: the quick zoo, a few candidates
"""

from __future__ import annotations

import math

import harness
import numpy as np
from subsample import spearman

GOAL = 0.9
RULES = ("first", "random", "strata", "disagree", "variable")
SECTION = "6b. Cheaper fitness: which documents"


def main() -> None:
    parse = harness.parser(__doc__.splitlines()[0])
    harness.add_zoo_options(parse)
    parse.add_argument("--candidates", type=int, default=40, help="candidates each population is ranked on")
    parse.add_argument("--history", type=int, default=10, help="other candidates the 'variable' rule learns from")
    parse.add_argument("--limit", type=int, default=None, help="eval.limit (default: the demo's 100)")
    parse.add_argument("--fraction", type=float, default=0.25)
    parse.add_argument("--draws", type=int, default=300, help="random subsets per rule that draws")
    parse.add_argument("--seed", type=int, default=0)
    args = parse.parse_args()
    if args.quick:
        args.candidates, args.history, args.draws, args.limit = 6, 2, 50, args.limit or 8
    host = harness.machine()
    harness.header("cheaper fitness: which documents", host)

    _, config, layout, weights = demo_space(args, "subset_choice")
    runner, references = reference_runner(config, layout)
    rng = np.random.default_rng(args.seed)
    rows, curves, means = [], [], []  # means: each rule's mean Spearman, where defined
    for population in ("uniform", "cma-like"):
        genomes = [rng.random(layout.size) if population == "uniform"
                   else np.clip(config.search.x0 + config.search.sigma0 * rng.standard_normal(layout.size), 0, 1)
                   for _ in range(args.history + args.candidates)]
        scored = np.stack([per_document(runner, layout.decode(g)) for g in genomes])
        row, curve, defined = compare_rules(population, references, scored[:args.history], scored[args.history:],
                                            weights, args)
        rows.append(row)
        curves += curve
        means += defined

    best = max(means, default=math.nan)
    body = (f"The demo search space (`search_spaces/demo.yaml`, eval.limit {config.eval.limit}, "
            f"{len(config.eval.tasks)} tasks) on {'the quick' if args.quick else 'the demo'} zoo: the "
            f"{len(references)} references and, per population, {args.history} + {args.candidates} random "
            f"candidates (uniform in the genome box, or CMA-like: x0 {config.search.x0}, sigma "
            f"{config.search.sigma0}), each scored once on the full limit with every document's result "
            f"kept. Spearman between full-limit quality and the quality on a subset of {args.fraction:.0%} "
            f"of each task's documents, on the last {args.candidates} candidates; for the rules that draw, "
            f"the mean [10th, 90th percentile] over {args.draws} draws. Rules: first = what eval.subsample "
            f"uses; random; strata = proportional within groups of documents the references answer alike; "
            f"disagree = among documents the references do not all answer alike; variable = the documents "
            f"whose results vary most over the references and the first {args.history} candidates.\n\n"
            + harness.table(rows, ["candidates", "N", "subset docs/task", *RULES])
            + "\n\nRandom subsets of other sizes (same candidates):\n\n"
            + harness.table(curves, ["candidates", "fraction", "docs/task", "Spearman"])
            + f"\n\n**Best rule at {args.fraction:.0%}: Spearman {best:.3f}** (goal >= {GOAL}): "
              f"{harness.verdict(best, GOAL)}"
            + (" (undefined: every candidate has the same full-limit quality)." if math.isnan(best) else "."))
    harness.write_section(harness.results_path(args), SECTION, host, body)


def compare_rules(population: str, references: np.ndarray, history: np.ndarray, ranked: np.ndarray,
                  weights: np.ndarray, args) -> tuple[list[str], list[list[str]], list[float]]:
    """One population's table row (each rule's Spearman at args.fraction), its rows of random subsets
    by size, and the rules' mean correlations where defined."""
    full = quality(ranked, weights)
    draws = np.random.default_rng(args.seed + 1)

    def correlations(rule: str, size: int, count: int) -> list[float]:
        return [spearman(quality(on(ranked, chosen), weights), full)
                for chosen in subsets(rule, size, references, history, draws, count)]

    k = max(1, math.ceil(round(args.fraction * ranked.shape[2], 9)))
    result = {rule: correlations(rule, k, 1 if rule in ("first", "variable") else args.draws) for rule in RULES}
    print(f"{population}: " + ", ".join(f"{rule} {summary(result[rule])}" for rule in RULES), flush=True)
    print(f"  full-limit quality {full.min():.3f}-{full.max():.3f}", flush=True)
    curve = []
    for fraction in (0.1, 0.25, 0.5, 0.75):
        size = max(1, math.ceil(round(fraction * ranked.shape[2], 9)))
        curve.append([population, f"{fraction:.0%}", f"{size}/{ranked.shape[2]}",
                      summary(correlations("random", size, args.draws))])
    row = [population, str(len(full)), f"{k}/{ranked.shape[2]}"] + [summary(result[rule]) for rule in RULES]
    means = [float(np.mean(values)) for values in result.values() if not np.isnan(values).any()]
    return row, curve, means


def demo_space(args, name: str):
    """The demo search space a document-choice benchmark ranks candidates of, under its work folder:
    (zoo, config, genome layout, task weights)."""
    from evomerge.search import genome_layout

    work, zoo = harness.work_and_zoo(args)
    config = harness.demo_config(zoo, work / f"{name}.yaml", limit=args.limit)
    return zoo, config, genome_layout(config), np.array([task.weight for task in config.eval.tasks])


def reference_runner(config, layout):
    """A CandidateRunner of `config` and its references' per-document values (references x tasks x documents)."""
    from evomerge.search import stage_references
    from evomerge.workers import CandidateRunner

    runner = CandidateRunner(config, threads=max(1, int(config.workers.cpus_per_worker)))
    return runner, np.stack([per_document(runner, recipe) for recipe in stage_references(layout)])


def per_document(runner, recipe) -> np.ndarray:
    """tasks x documents: each document's value of its task's metric, the recipe merged into the runner's model."""
    import torch
    from lm_eval.evaluator import evaluate

    evaluator = runner.evaluator
    runner.merger.merge_into(runner.model, recipe)
    with torch.inference_mode():
        results = evaluate(lm=evaluator.solo, task_dict=evaluator.tasks, limit=evaluator.config.limit,
                           bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    rows = []
    for task in evaluator.config.tasks:
        samples = [s for s in results["samples"][task.name] if s.get("filter", "none") == task.filter]
        values = [float(s[task.metric]) for s in sorted(samples, key=lambda s: s["doc_id"])]
        rows.append(values if task.higher_is_better is not False else [-v for v in values])
    if len({len(r) for r in rows}) != 1:
        raise SystemExit("the tasks have different numbers of documents at this limit; pass --limit")
    return np.array(rows)


def quality(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    """candidates x tasks x documents -> each candidate's weighted mean over tasks of the per-task mean."""
    return values.mean(axis=2) @ weights / weights.sum()


def on(values: np.ndarray, chosen: np.ndarray) -> np.ndarray:
    """candidates x tasks x documents, restricted to the chosen documents (tasks x k) of each task."""
    return np.take_along_axis(values, chosen[None], axis=2)


def subsets(rule: str, k: int, references: np.ndarray, history: np.ndarray, rng: np.random.Generator,
            count: int) -> list[np.ndarray]:
    """`count` subsets by `rule`, each tasks x k document indices."""
    tasks, docs = references.shape[1:]
    chosen = []
    for _ in range(count):
        per_task = []
        for t in range(tasks):
            seen = references[:, t]
            if rule == "first":
                pick = np.arange(k)
            elif rule == "random":
                pick = rng.choice(docs, k, replace=False)
            elif rule == "strata":
                pick = stratified(seen, k, rng)
            elif rule == "disagree":
                mixed = seen.min(axis=0) != seen.max(axis=0)
                pick = np.concatenate([rng.permutation(np.flatnonzero(mixed)),
                                       rng.permutation(np.flatnonzero(~mixed))])[:k]
            else:  # variable: spread over the references and the history, most first (ties by index)
                known = np.concatenate([seen, history[:, t]]) if len(history) else seen
                pick = np.argsort(-known.var(axis=0), kind="stable")[:k]
            per_task.append(np.sort(pick))
        chosen.append(np.array(per_task))
    return chosen


def stratified(seen: np.ndarray, k: int, rng: np.random.Generator) -> np.ndarray:
    """k documents drawn in proportion to the groups of documents the references answer alike."""
    _, group = np.unique(seen.T, axis=0, return_inverse=True)
    order = np.lexsort((rng.random(len(group)), group.ravel()))  # by group, random within
    step = len(order) / k
    return order[(rng.random() * step + step * np.arange(k)).astype(int)]


def summary(values: list[float]) -> str:
    if np.isnan(values).any():
        return "n/a"
    if len(values) == 1:
        return f"{values[0]:.3f}"
    return f"{np.mean(values):.3f} [{np.percentile(values, 10):.2f}, {np.percentile(values, 90):.2f}]"


if __name__ == "__main__":
    main()
