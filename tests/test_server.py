"""`torchat server`, driven by the official `openai` client against a server in a subprocess on 127.0.0.1.

- batched decode (torchat.server.batch) equals each row decoded alone; stop strings are cut, never half shown;
- the default model's chat answers, streamed and not, equal `torchat chat`'s greedy answer (torchat.chat.
  ChatSession on the same model), a continued conversation reuses its cached prefix, completions equal
  `torchat generate`'s, and 4 concurrent greedy requests (decoded as one batch) equal each run alone;
- the same parity for a .pt2 and a .pte (slow: SmolLM2's fp32 exports from the store), served first come first
  served;
- every bad request gets the API's error shape with a 4xx, and the server answers the next one;
- --api-key, and a host beyond loopback refused without --allow-remote;
- a bounded load test: 16 clients x 4 requests, some leaving mid-stream: all answered, none hung, the slots
  freed and the server's memory back near its level before.

Every server here listens on 127.0.0.1 with a free port, stops by itself (--stop-after) and is killed by its
fixture's finalizer; every client call has a timeout.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import torch

openai = pytest.importorskip("openai", reason="the test extra pins openai: pip install -e '.[test]'")

ROOT = Path(__file__).resolve().parent.parent
STARTUP_S = 600      # loading a model on a busy 2-core machine; an export is realized before the server starts
REQUEST_S = 300      # one request, however loaded the machine
LIFETIME_S = 3600    # --stop-after: a server that outlives its test session stops by itself
CONTEXT = 512        # the eager servers' KV cache: room for the tests, less memory than the default 2048
SYSTEM = "You are a concise assistant."
QUESTIONS = ["What is the capital of France?", "Name three primary colours.", "What is 2 + 2?",
             "Give me a word that rhymes with cat."]


# --- a server in a subprocess ------------------------------------------------------------------------------------

class ServerProcess:
    """`python -m torchat server ARGS --port 0` until stopped; `url` once it listens, `lines` its stderr."""

    def __init__(self, args: list[str], verb: str = "server", env: dict | None = None):
        self.lines: list[str] = []
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "torchat", verb, *args, "--host", "127.0.0.1", "--port", "0",
             "--stop-after", str(LIFETIME_S)],
            cwd=ROOT, env={**os.environ, "PYTHONPATH": str(ROOT), **(env or {})}, stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        self.ready = threading.Event()
        self.url = None
        threading.Thread(target=self._read, daemon=True).start()
        if not self.ready.wait(STARTUP_S) or self.url is None:
            self.stop()
            raise AssertionError("the server did not start:\n" + "".join(self.lines[-30:]))

    def _read(self):
        for line in self.proc.stderr:
            self.lines.append(line)
            found = re.search(r" at (http://127\.0\.0\.1:\d+)$", line.strip())
            if found and self.url is None:
                self.url = found.group(1)
                self.ready.set()
        self.ready.set()  # it exited

    def client(self, **options) -> "openai.OpenAI":
        return openai.OpenAI(base_url=f"{self.url}/v1", api_key=options.pop("api_key", "none"), max_retries=0,
                             timeout=options.pop("timeout", REQUEST_S), **options)

    def model_id(self) -> str:
        return self.client().models.list().data[0].id

    def health(self) -> dict:
        with urllib.request.urlopen(f"{self.url}/health", timeout=30) as response:
            return json.load(response)

    def rss_kib(self) -> int:
        status = Path(f"/proc/{self.proc.pid}/status").read_text()
        return int(re.search(r"VmRSS:\s+(\d+) kB", status).group(1))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(30)


def start_server(request, args: list[str], verb: str = "server", env: dict | None = None) -> ServerProcess:
    server = ServerProcess(args, verb, env)
    request.addfinalizer(server.stop)
    return server


def post(url: str, body: bytes, headers: dict | None = None) -> tuple[int, dict]:
    """A raw POST (for bodies the openai client will not send): (status, JSON answer)."""
    req = urllib.request.Request(url, data=body, method="POST",
                                 headers={"Content-Type": "application/json", **(headers or {})})
    try:
        with urllib.request.urlopen(req, timeout=REQUEST_S) as response:
            return response.status, json.load(response)
    except urllib.error.HTTPError as error:
        return error.code, json.load(error)


def chat_messages(question: str, system: str | None = SYSTEM) -> list[dict]:
    return [*([{"role": "system", "content": system}] if system else []), {"role": "user", "content": question}]


def streamed(stream) -> tuple[str, str | None, dict | None]:
    """(text, finish_reason, usage) of a streamed chat answer."""
    text, finish, usage = [], None, None
    for chunk in stream:
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            text.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(text), finish, usage


# --- the references: `torchat chat` and `torchat generate` on the same model ------------------------------------

class Reference:
    """Greedy answers of torchat.chat.ChatSession (what `torchat chat` runs) and torchat.generate on a model."""

    def __init__(self, source):
        from torchat.model_source import open_model
        from torchat.templates import pick_template

        self.opened = open_model(source)
        self.template = pick_template(self.opened.tokenizer)

    def session(self, max_tokens: int, system: str | None = SYSTEM):
        from torchat.chat import ChatSession
        from torchat.generate import Sampling

        return ChatSession(self.opened.text_model, self.opened.tokenizer, self.template, Sampling(), max_tokens,
                           system, notice=lambda text: None)

    def chat(self, question: str, max_tokens: int, system: str | None = SYSTEM) -> tuple[str, int, str]:
        """(answer text, tokens the model produced: the answer's and the end-of-turn token if it came, the API's
        finish_reason)."""
        return self.reply(self.session(max_tokens, system), question)

    def reply(self, session, question: str) -> tuple[str, int, str]:
        ids = list(session.reply(question))
        produced = session.stats.new_tokens
        return self.opened.tokenizer.decode(ids), produced, "stop" if produced > len(ids) else "length"

    def complete(self, prompt: str, max_tokens: int) -> str:
        from torchat.generate import Sampling, generate_text

        pieces = []
        generate_text(self.opened, prompt, max_tokens, Sampling(), write=pieces.append)
        return "".join(pieces[1:]).removesuffix("\n")  # the prompt comes first, a newline last


# --- unit: batched decode and stop strings -----------------------------------------------------------------------

def test_batched_decode_equals_each_row_decoded_alone():
    """Four prompts of different lengths in rows 5, 1, 2, 3 of one cache, decoded together for 6 steps, give the
    logits of each prompt run alone through the model's own forward (to float rounding); one row gives exactly
    the model's numbers."""
    from tiny_model import tiny_transformer

    from torchat.generate import EagerModel, decode_one_token, prefill
    from torchat.server.batch import BatchedSlots

    prompts = [[1, 2, 3, 4, 5], [7, 8], [9, 10, 11, 12, 13, 14, 15], [20]]
    alone = []
    for prompt in prompts:
        model = EagerModel(tiny_transformer(), 64)
        logits = [prefill(model, prompt, 0)]
        for step in range(6):
            logits.append(decode_one_token(model, int(logits[-1].argmax()), len(prompt) + step))
        alone.append(torch.stack(logits))
    slots, rows = BatchedSlots(tiny_transformer(), 6, 64), [5, 1, 2, 3]
    together = [[slots.prefill(row, prompt, 0)] for row, prompt in zip(rows, prompts)]
    for step in range(6):
        out = slots.decode(rows, [int(t[-1].argmax()) for t in together], [len(p) + step for p in prompts])
        for t, logits in zip(together, out):
            t.append(logits)
    for reference, t in zip(alone, together):
        torch.testing.assert_close(torch.stack(t), reference, rtol=0, atol=1e-4)
        assert torch.equal(torch.stack(t).argmax(-1), reference.argmax(-1))
    # one row at a time (not consecutive with another): bit for bit the model's forward
    one = BatchedSlots(tiny_transformer(), 4, 64)
    assert torch.equal(one.prefill(2, prompts[2], 0), alone[2][0])
    assert torch.equal(one.decode([2], [int(alone[2][0].argmax())], [len(prompts[2])])[0], alone[2][1])


