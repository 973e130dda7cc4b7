"""One compiled pass for a task-vector mix whose masks come from a prepared store (CPU only).

`chunked.mix_task_vectors_into` runs a TIES merge as some thirty tensor operations per slice,
each reading and writing its slice: on a model whose experts changed every tensor a candidate's
merge cost about five linear merges (benchmarks/RESULTS.md, "On a real model: merge phase"). Here
the same arithmetic is one C loop (`SOURCE`, compiled once per machine with the system's C
compiler and called through ctypes): every source entry is read once and the target written once.

It applies where a search worker merges with a `prepared.Prepared` store active, the sources and
the target are float32 on the CPU, and every mask is a magnitude rule read from the store
(`prepared.ThresholdKeep` for TIES, `prepared.BandKeep` for breadcrumbs) or absent. Anything else
(bool masks, DARE's and DELLA's draws, a GPU, bfloat16, no C compiler) takes the eager path. Both
give the same values: the loop makes the eager path's float32 operations in the same order,
compiled without fast-math and without contraction into fused multiply-adds, so each entry is
rounded as there (`tests/test_merge_fused.py` holds the two equal, up to the sign of a zero).

The mask rules, per expert: keep |delta| > low and (breadcrumbs) |delta| <= high, where each
bound has one value before a flat index and another from it on: the tie cut-offs of `prepared`
(the k-th largest magnitude's ties are kept up to a flat index). No mask: low = -inf.

EVOMERGE_FUSED=0 turns the loop off; `CC` names the compiler (default `cc`). The library is
cached under `cache_dir()` by a hash of its source and flags: about a second to build, once.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import subprocess
import tempfile
from collections.abc import Sequence
from pathlib import Path

import torch

from evomerge.merge import prepared

log = logging.getLogger(__name__)

MAX_EXPERTS = 8  # the loop is compiled for 1..8 live experts; more: the eager path

SOURCE = r"""
#include <math.h>
#include <stdint.h>

#define MAX_EXPERTS 8

/* 1.0f where a comparison holds, else 0.0f: a product with it keeps or zeroes a value with no
   branch (x * 1 is x exactly; x * 0 is a zero), so the entries' loop vectorizes on any target. */
#define ONE_IF(c) ((float)(c))

/* Entries [from, to) of out = base + lambda * mix(scale_i * keep_i * (x_i - base)), where expert
   i keeps low[i] < |delta| (and, banded, |delta| <= high[i]): the eager loop of
   evomerge/merge/chunked.py, entry by entry, in float32 and in its order of operations (up to the
   sign of a zero). K is a constant at each call below, so the experts' loops unroll. */
static inline __attribute__((always_inline)) void mix_run(
    const int K, float *restrict out, const float *restrict base, const float *const *experts, int64_t from,
    int64_t to, const float *low, const float *high, const float *scale, const float *weight, float divisor,
    float lambda, const int consensus, const int normalize, const int banded)
{
    const float *restrict x[MAX_EXPERTS]; /* restrict: no run-time alias checks, which kept GCC scalar */
    float lo[MAX_EXPERTS], hi[MAX_EXPERTS], s[MAX_EXPERTS], w[MAX_EXPERTS];
    for (int i = 0; i < K; i++) {
        x[i] = experts[i]; lo[i] = low[i]; hi[i] = high[i]; s[i] = scale[i]; w[i] = weight[i];
    }
    for (int64_t j = from; j < to; j++) {
        const float b = base[j];
        float d[MAX_EXPERTS];
#pragma GCC unroll 8
        for (int i = 0; i < K; i++) {
            float v = x[i][j] - b, a = fabsf(v);
            float keep = banded ? ONE_IF((a > lo[i]) & (a <= hi[i])) : ONE_IF(a > lo[i]);
            d[i] = v * s[i] * keep;
        }
        float mixed = d[0];
#pragma GCC unroll 8
        for (int i = 1; i < K; i++)
            mixed = mixed + d[i];
        if (consensus) {
            /* elect the sum's sign; keep the deltas that have it (their magnitudes, summed, times the sign) */
            const float elected = 1.0f - 2.0f * ONE_IF(mixed < 0.0f);
#pragma GCC unroll 8
            for (int i = 0; i < K; i++) {
                float v = d[i] * elected;
                d[i] = v * ONE_IF(v > 0.0f);
            }
            mixed = d[0];
#pragma GCC unroll 8
            for (int i = 1; i < K; i++)
                mixed = mixed + d[i];
            mixed = mixed * elected;
            if (normalize) {
                float total = w[0] * ONE_IF(d[0] > 0.0f);
#pragma GCC unroll 8
                for (int i = 1; i < K; i++)
                    total = total + w[i] * ONE_IF(d[i] > 0.0f);
                mixed = mixed / (total + ONE_IF(total == 0.0f));
            }
        } else if (normalize) {
            mixed = mixed / divisor;
        }
        out[j] = mixed * lambda + b;
    }
}

