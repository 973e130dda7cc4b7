"""One compiled pass for a task-vector mix, and the L1 sums of its rescale (CPU, float32).

`chunked.mix_task_vectors_into` runs a TIES merge as some thirty tensor operations per slice,
each reading and writing its slice: on a model whose experts changed every tensor a candidate's
merge cost about five linear merges, DELLA twelve (benchmarks/RESULTS.md, "On a real model: merge
phase"). Here the same arithmetic is one C loop (`SOURCE`, compiled once per machine with the
system's C compiler and called through ctypes): every source entry is read once and the target
written once.

`mix_into` applies where a search worker merges with a `prepared.Prepared` store active, the
sources and the target are float32 or bfloat16 on the CPU (bfloat16 is read widened to float32,
and each slice's float32 result narrowed by torch, as the eager path does), and every mask is a
rule read from the store or
absent: TIES's threshold with its tie cut-off (`prepared.ThresholdKeep`), breadcrumbs' band
(`BandKeep`), DARE's draws (`DrawKeep`), DELLA's MagPrune (`MagPruneKeep`). Anything else (bool
masks, a GPU, float16, more than 8 live experts, no C compiler) takes the eager path. Both give
the same values: the loop makes the eager path's float32 operations in the same order, compiled
without fast-math and without contraction into fused multiply-adds, so each entry is rounded as
there (`tests/test_merge_fused.py` holds the two equal, up to the sign of a zero).

`l1_norms` gives a rescale's two L1 sums (the task vector's, its kept part's) in double, in one
fixed order, for a bool mask or a store's rule alike: a worker (rules) and an export (bool masks)
compute the same factor.

EVOMERGE_FUSED=0 turns the loop off; `CC` names the compiler (default `cc`). The library is
cached under `cache_dir()` by a hash of its source, flags, compiler and CPU: about a second to
build, once.
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
from typing import NamedTuple

import torch

from evomerge.merge import prepared

log = logging.getLogger(__name__)

MAX_EXPERTS = 8  # the loop is compiled for 1..8 live experts (SOURCE: its #define and switch); more: eager

SOURCE = r"""
#include <math.h>
#include <stdint.h>
#include <string.h>

#define MAX_EXPERTS 8
#define LANES 16 /* the L1 sums' partial sums, added in a fixed order (the same on every machine) */

/* 1.0f where a comparison holds, else 0.0f: a product with it keeps or zeroes a value with no
   branch (x * 1 is x exactly; x * 0 is a zero), so the entries' loop vectorizes on any target. */
#define ONE_IF(c) ((float)(c))

/* Source entry j as float32: a float32 read, or a bfloat16's bits widened (exact). BF16 is a
   constant at each call, so the branch folds away. */
static inline __attribute__((always_inline)) float load(const void *p, int64_t j, const int BF16)
{
    if (BF16) {
        uint32_t bits = (uint32_t)((const uint16_t *)p)[j] << 16;
        float value;
        memcpy(&value, &bits, sizeof value);
        return value;
    }
    return ((const float *)p)[j];
}

/* The mask rules (evomerge/merge/fused.py): with a = |delta|, u a draw and r a doubled rank,
   ABOVE: a > p; BAND: a > p and a <= q; DRAWS: u < p; MAGPRUNE: u < r * p + q. */
enum { ABOVE, BAND, DRAWS, MAGPRUNE, MASK };
#define KEEP(rule, a, p, q, u, r) \
    ((rule) == ABOVE ? ONE_IF((a) > (p)) : (rule) == BAND ? ONE_IF(((a) > (p)) & ((a) <= (q))) \
     : (rule) == DRAWS ? ONE_IF((u) < (p)) : ONE_IF((u) < (r) * (p) + (q)))

/* Entries [from, to) of out = base + lambda * mix(scale_i * keep_i * (x_i - base)), with expert
   i's rule bounds p[i], q[i] (draws u_i, doubled ranks r_i): the eager loop of
   evomerge/merge/chunked.py, entry by entry, in float32 and in its order of operations (up to the
   sign of a zero); entry j is written to out[j - shift]. K and the flags are constants at each
   call below, so the experts' loops unroll. */