def test_stop_strings_are_cut_and_never_shown_in_part():
    from torchat.server.engine import StopText

    stop = StopText(["\n\n", "END"])
    pieces = [stop.add(text) for text in ("Hello", " E", "N", "d of it.\n", "\nmore")]
    assert pieces == [("Hello", False), (" ", False), ("", False), ("ENd of it.", False), ("", True)]
    assert StopText(["b"]).add("abc") == ("a", True)
    none = StopText([])
    assert none.add("a\n") == ("a\n", False) and none.flush() == ""


# --- the default model, eager --------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def eager(request, smollm2_gguf):
    return start_server(request, [str(smollm2_gguf), "--max-seq-length", str(CONTEXT), "--max-batch", "4",
                                  "--max-body-bytes", "65536"])


@pytest.fixture(scope="module")
def eager_reference(smollm2_gguf):
    from torchat.model_source import ModelSource

    return Reference(ModelSource(checkpoint=smollm2_gguf, max_seq_len=CONTEXT))


def check_chat_parity(server: ServerProcess, reference: Reference, question: str, max_tokens: int = 48):
    """Streamed and whole chat answers equal the reference's, with its token count and finish reason."""
    client, model = server.client(), server.model_id()
    expected, produced, finish = reference.chat(question, max_tokens)
    raw = client.chat.completions.with_raw_response.create(
        model=model, messages=chat_messages(question), max_tokens=max_tokens, temperature=0)
    whole = raw.parse()
    assert whole.choices[0].message.content == expected
    assert whole.choices[0].message.role == "assistant"
    assert whole.choices[0].finish_reason == finish
    assert whole.object == "chat.completion" and whole.model == model
    assert (whole.usage.completion_tokens, whole.usage.total_tokens) == (produced, whole.usage.prompt_tokens + produced)
    assert int(raw.headers["x-torchat-prefix-reused"]) < whole.usage.prompt_tokens
    text, stream_finish, usage = streamed(client.chat.completions.create(
        model=model, messages=chat_messages(question), max_completion_tokens=max_tokens, temperature=0, stream=True,
        stream_options={"include_usage": True}))
    assert (text, stream_finish) == (expected, finish)
    assert usage.completion_tokens == produced and usage.prompt_tokens == whole.usage.prompt_tokens
    return expected