#define RUN(K, C, N, B) mix_run(K, out, base, experts, from, to, low, high, scale, weight, divisor, lambda, C, N, B)
#define BANDED(K, C, N) (banded ? RUN(K, C, N, 1) : RUN(K, C, N, 0))
#define FLAGS(K) \
    (consensus ? (normalize ? BANDED(K, 1, 1) : BANDED(K, 1, 0)) : (normalize ? BANDED(K, 0, 1) : BANDED(K, 0, 0)))

static void run(int count, float *out, const float *base, const float *const *experts, int64_t from, int64_t to,
                const float *low, const float *high, const float *scale, const float *weight, float divisor,
                float lambda, int consensus, int normalize, int banded)
{
    switch (count) {
    case 1: FLAGS(1); break;
    case 2: FLAGS(2); break;
    case 3: FLAGS(3); break;
    case 4: FLAGS(4); break;
    case 5: FLAGS(5); break;
    case 6: FLAGS(6); break;
    case 7: FLAGS(7); break;
    default: FLAGS(8); break;
    }
}

/* The whole tensor: expert i's bounds are bounds[4i] (low) and bounds[4i + 2] (high) before its
   flat indices splits[2i] and splits[2i + 1], bounds[4i + 1] and bounds[4i + 3] from them on; the
   entries are cut into runs between consecutive split points, where every bound is one value. */
void evomerge_mix(float *out, const float *base, const float *const *experts, int count, const int64_t *splits,
                  const float *bounds, const float *scale, const float *weight, float divisor, float lambda,
                  int consensus, int normalize, int banded, int64_t numel)
{
    int64_t from = 0;
    while (from < numel) {
        int64_t to = numel;
        float low[MAX_EXPERTS], high[MAX_EXPERTS];
        for (int i = 0; i < count; i++) {
            const int64_t low_split = splits[2 * i], high_split = splits[2 * i + 1];
            low[i] = bounds[4 * i + (from < low_split ? 0 : 1)];
            high[i] = bounds[4 * i + (from < high_split ? 2 : 3)];
            if (low_split > from && low_split < to) to = low_split;
            if (high_split > from && high_split < to) to = high_split;
        }
        run(count, out, base, experts, from, to, low, high, scale, weight, divisor, lambda, consensus, normalize,
            banded);
        from = to;
    }
}
"""

# No fast-math and no contraction of a * b + c into one rounding: the eager operations' roundings.
# -fno-trapping-math lets the compiler vectorize comparisons (it only gives up floating-point
# exception flags, which nothing reads); -march=native: the build machine's vector width (the
# library is cached per CPU), dropped where the compiler does not take it.
FLAGS = ("-O3", "-shared", "-fPIC", "-ffp-contract=off", "-fno-fast-math", "-fno-trapping-math")
NATIVE = "-march=native"

_ENABLED = os.environ.get("EVOMERGE_FUSED", "1") != "0"
_library: ctypes.CDLL | None = None
_failed = False  # building or loading failed once: the eager path from then on


def cache_dir() -> Path:
    """Where the built library is kept: $EVOMERGE_CACHE, else ~/.cache/evomerge."""
    root = os.environ.get("EVOMERGE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "evomerge")
    return Path(root) / "kernels"


def _cpu() -> str:
    """What identifies this CPU's instruction sets (a cache shared by machines keeps one build each)."""
    try:
        lines = Path("/proc/cpuinfo").read_text().splitlines()
    except OSError:
        lines = []
    facts = [line for line in lines if line.startswith(("model name", "flags", "Features"))][:2]
    return "\n".join([platform.machine(), platform.processor(), *facts])


def _compile(compiler: str, flags: Sequence[str], path: Path) -> None:
    """Build the library at `path` (written to a temporary name, then renamed, so that workers
    building at once each see a whole file). Raises OSError with the compiler's first words."""
    path.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=path.parent) as tmp:
        c_file, so_file = Path(tmp) / "mix.c", Path(tmp) / "mix.so"
        c_file.write_text(SOURCE)
        done = subprocess.run([compiler, *flags, str(c_file), "-o", str(so_file), "-lm"],
                              capture_output=True, text=True)
        if done.returncode != 0:
            raise OSError(f"{compiler} exited with {done.returncode}: {done.stderr.strip()[:300]}")
        os.replace(so_file, path)


