"""N concurrent streaming clients against `torchat server`, and llama.cpp's server measured the same way in the same
run: aggregate tokens/s, per-request decode tokens/s, time to first token p50/p99 at 1, 4, 8 and 16 clients, and
`torchat generate`'s decode speed on the same model for the 1-client comparison.

    python benchmarks/server_bench.py                      # the issue's configuration: SmolLM2 eager bf16, int4 g32
    python benchmarks/server_bench.py --clients 1,8 --max-tokens 64 --llama-python /path/to/venv/bin/python

Each client sends `--requests` streamed /v1/completions one after another (greedy, `--max-tokens` each) with the
official `openai` client. The peer is `python -m llama_cpp.server` (llama-cpp-python[server]) on the same GGUF,
run by `--llama-python` (default: this interpreter); it is left out, saying so, when that cannot import it.
Writes server_bench.json and server_bench.md (naming the CPU, its AVX-512, and others' CPU share meanwhile).
"""

import argparse
import json
import os
import re
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from torchat.bench import CpuShare, host_info  # noqa: E402

ISSUE_QUANT = '{"linear:int4": {"group_size": 32}}'
PROMPT = "Once upon a time, in a small village at the edge of a great forest, there lived"
STARTUP_S, REQUEST_S = 900, 900


def lscpu() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", text)
    return {"model_name": model.group(1).strip() if model else host_info()["cpu"],
            "avx512": "avx512f" in text, "cores": os.cpu_count()}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_ready(url: str, proc: subprocess.Popen, log: Path) -> None:
    deadline = time.monotonic() + STARTUP_S
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"the server exited ({proc.returncode}); see {log}")
        try:
            with urllib.request.urlopen(f"{url}/v1/models", timeout=5) as response:
                return json.load(response)["data"][0]["id"]
        except OSError:
            time.sleep(1)
    proc.terminate()
    raise SystemExit(f"the server did not answer within {STARTUP_S} s; see {log}")


def start(command: list[str], name: str, out: Path) -> tuple[subprocess.Popen, str, str]:
    port = free_port()
    log = out / f"{name}.log"
    command = [arg.replace("{port}", str(port)) for arg in command]
    proc = subprocess.Popen(command, cwd=ROOT, stdin=subprocess.DEVNULL, stdout=log.open("w"),
                            stderr=subprocess.STDOUT, env={**os.environ, "PYTHONPATH": str(ROOT)})
    url = f"http://127.0.0.1:{port}"
    return proc, url, wait_ready(url, proc, log)


def stop(proc: subprocess.Popen) -> None:
    proc.terminate()
    try:
        proc.wait(30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(30)


def one_request(client, model: str, max_tokens: int) -> dict:
    """One streamed completion: when it was sent, when each piece of text came."""
    sent = time.perf_counter()
    times = []
    stream = client.completions.create(model=model, prompt=PROMPT, max_tokens=max_tokens, temperature=0,
                                       stream=True)
    for chunk in stream:
        if chunk.choices and chunk.choices[0].text:
            times.append(time.perf_counter())
    tokens = len(times)  # both servers send one chunk a token (a piece held back joins the next one)
    decode = (tokens - 1) / (times[-1] - times[0]) if tokens > 1 and times[-1] > times[0] else 0.0
    return {"sent": sent, "ttft": times[0] - sent if times else None, "tokens": tokens, "decode_tok_s": decode,
            "end": times[-1] if times else time.perf_counter()}


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, round(q * len(ordered) + 0.5) - 1))]  # nearest rank


def measure(url: str, model: str, clients: int, requests: int, max_tokens: int) -> dict:
    import openai

    client = openai.OpenAI(base_url=f"{url}/v1", api_key="none", max_retries=0, timeout=REQUEST_S)
    start_time = time.perf_counter()
    with ThreadPoolExecutor(clients) as pool:
        runs = list(pool.map(lambda _: [one_request(client, model, max_tokens) for _ in range(requests)],
                             range(clients)))
    wall = time.perf_counter() - start_time
    done = [r for run in runs for r in run]
    ttfts = [r["ttft"] for r in done if r["ttft"] is not None]
    return {"clients": clients, "requests": len(done), "tokens": sum(r["tokens"] for r in done),
            "wall_s": round(wall, 3), "aggregate_tok_s": round(sum(r["tokens"] for r in done) / wall, 2),
            "decode_tok_s_median": round(statistics.median(r["decode_tok_s"] for r in done), 2),
            "ttft_p50_s": round(percentile(ttfts, 0.5), 3), "ttft_p99_s": round(percentile(ttfts, 0.99), 3)}