def test_chat_answers_equal_torchat_chat_greedy(eager, eager_reference):
    answer = check_chat_parity(eager, eager_reference, QUESTIONS[0])
    assert "Paris" in answer


def test_a_continued_conversation_reuses_the_cached_prefix(eager, eager_reference):
    """The second turn sends the first turn back: the server prefills only what its slot's cache lacks (the header
    says how much it held), and answers as `torchat chat`'s second turn does."""
    client, model = eager.client(), eager.model_id()
    session = eager_reference.session(40)
    first, _, _ = eager_reference.reply(session, "What is the capital of France?")
    second, produced, _ = eager_reference.reply(session, "And of Germany?")
    messages = [*chat_messages("What is the capital of France?")]
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=40)
    assert raw.parse().choices[0].message.content == first
    first_prompt = raw.parse().usage.prompt_tokens
    messages += [{"role": "assistant", "content": first}, {"role": "user", "content": "And of Germany?"}]
    raw = client.chat.completions.with_raw_response.create(model=model, messages=messages, max_tokens=40)
    answer = raw.parse()
    assert answer.choices[0].message.content == second
    assert answer.usage.completion_tokens == produced
    # the slot held the first prompt and the first answer
    assert int(raw.headers["x-torchat-prefix-reused"]) >= first_prompt + produced // 2
    assert any("reused" in line and "/v1/chat/completions 200" in line for line in eager.lines)


def test_completions_equal_torchat_generate_greedy(eager, eager_reference):
    client, model = eager.client(), eager.model_id()
    prompt, max_tokens = "The three largest cities in Europe are", 16
    expected = eager_reference.complete(prompt, max_tokens)
    whole = client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0)
    assert whole.choices[0].text == expected and whole.object == "text_completion"
    assert whole.choices[0].finish_reason == "length" and whole.usage.completion_tokens == max_tokens
    chunks = list(client.completions.create(model=model, prompt=prompt, max_tokens=max_tokens, temperature=0,
                                            stream=True))
    assert "".join(c.choices[0].text for c in chunks) == expected
    assert chunks[-1].choices[0].finish_reason == "length"


