"""Benchmark measurements as jobs, each run in its own process (`python -m torchat.bench_jobs JOB RESULT`), so
its peak RSS is its own and no compiled state leaks between them. Used by `torchat bench` and
benchmarks/run_all.py.

    {"kind": "torchat", "mode": eager|compile|aoti|et, "source": ModelSource.to_dict(), "config": {...}, "threads"}
    {"kind": "peer", "peer": "llama.cpp", "gguf": PATH, "config": {...}, "threads"}

A torchat job's model opens through torchat.model_source like every verb's.
"""

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

from torchat.bench import EIGHT_BIT_LINEARS
from torchat.errors import TorchatError
from torchat.model_source import ModelSource
from torchat.threads import pte_child_environment, pte_pool_size, set_pte_pool_size

# eager modes (an artifact's mode is its backend: aoti or et)
MODES = ("eager", "compile")


def torchat_job(source: ModelSource, mode: str, config: dict, threads: int | None) -> dict:
    return {"kind": "torchat", "mode": mode, "source": source.to_dict(), "config": config, "threads": threads}


def _open(job: dict):
    """(TextModel, tokenizer, labels, weight bytes per token, artifact bytes) for a torchat job."""
    from torchat.bench import path_bytes, weight_bytes_per_token
    from torchat.model_source import open_model

    source = ModelSource.from_dict(job["source"])
    if job["mode"] in MODES:
        cache_len = job["config"]["prompt_tokens"] + job["config"]["new_tokens"] + 1
        compiled = job["mode"] == "compile"
        source = replace(source, max_seq_len=cache_len, compile=compiled,
                         compile_prefill=compiled and source.compile_prefill)
    opened = open_model(source)
    about = opened.description
    path = Path(about["path"])
    labels = {"dtype": about["dtype"], "quant_specs": about["quant"]}
    if about["kind"] == "artifact":
        labels["max_seq_len"] = about["max_seq_len"]
        if path.suffix == ".pte":  # its work runs on ExecuTorch's pool, not torch's threads
            labels["threads"] = pte_pool_size()
    size = path_bytes(path / "model.safetensors" if about["kind"] == "baked" else path)
    bytes_ = weight_bytes_per_token(about["model_args"], about["quant"], about["dtype"])
    return opened.text_model, opened.tokenizer, labels, bytes_, size


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
    source = job.get("source") or {}
    return job.get("mode") == "et" or str(source.get("checkpoint") or source.get("model") or "").endswith(".pte")


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
        model, tokenizer, extra, weight_bytes, size = _open(job)
        name = Path(job["source"].get("checkpoint") or job["source"].get("model") or "default").name
        labels = {"system": "torchat", "mode": job["mode"], "model": name,
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
    proc = subprocess.run([sys.executable, "-m", "torchat.bench_jobs", str(job_file), str(out_file)], env=env,
                          stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if proc.returncode != 0 or not out_file.is_file():
        tail = [line for line in proc.stdout.strip().splitlines() if line.strip()][-1:] or ["no output"]
        return {"system": job.get("peer", "torchat") if job["kind"] == "peer" else "torchat",
                "mode": job.get("mode", job.get("peer")), "quant": job.get("quant") or "", "error": tail[0][:300]}
    return json.loads(out_file.read_text())


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


def _one_line(result: dict) -> str:
    from torchat.bench import label_of

    if "error" in result:
        return f"  {label_of(result)}: failed: {result['error']}"
    return (f"  {label_of(result)}: prefill {result['prefill_tok_s']['median']:.1f} tok/s, decode "
            f"{result['decode_tok_s']['median']:.2f} tok/s, ttft {result['ttft_s']['median'] * 1000:.0f} ms, "
            f"peak RSS {result['peak_rss_mib']:.0f} MiB, others' CPU {result['others_cpu']['max'] * 100:.0f} %"
            + (" (contended)" if result["contended"] else ""))


if __name__ == "__main__":  # a child: python -m torchat.bench_jobs JOB.json RESULT.json
    from torchat.bench import write_json

    try:
        write_json(Path(sys.argv[2]), run_job(json.loads(Path(sys.argv[1]).read_text())))
    except TorchatError as error:
        print(f"torchat bench: error: {error}", file=sys.stderr)
        sys.exit(1)
