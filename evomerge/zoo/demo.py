"""The demo zoo: tiny character-level Llama models whose skills compose under merging.

``build_zoo`` pre-trains a small base model on a broad mix of related string and
digit skills (which also shows, at a low rate, the prompt format of every demo
skill), then fine-tunes one expert per demo skill from that base for a few
hundred steps at a small learning rate. The experts stay close to the base
(relative task-vector norm well under 0.1), which is what makes their task
vectors add up: the uniform average of the experts is weak, task arithmetic with
weights around 1 is clearly better than any single model, and per-layer weights
leave room for the search to find more.

Everything is deterministic: fixed seeds and step counts, ``torch.manual_seed``
for the weights and a local ``random.Random`` for the data, so the same seed gives
bitwise identical weights on the same machine.

The evaluation data of the demo tasks (``evals/demo``) is generated here too
(``write_eval_data``) and held out of all training data.
"""

from __future__ import annotations

import copy
import functools
import json
import logging
import math
import os
import platform
import random
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

logger = logging.getLogger(__name__)

__all__ = [
    "SKILLS",
    "EVAL_SEED",
    "EVAL_SIZE",
    "Recipe",
    "FULL_RECIPE",
    "QUICK_RECIPE",
    "build_zoo",
    "make_tokenizer",
    "make_config",
    "eval_examples",
    "training_excluded_prompts",
    "router_train_examples",
    "write_eval_data",
    "write_demo_tasks",
    "greedy_exact_match",
]

# --------------------------------------------------------------------------- vocabulary

SPECIAL_TOKENS = ("<pad>", "<s>", "</s>", "<unk>")
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3
#: Every character the tasks use; one token each, after the four special tokens.
CHARS = "0123456789abcdefghijklmnopqrstuvwxyz +-=<>:,.?\n"
MAX_POSITIONS = 64

# --------------------------------------------------------------------------- skills

#: The demo skills, one expert and one lm-eval task (``demo_<skill>``) each.
SKILLS = ("add", "rev", "sort")
#: Seed of the held-out evaluation data (independent of the build seed).
EVAL_SEED = 1234
#: Examples per demo task in ``evals/demo/data``.
EVAL_SIZE = 200
#: Seed and size of the router-training documents (the tasks' ``train`` split): disjoint from the
#: evaluation documents, for routers the run trains itself (evomerge/policies/classifier.py).
TRAIN_SEED = 4321
TRAIN_SIZE = 200
#: Longest answer of any demo task, plus the newline; the task YAMLs use it as max_gen_toks.
MAX_GEN_TOKS = 8

_LETTERS = "abcdefghijklmnopqrstuvwxyz"


def _word(rng: random.Random, lo: int, hi: int) -> str:
    return "".join(rng.choice(_LETTERS) for _ in range(rng.randint(lo, hi)))


# Each generator returns (prompt, answer); the model sees prompt + answer + "\n".
def _add(rng: random.Random, small: bool = False) -> tuple[str, str]:
    """Two-digit sums; `small`: a number below 100 and a digit, in either order."""
    a, b = (rng.randint(0, 99), rng.randint(0, 9)) if small else (rng.randint(10, 99), rng.randint(10, 99))
    if small and rng.random() < 0.5:
        a, b = b, a
    return f"{a}+{b}=", str(a + b)


def _on_word(op: str, answer: Callable[[str], str], lo: int, hi: int) -> Callable[[random.Random], tuple[str, str]]:
    """A generator of `op WORD=` prompts over words of lo..hi letters, answered by `answer(word)`."""
    def generate(rng: random.Random) -> tuple[str, str]:
        w = _word(rng, lo, hi)
        return f"{op} {w}=", answer(w)
    return generate


def _sub(rng: random.Random) -> tuple[str, str]:
    a, b = sorted((rng.randint(0, 99), rng.randint(0, 99)), reverse=True)
    return f"{a}-{b}=", str(a - b)


def _reverse(w: str) -> str:
    return w[::-1]


def _sorted(w: str) -> str:
    return "".join(sorted(w))


def _shifted(w: str) -> str:
    return "".join(_LETTERS[(_LETTERS.index(c) + 1) % 26] for c in w)


