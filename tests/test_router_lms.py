"""Router LMs the run trains itself for `prefix_router` (`policy.scorers: learned`, issue 14, after
SmallTalk LM): which prompts each member's router LM learns from, the small model of the base's own
architecture, routing held-out prompts to their skill's expert, and a search on real Ray workers whose
export, loaded back, decides as the search did."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from evomerge.config import load_config
from evomerge.router_lms import member_prompts, router_lm_config, train_router_lm
from evomerge.zoo import SKILLS, eval_examples, router_train_examples

from conftest import write_config

MEMBERS = ["merged", "expert:0", "expert:1", "expert:2"]


def test_each_member_learns_the_prompts_it_serves_best() -> None:
    rows = [{"prompt": "a", "labels": [1.0, 0.0, 0.0]}, {"prompt": "b", "labels": [0.0, 1.0, 1.0]},
            {"prompt": "c", "labels": [0.0, 0.0, 0.0]}, {"prompt": "d", "labels": [0.5, 0.0, 0.25]}]
    prompts = member_prompts(rows, MEMBERS, ["expert:0", "expert:1", "expert:2"])
    # merged: every prompt (a generalist); a prompt trains the one member that serves it best: not one
    # on which members tie ("b"), nor one nobody answers ("c")
    assert prompts == [["a", "b", "c", "d"], ["a", "d"], [], []]
    assert member_prompts(rows, MEMBERS, MEMBERS[1:], ties="all") == [["a", "b", "c", "d"], ["a", "d"], ["b"], ["b"]]


@pytest.mark.parametrize("family", ["llama", "qwen2", "gpt2"])
def test_router_lm_is_a_small_model_of_the_base_architecture(family) -> None:
    from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig, Qwen2Config

    base = {"llama": LlamaConfig(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2),
            "qwen2": Qwen2Config(vocab_size=300, hidden_size=256, intermediate_size=512, num_hidden_layers=4,
                                 num_attention_heads=4, num_key_value_heads=2),
            "gpt2": GPT2Config(vocab_size=300, n_embd=256, n_layer=4, n_head=4)}[family]
    small = router_lm_config(base)
    assert type(small) is type(base) and small.vocab_size == base.vocab_size
    assert (small.num_hidden_layers, small.hidden_size) == (1, 64)
    model = AutoModelForCausalLM.from_config(small)
    assert model.num_parameters() < AutoModelForCausalLM.from_config(base).num_parameters() / 4
    assert model(torch.tensor([[1, 2, 3]])).logits.shape == (1, 3, 300)


def _router_lms(zoo: dict[str, Path], steps: int = 80):
    """One router LM per member trained as the run trains them, on one-hot labels: each skill's
    expert right on its own skill's router-training prompts."""
    from transformers import AutoConfig, AutoTokenizer

    rows = [{"prompt": ex["prompt"], "labels": [float(i == s) for i in range(len(SKILLS))]}
            for s, skill in enumerate(SKILLS) for ex in router_train_examples(skill, 60)]
    config, tok = AutoConfig.from_pretrained(zoo["base"]), AutoTokenizer.from_pretrained(zoo["base"])
    prompts = member_prompts(rows, MEMBERS, MEMBERS[1:])
    return [train_router_lm(config, tok, p, tokens=2, seed=i, steps=steps)[0] for i, p in enumerate(prompts)], tok


def test_router_lms_route_held_out_prompts_to_their_skills_expert(zoo) -> None:
    from evomerge.policies import Member, PrefixRouter

    router_lms, tok = _router_lms(zoo)
    again, _ = _router_lms(zoo)
    for a, b in zip(router_lms, again):  # the same labels and seed: the same router LMs
        assert all(torch.equal(x, y) for x, y in zip(a.state_dict().values(), b.state_dict().values()))
    scorers = [Member.from_model(f"scorer:{i}", m, tok, batch_size=16) for i, m in enumerate(router_lms)]
    router = PrefixRouter(scorers, k=1, scorers=scorers)  # the members only matter for their count here
    held_out = [(s + 1, ex["prompt"]) for s, skill in enumerate(SKILLS) for ex in eval_examples(skill, 10)]
    nll, flops = router.scores([text for _, text in held_out])
    chosen = [min(range(len(MEMBERS)), key=lambda m: (nll[m][t], m)) for t in range(len(held_out))]
    assert chosen == [expert for expert, _ in held_out]
    # every prompt was scored by every router LM on its first token, and that is counted
    assert flops == [sum(s.cost.forward_flops(1) for s in scorers)] * len(held_out)


