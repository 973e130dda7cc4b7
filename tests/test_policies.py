"""Policies (blend, prefix router, cascade) as lm-eval LMs over real tiny models.

Every check runs lm-eval's own ``evaluate`` (or the policy's LM methods) on the quick demo zoo,
on generation tasks over the demo data and on multiple-choice log-likelihood tasks written
here.  The quick zoo is barely trained, so scores alone say little: equality with a member is
checked on every logged response, not only on the metric.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
import yaml

from evomerge.zoo import eval_examples, write_eval_data

pytestmark = pytest.mark.slow

GEN_TASKS = ("pol_add", "pol_rev")
MC_TASKS = ("pol_mc", "pol_mc1")
LIMIT = 12
MAX_GEN = 8
MEMBERS = ("add", "rev", "sort")


# --- fixtures ---------------------------------------------------------------------------------

def _write_tasks(folder: Path) -> None:
    data = write_eval_data(folder / "data", n=40)
    for skill in ("add", "rev"):
        (folder / f"pol_{skill}.yaml").write_text(yaml.safe_dump({
            "task": f"pol_{skill}", "dataset_path": "json",
            "dataset_kwargs": {"data_files": {"test": str(data[skill])}}, "test_split": "test",
            "output_type": "generate_until", "doc_to_text": "{{prompt}}", "doc_to_target": "{{answer}}",
            "generation_kwargs": {"until": ["\n"], "max_gen_toks": MAX_GEN, "do_sample": False},
            "metric_list": [{"metric": "exact_match"}], "num_fewshot": 0}))
    # Multiple choice over sums: three multi-token choices (pol_mc) or three one-token choices
    # (pol_mc1: the first digit; choices of one question feed the model the same tokens).
    rows, rows1 = [], []
    for i, ex in enumerate(eval_examples("add", 30)):
        a = int(ex["answer"])
        choices = [str(a), str(a + 1), str(a - 10)]
        digits = [ex["answer"][0], str((int(ex["answer"][0]) + 1) % 10), str((int(ex["answer"][0]) + 5) % 10)]
        rot = i % 3
        rows.append({"prompt": ex["prompt"], "choices": choices[rot:] + choices[:rot], "label": (3 - rot) % 3})
        rows1.append({"prompt": ex["prompt"], "choices": digits[rot:] + digits[:rot], "label": (3 - rot) % 3})
    for name, content in (("pol_mc", rows), ("pol_mc1", rows1)):
        path = folder / "data" / f"{name}.jsonl"
        path.write_text("".join(json.dumps(r) + "\n" for r in content))
        (folder / f"{name}.yaml").write_text(yaml.safe_dump({
            "task": name, "dataset_path": "json", "dataset_kwargs": {"data_files": {"test": str(path)}},
            "test_split": "test", "output_type": "multiple_choice", "doc_to_text": "{{prompt}}",
            "doc_to_choice": "{{choices}}", "doc_to_target": "{{label}}", "target_delimiter": "",
            "metric_list": [{"metric": "acc"}], "num_fewshot": 0}))


@pytest.fixture(scope="module")
def env(zoo, tmp_path_factory):
    from lm_eval.tasks import TaskManager

    from evomerge.policies import Member

    folder = tmp_path_factory.mktemp("policy_tasks")
    _write_tasks(folder)
    manager = TaskManager(include_path=str(folder), include_defaults=False)
    torch.manual_seed(0)
    members = [Member.from_folder(zoo[name], name=name) for name in MEMBERS]
    env = {"gen": manager.load(list(GEN_TASKS)), "mc": manager.load(list(MC_TASKS)), "members": members}
    env["direct_gen"] = [run(m.lm, env["gen"]) for m in members]
    env["direct_mc"] = [run(m.lm, env["mc"]) for m in members]
    return env


def run(lm, tasks) -> dict:
    """lm-eval's evaluate, as evomerge.evaluate runs it, with the samples logged."""
    from lm_eval.evaluator import evaluate

    results = evaluate(lm=lm, task_dict=tasks, limit=LIMIT, bootstrap_iters=0, log_samples=True, verbosity="ERROR")
    out = {}
    for name, samples in results["samples"].items():
        metric = "exact_match,none" if name in GEN_TASKS else "acc,none"
        samples = sorted(samples, key=lambda s: s["doc_id"])
        out[name] = {"score": results["results"][name][metric],
                     "resps": [s["resps"] for s in samples],
                     "args": [s["arguments"] for s in samples]}
    return out


