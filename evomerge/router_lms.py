"""Router LMs the run trains itself for `prefix_router` (`policy.scorers: learned`), after
SmallTalk LM (arXiv 2410.03529): one small causal LM per member, trained on the prompts that
member serves best; a request goes to the member whose router LM gives the prompt's first `k`
tokens the highest likelihood (`policies/router.py` scores them as it scores hand-made router
models, and counts their FLOPs the same way).

Which prompts a member's router LM trains on (from the run's labels, `router_data.member_labels`:
each source member's score on each router-training document):
- a source member (`base`, `expert:I`): the prompts it alone serves best (its label above 0 and above
  every other source member's). A prompt on which several members tie at the best trains none of
  them: any of them serves it, and letting it train each of them blurs every specialist (on the demo
  zoo the experts also answer a quarter of each other's prompts: with ties shared, 34% of the add
  expert's training prompts were rev or sort prompts, 0% without; benchmarks/routing_learned.py
  measures both rules);
- `merged`: every router-training prompt. The merge changes with every candidate, so no label
  describes it; a router LM trained on all prompts is a generalist, whose likelihood of a prompt's
  prefix beats the specialists' where no source serves that kind of prompt (the prompts no expert
  knows then go to the merge), and loses where one does.

The model: the base's own architecture (its config class, so any causal LM transformers builds)
with `LAYERS` layer(s) of width `WIDTH` (or the base's width where that is smaller), the base's
vocabulary and tokenizer (a copy of the base's tokenizer files goes into each router LM's folder).
A sequence is the prefix token (BOS, else EOS: what lm-eval conditions an empty context on) and
the prompt's first `tokens` tokens, encoded without special tokens, the loss on every prompt token
- exactly what the router scores. `tokens` is the largest `k` the search can use (the `k` bound's
top, or the fixed `k`): the router never scores further. Training: AdamW, `STEPS` steps of
`BATCH` sequences drawn with a generator seeded from the run's seed and the member's index, weights
initialised under the same seed inside `torch.random.fork_rng` (the global RNG is left as it was):
the same labels and seed give the same router LMs.
"""

from __future__ import annotations

import json
import shutil
import time
from pathlib import Path
from typing import Any, Sequence

import torch

__all__ = ["LEARNED", "ROUTER_LM_DIR", "member_prompts", "router_lm_config", "train_router_lm", "prefix_tokens",
           "train_router_lms", "router_lm_folders"]

LEARNED = "learned"  # the value of `policy.scorers` that asks the run to train its router LMs
ROUTER_LM_DIR = "router_lms"  # under the run's router_training/: one folder per member, in member order
LAYERS = 1
WIDTH = 64
HEADS = 2
STEPS = 300
BATCH = 64
LR = 3e-3
WEIGHT_DECAY = 0.0

# config fields that hold a model's width, FFN width, depth and heads, by architecture family
_WIDTH = ("hidden_size", "n_embd", "d_model")
_FFN = ("intermediate_size", "n_inner", "ffn_dim", "d_ff")
_DEPTH = ("num_hidden_layers", "n_layer", "num_layers")
_HEADS = ("num_attention_heads", "n_head", "num_heads")
_KV_HEADS = ("num_key_value_heads", "multi_query_group_num")


def member_prompts(rows: Sequence[dict[str, Any]], members: Sequence[str], labelled: Sequence[str],
                   ties: str = "none") -> list[list[str]]:
    """The training prompts of each member's router LM (`members`: the policy's, in order;
    `labelled`: the source members each row's `labels` follow), by the rule of the module docstring.
    `ties="all"`: a prompt on which several members tie at the best trains each of them (measured
    against the default in benchmarks/routing_learned.py)."""
    out: list[list[str]] = []
    for name in members:
        if name == "merged":
            out.append([row["prompt"] for row in rows])
            continue
        m = list(labelled).index(name)
        out.append([row["prompt"] for row in rows if row["labels"][m] > 0 and row["labels"][m] >= max(row["labels"])
                    and (ties == "all" or sum(v >= row["labels"][m] for v in row["labels"]) == 1)])
    return out


def prefix_tokens(policy: Any) -> int:
    """Prompt tokens a router LM trains on: the most the prefix router can score."""
    return int(policy.k) if policy.k is not None else max(1, int(policy.bound("k")[1]))


def _set(config: Any, names: Sequence[str], value: Any) -> None:
    for name in names:
        if name in config.to_dict() or hasattr(config, name):
            setattr(config, name, value)
            return


def _get(config: Any, names: Sequence[str]) -> Any:
    for name in names:
        value = getattr(config, name, None)
        if value is not None:
            return value
    return None


