"""Cheaper fitness by estimation (`eval.estimate`): how well anchor estimates rank one run's candidates.

The references (sources and uniform merge) and random candidates of the demo search space are
scored once on the full limit with every document's result kept (lm-eval's logged samples). The
estimator (evomerge/estimate.py) is fitted as a run fits it: on the references' full results, and
with `--history` more candidates fully scored (a refit after the first promoted ones). Each of the
other `--candidates` is then estimated from its results on the anchor documents only (exactly what
an anchor evaluation returns: tests/test_estimate_integration.py checks that an evaluation of chosen
documents gives the full evaluation's per-document results), and compared with its full-limit
quality: Spearman, Kendall, mean absolute error. Beside it, at the same number of documents:
today's eval.subsample (the mean over the first documents) and the mean over random documents.
Cost share = documents scored / documents of the full limit (generation lengths differ per
document, so FLOPs follow documents only roughly).

    python benchmarks/estimate.py --zoo runs/zoo
    python benchmarks/estimate.py --quick          # CI: the quick zoo, a few candidates
"""

from __future__ import annotations

import math

import harness
import numpy as np
from subset_choice import per_document

from evomerge import estimate

GOAL, GOAL_COST = 0.9, 0.10
FRACTIONS = (0.05, 0.1, 0.25)
SECTION = "6c. Cheaper fitness: anchor estimates (eval.estimate)"


def main() -> None:
    parse = harness.parser(__doc__.splitlines()[0])
    harness.add_zoo_options(parse)
    parse.add_argument("--candidates", type=int, default=30, help="candidates each population is ranked on")
    parse.add_argument("--history", type=int, default=10, help="fully scored candidates a refit learns from")
    parse.add_argument("--limit", type=int, default=None, help="eval.limit (default: the demo's 100)")
    parse.add_argument("--draws", type=int, default=100, help="random subsets for the random baseline")
    parse.add_argument("--seed", type=int, default=0)
    parse.add_argument("--populations", default="uniform,cma-like", help="uniform, cma-like or both")
    parse.add_argument("--cache", type=harness._absolute, default=None,
                       help="an .npz of the scored per-document results: written once, read back on a rerun")
    args = parse.parse_args()
    if args.quick:
        args.candidates, args.history, args.draws, args.limit = 6, 2, 10, args.limit or 8
    host = harness.machine()
    harness.header("cheaper fitness: anchor estimates", host)

    from evomerge.search import genome_layout, stage_references
    from evomerge.workers import CandidateRunner

    work, zoo = harness.work_and_zoo(args)
    config = harness.demo_config(zoo, work / "estimate.yaml", limit=args.limit)
    layout = genome_layout(config)
    weights = np.array([task.weight for task in config.eval.tasks])
    populations = args.populations.split(",")
    cached = dict(np.load(args.cache)) if args.cache is not None and args.cache.exists() else None
    if cached is None:
        runner = CandidateRunner(config, threads=max(1, int(config.workers.cpus_per_worker)))
        cached = {"references": np.stack([per_document(runner, recipe) for recipe in stage_references(layout)])}
        print(f"references scored: {len(cached['references'])}", flush=True)
        rng = np.random.default_rng(args.seed)
        for population in populations:
            genomes = [rng.random(layout.size) if population == "uniform"
                       else np.clip(config.search.x0 + config.search.sigma0 * rng.standard_normal(layout.size), 0, 1)
                       for _ in range(args.history + args.candidates)]
            cached[population] = np.stack([_scored(runner, layout.decode(g), i) for i, g in enumerate(genomes)])
            if args.cache is not None:  # after each population: a stopped run keeps what it scored
                np.savez(args.cache, **cached)
    references = cached["references"]
    rows, best = [], {}
    for population in populations:
        scored = cached[population]
        full = quality(scored[args.history:], weights)
        print(f"{population}: full-limit quality {full.min():.3f}-{full.max():.3f}", flush=True)
        for fraction in FRACTIONS:
            found = compare(references, scored[:args.history], scored[args.history:], weights, fraction, args)
            for name, (rho, tau, mae) in found.items():
                rows.append([population, f"{fraction:.0%}", name, _f(rho), _f(tau), _f(mae, 4)])
                print("  " + " | ".join(rows[-1]), flush=True)
                if fraction <= GOAL_COST and not math.isnan(rho):
                    best[(population, name)] = max(best.get((population, name), -1.0), rho)

    ours = min((v for (p, name), v in best.items() if name.startswith("gp-irt, refit")), default=math.nan)
    body = (f"The demo search space (`search_spaces/demo.yaml`, eval.limit {config.eval.limit}, "
            f"{len(config.eval.tasks)} tasks, exact match) on {zoo_name(zoo)}: "
            f"the {len(references)} references and, per population, {args.history} + {args.candidates} random "
            f"candidates (uniform in the genome box, or CMA-like: x0 {config.search.x0}, sigma "
            f"{config.search.sigma0}), each scored once on the full limit with every document's result kept. "
            f"Correlations and mean absolute error (MAE, in quality) of each cheap score against the "
            f"full-limit quality on the last {args.candidates} candidates; cost = documents per task scored / "
            f"full limit. Rows: subsample = the first documents (eval.subsample today); random = random "
            f"documents (mean over {args.draws} draws); anchors = evomerge/estimate.py's clustered anchors, "
            f"weighted mean; gp-irt = anchors + IRT, lambda by leave-one-model-out; 'refs' = fitted on the "
            f"references only, 'refit' = also on the first {args.history} candidates.\n\n"
            + harness.table(rows, ["candidates", "cost", "cheap score", "Spearman", "Kendall", "MAE"])
            + f"\n\n**gp-irt with refit at <= {GOAL_COST:.0%} cost: Spearman {_f(ours)} (worse population)** "
              f"(goal >= {GOAL}): {harness.verdict(ours, GOAL)}"
            + (" (undefined)." if math.isnan(ours) else "."))
    harness.write_section(harness.results_path(args), SECTION, host, body)


