"""The HTTP side: a FastAPI app serving the OpenAI API and the chat page, run by uvicorn.

    POST /v1/chat/completions   messages rendered with the model's chat template; streamed as server-sent events
    POST /v1/completions        a plain prompt (text, or token ids)
    GET  /v1/models             the one model this server runs
    GET  /health                {"status": "ok", ...} with the engine's load
    GET  /                      the chat page (torchat/server/static)

Requests reach the engine thread (torchat.server.engine) as `Job`s; what the engine sends back is queued on the
event loop. A client that goes away cancels its job, and the engine frees the slot before its next step.
"""

import asyncio
import hmac
import json
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
from fastapi import FastAPI, Request
from fastapi.responses import FileResponse, JSONResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException

from torchat.errors import TorchatError
from torchat.generate import Sampling
from torchat.server.engine import Engine, Job
from torchat.server.protocol import APIError, ChatRequest, CompletionRequest, Reply, parse_request
from torchat.templates import render

STATIC = Path(__file__).parent / "static"
PREFIX_HEADER = "x-torchat-prefix-reused"  # prompt tokens the slot's KV cache already held
BATCH_HEADER = "x-torchat-batch"  # the most requests decoded together with this one (answers sent whole)


@dataclass
class Service:
    """What the app serves and its defaults for fields a request leaves out."""

    engine: Engine
    tokenizer: object
    template: str
    model_id: str
    max_seq_len: int
    description: dict = field(default_factory=dict)
    max_tokens: int = 200             # when a request names none (and the context has room)
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    api_key: str | None = None
    max_body: int = 1 << 20           # bytes
    log: object = None


def create_app(service: Service) -> FastAPI:
    app = FastAPI(title="torchat", docs_url=None, redoc_url=None, openapi_url=None)
    log = service.log or (lambda line: print(line, file=sys.stderr, flush=True))

    @app.exception_handler(APIError)
    async def api_error(request: Request, error: APIError):
        log(f"torchat server: {_client(request)} {request.method} {request.url.path} {error.status} {error.message}")
        headers = {"WWW-Authenticate": "Bearer"} if error.status == 401 else None
        return JSONResponse(error.body(), status_code=error.status, headers=headers)

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, error: HTTPException):
        return await api_error(request, APIError(error.status_code, f"{request.method} {request.url.path}: "
                                                 f"{error.detail}", code=None))

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": service.model_id, **service.engine.load()}

    @app.get("/v1/models")
    async def models(request: Request):
        _authorize(service, request)
        return {"object": "list", "data": [{"id": service.model_id, "object": "model", "created": 0,
                                            "owned_by": "torchat", "max_model_len": service.max_seq_len}]}

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        _authorize(service, request)
        body = parse_request(ChatRequest, await _read_json(request, service.max_body))
        _check_model(service, body.model)
        try:
            prompt = render(service.tokenizer, service.template, body.conversation())
        except TorchatError as error:
            raise APIError(400, str(error), "messages") from None
        max_tokens = body.max_completion_tokens or body.max_tokens
        return await _serve(service, request, body, prompt, max_tokens, chat=True, log=log)

    @app.post("/v1/completions")
    async def completions(request: Request):
        _authorize(service, request)
        body = parse_request(CompletionRequest, await _read_json(request, service.max_body))
        _check_model(service, body.model)
        if body.echo or body.suffix:
            raise APIError(400, "echo and suffix are not supported", "echo" if body.echo else "suffix")
        prompt = _completion_prompt(service, body.prompt)
        return await _serve(service, request, body, prompt, body.max_tokens, chat=False, log=log)

    @app.get("/")
    async def page():
        return FileResponse(STATIC / "index.html")

    app.mount("/static", StaticFiles(directory=STATIC), name="static")
    return app


# --- request checks ----------------------------------------------------------------------------------------------

def _client(request: Request) -> str:
    return f"{request.client.host}:{request.client.port}" if request.client else "-"


def _authorize(service: Service, request: Request) -> None:
    if service.api_key is None:
        return
    given = request.headers.get("authorization", "")
    scheme, _, key = given.partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(key.strip().encode(), service.api_key.encode()):
        raise APIError(401, "Incorrect or missing API key: send the header 'Authorization: Bearer KEY' with the "
                       "server's --api-key", None, "invalid_api_key")


