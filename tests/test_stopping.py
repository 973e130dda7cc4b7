"""`StopStrings` decides what lm-eval's stop-string criteria decide, at every step of a generation.

Token sequences grow one random token per step (drawn from encodings of text full of stop
strings, so rows stop at different steps), and at each step lm-eval's own criteria
(`stop_sequences_criteria`, every one of them called, as transformers calls a list) and
`StopStrings` are asked: the answer and each row's done state must agree. Two tokenizers: the
demo zoo's character-level one and a byte-level BPE trained here, whose merges make stop
strings span tokens and tokens span stop strings.
"""

from __future__ import annotations

import random

import pytest
import torch

from evomerge.policies.stopping import StopStrings

TEXT = ("Question: what is ab?\nAnswer: ab\n\nQuestion: and abc?\nAnswer: cab\n\n"
        "the cat sat on the mat.</s> ab ab\n Question:\n\n") * 4
STOPS = [["\n"], ["\n\n", "Question:"], ["ab", "</s>", "\n\n"], []]


def bpe_tokenizer():
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    backend = Tokenizer(models.BPE())
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.train_from_iterator([TEXT], trainers.BpeTrainer(vocab_size=300, special_tokens=["</s>"],
                                                            initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    return PreTrainedTokenizerFast(tokenizer_object=backend, eos_token="</s>", pad_token="</s>")


def char_tokenizer():
    from evomerge.zoo import make_tokenizer

    return make_tokenizer()


def lm_eval_steps(tokenizer, stops, prompt, steps) -> list[tuple[bool, list[bool]]]:
    from lm_eval.models.utils_hf import stop_sequences_criteria

    criteria = stop_sequences_criteria(tokenizer, stops, prompt.shape[1], prompt.shape[0])
    out = []
    for ids in steps:
        answers = [criterion(ids, None) for criterion in criteria]  # transformers calls every one
        rows = [any(column) for column in zip(*(c.done_tracker for c in criteria))] if criteria else []
        out.append((any(answers), rows))
    return out


def ours_steps(tokenizer, stops, prompt, steps, decoded) -> list[tuple[bool, list[bool]]]:
    criterion = StopStrings(tokenizer, stops, prompt.shape[1], prompt.shape[0], decoded)
    return [(criterion(ids, None), list(criterion.done_tracker)) for ids in steps]


@pytest.mark.parametrize("make", [char_tokenizer, bpe_tokenizer], ids=["char", "bpe"])
def test_stop_strings_decide_as_lm_evals_criteria_at_every_step(make) -> None:
    tokenizer = make()
    rng = random.Random(0)
    # runs of the text as the tokenizer encodes it, and in pieces of 1-4 characters encoded apart
    # (so that a stop string comes as more tokens than it encodes to)
    pool, start = tokenizer.encode(TEXT, add_special_tokens=False), 0
    while start < len(TEXT):
        size = rng.randint(1, 4)
        pool += tokenizer.encode(TEXT[start:start + size], add_special_tokens=False)
        start += size
    decoded: dict = {}
    for trial in range(60):
        batch, width = rng.randint(1, 6), rng.randint(1, 5)
        prompt = torch.tensor([[rng.choice(pool) for _ in range(width)] for _ in range(batch)])
        steps, ids = [], prompt
        starts = [rng.randrange(len(pool)) for _ in range(batch)]  # each row runs through the pool
        for _ in range(rng.randint(1, 14)):
            new = torch.tensor([[pool[(s + len(steps)) % len(pool)] if rng.random() < 0.9 else rng.choice(pool)]
                                for s in starts])
            ids = torch.cat([ids, new], dim=1)
            steps.append(ids)
        for stops in STOPS:
            expected = lm_eval_steps(tokenizer, stops, prompt, steps)
            assert ours_steps(tokenizer, stops, prompt, steps, decoded) == expected, (trial, stops)
            # the windows decoded for earlier trials (kept in `decoded`) answer the same
            assert ours_steps(tokenizer, stops, prompt, steps, decoded) == expected
    assert decoded, "no window was kept"


def test_stop_strings_stop_only_when_one_string_ended_every_row() -> None:
    """Rows done for different strings do not stop the batch (lm-eval's rule: one criterion per
    string, each answering for the whole batch); the prompt is never looked at."""
    tokenizer = char_tokenizer()

    def steps(*answers: str) -> tuple[torch.Tensor, list[torch.Tensor]]:
        prompt = torch.tensor([tokenizer.encode(p, add_special_tokens=False) for p in ("1+1=", "2+2=")])
        rows = [tokenizer.encode(a, add_special_tokens=False) for a in answers]
        return prompt, [torch.cat([prompt, torch.tensor([r[:n] for r in rows])], dim=1) for n in range(1, 4)]

    cases = [  # answers, stop strings, (stop?, rows done) after each step
        (("2\nx", "4,yy"), [",", "\n"], [(False, [False, False]), (False, [True, True]), (False, [True, True])]),
        (("2\nx", "4\nyy"), [",", "\n"], [(False, [False, False]), (True, [True, True]), (True, [True, True])]),
        (("2,x", "4yy"), ["y"], [(False, [False, False]), (False, [False, True]), (False, [False, True])]),
        (("2=x", "4yy"), ["="], [(False, [False, False]), (False, [True, False]), (False, [True, False])]),
    ]
    for answers, stops, expected in cases:
        prompt, grown = steps(*answers)
        assert ours_steps(tokenizer, stops, prompt, grown, {}) == expected, (answers, stops)
        assert lm_eval_steps(tokenizer, stops, prompt, grown) == expected, (answers, stops)


def test_stop_strings_look_back_as_far_as_lm_eval() -> None:
    """A stop string that arrives in more tokens than it encodes to: found exactly when lm-eval's
    window (its own token count + 2) holds it, whatever the split."""
    tokenizer = bpe_tokenizer()
    prompt = torch.tensor([tokenizer.encode("ab", add_special_tokens=False)])
    edges = set()
    for stop in ("Question:", " ab", "\n\n", "Answer:", " cat", "ab"):
        look = len(tokenizer.encode(stop, add_special_tokens=False)) + 2
        for pieces in range(1, len(stop) + 1):
            cuts = [round(i * len(stop) / pieces) for i in range(pieces + 1)]
            tokens = [t for a, b in zip(cuts, cuts[1:]) for t in tokenizer.encode(stop[a:b], add_special_tokens=False)]
            grown = [torch.cat([prompt, torch.tensor([tokens[:n]])], dim=1) for n in range(1, len(tokens) + 1)]
            expected = lm_eval_steps(tokenizer, [stop], prompt, grown)
            assert ours_steps(tokenizer, [stop], prompt, grown, {}) == expected, (stop, pieces)
            edges.add(len(tokens) - look)
    assert {-1, 0, 1} <= edges  # splits just inside, at and just past the window's edge were tried
