"""Requests per second of `evomerge serve` with batching (--max-batch 16) against one prompt per call
(--max-batch 1), side by side on one export: C concurrent `openai` clients x R requests each, on loopback.

    python benchmarks/serve_batching.py EXPORT_DIR [--clients 8] [--requests 6] [--rounds 2]

Prints one line per server setting and round, then the ratio of the medians.
"""

from __future__ import annotations

import argparse
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
PROMPTS = ["12+34=", "rev abc=", "sort dcba=", "7+5=", "rev hello=", "sort zyx=", "40+41=", "rev wxyz="]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(folder: Path, max_batch: int) -> tuple[subprocess.Popen, str]:
    port = free_port()
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    process = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "serve", str(folder), "--port", str(port),
                                "--max-batch", str(max_batch)], env=env, stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL)
    url = f"http://127.0.0.1:{port}"
    for _ in range(600):
        try:
            urllib.request.urlopen(url + "/health", timeout=2).read()
            return process, url
        except OSError:
            time.sleep(0.2)
    process.kill()
    raise SystemExit("server did not start")


def load(url: str, clients: int, requests: int) -> float:
    import openai

    model = openai.OpenAI(base_url=url + "/v1", api_key="x").models.list().data[0].id

    def one(c: int) -> int:
        client = openai.OpenAI(base_url=url + "/v1", api_key="x", max_retries=0)
        for i in range(requests):
            client.completions.create(model=model, prompt=PROMPTS[(c + i) % len(PROMPTS)], max_tokens=8, stop=["\n"])
        return requests

    started = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        done = sum(pool.map(one, range(clients)))
    return done / (time.perf_counter() - started)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("export", type=Path)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--requests", type=int, default=6)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    servers = {batch: start(args.export, batch) for batch in (1, 16)}
    rates: dict[int, list[float]] = {1: [], 16: []}
    try:
        for round_ in range(args.rounds):  # alternating, so both settings see the same machine
            for batch, (_, url) in servers.items():
                rate = load(url, args.clients, args.requests)
                rates[batch].append(rate)
                print(f"round {round_}: --max-batch {batch:2d}: {rate:.1f} requests/s")
    finally:
        for process, _ in servers.values():
            process.terminate()
    ratio = statistics.median(rates[16]) / statistics.median(rates[1])
    print(f"batched / one at a time: {ratio:.2f}x ({args.clients} clients x {args.requests} requests, "
          f"{os.cpu_count()} CPUs, {platform.processor() or platform.machine()}, load {os.getloadavg()[0]:.1f})")


if __name__ == "__main__":
    main()
