"""Memory: peak RSS while merging K models of S bytes each; goal at most (K + 2) x S.

For each K (base + K-1 experts, Llama-style, about 110 MB of fp32 each; 8 MB with --quick) a
fresh process imports evomerge and the model's transformers modules, notes its RSS, builds what a worker builds
(`load_merge_target`: the target model plus the K sources, memory-mapped from safetensors) and
merges a TIES recipe into the model twice. Its peak RSS (`resource.getrusage`) minus the RSS
after the imports is compared with (K + 2) x S. Side by side, the same process shape with every
source loaded through `from_pretrained` (copies, what the merger held before) shows what the
mapping saves. Mapped pages that were read count in RSS (they are file-backed, so the OS may
drop them under pressure; copies it may not).
"""

from __future__ import annotations

import json
import resource
import subprocess
import sys
import tempfile
from pathlib import Path

import harness

FULL = {"hidden": 512, "layers": 5, "intermediate": 2048, "vocab": 8192}
QUICK = {"hidden": 256, "layers": 2, "intermediate": 512, "vocab": 2048}


def build_models(work: Path, sizes: dict[str, int], count: int) -> list[Path]:
    """m0 (the base) .. m{count-1} under `work`, reused when built with the same sizes."""
    paths = [work / f"m{i}" for i in range(count)]
    marker = work / "sizes.json"
    if not (marker.exists() and json.loads(marker.read_text()) == sizes):
        for path in work.glob("m*"):
            subprocess.run(["rm", "-rf", str(path)], check=True)
        work.mkdir(parents=True, exist_ok=True)
        marker.write_text(json.dumps(sizes))
    for i, path in enumerate(paths):
        if not (path / "model.safetensors").exists():
            harness.build_llama(path, seed=i, like=None if i == 0 else paths[0], **sizes)
    return paths


def measure(paths: list[Path], eager: bool) -> dict[str, float]:
    """In this (fresh) process: RSS after imports and peak RSS over two merges, in bytes."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    from evomerge.config import ModelsConfig
    from evomerge.genome import Recipe
    from evomerge.merge.merger import Merger, load_merge_target
    from evomerge.models.sources import load_model

    with torch.device("meta"):  # imports the architecture's modules, allocates nothing
        AutoModelForCausalLM.from_config(AutoConfig.from_pretrained(paths[0]))
    baseline = current_rss()
    models = ModelsConfig(base=str(paths[0]), experts=[str(p) for p in paths[1:]], device="cpu", check_finite=False)
    cpu = torch.device("cpu")
    if eager:
        model = load_model(models.base, models, cpu)
        sources = [{n: p.detach().clone() for n, p in model.named_parameters()}]
        for path in models.experts:
            sources.append({n: p.detach() for n, p in load_model(path, models, cpu).named_parameters()})
        merger = Merger(sources[0], sources[1:], seed=0)
    else:
        model, merger = load_merge_target(models, seed=0, device=cpu)
    experts = len(models.experts)
    recipe = Recipe("ties", "global", 0, {"all": {"weight": [1.0 / experts] * experts, "density": [0.5] * experts}})
    merger.merge_into(model, recipe)
    merger.merge_into(model, recipe)
    return {"baseline": baseline, "peak": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0}


def current_rss() -> float:
    """This process's resident set in bytes (Linux /proc; psutil elsewhere)."""
    statm = Path("/proc/self/statm")
    if statm.exists():
        return int(statm.read_text().split()[1]) * resource.getpagesize()
    import psutil

    return float(psutil.Process().memory_info().rss)


def in_subprocess(paths: list[Path], eager: bool) -> dict[str, float]:
    command = [sys.executable, str(Path(__file__).resolve()), "--measure", *map(str, paths)]
    done = subprocess.run(command + (["--eager"] if eager else []), capture_output=True, text=True,
                          env=harness.offline_environment())
    if done.returncode != 0:
        raise SystemExit(f"measuring K={len(paths)} failed: {done.stderr.strip()[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> None:
    parse = harness.parser(__doc__.splitlines()[0])
    parse.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "evomerge-bench")
    parse.add_argument("--measure", nargs="+", type=Path, help=argparse_hidden())
    parse.add_argument("--eager", action="store_true", help=argparse_hidden())
    args = parse.parse_args()
    if args.measure:
        print(json.dumps(measure(args.measure, args.eager)))
        return
    host = harness.machine()
    harness.header("memory", host)
    sizes = QUICK if args.quick else FULL
    ks = (2, 3) if args.quick else (2, 3, 4, 5)
    paths = build_models(args.work / ("quick" if args.quick else "full") / "memory", sizes, max(ks))
    size = harness.folder_bytes(paths[0])
    print(f"S = {size / 1e6:.1f} MB per model ({sizes})")
    rows, failed = [], []
    for k in ks:
        mapped = in_subprocess(paths[:k], eager=False)
        eager = in_subprocess(paths[:k], eager=True)
        used, copied = mapped["peak"] - mapped["baseline"], eager["peak"] - eager["baseline"]
        goal = (k + 2) * size
        print(f"K={k}: peak - baseline {used / 1e6:.0f} MB = {used / size:.2f} S (goal <= {k + 2} S): "
              f"{harness.verdict(used, goal, higher_is_better=False)}; loaded copies {copied / 1e6:.0f} MB = "
              f"{copied / size:.2f} S; baseline after imports {mapped['baseline'] / 1e6:.0f} MB", flush=True)
        rows.append([str(k), f"{used / 1e6:.0f}", f"**{used / size:.2f} S**", f"{k + 2} S",
                     harness.verdict(used, goal, higher_is_better=False), f"{copied / size:.2f} S",
                     f"{mapped['baseline'] / 1e6:.0f}"])
        failed += [k] * (used > goal)
    body = (f"K models (base + K-1 experts, Llama-style {sizes}) of S = {size / 1e6:.1f} MB fp32 each, "
            f"a TIES merge of all of them into the target model, twice, each K in a fresh process. "
            f"Peak RSS minus the RSS after imports, in units of S; the next-to-last column is the same "
            f"process with every source loaded by `from_pretrained` (copies) instead of memory-mapped.\n\n"
            + harness.table(rows, ["K", "peak MB", "peak / S", "goal", "pass", "copies / S", "imports MB"]))
    harness.write_section(harness.results_path(args), "Memory", host, body)
    print("result:", "pass" if not failed else f"FAIL for K={failed}")


def argparse_hidden() -> str:
    import argparse

    return argparse.SUPPRESS


if __name__ == "__main__":
    main()
