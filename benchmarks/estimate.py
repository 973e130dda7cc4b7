"""Cheaper fitness by estimation (`eval.estimate`): how well anchor estimates rank one run's candidates.

Two measurements.

*Random populations* (`--zoo`): the references (sources and uniform merge) and random candidates of
the demo search space are scored once on the full limit with every document's result kept (lm-eval's
logged samples). The estimators (evomerge/estimate.py) are fitted as a run fits them: on the
references' full results, and with `--history` more candidates fully scored (a refit after the first
promoted ones). Each of the other `--candidates` is then estimated from its results on the anchor
documents only (exactly what an anchor evaluation returns: tests/test_estimate_integration.py checks
that an evaluation of chosen documents gives the full evaluation's per-document results), and compared
with its full-limit quality: Spearman, Kendall, mean absolute error. Beside it, at the same number of
documents: today's eval.subsample (the mean over the first documents) and the mean over random
documents. Cost share = documents scored / documents of the full limit (generation lengths differ per
document, so FLOPs follow documents only roughly).

*A run's own candidates* (`--replay RUN_DIR`, repeatable): a search run with full evaluation (every
candidate's per-document results in its journal) is replayed as an `eval.estimate` run would have seen
it: generation by generation, each estimator is fitted on the references and the candidates it had
promoted in earlier generations (the best `--promote` share of each generation by its own estimate),
estimates every candidate of the generation from its anchor documents, and promotes. Reported: the
correlations over all estimated candidates and the mean within a generation, MAE, and how often the
generation's truly best candidate was among the promoted ones. The candidates are the run's (CMA-ES
near-duplicates), not what an estimate run would have proposed.

The noise floor: a rule that averages a random sample of k documents per task sees each candidate's
quality plus sampling noise; the table gives the spread (standard deviation) of the candidates' full
quality, the noise (standard deviation, around each sample's mean error, of the sample mean minus the
full quality: what reorders candidates) and the Spearman that ratio allows (Pearson sqrt(s^2 / (s^2 +
noise^2)), as Spearman 6/pi asin(r/2)).

    python benchmarks/estimate.py --zoo runs/zoo
    python benchmarks/estimate.py --zoo runs/zoo --replay runs/demo --replay runs/real
    python benchmarks/estimate.py --quick          # CI: the quick zoo, a few candidates
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import harness
import numpy as np
import yaml
from subset_choice import demo_space, per_document, reference_runner

from evomerge import estimate
from evomerge.samples import decode, encode

GOAL, GOAL_COST = 0.9, 0.10
FRACTIONS = (0.05, 0.1, 0.25)
SECTION = "6c. Cheaper fitness: anchor estimates (eval.estimate)"
OURS = "genome, refit"


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
    parse.add_argument("--replay", type=harness._absolute, action="append", default=[],
                       help="a run directory searched with full evaluation, replayed as an estimate run")
    parse.add_argument("--promote", type=float, default=0.25, help="the replay's promote share")
    parse.add_argument("--also", action="append", default=[],
                       help="CACHE.npz[:HISTORY]: another cache of this script (another zoo or seed), tabled too")
    args = parse.parse_args()
    if args.quick:
        args.candidates, args.history, args.draws, args.limit = 6, 3, 10, args.limit or 8
    host = harness.machine()
    harness.header("cheaper fitness: anchor estimates", host)

    zoo, config, layout, weights = demo_space(args, "estimate")
    populations = args.populations.split(",")
    cached = dict(np.load(args.cache)) if args.cache is not None and args.cache.exists() else None
    if cached is None:
        runner, references = reference_runner(config, layout)
        cached = {"references": references}
        print(f"references scored: {len(cached['references'])}", flush=True)
        for population, genomes in draw(populations, layout.size, config, args).items():
            cached[population] = np.stack([_scored(runner, layout.decode(g), i) for i, g in enumerate(genomes)])
            cached[f"{population}-genomes"] = genomes
            if args.cache is not None:  # after each population: a stopped run keeps what it scored
                np.savez(args.cache, **cached)
    drawn = draw(populations, layout.size, config, args)  # caches written before genomes were kept
    references = cached["references"]
    rows, best, floors = populations_table(cached, populations, args.history, drawn, weights, args)
    ours = min((v for (p, name), v in best.items() if name == OURS), default=math.nan)
    body = (f"The demo search space (`search_spaces/demo.yaml`, eval.limit {config.eval.limit}, "
            f"{len(config.eval.tasks)} tasks, exact match) on {zoo_name(zoo)}: "
            f"the {len(references)} references and, per population, {args.history} + {args.candidates} random "
            f"candidates (uniform in the genome box, or CMA-like: x0 {config.search.x0}, sigma "
            f"{config.search.sigma0}), each scored once on the full limit with every document's result kept. "
            f"Correlations and mean absolute error (MAE, in quality) of each cheap score against the "
            f"full-limit quality on the last {args.candidates} candidates; cost = documents per task scored / "
            f"full limit. Rows: subsample = the first documents (eval.subsample today); random = random "
            f"documents (mean over {args.draws} draws); anchors = clustered anchors, weighted mean; gp-irt = "
            f"anchors + IRT, lambda by leave-one-model-out (the default before); genome = the per-document "
            f"genome model with anchors where it is least sure (`method: genome`, the default now); 'refs' = "
            f"fitted on the references only, 'refit' = also on the first {args.history} candidates (the genome "
            f"model uses those {args.history} only: the references have no genome).\n\n"
            + harness.table(rows, ["candidates", "cost", "cheap score", "Spearman", "Kendall", "MAE"])
            + "\n\nNoise floor of a 10% random sample (see the script's docstring):\n\n"
            + harness.table(floors, ["candidates", "N", "full-limit quality", "spread (sd)",
                                     "binomial sd of a 10% sample mean", "noise (sd, relative)",
                                     "Spearman that allows", "random 10% measured"])
            + f"\n\n**genome with refit at <= {GOAL_COST:.0%} cost: Spearman {_f(ours)} (worse population)** "
              f"(goal >= {GOAL}): {harness.verdict(ours, GOAL)}"
            + (" (undefined)." if math.isnan(ours) else "."))
    for also in args.also:  # another zoo's cache, written by this script with its own --cache
        path, _, history = str(also).partition(":")
        other = dict(np.load(path))
        history = int(history or args.history)
        rows, _, floors = populations_table(other, populations, history, draw(populations, layout.size, config, args)
                                            if history == args.history else {}, weights, args)
        body += (f"\n\nThe cache `{Path(path).name}` (same search space; its own zoo, see the reading), "
                 f"{history} fitted + {len(other[populations[0]]) - history} ranked candidates per population:\n\n"
                 + harness.table(rows, ["candidates", "cost", "cheap score", "Spearman", "Kendall", "MAE"])
                 + "\n\n" + harness.table(floors, ["candidates", "N", "full-limit quality", "spread (sd)",
                                                    "binomial sd of a 10% sample mean", "noise (sd, relative)",
                                                    "Spearman that allows", "random 10% measured"]))
    for run in args.replay:
        body += "\n\n" + replay(run, args)
    harness.write_section(harness.results_path(args), SECTION, host, body)


def populations_table(cached: dict, populations: list[str], history: int, drawn: dict, weights: np.ndarray, args):
    """Rows (population, cost, cheap score, Spearman, Kendall, MAE), the best Spearman per (population,
    score) at <= GOAL_COST, and the noise-floor rows, of one cache."""
    rows, best, floors = [], {}, []
    for population in populations:
        scored = cached[population]
        genomes = cached[f"{population}-genomes"] if f"{population}-genomes" in cached else drawn[population]
        full = quality(scored[history:], weights)
        print(f"{population}: full-limit quality {full.min():.3f}-{full.max():.3f}", flush=True)
        floors.append([population, str(len(full)), f"{full.min():.3f}-{full.max():.3f}", f"{full.std():.4f}"]
                      + noise_floor(scored[history:], weights, 0.1, args.seed))
        for fraction in FRACTIONS:
            found = compare(cached["references"], scored[:history], genomes[:history], scored[history:],
                            genomes[history:], weights, fraction, args)
            for name, (rho, tau, mae) in found.items():
                rows.append([population, f"{fraction:.0%}", name, _f(rho), _f(tau), _f(mae, 4)])
                print("  " + " | ".join(rows[-1]), flush=True)
                if fraction <= GOAL_COST and not math.isnan(rho):
                    best[(population, name)] = max(best.get((population, name), -1.0), rho)
    return rows, best, floors


def draw(populations: list[str], size: int, config, args) -> dict[str, np.ndarray]:
    """The random candidates' genomes, per population (one generator, populations in order)."""
    rng = np.random.default_rng(args.seed)
    return {population: np.stack([
        rng.random(size) if population == "uniform"
        else np.clip(config.search.x0 + config.search.sigma0 * rng.standard_normal(size), 0, 1)
        for _ in range(args.history + args.candidates)]) for population in populations}