GENERATORS: dict[str, Callable[[random.Random], tuple[str, str]]] = {
    "add": _add,
    "rev": _on_word("rev", _reverse, 4, 6),
    "sort": _on_word("sort", _sorted, 4, 6),
    "copy": _on_word("cp", str, 2, 7),  # related skills that only the base model sees: copy, sub, next
    "sub": _sub,
    "next": _on_word("nx", _shifted, 2, 7),
    "add_small": functools.partial(_add, small=True),
    "rev_short": _on_word("rev", _reverse, 1, 3),
    "sort_short": _on_word("sort", _sorted, 1, 3),
}


# --------------------------------------------------------------------------- recipe


@dataclass(frozen=True)
class Recipe:
    """Sizes, step counts and learning rates of one zoo build."""

    hidden_size: int = 96
    num_layers: int = 4
    num_heads: int = 4
    intermediate_size: int = 384
    base_steps: int = 1200
    base_lr: float = 2e-3
    base_batch: int = 64
    base_warmup: int = 30
    #: Sampling weights of the base pre-training mix (task name -> weight): related
    #: skills (copy, next letter, short reversal/sorting, small sums) plus the demo
    #: skills themselves at a low rate, so the base knows every prompt format.
    base_mix: dict = field(default_factory=lambda: {"copy": 1.0, "next": 1.0, "add_small": 1.5, "rev_short": 1.0,
                                                    "sort_short": 1.0, "add": 0.25, "rev": 0.05, "sort": 0.05})
    expert_steps: int = 150
    expert_lr: float = 8e-4
    expert_batch: int = 64
    expert_warmup: int = 10
    #: Weight of the KL(base || expert) term on replayed prompts of the other skills,
    #: which keeps each expert's behaviour outside its own skill at the base's.
    expert_consistency: float = 1.0
    expert_replay_batch: int = 24
    #: Sampling weights of the replayed prompts (the expert's own skill is left out).
    replay_mix: dict = field(default_factory=lambda: {"add": 1.0, "rev": 1.0, "sort": 1.0, "copy": 0.3, "next": 0.3,
                                                      "add_small": 0.3, "rev_short": 0.3, "sort_short": 0.3})
    weight_decay: float = 0.0
    #: Router models (SmallTalk LM, arXiv 2410.03529): one tiny LM per skill trained on that
    #: skill's prompts, plus one on the mix of all of them, for `prefix_router` scorers.
    router_hidden_size: int = 32
    router_intermediate_size: int = 64
    router_steps: int = 300
    router_lr: float = 3e-3
    router_batch: int = 64
    #: Examples per demo task that build_zoo scores each model on.
    score_limit: int = 100


FULL_RECIPE = Recipe()
QUICK_RECIPE = replace(
    FULL_RECIPE,
    hidden_size=64,
    intermediate_size=256,
    num_layers=2,
    base_steps=40,
    base_batch=64,
    base_warmup=5,
    expert_steps=10,
    expert_batch=32,
    expert_warmup=2,
    router_steps=30,
    score_limit=20,
)

# --------------------------------------------------------------------------- tokenizer & model


def make_tokenizer():
    """A character-level tokenizer: one token per character of ``CHARS``, no merges.

    A ``tokenizers`` BPE model without merges over a fixed vocabulary, with a
    ``Fuse`` decoder so that decoding gives the string back. It adds no BOS/EOS
    when encoding (lm-eval's HFLM encodes contexts with the tokenizer's defaults).
    """
    from tokenizers import Tokenizer, decoders, models
    from transformers import PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(list(SPECIAL_TOKENS) + list(CHARS))}
    backend = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    backend.decoder = decoders.Fuse()
    backend.add_special_tokens(list(SPECIAL_TOKENS))
    tok = PreTrainedTokenizerFast(
        tokenizer_object=backend,
        pad_token="<pad>",
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        clean_up_tokenization_spaces=False,
        model_max_length=MAX_POSITIONS,
    )
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (
        PAD_ID,
        BOS_ID,
        EOS_ID,
        UNK_ID,
    )
    return tok


def make_config(recipe: Recipe = FULL_RECIPE, *, router: bool = False):
    """The Llama config of the zoo's models; ``router=True``: the one-layer router model's."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=len(SPECIAL_TOKENS) + len(CHARS),
        hidden_size=recipe.router_hidden_size if router else recipe.hidden_size,
        intermediate_size=recipe.router_intermediate_size if router else recipe.intermediate_size,
        num_hidden_layers=1 if router else recipe.num_layers,
        num_attention_heads=2 if router else recipe.num_heads,
        num_key_value_heads=2 if router else recipe.num_heads,
        max_position_embeddings=MAX_POSITIONS,
        tie_word_embeddings=False,
        pad_token_id=PAD_ID,
        bos_token_id=BOS_ID,
        eos_token_id=EOS_ID,
    )


def generation_config(tok):
    """Greedy generation with `tok`'s special tokens."""
    from transformers import GenerationConfig

    return GenerationConfig(pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
                            eos_token_id=tok.eos_token_id, do_sample=False)


# --------------------------------------------------------------------------- evaluation data


def eval_examples(skill: str, n: int = EVAL_SIZE, seed: int = EVAL_SEED) -> list[dict]:
    """``n`` distinct held-out examples of a demo skill: ``{"prompt", "answer"}`` dicts."""
    if skill not in SKILLS:
        raise ValueError(f"skill: unknown {skill!r}, expected one of {SKILLS}")
    return distinct_examples(GENERATORS[skill], n, random.Random(f"eval-{skill}-{seed}"), "prompt")


def distinct_examples(generate: Callable[[random.Random], tuple[str, str]], n: int, rng: random.Random,
                      key: str, excluded: frozenset[str] | set[str] = frozenset()) -> list[dict]:
    """``n`` examples ``{key: question, "answer": answer}`` with distinct questions, none in ``excluded``,
    drawn in order."""
    seen: set[str] = set()
    out: list[dict] = []
    while len(out) < n:
        question, answer = generate(rng)
        if question not in seen and question not in excluded:
            seen.add(question)
            out.append({key: question, "answer": answer})
    return out


def router_train_examples(skill: str, n: int = TRAIN_SIZE, seed: int = TRAIN_SEED) -> list[dict]:
    """``n`` distinct examples of a demo skill for router training (a task's ``train`` split), none
    of them an evaluation prompt. The zoo's models were built before this split existed and were
    not kept from these prompts: a prompt here may have been in an expert's training batches."""
    excluded = {ex["prompt"] for ex in eval_examples(skill)}
    return distinct_examples(GENERATORS[skill], n, random.Random(f"train-{skill}-{seed}"), "prompt", excluded)


def training_excluded_prompts() -> frozenset[str]:
    """Prompts that no training batch contains: the committed evaluation data."""
    return frozenset(ex["prompt"] for s in SKILLS for ex in eval_examples(s))


def write_eval_data(out_dir: str | os.PathLike, seed: int = EVAL_SEED, n: int = EVAL_SIZE) -> dict[str, Path]:
    """Write ``demo_<skill>.jsonl`` (one ``{"prompt", "answer"}`` object a line) per skill, and its
    router-training documents ``demo_<skill>_train.jsonl``."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    for skill in SKILLS:
        path = out / f"demo_{skill}.jsonl"
        train = router_train_examples(skill)
        for file, examples in ((path, eval_examples(skill, n, seed)), (train_path(path), train)):
            lines = [json.dumps(ex, sort_keys=True) for ex in examples]
            file.write_text("\n".join(lines) + "\n", encoding="utf-8")
        paths[skill] = path
    return paths


def train_path(path: Path) -> Path:
    """The router-training documents beside a task's held-out ones: `<name>_train.jsonl`."""
    return path.with_name(path.stem + "_train.jsonl")


#: The head of an lm-eval task over local JSONL documents with a `train` split (for router training).
TASK_YAML_HEAD = """\
# {header}
task: {task}
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data_file}
    train: {train_file}
test_split: test
training_split: train  # router-training documents (disjoint from test), never scored for fitness
"""
#: A generate_until task with exact match over `{prompt, answer}` documents.
GENERATE_TASK_YAML = TASK_YAML_HEAD + """\
output_type: generate_until
doc_to_text: "{{{{prompt}}}}"
doc_to_target: "{{{{answer}}}}"
generation_kwargs:
  until: ["\\n"]
  max_gen_toks: {max_gen_toks}
  do_sample: false
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
metadata:
  version: 1.0
"""


