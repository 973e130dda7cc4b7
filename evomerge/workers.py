"""Workers: load the sources once, then merge + evaluate one candidate per call.

`CandidateRunner` is the whole job of a worker and runs in any process (a Ray actor, the
export command, a test). `WorkerPool` keeps `workers.count` Ray actors, sends each trial to
the first free actor and yields results as they finish; an actor with nothing of the current
generation left starts on the next one (steady dispatch), whose trials stay in flight across
calls. Nothing raises across Ray: a failed merge or evaluation comes back as a FAILED
TrialResult; a dead actor is replaced and its trial runs once more (FAILED only if that
worker dies too).
"""

from __future__ import annotations

import collections
import logging
import math
import os
import socket
import time
import traceback
from pathlib import Path
from typing import Iterator

import torch

from evomerge import samples
from evomerge.config import RunConfig, WorkersConfig
from evomerge.errors import ClusterLostError, WorkerStartError
from evomerge.evaluate import Evaluator, quality
from evomerge.genome import Recipe
from evomerge.merge.merger import load_merge_target
from evomerge.merge.prepared import Prepared
from evomerge.models.sources import load_model, load_tokenizer, pick_device, spread_over_gpus
from evomerge.trial import Trial, TrialResult, TrialState

logger = logging.getLogger(__name__)

RAY_TEMP_DIR = "/tmp/ray-evomerge"  # short: Ray's socket paths must stay under ~107 characters


class CandidateRunner:
    """Holds the sources and one preallocated model; `run` merges a recipe into it and scores it."""

    def __init__(self, config: RunConfig, threads: int | None = None):
        if threads:
            torch.set_num_threads(threads)
        models = config.models
        self.device = pick_device(models.device)
        self.config = config
        # With several GPUs per worker, a candidate is spread over them (GPU-only branch).
        spread = spread_over_gpus(self.device, config.workers.gpus_per_worker)
        # The base model is the preallocated target every candidate is merged into, in place.
        self.model, self.merger = load_merge_target(models, config.seed, self.device, spread=spread)
        self.tokenizer = load_tokenizer(models.base, models)
        # Source models a routing policy may send requests to, loaded once (one full model each).
        paths = models.by_member_name
        sources = {name: load_model(paths[name], models, self.device, spread=spread)
                   for name in config.policy.members if name != "merged"}
        if config.policy.learns_scorers:
            raise ValueError("policy.scorers: learned, but the run's router LMs were not set (the driver's "
                             "router_data.prepare_router trains them before the first trial)")
        scorers = [(load_model(path, models, self.device), load_tokenizer(path, models))
                   for path in config.policy.scorers or []]
        router = None
        if config.policy.trains_router and config.policy.router_file:  # trained by the driver before the search
            from evomerge.policies.classifier import TrainedRouter

            router = TrainedRouter.load(config.policy.router_file)
        self.evaluator = Evaluator(config.eval, self.model, self.tokenizer, sources, seed=config.seed,
                                   scorers=scorers, router=router)
        # A moe run upcycles each candidate's merge into one preallocated mixture (evomerge/moe.py).
        self.upcycler = self.moe_evaluator = None
        if config.moe is not None:
            from evomerge.moe import Upcycler

            self.upcycler = Upcycler(self.model, self.merger.experts)  # the experts' weights, already loaded
            self.moe_evaluator = Evaluator(config.eval, self.upcycler.model, self.tokenizer, seed=config.seed)
        # A dfs stage serves layer paths through the merged model and the sources (evomerge/dataflow.py).
        self.flow = self.flow_evaluator = None
        if "dfs" in config.stages:
            self.flow = build_layer_path(config, self.model, {**sources, "merged": self.model}, self.device)
            self.flow_evaluator = Evaluator(config.eval, self.flow.model, self.tokenizer, seed=config.seed)
        self.name = f"{socket.gethostname()}{_ray_node()}:{os.getpid()}"
        # What sparsifying merges compute independently of the genes, kept across candidates.
        self.merger.prepared = Prepared()
        self.warm_up_seconds: float | None = None  # set by warm_up(); reported with the first result

    def identity(self) -> str:
        return self.name

    def warm_up(self, recipe: Recipe | None = None) -> float:
        """Do a candidate's one-time work now, so that the first candidate costs what the others
        do: read every source page (memory-mapped files) and, given a `recipe` (the driver sends
        the middle of the search box), merge it (first-call allocations, the prepared store's
        magnitude orders and DARE draws) and score it on one document per task (lm-eval's set-up).
        Returns the seconds it took; a failure is logged, not raised (the candidates report their own)."""
        start = time.perf_counter()
        try:
            for tensors in (self.merger.base, *self.merger.experts):
                for tensor in tensors.values():
                    page_in(tensor)
            if recipe is not None:
                self.run(Trial(-1, -1, recipe, limit=1))
        except Exception:  # noqa: BLE001 - the warm-up only saves time; a real candidate will show the error
            logger.warning("worker warm-up failed:\n%s", traceback.format_exc(limit=5))
        self.warm_up_seconds = time.perf_counter() - start
        return self.warm_up_seconds

    def run(self, trial: Trial) -> TrialResult:
        start = time.perf_counter()
        try:
            self.merger.merge_into(self.model, trial.recipe)
            evaluator = self.evaluator
            if trial.recipe.moe is not None:
                from evomerge.moe import upcycle_candidate

                upcycle_candidate(self.upcycler, self.model, self.tokenizer, self.config.moe, trial.recipe.moe,
                                  self.config.seed)
                evaluator = self.moe_evaluator
            if trial.recipe.dataflow is not None:
                from evomerge.dataflow import path_of

                if self.flow is None:
                    raise ValueError("a data-flow recipe, but this run has no dfs stage")
                self.flow.set_path(path_of(trial.recipe.dataflow))
                evaluator = self.flow_evaluator
            merged = time.perf_counter()
            with torch.inference_mode():
                evaluation = evaluator(trial.recipe.policy, limit=trial.limit, documents=trial.documents)
            done = time.perf_counter()
            value = quality(evaluation.scores, list(self.config.eval.tasks))
            if not math.isfinite(value):
                raise ValueError(f"quality is {value}")
        except Exception as exc:  # noqa: BLE001 - any failure of a candidate is data for the journal
            return TrialResult(trial.id, TrialState.FAILED, worker=self.name,
                               seconds={"total": time.perf_counter() - start},
                               error=f"{type(exc).__name__}: {exc}".splitlines()[0][:500],
                               traceback=traceback.format_exc(limit=20))
        limit = self.config.eval.limit if trial.limit is None else trial.limit
        weights = {task.name: task.weight for task in self.config.eval.tasks}
        errors = {**evaluation.stderr, "quality": samples.quality_stderr(evaluation.stderr, weights)}
        seconds = {"merge": merged - start, **evaluation.seconds, "eval": done - merged, "total": done - start}
        if self.warm_up_seconds is not None and trial.id >= 0:  # once: the worker's first candidate
            seconds["warm_up"], self.warm_up_seconds = self.warm_up_seconds, None
        return TrialResult(trial.id, TrialState.COMPLETE, quality=value,
                           metrics={name: s.value for name, s in evaluation.scores.items()},
                           flops=evaluation.flops_per_example, served=evaluation.served,
                           seconds=seconds, worker=self.name,
                           sample={**samples.sample_of(limit, evaluation.documents),
                                   "higher_is_better": {name: s.higher_is_better for name, s
                                                        in evaluation.scores.items()}},
                           stderr=errors, per_doc=evaluation.per_doc)