def test_stop_strings_max_tokens_and_seed(eager, eager_reference):
    client, model = eager.client(), eager.model_id()
    question = QUESTIONS[1]
    expected, _, _ = eager_reference.chat(question, 48)
    word = expected.split()[2]
    cut = expected[:expected.index(word)]
    for stop in (word, [word, "zzzz"]):
        answer = client.chat.completions.create(model=model, messages=chat_messages(question), max_tokens=48,
                                                stop=stop)
        assert (answer.choices[0].message.content, answer.choices[0].finish_reason) == (cut, "stop")
        text, finish, _ = streamed(client.chat.completions.create(
            model=model, messages=chat_messages(question), max_tokens=48, stop=stop, stream=True))
        assert (text, finish) == (cut, "stop")
    short = client.chat.completions.create(model=model, messages=chat_messages(question), max_tokens=3)
    assert short.choices[0].finish_reason == "length" and short.usage.completion_tokens == 3
    sampled = [client.chat.completions.create(model=model, messages=chat_messages(QUESTIONS[3]), max_tokens=24,
                                              temperature=1.2, top_p=0.95, seed=seed).choices[0].message.content
               for seed in (7, 7, 8)]
    assert sampled[0] == sampled[1], "the same seed gave different samples"


def test_concurrent_greedy_requests_decode_as_one_batch_and_equal_each_alone(eager, eager_reference):
    client, model = eager.client(), eager.model_id()
    expected = [eager_reference.chat(q, 32)[0] for q in QUESTIONS]

    def ask(question):
        raw = client.chat.completions.with_raw_response.create(model=model, messages=chat_messages(question),
                                                               max_tokens=32)
        return raw.parse().choices[0].message.content, int(raw.headers["x-torchat-batch"])

    with ThreadPoolExecutor(len(QUESTIONS)) as pool:
        answers = list(pool.map(ask, QUESTIONS, timeout=REQUEST_S))
    assert [text for text, _ in answers] == expected
    assert max(batch for _, batch in answers) > 1, "the requests were never decoded together"


def test_models_and_health(eager):
    models = eager.client().models.list()
    assert [m.id for m in models.data] == [eager.model_id()] and models.data[0].object == "model"
    health = eager.health()
    assert health["status"] == "ok" and health["slots"] == 4


# --- bad requests --------------------------------------------------------------------------------------------------

def _error_of(call) -> tuple[int, dict]:
    with pytest.raises(openai.APIStatusError) as raised:
        call()
    return raised.value.status_code, raised.value.body


BAD_BODIES = {
    # name: (body or a function of (model id) -> body, status, param)
    "malformed JSON": (b'{"model": "m", "messages": [', 400, None),
    "not an object": (b"[1, 2]", 400, None),
    "missing messages": (lambda model: {"model": model}, 400, "messages"),
    "missing model": (lambda model: {"messages": chat_messages("hi")}, 400, "model"),
    "messages of the wrong type": (lambda model: {"model": model, "messages": "hi"}, 400, "messages"),
    "content of the wrong type": (lambda model: {"model": model, "messages": [{"role": "user", "content": 5}]},
                                  400, "messages[0].content"),
    "an unknown role": (lambda model: {"model": model, "messages": [{"role": "wizard", "content": "hi"}]},
                        400, "messages[0].role"),
    "temperature of the wrong type": (lambda model: {"model": model, "messages": chat_messages("hi"),
                                                     "temperature": "hot"}, 400, "temperature"),
    "a negative temperature": (lambda model: {"model": model, "messages": chat_messages("hi"),
                                              "temperature": -0.5}, 400, "temperature"),
    "max_tokens of the wrong type": (lambda model: {"model": model, "messages": chat_messages("hi"),
                                                    "max_tokens": "many"}, 400, "max_tokens"),
    "n above 1": (lambda model: {"model": model, "messages": chat_messages("hi"), "n": 2}, 400, "n"),
    "an unknown model": (lambda model: {"model": "gpt-17", "messages": chat_messages("hi")}, 404, "model"),
    "prompt + max_tokens past the context": (lambda model: {"model": model, "messages": chat_messages("hi"),
                                                            "max_tokens": CONTEXT}, 400, "messages"),
    "a prompt past the context": (lambda model: {"model": model, "messages": chat_messages("word " * CONTEXT)},
                                  400, "messages"),
    "a body over the size limit": (lambda model: {"model": model, "messages": chat_messages("x" * 70000)},
                                   413, None),
}