def test_learned_scorers_are_a_prefix_router_option(tmp_path, zoo) -> None:
    from evomerge.errors import ConfigError

    config = load_config(write_config(tmp_path / "a", zoo, policy={"kind": "prefix_router", "members": MEMBERS,
                                                                 "scorers": "learned"}))
    assert config.policy.learns_scorers and config.policy.trains_router
    with pytest.raises(ConfigError, match="scorers: only a prefix_router has scorers"):
        load_config(write_config(tmp_path / "b", zoo, policy={"kind": "cascade", "members": MEMBERS,
                                                             "scorers": "learned"}))
    with pytest.raises(ConfigError, match="router_file: only a classifier policy has it"):
        load_config(write_config(tmp_path / "c", zoo, policy={"kind": "prefix_router", "members": MEMBERS,
                                                             "scorers": "learned", "router_file": __file__}))


@pytest.mark.slow
def test_learned_router_lm_search_export_and_load(zoo, ray_cluster, tmp_path, monkeypatch) -> None:
    import evomerge.router_lms
    from evomerge.export import evaluate_folder, export
    from evomerge.policies import Member, PrefixRouter, load
    from evomerge.router_data import prepare_router, run_scorers
    from evomerge.run_dir import RunDir
    from evomerge.search import search

    config = load_config(write_config(tmp_path / "cfg", zoo, policy={
        "kind": "prefix_router", "members": MEMBERS, "scorers": "learned", "bounds": {"k": [1, 2]}},
        search={"strategy": "random", "population": 3, "generations": 1}))
    monkeypatch.setattr(evomerge.router_lms, "STEPS", 60)  # a cheaper training: the path is what is tested
    search(config, tmp_path / "run")
    run = RunDir.open(tmp_path / "run")
    journal = (run.path / "router_training" / "journal.jsonl").read_text().splitlines()
    events = [json.loads(line) for line in journal]
    assert [e["event"] for e in events] == ["labels"] + ["router_lm"] * len(MEMBERS)
    assert [e["member"] for e in events[1:]] == MEMBERS and all(e["tokens"] == 2 for e in events[1:])
    prepare_router(config, run.path)  # what resume does: the router LMs are found, nothing is trained again
    assert (run.path / "router_training" / "journal.jsonl").read_text().splitlines() == journal

    routed = [r for r in run.records() if r["state"] == "complete" and r["recipe"].get("policy")]
    assert len(routed) == 3 and all(r["recipe"]["policy"]["kind"] == "prefix_router" for r in routed)
    record = max(routed, key=lambda r: (r["quality"], -r["trial"]))
    export(run.path, tmp_path / "out", trial_id=record["trial"])
    saved = json.loads((tmp_path / "out" / "policy.json").read_text())
    assert len(saved["scorers"]) == len(MEMBERS)
    assert all(not Path(f).is_absolute() for f in saved["members"] + saved["scorers"])  # self-contained
    assert evaluate_folder(run.config(), tmp_path / "out") == pytest.approx(record["quality"], abs=1e-12)

    # the exported policy scores and decides as the search's did
    server = load(tmp_path / "out" / "policy.json")
    k = record["recipe"]["policy"]["params"]["k"]
    in_search = PrefixRouter(server.policy.members, k, [Member.from_folder(Path(f), batch_size=16)
                                                        for f in run_scorers(run.config(), run.path)])
    prompts = [ex["prompt"] for s in SKILLS for ex in eval_examples(s, 8)]
    assert server.policy.scores(prompts) == in_search.scores(prompts)
    answers = server.generate(prompts[:4], max_new_tokens=8)
    assert len(answers) == 4 and answers.stats["routing_flops"] == sum(in_search.scores(prompts[:4])[1])
