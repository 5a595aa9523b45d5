"""`torchat server`: the OpenAI API (/v1/chat/completions, /v1/completions, /v1/models) and a chat page at /, over
any model `torchat generate` runs. `torchat browser`: the same server, with the page opened in a web browser.

Eager models decode the active requests together (--max-batch slots); exported artifacts serve one request at a
time, first come first served. The generation flags are the defaults for what a request leaves out.
"""

import argparse
import os
import sys

from torchat.cli.flags import (add_generation_flags, add_model_flags, add_parallel_flags, model_source,
                               non_negative_float, non_negative_int, positive_int)


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    add_model_flags(parser)
    add_parallel_flags(parser)
    add_generation_flags(parser)
    group = parser.add_argument_group("server")
    group.add_argument("--host", default="127.0.0.1", help="the address to listen on (default 127.0.0.1, this "
                                                           "machine only)")
    group.add_argument("--port", type=non_negative_int, default=8000, help="default 8000; 0 picks a free port")
    group.add_argument("--allow-remote", action="store_true",
                       help="allow a --host that other machines can reach")
    group.add_argument("--api-key", default=os.environ.get("TORCHAT_API_KEY"),
                       help="refuse /v1 requests without 'Authorization: Bearer KEY' (default: $TORCHAT_API_KEY)")
    group.add_argument("--max-batch", type=positive_int, default=8,
                       help="requests decoded together, each with its own KV cache row (eager models; default 8)")
    group.add_argument("--max-waiting", type=non_negative_int, default=64,
                       help="requests queued beyond --max-batch; more get 503 (default 64)")
    group.add_argument("--max-body-bytes", type=positive_int, default=1 << 20,
                       help="the largest request body (default 1 MiB); larger ones get 413")
    group.add_argument("--model-name", help="the model's id in the API (default: the model's label)")
    group.add_argument("--chat-template", help="jinja (the tokenizer's own), llama3 or llama2; chosen from the "
                                               "tokenizer when omitted")
    group.add_argument("--stop-after", type=non_negative_float, default=None, metavar="SECONDS",
                       help="shut down after this many seconds (for tests and scripts)")


def run(args: argparse.Namespace) -> int:
    from torchat.server import ServeOptions, is_loopback

    source = model_source(args)
    if not is_loopback(args.host) and not args.allow_remote:  # before minutes of loading
        from torchat.errors import TorchatError

        raise TorchatError(f"--host {args.host} is reachable from other machines; pass --allow-remote as well if "
                           "that is meant (and consider --api-key)")
    if str(source.model or source.checkpoint or "").endswith((".pte", "-et")):
        from torchat.threads import prepare_for_pte

        prepare_for_pte()  # before torch loads (see torchat/threads.py)
    from torchat.model_source import open_model
    from torchat.server import serve

    options = ServeOptions(args.host, args.port, args.allow_remote, args.api_key, args.max_batch, args.max_waiting,
                           args.max_body_bytes, args.model_name, args.chat_template, args.max_new_tokens,
                           args.temperature, args.top_k, args.top_p, args.stop_after)
    opened = open_model(source)
    if args.seed is not None:  # the sampling of requests that bring no seed of their own
        import torch

        torch.manual_seed(args.seed)
    serve(opened, options, on_ready=_open_page if args.verb == "browser" else None)
    return 0


def _open_page(url: str) -> None:
    import webbrowser

    page = f"{url}/"
    try:
        opened = webbrowser.open(page)
    except webbrowser.Error:
        opened = False
    if not opened:
        print(f"torchat browser: no web browser found here; open {page}", file=sys.stderr, flush=True)