def write_demo_tasks(task_dir: str | os.PathLike, *, absolute: bool = False, n: int = EVAL_SIZE) -> dict[str, Path]:
    """Write the lm-eval tasks ``demo_<skill>`` into ``task_dir``: ``demo_<skill>.yaml`` with
    its held-out data ``demo_<skill>.jsonl`` (``n`` documents) beside it. Returns ``{skill: yaml_path}``.

    ``n`` above EVAL_SIZE (the committed evals/demo) is for benchmarks that measure at more documents
    per task: the first EVAL_SIZE documents are the committed ones (drawn in order from one seeded
    generator), the later ones were not kept out of the zoo's training batches (two-digit sums repeat).

    lm-eval 0.4.13 hands ``dataset_kwargs.data_files`` to ``datasets.load_dataset``
    unchanged, and ``datasets`` resolves a relative path against the current working
    directory, not the YAML. The YAMLs therefore name their data file relative to
    their own folder (``evomerge.evaluate.task_spec`` makes such paths absolute
    before lm-eval loads the task), or by absolute path with ``absolute=True``,
    for plain lm-eval from any working directory.
    """
    task_dir = Path(task_dir)
    data = write_eval_data(task_dir, n=n)
    out: dict[str, Path] = {}
    for skill, path in data.items():
        ref = path.resolve().as_posix() if absolute else path.name
        out[skill] = task_dir / f"demo_{skill}.yaml"
        out[skill].write_text(
            GENERATE_TASK_YAML.format(
                task=f"demo_{skill}", data_file=ref, max_gen_toks=MAX_GEN_TOKS,
                header=f'The demo skill "{skill}": held-out prompts written by evomerge.zoo.write_eval_data '
                       "(never trained on).", train_file=train_path(Path(ref)).as_posix()), encoding="utf-8"
        )
    return out


# --------------------------------------------------------------------------- training


class _Sampler:
    """Deterministic batches of (input_ids, labels) from a weighted task mix of `generators` (default:
    the demo's), each text encoded by `tok` (no special tokens)."""

    def __init__(self, mix: dict[str, float], tok, rng: random.Random, excluded: frozenset[str],
                 generators: dict[str, Callable[[random.Random], tuple[str, str]]] | None = None):
        self.names = sorted(mix)
        self.weights = [mix[k] for k in self.names]
        self.rng = rng
        self.excluded = excluded
        self.generators = GENERATORS if generators is None else generators
        self.encode = encoder(tok)
        self._pending: list = []
        self._pending_size = 0

    def example(self) -> tuple[str, str]:
        gen = self.generators[self.rng.choices(self.names, self.weights)[0]]
        while True:
            prompt, answer = gen(self.rng)
            if prompt not in self.excluded:
                return prompt, answer

    def batch(self, size: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The next batch; batches come from pools of ``BUCKET`` batches sorted by length,
        so that little of a batch is padding."""
        if not self._pending or self._pending_size != size:
            pool = [self._encode(*self.example()) for _ in range(size * self.BUCKET)]
            pool.sort(key=lambda row: len(row[0]))
            chunks = [pool[i : i + size] for i in range(0, len(pool), size)]
            self.rng.shuffle(chunks)
            self._pending, self._pending_size = chunks, size
        return self._collate(self._pending.pop())

    BUCKET = 1

    def _encode(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        p, a = self.encode(prompt), self.encode(answer + "\n")  # as generation sees them: prompt, then answer
        return p + a, [-100] * len(p) + a

    @staticmethod
    def _collate(rows: list[tuple[list[int], list[int]]]) -> tuple[torch.Tensor, torch.Tensor]:
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), PAD_ID, dtype=torch.long)
        labels = torch.full((len(rows), width), -100, dtype=torch.long)
        for i, (x, y) in enumerate(rows):
            ids[i, : len(x)] = torch.tensor(x)
            labels[i, : len(y)] = torch.tensor(y)
        return ids, labels


class _PromptSampler(_Sampler):
    """Batches for a router model: BOS + prompt, the loss on every prompt token (the text a
    prefix router scores), no answer."""

    def _encode(self, prompt: str, answer: str) -> tuple[list[int], list[int]]:
        p = self.encode(prompt)
        return [BOS_ID] + p, [-100] + p


def encoder(tok) -> Callable[[str], list[int]]:
    """`text -> token ids` of a fast tokenizer, without special tokens (as lm-eval's HFLM encodes)."""
    backend = tok.backend_tokenizer
    return lambda text: backend.encode(text, add_special_tokens=False).ids


def _consistency_loss(model, teacher, ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """KL(teacher || model) on the answer positions of a replay batch."""
    mask = labels[:, 1:] != -100
    with torch.no_grad():
        target = torch.log_softmax(teacher(input_ids=ids).logits[:, :-1][mask], dim=-1)
    logp = torch.log_softmax(model(input_ids=ids).logits[:, :-1][mask], dim=-1)
    return torch.nn.functional.kl_div(logp, target, log_target=True, reduction="batchmean")


def _train(model, sampler: _Sampler, *, steps: int, lr: float, batch: int, warmup: int, weight_decay: float,
           name: str, optimizer: str = "adamw", teacher=None, replay: _Sampler | None = None, replay_batch: int = 0,
           consistency: float = 0.0) -> dict:
    model.train()
    if optimizer == "adamw":
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trained, lr=lr, betas=(0.9, 0.98), weight_decay=weight_decay)
    elif optimizer == "sgd":
        trained = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.SGD(trained, lr=lr, momentum=0.9, weight_decay=weight_decay)
    else:
        raise ValueError(f"optimizer: unknown {optimizer!r}")

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = (step - warmup) / max(1, steps - warmup)
        return 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * progress))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.perf_counter()
    losses: list[float] = []
    for step in range(steps):
        ids, labels = sampler.batch(batch)
        loss = model(input_ids=ids, labels=labels).loss
        if teacher is not None and consistency > 0:
            loss = loss + consistency * _consistency_loss(model, teacher, *replay.batch(replay_batch))
        loss.backward()
        torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            logger.info("%s step %d/%d loss %.4f", name, step + 1, steps, sum(losses[-20:]) / len(losses[-20:]))
    model.eval()
    return {
        "steps": steps,
        "lr": lr,
        "batch": batch,
        "warmup": warmup,
        "final_loss": round(sum(losses[-20:]) / max(1, len(losses[-20:])), 5),
        "seconds": round(time.perf_counter() - t0, 2),
    }


