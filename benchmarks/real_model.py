"""On a real model: a candidate's cost on the real zoo (SmolLM2-135M-Instruct and three experts).

Runs the worker's own code (`CandidateRunner`, `search_spaces/real.yaml`) in this process, once
per method (linear, ties, dare_ties, breadcrumbs_ties, della; per-layer genes), and for ties once
more in bfloat16:
the worker's warm-up (`CandidateRunner.warm_up`: page-in, a mid-box merge that fills the
prepared store, lm-eval's set-up on one document) is timed on its own, then a few random
candidates are split into merge, eval set-up, forward passes, serving and scoring. Reported:
each phase's share, the share outside forward passes (goal < 15%), the median merge of ties
and the other sparse methods against linear's (goal <= 2x), the first candidate against the
median (goal <= 1.5x), the merge of the same ties and dare_ties candidates without the prepared
store (what every candidate paid before it), and the process's peak RSS. `--merge-only` times the
merge phase alone, also with the store's skip of experts equal to the base off (the general path). Build the zoo first:
`python -m evomerge.cli zoo --real runs/real_zoo`.
"""

from __future__ import annotations

import resource
import statistics
import time
from pathlib import Path

import harness
import numpy as np
import yaml

PHASES = ("merge", "eval_setup", "forward", "serving", "scoring")
OVERHEAD_GOAL, MERGE_GOAL, FIRST_GOAL = 0.15, 2.0, 1.5


def real_config(zoo: Path, path: Path, method: str, dtype: str, limit: int):
    from evomerge.config import load_config

    raw = yaml.safe_load((harness.REPO / "search_spaces" / "real.yaml").read_text())
    raw["models"].update(base=str(zoo / "base"), experts=[str(zoo / s) for s in ("rev", "sort", "add")],
                         device="cpu", dtype=dtype)
    raw["merge"]["method"] = method
    if method == "linear":
        raw["merge"]["bounds"] = {"weight": [0.0, 1.5]}
    raw["eval"].update(include_path=str(zoo / "tasks"), limit=limit)
    path.write_text(yaml.safe_dump(raw))
    return load_config(path)


def peak_rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def measure(config, count: int, seed: int = 0) -> dict:
    """Warm-up, then `count` random candidates on one CandidateRunner; the seconds of each."""
    from evomerge.search import genome_layout
    from evomerge.trial import Trial
    from evomerge.workers import CandidateRunner

    start = time.perf_counter()
    runner = CandidateRunner(config, threads=1)
    load = time.perf_counter() - start
    layout = genome_layout(config)
    warm = runner.warm_up(layout.decode([0.5] * layout.size))  # as a search's workers do
    rng = np.random.default_rng(seed)
    rows, qualities, trials = [], [], []
    for i, x in enumerate(rng.uniform(0, 1, size=(count, layout.size))):
        trial = Trial(i, 0, layout.decode(x), tuple(map(float, x)))
        result = runner.run(trial)
        if not result.ok:
            raise SystemExit(f"{config.merge.method}: trial {i} failed: {result.error}")
        rows.append(result.seconds)
        qualities.append(result.quality)
        trials.append(trial)
        print(f"  {config.merge.method} {config.models.dtype} trial {i}: "
              + ", ".join(f"{p} {result.seconds[p]:.2f}" for p in PHASES)
              + f" total {result.seconds['total']:.2f} quality {result.quality:.3f}", flush=True)
    store_mb = runner.merger.prepared.nbytes / 1e6
    scratch = None
    # the same merges without the prepared store (breadcrumbs' and della's argsorts of every tensor take minutes)
    if config.merge.method in ("ties", "dare_ties"):
        runner.merger.prepared = None
        scratch = []
        for trial in trials:
            t0 = time.perf_counter()
            runner.merger.merge_into(runner.model, trial.recipe)
            scratch.append(time.perf_counter() - t0)
    return {"load": load, "warm_up": warm, "rows": rows, "qualities": qualities, "scratch": scratch,
            "store_mb": store_mb, "rss": peak_rss_gb()}


MERGE_METHODS = ("linear", "ties", "dare_ties", "breadcrumbs_ties", "della")
SCRATCH_METHODS = ("ties", "dare_ties")  # --scratch times these without the store too