def zoo_name(zoo) -> str:
    """Which zoo: its folder and training steps (zoo.json), so that results of other zoos are told apart."""
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


def compare(references: np.ndarray, history: np.ndarray, history_genomes: np.ndarray, ranked: np.ndarray,
            genomes: np.ndarray, weights: np.ndarray, fraction: float, args) -> dict[str, tuple[float, float, float]]:
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
            found[f"{method}, {basis}"] = _scores(estimates(fitted, ranked, genomes, weights), full)
    if len(history) >= estimate.MIN_GENOMES:
        fitted = estimate.fit_genome({t: history[:, t] for t in range(tasks)}, list(history_genomes), list(genomes),
                                     fraction)
        found[OURS] = _scores(estimates(fitted, ranked, genomes, weights), full)
    return found


def estimates(fitted: estimate.Anchors, ranked: np.ndarray, genomes, weights: np.ndarray,
              sign: np.ndarray | None = None) -> np.ndarray:
    """Each candidate's estimated quality from its values on `fitted`'s anchor documents only (a task's
    sign -1: lower is better, its metric counts negatively, as evaluate.quality does)."""
    sign = np.ones(len(weights)) if sign is None else sign
    out = []
    for row, genome in zip(ranked, genomes):
        per_doc = {t: encode(list(row[t, list(fitted.tasks[t].documents)])) for t in fitted.tasks}
        found = fitted.estimates(per_doc, genome)
        out.append(sum(w * s * found[t] for t, (w, s) in enumerate(zip(weights, sign))) / weights.sum())
    return np.array(out)