@pytest.mark.parametrize("name", list(BAD_BODIES))
def test_a_bad_request_gets_the_error_shape_and_the_server_keeps_serving(eager, name):
    body, status, param = BAD_BODIES[name]
    model = eager.model_id()
    raw = body if isinstance(body, bytes) else json.dumps(body(model)).encode()
    got, answer = post(f"{eager.url}/v1/chat/completions", raw)
    assert got == status, answer
    assert set(answer) == {"error"} and set(answer["error"]) == {"message", "type", "param", "code"}, answer
    assert answer["error"]["param"] == param and answer["error"]["message"]
    assert answer["error"]["type"] == "invalid_request_error"
    if name.endswith("context"):
        assert answer["error"]["code"] == "context_length_exceeded"
    # the server answers the next request
    after = eager.client().chat.completions.create(model=model, messages=chat_messages("hi"), max_tokens=2)
    assert after.choices[0].finish_reason in ("stop", "length")


def test_the_openai_client_raises_on_the_error_shape(eager):
    """The official client reads our errors as it reads OpenAI's: the right exception class, code and param."""
    client, model = eager.client(), eager.model_id()
    status, body = _error_of(lambda: client.chat.completions.create(model="gpt-17", messages=chat_messages("hi")))
    assert status == 404 and body["code"] == "model_not_found"
    with pytest.raises(openai.BadRequestError) as raised:
        client.chat.completions.create(model=model, messages=chat_messages("hi"), temperature=-1)
    assert raised.value.param == "temperature"
    with pytest.raises(openai.BadRequestError) as raised:
        client.completions.create(model=model, prompt="", max_tokens=4)
    assert raised.value.param == "prompt"
    status, body = _error_of(lambda: client.get("/nowhere", cast_to=object))
    assert status == 404 and set(body) == {"message", "type", "param", "code"}


# --- access ----------------------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tiny_server(request, tiny_checkpoint):
    """The tiny random model: for what needs a server, not good answers (access, load, disconnects)."""
    return start_server(request, ["--checkpoint-dir", str(tiny_checkpoint), "--max-batch", "4",
                                  "--max-waiting", "64", "--api-key", "sesame"])


def test_api_key(tiny_server):
    with pytest.raises(openai.AuthenticationError) as raised:
        tiny_server.client(api_key="wrong").models.list()
    assert raised.value.status_code == 401 and raised.value.code == "invalid_api_key"
    status, body = post(f"{tiny_server.url}/v1/chat/completions", b"{}")
    assert status == 401 and body["error"]["code"] == "invalid_api_key"
    client = tiny_server.client(api_key="sesame")
    model = client.models.list().data[0].id
    answer = client.chat.completions.create(model=model, messages=chat_messages("hi"), max_tokens=3)
    assert answer.usage.completion_tokens <= 3
    assert tiny_server.health()["status"] == "ok"  # health checks need no key