def merge_phase(zoo: Path, work: Path, repeats: int, methods: tuple[str, ...], scratch: bool,
                store_only: bool = False, dtype: str = "float32") -> str:
    """The merge phase alone, as a worker runs it (one thread, sources memory-mapped, merged into
    the preallocated model), for each method on random per-layer genes: with the prepared store
    as a worker has it (after its first merge), the same with every tensor merged in full (the
    store's skip of experts equal to the base off: what a fine-tune that touches every tensor
    costs), and (`scratch`) from scratch. Each timed merge alternates with a linear merge (with
    its own store, as a linear worker has it), so the ratio sees the machine's load of the
    moment. Returns a RESULTS body."""
    import torch

    from evomerge.merge.merger import load_merge_target
    from evomerge.merge.prepared import Prepared
    from evomerge.search import genome_layout

    torch.set_num_threads(1)
    rng = np.random.default_rng(1)

    def recipes_of(method: str) -> list:
        layout = genome_layout(real_config(zoo, work / f"merge-{method}-{dtype}.yaml", method, dtype, 10))
        return [layout.decode(x) for x in rng.uniform(0, 1, size=(repeats, layout.size))]

    config = real_config(zoo, work / f"merge-linear-{dtype}.yaml", "linear", dtype, 10)
    model, merger = load_merge_target(config.models, config.seed, torch.device("cpu"))
    linear_recipes, linear_store = recipes_of("linear"), Prepared()

    def timed(recipe, store) -> float:
        merger.prepared = store
        t0 = time.perf_counter()
        merger.merge_into(model, recipe)
        return time.perf_counter() - t0

    first_linear = timed(linear_recipes[0], linear_store)  # pages in the sources
    variants = {"store": lambda: Prepared(), "store, every tensor merged": lambda: Prepared(skip_unchanged=False),
                "from scratch": lambda: None}
    rows = []
    for method in methods:
        if method == "linear":
            continue
        recipes = recipes_of(method)
        # from scratch, breadcrumbs and della argsort every tensor per merge: minutes each
        for variant in [v for v in variants if (v == "store" or not store_only)
                        and (v != "from scratch" or (scratch and method in SCRATCH_METHODS))]:
            store = variants[variant]()
            first = timed(recipes[0], store)  # fills the store (a worker's warm-up does it)
            seconds, linear = [], []
            for recipe, linear_recipe in zip(recipes, linear_recipes):
                linear.append(timed(linear_recipe, linear_store))
                seconds.append(timed(recipe, store))
            median, linear_median = statistics.median(seconds), statistics.median(linear)
            store_mb = store.nbytes / 1e6 if store is not None else 0.0
            rows.append((f"{method} ({variant})", first, median, linear_median, store_mb))
            print(f"merge {method} ({variant}): first {first:.2f} s, median {median:.2f} s, linear beside it "
                  f"{linear_median:.2f} s: {median / linear_median:.2f}x; store {store_mb:.0f} MB "
                  f"(load average {harness.load_average():.1f})", flush=True)
            del store
    merger.prepared = None
    table = harness.table([[key, f"{first:.2f}", f"{median:.2f}", f"{linear:.2f}", f"**{median / linear:.2f}x**",
                            harness.verdict(median / linear, MERGE_GOAL, higher_is_better=False), f"{mb:.0f}"]
                           for key, first, median, linear, mb in rows],
                          ["merge", "first s", "median s", "linear s (beside it)", "vs linear", "goal <= 2x",
                           "store MB"])
    return (f"The merge phase alone on the real zoo (base + 3 experts, 134.5M parameters, {dtype}), as a worker "
            f"runs it: one thread, sources memory-mapped, merged into the preallocated model; {repeats} random "
            f"per-layer candidates of `search_spaces/real.yaml`'s genome with the row's method, each timed merge "
            f"alternating with a linear merge of random linear genes (first linear merge {first_linear:.2f} s, "
            f"paging in the sources); medians. 'store': the prepared store as a worker has it, after its first "
            f"merge ('first s': it fills the store; a worker's warm-up does it). The zoo's experts were "
            f"fine-tuned on 36 of its 272 tensors (16% of the entries): for the other 236 every expert equals "
            f"the base, and a task-vector method merges them to the base without work. 'every tensor merged': "
            f"the same store with that skip off, what a fine-tune that touches every tensor would cost (the "
            f"general path). 'from scratch' (ties and dare_ties): no store. Task-vector mixes on the CPU run "
            f"as one compiled loop (`evomerge/merge/fused.py`) unless EVOMERGE_FUSED=0.\n\n" + table)