def bench_server(name: str, command: list[str], args, out: Path) -> list[dict]:
    print(f"{name}: starting", file=sys.stderr, flush=True)
    proc, url, model = start(command, name, out)
    try:
        measure(url, model, 1, 1, 16)  # warm-up
        rows = []
        for clients in args.clients:
            row = {"server": name, **measure(url, model, clients, args.requests, args.max_tokens)}
            print(json.dumps(row), file=sys.stderr, flush=True)
            rows.append(row)
        return rows
    finally:
        stop(proc)


def generate_decode(args, out: Path) -> float | None:
    """`torchat generate`'s decode tok/s on the same model and prompt (its stats line)."""
    command = [sys.executable, "-m", "torchat", "generate", *model_flags(args), "--prompt", PROMPT,
               "--max-new-tokens", str(args.max_tokens)]
    speeds = []
    for _ in range(args.generate_runs):
        result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=STARTUP_S,
                                env={**os.environ, "PYTHONPATH": str(ROOT)})
        (out / "generate.log").write_text(result.stdout + result.stderr)
        found = re.search(r"decode ([\d.]+) tok/s", result.stderr)
        if found:
            speeds.append(float(found.group(1)))
    return round(statistics.median(speeds), 2) if speeds else None


def bench_decode(args, out: Path) -> float | None:
    """`torchat bench`'s decode tok/s on the same model (warm-up runs excluded: the steady state)."""
    command = [sys.executable, "-m", "torchat", "bench", *model_flags(args), "--modes", "eager", "--new-tokens",
               str(args.max_tokens), "--prompt-tokens", "20", "--runs", str(args.generate_runs), "--warmup-runs", "1",
               "--allow-contended", "--output-dir", str(out / "bench")]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=STARTUP_S,
                            env={**os.environ, "PYTHONPATH": str(ROOT)})
    (out / "bench.log").write_text(result.stdout + result.stderr)
    try:
        rows = json.loads((out / "bench" / "bench.json").read_text())["results"]
    except (OSError, ValueError, KeyError):
        return None
    return rows[0]["decode_tok_s"]["median"] if rows else None


def model_flags(args) -> list[str]:
    flags = [*([args.model] if args.model else []), "--dtype", args.dtype]
    return flags + (["--quant", args.quant] if args.quant else [])


def llama_available(python: str) -> bool:
    return subprocess.run([python, "-c", "import llama_cpp.server"], capture_output=True).returncode == 0


def render(result: dict) -> str:
    machine = result["machine"]
    lines = [f"# torchat server bench — {machine['model_name']} ({machine['cores']} cores, "
             f"{'AVX-512' if machine['avx512'] else 'no AVX-512'})", "",
             f"Model: {result['model']}; {result['requests_per_client']} streamed completions a client, "
             f"{result['max_tokens']} tokens each, greedy. Others' CPU share during the run: "
             f"{result['others_cpu_share']:.0%}.", "",
             "| server | clients | requests | aggregate tok/s | decode tok/s a request (median) | TTFT p50 s | "
             "TTFT p99 s |", "|---|---|---|---|---|---|---|"]
    for row in result["rows"]:
        lines.append(f"| {row['server']} | {row['clients']} | {row['requests']} | {row['aggregate_tok_s']} | "
                     f"{row['decode_tok_s_median']} | {row['ttft_p50_s']} | {row['ttft_p99_s']} |")
    lines += ["", f"`torchat generate` decode: {result['generate_decode_tok_s']} tok/s (its stats line, first "
              f"steps included); `torchat bench` decode: {result['bench_decode_tok_s']} tok/s (after a warm-up run)."]
    for key, text in result["summary"].items():
        lines.append(f"- {key}: {text}")
    if result.get("peer_note"):
        lines.append(f"- {result['peer_note']}")
    return "\n".join(lines) + "\n"


