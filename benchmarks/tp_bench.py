"""Tensor parallelism on this machine: a Llama-3.2-1B-shaped model (random weights) split over 2 ranks against one
process: each process's peak resident memory, and decode tok/s (one thread a rank against one process of two).

    python benchmarks/tp_bench.py [--tokens 32] [--repeats 2]

The checkpoint (torchat's canonical form, fp32, Llama-3.2-1B's shape and tied embeddings; Llama-3's tiktoken file
as its tokenizer) is written once under $TORCHAT_CACHE/bench/llama-3.2-1b-random. Each rank is started with
torchrun's environment as `torchat generate --tp 2` starts it (torchat.parallel.launch), so that its own peak RSS is
read from wait4(). Writes benchmarks/results/tp/tp.json and tp.md, naming the CPU from lscpu and the share of the
CPU that other processes took meanwhile (this machine is shared).
"""

import argparse
import json
import os
import re
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

from llama_1b import LLAMA_32_1B, write_checkpoint  # noqa: E402
from torchat.bench import CpuShare, host_info  # noqa: E402
from torchat.parallel.launch import free_port, rank_environment  # noqa: E402

PROMPT = "Once upon a time, in a small village at the edge of a great forest, there lived"
OUT = ROOT / "benchmarks" / "results" / "tp"


def lscpu() -> dict:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = re.search(r"Model name:\s*(.+)", text)
    return {"model_name": model.group(1).strip() if model else host_info()["cpu"], "cores": os.cpu_count(),
            "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1)}


def run_generate(checkpoint: Path, tp: int, threads: int, tokens: int) -> dict:
    """One `torchat generate` over `tp` ranks -> each rank's peak RSS (MiB), rank 0's decode tok/s, and the others'
    CPU share meanwhile."""
    argv = [sys.executable, "-m", "torchat", "generate", str(checkpoint), "--prompt", PROMPT, "--max-new-tokens",
            str(tokens), "--max-seq-length", "256"] + (["--tp", str(tp)] if tp > 1 else [])
    port, share, start = free_port(), CpuShare(), time.monotonic()
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    ranks = []
    for rank in range(tp):
        rank_env = rank_environment(rank, tp, port, None) if tp > 1 else dict(env)
        rank_env["OMP_NUM_THREADS"] = str(threads)
        ranks.append(subprocess.Popen(argv, env=rank_env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                      text=True))
    peaks, stderr = [], ""
    for rank, proc in enumerate(ranks):
        text = proc.stderr.read()
        _, status, usage = os.wait4(proc.pid, 0)
        proc.returncode = os.waitstatus_to_exitcode(status)
        if proc.returncode != 0:
            raise SystemExit(f"rank {rank} of `{' '.join(argv[2:])}` failed ({proc.returncode}):\n{text[-2000:]}")
        peaks.append(round(usage.ru_maxrss / 1024))
        stderr = stderr or text
    stats = re.search(r"generated (\d+) tok .* decode ([\d.]+) tok/s", stderr)
    return {"tp": tp, "threads_per_rank": threads, "peak_rss_mib": peaks, "new_tokens": int(stats.group(1)),
            "decode_tok_s": float(stats.group(2)), "wall_s": round(time.monotonic() - start, 1),
            "others_cpu_share": share.others()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=2)
    parser.add_argument("--checkpoint", type=Path, default=None,
                        help="default: $TORCHAT_CACHE/bench/llama-3.2-1b-random")
    parser.add_argument("--write-only", action="store_true", help=argparse.SUPPRESS)
    args = parser.parse_args()
    from torchat.sources import cache_dir

    checkpoint = args.checkpoint or cache_dir() / "bench" / "llama-3.2-1b-random"
    if args.write_only:
        write_checkpoint(checkpoint)
        return 0
    if not (checkpoint / "model.safetensors").is_file():
        # in a child: a child's peak RSS starts from its parent's at the fork, and writing holds the whole model
        subprocess.run([sys.executable, __file__, "--write-only", "--checkpoint", str(checkpoint)], check=True)
    rows = []
    for _ in range(args.repeats):
        rows.append(run_generate(checkpoint, 1, 2, args.tokens))
        rows.append(run_generate(checkpoint, 2, 1, args.tokens))
        print(json.dumps(rows[-2:]), file=sys.stderr)
    single = [r for r in rows if r["tp"] == 1]
    split = [r for r in rows if r["tp"] == 2]
    summary = {"single_peak_rss_mib": max(r["peak_rss_mib"][0] for r in single),
               "tp2_peak_rss_mib_per_rank": max(max(r["peak_rss_mib"]) for r in split),
               "single_decode_tok_s_best": max(r["decode_tok_s"] for r in single),
               "tp2_decode_tok_s_best": max(r["decode_tok_s"] for r in split)}
    summary["rank_peak_over_single"] = round(summary["tp2_peak_rss_mib_per_rank"] / summary["single_peak_rss_mib"], 3)
    result = {"machine": lscpu(), "host": host_info(), "model": {"shape": "Llama-3.2-1B", **LLAMA_32_1B},
              "dtype": "fp32", "prompt": PROMPT, "runs": rows, "summary": summary}
    OUT.mkdir(parents=True, exist_ok=True)
    (OUT / "tp.json").write_text(json.dumps(result, indent=2) + "\n")
    (OUT / "tp.md").write_text(render(result))
    print(render(result))
    return 0


def render(result: dict) -> str:
    m, s = result["machine"], result["summary"]
    lines = [f"# Tensor parallel, Llama-3.2-1B shape (random weights, fp32), {m['model_name']}, {m['cores']} cores, "
             f"{m['memory_gib']} GiB", "",
             "| run | threads/rank | peak RSS per process (MiB) | decode tok/s | others' CPU share |",
             "|---|---|---|---|---|"]
    for r in result["runs"]:
        name = "one process" if r["tp"] == 1 else f"--tp {r['tp']}"
        lines.append(f"| {name} | {r['threads_per_rank']} | {', '.join(map(str, r['peak_rss_mib']))} | "
                     f"{r['decode_tok_s']:.2f} | {r['others_cpu_share']:.2f} |")
    lines += ["", f"Each rank's peak RSS is {s['rank_peak_over_single']:.0%} of the single process's "
                  f"({s['tp2_peak_rss_mib_per_rank']} vs {s['single_peak_rss_mib']} MiB); best decode "
                  f"{s['tp2_decode_tok_s_best']:.2f} tok/s with --tp 2 against "
                  f"{s['single_decode_tok_s_best']:.2f}.", ""]
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
