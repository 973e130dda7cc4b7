"""Merge throughput: evomerge against mergekit's `mergekit-yaml`, same YAML, same models.

Builds a tiny-architecture Llama-style base and two experts (about 110 MB of fp32 each; a few
hundred kB with --quick), writes one mergekit YAML per method (linear, ties, dare_ties) and
times, alternating, whole processes from start to written output:

- mergekit: `mergekit-yaml CONFIG OUT` (mergekit is a benchmark dependency only:
  `pip install mergekit`);
- evomerge: `evomerge merge CONFIG --out DIR`.

Both pay Python's start and `import torch` (timed alone in the same run: the floor of any
torch tool, which caps the end-to-end ratio at these sizes).

It also times the in-memory merge alone (sources memory-mapped, pages already read, written
into a preallocated output: what a worker does per candidate) and a torch copy of the same source bytes in the
same process, and reports the merge's effective bandwidth as a share of the copy's: bytes of
the source tensors the method reads / seconds, for both (so the share is copy s / merge s).
Goals: end to end >= 5x faster than mergekit,
in-memory merge >= 40% of copy bandwidth. Each process's peak RSS is reported too.

`--zoo DIR` merges a real zoo instead (`python -m evomerge.cli zoo --real DIR`: SmolLM2-135M-Instruct
and its experts rev, sort, add), written to its own RESULTS section.
"""

from __future__ import annotations

import importlib.util
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import harness
import yaml

METHODS = ("linear", "ties", "dare_ties")
FULL = {"hidden": 512, "layers": 5, "intermediate": 2048, "vocab": 8192}
QUICK = {"hidden": 64, "layers": 2, "intermediate": 128, "vocab": 256}
GOAL_SPEEDUP = 5.0
GOAL_BANDWIDTH = 0.40
EXPERT_GENES = [{"weight": 0.6, "density": 0.5}, {"weight": 0.4, "density": 0.7}, {"weight": 0.5, "density": 0.6}]
REAL_EXPERTS = ("rev", "sort", "add")


def build_models(work: Path, sizes: dict[str, int]) -> dict[str, Path]:
    """base, e1, e2 under `work` (reused when already built with the same sizes)."""
    marker = work / "sizes.json"
    paths = {name: work / name for name in ("base", "e1", "e2")}
    if marker.exists() and json.loads(marker.read_text()) == sizes and all(p.is_dir() for p in paths.values()):
        return paths
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    harness.build_llama(paths["base"], seed=0, **sizes)
    for seed, name in enumerate(("e1", "e2"), start=1):
        harness.build_llama(paths[name], seed=seed, like=paths["base"], **sizes)
    marker.write_text(json.dumps(sizes))
    return paths


def mergekit_config(method: str, paths: dict[str, Path]) -> dict:
    """The YAML both tools merge: two experts, plus the base for the task-vector methods."""
    names = [name for name in paths if name != "base"]
    genes = [{"weight": g["weight"]} if method == "linear" else dict(g) for g in EXPERT_GENES[:len(names)]]
    config = {"merge_method": method, "dtype": "float32",
              "models": [{"model": str(paths[n]), "parameters": g} for n, g in zip(names, genes)]}
    if method == "linear":
        config["parameters"] = {"normalize": True}
    else:
        config["base_model"] = str(paths["base"])
        config["parameters"] = {"normalize": True, "rescale": method == "dare_ties"}
    return config


# --------------------------------------------------------------------------- the two tools


def run_mergekit(config: Path, out: Path) -> tuple[float, float]:
    """(Seconds, peak RSS in MB) of `mergekit-yaml CONFIG OUT`, process start to exit."""
    binary = Path(sys.executable).with_name("mergekit-yaml")
    command = [str(binary) if binary.exists() else "mergekit-yaml", str(config), str(out),
               "--no-copy-tokenizer", "--no-write-model-card", "--quiet", "--random-seed", "0"]
    return _timed(command)


def run_evomerge(config: Path, out: Path) -> tuple[float, float]:
    """(Seconds, peak RSS in MB) of `evomerge merge CONFIG --out OUT --force` (as `python -m
    evomerge.cli`, this checkout's code), process start to exit."""
    return _timed([sys.executable, "-m", "evomerge.cli", "merge", str(config), "--out", str(out), "--force"])


def _timed(command: list[str]) -> tuple[float, float]:
    """(Seconds, peak RSS in MB) of one process, start to exit."""
    with tempfile.TemporaryFile("w+") as err:
        start = time.perf_counter()
        process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=err, env=harness.offline_environment())
        _, status, usage = os.wait4(process.pid, 0)
        seconds = time.perf_counter() - start
        process.returncode = os.waitstatus_to_exitcode(status)
        if process.returncode != 0:
            err.seek(0)
            raise SystemExit(f"{command[0]} failed (exit {process.returncode}): {err.read().strip()[-2000:]}")
    return seconds, usage.ru_maxrss / 1e3  # ru_maxrss: kB on Linux


