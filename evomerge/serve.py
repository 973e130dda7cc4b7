"""`evomerge serve EXPORT`: an OpenAI-compatible HTTP server for anything `evomerge export` writes.

A merged, MoE or layer-path export is one model; a routed export (`policy.json`) is its policy
over its members. Both load through `evomerge.policies.load`, and every answer is what that
object's `generate` gives for the same prompt: greedy decoding through the same lm-eval HFLM
calls, so the server adds transport, not another decoder.

Endpoints (the subset of OpenAI's API that a completion model has):
  POST /v1/completions       prompt (a string or a list of strings), max_tokens, stop
  POST /v1/chat/completions  messages rendered by the tokenizer's chat template (400 without one)
  GET  /v1/models            the one model this server has
  GET  /health               status, the model's kind and members, counters (served, batches, ...)

`stream: true` is answered as one server-sent event holding the whole answer, then `[DONE]`.

Every response carries `usage` (prompt, completion and total tokens, plus `flops`: the forward
FLOPs spent, routing and every consulted member included, evomerge/flops.py) and an `evomerge`
field: the policy kind, and per choice the member that served it and its FLOPs.

Batching: requests wait in one queue; a single inference thread takes what is waiting (up to
`max_batch` prompts, after at most `batch_wait_s` for more to arrive) and answers it with one
policy call, which sends each member its share as one batched HFLM call. Padding a prompt into
a batch can change the last bits of its logits, so a greedy answer is only guaranteed to equal
`generate([prompt])` when it was batched alone (and a blend's draw counts earlier identical
prompts of the same call, as lm-eval's repeats do).

Limits: max_tokens, the prompt's length in tokens (and the model's context), prompts per
request and requests in flight (over it: 429). A malformed request gets a 4xx JSON error in
OpenAI's shape, naming the field; the server keeps serving. It binds 127.0.0.1 unless told.
"""


import asyncio  # no `from __future__ import annotations`: FastAPI reads the handlers' annotations at run time
import json
import logging
import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from evomerge.errors import ConfigError

logger = logging.getLogger(__name__)

LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class Limits:
    max_tokens: int = 256  # per choice; also capped so that prompt + answer fit the model's context
    max_prompt_tokens: int = 2048
    max_prompts: int = 32  # prompts in one /v1/completions request
    max_concurrent: int = 64  # requests in flight (queued or running); one more gets 429
    max_batch: int = 16  # prompts answered by one policy call
    batch_wait_s: float = 0.01  # how long a batch waits for more requests once the first is there


