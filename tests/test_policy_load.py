"""Issue 19, item 5: serving an exported policy with `evomerge.policies.load` (an export folder holds
policy.json and the member folders): every request type the search scored, statistics per call, a
blend's member a function of the prompt and the seed."""

from __future__ import annotations

import math
import shutil

import pytest

from evomerge.errors import ConfigError
from evomerge.policies import Member, load, save_policy
from evomerge.zoo import eval_examples

MAX_GEN = 8


@pytest.fixture(scope="module")
def folder(zoo, tmp_path_factory):
    """An export-like folder: policy.json beside copies of the member folders."""
    out = tmp_path_factory.mktemp("export")
    for name in ("add", "rev"):
        shutil.copytree(zoo[name], out / "members" / name)
    return out


def test_load_takes_the_export_folder(folder, tmp_path) -> None:
    save_policy(folder / "policy.json", "blend", {"probs": [1, 1]}, [folder / "members" / "add",
                                                                     folder / "members" / "rev"], seed=3)
    assert load(folder).kind == "blend"
    assert load(folder / "policy.json").kind == "blend"
    with pytest.raises(ConfigError, match="neither a policy.json nor a model.s config.json"):
        load(tmp_path)
    with pytest.raises(ConfigError, match="no such policy file or export folder"):
        load(tmp_path / "missing")


def test_blend_member_is_a_function_of_prompt_and_seed(folder) -> None:
    save_policy(folder / "policy.json", "blend", {"probs": [1, 1]}, [folder / "members" / "add",
                                                                     folder / "members" / "rev"], seed=3)
    server = load(folder)
    prompts = [ex["prompt"] for ex in eval_examples("rev", 6) + eval_examples("add", 6)]
    alone = {p: server.generate([p], max_new_tokens=MAX_GEN) for p in prompts}
    forward = server.generate(prompts, max_new_tokens=MAX_GEN)
    backward = server.generate(prompts[::-1], max_new_tokens=MAX_GEN)
    repeated = server.generate([prompts[0]] * 4, max_new_tokens=MAX_GEN)
    assert forward == [alone[p][0] for p in prompts] and backward == forward[::-1]
    assert repeated == [alone[prompts[0]][0]] * 4
    # the same prompt goes to the same member wherever it stands: per-call stats say which
    served = [tuple(alone[p].stats["served"]) for p in prompts]
    assert set(served) == {(1, 0), (0, 1)}  # both members used over these prompts
    # statistics belong to the call: nothing accumulates
    assert forward.stats["requests"] == len(prompts) and sum(forward.stats["served"]) == len(prompts)
    assert repeated.stats["requests"] == 4 and server.policy.stats.requests == 0


def test_loglikelihood_and_multiple_choice(folder) -> None:
    save_policy(folder / "policy.json", "cascade", {"thresholds": [math.inf]},
                [folder / "members" / "add", folder / "members" / "rev"])
    server = load(folder)  # an infinite threshold: every request escalates to rev
    rev = Member.from_folder(folder / "members" / "rev", batch_size=16)
    pairs = [(ex["prompt"], ex["answer"]) for ex in eval_examples("rev", 4)]
    scored = server.loglikelihood(pairs)
    from lm_eval.api.instance import Instance

    requests = [Instance("loglikelihood", {}, pair, 0, ("x", i, 1)) for i, pair in enumerate(pairs)]
    own = rev.lm.loglikelihood(requests)
    assert [round(a[0], 4) for a in scored] == [round(b[0], 4) for b in own]
    assert scored.stats["served"] == [0, len(pairs)] and scored.stats["consulted"][0] == len(pairs)

    questions = [(prompt, [answer, answer[::-1] + "x", "zz"]) for prompt, answer in pairs]
    chosen = server.choose(questions)
    assert len(chosen) == len(questions) and chosen.stats["requests"] == 3 * len(questions)
    for (prompt, choices), index in zip(questions, chosen):
        own = rev.lm.loglikelihood([Instance("loglikelihood", {}, (prompt, c), 0, ("x", 0, 1)) for c in choices])
        assert index == max(range(3), key=lambda i: own[i][0])