def router_lm_config(base_config: Any, layers: int = LAYERS, width: int = WIDTH, heads: int = HEADS) -> Any:
    """A small config of the base's own architecture: `layers` layers, width min(`width`, the base's),
    `heads` attention heads (as many key/value heads), a 2x FFN; vocabulary, special tokens and
    everything else as the base's."""
    config = base_config.__class__.from_dict(base_config.to_dict())
    base_width = _get(config, _WIDTH)
    width = int(min(width, base_width)) if base_width else int(width)
    heads = max(1, min(heads, width // 8))
    _set(config, _WIDTH, width)
    _set(config, _FFN, 2 * width)
    _set(config, _DEPTH, layers)
    _set(config, _HEADS, heads)
    for name in _KV_HEADS:
        if getattr(config, name, None) is not None:
            setattr(config, name, heads)
    if getattr(config, "head_dim", None) is not None:
        config.head_dim = width // heads
    for name in ("layer_types", "mlp_only_layers"):  # per-layer lists follow the depth
        value = getattr(config, name, None)
        if isinstance(value, list):
            setattr(config, name, value[:layers])
    for name in ("max_window_layers",):
        if isinstance(getattr(config, name, None), int):
            setattr(config, name, min(getattr(config, name), layers))
    return config


def _prefix_token_id(tokenizer: Any) -> int:
    """The token lm-eval's HFLM conditions an empty context on (`HFLM.prefix_token_id`)."""
    token = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
    if token is None:
        raise ValueError("router LM: the base's tokenizer has neither a BOS nor an EOS token to condition on")
    return int(token)


def train_router_lm(base_config: Any, tokenizer: Any, prompts: Sequence[str], tokens: int, seed: int,
                    steps: int | None = None, batch: int = BATCH, lr: float = LR) -> tuple[Any, dict[str, Any]]:
    """One router LM trained on `prompts` (their first `tokens` tokens); (model, facts of the training).
    `steps`: None for `STEPS` (read at call time)."""
    start = time.perf_counter()
    steps = STEPS if steps is None else int(steps)
    prefix = _prefix_token_id(tokenizer)
    rows = [[prefix] + tokenizer.encode(text, add_special_tokens=False)[:tokens] for text in prompts]
    rows = [row for row in rows if len(row) > 1]
    config = router_lm_config(base_config)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # tiny matrices: one thread is fastest, and much faster on a loaded machine
    try:
        model, loss_value = _fit(config, rows, tokenizer, prefix, seed, steps, batch, lr)
    finally:
        torch.set_num_threads(threads)
    facts = {"prompts": len(rows), "steps": steps if rows else 0, "final_loss": loss_value,
             "parameters": sum(p.numel() for p in model.parameters()),
             "seconds": round(time.perf_counter() - start, 3)}
    return model, facts


def _fit(config: Any, rows: list[list[int]], tokenizer: Any, prefix: int, seed: int, steps: int, batch: int,
         lr: float) -> tuple[Any, float | None]:
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config).float()
        generator = torch.Generator().manual_seed(seed)
        loss_value = None
        if rows:
            pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else prefix
            optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=WEIGHT_DECAY)
            model.train()
            with torch.enable_grad():
                for _ in range(steps):
                    picked = torch.randint(len(rows), (min(batch, len(rows)),), generator=generator).tolist()
                    width = max(len(rows[i]) for i in picked)
                    ids = torch.full((len(picked), width), pad, dtype=torch.long)
                    labels = torch.full((len(picked), width), -100, dtype=torch.long)
                    mask = torch.zeros((len(picked), width), dtype=torch.long)
                    for r, i in enumerate(picked):
                        n = len(rows[i])
                        ids[r, :n] = torch.tensor(rows[i])
                        labels[r, 1:n] = ids[r, 1:n]
                        mask[r, :n] = 1
                    optimizer.zero_grad()
                    loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
                    loss.backward()
                    optimizer.step()
                    loss_value = float(loss.detach())
        model.eval()
    return model, loss_value


def train_router_lms(config: Any, rows: Sequence[dict[str, Any]], labelled: Sequence[str], folder: Path,
                     journal: Any) -> list[Path]:
    """Train one router LM per policy member into `folder`/<index> (each written to a temporary
    folder, then renamed; `journal(record)` is called once per trained member). Members already
    there (a resumed run) are kept."""
    from transformers import AutoConfig, AutoTokenizer

    base = config.models.base
    base_config = AutoConfig.from_pretrained(base)
    tokenizer = AutoTokenizer.from_pretrained(base)
    tokens = prefix_tokens(config.policy)
    folders = router_lm_folders(folder, config.policy.members)
    for index, (name, prompts) in enumerate(zip(config.policy.members,
                                                member_prompts(rows, config.policy.members, labelled))):
        out = folders[index]
        if (out / "config.json").is_file():
            continue
        seed = int(torch.randint(2**31 - 1, (1,), generator=torch.Generator().manual_seed(config.seed * 1009 + index)))
        model, facts = train_router_lm(base_config, tokenizer, prompts, tokens, seed)
        tmp = out.with_name(out.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp)
        tokenizer.save_pretrained(tmp)
        (tmp / "router_lm.json").write_text(json.dumps({"member": name, "tokens": tokens, **facts}, indent=1) + "\n")
        tmp.rename(out)
        journal({"event": "router_lm", "member": name, "folder": str(out.relative_to(folder.parent)),
                 "tokens": tokens, **facts})
    return folders


def router_lm_folders(folder: Path, members: Sequence[str]) -> list[Path]:
    """Where each member's router LM lives (`folder`/<index>-<member name>)."""
    return [folder / f"{i}-{name.replace(':', '')}" for i, name in enumerate(members)]