def summarize(result: dict) -> dict:
    rows = {(r["server"], r["clients"]): r for r in result["rows"]}
    summary = {}
    one, eight = rows.get(("torchat", 1)), rows.get(("torchat", 8))
    if one and eight:
        summary["torchat 8 clients / 1 client aggregate"] = \
            f"{eight['aggregate_tok_s'] / one['aggregate_tok_s']:.2f}x (the issue asks >= 2.5x)"
    for name in ("generate", "bench"):
        if one and result[f"{name}_decode_tok_s"]:
            summary[f"torchat 1-client decode / torchat {name}"] = \
                f"{one['decode_tok_s_median'] / result[f'{name}_decode_tok_s']:.2f} (the issue asks within 10%)"
    for clients in result["clients"]:
        ours, peer = rows.get(("torchat", clients)), rows.get(("llama.cpp", clients))
        if ours and peer:
            summary[f"{clients} clients, torchat / llama.cpp aggregate"] = \
                f"{ours['aggregate_tok_s'] / peer['aggregate_tok_s']:.2f}x"
    return summary


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a MODEL as torchat takes it (default: SmolLM2-135M-Instruct)")
    parser.add_argument("--quant", default=ISSUE_QUANT, help=f"default {ISSUE_QUANT}; '' for none")
    parser.add_argument("--dtype", default="bf16")
    parser.add_argument("--gguf", type=Path, default=None, help="the peer's GGUF (default: SmolLM2's Q4_1)")
    parser.add_argument("--clients", type=lambda v: [int(c) for c in v.split(",")], default=[1, 4, 8, 16])
    parser.add_argument("--requests", type=int, default=2, help="streamed requests a client, one after another")
    parser.add_argument("--max-tokens", type=int, default=128)
    parser.add_argument("--max-batch", type=int, default=16)
    parser.add_argument("--generate-runs", type=int, default=3)
    parser.add_argument("--llama-python", default=sys.executable, help="a Python that has llama-cpp-python[server]")
    parser.add_argument("--no-peer", action="store_true")
    parser.add_argument("--output-dir", type=Path, default=ROOT / "benchmarks" / "results" / "server")
    args = parser.parse_args()
    out = args.output_dir
    out.mkdir(parents=True, exist_ok=True)

    from torchat.assets import fetch_asset

    gguf = args.gguf or fetch_asset("smollm2-135m-gguf")
    share = CpuShare()
    rows = bench_server("torchat", [sys.executable, "-m", "torchat", "server", *model_flags(args), "--host",
                                    "127.0.0.1", "--port", "{port}", "--max-batch", str(args.max_batch),
                                    "--max-new-tokens", str(args.max_tokens)], args, out)
    generate = generate_decode(args, out)
    steady = bench_decode(args, out)
    note = None
    if args.no_peer:
        note = "llama.cpp's server left out (--no-peer)"
    elif not llama_available(args.llama_python):
        note = f"llama.cpp's server left out: {args.llama_python} cannot import llama_cpp.server " \
               "(pip install 'llama-cpp-python[server]')"
    else:
        rows += bench_server("llama.cpp", [args.llama_python, "-m", "llama_cpp.server", "--model", str(gguf),
                                           "--model_alias", "smollm2", "--host", "127.0.0.1", "--port", "{port}",
                                           "--n_ctx", "2048", "--n_threads", str(os.cpu_count()),
                                           "--n_threads_batch", str(os.cpu_count()),
                                           # queue concurrent requests (its default cuts the running one off)
                                           "--interrupt_requests", "False"], args, out)
    version = subprocess.run([args.llama_python, "-c", "import llama_cpp; print(llama_cpp.__version__)"],
                             capture_output=True, text=True).stdout.strip() if note is None else None
    result = {"machine": lscpu(), "host": host_info(), "model": " ".join(model_flags(args)) + " (torchat); "
              f"{gguf.name} (llama.cpp {version})" if version else " ".join(model_flags(args)),
              "clients": args.clients, "requests_per_client": args.requests, "max_tokens": args.max_tokens,
              "max_batch": args.max_batch, "rows": rows, "generate_decode_tok_s": generate,
              "bench_decode_tok_s": steady,
              "others_cpu_share": share.others(), "peer_note": note,
              "date": time.strftime("%Y-%m-%d %H:%M")}
    result["summary"] = summarize(result)
    (out / "server_bench.json").write_text(json.dumps(result, indent=2) + "\n")
    (out / "server_bench.md").write_text(render(result))
    print(render(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