def page_in(tensor: torch.Tensor) -> None:
    """Touch one value per 4 KiB page of a tensor's storage (a memory-mapped source is read
    from disk into the page cache now, not during the first merge)."""
    flat = tensor.detach().reshape(-1)
    step = max(1, 4096 // flat.element_size())
    float(flat[::step].float().sum())


def build_layer_path(config: RunConfig, merged: torch.nn.Module, loaded: dict[str, torch.nn.Module],
                     device: torch.device):
    """The LayerPath over `config.dataflow_models`: `merged` is the model merged per candidate, other
    members come from `loaded` or are loaded now (a member already loaded is shared)."""
    from evomerge.dataflow import LayerPath

    paths = config.models.by_member_name
    names = config.dataflow_models
    models = [merged if name == "merged" else loaded.get(name) or load_model(paths[name], config.models, device)
              for name in names]
    return LayerPath(models, names)


def root_cause(exc: BaseException) -> str:
    """The last line of a Ray error's text: the exception the remote code raised."""
    lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
    return (lines[-1] if lines else type(exc).__name__)[:500]


def _ray_node() -> str:
    """`/node-id-prefix` inside a Ray worker (several nodes may share a host), else empty."""
    import ray

    return f"/{ray.get_runtime_context().get_node_id()[:8]}" if ray.is_initialized() else ""


def start_ray(workers: WorkersConfig) -> bool:
    """Join the configured cluster or start a local one; True when this call connected."""
    import ray

    if ray.is_initialized():
        return False
    if workers.ray_address:
        ray.init(address=workers.ray_address, log_to_driver=False)
        return True
    os.environ.setdefault("RAY_AUTH_MODE", "disabled")
    Path(RAY_TEMP_DIR).mkdir(parents=True, exist_ok=True)
    ray.init(num_cpus=max(1, math.ceil(workers.count * workers.cpus_per_worker)), include_dashboard=False,
             _temp_dir=RAY_TEMP_DIR, log_to_driver=False)
    return True


HEARTBEAT_S = 10.0  # with no trial finished for this long, check that the cluster is still there
SETTLE_S = 2.0  # after a worker loss, before telling a dead worker from a dead cluster


class WorkerPool:
    """`workers.count` Ray actors, each a CandidateRunner; trials go to whichever is free first."""

    def __init__(self, config: RunConfig, warm_up: Recipe | None = None):
        """`warm_up`: the recipe each new actor merges and scores on one document before its first
        trial (`CandidateRunner.warm_up`); the search sends the middle of its first stage's box."""
        import ray

        start = time.perf_counter()
        self._connected = start_ray(config.workers)
        logger.info("Ray %s in %.1f s; starting %d workers (each loads the models and tasks)",
                    "started" if self._connected else "joined", time.perf_counter() - start, config.workers.count)
        self._config, self._warm_up = config, warm_up
        threads = max(1, int(config.workers.cpus_per_worker))
        self._actor_class = ray.remote(CandidateRunner).options(
            num_cpus=config.workers.cpus_per_worker, num_gpus=config.workers.gpus_per_worker,
            max_restarts=0, max_task_retries=0)  # a dead actor is replaced (and its trial retried) by run()
        self._threads = threads
        self._gcs = ray.get_runtime_context().gcs_address
        self.lost = False  # the cluster's head stopped answering: nothing more can be asked of Ray
        self.actors = [self._new_actor() for _ in range(config.workers.count)]
        self._idle = list(self.actors)
        self._running: dict = {}  # object ref -> (trial, actor), kept across calls of run()
        self._attempts: collections.Counter[int] = collections.Counter()

    def _check_cluster(self, timeout: float = 5.0) -> None:
        """Raise ClusterLostError when the head's GCS port no longer accepts connections (Ray
        itself would block for a minute on any call, then end the process)."""
        host, _, port = self._gcs.rpartition(":")
        try:
            with socket.create_connection((host, int(port)), timeout=timeout):
                return
        except OSError:
            self.lost = True
            raise ClusterLostError(f"workers.ray_address: the Ray cluster at {self._gcs} is gone (its head does not "
                                   f"answer); finished trials are journaled: `evomerge resume` once a cluster "
                                   f"is up") from None

    def _new_actor(self):
        actor = self._actor_class.remote(self._config, self._threads)
        actor.warm_up.remote(self._warm_up)  # runs before the actor's first trial (an actor runs its calls in order)
        return actor

    def run(self, trials: list[Trial], then: list[Trial] = ()) -> Iterator[tuple[Trial, TrialResult]]:
        """Yield (trial, result) as each finishes; a new trial starts as soon as an actor is free.

        An actor with none of `trials` left to start takes the next of `then`; such a trial may
        still be running when every one of `trials` is done: it stays in flight, and a later call
        yields its result (waiting for it if that call's `trials` include it). A trial whose
        worker process dies (killed, segfault, out of memory) is retried once on a fresh actor;
        if that dies too, the trial comes back FAILED with the reason.
        """
        import ray
        from ray.exceptions import RayError

        flying = {trial.id for trial, _ in self._running.values()}
        pending = collections.deque(trial for trial in trials if trial.id not in flying)
        wanted = {trial.id for trial in trials}
        later = collections.deque(trial for trial in then if trial.id not in flying | wanted)
        while True:
            while self._idle and (pending or later):
                actor, trial = self._idle.pop(0), (pending or later).popleft()
                self._attempts[trial.id] += 1
                self._running[actor.run.remote(trial)] = (trial, actor)
            if not wanted:  # what is still in flight is of `then`: a later call yields it
                return
            ready, _ = ray.wait(list(self._running), num_returns=1, timeout=HEARTBEAT_S)
            if not ready:  # nothing finished for a while: make sure the cluster is still there
                self._check_cluster()
                continue
            [ref] = ready
            trial, actor = self._running.pop(ref)
            try:
                result = ray.get(ref)
            except RayError as exc:
                if getattr(exc, "actor_init_failed", False):  # the same start would fail again, on every worker
                    raise WorkerStartError(f"workers: a worker could not start: {root_cause(exc)}; "
                                           f"finished trials are journaled: `evomerge resume` once fixed") from None
                time.sleep(SETTLE_S)  # a head going down takes its workers first: let it finish
                self._check_cluster()
                reason = (str(exc).strip().splitlines() or [""])[0][:300]
                logger.warning("trial %d: worker lost (%s); starting a new worker", trial.id, type(exc).__name__)
                actor = self._replace(actor)
                if self._attempts[trial.id] < 2:
                    (pending if trial.id in wanted else later).appendleft(trial)
                    self._idle.append(actor)
                    continue
                result = TrialResult(trial.id, TrialState.FAILED, traceback=str(exc)[-4000:],
                                     error=f"worker lost twice: {type(exc).__name__}: {reason}")
            self._idle.append(actor)
            wanted.discard(trial.id)
            yield trial, result

    def _replace(self, actor):
        import ray

        ray.kill(actor, no_restart=True)
        fresh = self._new_actor()
        self.actors[self.actors.index(actor)] = fresh
        return fresh

    def identities(self) -> list[str]:
        """`host:pid` of every actor, in order (what the journal's `worker` field records)."""
        import ray

        return ray.get([actor.identity.remote() for actor in self.actors])

    def close(self) -> None:
        import ray

        if self.lost:  # every call into Ray would wait on the dead head
            self.actors = []
            return
        for actor in self.actors:
            try:
                ray.kill(actor)
            except Exception:  # noqa: BLE001 - a lost cluster must not hide the error that stopped the run
                logger.warning("could not stop a worker (the Ray cluster may be gone)")
        self.actors = []
        if self._connected:
            ray.shutdown()

    def __enter__(self) -> WorkerPool:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
