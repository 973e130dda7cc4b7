"""A real two-node Ray cluster on this machine: `workers.ray_address` joins it, trials run on both nodes."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from evomerge.run_dir import RunDir

from conftest import write_config

pytestmark = pytest.mark.slow


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def wait_for_nodes(address: str, count: int, env: dict, timeout: float = 90) -> None:
    probe = ("import ray, sys; ray.init(address=sys.argv[1], log_to_driver=False); "
             "print(sum(n['Alive'] for n in ray.nodes()))")
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        out = subprocess.run([sys.executable, "-c", probe, address], env=env, capture_output=True, text=True)
        if out.returncode == 0 and out.stdout.strip().splitlines()[-1:] == [str(count)]:
            return
        time.sleep(2)
    raise TimeoutError(f"the Ray cluster at {address} did not reach {count} nodes")


def test_search_on_a_two_node_cluster(zoo, tmp_path) -> None:
    ray_bin = Path(sys.executable).with_name("ray")
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))  # Ray's socket paths must stay short
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    nodes = [subprocess.Popen([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=1",
                               "--include-dashboard=false", f"--temp-dir={temp}", "--block"],
                              env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]
    try:
        wait_for_nodes(address, 1, env)
        nodes.append(subprocess.Popen([str(ray_bin), "start", f"--address={address}", "--num-cpus=1", "--block"],
                                      env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        wait_for_nodes(address, 2, env)
        path = write_config(tmp_path, zoo, workers={"count": 2, "cpus_per_worker": 1, "ray_address": address},
                            search={"generations": 1, "population": 4})
        driver = subprocess.run([str(Path(sys.executable).with_name("evomerge")), "search", str(path),
                                 "--run-dir", str(tmp_path / "run")], env=env, capture_output=True, text=True,
                                timeout=600)
        assert driver.returncode == 0, driver.stderr[-2000:]
        records = RunDir.open(tmp_path / "run").records()
        assert records and all(r["state"] == "complete" for r in records)
        node_ids = {r["worker"].split("/")[1].split(":")[0] for r in records}
        assert len(node_ids) == 2  # one actor per node (1 CPU each), both served trials
    finally:
        for node in reversed(nodes):
            node.send_signal(signal.SIGTERM)
        for node in reversed(nodes):
            try:
                node.wait(timeout=60)
            except subprocess.TimeoutExpired:
                node.kill()
        shutil.rmtree(temp, ignore_errors=True)


def test_a_lost_head_stops_the_driver_with_one_line_and_the_run_resumes(zoo, tmp_path) -> None:
    ray_bin = Path(sys.executable).with_name("ray")
    evomerge = str(Path(sys.executable).with_name("evomerge"))
    port = free_port()
    address = f"127.0.0.1:{port}"
    temp = Path(tempfile.mkdtemp(prefix="rt-", dir="/tmp"))
    env = {**os.environ, "RAY_AUTH_MODE": "disabled"}
    head = subprocess.Popen([str(ray_bin), "start", "--head", f"--port={port}", "--num-cpus=1",
                             "--include-dashboard=false", f"--temp-dir={temp}", "--block"],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    generations, population = 1000, 4  # far more than runs before the head goes: the run is cut short
    try:
        wait_for_nodes(address, 1, env)
        path = write_config(tmp_path, zoo, workers={"count": 1, "cpus_per_worker": 1, "ray_address": address},
                            search={"generations": generations, "population": population},
                            eval={"limit": 100})
        driver = subprocess.Popen([evomerge, "search", str(path), "--run-dir", str(tmp_path / "run")], env=env,
                                  stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        journal = tmp_path / "run" / "journal.jsonl"
        deadline = time.monotonic() + 300
        while time.monotonic() < deadline and not (journal.exists() and len(journal.read_text().splitlines()) >= 10):
            time.sleep(0.5)
        head.send_signal(signal.SIGTERM)  # the whole cluster goes away mid-run
        head.wait(timeout=60)
        _, err = driver.communicate(timeout=240)
    finally:
        if head.poll() is None:
            head.kill()
        shutil.rmtree(temp, ignore_errors=True)
    assert driver.returncode == 2, f"exit {driver.returncode}: {err[-1500:]}"
    assert "is gone" in err.strip().splitlines()[-1] and "evomerge resume" in err.strip().splitlines()[-1]
    records = RunDir.open(tmp_path / "run").records()
    assert 0 < len(records) < 5 + generations * population
    assert all(r["state"] == "complete" for r in records)  # the cluster's loss is not the trials' failure

    # Resume on a local Ray, with a budget of two generations past the last one journaled.
    budget = max(r["generation"] for r in records) + 2
    resumed = subprocess.run([evomerge, "resume", str(tmp_path / "run"), "--set", "workers.ray_address=null",
                              "--set", f"search.generations={budget}"],
                             env=env, capture_output=True, text=True, timeout=600)
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    records = RunDir.open(tmp_path / "run").records()
    assert len(records) == 5 + budget * population and all(r["state"] == "complete" for r in records)