def _build() -> ctypes.CDLL:
    """The compiled loop, from `cache_dir()` or built there (with -march=native where the compiler
    takes it), keyed by the compiler, the flags, the source and the CPU."""
    compiler = os.environ.get("CC", "cc")
    for flags in ((*FLAGS, NATIVE), FLAGS):
        digest = hashlib.sha256("\0".join((compiler, SOURCE, *flags, _cpu())).encode()).hexdigest()[:16]
        path = cache_dir() / f"mix-{digest}.so"
        try:
            if not path.exists():
                _compile(compiler, flags, path)
            break
        except OSError:
            if NATIVE not in flags:
                raise
    library = ctypes.CDLL(str(path))
    f = library.evomerge_mix
    f.restype = None
    f.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int, ctypes.c_void_p,
                  ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_float, ctypes.c_float,
                  ctypes.c_int, ctypes.c_int, ctypes.c_int, ctypes.c_int64]
    return library


def library() -> ctypes.CDLL | None:
    """The loaded loop; None where it is off or could not be built (logged once)."""
    global _library, _failed
    if not _ENABLED:
        return None
    if _library is None and not _failed:
        try:
            _library = _build()
        except (OSError, subprocess.SubprocessError) as exc:
            _failed = True
            log.warning("merge: no compiled mix (%s); merging with the eager path (same values, slower)", exc)
    return _library


_INF = float("inf")


def _rule(keep: prepared.Keep | None, numel: int) -> tuple[tuple[int, int], tuple[float, float, float, float]] | None:
    """(splits, bounds) of a mask, as the loop takes them; None for a mask it cannot express."""
    if keep is None:
        return (0, 0), (-_INF, -_INF, _INF, _INF)
    if isinstance(keep, prepared.ThresholdKeep):  # |delta| >= t up to the cut-off (ties kept), > t after
        split = numel if keep.cutoff is None else keep.cutoff + 1
        return (split, 0), (prepared.at_least(keep.threshold, torch.float32), keep.threshold, _INF, _INF)
    if isinstance(keep, prepared.BandKeep):  # above low (tied from low_from on), at most high (tied up to high_to)
        low_split, low = (0, (-_INF, -_INF)) if keep.low is None else (
            keep.low_from, (keep.low, prepared.at_least(keep.low, torch.float32)))
        high_split, high = (0, (_INF, _INF)) if keep.high is None else (
            keep.high_to + 1, (keep.high, prepared.at_least(keep.high, torch.float32)))
        return (low_split, high_split), (*low, *high)
    return None


def _f32(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32)


def mix_into(out: torch.Tensor, base: torch.Tensor, experts: Sequence[torch.Tensor],
             masks: Sequence[torch.Tensor | prepared.Keep | None], scale: Sequence[float], weight: Sequence[float],
             *, consensus: bool, normalize: bool, lambda_: float, divisor: float) -> bool:
    """`chunked.mix_task_vectors_into`'s mix written into `out` by the compiled loop; False (nothing
    written) where it does not apply, and the caller runs the eager loop."""
    tensors = [out, base, *experts]
    if (base.numel() < prepared.MIN_NUMEL or len(experts) > MAX_EXPERTS
            or any(t.dtype != torch.float32 or t.device.type != "cpu" or not t.is_contiguous() for t in tensors)
            or any(isinstance(mask, torch.Tensor) for mask in masks)):
        return False
    rules = [_rule(mask, base.numel()) for mask in masks]  # type: ignore[arg-type]
    if any(rule is None for rule in rules) or library() is None:
        return False
    splits = torch.tensor([rule[0] for rule in rules], dtype=torch.int64)  # type: ignore[index]
    bounds = _f32([bound for rule in rules for bound in rule[1]])  # type: ignore[index]
    scale_t, weight_t = _f32(scale), _f32(weight)
    pointers = (ctypes.c_void_p * len(experts))(*(x.data_ptr() for x in experts))
    banded = any(isinstance(mask, prepared.BandKeep) and mask.high is not None for mask in masks)
    # float32 scalars as the eager path has them (a Python float meets a float32 tensor as float32)
    library().evomerge_mix(out.data_ptr(), base.data_ptr(), pointers, len(experts), splits.data_ptr(),
                           bounds.data_ptr(), scale_t.data_ptr(), weight_t.data_ptr(), divisor, lambda_,
                           int(consensus), int(normalize), int(banded), base.numel())
    return True
