"""`torchat server`: the OpenAI API and a chat page over any opened model, with batched decode.

    batch.py     the model side: cache slots, prefilled one request at a time, decoded together
    engine.py    the scheduler thread: continuous batching over the slots (a FIFO queue for batch-1 artifacts)
    protocol.py  the API's request bodies, error shape and response objects
    app.py       the FastAPI routes, streaming as server-sent events
    static/      the chat page at /

`serve` puts them together and runs uvicorn until it is stopped (or for `stop_after` seconds).
"""

import ipaddress
import signal
import sys
import threading
from dataclasses import dataclass

from torchat.errors import TorchatError


@dataclass(frozen=True)
class ServeOptions:
    host: str = "127.0.0.1"
    port: int = 8000
    allow_remote: bool = False        # binding beyond loopback must be asked for
    api_key: str | None = None
    max_batch: int = 8                # slots decoded together (eager models)
    max_waiting: int = 64             # requests queued beyond the slots; more are refused with 503
    max_body: int = 1 << 20
    model_name: str | None = None     # the id in /v1/models; the model's label when None
    chat_template: str | None = None
    max_tokens: int = 200
    temperature: float = 0.0
    top_k: int | None = None
    top_p: float | None = None
    stop_after: float | None = None   # seconds; then the server shuts down by itself (tests)


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def serve(opened, options: ServeOptions, on_ready=None) -> None:
    """Serve an opened model (torchat.model_source.OpenedModel) until interrupted; `on_ready(url)` once listening."""
    import uvicorn

    from torchat.server.app import Service, create_app
    from torchat.server.batch import open_slots
    from torchat.server.engine import Engine
    from torchat.templates import pick_template

    if not is_loopback(options.host) and not options.allow_remote:
        raise TorchatError(f"--host {options.host} is reachable from other machines; pass --allow-remote as well "
                           "if that is meant (and consider --api-key)")
    slots = open_slots(opened, options.max_batch)
    engine = Engine(slots, opened.tokenizer, options.max_waiting)
    label = opened.description.get("label") or "model"
    service = Service(engine, opened.tokenizer, pick_template(opened.tokenizer, options.chat_template),
                      options.model_name or label, slots.max_seq_len, opened.description, options.max_tokens,
                      options.temperature, options.top_k, options.top_p, options.api_key, options.max_body)
    config = uvicorn.Config(create_app(service), host=options.host, port=options.port, log_level="warning",
                            access_log=False, timeout_graceful_shutdown=5, lifespan="off")
    server = uvicorn.Server(config)
    batching = f"{slots.count} slots decoded together" if slots.count > 1 else "one slot, requests in turn (FIFO)"

    def announce() -> None:
        while not server.started and not server.should_exit:
            threading.Event().wait(0.05)
        if server.started:
            port = server.servers[0].sockets[0].getsockname()[1]
            host = f"[{options.host}]" if ":" in options.host else options.host
            url = f"http://{host}:{port}"
            print(f"torchat server: {service.model_id} ({opened.description.get('backend', '?')}, {batching}, "
                  f"{slots.max_seq_len}-token context) at {url}", file=sys.stderr, flush=True)
            if on_ready is not None:
                on_ready(url)

    def stop_later() -> None:
        threading.Event().wait(options.stop_after)
        print(f"torchat server: stopping after {options.stop_after:g} s (--stop-after)", file=sys.stderr, flush=True)
        server.should_exit = True

    def serve_http() -> None:
        try:
            server.run()  # in a thread uvicorn installs no signal handlers: the main thread takes them (below)
        finally:
            engine.close()

    # the engine runs in the main thread (see torchat/server/engine.py), uvicorn beside it
    http = threading.Thread(target=serve_http, name="torchat-http", daemon=True)
    previous = signal.signal(signal.SIGTERM, _stop_signal)
    http.start()
    threading.Thread(target=announce, name="torchat-announce", daemon=True).start()
    if options.stop_after is not None:
        threading.Thread(target=stop_later, name="torchat-stop-after", daemon=True).start()
    try:
        engine.run()
    except _Stop:
        pass
    finally:
        server.should_exit = True
        http.join(10)
        signal.signal(signal.SIGTERM, previous)


class _Stop(BaseException):
    """SIGTERM: leave the engine's loop wherever it is (not an Exception: no model-error handler catches it)."""


def _stop_signal(signum, frame):
    raise _Stop()