static inline __attribute__((always_inline)) void mix_run(
    const int K, float *restrict out, int64_t shift, const void *restrict base, const void *const *experts,
    const float *const *draws, const float *const *ranks, int64_t from, int64_t to, const float *low,
    const float *high, const float *scale, const float *weight, float divisor, float lambda, const int consensus,
    const int normalize, const int rule, const int BF16)
{
    /* restrict: no run-time alias checks, which kept GCC from vectorizing */
    const void *restrict x[MAX_EXPERTS];
    const float *restrict u[MAX_EXPERTS], *restrict r[MAX_EXPERTS];
    float p[MAX_EXPERTS], q[MAX_EXPERTS], s[MAX_EXPERTS], w[MAX_EXPERTS];
    for (int i = 0; i < K; i++) {
        x[i] = experts[i]; p[i] = low[i]; q[i] = high[i]; s[i] = scale[i]; w[i] = weight[i];
        u[i] = draws[i]; /* read only by the rules that draw */
        r[i] = ranks[i];
    }
    for (int64_t j = from; j < to; j++) {
        const float b = load(base, j, BF16);
        float d[MAX_EXPERTS];
#pragma GCC unroll 8
        for (int i = 0; i < K; i++) {
            float v = load(x[i], j, BF16) - b, a = fabsf(v);
            d[i] = v * s[i] * KEEP(rule, a, p[i], q[i], u[i][j], r[i][j]);
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
        out[j - shift] = mixed * lambda + b;
    }
}

#define RUN(K, C, N, R) (bf16 ? RUN_AS(K, C, N, R, 1) : RUN_AS(K, C, N, R, 0))
#define RUN_AS(K, C, N, R, H) \
    mix_run(K, out, shift, base, experts, draws, ranks, from, to, low, high, scale, weight, divisor, lambda, C, N, R, H)
#define RULES(K, C, N) \
    (rule == ABOVE ? RUN(K, C, N, ABOVE) : rule == BAND ? RUN(K, C, N, BAND) \
     : rule == DRAWS ? RUN(K, C, N, DRAWS) : RUN(K, C, N, MAGPRUNE))
#define FLAGS(K) \
    (consensus ? (normalize ? RULES(K, 1, 1) : RULES(K, 1, 0)) : (normalize ? RULES(K, 0, 1) : RULES(K, 0, 0)))

static void run(int count, float *out, int64_t shift, const void *base, const void *const *experts,
                const float *const *draws, const float *const *ranks, int64_t from, int64_t to, const float *low,
                const float *high, const float *scale, const float *weight, float divisor, float lambda,
                int consensus, int normalize, int rule, int bf16)
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

/* Entries [start, stop) of a tensor, entry j written to out[j - start] (float32); the sources are
   float32, or bfloat16 where bf16 is set. Expert i's bounds are bounds[4i] (p) and bounds[4i + 2]
   (q) before its flat indices splits[2i] and splits[2i + 1], bounds[4i + 1] and bounds[4i + 3] from
   them on (the tie cut-offs of the magnitude rules; the draw rules have no split): the entries are
   cut into runs between consecutive split points, where every bound is one value. */
void evomerge_mix(float *out, const void *base, const void *const *experts, const float *const *draws,
                  const float *const *ranks, int count, int rule, const int64_t *splits, const float *bounds,
                  const float *scale, const float *weight, float divisor, float lambda, int consensus,
                  int normalize, int bf16, int64_t start, int64_t stop)
{
    const int64_t shift = start;
    int64_t from = start;
    while (from < stop) {
        int64_t to = stop;
        float low[MAX_EXPERTS], high[MAX_EXPERTS];
        for (int i = 0; i < count; i++) {
            const int64_t low_split = splits[2 * i], high_split = splits[2 * i + 1];
            low[i] = bounds[4 * i + (from < low_split ? 0 : 1)];
            high[i] = bounds[4 * i + (from < high_split ? 2 : 3)];
            if (low_split > from && low_split < to) to = low_split;
            if (high_split > from && high_split < to) to = high_split;
        }
        run(count, out, shift, base, experts, draws, ranks, from, to, low, high, scale, weight, divisor, lambda,
            consensus, normalize, rule, bf16);
        from = to;
    }
}

/* sums[0] = the L1 norm of expert - base, sums[1] = that of its kept entries, in double: entry j
   goes to partial sum j % LANES, and the partial sums are added in order, so the result does not
   depend on the machine. The rule as in evomerge_mix (one expert; bound[0..3] and split[0..1] as
   there), or MASK: kept where the bool mask[j] is 1. RULE is a constant at each call below. */
static inline __attribute__((always_inline)) void l1_run(
    const int RULE, const int BF16, const void *restrict base, const void *restrict expert, const int64_t *split,
    const float *bound, const float *restrict draws, const float *restrict ranks, const uint8_t *restrict mask,
    int64_t numel, double *sums)
{
    double before[LANES] = {0}, after[LANES] = {0};
    const int64_t low_split = split[0], high_split = split[1];
    const float p_before = bound[0], p_after = bound[1], q_before = bound[2], q_after = bound[3];
    int64_t start = 0;
    for (; start + LANES <= numel; start += LANES) {
        for (int k = 0; k < LANES; k++) {
            const int64_t j = start + k;
            const float a = fabsf(load(expert, j, BF16) - load(base, j, BF16));
            const float p = j < low_split ? p_before : p_after, q = j < high_split ? q_before : q_after;
            const float keep = RULE == MASK ? (float)mask[j] /* a bool: 0 or 1 */
                : KEEP(RULE, a, p, q, RULE >= DRAWS ? draws[j] : 0.0f, RULE == MAGPRUNE ? ranks[j] : 0.0f);
            before[k] += (double)a;
            after[k] += (double)(a * keep);
        }
    }
    for (int k = 0; start + k < numel; k++) { /* the last entries: the same operations */
        const int64_t j = start + k;
        const float a = fabsf(load(expert, j, BF16) - load(base, j, BF16));
        const float p = j < low_split ? p_before : p_after, q = j < high_split ? q_before : q_after;
        const float keep = RULE == MASK ? (float)mask[j]
            : KEEP(RULE, a, p, q, RULE >= DRAWS ? draws[j] : 0.0f, RULE == MAGPRUNE ? ranks[j] : 0.0f);
        before[k] += (double)a;
        after[k] += (double)(a * keep);
    }
    sums[0] = sums[1] = 0.0;
    for (int k = 0; k < LANES; k++) {
        sums[0] += before[k];
        sums[1] += after[k];
    }
}

#define L1(R) (bf16 ? l1_run(R, 1, base, expert, split, bound, draws, ranks, mask, numel, sums) \
                    : l1_run(R, 0, base, expert, split, bound, draws, ranks, mask, numel, sums))