# --------------------------------------------------------------------------- scoring


@torch.no_grad()
def greedy_exact_match(model, tok, examples: Iterable[dict], max_new_tokens: int = MAX_GEN_TOKS) -> float:
    """Greedy generation until a newline, exact match against the answer.

    The same decision lm-eval's ``generate_until`` + ``exact_match`` makes for the
    demo tasks, without padding (prompts are grouped by length).
    """
    model.eval()
    encode = encoder(tok)
    (nl,) = encode("\n")  # the stop string is one token in the zoos' tokenizers
    stops = (nl, tok.eos_token_id)
    groups: dict[int, list[tuple[dict, list[int]]]] = {}
    examples = list(examples)
    for ex in examples:
        ids = encode(ex["prompt"])
        groups.setdefault(len(ids), []).append((ex, ids))
    correct = 0
    for rows in groups.values():
        group = [ex for ex, _ in rows]
        ids = torch.tensor([row for _, row in rows])
        done = torch.zeros(len(group), dtype=torch.bool)
        outs: list[list[int]] = [[] for _ in group]
        for _ in range(max_new_tokens):
            nxt = model(input_ids=ids).logits[:, -1].argmax(-1)
            for i, t in enumerate(nxt.tolist()):
                if not done[i]:
                    if t in stops:
                        done[i] = True
                    else:
                        outs[i].append(t)
            if bool(done.all()):
                break
            ids = torch.cat([ids, nxt[:, None]], dim=1)
        for ex, out in zip(group, outs):
            correct += tok.decode(out, skip_special_tokens=True) == ex["answer"]
    return correct / max(1, len(examples))


def _scores(model, tok, limit: int) -> dict[str, float]:
    per = {s: greedy_exact_match(model, tok, eval_examples(s)[:limit]) for s in SKILLS}
    per["mean"] = sum(per[s] for s in SKILLS) / len(SKILLS)
    return {k: round(v, 4) for k, v in per.items()}