class RequestError(Exception):
    """A request the server refuses: HTTP status, message, the offending field."""

    def __init__(self, status: int, message: str, param: str | None = None, kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.kind = status, message, param, kind


# --------------------------------------------------------------------------- request bodies

class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields a completion model ignores

    model: str | None = None
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    stop: str | list[str] | None = None
    temperature: float | None = Field(default=None, ge=0)
    top_p: float | None = None
    n: int = Field(default=1, ge=1)
    stream: bool = False
    seed: int | None = None


class CompletionBody(_Body):
    prompt: str | list[str]
    echo: bool = False
    logprobs: int | None = None


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: str
    content: str


class ChatBody(_Body):
    messages: list[Message] = Field(min_length=1)


# --------------------------------------------------------------------------- the engine

@dataclass
class Answer:
    text: str
    member: str
    flops: int
    prompt_tokens: int
    completion_tokens: int
    finish_reason: str


@dataclass
class Job:
    prompt: str
    max_tokens: int
    stop: list[str]
    future: asyncio.Future = field(repr=False)


class Engine:
    """The export, loaded once: answers a batch of prompts with one call of its policy."""

    def __init__(self, folder: str | Path, device: str = "cpu", batch_size: int = 16):
        from evomerge import policies

        folder = Path(folder)
        if not folder.is_dir() or not ((folder / "config.json").is_file() or (folder / "policy.json").is_file()):
            raise ConfigError(f"serve: {folder} is not an evomerge export (expected a folder with config.json "
                              f"or policy.json, as `evomerge export` writes)")
        self.folder = folder
        self.server = policies.load(folder, device=device, batch_size=batch_size)
        self.policy = self.server.policy
        self.kind = self.server.kind
        self.members = member_names(folder, len(self.policy.members))
        self.model_id = folder.resolve().name
        lm = self.policy.members[0].lm
        self.tokenizer = lm.tokenizer
        self.context = int(lm.max_length)
        self.lock = threading.Lock()  # one policy call at a time

    def prompt_tokens(self, prompt: str, member: int = 0) -> int:
        return len(self.policy.members[member].lm.tok_encode(prompt))

    def answer(self, jobs: list[Job]) -> list[Answer]:
        """One policy call for every job (PolicyServer.generate's requests, in order)."""
        from lm_eval.api.instance import Instance

        requests = [Instance("generate_until", {}, (job.prompt, {"until": list(job.stop),
                                                                "max_gen_toks": job.max_tokens, "do_sample": False}),
                             i, ("generate", i, 1)) for i, job in enumerate(jobs)]
        with self.lock:
            self.policy.stats.reset()
            texts = self.policy.generate_until(requests)
            flops, served = list(self.policy.stats.request_flops), list(self.policy.stats.request_member)
        answers = []
        for job, text, cost, m in zip(jobs, texts, flops, served):
            lm = self.policy.members[m].lm
            completion = len(lm.tok_encode(text, add_special_tokens=False)) if text else 0
            answers.append(Answer(text, self.members[m], int(cost), self.prompt_tokens(job.prompt, m), completion,
                                  "length" if completion >= job.max_tokens else "stop"))
        return answers

    def chat_prompt(self, messages: list[Message]) -> str:
        if not getattr(self.tokenizer, "chat_template", None):
            raise RequestError(400, f"messages: the tokenizer of {self.model_id} has no chat template; use "
                                    f"/v1/completions with a plain prompt", "messages")
        try:
            return self.tokenizer.apply_chat_template([m.model_dump() for m in messages], tokenize=False,
                                                      add_generation_prompt=True)
        except Exception as exc:  # noqa: BLE001 - a template that refuses these messages (roles, order)
            raise RequestError(400, f"messages: the chat template refused them: {exc}", "messages") from exc


def member_names(folder: Path, count: int) -> list[str]:
    """The members' names as the run called them (merged, expert:0, ...), from recipe.json."""
    try:
        policy = json.loads((folder / "recipe.json").read_text(encoding="utf-8"))["recipe"].get("policy") or {}
        names = list(policy.get("members") or [])
    except (OSError, ValueError, KeyError, AttributeError):
        names = []
    return names if len(names) == count else (["merged"] if count == 1 else [f"member:{i}" for i in range(count)])


class Batcher:
    """A queue of jobs and one inference thread that answers what is waiting, batched."""

    def __init__(self, engine: Engine, limits: Limits):
        self.engine, self.limits = engine, limits
        self.queue: asyncio.Queue[Job] = asyncio.Queue()
        self.executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="evomerge-infer")
        self.task: asyncio.Task | None = None
        self.counts = {"requests": 0, "answered": 0, "rejected": 0, "errors": 0, "batches": 0, "largest_batch": 0,
                       "in_flight": 0}

    def start(self) -> None:
        self.task = asyncio.get_running_loop().create_task(self.loop())

    async def stop(self) -> None:
        if self.task is not None:
            self.task.cancel()
        self.executor.shutdown(wait=False, cancel_futures=True)

    async def submit(self, prompt: str, max_tokens: int, stop: list[str]) -> Answer:
        job = Job(prompt, max_tokens, stop, asyncio.get_running_loop().create_future())
        await self.queue.put(job)
        return await job.future

    async def loop(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            jobs = [await self.queue.get()]
            if self.queue.qsize() < self.limits.max_batch - 1:  # give requests arriving together a moment
                await asyncio.sleep(self.limits.batch_wait_s)
            while len(jobs) < self.limits.max_batch and not self.queue.empty():
                jobs.append(self.queue.get_nowait())  # (no wait_for around get: a timeout may lose an item)
            self.counts["batches"] += 1
            self.counts["largest_batch"] = max(self.counts["largest_batch"], len(jobs))
            try:
                answers = await loop.run_in_executor(self.executor, self.engine.answer, jobs)
            except Exception as exc:  # noqa: BLE001 - the batch fails, the server goes on
                logger.exception("serve: a batch of %d failed", len(jobs))
                for job in jobs:
                    if not job.future.done():
                        job.future.set_exception(exc)
                continue
            for job, answer in zip(jobs, answers):
                if not job.future.done():  # a client that went away leaves a cancelled future
                    job.future.set_result(answer)


# --------------------------------------------------------------------------- the app

def create_app(engine: Engine, limits: Limits = Limits()) -> Any:
    """The FastAPI app over a loaded engine."""
    from contextlib import asynccontextmanager

    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException

    batcher = Batcher(engine, limits)

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        batcher.start()
        yield
        await batcher.stop()

    app = FastAPI(title=f"evomerge serve {engine.model_id}", lifespan=lifespan)
    app.state.batcher = batcher

    def error(status: int, message: str, param: str | None = None, kind: str = "invalid_request_error",
              headers: dict[str, str] | None = None) -> JSONResponse:
        return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": status}},
                            status_code=status, headers=headers)

    @app.exception_handler(RequestError)
    async def _refused(request: Request, exc: RequestError) -> JSONResponse:
        return error(exc.status, exc.message, exc.param, exc.kind)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first.get("loc", ()) if part != "body") or "body"
        return error(400, f"{loc}: {first.get('msg', 'invalid')}", loc)

    @app.exception_handler(HTTPException)
    async def _http(request: Request, exc: HTTPException) -> JSONResponse:
        return error(exc.status_code, str(exc.detail), kind="not_found_error" if exc.status_code == 404 else
                     "invalid_request_error")

    @app.get("/health")
    async def health() -> dict[str, Any]:
        return {"status": "ok", "model": engine.model_id, "kind": engine.kind, "members": engine.members,
                **batcher.counts}

    @app.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": engine.model_id, "object": "model", "created": 0,
                                            "owned_by": "evomerge", "kind": engine.kind, "members": engine.members}]}

    @app.post("/v1/completions")
    async def completions(request: Request) -> Any:
        body = parse(CompletionBody, await read_json(request))
        prompts = [body.prompt] if isinstance(body.prompt, str) else list(body.prompt)
        if not prompts:
            raise RequestError(400, "prompt: an empty list; give a string or a list of strings", "prompt")
        if len(prompts) > limits.max_prompts:
            raise RequestError(400, f"prompt: {len(prompts)} prompts, at most {limits.max_prompts} per request",
                               "prompt")
        if body.echo or body.logprobs:
            raise RequestError(400, "echo and logprobs are not supported", "echo" if body.echo else "logprobs")
        answers = await run(prompts, body)
        choices = [{"index": i, "text": a.text, "logprobs": None, "finish_reason": a.finish_reason}
                   for i, a in enumerate(answers)]
        if body.stream:
            return stream(response("text_completion", "cmpl", choices, answers))
        return JSONResponse(response("text_completion", "cmpl", choices, answers))

    @app.post("/v1/chat/completions")
    async def chat(request: Request) -> Any:
        body = parse(ChatBody, await read_json(request))
        prompt = engine.chat_prompt(body.messages)
        answers = await run([prompt], body)
        if body.stream:
            choices = [{"index": i, "delta": {"role": "assistant", "content": a.text}, "logprobs": None,
                        "finish_reason": a.finish_reason} for i, a in enumerate(answers)]
            return stream(response("chat.completion.chunk", "chatcmpl", choices, answers))
        choices = [{"index": i, "message": {"role": "assistant", "content": a.text},
                    "logprobs": None, "finish_reason": a.finish_reason} for i, a in enumerate(answers)]
        return JSONResponse(response("chat.completion", "chatcmpl", choices, answers))

    def stream(chunk: dict[str, Any]) -> Any:
        """`stream: true`: the whole answer as one server-sent event, then [DONE] (the answer is
        generated in one batched call; tokens are not sent as they are decoded)."""
        from fastapi.responses import StreamingResponse

        async def events():
            yield f"data: {json.dumps(chunk)}\n\n"
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    async def run(prompts: list[str], body: _Body) -> list[Answer]:
        """Check the request against the limits, queue its prompts, wait for their answers."""
        check(body)
        max_tokens = body.max_completion_tokens or body.max_tokens or min(16, limits.max_tokens)
        if max_tokens > limits.max_tokens:
            raise RequestError(400, f"max_tokens: {max_tokens} is over this server's limit of {limits.max_tokens}",
                               "max_tokens")
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if batcher.counts["in_flight"] >= limits.max_concurrent:
            batcher.counts["rejected"] += 1
            raise RequestError(429, f"{limits.max_concurrent} requests in flight already; retry later",
                               kind="rate_limit_error")
        batcher.counts["requests"] += 1
        batcher.counts["in_flight"] += 1
        try:
            # counted on the inference thread: a fast tokenizer is not to be used by two threads at once
            counts = await asyncio.get_running_loop().run_in_executor(
                batcher.executor, lambda: [engine.prompt_tokens(p) for p in prompts])
            room = min(limits.max_prompt_tokens, engine.context - max_tokens)
            for i, count in enumerate(counts):
                if count > room:
                    raise RequestError(400, f"prompt{f'[{i}]' if len(prompts) > 1 else ''}: {count} tokens, at "
                                            f"most {room} here (context {engine.context}, max_tokens {max_tokens}, "
                                            f"prompt limit {limits.max_prompt_tokens})", "prompt")
            answers = await asyncio.gather(*(batcher.submit(p, max_tokens, stop) for p in prompts))
        except RequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - the batch failed; say so, keep serving
            batcher.counts["errors"] += 1
            raise RequestError(500, f"generation failed: {type(exc).__name__}: {exc}", kind="server_error") from exc
        finally:
            batcher.counts["in_flight"] -= 1
        batcher.counts["answered"] += 1
        return list(answers)

    def check(body: _Body) -> None:
        if body.model is not None and body.model != engine.model_id:
            raise RequestError(404, f"model: {body.model!r} is not served here (this server has "
                                    f"{engine.model_id!r}: GET /v1/models)", "model", "not_found_error")
        if body.n != 1:
            raise RequestError(400, f"n: {body.n}; greedy decoding gives one answer per prompt (n=1)", "n")
        if body.temperature not in (None, 0.0):
            raise RequestError(400, f"temperature: {body.temperature}; this server decodes greedily "
                                    f"(temperature 0), as the search scored it", "temperature")

    def response(kind: str, prefix: str, choices: list[dict], answers: list[Answer]) -> dict[str, Any]:
        prompt = sum(a.prompt_tokens for a in answers)
        completion = sum(a.completion_tokens for a in answers)
        return {"id": f"{prefix}-{uuid.uuid4().hex}", "object": kind, "created": int(time.time()),
                "model": engine.model_id, "choices": choices,
                "usage": {"prompt_tokens": prompt, "completion_tokens": completion,
                          "total_tokens": prompt + completion, "flops": sum(a.flops for a in answers)},
                "evomerge": {"kind": engine.kind, "served_by": [a.member for a in answers],
                             "flops": [a.flops for a in answers]}}

    return app