void evomerge_l1(const void *base, const void *expert, int bf16, int rule, const int64_t *split, const float *bound,
                 const float *draws, const float *ranks, const uint8_t *mask, int64_t numel, double *sums)
{
    switch (rule) {
    case ABOVE: L1(ABOVE); break;
    case BAND: L1(BAND); break;
    case DRAWS: L1(DRAWS); break;
    case MAGPRUNE: L1(MAGPRUNE); break;
    default: L1(MASK); break;
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
    p, i, f, d = ctypes.c_void_p, ctypes.c_int, ctypes.c_float, ctypes.c_int64
    library.evomerge_mix.restype = library.evomerge_l1.restype = None
    library.evomerge_mix.argtypes = [p, p, p, p, p, i, i, p, p, p, p, f, f, i, i, i, d, d]
    library.evomerge_l1.argtypes = [p, p, i, i, p, p, p, p, p, d, p]
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
ABOVE, BAND, DRAWS, MAGPRUNE, MASK = range(5)  # SOURCE's enum of rules, in its order


class Rule(NamedTuple):
    """A mask as the C loop takes it: the rule, (p, q) before and from the splits, and the
    per-entry draws and doubled ranks where the rule reads them."""

    kind: int
    splits: tuple[int, int]
    bounds: tuple[float, float, float, float]
    draws: torch.Tensor | None = None
    ranks: torch.Tensor | None = None


def _keep_all(kind: int) -> Rule:
    """No mask, as a rule of `kind`: |delta| > -inf, or u < +inf (an expert without a mask in a call
    whose masks draw: its draws and ranks are read from the base, any finite values)."""
    bounds = {DRAWS: (_INF, _INF, 0.0, 0.0), MAGPRUNE: (0.0, 0.0, _INF, _INF)}.get(kind, (-_INF, -_INF, _INF, _INF))
    return Rule(kind, (0, 0), bounds)


def _rule(keep: prepared.Keep | None, numel: int) -> Rule | None:
    """A mask as a `Rule` (None: keep everything); None for a mask it cannot express."""
    if keep is None:
        return _keep_all(ABOVE)
    if isinstance(keep, prepared.ThresholdKeep):  # |delta| >= t up to the cut-off (ties kept), > t after
        split = numel if keep.cutoff is None else keep.cutoff + 1
        return Rule(ABOVE, (split, 0), (prepared.at_least(keep.threshold, torch.float32), keep.threshold, _INF, _INF))
    if isinstance(keep, prepared.BandKeep):  # above low (tied from low_from on), at most high (tied up to high_to)
        low_split, low = (0, (-_INF, -_INF)) if keep.low is None else (
            keep.low_from, (keep.low, prepared.at_least(keep.low, torch.float32)))
        high_split, high = (0, (_INF, _INF)) if keep.high is None else (
            keep.high_to + 1, (keep.high, prepared.at_least(keep.high, torch.float32)))
        return Rule(BAND, (low_split, high_split), (*low, *high))
    if isinstance(keep, prepared.DrawKeep):  # u < density
        return Rule(DRAWS, (0, 0), (keep.density,) * 4, draws=keep.draws)
    if isinstance(keep, prepared.MagPruneKeep):  # u < 2 r * epsilon + (density - epsilon), as float32 operations
        shift = keep.density - keep.epsilon
        return Rule(MAGPRUNE, (0, 0), (keep.epsilon, keep.epsilon, shift, shift), draws=keep.draws,
                    ranks=keep.twice_rank_norm)
    return None


def _f32(values: Sequence[float]) -> torch.Tensor:
    return torch.tensor(list(values), dtype=torch.float32)


def _usable(tensors: Sequence[torch.Tensor | None], dtype: torch.dtype = torch.float32) -> bool:
    return all(t is None or (t.dtype == dtype and t.device.type == "cpu" and t.is_contiguous()) for t in tensors)


def _sources_dtype(tensors: Sequence[torch.Tensor]) -> torch.dtype | None:
    """float32 or bfloat16 where every tensor has it on the CPU, contiguous; else None."""
    dtype = tensors[0].dtype
    return dtype if dtype in (torch.float32, torch.bfloat16) and _usable(tensors, dtype) else None


def _pointers(tensors: Sequence[torch.Tensor | None], default: torch.Tensor) -> ctypes.Array:
    return (ctypes.c_void_p * len(tensors))(*((default if t is None else t).data_ptr() for t in tensors))


def mix_into(out: torch.Tensor, base: torch.Tensor, experts: Sequence[torch.Tensor],
             masks: Sequence[torch.Tensor | prepared.Keep | None], scale: Sequence[float], weight: Sequence[float],
             *, consensus: bool, normalize: bool, lambda_: float, divisor: float) -> bool:
    """`chunked.mix_task_vectors_into`'s mix written into `out` by the compiled loop; False (nothing
    written) where it does not apply, and the caller runs the eager loop."""
    dtype = _sources_dtype([out, base, *experts])
    if (base.numel() < prepared.MIN_NUMEL or len(experts) > MAX_EXPERTS or dtype is None
            or any(isinstance(mask, torch.Tensor) for mask in masks)):
        return False
    rules = [_rule(mask, base.numel()) for mask in masks]  # type: ignore[arg-type]
    if any(rule is None for rule in rules) or library() is None:
        return False
    kind = max(rule.kind for rule in rules)  # type: ignore[union-attr]
    if kind >= DRAWS:  # experts without a mask join the draws' rule; a magnitude rule beside draws: eager
        if dtype != torch.float32 and any(mask is None for mask in masks):
            return False  # (their stand-in draws are the base's entries, read as float32)
        rules = [_keep_all(kind) if mask is None else rule for mask, rule in zip(masks, rules)]
    if ({rule.kind for rule in rules} - {kind} - ({ABOVE} if kind == BAND else set())  # type: ignore[union-attr]
            or not _usable([t for rule in rules for t in (rule.draws, rule.ranks)])):  # type: ignore[union-attr]
        return False
    flat = base.reshape(-1)
    splits = torch.tensor([rule.splits for rule in rules], dtype=torch.int64)  # type: ignore[union-attr]
    bounds = _f32([bound for rule in rules for bound in rule.bounds])  # type: ignore[union-attr]
    scale_t, weight_t = _f32(scale), _f32(weight)  # float32, as the eager path meets Python floats
    pointers = (_pointers(experts, flat), _pointers([rule.draws for rule in rules], flat),  # type: ignore[union-attr]
                _pointers([rule.ranks for rule in rules], flat))  # type: ignore[union-attr]

    def mix(target: torch.Tensor, start: int, stop: int) -> None:  # entries [start, stop) into target
        library().evomerge_mix(target.data_ptr(), flat.data_ptr(), *pointers, len(experts), kind, splits.data_ptr(),
                               bounds.data_ptr(), scale_t.data_ptr(), weight_t.data_ptr(), divisor, lambda_,
                               int(consensus), int(normalize), int(dtype == torch.bfloat16), start, stop)

    if dtype == torch.float32:
        mix(out, 0, base.numel())
        return True
    # bfloat16: each of the eager path's slices computed in float32, then narrowed by torch as it narrows them
    from evomerge.merge.chunked import chunk_size, slices  # (chunked calls this module)

    target = out.view(-1)
    scratch = torch.empty(min(base.numel(), chunk_size(out.device)), dtype=torch.float32)
    for part in slices(base.numel(), out.device):
        mix(scratch, part.start, part.stop)
        target[part].copy_(scratch[: part.stop - part.start])
    return True


def l1_norms(base: torch.Tensor, expert: torch.Tensor,
             keep: torch.Tensor | prepared.Keep | None) -> tuple[float, float] | None:
    """(|expert - base|_1, the same over the entries `keep` keeps), summed in double by the C loop
    in one fixed order whatever the mask's form (a bool tensor or a prepared rule: the same sums);
    None where it does not apply (then the caller sums with torch)."""
    dtype = _sources_dtype([base, expert])
    if dtype is None or library() is None:
        return None
    if isinstance(keep, torch.Tensor):
        if keep.dtype != torch.bool or keep.device.type != "cpu" or not keep.is_contiguous():
            return None
        rule = Rule(MASK, (0, 0), (0.0,) * 4)
    else:
        rule = _rule(keep, base.numel())  # type: ignore[assignment]
        if rule is None or not _usable([rule.draws, rule.ranks]):
            return None
    sums = (ctypes.c_double * 2)()
    splits, bounds = torch.tensor(rule.splits, dtype=torch.int64), _f32(rule.bounds)
    library().evomerge_l1(base.data_ptr(), expert.data_ptr(), int(dtype == torch.bfloat16), rule.kind,
                          splits.data_ptr(), bounds.data_ptr(),
                          None if rule.draws is None else rule.draws.data_ptr(),
                          None if rule.ranks is None else rule.ranks.data_ptr(),
                          keep.data_ptr() if rule.kind == MASK else None, base.numel(), sums)  # type: ignore[union-attr]
    return sums[0], sums[1]
