"""Where a command's start-up goes: imports, the driver's checks, Ray's start, the workers' start.

    python benchmarks/startup.py CONFIG [--workers N]

Runs, in one fresh process, what `evomerge search CONFIG` does before its first result comes back,
timing each phase: import torch / transformers / lm-eval / ray, the source check (a first call pays
transformers' lazy imports; a second call shows the check itself), the task check, `ray.init`, the
actors' start (each imports the same libraries and loads the models and tasks), and the first trial
(the base model) on a started worker. Prints one line per phase and the machine's load.
"""

from __future__ import annotations

import argparse
import os
import time


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("--workers", type=int, default=2)
    args = parser.parse_args()
    phases: list[tuple[str, float]] = []
    mark = time.perf_counter()

    def phase(name: str) -> None:
        nonlocal mark
        now = time.perf_counter()
        phases.append((name, now - mark))
        mark = now

    import torch  # noqa: F401

    phase("import torch")
    import transformers  # noqa: F401

    phase("import transformers")
    import lm_eval.tasks  # noqa: F401

    phase("import lm_eval.tasks")
    import ray

    phase("import ray")
    from evomerge.config import load_config
    from evomerge.evaluate import check_tasks
    from evomerge.genome import reference_recipes
    from evomerge.models.sources import check_sources
    from evomerge.trial import Trial

    config = load_config(args.config, [f"workers.count={args.workers}"])
    phase("load the config")
    sources = check_sources(config.models)
    phase("check the sources (first call)")
    check_sources(config.models)
    phase("check the sources (again)")
    check_tasks(config.eval)
    phase("check the tasks")
    from evomerge.workers import WorkerPool, start_ray

    start_ray(config.workers)
    phase("ray.init")
    pool = WorkerPool(config)
    pool.identities()
    phase(f"start {args.workers} workers (until each answers)")
    base = reference_recipes(len(config.models.experts), sources.num_layers)[0]
    for _ in pool.run([Trial(0, 0, base)]):
        pass
    phase("first trial on a started worker")
    pool.close()
    ray.shutdown()
    total = sum(seconds for _, seconds in phases)
    for name, seconds in phases:
        print(f"{name:<45} {seconds:6.1f} s  {seconds / total:5.1%}")
    print(f"{'total':<45} {total:6.1f} s   (load average {os.getloadavg()[0]:.1f}, {os.cpu_count()} CPUs)")


if __name__ == "__main__":
    main()