def task_arithmetic_state(base_sd: dict, expert_sds: list[dict], weights: list[float]) -> dict:
    """base + sum_i w_i (expert_i - base), every tensor."""
    return {
        k: v + sum(w * (e[k] - v) for w, e in zip(weights, expert_sds)) for k, v in base_sd.items()
    }


def merge_scores(score: Callable[[Any], Any], probe: Any, base_sd: dict, expert_sds: list[dict]) -> dict:
    """`score` of the experts' uniform average and of their task arithmetic at 1.0, each loaded into
    `probe` (a model of the base's shape): the check that the experts compose."""
    n = len(expert_sds)
    merges = {"uniform_average": [1.0 / n] * n, "task_arithmetic_1.0": [1.0] * n}
    scores = {}
    for name, weights in merges.items():
        probe.load_state_dict(task_arithmetic_state(base_sd, expert_sds, weights))
        scores[name] = score(probe)
    return scores


def relative_norm(base_sd: dict, expert_sd: dict) -> float:
    num = sum(float((expert_sd[k] - v).float().pow(2).sum()) for k, v in base_sd.items())
    den = sum(float(v.float().pow(2).sum()) for v in base_sd.values())
    return math.sqrt(num / den)


# --------------------------------------------------------------------------- build


def _save(model, tok, path: Path) -> None:
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True)
    tok.save_pretrained(path)


def train_sources(out: Path, recipe: Recipe, seed: int, tok, new_model: Callable[[], Any], skills: Iterable[str],
                  generators: dict[str, Callable[[random.Random], tuple[str, str]]] | None = None,
                  excluded: frozenset[str] = frozenset()) -> tuple[Any, dict[str, Any], dict[str, dict]]:
    """Train a base (`new_model()` after seeding torch, on `recipe.base_mix`) and one expert per skill
    fine-tuned from it (with the replay consistency term on `recipe.replay_mix` less the skill), each
    saved with `tok` under `out`/<name>; returns (base, {skill: expert}, training records). No
    training batch holds a prompt of `excluded`."""
    torch.manual_seed(seed)
    base = new_model()
    base.generation_config = generation_config(tok)
    logger.info("zoo: base model, %d parameters", sum(p.numel() for p in base.parameters()))
    sampler = _Sampler(recipe.base_mix, tok, random.Random(f"base-{seed}"), excluded, generators)
    training = {"base": _train(base, sampler, steps=recipe.base_steps, lr=recipe.base_lr, batch=recipe.base_batch,
                               warmup=recipe.base_warmup, weight_decay=recipe.weight_decay, name="base")}
    _save(base, tok, out / "base")

    experts = {}
    for skill in skills:
        torch.manual_seed(seed)
        expert = copy.deepcopy(base)
        sampler = _Sampler({skill: 1.0}, tok, random.Random(f"expert-{skill}-{seed}"), excluded, generators)
        replay = _Sampler({k: w for k, w in recipe.replay_mix.items() if k != skill}, tok,
                          random.Random(f"replay-{skill}-{seed}"), excluded, generators)
        training[skill] = _train(expert, sampler, steps=recipe.expert_steps, lr=recipe.expert_lr,
                                 batch=recipe.expert_batch, warmup=recipe.expert_warmup,
                                 weight_decay=recipe.weight_decay, name=skill, teacher=base, replay=replay,
                                 replay_batch=recipe.expert_replay_batch, consistency=recipe.expert_consistency)
        _save(expert, tok, out / skill)
        experts[skill] = expert
    return base, experts, training


def source_scores(score: Callable[[Any], dict], base, experts: dict[str, Any]) -> tuple[dict, dict]:
    """(`score` of the base, each expert, their uniform average and their task arithmetic at 1.0;
    each expert's relative task-vector norm): what a zoo's zoo.json records."""
    base_sd = {k: v.detach().clone() for k, v in base.state_dict().items()}
    expert_sds = {s: {k: v.detach().clone() for k, v in e.state_dict().items()} for s, e in experts.items()}
    scores = {"base": score(base), **{s: score(e) for s, e in experts.items()}}
    scores.update(merge_scores(score, copy.deepcopy(base), base_sd, list(expert_sds.values())))
    norms = {s: round(relative_norm(base_sd, sd), 4) for s, sd in expert_sds.items()}
    return scores, norms


