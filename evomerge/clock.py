"""Where a candidate's wall time goes: seconds spent inside model forward calls.

`ForwardClock` hooks the top module of each model and adds up the time between a forward's
start and its end, and remembers when the first forward of a measurement started and the last
ended. The evaluator splits an lm-eval call with it into setup (before the first forward),
forward passes, serving (between forwards: batching, tokenisation, the generation loop) and
scoring (after the last forward). On a GPU the end of a forward waits for the device
(GPU-only branch), so queued kernels are counted where they run.
"""

from __future__ import annotations

import time
from typing import Any, Iterable

import torch


class ForwardClock:
    def __init__(self, modules: Iterable[torch.nn.Module]):
        self.seconds = 0.0
        self.first: float | None = None  # perf_counter() at the first forward's start
        self.last: float | None = None  # perf_counter() at the last forward's end
        self._depth = 0
        self._started = 0.0
        self._handles = []
        modules = list({id(m): m for m in modules}.values())
        self._sync = torch.cuda.is_available() and any(p.is_cuda for m in modules for p in m.parameters())
        for module in modules:
            self._handles.append(module.register_forward_pre_hook(self._start))
            self._handles.append(module.register_forward_hook(self._stop))

    def reset(self) -> None:
        self.seconds, self.first, self.last, self._depth = 0.0, None, None, 0

    def _start(self, module: torch.nn.Module, args: Any) -> None:
        self._depth += 1
        if self._depth == 1:
            self._started = time.perf_counter()
            if self.first is None:
                self.first = self._started

    def _stop(self, module: torch.nn.Module, args: Any, output: Any) -> None:
        self._depth -= 1
        if self._depth == 0:
            if self._sync:  # GPU-only branch: wait for the kernels this forward queued
                torch.cuda.synchronize()
            self.last = time.perf_counter()
            self.seconds += self.last - self._started

    def split(self, start: float, end: float) -> dict[str, float]:
        """Seconds of one measured call from `start` to `end`: setup, forward, serving, scoring."""
        if self.first is None or self.last is None:
            return {"eval_setup": end - start, "forward": 0.0, "serving": 0.0, "scoring": 0.0}
        return {"eval_setup": self.first - start, "forward": self.seconds,
                "serving": self.last - self.first - self.seconds, "scoring": end - self.last}

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []

