"""Merge kernels before and after, side by side: one trained tensor of the real zoo, every method.

The general path of the merge phase (every expert's task vector nonzero, as in a fine-tune that
touches every tensor), on the real zoo's trained tensors (an attention output and an MLP down
projection of layer 20: real task vectors, with their ties), with the prepared store filled as a
worker has it. Each timed merge alternates with the same merge by an older checkout of evomerge
(`--old DIR`: a copy of its `evomerge` package renamed `evomerge_old`, e.g. `git archive 9492ce2
evomerge`), so the ratio sees the same load. (Against linear, see real_model.py --merge-only: these
two tensors fit in the CPU's cache, which favours linear's few passes over them by 2-10x.)
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

import harness

TENSORS = ("model.layers.20.self_attn.o_proj.weight", "model.layers.20.mlp.down_proj.weight")
GENES = {"weight": [0.6, 0.4, 0.5], "density": [0.5, 0.7, 0.6]}
METHODS = {"ties": {}, "dare_ties": {"seed": 5}, "breadcrumbs_ties": {"gamma": [0.01] * 3},
           "della": {"epsilon": [0.1] * 3, "seed": 5}}


def main() -> None:
    parse = harness.parser(__doc__.splitlines()[0])
    parse.add_argument("--zoo", type=Path, default=harness.REPO / "runs" / "real_zoo")
    parse.add_argument("--old", type=Path, default=None, help="a folder holding an older evomerge as evomerge_old")
    parse.add_argument("--repeats", type=int, default=7)
    args = parse.parse_args()
    host = harness.machine()
    harness.header("merge kernels", host)
    import torch
    from safetensors import safe_open

    torch.set_num_threads(1)
    from evomerge.merge import get_method
    from evomerge.merge.prepared import Prepared

    old = None
    if args.old:
        sys.path.insert(0, str(args.old.resolve()))
        import evomerge_old.merge as old_merge
        from evomerge_old.merge.prepared import Prepared as OldPrepared

        old = (old_merge.get_method, OldPrepared)
    sources = []
    for name in ("base", "rev", "sort", "add"):
        with safe_open(str(args.zoo / name / "model.safetensors"), framework="pt") as handle:
            sources.append({t: handle.get_tensor(t) for t in TENSORS})
    rows = []
    for method, extra in METHODS.items():
        genes = {**GENES, **extra}
        if method == "della":
            genes["density"] = [0.5, 0.7, 0.6]
        stores = {"new": Prepared(skip_unchanged=False), "old": old[1]() if old else None}
        out = {t: torch.empty_like(sources[0][t]) for t in TENSORS}

        def merge(which: str) -> float:
            fn = (get_method if which == "new" else old[0])(method).fn
            store = stores.get(which)
            start = time.perf_counter()
            for t in TENSORS:
                with store.active():
                    fn(sources[0][t], [s[t] for s in sources[1:]], out=out[t], **genes)
            return time.perf_counter() - start

        kinds = ["new"] + (["old"] if old else [])
        for kind in kinds:
            merge(kind)  # fills the stores
        seconds = {kind: [] for kind in kinds}
        for _ in range(args.repeats):
            for kind in kinds:
                seconds[kind].append(merge(kind))
        median = {kind: statistics.median(s) for kind, s in seconds.items()}
        line = [method, f"{median['new'] * 1e3:.0f}"]
        if old:
            line += [f"{median['old'] * 1e3:.0f}", f"**{median['old'] / median['new']:.2f}x**"]
        rows.append(line)
        print(" | ".join(line), flush=True)
    head = ["method", "now ms"] + (["before ms", "speed-up"] if old else [])
    body = (f"The general path (every task vector nonzero) on two trained tensors of the real zoo's layer 20 "
            f"(o_proj 576x576 and down_proj 576x1536, 3 experts: real task vectors and their ties), float32, one "
            f"thread, the prepared store filled; 'before': the same merges by the code of commit 9492ce2 (its "
            f"own store) in the same process, alternating; median of {args.repeats}. Genes: "
            f"weights {GENES['weight']}, densities {GENES['density']} (breadcrumbs gamma 0.01, della epsilon "
            f"0.1). Against linear: `real_model.py --merge-only` (these tensors fit in the CPU's cache, which "
            f"favours linear's few passes). Shared machine: other processes on 2 cores.\n\n"
            + harness.table(rows, head))
    harness.write_section(harness.results_path(args), "Merge kernels: general path", host, body)


if __name__ == "__main__":
    main()