def noise_floor(ranked: np.ndarray, weights: np.ndarray, fraction: float, seed: int, draws: int = 300) -> list[str]:
    """[binomial sd of a random sample's mean, relative noise sd, the Spearman that allows, measured Spearman]."""
    full = quality(ranked, weights)
    tasks, docs = ranked.shape[1:]
    k = estimate.anchor_count(fraction, docs)
    per_task = ranked.mean(axis=2)
    binomial = np.sqrt((weights ** 2 * per_task * (1 - per_task) / k * (docs - k) / max(docs - 1, 1)).sum(axis=1)
                       ) / weights.sum()
    rng = np.random.default_rng(seed + 2)
    errors, rhos = [], []
    for _ in range(draws):
        chosen = np.stack([np.sort(rng.choice(docs, k, replace=False)) for _ in range(tasks)])
        cheap = quality(np.take_along_axis(ranked, chosen[None], axis=2), weights)
        errors.append((cheap - full) - (cheap - full).mean())
        rhos.append(estimate.spearman(list(cheap), list(full)))
    noise = float(np.sqrt(np.mean(np.square(errors))))
    r = math.sqrt(full.var() / (full.var() + noise ** 2)) if full.var() > 0 else math.nan
    measured = [v for v in rhos if v is not None]
    return [f"{binomial.mean():.4f}", f"{noise:.4f}", _f(6 / math.pi * math.asin(r / 2)),
            _f(float(np.mean(measured)) if measured else math.nan)]


def replay(run: Path, args) -> str:
    """The replay of one full-evaluation run (module docstring) as a RESULTS.md paragraph and table."""
    data = load_run(run)
    rows, stats = replay_rows(data, args, FRACTIONS)
    raw, generations, genome = data["raw"], data["generations"], data["genome"]
    return (f"Replay of the run `{run.name}` ({raw.get('name')}: {raw['merge']['method']}, "
            f"{len(genome[next(iter(genome))]) if genome else 0} genes, eval.limit {raw['eval'].get('limit')}, "
            f"{len(data['tasks'])} tasks, CMA-ES population {raw['search'].get('population')}; "
            f"{sum(map(len, generations.values()))} candidates in {len(generations)} generations, all scored on the "
            f"full limit): promote {args.promote}. Spread of the candidates' full quality: sd {stats['sd']:.4f} "
            f"over the run, {stats['within_sd']:.4f} within a generation (mean); a random 10% sample's relative "
            f"noise sd {stats['floor'][1]} (Spearman that allows over the run: {stats['floor'][2]}).\n\n"
            + harness.table([row[1:] for row in rows], REPLAY_HEAD))


REPLAY_HEAD = ["cost (docs/task)", "estimator", "estimated", "Spearman", "Kendall",
               "Spearman within a generation (mean)", "MAE", "generation's best promoted"]