async def _read_json(request: Request, limit: int):
    """The body as JSON; over `limit` bytes it is read to its end (up to 16x the limit, so that the client gets
    the answer, not a reset connection) and refused."""
    declared = request.headers.get("content-length", "")
    too_large = declared.isdigit() and int(declared) > limit
    body, seen = bytearray(), 0
    async for chunk in request.stream():
        seen += len(chunk)
        if seen > limit:
            too_large = True
            if seen > 16 * limit:
                break
        elif not too_large:
            body += chunk
    if too_large:
        raise APIError(413, f"the request body is over this server's limit of {limit} bytes (--max-body-bytes)",
                       None, "request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as error:
        raise APIError(400, f"We could not parse the JSON body of your request ({error}). The OpenAI API expects "
                       "a JSON payload.", None, "invalid_json") from None


def _check_model(service: Service, model: str) -> None:
    if model != service.model_id:
        raise APIError(404, f"The model '{model}' does not exist; this server runs '{service.model_id}' "
                       "(GET /v1/models)", "model", "model_not_found")


def _completion_prompt(service: Service, prompt) -> list[int]:
    tokenizer = service.tokenizer
    if isinstance(prompt, list) and prompt and all(isinstance(p, int) for p in prompt):
        if any(not 0 <= p < tokenizer.vocab_size for p in prompt):
            raise APIError(400, f"prompt: token ids must lie in 0..{tokenizer.vocab_size - 1}", "prompt")
        return list(prompt)
    if isinstance(prompt, list):
        if len(prompt) != 1:
            raise APIError(400, f"prompt: one prompt per request, got {len(prompt)}", "prompt", "unsupported_value")
        prompt = prompt[0]
    ids = tokenizer.encode(prompt, bos=tokenizer.add_bos)
    if not ids:
        raise APIError(400, "prompt: the prompt is empty", "prompt")
    return ids


def _budget(service: Service, prompt: list[int], max_tokens: int | None, param: str) -> int:
    """The request's answer length: as asked, else the server's default within the context."""
    room = service.max_seq_len - len(prompt)
    if max_tokens is None:
        max_tokens = min(service.max_tokens, room)
    if room < 1 or len(prompt) + max_tokens > service.max_seq_len:
        raise APIError(400, f"This model's maximum context length is {service.max_seq_len} tokens. However, you "
                       f"requested {len(prompt) + max(max_tokens, 0)} tokens ({len(prompt)} in the {param}, "
                       f"{max(max_tokens, 0)} in the completion). Please reduce the length of the {param} or "
                       "completion.", param, "context_length_exceeded")
    return max_tokens


def _sampling(service: Service, body) -> tuple[Sampling, torch.Generator | None]:
    temperature = service.temperature if body.temperature is None else body.temperature
    top_p = service.top_p if body.top_p is None else body.top_p
    if top_p == 0:  # nothing but the most likely token
        temperature, top_p = 0.0, None
    generator = None
    if body.seed is not None:
        if not -(1 << 63) <= body.seed < (1 << 64):
            raise APIError(400, "seed: out of the 64-bit range", "seed")
        generator = torch.Generator().manual_seed(body.seed)
    return Sampling(temperature, service.top_k, top_p if top_p is not None and top_p < 1 else None), generator


# --- running a request ---------------------------------------------------------------------------------------------

class _Events:
    """What the engine sends one job, read on the event loop; a disconnect of the client cancels the job."""

    def __init__(self, request: Request):
        self.queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()

        def deliver(*event) -> None:  # from the engine's thread
            try:
                loop.call_soon_threadsafe(self.queue.put_nowait, event)
            except RuntimeError:  # the event loop has closed: the server is shutting down
                pass

        self.deliver = deliver
        self.request = request
        self.gone: asyncio.Task | None = None

    def watch(self, job: Job) -> None:
        self.gone = asyncio.ensure_future(self._disconnected())
        self.gone.add_done_callback(lambda task: task.cancelled() or job.cancel())

    def unwatch(self) -> None:
        if self.gone is not None:
            self.gone.cancel()
            self.gone = None

    async def _disconnected(self) -> None:
        while (await self.request.receive())["type"] != "http.disconnect":
            pass

    async def next(self):
        """The next event, or None once the client is gone."""
        get = asyncio.ensure_future(self.queue.get())
        waiting = {get} | ({self.gone} if self.gone is not None else set())
        done, _ = await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
        if get in done:
            return get.result()
        get.cancel()
        return None


async def _serve(service: Service, request: Request, body, prompt: list[int], max_tokens: int | None, chat: bool,
                 log):
    param = "messages" if chat else "prompt"
    max_tokens = _budget(service, prompt, max_tokens, param)
    sampling, generator = _sampling(service, body)
    events = _Events(request)
    job = Job(prompt, max_tokens, sampling, events.deliver, body.stops(), generator)
    if not service.engine.submit(job):
        raise APIError(503, "the server is busy (its waiting line is full); retry later", None, "server_overloaded",
                       "server_error")
    events.watch(job)
    first = await events.next()
    if first is None or first[0] != "start":
        events.unwatch()
        job.cancel()
        if first is None:
            _log_job(log, request, 499, job, "client went away while queued")
            return JSONResponse({}, status_code=499)
        raise APIError(503, first[1], None, "server_error", "server_error")
    reply = Reply(chat, service.model_id)
    headers = {PREFIX_HEADER: str(job.reused)}
    include_usage = bool(body.stream_options and body.stream_options.include_usage)
    if body.stream:
        events.unwatch()  # the stream watches again from inside the response
        return StreamingResponse(_stream(events, job, reply, include_usage, request, log), headers={
            **headers, "Cache-Control": "no-cache"}, media_type="text/event-stream")
    parts = []
    try:
        while (event := await events.next()) is not None and event[0] == "text":
            parts.append(event[1])
    finally:
        events.unwatch()
        job.cancel()  # a no-op once it ended
    if event is None:
        _log_job(log, request, 499, job, "client went away")
        return JSONResponse({}, status_code=499)
    if event[0] == "error":
        raise APIError(500, event[1], None, None, "server_error")
    _log_job(log, request, 200, job)
    return JSONResponse(reply.complete("".join(parts), event[1], len(prompt), job.produced),
                        headers={**headers, BATCH_HEADER: str(job.batch)})


def _sse(payload) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


async def _stream(events: _Events, job: Job, reply: Reply, include_usage: bool, request: Request, log):
    events.watch(job)
    outcome = "client went away"
    try:
        if reply.chat:
            yield _sse(reply.chunk(None, first=True, include_usage=include_usage))
        while (event := await events.next()) is not None:
            kind, value = event
            if kind == "text":
                yield _sse(reply.chunk(value, include_usage=include_usage))
            elif kind == "error":
                outcome = value
                yield _sse(APIError(500, value, type="server_error").body())
                break
            else:
                outcome = ""
                yield _sse(reply.chunk(None if reply.chat else "", value, include_usage=include_usage))
                if include_usage:
                    yield _sse(reply.usage_chunk(len(job.prompt), job.produced))
                yield "data: [DONE]\n\n"
                break
    finally:
        events.unwatch()
        job.cancel()
        _log_job(log, request, 200, job, outcome, streamed=True)


def _log_job(log, request: Request, status: int, job: Job, note: str = "", streamed: bool = False) -> None:
    """One line a request: who, what, how long its prompt and answer, what the cache held, how fast."""
    now = time.perf_counter()
    queued = (job.admitted or now) - job.arrived
    first = f"first token {job.first_token - job.arrived:.3f} s" if job.first_token else "no token"
    line = (f"torchat server: {_client(request)} {request.method} {request.url.path} {status}"
            f"{' stream' if streamed else ''} | prompt {len(job.prompt)} tok (reused {job.reused}) + {job.produced}"
            f" tok, {job.finish_reason or 'unfinished'} | slot {job.slot}, batch {job.batch}, queued {queued:.3f} s, "
            f"{first}, decode {job.decode_tok_s:.1f} tok/s")
    log(line + (f" | {note}" if note else ""))