def same(a: dict, b: dict) -> bool:
    return all(a[t]["score"] == b[t]["score"] and a[t]["resps"] == b[t]["resps"] for t in a)


def gen_flops(member, result: dict) -> list[int]:
    """Hand count for every generation request, in task then doc order: prefill of the prompt (one
    token per character) + the answer's characters + the stop token, at most MAX_GEN tokens."""
    flops = []
    for task in GEN_TASKS:
        for args, resps in zip(result[task]["args"], result[task]["resps"]):
            prompt, text = args[0][0], resps[0][0]
            new = len(text) + 1 if len(text) < MAX_GEN else MAX_GEN
            flops.append(member.cost.generate_flops(len(prompt), new))
    return flops


def mc_flops(member, result: dict) -> int:
    """Hand count for the multiple-choice requests: one forward over context + continuation minus
    the last token per distinct input of a question."""
    total = 0
    for task in MC_TASKS:
        for args in result[task]["args"]:
            inputs = {(ctx + cont)[:-1] for ctx, cont in args}
            total += sum(member.cost.forward_flops(len(x)) for x in inputs)
    return total


def constant_scorer(folder: Path, name: str):
    """A real Llama of the zoo's shape that predicts the same distribution after any prefix:
    nearly all mass on <pad> (logit 60), so every prompt token has an NLL of about 60."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from evomerge.policies import Member

    model = AutoModelForCausalLM.from_pretrained(folder)
    with torch.no_grad():
        for layer in model.model.layers:  # every block adds nothing: the residual stays the embedding
            layer.self_attn.o_proj.weight.zero_()
            layer.mlp.down_proj.weight.zero_()
        model.model.embed_tokens.weight.zero_()
        model.model.embed_tokens.weight[:, 0] = 1.0  # every token embeds to e_0
        model.model.norm.weight.fill_(1.0)
        model.lm_head.weight.zero_()
        hidden = model.config.hidden_size
        model.lm_head.weight[0, 0] = 60.0 / math.sqrt(hidden)  # RMSNorm(e_0) = sqrt(hidden) e_0
    return Member.from_model(name, model.eval(), AutoTokenizer.from_pretrained(folder))


def test_a_member_answers_as_lm_evals_own_hflm_and_keeps_its_encodings(env) -> None:
    """The member's HFLM encodes each string once; its answers (generation and multiple choice,
    a first call and a second one from the kept encodings) are those of lm-eval's HFLM."""
    from lm_eval.models.huggingface import HFLM

    member = env["members"][0]
    plain = HFLM(pretrained=member.lm.model, tokenizer=member.lm.tokenizer, batch_size=16)
    for tasks, direct in (("gen", "direct_gen"), ("mc", "direct_mc")):
        expected = run(plain, env[tasks])
        assert same(run(member.lm, env[tasks]), expected) and same(env[direct][0], expected)
    ids = member.lm.tok_encode("abc")
    ids.append(-1)  # a caller changing its copy changes nothing kept
    assert member.lm.tok_encode("abc") == plain.tok_encode("abc")
    batch, mask = member.lm.tok_batch_encode(["ab", "abcd"], left_truncate_len=3)
    batch.fill_(-1)
    assert all(torch.equal(a, b) for a, b in zip(member.lm.tok_batch_encode(["ab", "abcd"], left_truncate_len=3),
                                                 plain.tok_batch_encode(["ab", "abcd"], left_truncate_len=3)))


# --- blend ------------------------------------------------------------------------------------