def import_floor() -> float:
    """Seconds for `python -c "import torch"`: what any tool built on torch pays before merging."""
    return _timed([sys.executable, "-c", "import torch"])[0]


def merger_for(config: dict):
    """(Merger over memory-mapped sources, the recipe, the base folder) for a mergekit-style config."""
    import torch
    from safetensors import safe_open

    from evomerge.genome import Recipe
    from evomerge.merge.merger import Merger
    from evomerge.models.sources import mapped_parameters

    experts = [Path(m["model"]) for m in config["models"]]
    base = Path(config.get("base_model") or experts[0])  # linear reads no base; its tensors give the names
    with safe_open(str(base / "model.safetensors"), framework="pt") as handle:
        shapes = {key: tuple(handle.get_slice(key).get_shape()) for key in handle.keys()}
    sources = [mapped_parameters(str(path), shapes, torch.float32) for path in [base, *experts]]
    if any(s is None for s in sources):
        raise SystemExit("a source folder lacks the base's tensors")
    genes = {gene: [float(m["parameters"][gene]) for m in config["models"]]
             for gene in config["models"][0]["parameters"]}
    recipe = Recipe(config["merge_method"], "global", 0, {"all": genes})
    return Merger(sources[0], sources[1:], seed=0), recipe, base


# --------------------------------------------------------------------------- in-memory merge


def in_memory(config: dict, repeats: int) -> tuple[float, float, int, int]:
    """(best merge seconds, best copy seconds, bytes of the source tensors the method reads)."""
    import torch

    from evomerge.merge import get_method

    merger, recipe, _ = merger_for(config)
    sources = ([merger.base] if get_method(recipe.method).needs_base else []) + merger.experts
    out = {name: torch.empty_like(t) for name, t in merger.base.items()}
    size = sum(t.numel() * t.element_size() for t in out.values())
    scratch = [{name: torch.empty_like(t) for name, t in source.items()} for source in sources]

    def merge() -> None:  # what a worker does: every merge written into the preallocated model
        for _ in merger.merged(recipe, into=out):
            pass

    def copy() -> None:
        for source, target in zip(sources, scratch):
            for name, tensor in source.items():
                target[name].copy_(tensor)

    merge()  # reads every source page once (they are memory-mapped)
    copy()
    merge_s, copy_s = [], []
    for _ in range(repeats):  # alternated, so both see the same machine
        merge_s.append(_seconds(merge))
        copy_s.append(_seconds(copy))
    return min(merge_s), min(copy_s), len(sources) * size