def zoo_name(zoo) -> str:
    """Which zoo: its folder and training steps (zoo.json), so that results of other zoos are told apart."""
    import json

    folder = zoo["base"].parent
    try:
        recipe = json.loads((folder / "zoo.json").read_text())["recipe"]
        steps = f"base {recipe['base_steps']} steps, experts {recipe['expert_steps']} steps"
    except (OSError, KeyError, ValueError):
        steps = "recipe unknown"
    return f"the zoo `{folder.name}` ({steps})"


def _scored(runner, recipe, index: int) -> np.ndarray:
    values = per_document(runner, recipe)
    print(f"  candidate {index} scored", flush=True)
    return values


def compare(references: np.ndarray, history: np.ndarray, ranked: np.ndarray, weights: np.ndarray, fraction: float,
            args) -> dict[str, tuple[float, float, float]]:
    """Each cheap score's (Spearman, Kendall, MAE) against the full quality of `ranked`."""
    full = quality(ranked, weights)
    tasks, docs = ranked.shape[1:]
    k = estimate.anchor_count(fraction, docs)
    found = {"subsample (first)": _scores(quality(ranked[:, :, :k], weights), full)}
    draws = np.random.default_rng(args.seed + 1)
    random = [_scores(quality(np.take_along_axis(ranked, np.sort(draws.permuted(
        np.tile(np.arange(docs), (tasks, 1)), axis=1)[:, :k])[None], axis=2), weights), full)
        for _ in range(args.draws)]
    found["random (mean)"] = tuple(float(np.nanmean(column)) for column in zip(*random))
    fits = {"refs": references, "refit": np.concatenate([references, history]) if len(history) else references}
    for basis, models in fits.items():
        for method in ("anchors", "gp-irt"):
            fitted = estimate.fit({t: models[:, t] for t in range(tasks)}, fraction, method)
            guess = np.array([sum(w * fitted.tasks[t].estimate(list(row[t, list(fitted.tasks[t].documents)]))
                                  for t, w in enumerate(weights)) / weights.sum() for row in ranked])
            found[f"{method}, {basis}"] = _scores(guess, full)
    return found


def _scores(cheap: np.ndarray, full: np.ndarray) -> tuple[float, float, float]:
    rho = estimate.spearman(list(cheap), list(full))
    tau = estimate.kendall(list(cheap), list(full))
    return (math.nan if rho is None else rho, math.nan if tau is None else tau, float(np.abs(cheap - full).mean()))


def quality(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return values.mean(axis=2) @ weights / weights.sum()


def _f(value: float, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
