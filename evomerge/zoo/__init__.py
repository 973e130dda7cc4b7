"""Model zoos built for the demo, the tests and the benchmarks, apart from the core package.

`demo`: tiny character-level Llama models (a base and one expert per skill) trained from
scratch in about two minutes on two cores.
`second`: tiny Qwen2 models with a BPE tokenizer, other skills, a multiple-choice and a mixed
task (`evomerge zoo --second`), trained with the demo's trainer; `real`: a pretrained 135M model
and experts fine-tuned from it.
"""

from evomerge.zoo.demo import (
    SKILLS,
    build_zoo,
    eval_examples,
    make_tokenizer,
    router_train_examples,
    write_demo_tasks,
    write_eval_data,
)

__all__ = ["SKILLS", "build_zoo", "eval_examples", "make_tokenizer", "router_train_examples", "write_demo_tasks",
           "write_eval_data"]