REPLAY_METHODS = ("subsample (first)", "gp-irt", "genome")


def load_run(run: Path) -> dict:
    """A full-evaluation run's journal as a replay reads it: config, tasks, weights, signs, per-document
    values (tasks x documents) and genomes per trial, the references and the candidates per generation."""
    raw = yaml.safe_load((run / "config.yaml").read_text())
    specs = raw["eval"]["tasks"]
    tasks = [t["name"] for t in specs]
    records = [json.loads(line) for line in (run / "journal.jsonl").read_text().splitlines() if line.strip()]
    latest = {r["trial"]: r for r in records}  # a trial evaluated again: its last line
    usable = [r for r in latest.values() if r.get("state") == "complete" and r.get("stage", "ps") == "ps"
              and all(t in (r.get("per_doc") or {}) for t in tasks)]
    if len({(r.get("sample") or {}).get("limit") for r in usable}) > 1:
        raise SystemExit(f"{run}: trials scored at different limits; a replay needs one limit")
    generations: dict[int, list[int]] = {}
    for r in sorted(usable, key=lambda r: r["trial"]):
        if r.get("label") is None and r.get("genome") is not None:
            generations.setdefault(r["generation"], []).append(r["trial"])
    return {"raw": raw, "tasks": tasks, "weights": np.array([float(t.get("weight", 1.0)) for t in specs]),
            "sign": np.array([-1.0 if t.get("higher_is_better") is False else 1.0 for t in specs]),
            "values": {r["trial"]: np.array([decode(r["per_doc"][t]) for t in tasks]) for r in usable},
            "references": [r["trial"] for r in usable if r.get("label") is not None],
            "generations": generations,
            "genome": {r["trial"]: np.array(r["genome"], dtype=float) for r in usable if r.get("genome") is not None}}


def replay_rows(data: dict, args, fractions, documents: int | None = None,
                methods=REPLAY_METHODS) -> tuple[list[list[str]], dict]:
    """The replay's rows ([documents, cost, estimator, estimated, Spearman, Kendall, Spearman within a
    generation, MAE, best promoted]) on each task's first `documents` documents (all: None), as if the run
    had been scored at eval.limit `documents`; and the spread of the candidates' quality there (sd over
    the run, mean sd within a generation, the 10% noise floor)."""
    weights, sign, generations, genome = data["weights"], data["sign"], data["generations"], data["genome"]
    values = {i: v[:, :documents] for i, v in data["values"].items()}
    full = {i: float((sign * weights) @ v.mean(axis=1) / weights.sum()) for i, v in values.items()}
    docs = min(v.shape[1] for v in values.values())
    rows = []
    for fraction in fractions:
        for method in methods:
            pairs, within, hits = [], [], 0
            promoted: list[int] = []
            pruned: list[tuple[int, dict]] = []
            for generation in sorted(generations):
                ids = generations[generation]
                guess, anchors = replay_estimates(method, fraction, ids, data["references"], promoted, values,
                                                  genome, weights, sign, pruned)
                pairs += [(guess[i], full[i]) for i in ids]
                rho = estimate.spearman([guess[i] for i in ids], [full[i] for i in ids])
                if rho is not None:
                    within.append(rho)
                count = max(1, math.ceil(round(args.promote * len(ids), 9)))
                chosen = sorted(ids, key=lambda i: (-guess[i], i))[:count]
                hits += max(ids, key=lambda i: (full[i], -i)) in chosen
                promoted += chosen
                pruned += [(i, anchors) for i in ids if i not in chosen]
            est, truth = [p[0] for p in pairs], [p[1] for p in pairs]
            k = estimate.anchor_count(fraction, docs)
            rows.append([str(docs), f"{fraction:.0%} ({k}/{docs})", method, str(len(pairs)),
                         _f(estimate.spearman(est, truth)), _f(estimate.kendall(est, truth)),
                         _f(float(np.mean(within)) if within else math.nan),
                         _f(float(np.mean(np.abs(np.subtract(est, truth)))), 4), f"{hits}/{len(generations)}"])
            print("  replay | " + " | ".join(rows[-1]), flush=True)
    every = np.array([values[i] for ids in generations.values() for i in ids])
    spread = np.array([full[i] for ids in generations.values() for i in ids])
    return rows, {"sd": float(spread.std()), "floor": noise_floor(every, weights, 0.1, args.seed),
                  "within_sd": float(np.mean([np.std([full[i] for i in ids]) for ids in generations.values()]))}