def main() -> None:
    parse = harness.parser(__doc__.splitlines()[0])
    parse.add_argument("--zoo", type=Path, default=harness.REPO / "runs" / "real_zoo")
    parse.add_argument("--work", type=Path, default=Path("/tmp/evomerge-bench-real"))
    parse.add_argument("--candidates", type=int, default=4)
    parse.add_argument("--limit", type=int, default=10, help="documents per task")
    parse.add_argument("--merge-only", action="store_true", help="time the merge phase alone (no evaluation)")
    parse.add_argument("--methods", nargs="+", default=list(MERGE_METHODS), help="the methods, linear first")
    parse.add_argument("--scratch", action="store_true", help="--merge-only: also merge without the store")
    parse.add_argument("--store-only", action="store_true", help="--merge-only: only the store as a worker has it")
    parse.add_argument("--bf16", type=int, choices=(0, 1), default=1, help="the full run: add ties in bfloat16")
    parse.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                       help="--merge-only: the sources' and the model's dtype")
    args = parse.parse_args()
    host = harness.machine()
    harness.header("on a real model", host)
    args.work.mkdir(parents=True, exist_ok=True)
    zoo = args.zoo.resolve()
    if args.merge_only:
        body = merge_phase(zoo, args.work, 2 if args.quick else args.candidates, tuple(args.methods), args.scratch,
                           args.store_only, args.dtype)
        title = "On a real model: merge phase" + ("" if args.dtype == "float32" else f", {args.dtype}")
        harness.write_section(harness.results_path(args), title, host, body)
        return
    count = 2 if args.quick else args.candidates

    runs = {}
    rows = [(method, "float32") for method in args.methods] + [("ties", "bfloat16")] * args.bf16
    for method, dtype in rows:
        config = real_config(zoo, args.work / f"{method}-{dtype}.yaml", method, dtype, args.limit)
        runs[method, dtype] = measure(config, count)
        r = runs[method, dtype]
        print(f"{method} {dtype}: start {r['load']:.1f} s, warm-up {r['warm_up']:.1f} s, prepared store "
              f"{r['store_mb']:.0f} MB, peak RSS {r['rss']:.2f} GB",
              flush=True)

    def median(key, phase):
        return statistics.median(row[phase] for row in runs[key]["rows"])

    linear_merge = median(("linear", "float32"), "merge")
    table, verdicts = [], []
    for key, r in runs.items():
        phases = {p: median(key, p) for p in PHASES}
        total = statistics.median(row["total"] for row in r["rows"])
        outside = 1 - phases["forward"] / sum(phases.values())
        first = r["rows"][0]["total"] / total
        merge_ratio = phases["merge"] / linear_merge
        scratch = statistics.median(r["scratch"]) if r["scratch"] else None
        table.append([f"{key[0]} ({key[1]})", *(f"{phases[p]:.2f}" for p in PHASES), f"{total:.2f}",
                      f"**{outside:.1%}**", f"{merge_ratio:.2f}x" + (f" (no store: {scratch / linear_merge:.1f}x)"
                                                                   if scratch else ""),
                      f"{r['warm_up']:.1f}", f"{r['store_mb']:.0f}", f"{first:.2f}x",
                      f"{statistics.mean(r['qualities']):.3f}"])
        verdicts.append(f"{key[0]} {key[1]}: outside forward {outside:.1%} (goal < 15%: "
                        f"{harness.verdict(outside, OVERHEAD_GOAL, higher_is_better=False)}), merge "
                        f"{merge_ratio:.2f}x linear's (goal <= 2x: "
                        f"{harness.verdict(merge_ratio, MERGE_GOAL, higher_is_better=False)}), first candidate "
                        f"{first:.2f}x the median (goal <= 1.5x: "
                        f"{harness.verdict(first, FIRST_GOAL, higher_is_better=False)})")
    for line in verdicts:
        print(line)
    rss = max(r["rss"] for r in runs.values())
    size_gb = harness.folder_bytes(zoo / "base") / 1e9
    body = (f"The real zoo (`python -m evomerge.cli zoo --real`: SmolLM2-135M-Instruct, 134.5M parameters, "
            f"{size_gb:.2f} GB in float32, and 3 experts), `search_spaces/real.yaml` with the method (and dtype) "
            f"of the row, per-layer genes, 3 tasks x {args.limit} documents (chat prompts, generate_until), "
            f"batch {20}, one worker thread, median of {count} random candidates after the worker's warm-up. "
            f"On a shared machine (load average above) absolute seconds move with the load; ratios within a row "
            f"hold better. Merge = the merge into the "
            f"preallocated model (with the prepared store as a worker has it; 'no store': the same candidates' "
            f"merges computed from scratch); first = the first candidate after warm-up against the "
            f"median.\n\n"
            + harness.table(table, ["method", *PHASES, "total s", "outside forward (goal < 15%)",
                                    "merge vs linear (goal <= 2x)", "warm-up s", "store MB",
                                    "first / median (goal <= 1.5x)", "mean quality"])
            + "\n\n" + "\n".join(f"- {line}" for line in verdicts)
            + f"\n- peak RSS of this process (the runners one after another): {rss:.2f} GB "
              f"(S = {size_gb:.2f} GB, K = 3: (K + 2) S = {5 * size_gb:.2f} GB)")
    harness.write_section(harness.results_path(args), "On a real model", host, body)


if __name__ == "__main__":
    main()
