"""`torchat bench`: prefill and decode speed, time to first token, peak memory and size of a model, against peers.

    torchat bench [MODEL | --checkpoint-path P | --gguf-path G] [--quant JSON] [--dtype bf16] [--compile]
    torchat bench --aoti-package-path m.pt2 | --pte-path m.pte
    torchat bench --artifact-dir D --checkpoint-dir C --backend eager|aoti|et --output-dir OUT   (the build graph)
    ... --peers llama.cpp,transformers [--peer-gguf G]   the peers on a GGUF, in the same run
    ... --output-dir OUT                                  bench.json, bench.md, bench.png

Each measurement (a mode of our model, or a peer) runs in its own process, so its peak RSS is its own and no
compiled state leaks between them. A result taken while other processes used more than --max-others-cpu of
the CPU is contended: it is rerun (--retries) and, if it stays contended, the command fails unless
--allow-contended (then the result is kept, marked). Benchmarks are never assertions: nothing here checks
a speed.
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from torchat.bench import EIGHT_BIT_LINEARS
from torchat.errors import TorchatError
from torchat.loader import add_model_arguments
from torchat.threads import pte_child_environment, pte_pool_size, set_pte_pool_size

BACKEND_FILES = {"aoti": "model.pt2", "et": "model.pte"}
MODES = ("eager", "compile")


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    add_model_arguments(parser)
    parser.add_argument("--quant", help="quantize the eager model first (JSON, as `torchat quantize` takes it)")
    parser.add_argument("--compile", action="store_true", help="measure the torch.compile'd decode (mode compile)")
    parser.add_argument("--compile-prefill", action="store_true", help="with compile, also compile the prefill")
    parser.add_argument("--modes", help="eager models: comma-separated of eager, compile (default: eager, or "
                                        "compile with --compile; both for --backend eager)")
    graph = parser.add_argument_group("build-graph form (doit bench:TARGET)")
    graph.add_argument("--artifact-dir", type=Path, help="the target's model artifact directory")
    graph.add_argument("--backend", choices=["eager", *BACKEND_FILES], help="what --artifact-dir holds")
    run = parser.add_argument_group("measurement")
    run.add_argument("--prompt-tokens", type=int, default=128)
    run.add_argument("--new-tokens", type=int, default=128)
    run.add_argument("--runs", type=int, default=3, help="timed runs (median, min, max)")
    run.add_argument("--warmup-runs", type=int, default=1, help="untimed runs first (compilation happens there)")
    run.add_argument("--threads", type=int, default=None, help="torch/llama.cpp threads (default: torch's)")
    run.add_argument("--bandwidth-gb-s", type=float, default=None,
                     help="memory read bandwidth for the roofline (default: measured here)")
    run.add_argument("--max-others-cpu", type=float, default=0.10,
                     help="other processes' CPU share above which a run is contended (default 0.10)")
    run.add_argument("--retries", type=int, default=1, help="reruns of a contended measurement")
    run.add_argument("--wait-quiet", type=float, default=0.0, help="seconds to wait for a quiet CPU before each")
    run.add_argument("--allow-contended", action="store_true",
                     default=bool(os.environ.get("TORCHAT_BENCH_ALLOW_CONTENDED")),
                     help="keep contended results (marked) instead of failing ($TORCHAT_BENCH_ALLOW_CONTENDED)")
    peers = parser.add_argument_group("peers (optional: pip install 'torchat[bench]')")
    peers.add_argument("--peers", default="", help="comma-separated: llama.cpp, transformers")
    peers.add_argument("--peer-gguf", type=Path, action="append", default=[],
                       help="the GGUF the peers run (repeatable; default: the model's GGUF)")
    parser.add_argument("--output-dir", type=Path, help="write bench.json, bench.md and bench.png here")
    parser.add_argument("--title", default="torchat bench")


# --- what to measure -------------------------------------------------------------------------------------------

def _model_flags(args: argparse.Namespace) -> dict:
    return {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()
            if k in ("model", "allow_unpinned", "checkpoint_path", "checkpoint_dir", "gguf_path", "format",
                     "params_table", "params_path", "tokenizer_path", "tokenizer_kind", "dtype", "device")}


def default_flags() -> dict:
    """The model flags at their defaults (what a job built outside the CLI passes)."""
    parser = argparse.ArgumentParser()
    add_arguments(parser, "bench")
    return _model_flags(parser.parse_args([]))


def plan_jobs(args: argparse.Namespace) -> list[dict]:
    """One job per measurement: {"kind": torchat|peer, ...} (JSON, handed to a child process)."""
    from torchat.loader import artifact_path, checkpoint_path

    config = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
              "warmup_runs": args.warmup_runs, "max_others_cpu": args.max_others_cpu}
    common = {"config": config, "threads": args.threads}
    jobs, peer_ggufs = [], [str(p) for p in args.peer_gguf]
    if args.artifact_dir is not None:
        if args.backend is None:
            raise TorchatError("--artifact-dir needs --backend (eager, aoti or et)")
        if args.backend == "eager":
            modes = (args.modes or ",".join(MODES)).split(",")
            jobs += [{**common, "kind": "torchat", "mode": m, "checkpoint": str(args.artifact_dir),
                      "flags": _model_flags(args) | {"checkpoint_dir": None}, "quant": None,
                      "compile_prefill": args.compile_prefill} for m in modes]
        else:
            jobs.append({**common, "kind": "torchat", "mode": args.backend,
                         "artifact": str(args.artifact_dir / BACKEND_FILES[args.backend]),
                         "flags": _model_flags(args)})
        if args.checkpoint_dir is not None and not peer_ggufs:
            peer_ggufs = [str(p) for p in sorted(Path(args.checkpoint_dir).glob("*.gguf")) if p.stat().st_size > 2**20]
    elif (path := artifact_path(args)) is not None:
        jobs.append({**common, "kind": "torchat", "mode": {".pte": "et"}.get(path.suffix, "aoti"),
                     "artifact": str(path), "flags": _model_flags(args)})
    else:
        path = checkpoint_path(args)
        modes = (args.modes or ("compile" if args.compile else "eager")).split(",")
        jobs += [{**common, "kind": "torchat", "mode": m, "checkpoint": str(path), "flags": _model_flags(args),
                  "quant": args.quant, "compile_prefill": args.compile_prefill} for m in modes]
        if not peer_ggufs and path.is_file() and path.suffix == ".gguf":
            peer_ggufs = [str(path)]
    for mode in {j["mode"] for j in jobs} - {"eager", "compile", "aoti", "et"}:
        raise TorchatError(f"unknown mode {mode!r}; choose from eager, compile (aoti/et come from an artifact)")
    for peer in filter(None, args.peers.split(",")):
        if not peer_ggufs:
            raise TorchatError(f"the {peer} peer needs a GGUF: pass --peer-gguf")
        jobs += [{**common, "kind": "peer", "peer": peer, "gguf": g} for g in peer_ggufs]
    return jobs


# --- one measurement (in a child process) ------------------------------------------------------------------

def _load_torchat(job: dict):
    """(TextModel, tokenizer, labels, weight bytes per token, artifact bytes) for a torchat job."""
    import torch

    from torchat.bench import path_bytes, weight_bytes_per_token
    from torchat.generate import EagerModel
    from torchat.tokenizers import load_tokenizer

    flags = argparse.Namespace(**(job["flags"] | {"aoti_package_path": None, "dso_path": None, "pte_path": None,
                                                  "max_seq_length": None}))
    cache_len = job["config"]["prompt_tokens"] + job["config"]["new_tokens"] + 1
    if "artifact" in job:
        from torchat.loader import load_artifact

        path = Path(job["artifact"])
        model, tokenizer = load_artifact(flags, path)
        meta = model.metadata
        labels = {"dtype": meta.dtype, "quant_specs": meta.quant, "max_seq_len": meta.max_seq_len}
        if path.suffix == ".pte":  # its work runs on ExecuTorch's pool, not torch's threads
            labels["threads"] = pte_pool_size()
        bytes_ = weight_bytes_per_token(meta.model_args, meta.quant, meta.dtype)
        return model, tokenizer, labels, bytes_, path_bytes(path)
    path = Path(job["checkpoint"])
    from torchat.quant import is_quantized_dir

    if is_quantized_dir(path):
        from torchat.quant import load_quantized
        from torchat.quant.checkpoint import read_manifest

        manifest = read_manifest(path)
        model = load_quantized(path, flags.device)
        specs, dtype = manifest["specs"], manifest["dtype"]
        tokenizer_file = flags.tokenizer_path or next(iter(sorted(path.glob("tokenizer*"))), None)
        if tokenizer_file is None:
            raise TorchatError(f"{path}: no tokenizer* file in the quantized checkpoint; pass --tokenizer-path")
        tokenizer = load_tokenizer(tokenizer_file, flags.tokenizer_kind)
        size = path_bytes(path / "model.safetensors")
    else:
        from torchat.loader import load_eager

        flags.checkpoint_path, flags.checkpoint_dir, flags.gguf_path, flags.model = path, None, None, None
        model, tokenizer, _ = load_eager(flags)
        specs, dtype = [], str(flags.dtype)
        if job.get("quant"):
            from torchat.quant import parse_quant, quantize_model

            parsed = parse_quant(job["quant"])
            with torch.no_grad():
                report = quantize_model(model, parsed)
            specs, dtype = [s.to_dict() for s in parsed], report.dtype
        size = path_bytes(path)
    text_model = EagerModel(model, min(cache_len, model.args.max_seq_len), compile=job["mode"] == "compile",
                            compile_prefill=job["mode"] == "compile" and job.get("compile_prefill", False))
    labels = {"dtype": dtype, "quant_specs": specs}
    return text_model, tokenizer, labels, weight_bytes_per_token(model.args.to_dict(), specs, dtype), size


def precision_class(specs: list[dict], dtype: str) -> str:
    linear = next((s for s in specs if s["scheme"].startswith("linear:")), None)
    if linear is None:
        return next((s["options"]["dtype"] for s in specs if s["scheme"] == "precision"), dtype)
    return "int8" if linear["scheme"] in EIGHT_BIT_LINEARS else "int4"


def quant_label(specs: list[dict], dtype: str) -> str:
    parts = [f"{s['scheme'].split(':')[-1]}" + (f" g{s['options']['group_size']}" if s["options"].get(
        "group_size") else "") for s in specs if s["scheme"] != "precision"]
    return " + ".join(parts + [dtype]) if parts else dtype


def _runs_pte(job: dict) -> bool:
    return job.get("artifact", "").endswith(".pte")


def run_job(job: dict) -> dict:
    import torch

    from torchat.bench import BenchConfig, bench_prompt, bench_text_model

    if job.get("threads") and _runs_pte(job):  # ExecuTorch's own pool does the work; torch stays on one (threads.py)
        set_pte_pool_size(job["threads"])
    elif job.get("threads"):
        torch.set_num_threads(job["threads"])
    config = BenchConfig(**job["config"])
    start = time.perf_counter()
    if job["kind"] == "peer":
        from torchat.peers import load_peer
        from torchat.tokenizers import load_tokenizer

        model = load_peer(job["peer"], Path(job["gguf"]), torch.get_num_threads(),
                          config.prompt_tokens + config.new_tokens + 1)
        tokenizer = load_tokenizer(Path(job["gguf"]))
        labels, weight_bytes, size = model.labels, model.weight_bytes, model.artifact_bytes
    else:
        model, tokenizer, extra, weight_bytes, size = _load_torchat(job)
        labels = {"system": "torchat", "mode": job["mode"], "model": Path(job.get("artifact") or job["checkpoint"]).name,
                  "quant": quant_label(extra["quant_specs"], extra["dtype"]),
                  "precision": precision_class(extra["quant_specs"], extra["dtype"]), **extra}
    load_s = time.perf_counter() - start
    prompt = bench_prompt(tokenizer, config.prompt_tokens)
    return bench_text_model(model, prompt, config, labels, weight_bytes=weight_bytes,
                            bandwidth_gb_s=job.get("bandwidth_gb_s"), artifact_bytes=size, load_s=load_s)


def _run_child(job: dict, scratch: Path, index: int) -> dict:
    job_file, out_file = scratch / f"job{index}.json", scratch / f"result{index}.json"
    job_file.write_text(json.dumps(job))
    env = pte_child_environment() if _runs_pte(job) else None
    proc = subprocess.run([sys.executable, "-m", "torchat.bench_cli", str(job_file), str(out_file)], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not out_file.is_file():
        tail = [line for line in proc.stdout.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {"system": job.get("peer", "torchat") if job["kind"] == "peer" else "torchat",
                "mode": job.get("mode", job.get("peer")), "quant": job.get("quant") or "", "error": tail[0][:300]}
    return json.loads(out_file.read_text())


# --- the verb ---------------------------------------------------------------------------------------------------

def run_jobs(jobs: list[dict], bandwidth_gb_s: float, *, retries: int = 1, wait_quiet: float = 0.0,
             max_others_cpu: float = 0.10) -> list[dict]:
    """Each job in its own process, in order; a contended one is rerun up to `retries` times."""
    from torchat.bench import wait_for_quiet

    results = []
    with tempfile.TemporaryDirectory(prefix="torchat-bench-") as scratch:
        for index, job in enumerate(jobs):
            job = {**job, "bandwidth_gb_s": bandwidth_gb_s}
            for _ in range(retries + 1):
                if wait_quiet:
                    wait_for_quiet(max_others_cpu, wait_quiet)
                result = _run_child(job, Path(scratch), index)
                if not result.get("contended"):
                    break
            results.append(result)
            print(_one_line(result), file=sys.stderr, flush=True)
    return results


def write_report(results: list[dict], bandwidth_gb_s: float, output_dir: Path | None, title: str) -> dict:
    """bench.json, bench.md and bench.png in output_dir (the markdown to stdout without one); the report."""
    from torchat.bench import plot_results, ratios, render_markdown, write_json

    report = {"schema": 1, "bandwidth_gb_s": bandwidth_gb_s, "results": results, "ratios": ratios(results)}
    if output_dir is None:
        print(render_markdown(results, title))
        return report
    output_dir.mkdir(parents=True, exist_ok=True)
    write_json(output_dir / "bench.json", report)
    (output_dir / "bench.md").write_text(render_markdown(results, title))
    plot_results(results, output_dir / "bench.png", title)
    return report


def check_results(results: list[dict], allow_contended: bool) -> None:
    """Fail on a failed measurement, and on a contended one unless allowed."""
    failed = [r for r in results if "error" in r]
    if failed:
        raise TorchatError(f"{len(failed)} measurement(s) failed: " + "; ".join(r["error"] for r in failed))
    contended = [r for r in results if r.get("contended")]
    if contended and not allow_contended:
        raise TorchatError(f"{len(contended)} measurement(s) contended (other processes used up to "
                           f"{max(r['others_cpu']['max'] for r in contended) * 100:.0f} % of the CPU); rerun on a "
                           "quiet machine, or pass --allow-contended to keep them marked")


def run(args: argparse.Namespace) -> int:
    from torchat.bench import measure_bandwidth, others_cpu_now

    jobs = plan_jobs(args)
    bandwidth = args.bandwidth_gb_s or measure_bandwidth(args.threads)
    print(f"torchat bench: {len(jobs)} measurement(s); read bandwidth {bandwidth} GB/s; others' CPU now "
          f"{others_cpu_now(1.0) * 100:.0f} %", file=sys.stderr)
    results = run_jobs(jobs, bandwidth, retries=args.retries, wait_quiet=args.wait_quiet,
                       max_others_cpu=args.max_others_cpu)
    write_report(results, bandwidth, args.output_dir, args.title)
    check_results(results, args.allow_contended)
    return 0


def _one_line(result: dict) -> str:
    from torchat.bench import label_of

    if "error" in result:
        return f"  {label_of(result)}: failed: {result['error']}"
    return (f"  {label_of(result)}: prefill {result['prefill_tok_s']['median']:.1f} tok/s, decode "
            f"{result['decode_tok_s']['median']:.2f} tok/s, ttft {result['ttft_s']['median'] * 1000:.0f} ms, "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB, others' CPU {result['others_cpu']['max'] * 100:.0f} %"
            + (" (contended)" if result["contended"] else ""))


if __name__ == "__main__":  # a child: python -m torchat.bench_cli JOB.json RESULT.json
    from torchat.bench import write_json

    try:
        write_json(Path(sys.argv[2]), run_job(json.loads(Path(sys.argv[1]).read_text())))
    except TorchatError as error:
        print(f"torchat bench: error: {error}", file=sys.stderr)
        sys.exit(1)