def test_blend_with_one_member_probability_one_is_that_member(env) -> None:
    from evomerge.policies import make_policy

    for i, member in enumerate(env["members"]):
        probs = [0.0] * len(env["members"])
        probs[i] = 1.0
        policy = make_policy("blend", env["members"], {"probs": probs}, seed=3)
        result = run(policy, env["gen"])
        assert same(result, env["direct_gen"][i])
        stats = policy.stats
        assert stats.requests == 2 * LIMIT and stats.served[i] == stats.requests
        assert stats.request_flops == gen_flops(member, env["direct_gen"][i])
        assert stats.flops == stats.member_flops[i] == sum(stats.request_flops) and stats.routing_flops == 0


def test_blend_draws_repeat_per_seed_and_follow_the_probabilities(env) -> None:
    from lm_eval.api.instance import Instance

    from evomerge.policies import Blend, make_policy
    from evomerge.policies.base import make_units

    requests = [Instance("generate_until", {}, (f"{a}+{b}=", {"until": ["\n"]}), 0, ("t", a * 100 + b, 1))
                for a in range(60) for b in range(50)]
    units = make_units(requests, "generate_until")
    probs = [0.2, 0.5, 0.3]
    draws = Blend(env["members"], probs, seed=7).route(units, "generate_until")[0]
    assert draws == Blend(env["members"], probs, seed=7).route(units, "generate_until")[0]
    assert draws != Blend(env["members"], probs, seed=8).route(units, "generate_until")[0]
    for m, p in enumerate(probs):
        assert abs(draws.count(m) / len(draws) - p) < 0.03
    # a request's draw does not depend on the rest of its batch
    reversed_draws = Blend(env["members"], probs, seed=7).route(make_units(requests[::-1], "generate_until"),
                                                                "generate_until")[0]
    assert reversed_draws[::-1] == draws
    # identical requests (lm-eval repeats) get independent draws
    twins = make_units([requests[0]] * 400, "generate_until")
    assert len(set(Blend(env["members"], probs, seed=7).route(twins, "generate_until")[0])) == 3
    # through lm-eval: same seed, same run
    runs = []
    for seed in (5, 5):
        policy = make_policy("blend", env["members"], {}, seed=seed)
        runs.append((run(policy, env["gen"]), policy.stats.request_member, policy.stats.flops))
    assert same(runs[0][0], runs[1][0]) and runs[0][1:] == runs[1][1:]
    assert len(set(runs[0][1])) > 1


def test_blend_sends_all_choices_of_a_question_to_one_member(env) -> None:
    from lm_eval.api.instance import Instance

    from evomerge.policies import make_policy

    requests = []
    for doc in range(40):
        prompt = eval_examples("add", 40)[doc]["prompt"]
        for j, choice in enumerate(("1", "23", "45")):
            requests.append(Instance("loglikelihood", {}, (prompt, choice), j, ("pol_mc", doc, 1)))
    policy = make_policy("blend", env["members"], {}, seed=1)
    results = policy.loglikelihood(requests)
    by_doc = {}
    for inst, m in zip(requests, policy.stats.request_member):
        by_doc.setdefault(inst.doc_id, set()).add(m)
    assert all(len(ms) == 1 for ms in by_doc.values())
    assert len({next(iter(ms)) for ms in by_doc.values()}) == 3
    for m, member in enumerate(env["members"]):
        mine = [k for k, s in enumerate(policy.stats.request_member) if s == m]
        direct = member.lm.loglikelihood([requests[k] for k in mine])
        for k, d in zip(mine, direct):
            assert results[k][1] == d[1] and results[k][0] == pytest.approx(d[0], rel=1e-5, abs=1e-5)


# --- prefix router ----------------------------------------------------------------------------