def test_a_host_beyond_loopback_needs_allow_remote():
    result = subprocess.run([sys.executable, "-m", "torchat", "server", "--host", "0.0.0.0", "--port", "0"],
                            cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip().endswith("pass --allow-remote as well if that is meant (and consider --api-key)")
    assert len(result.stderr.strip().splitlines()) == 1


def test_torchat_browser_opens_the_page(request, tiny_checkpoint, tmp_path):
    """`torchat browser` serves as `server` does and hands the page's URL to the user's browser ($BROWSER here: a
    script that writes down what it was asked to open)."""
    opened = tmp_path / "opened.txt"
    browser = tmp_path / "browser"
    browser.write_text(f'#!/bin/sh\necho "$1" > {opened}\n')
    browser.chmod(0o755)
    server = start_server(request, ["--checkpoint-dir", str(tiny_checkpoint)], verb="browser",
                          env={"BROWSER": str(browser)})
    deadline = time.monotonic() + 60
    while not opened.exists() and time.monotonic() < deadline:
        time.sleep(0.1)
    assert opened.read_text().strip() == f"{server.url}/"
    with urllib.request.urlopen(f"{server.url}/", timeout=30) as page:
        html = page.read().decode()
    assert '<script src="/static/chat.js">' in html
    for asset in ("chat.js", "chat.css"):
        with urllib.request.urlopen(f"{server.url}/static/{asset}", timeout=30) as response:
            assert response.status == 200 and response.read()


# --- load -------------------------------------------------------------------------------------------------------------

def test_load_16_clients_some_leaving_mid_stream(tiny_server):
    """16 clients x 4 requests on 4 slots (the rest wait their turn); every 3rd request streams and leaves after
    two chunks. Every request is answered in time, the slots are free afterwards, and the server's resident memory
    is back within 64 MiB of its level before."""
    client = tiny_server.client(api_key="sesame", timeout=120)
    model = client.models.list().data[0].id
    client.chat.completions.create(model=model, messages=chat_messages("warm up"), max_tokens=8)
    before = tiny_server.rss_kib()

    def one(index: int) -> str:
        messages = chat_messages(f"request {index}: {QUESTIONS[index % 4]}")
        if index % 3 == 0:  # leaves mid-stream
            with client.chat.completions.create(model=model, messages=messages, max_tokens=60, stream=True,
                                                temperature=1.0, seed=index) as stream:
                for i, _ in enumerate(stream):
                    if i == 2:
                        break
            return "left"
        answer = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=1.0,
                                                seed=index)
        assert answer.choices[0].finish_reason in ("stop", "length")
        return answer.choices[0].finish_reason

    def client_loop(c: int) -> list[str]:
        return [one(c * 4 + r) for r in range(4)]

    start = time.monotonic()
    with ThreadPoolExecutor(16) as pool:
        outcomes = [o for outcome in pool.map(client_loop, range(16), timeout=600) for o in outcome]
    assert len(outcomes) == 64 and outcomes.count("left") == 22
    deadline = time.monotonic() + 30
    while (health := tiny_server.health())["active"] + health["waiting"] and time.monotonic() < deadline:
        time.sleep(0.2)
    assert health["active"] == health["waiting"] == 0, health
    after = tiny_server.rss_kib()
    assert after - before < 64 * 1024, f"RSS grew from {before} to {after} KiB"
    served = [line for line in tiny_server.lines if "POST /v1/chat/completions" in line]
    assert len(served) >= 64 and sum("client went away" in line for line in served) >= 1
    assert time.monotonic() - start < 600


def test_a_client_leaving_mid_stream_frees_its_slot(eager):
    """A stream that would run for 200 tokens is left after two chunks: the engine drops it within a few steps."""
    client, model = eager.client(), eager.model_id()
    steps = eager.health()["steps"]
    with client.chat.completions.create(model=model, messages=chat_messages("Tell me a long story."),
                                        max_tokens=200, stream=True) as stream:
        for i, _ in enumerate(stream):
            if i == 2:
                break
    deadline = time.monotonic() + 60
    while (health := eager.health())["active"] and time.monotonic() < deadline:
        time.sleep(0.1)
    assert health["active"] == 0, health
    assert health["steps"] - steps < 100, f"{health['steps'] - steps} decode steps for a stream left after 2"
    assert any("client went away" in line for line in eager.lines)


# --- exported artifacts: a fixed batch of 1, served in turn --------------------------------------------------------

@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt2", ".pte"])
def test_an_exported_model_answers_as_torchat_chat_does(request, smollm2_artifact, suffix):
    from torchat.model_source import ModelSource

    artifact = smollm2_artifact(suffix)
    server = start_server(request, [str(artifact)])
    assert any("one slot, requests in turn" in line for line in server.lines)
    reference = Reference(ModelSource(str(artifact)))
    check_chat_parity(server, reference, QUESTIONS[0], max_tokens=32)
    # two at once: the second waits for the first, both answered as alone
    client, model = server.client(), server.model_id()
    expected = [reference.chat(q, 16)[0] for q in QUESTIONS[1:3]]
    with ThreadPoolExecutor(2) as pool:
        answers = list(pool.map(lambda q: client.chat.completions.create(
            model=model, messages=chat_messages(q), max_tokens=16).choices[0].message.content, QUESTIONS[1:3],
            timeout=REQUEST_S))
    assert answers == expected