def _seconds(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


def max_difference(a: Path, b: Path) -> float:
    """Largest absolute difference between two merged folders' tensors."""
    from safetensors.torch import load_file

    ours = load_file(str(a / "model.safetensors"))
    theirs = {}
    for file in sorted(b.glob("*.safetensors")):
        theirs.update(load_file(str(file)))
    return max(float((ours[k] - theirs[k]).abs().max()) for k in ours)


def main() -> None:
    parse = harness.parser(__doc__.splitlines()[0])
    parse.add_argument("--work", type=Path, default=Path(tempfile.gettempdir()) / "evomerge-bench",
                       help="where the models are built (reused across runs)")
    parse.add_argument("--repeats", type=int, default=None, help="timed runs per tool and method")
    parse.add_argument("--methods", nargs="+", default=None, choices=METHODS, help="default: all three")
    parse.add_argument("--end-to-end-only", action="store_true", help="skip the in-memory merge and copy")
    parse.add_argument("--zoo", type=Path, default=None,
                       help="a real zoo (`evomerge zoo --real`): merge its base and experts rev, sort, add")
    args = parse.parse_args()
    host = harness.machine()
    harness.header("merge throughput", host)
    sizes = QUICK if args.quick else FULL
    repeats = args.repeats or (1 if args.quick else 3)
    methods = ("linear",) if args.quick else tuple(args.methods or METHODS)
    work = args.work / ("quick" if args.quick else "full") / ("merge-real" if args.zoo else "merge")
    if args.zoo:
        zoo = args.zoo.resolve()
        paths = {"base": zoo / "base", **{name: zoo / name for name in REAL_EXPERTS}}
        work.mkdir(parents=True, exist_ok=True)
        what = "the real zoo: SmolLM2-135M-Instruct (134.5M parameters) + 3 experts (rev, sort, add)"
    else:
        paths = build_models(work, sizes)
        what = f"base + 2 experts, Llama-style ({sizes})"
    model_mb = harness.folder_bytes(paths["base"]) / 1e6
    print(f"models: {what}, {model_mb:.1f} MB of fp32 each")
    has_mergekit = importlib.util.find_spec("mergekit") is not None
    if not has_mergekit:
        print("mergekit is not installed in this environment: `pip install mergekit` (a benchmark "
              "dependency only) to time it; timing evomerge alone")

    rows, failures, floors, timings = [], [], [], {}
    for method in methods:
        config = mergekit_config(method, paths)
        config_path = work / f"{method}.yaml"
        config_path.write_text(yaml.safe_dump(config))
        evo_s, kit_s, evo_mb, kit_mb = [], [], [], []
        for _ in range(repeats):
            seconds, peak = run_evomerge(config_path, work / f"out-evomerge-{method}")
            evo_s.append(seconds)
            evo_mb.append(peak)
            if has_mergekit:
                seconds, peak = run_mergekit(config_path, work / f"out-mergekit-{method}")
                kit_s.append(seconds)
                kit_mb.append(peak)
            floors.append(import_floor())
        timings[method] = (config, evo_s, kit_s, evo_mb, kit_mb)
    # Only then the in-memory merges and the output comparison: a child process starts with its
    # parent's peak RSS (fork, then exec), so this process stays small while the tools run.
    for method in methods:
        config, evo_s, kit_s, evo_mb, kit_mb = timings[method]
        merge_s, copy_s, source_bytes = (in_memory(config, repeats=max(3, repeats)) if not args.end_to_end_only
                                         else (float("nan"), float("nan"), 0))
        share = copy_s / merge_s
        evo, kit = statistics.median(evo_s), statistics.median(kit_s) if kit_s else float("nan")
        speedup = kit / evo
        difference = (max_difference(work / f"out-evomerge-{method}", work / f"out-mergekit-{method}")
                      if has_mergekit and method != "dare_ties" else float("nan"))
        print(f"{method:10s} end to end: evomerge {evo:.2f} s, mergekit {kit:.2f} s -> {speedup:.1f}x "
              f"(goal >= {GOAL_SPEEDUP:g}x); in memory: merge {merge_s:.3f} s "
              f"({source_bytes / merge_s / 1e9:.2f} GB/s), copy {copy_s:.3f} s ({source_bytes / copy_s / 1e9:.2f} GB/s)"
              f" -> {share:.0%} of copy bandwidth (goal >= {GOAL_BANDWIDTH:.0%}); max |evomerge - mergekit| "
              f"{difference:.2g}; peak RSS evomerge {max(evo_mb):.0f} MB, mergekit "
              f"{max(kit_mb) if kit_mb else float('nan'):.0f} MB", flush=True)
        speed_verdict = harness.verdict(speedup, GOAL_SPEEDUP) if has_mergekit else "not measured"
        rows.append([method, f"{evo:.2f}", f"{kit:.2f}", f"**{speedup:.1f}x**", speed_verdict,
                     f"{merge_s * 1e3:.0f}", f"{copy_s * 1e3:.0f}", f"**{share:.0%}**",
                     harness.verdict(share, GOAL_BANDWIDTH), f"{difference:.1g}", f"{max(evo_mb):.0f}",
                     f"{max(kit_mb):.0f}" if kit_mb else "-"])
        failures += [f"{method} speedup"] * (speed_verdict == "FAIL")
        failures += [f"{method} bandwidth"] * (share < GOAL_BANDWIDTH)

    floor = statistics.median(floors)
    kit_all = [float(row[2]) for row in rows]
    print(f"python -c 'import torch': {floor:.2f} s (median of {len(floors)}): no torch tool can be more than "
          f"{min(kit_all) / floor:.1f}x faster than mergekit end to end here")
    body = (f"{what[0].upper() + what[1:]}, {model_mb:.0f} MB fp32 each; median of {repeats} "
            f"alternating runs per tool (whole processes, imports included; `python -c 'import torch'` alone, "
            f"timed between them: {floor:.2f} s, so no torch-based tool can be more than "
            f"{min(kit_all) / floor:.1f}x faster than mergekit end to end at this size). In memory: best of "
            f"{max(3, repeats)}; bandwidth = bytes of the source tensors the method reads / s, for the "
            f"merge and for a torch copy of the same tensors into preallocated buffers. "
            f"Goals: speedup >= {GOAL_SPEEDUP:g}x, bandwidth >= "
            f"{GOAL_BANDWIDTH:.0%} of copy. The last column compares the two tools' outputs "
            f"(dare_ties draws different random masks in each tool); peak RSS: the largest of the "
            f"tool's processes (os.wait4).\n\n"
            + harness.table(rows, ["method", "evomerge s", "mergekit s", "speedup", "goal 5x",
                                   "merge ms", "copy ms", "of copy bw", "goal 40%", "max abs diff",
                                   "evomerge peak MB", "mergekit peak MB"]))
    if not has_mergekit:
        body += "\n\nmergekit was not installed: `pip install mergekit` to time it."
    harness.write_section(harness.results_path(args), "Merge throughput: real zoo" if args.zoo else "Merge throughput",
                          host, body)
    print("result:", "pass" if not failures else "FAIL (" + ", ".join(failures) + ")")


if __name__ == "__main__":
    main()