def test_router_forced_by_its_scorers_is_exactly_that_member(env, zoo) -> None:
    from evomerge.policies import make_policy

    k = 4
    losers = [constant_scorer(zoo["base"], f"constant{j}") for j in range(len(env["members"]))]
    for i, member in enumerate(env["members"]):
        scorers = [member if j == i else losers[j] for j in range(len(env["members"]))]
        policy = make_policy("prefix_router", env["members"], {"k": k}, scorers=scorers)
        result = run(policy, env["gen"])
        assert same(result, env["direct_gen"][i])
        stats = policy.stats
        assert stats.served[i] == stats.requests == 2 * LIMIT
        prompts = [args[0][0] for t in GEN_TASKS for args in result[t]["args"]]
        routing = sum(s.cost.forward_flops(min(k, len(p))) for p in prompts for s in scorers)
        assert stats.routing_flops == routing
        assert stats.flops == routing + sum(gen_flops(member, env["direct_gen"][i]))


def test_router_with_k_zero_is_its_first_member_and_costs_no_scoring(env) -> None:
    from evomerge.policies import make_policy

    policy = make_policy("prefix_router", env["members"], {"k": 0})
    result = run(policy, env["gen"])
    assert same(result, env["direct_gen"][0])
    stats = policy.stats
    assert stats.served[0] == stats.requests == 2 * LIMIT and stats.routing_flops == 0
    assert stats.flops == sum(gen_flops(env["members"][0], env["direct_gen"][0]))


def test_router_picks_the_lowest_prefix_nll(env) -> None:
    from lm_eval.api.instance import Instance

    from evomerge.policies import PrefixRouter
    from evomerge.policies.metering import serve

    k = 5
    members = env["members"]
    prompts = [ex["prompt"] for s in ("add", "rev", "sort") for ex in eval_examples(s, 10)]
    requests = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": MAX_GEN, "do_sample": False}),
                         0, ("g", i, 1)) for i, p in enumerate(prompts)]
    router = PrefixRouter(members, k)
    out = router.generate_until(requests)
    # each member's mean NLL of the first k prompt tokens, from its own HFLM (empty context:
    # lm-eval conditions on the prefix token, as the router does)
    nll = []
    for m in members:
        answers = m.lm.loglikelihood([Instance("loglikelihood", {}, ("", p[:k]), 0) for p in prompts])
        nll.append([-lp / min(k, len(p)) for (lp, _), p in zip(answers, prompts)])
    expected = [min(range(len(members)), key=lambda m: (nll[m][r], m)) for r in range(len(prompts))]
    assert router.stats.request_member == expected and len(set(expected)) > 1
    direct = [serve(m, requests, "generate_until") for m in members]
    assert out == [direct[m].results[r] for r, m in enumerate(expected)]
    scoring = [sum(m.cost.forward_flops(min(k, len(p))) for m in members) for p in prompts]
    assert router.stats.routing_flops == sum(scoring)
    assert router.stats.request_flops == [direct[m].flops[r] + scoring[r] for r, m in enumerate(expected)]


def test_router_models_keep_prefix_scores_within_a_bound(env, monkeypatch) -> None:
    """Router models keep their NLL of each scored prefix (their weights never change); past KEPT_MAX
    prefixes the kept scores start again. Scores always equal scoring afresh; FLOPs are charged anyway."""
    from evomerge.policies import PrefixRouter
    from evomerge.policies import router as router_module

    members = env["members"]
    for member in members:
        member.kept_nll.clear()
    prompts = [ex["prompt"] for s in ("add", "rev") for ex in eval_examples(s, 6)]
    afresh = PrefixRouter(members, 5).scores(prompts)  # members scoring themselves keep nothing
    assert not any(member.kept_nll for member in members)
    monkeypatch.setattr(router_module, "KEPT_MAX", 8)
    keeping = PrefixRouter(members, 5, scorers=members)
    nll, flops = keeping.scores(prompts[:6])
    assert (nll, flops) == ([row[:6] for row in afresh[0]], afresh[1][:6])
    assert all(0 < len(member.kept_nll) <= 8 for member in members)
    assert keeping.scores(prompts) == afresh  # 6 kept + 12 over the bound: started again, same scores
    assert keeping.scores(prompts) == afresh  # all 12 kept now
    for member in members:
        member.kept_nll.clear()


# --- cascade ----------------------------------------------------------------------------------

