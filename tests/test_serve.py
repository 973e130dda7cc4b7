"""`evomerge serve`: a real server process over real exports, queried with the real `openai` client."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import openai
import pytest

from conftest import REPO, write_config

pytestmark = pytest.mark.slow

PROMPTS = ["12+34=", "rev abc=", "sort dcba=", "7+5=", "rev hello="]


@pytest.fixture(scope="module")
def exports(zoo, ray_cluster, tmp_path_factory) -> dict[str, Path]:
    """Two exported trials of small real searches: a plain merge and a prefix router over the merge and two experts."""
    from evomerge.config import load_config
    from evomerge.export import export
    from evomerge.search import search

    folder = tmp_path_factory.mktemp("serve")
    small = {"generations": 1, "population": 2, "references": False}
    plain = write_config(folder / "plain", zoo, search=small, workers={"count": 1}, eval={"limit": 8})
    routers = zoo["base"].parent / "routers"
    policy = {"kind": "prefix_router", "members": ["merged", "expert:0", "expert:1"],
              "scorers": [str(routers / "mix"), str(routers / "add"), str(routers / "rev")], "bounds": {"k": [1, 2]}}
    routed = write_config(folder / "routed", zoo, policy=policy, merge={"granularity": "global"}, search=small,
                          workers={"count": 1}, eval={"limit": 8})
    out = {}
    for name, config in (("plain", plain), ("routed", routed)):
        search(load_config(config), folder / name / "run")
        export(folder / name / "run", folder / name / "export")
        out[name] = folder / name / "export"
    return out


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    """`python -m evomerge.cli serve FOLDER` on a free loopback port, stopped when the block ends."""

    def __init__(self, folder: Path, *args: str):
        self.port = free_port()
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")])}
        self.process = subprocess.Popen([sys.executable, "-m", "evomerge.cli", "serve", str(folder),
                                         "--port", str(self.port), *args], env=env, cwd=REPO,
                                        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        self.url = f"http://127.0.0.1:{self.port}"

    def __enter__(self) -> Server:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise AssertionError(f"serve exited {self.process.returncode}: {self.process.stdout.read()}")
            try:
                self.health()
                return self
            except OSError:
                time.sleep(0.3)
        self.process.kill()
        raise AssertionError("serve did not answer /health within 120 s")

    def __exit__(self, *exc) -> None:
        self.process.terminate()
        try:
            self.process.wait(timeout=20)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def health(self) -> dict:
        with urllib.request.urlopen(self.url + "/health", timeout=5) as response:
            return json.loads(response.read())

    def client(self):
        return openai.OpenAI(base_url=self.url + "/v1", api_key="unused", max_retries=0, timeout=60)


@pytest.fixture(scope="module")
def servers(exports, tmp_path_factory):
    """One server per export (the plain one given a chat template, the routed one has none)."""
    import shutil

    from transformers import AutoTokenizer

    chat = tmp_path_factory.mktemp("chat") / "plain"
    shutil.copytree(exports["plain"], chat)
    tokenizer = AutoTokenizer.from_pretrained(chat)
    tokenizer.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    tokenizer.save_pretrained(chat)
    with Server(chat, "--max-tokens", "16") as plain, Server(exports["routed"], "--max-concurrent", "8") as routed:
        yield {"plain": plain, "routed": routed}


@pytest.mark.parametrize("kind", ["plain", "routed"])
def test_answers_equal_the_loaded_policy(exports, servers, kind) -> None:
    """Greedy answers through HTTP are what `evomerge.policies.load(export).generate` gives, with
    tokens, FLOPs and the serving member reported."""
    from evomerge import policies

    loaded = policies.load(exports[kind])
    client = servers[kind].client()
    (model,) = client.models.list().data
    for prompt in PROMPTS:  # one request per prompt: each batched alone
        response = client.completions.create(model=model.id, prompt=prompt, max_tokens=8, stop=["\n"])
        assert response.choices[0].text == loaded.generate([prompt], max_new_tokens=8, until=["\n"])[0]
        extra = response.model_extra["evomerge"]
        assert extra["served_by"][0] in model.model_extra["members"]
        assert response.usage.prompt_tokens == len(prompt)  # one token per character (the zoo's tokenizer)
        assert response.usage.model_extra["flops"] == extra["flops"][0] > 0
    many = client.completions.create(model=model.id, prompt=PROMPTS, max_tokens=6, stop=["\n"])
    assert [c.text for c in many.choices] == loaded.generate(PROMPTS, max_new_tokens=6, until=["\n"])
    assert len(many.model_extra["evomerge"]["served_by"]) == len(PROMPTS)
    if kind == "routed":  # the router sends these prompts to more than one member
        assert model.model_extra["kind"] == "prefix_router"
        assert len(set(many.model_extra["evomerge"]["served_by"])) > 1


def test_bad_requests_get_4xx_and_the_server_keeps_serving(servers) -> None:
    server = servers["plain"]
    client = server.client()
    model = client.models.list().data[0].id
    routed = servers["routed"].client()
    refused = [
        lambda: client.completions.create(model=model, prompt="1+1=", max_tokens=17),  # over --max-tokens 16
        lambda: client.completions.create(model=model, prompt="9" * 60, max_tokens=8),  # over the context
        lambda: client.completions.create(model="other", prompt="1+1="),
        lambda: client.completions.create(model=model, prompt="1+1=", temperature=0.7),
        lambda: client.post("/completions", body={"prompt": 5}, cast_to=object),
        lambda: client.post("/completions", body={"prompt": []}, cast_to=object),
        lambda: routed.chat.completions.create(model=routed.models.list().data[0].id,  # no chat template
                                               messages=[{"role": "user", "content": "hi"}]),
    ]
    before = server.health()["answered"]
    for call in refused:
        with pytest.raises(openai.APIStatusError) as caught:
            call()
        assert 400 <= caught.value.status_code < 500
        assert caught.value.body["message"]  # OpenAI's error shape, with a message naming the field
    request = urllib.request.Request(server.url + "/v1/completions", data=b"{not json", method="POST")
    with pytest.raises(urllib.error.HTTPError) as caught:
        urllib.request.urlopen(request, timeout=5)
    assert caught.value.code == 400
    answer = client.completions.create(model=model, prompt="1+1=", max_tokens=4)
    assert answer.choices[0].finish_reason in ("stop", "length")
    assert server.health()["answered"] == before + 1 and server.process.poll() is None


def test_chat_goes_through_the_chat_template(servers) -> None:
    """/v1/chat/completions answers what the completion endpoint gives for the rendered prompt;
    `stream: true` gives the same answer as server-sent events."""
    client = servers["plain"].client()
    chat = client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "12+34="}],
                                          max_tokens=6, stop=["\n"])
    plain = client.completions.create(model="plain", prompt="12+34=", max_tokens=6, stop=["\n"])
    assert chat.choices[0].message.content == plain.choices[0].text
    assert chat.model_extra["evomerge"]["served_by"] == ["merged"]
    streamed = list(client.chat.completions.create(model="plain", messages=[{"role": "user", "content": "12+34="}],
                                                   max_tokens=6, stop=["\n"], stream=True))
    assert "".join(c.choices[0].delta.content or "" for c in streamed) == plain.choices[0].text
    streamed = list(client.completions.create(model="plain", prompt="12+34=", max_tokens=6, stop=["\n"], stream=True))
    assert "".join(c.choices[0].text for c in streamed) == plain.choices[0].text


def test_concurrent_clients_are_batched_and_all_answered(servers) -> None:
    """A bounded load: 8 clients x 6 requests at once on loopback (the server's --max-concurrent);
    every request is answered (nothing dropped), several share a batch, and it ends by itself."""
    server, clients, each = servers["routed"], 8, 6
    model = server.client().models.list().data[0].id
    before = server.health()

    def one_client(c: int) -> list[str]:
        client = server.client()
        return [client.completions.create(model=model, prompt=PROMPTS[(c + i) % len(PROMPTS)], max_tokens=6,
                                          stop=["\n"]).choices[0].text for i in range(each)]

    with ThreadPoolExecutor(clients) as pool:
        answers = list(pool.map(one_client, range(clients), timeout=240))
    health = server.health()
    assert sum(len(a) for a in answers) == clients * each
    assert health["answered"] - before["answered"] == clients * each
    assert health["rejected"] == before["rejected"] and health["errors"] == before["errors"]
    batches = health["batches"] - before["batches"]
    assert batches < clients * each and health["largest_batch"] > 1


@pytest.mark.parametrize("kind", ["plain", "routed"])
def test_every_export_has_a_model_card(exports, kind) -> None:
    """README.md in Hugging Face's format: huggingface_hub parses its metadata, the body has the scores."""
    from huggingface_hub import ModelCard

    from evomerge.run_dir import RunDir

    folder = exports[kind]
    card = ModelCard.load(folder / "README.md")
    config = RunDir.open(folder.parent / "run").config()
    assert card.data.base_model == [config.models.base, *config.models.experts]
    assert {"merge", "evomerge", "task_arithmetic"} <= set(card.data.tags)
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    recipe = json.loads((folder / "recipe.json").read_text())
    # the trial's quality with its standard error over the documents (a real search journals one)
    assert f"| **this model** (evolved) | {recipe['trial']} | {recipe['quality']:.4f} ± " in card.text
    assert f"evomerge export {folder.parent / 'run'} --trial {recipe['trial']}" in card.text
    if kind == "routed":
        assert "prefix-router" in card.data.tags and "policies.load" in card.text
