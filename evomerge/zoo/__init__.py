"""Model zoos built for the demo, the tests and the benchmarks, apart from the core package.

`demo`: tiny character-level Llama models (a base and one expert per skill) trained from
scratch in about two minutes on two cores.
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