def _build(out_dir: str | os.PathLike, recipe: Recipe, seed: int) -> dict[str, Path]:
    from transformers import LlamaForCausalLM

    t_start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_tokenizer()
    excluded = training_excluded_prompts()
    timings: dict[str, float] = {}
    base, experts, training = train_sources(out, recipe, seed, tok, lambda: LlamaForCausalLM(make_config(recipe)),
                                            SKILLS, excluded=excluded)
    paths = {"base": out / "base", **{skill: out / skill for skill in SKILLS}}
    timings["train_and_save_s"] = round(time.perf_counter() - t_start, 2)

    t0 = time.perf_counter()
    routers = {}
    for name, mix in {"mix": {s: 1.0 for s in SKILLS}, **{s: {s: 1.0} for s in SKILLS}}.items():
        torch.manual_seed(seed)
        router = LlamaForCausalLM(make_config(recipe, router=True))
        router.generation_config = generation_config(tok)
        sampler = _PromptSampler(mix, tok, random.Random(f"router-{name}-{seed}"), excluded)
        training[f"router-{name}"] = _train(router, sampler, steps=recipe.router_steps, lr=recipe.router_lr,
                                            batch=recipe.router_batch, warmup=recipe.base_warmup,
                                            weight_decay=recipe.weight_decay, name=f"router-{name}")
        _save(router, tok, out / "routers" / name)
        routers[name] = str(out / "routers" / name)
    timings["routers_s"] = round(time.perf_counter() - t0, 2)

    # Scores on the first `score_limit` held-out examples of each demo task.
    t0 = time.perf_counter()
    scores, norms = source_scores(lambda model: _scores(model, tok, recipe.score_limit), base, experts)
    timings["score_s"] = round(time.perf_counter() - t0, 2)
    timings["total_s"] = round(time.perf_counter() - t_start, 2)

    meta = {
        "seed": seed,
        "quick": recipe == QUICK_RECIPE,
        "recipe": asdict(recipe),
        "skills": list(SKILLS),
        "eval_seed": EVAL_SEED,
        "training": training,
        "routers": routers,
        "relative_task_vector_norm": norms,
        "scores": scores,
        "scores_note": f"greedy exact match on the first {recipe.score_limit} examples of each "
        "evals/demo task (what lm-eval's generate_until + exact_match computes)",
        "timings": timings,
    }
    write_zoo_json(out, meta)
    logger.info("zoo: built %s in %.1f s; scores %s", out, timings["total_s"], scores)
    return paths


def reuse_or_build(out: Path, paths: dict[str, Path], name: str, build: Callable[[], None], force: bool = False
                   ) -> dict[str, Path]:
    """`paths` of the zoo in `out`: as they are when `out`/zoo.json says a build finished there (unless
    `force`), else after `build()`, run with one torch thread (on a shared, loaded machine one thread
    is fastest: no spinning)."""
    if (out / "zoo.json").is_file() and not force:
        logger.info("%s: %s is built already (zoo.json); reusing it", name, out)
        return paths
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        build()
    finally:
        torch.set_num_threads(threads)
    return paths


def write_zoo_json(out: Path, meta: dict) -> None:
    """`out`/zoo.json: what the build measured, with the machine and torch it ran on."""
    meta = {**meta, "torch_threads": torch.get_num_threads(), "torch": torch.__version__,
            "machine": platform.machine()}
    (out / "zoo.json").write_text(json.dumps(meta, indent=2) + "\n", encoding="utf-8")


def build_zoo(out_dir: str | os.PathLike, *, quick: bool = False, seed: int = 0) -> dict[str, Path]:
    """Build the demo zoo under ``out_dir`` and return ``{"base": path, "<skill>": path, ...}``.

    Each model folder is a Hugging Face folder (safetensors weights, config,
    generation config and the tokenizer); ``out_dir/zoo.json`` records the seed,
    recipe, step counts, timings, relative task-vector norms and measured scores.
    ``out_dir/routers/{mix,<skill>}`` hold one-layer router models for ``prefix_router``
    scorers (listed in zoo.json, not returned: they are not merge sources).
    ``quick=True`` builds a much smaller, barely trained zoo in seconds (for tests).
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    try:
        return _build(out_dir, QUICK_RECIPE if quick else FULL_RECIPE, seed)
    finally:
        torch.set_num_threads(threads)
