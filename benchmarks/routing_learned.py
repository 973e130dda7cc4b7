"""Which router, trained by the run itself, routes the demo's prompts best (issue 14).

Usage: python benchmarks/routing_learned.py ZOO [--labels RUN/router_training/labels.jsonl] [--limit N]

On a demo zoo (its `scorers` router models are NOT used), for the three experts (a search's own
training labels are reused with --labels; the fitness documents are the first --limit of each task):
1. labels: each member's exact match per document, on the router-training documents (each task's
   `train` split, `evomerge.router_data.member_labels`) and on the fitness documents (the first
   `eval.limit` of each task's test split);
2. routers, trained on the training labels only, judged on the fitness documents: routing accuracy
   (the chosen member is right, over documents some member gets right), the quality of the routed
   answers (mean over tasks), and the router's FLOPs per example against one model's:
   - classifier on hashed character n-grams of the prompt (the policy `classifier`);
   - classifier on the base model's last hidden state, mean-pooled over the prompt (one base forward
     over the prompt, counted);
   - self-scoring prefix router (each member's mean NLL of the whole prompt, SmallTalk's rule with
     each member as its own router): raw, and relative to the base (NLL_member - NLL_base);
   - router LMs the run trains itself (`prefix_router` with `policy.scorers: learned`,
     evomerge/router_lms.py, SmallTalk LM): one small LM per expert on the prompts it serves best,
     scored on the first k = 1 and 2 prompt tokens; with ties shared and not (`member_prompts(ties=)`);
     and over merged + experts (the merged member's router LM trained on every prompt: its share is
     reported, its answers count as wrong here since the merge changes with every candidate);
   - the oracle (each document served by a member that gets it right) and each task served by its
     best source (the issue's "oracle": 0.88 on the demo).
3. cost, side by side in this process: each router's FLOPs per request against one model's, its
   seconds to route the fitness prompts (first call; the classifier keeps its predictions, so also a
   second call), and its share of one routed candidate's evaluation (an `Evaluator` scoring the
   fitness documents through the policy over the experts, the merged member being the base; 3
   alternating repeats, medians), plus each router's training seconds.
Writes the numbers as JSON and prints Markdown tables.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from evomerge.config import load_config  # noqa: E402
from evomerge.policies.classifier import TrainedRouter, train_router  # noqa: E402
from evomerge.router_data import labelled_members, member_labels  # noqa: E402

MEMBERS = ["expert:0", "expert:1", "expert:2"]


def fitness_labels(config) -> list[dict]:
    """member_labels on the fitness documents (the first eval.limit of each task's test split)."""
    from evomerge.evaluate import task_manager, task_spec

    manager = task_manager(config.eval)
    tasks = manager.load([task_spec(manager, t.name) for t in config.eval.tasks])
    return member_labels(config, tasks, limit=config.eval.limit)


def base_hidden(config, texts: list[str]) -> tuple[torch.Tensor, list[int]]:
    from evomerge.models.sources import load_model, load_tokenizer

    model = load_model(config.models.base, config.models, torch.device("cpu"))
    tok = load_tokenizer(config.models.base, config.models)
    rows, lengths = [], []
    with torch.inference_mode():
        for text in texts:
            ids = tok(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
            out = model(ids, output_hidden_states=True)
            rows.append(out.hidden_states[-1][0].mean(dim=0))
            lengths.append(ids.shape[1])
    return torch.stack(rows), lengths


def prompt_nll(config, name: str, texts: list[str]) -> list[float]:
    from evomerge.models.sources import load_model, load_tokenizer

    path = config.models.by_member_name[name]
    model = load_model(path, config.models, torch.device("cpu"))
    tok = load_tokenizer(path, config.models)
    out = []
    with torch.inference_mode():
        for text in texts:
            ids = tok(text, return_tensors="pt", add_special_tokens=True)["input_ids"]
            logits = model(ids).logits[0, :-1]
            out.append(float(torch.nn.functional.cross_entropy(logits, ids[0, 1:])))
    return out


def fit_linear(x: torch.Tensor, y: torch.Tensor, steps: int = 300) -> torch.nn.Linear:
    layer = torch.nn.Linear(x.shape[1], y.shape[1])
    torch.nn.init.zeros_(layer.weight)
    torch.nn.init.zeros_(layer.bias)
    mean, std = x.mean(0), x.std(0) + 1e-6
    opt = torch.optim.Adam(layer.parameters(), lr=0.05)
    for _ in range(steps):
        opt.zero_grad()
        loss = torch.nn.functional.binary_cross_entropy_with_logits(layer((x - mean) / std), y)
        loss.backward()
        opt.step()
    layer.mean, layer.std = mean, std
    return layer


def judge(choice: list[int], rows: list[dict], tasks: list[str]) -> dict:
    right = [row["labels"][c] for c, row in zip(choice, rows)]
    answerable = [r for r, row in zip(right, rows) if max(row["labels"]) > 0]
    per_task = {t: sum(r for r, row in zip(right, rows) if row["task"] == t) /
                max(1, sum(row["task"] == t for row in rows)) for t in tasks}
    return {"routing_accuracy": round(sum(answerable) / max(1, len(answerable)), 4),
            "quality": round(sum(per_task.values()) / len(per_task), 4),
            "per_task": {t: round(v, 4) for t, v in per_task.items()},
            "share": [round(choice.count(m) / len(choice), 3) for m in range(len(MEMBERS))]}


def side_by_side(config, base, tok, router, scorers, texts: list[str], one_model: float, repeats: int = 3) -> dict:
    """Each router's own cost per request and its share of a routed candidate's evaluation, measured
    alternately in this process: the classifier and the router LMs (k = 1) over merged + experts."""
    import statistics

    from evomerge.evaluate import Evaluator
    from evomerge.models.sources import load_model
    from evomerge.policies import ClassifierRouter, PrefixRouter

    experts = {name: load_model(config.models.by_member_name[name], config.models, torch.device("cpu"))
               for name in MEMBERS}
    evaluator = Evaluator(config.eval, base, tok, experts, seed=config.seed,
                          scorers=[(s.lm.model, tok) for s in scorers], router=router)
    members = ["merged", *MEMBERS]
    policies = {"classifier": {"kind": "classifier", "members": members,
                               "params": {"outputs": [-1, 0, 1, 2], "threshold": 0.05, "cost_weight": 0.0}},
                "router LMs (k = 1)": {"kind": "prefix_router", "members": members, "params": {"k": 1}}}
    rows: dict[str, dict[str, list[float]]] = {name: {"route": [], "route_again": [], "candidate": []}
                                               for name in policies}
    for _ in range(repeats):
        for name, spec in policies.items():
            if name == "classifier":  # a fresh router: no prediction kept from an earlier call
                fresh = type(router)(router.members, router.weight, router.bias, router.ngrams)
                route = ClassifierRouter([evaluator.members[m] for m in members], fresh,
                                         **spec["params"]).member_scores
            else:
                route = PrefixRouter([evaluator.members[m] for m in members], 1, evaluator.scorers).scores
                for scorer in evaluator.scorers:  # nothing kept from an earlier call
                    scorer.kept_nll.clear()
            for key in ("route", "route_again"):  # the first call, then one with what it kept
                t0 = time.perf_counter()
                route(texts)
                rows[name][key].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            with torch.inference_mode():
                evaluator(spec)
            rows[name]["candidate"].append(time.perf_counter() - t0)
    out = {}
    for name, r in rows.items():
        route, again, cand = (statistics.median(r[key]) for key in ("route", "route_again", "candidate"))
        flops = (router.flops_per_prompt if name == "classifier"
                 else sum(s.cost.forward_flops(1) for s in evaluator.scorers))
        out[name] = {"router_flops_per_request": flops, "router_flops_share_of_one_model": flops / one_model,
                     "route_seconds_first_call": round(route, 4), "route_seconds_later_call": round(again, 4),
                     "candidate_seconds": round(cand, 3), "route_share_of_candidate": round(route / cand, 4),
                     "route_share_of_candidate_later_calls": round(again / cand, 4), "prompts": len(texts),
                     "repeats": repeats}
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("zoo")
    parser.add_argument("--out", default=str(REPO / "benchmarks" / "routing_learned.json"))
    parser.add_argument("--labels", help="a run's router_training/labels.jsonl (same members): reused, not computed")
    parser.add_argument("--limit", type=int, default=100, help="fitness documents per task")
    parser.add_argument("--fitness-labels", help="a JSONL file of the fitness documents' labels: read if it exists, "
                                                 "else computed and written there")
    args = parser.parse_args()
    zoo = Path(args.zoo).resolve()
    config = load_config(REPO / "search_spaces" / "demo_route_learned.yaml", [
        f"models.base={zoo / 'base'}", f"models.experts={[str(zoo / s) for s in ('add', 'rev', 'sort')]}",
        f"policy.members={MEMBERS}", f"eval.limit={args.limit}"])
    assert labelled_members(config) == MEMBERS
    tasks = [t.name for t in config.eval.tasks]
    t0 = time.perf_counter()
    train = ([json.loads(line) for line in Path(args.labels).read_text().splitlines() if line]
             if args.labels else member_labels(config))
    t_labels = time.perf_counter() - t0
    saved = Path(args.fitness_labels) if args.fitness_labels else None
    if saved is not None and saved.is_file():
        test = [json.loads(line) for line in saved.read_text().splitlines() if line]
    else:
        test = fitness_labels(config)
        if saved is not None:
            saved.write_text("".join(json.dumps(row) + "\n" for row in test))
    ytrain = torch.tensor([row["labels"] for row in train])
    train_texts, test_texts = [r["prompt"] for r in train], [r["prompt"] for r in test]

    # one model's FLOPs per example on the fitness documents (the base answering; all members have its size)
    from evomerge.flops import CostModel
    from evomerge.models.sources import load_model, load_tokenizer

    base = load_model(config.models.base, config.models, torch.device("cpu"))
    tok = load_tokenizer(config.models.base, config.models)
    cost = CostModel.from_model(base)
    prompt_lengths = [len(tok(t)["input_ids"]) for t in test_texts]
    # answers: up to max_gen_toks (8) tokens; the demo's answers are 1-4 characters + newline: 4 on average
    one_model = sum(cost.generate_flops(n, 4) for n in prompt_lengths) / len(test)

    results: dict = {"documents": {"train": len(train), "fitness": len(test)}, "labels_seconds": round(t_labels, 1),
                     "one_model_flops_per_example_approx": one_model, "routers": {}}
    oracle_choice = [max(range(len(MEMBERS)), key=lambda m: (row["labels"][m], -m)) for row in test]
    results["routers"]["oracle (per document)"] = {**judge(oracle_choice, test, tasks), "router_flops_ratio": 0.0}
    best_per_task = {t: max(range(len(MEMBERS)), key=lambda m: sum(r["labels"][m] for r in test if r["task"] == t))
                     for t in tasks}
    results["routers"]["each task by its best source"] = {
        **judge([best_per_task[r["task"]] for r in test], test, tasks), "router_flops_ratio": 0.0}
    for m, name in enumerate(MEMBERS):
        results["routers"][f"{name} alone"] = {**judge([m] * len(test), test, tasks), "router_flops_ratio": 0.0}

    t0 = time.perf_counter()
    router = train_router(train_texts, ytrain, MEMBERS)
    t_train = time.perf_counter() - t0
    t0 = time.perf_counter()
    choice = router.predict(test_texts).argmax(1).tolist()
    t_pred = (time.perf_counter() - t0) / len(test)
    results["routers"]["classifier, char n-grams"] = {
        **judge(choice, test, tasks), "router_flops_ratio": router.flops_per_prompt / one_model,
        "train_seconds": round(t_train, 2), "seconds_per_prompt": t_pred}
    assert isinstance(router, TrainedRouter)

    htrain, _ = base_hidden(config, train_texts)
    htest, lengths = base_hidden(config, test_texts)
    layer = fit_linear(htrain, ytrain)
    with torch.no_grad():
        choice = layer((htest - layer.mean) / layer.std).argmax(1).tolist()
    hidden_flops = sum(cost.forward_flops(n) for n in lengths) / len(test) + 2 * layer.weight.numel()
    results["routers"]["classifier, base hidden state"] = {**judge(choice, test, tasks),
                                                          "router_flops_ratio": hidden_flops / one_model}

    nll = {name: prompt_nll(config, name, test_texts) for name in MEMBERS}
    scoring_flops = len(MEMBERS) * sum(cost.forward_flops(n) for n in lengths) / len(test)
    raw = [min(range(len(MEMBERS)), key=lambda m: nll[MEMBERS[m]][i]) for i in range(len(test))]
    results["routers"]["self-scoring, raw NLL"] = {**judge(raw, test, tasks),
                                                  "router_flops_ratio": scoring_flops / one_model}
    nll["base"] = prompt_nll(config, "base", test_texts)
    relative = [min(range(len(MEMBERS)), key=lambda m: nll[MEMBERS[m]][i] - nll["base"][i])
                for i in range(len(test))]
    results["routers"]["self-scoring, NLL relative to base"] = {
        **judge(relative, test, tasks), "router_flops_ratio": scoring_flops * (len(MEMBERS) + 1) / len(MEMBERS)
        / one_model}
    # the same features with labels of half the training documents: how much data the n-gram router needs
    half = train_router(train_texts[::2], ytrain[::2], MEMBERS)
    results["routers"]["classifier, char n-grams, half the documents"] = {
        **judge(half.predict(test_texts).argmax(1).tolist(), test, tasks),
        "router_flops_ratio": half.flops_per_prompt / one_model}

    # router LMs (SmallTalk-style), trained as a run trains them, judged like the classifier
    from evomerge.policies import Member, PrefixRouter
    from evomerge.router_lms import member_prompts, train_router_lm

    base_config = __import__("transformers").AutoConfig.from_pretrained(config.models.base)
    router_lms: dict[str, list] = {}
    for ties in ("none", "all"):
        for members in (MEMBERS, ["merged", *MEMBERS]):
            t0 = time.perf_counter()
            prompts = member_prompts(train, members, MEMBERS, ties=ties)
            models = [train_router_lm(base_config, tok, p, tokens=2, seed=config.seed * 1009 + i)[0]
                      for i, p in enumerate(prompts)]
            t_lm = time.perf_counter() - t0
            scorers = [Member.from_model(f"scorer:{i}", m, tok, batch_size=config.eval.batch_size)
                       for i, m in enumerate(models)]
            router_lms[f"{ties}/{len(members)}"] = scorers
            for k in (1, 2):
                policy = PrefixRouter(scorers, k, scorers)
                t0 = time.perf_counter()
                nll, flops = policy.scores(test_texts)
                t_route = time.perf_counter() - t0
                pick = [min(range(len(members)), key=lambda m: (nll[m][t], m)) for t in range(len(test))]
                offset = len(members) - len(MEMBERS)  # merged first: its choices count as wrong here
                merged_share = sum(c < offset for c in pick) / len(pick)
                judged = judge([c - offset if c >= offset else -1 for c in pick], test, tasks)
                name = (f"router LMs, k = {k}, ties {'shared' if ties == 'all' else 'train nobody'}"
                        + (", merged + experts" if offset else ""))
                results["routers"][name] = {**judged, "merged_share": round(merged_share, 3),
                                            "router_flops_ratio": sum(flops) / len(flops) / one_model,
                                            "train_seconds": round(t_lm, 2), "seconds_per_prompt": t_route / len(test)}
    results["cost"] = side_by_side(config, base, tok, router, router_lms["none/4"], test_texts, one_model)

    Path(args.out).write_text(json.dumps(results, indent=1) + "\n")
    print(f"train documents {len(train)}, fitness documents {len(test)}; labels took {t_labels:.1f} s")
    print("| router | routing accuracy | quality | router FLOPs / one model's | shares (add, rev, sort experts) |")
    print("|---|---|---|---|---|")
    for name, r in results["routers"].items():
        print(f"| {name} | {r['routing_accuracy']:.3f} | {r['quality']:.3f} | {r['router_flops_ratio']:.4f} | "
              f"{r['share']}{', merged ' + str(r['merged_share']) if 'merged_share' in r else ''} |")
    print("\n| router | FLOPs per request | / one model's | route 300 prompts, first call (s) | later call (s) | "
          "candidate (s) | share of the candidate, first / later |")
    print("|---|---|---|---|---|---|---|")
    for name, c in results["cost"].items():
        print(f"| {name} | {c['router_flops_per_request']:,} | {c['router_flops_share_of_one_model']:.4f} | "
              f"{c['route_seconds_first_call']} | {c['route_seconds_later_call']} | {c['candidate_seconds']} | "
              f"{c['route_share_of_candidate']:.3f} / {c['route_share_of_candidate_later_calls']:.4f} |")


if __name__ == "__main__":
    main()