def test_cascade_generation_minus_inf_never_escalates_plus_inf_always_does(env) -> None:
    from evomerge.policies import make_policy

    members = env["members"]
    never = make_policy("cascade", members, {"thresholds": [-math.inf] * 2})
    assert same(run(never, env["gen"]), env["direct_gen"][0])
    hand0 = gen_flops(members[0], env["direct_gen"][0])
    assert never.stats.served == [2 * LIMIT, 0, 0] and never.stats.consulted == [2 * LIMIT, 0, 0]
    assert never.stats.request_flops == hand0 and never.stats.flops == sum(hand0)

    always = make_policy("cascade", members, {"thresholds": [math.inf] * 2})
    assert same(run(always, env["gen"]), env["direct_gen"][2])
    hands = [gen_flops(m, d) for m, d in zip(members, env["direct_gen"])]
    assert always.stats.served == [0, 0, 2 * LIMIT] and always.stats.consulted == [2 * LIMIT] * 3
    assert always.stats.request_flops == [sum(h) for h in zip(*hands)]
    assert always.stats.member_flops == [sum(h) for h in hands]


def test_cascade_generation_escalates_exactly_the_unconfident(env) -> None:
    from lm_eval.api.instance import Instance

    from evomerge.policies import make_policy
    from evomerge.policies.metering import serve

    members = env["members"][:2]
    prompts = [ex["prompt"] for s in ("add", "rev") for ex in eval_examples(s, 20)]
    requests = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": MAX_GEN, "do_sample": False}),
                         0, ("g", i, 1)) for i, p in enumerate(prompts)]
    first = serve(members[0], requests, "generate_until")
    threshold = sorted(first.confidence)[len(prompts) // 2]
    assert all(-30 < c < 0 for c in first.confidence)
    # the confidence is the mean log-prob of the answer and its stop token, as scored afresh
    scored = members[0].lm.loglikelihood([Instance("loglikelihood", {}, (p, t + "\n"), 0)
                                          for p, t in zip(prompts, first.results)])
    for (lp, _), text, c in zip(scored, first.results, first.confidence):
        if len(text) < MAX_GEN:
            assert c == pytest.approx(lp / (len(text) + 1), abs=1e-4)
    policy = make_policy("cascade", members, {"thresholds": [threshold]})
    out = policy.generate_until(requests)
    second = serve(members[1], requests, "generate_until")
    escalated = [c < threshold for c in first.confidence]
    assert policy.stats.request_member == [int(e) for e in escalated]
    assert out == [s if e else f for f, s, e in zip(first.results, second.results, escalated)]
    assert policy.stats.request_flops == [f + (s if e else 0) for f, s, e in
                                          zip(first.flops, second.flops, escalated)]
    assert 0 < sum(escalated) < len(prompts)


def test_cascade_multiple_choice_margin(env) -> None:
    from evomerge.policies import make_policy

    members = env["members"]
    never = make_policy("cascade", members, {"thresholds": [-math.inf, -math.inf]})
    assert same(run(never, env["mc"]), env["direct_mc"][0])
    assert never.stats.flops == mc_flops(members[0], env["direct_mc"][0])
    always = make_policy("cascade", members, {"thresholds": [math.inf, math.inf]})
    assert same(run(always, env["mc"]), env["direct_mc"][2])
    assert always.stats.flops == sum(mc_flops(m, d) for m, d in zip(members, env["direct_mc"]))
    # thresholds per request type: none given for loglikelihood, so it never escalates
    typed = make_policy("cascade", members, {"thresholds": {"generate_until": [math.inf] * 2}})
    assert same(run(typed, env["mc"]), env["direct_mc"][0]) and typed.stats.served[0] == typed.stats.requests
    # one forward per question for one-token choices: a third of the naive count
    naive = sum(members[0].cost.loglikelihood_flops(len(c), len(x))
                for args in env["direct_mc"][0]["pol_mc1"]["args"] for c, x in args)
    shared = sum(members[0].cost.forward_flops(len(args[0][0]))
                 for args in env["direct_mc"][0]["pol_mc1"]["args"])
    assert 3 * shared == naive

    # a finite threshold escalates the questions whose top-2 margin under member 0 is below it
    direct0, direct1 = env["direct_mc"][0], env["direct_mc"][1]
    margins = {t: [_margin(r) for r in direct0[t]["resps"]] for t in MC_TASKS}
    threshold = sorted(m for t in MC_TASKS for m in margins[t])[LIMIT]
    policy = make_policy("cascade", members[:2], {"thresholds": [threshold]})
    result = run(policy, env["mc"])
    escalated = 0
    for t in MC_TASKS:
        for d, margin in enumerate(margins[t]):
            expect = direct1[t]["resps"][d] if margin < threshold else direct0[t]["resps"][d]
            got = result[t]["resps"][d]
            assert [g[0][1] for g in got] == [e[0][1] for e in expect]
            assert [g[0][0] for g in got] == pytest.approx([e[0][0] for e in expect], rel=1e-5, abs=1e-5)
            escalated += margin < threshold
    assert policy.stats.served == [2 * LIMIT * 3 - 3 * escalated, 3 * escalated]
    assert 0 < escalated < 2 * LIMIT


def _margin(resps) -> float:
    best, second = sorted((r[0][0] for r in resps), reverse=True)[:2]
    return best - second


def test_policy_stats_reset_and_rolling(env) -> None:
    from lm_eval.api.instance import Instance

    from evomerge.policies import make_policy

    texts = ["57+38=95", "rev abcd=dcba"]
    requests = [Instance("loglikelihood_rolling", {}, (t,), 0, ("r", i, 1)) for i, t in enumerate(texts)]
    blend = make_policy("blend", env["members"], {"probs": [0, 0, 1]})
    assert blend.loglikelihood_rolling(requests) == pytest.approx(env["members"][2].lm.loglikelihood_rolling(requests))
    # one window each (prefix token + the text, shorter than the model): forward over len(text) tokens
    assert blend.stats.flops == sum(env["members"][2].cost.forward_flops(len(t)) for t in texts)
    blend.stats.reset()
    assert blend.stats.requests == 0 and blend.stats.served == [0, 0, 0] and blend.stats.flops == 0
    cascade = make_policy("cascade", env["members"], {"thresholds": [0.0, 0.0]})
    with pytest.raises(NotImplementedError, match="loglikelihood_rolling"):
        cascade.loglikelihood_rolling(requests)
    with pytest.raises(ValueError, match="thresholds"):
        make_policy("cascade", env["members"], {"thresholds": [0.0]})
    with pytest.raises(ValueError, match="probabilities"):
        make_policy("blend", env["members"], {"probs": [0, 0, 0]})
    with pytest.raises(ValueError, match="unknown"):
        make_policy("prefix_router", env["members"], {"k": 2, "temperature": 1})


# --- file format ------------------------------------------------------------------------------

def test_save_load_generate(env, zoo, tmp_path) -> None:
    from lm_eval.api.instance import Instance

    from evomerge.policies import load, save_policy

    prompts = [ex["prompt"] for ex in eval_examples("rev", 6)]
    requests = [Instance("generate_until", {}, (p, {"until": ["\n"], "max_gen_toks": MAX_GEN, "do_sample": False}),
                         0, ("g", i, 1)) for i, p in enumerate(prompts)]
    expected = env["members"][1].lm.generate_until(requests)

    path = save_policy(tmp_path / "p" / "policy.json", "cascade", {"thresholds": [math.inf]},
                       [zoo["add"], zoo["rev"]])
    assert json.loads(path.read_text())["params"] == {"thresholds": ["inf"]}
    server = load(path)
    assert server.kind == "cascade" and server.params == {"thresholds": [math.inf]}
    answers = server.generate(prompts, max_new_tokens=MAX_GEN, until="\n")
    assert answers == expected
    assert answers.stats["served"] == [0, len(prompts)]  # this call's statistics, returned with it

    path = save_policy(tmp_path / "blend.json", "blend", {"probs": [0, 1]}, [zoo["add"], zoo["rev"]], seed=4)
    assert load(path).generate(prompts, max_new_tokens=MAX_GEN) == expected