async def read_json(request: Any) -> Any:
    raw = await request.body()
    try:
        return json.loads(raw)
    except ValueError as exc:
        raise RequestError(400, f"body: not JSON ({exc})", "body") from exc


def parse(model: type[BaseModel], data: Any) -> Any:
    if not isinstance(data, dict):
        raise RequestError(400, f"body: expected a JSON object, got {type(data).__name__}", "body")
    try:
        return model.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        loc = ".".join(str(part) for part in first.get("loc", ())) or "body"
        raise RequestError(400, f"{loc}: {first.get('msg', 'invalid')}", loc) from exc


def serve(folder: str | Path, host: str = "127.0.0.1", port: int = 8000, limits: Limits = Limits(),
          device: str = "cpu") -> None:
    """Load the export and serve it until interrupted."""
    import uvicorn

    if host not in LOOPBACK:
        logger.warning("serve: binding %s makes the model reachable from other machines; there is no "
                       "authentication", host)
    engine = Engine(folder, device=device, batch_size=limits.max_batch)
    logger.info("serving %s (%s: %s) on http://%s:%d/v1", engine.model_id, engine.kind, ", ".join(engine.members),
                host, port)
    uvicorn.run(create_app(engine, limits), host=host, port=port, log_level="warning",
                limit_concurrency=limits.max_concurrent + 16)