def replay_estimates(method: str, fraction: float, ids: list[int], references: list[int], promoted: list[int],
                     values: dict, genome: dict, weights: np.ndarray, sign: np.ndarray,
                     pruned: list[tuple[int, dict]] = ()) -> tuple[dict[int, float], dict]:
    """One generation's estimated qualities by `method`, fitted on the references and the promoted so far
    (`genome+pruned`: and on `pruned`, the earlier candidates' anchor results: (trial, {task: documents})),
    and the anchor documents per task ({} for the first documents)."""
    first = values[ids[0]]
    tasks, docs = first.shape
    if method == "subsample (first)":
        k = estimate.anchor_count(fraction, docs)
        return {i: float((sign * weights) @ values[i][:, :k].mean(axis=1) / weights.sum()) for i in ids}, {}
    if method == "genome-diff":  # the first documents, corrected by the genome model (a difference estimator)
        k = estimate.anchor_count(fraction, docs)
        if len(promoted) < estimate.MIN_GENOMES:
            return {i: float((sign * weights) @ values[i][:, :k].mean(axis=1) / weights.sum()) for i in ids}, {}
        fitted = estimate.fit_genome({t: np.array([values[i][t] for i in promoted]) for t in range(tasks)},
                                     [genome[i] for i in promoted], [genome[i] for i in ids], fraction)
        found = {}
        for i in ids:
            p = fitted.model.predict(genome[i]).reshape(tasks, docs)
            per_task = p.mean(axis=1) + (values[i][:, :k] - p[:, :k]).mean(axis=1)
            found[i] = float((sign * weights) @ per_task / weights.sum())
        return found, {t: list(range(k)) for t in range(tasks)}
    if method == "strata":  # half the anchors where the genome model is least sure (all counted), half the
        # first of the other documents (their mean stands for the rest)
        k = estimate.anchor_count(fraction, docs)
        if len(promoted) < estimate.MIN_GENOMES:
            return {i: float((sign * weights) @ values[i][:, :k].mean(axis=1) / weights.sum()) for i in ids}, {}
        fitted = estimate.fit_genome({t: np.array([values[i][t] for i in promoted]) for t in range(tasks)},
                                     [genome[i] for i in promoted], [genome[i] for i in ids], max(1, k // 2))
        found, chosen = {}, {}
        for t in range(tasks):
            sure = list(fitted.tasks[t].documents)
            rest = [d for d in range(docs) if d not in set(sure)][:k - len(sure)]
            chosen[t] = sorted(sure + rest)
        for i in ids:
            per_task = []
            for t in range(tasks):
                sure = list(fitted.tasks[t].documents)
                rest = [d for d in chosen[t] if d not in set(sure)]
                per_task.append((values[i][t, sure].sum() + (docs - len(sure)) * values[i][t, rest].mean()) / docs)
            found[i] = float((sign * weights) @ np.array(per_task) / weights.sum())
        return found, chosen
    fitted = None
    if method.startswith("genome") and len(promoted) >= estimate.MIN_GENOMES:
        partial = [(genome[i], {t: (d, values[i][t, d].tolist()) for t, d in seen.items()})
                   for i, seen in pruned] if method == "genome+pruned" else []
        fitted = estimate.fit_genome({t: np.array([values[i][t] for i in promoted]) for t in range(tasks)},
                                     [genome[i] for i in promoted], [genome[i] for i in ids], fraction,
                                     partial=partial)
    if fitted is None:
        basis = references + promoted
        fitted = estimate.fit({t: np.array([values[i][t] for i in basis]) for t in range(tasks)}, fraction, "gp-irt")
    guess = estimates(fitted, np.array([values[i] for i in ids]), [genome[i] for i in ids], weights, sign)
    return {i: float(g) for i, g in zip(ids, guess)}, fitted.documents()


def _scores(cheap: np.ndarray, full: np.ndarray) -> tuple[float, float, float]:
    rho = estimate.spearman(list(cheap), list(full))
    tau = estimate.kendall(list(cheap), list(full))
    return (math.nan if rho is None else rho, math.nan if tau is None else tau, float(np.abs(cheap - full).mean()))


def quality(values: np.ndarray, weights: np.ndarray) -> np.ndarray:
    return values.mean(axis=2) @ weights / weights.sum()


def _f(value: float | None, digits: int = 3) -> str:
    return "n/a" if value is None or math.isnan(value) else f"{value:.{digits}f}"


if __name__ == "__main__":
    main()
