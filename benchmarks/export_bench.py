"""Export benchmark on SmolLM2-135M: export time, artifact size, prefill and decode tok/s per backend x scheme.

    python benchmarks/export_bench.py [--rows eager-fp32,aoti-fp32,...] [--runs 3]

Artifacts come from the same hash-keyed cache as the slow end-to-end test ($TORCHAT_CACHE/exported/), so a row
already built costs nothing but its measurement; export time is what the build took when it was made. Each row is
measured in its own process: once a .pte has run in a process, ExecuTorch's attention has started OpenMP teams from
its own threads and an AOTI artifact run after it decodes 4-5x slower (int4 .pt2: 150 -> 30 tok/s), which is what
the first version of this table measured. The .pte rows run with OMP_NUM_THREADS=1, as `torchat` runs a .pte
(torchat/threads.py). Each measurement records the other processes' share of the CPU from /proc/stat: on this
2-core box a neighbour taking a core halves the figures, so a row whose `others` share is high is not a clean
number.
Writes benchmarks/results/export.json and export.md.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tests"))
from bench_exports import cached_export  # noqa: E402

from torchat.assets import fetch_asset  # noqa: E402
from torchat.checkpoint import build_model, read_checkpoint  # noqa: E402
from torchat.exported import load_exported  # noqa: E402
from torchat.generate import EagerModel  # noqa: E402
from torchat.dtypes import TORCH_DTYPES  # noqa: E402
from torchat.quant import parse_quant, quantize_model  # noqa: E402
from torchat.threads import pte_child_environment, pte_pool_size  # noqa: E402

MAX_SEQ_LEN = 128
PROMPT_LEN, DECODE_STEPS = 64, 63
SCHEMES = {
    "none": None,
    "8da4w": {"linear:8da4w": {"group_size": 32}},
    "8da4w-emb4": {"linear:8da4w": {"group_size": 32}, "embedding": {"bitwidth": 4, "group_size": 32}},
    "int4": {"linear:int4": {"group_size": 32}},
    "8da8w": {"linear:8da8w": {}},
    "int8": {"linear:int8": {"bitwidth": 8, "groupsize": 0}},
}
# backend-scheme-dtype
ROWS = ["eager-none-fp32", "aoti-none-fp32", "et-none-fp32", "aoti-none-bf16", "et-8da4w-fp32",
        "et-8da4w-emb4-fp32", "aoti-8da4w-fp32", "aoti-int4-bf16", "et-8da8w-fp32", "aoti-int8-bf16"]
SUFFIX = {"aoti": ".pt2", "et": ".pte"}


def cpu_jiffies() -> tuple[int, int]:
    """(busy, total) jiffies of the whole machine."""
    fields = [int(v) for v in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + fields[4]
    return sum(fields) - idle, sum(fields)


class Contention:
    """The share of the machine's CPU time that other processes used while the block ran."""

    def __enter__(self):
        self.busy, self.total = cpu_jiffies()
        self.own = sum(os.times()[:2])
        return self

    def __exit__(self, *exc):
        busy, total = cpu_jiffies()
        ticks = os.sysconf("SC_CLK_TCK")
        own = (sum(os.times()[:2]) - self.own) * ticks
        self.others = max(0.0, (busy - self.busy - own) / max(total - self.total, 1))


def parse_row(row: str) -> tuple[str, str, str]:
    backend, rest = row.split("-", 1)
    scheme, dtype = rest.rsplit("-", 1)
    return backend, scheme, dtype


def eager_model(gguf: Path, scheme: str, dtype: str) -> EagerModel:
    model = build_model(read_checkpoint(gguf), TORCH_DTYPES[dtype])
    if SCHEMES[scheme]:
        with torch.no_grad():
            quantize_model(model, parse_quant(json.dumps(SCHEMES[scheme])))
    return EagerModel(model, MAX_SEQ_LEN)


def build(gguf: Path, backend: str, scheme: str, dtype: str) -> tuple[Path, dict]:
    flags = ["--max-seq-length", str(MAX_SEQ_LEN)]
    if dtype != "fp32":
        flags += ["--dtype", dtype]
    if SCHEMES[scheme]:
        flags += ["--quant", json.dumps(SCHEMES[scheme])]
    path, _ = cached_export(gguf, SUFFIX[backend], flags)
    record = path.parent / "export.json"  # the whole `torchat export` (load, quantize, lower, check)
    return path, json.loads(record.read_text()) if record.is_file() else {"export_s": None}


@torch.inference_mode()
def measure(model, runs: int) -> dict:
    generator = torch.Generator().manual_seed(0)
    prompt = torch.randint(0, 49152, (1, PROMPT_LEN), generator=generator)
    model.forward(prompt, torch.arange(PROMPT_LEN))  # warm-up: first calls allocate and load
    model.forward(prompt[:, :1], torch.tensor([PROMPT_LEN]))
    prefill, decode, others = [], [], []
    for _ in range(runs):
        with Contention() as contention:
            start = time.perf_counter()
            logits = model.forward(prompt, torch.arange(PROMPT_LEN))
            token = int(logits[0, -1].argmax())
            prefilled = time.perf_counter()
            for pos in range(PROMPT_LEN, PROMPT_LEN + DECODE_STEPS):
                token = int(model.forward(torch.tensor([[token]]), torch.tensor([pos]))[0, -1].argmax())
            done = time.perf_counter()
        prefill.append(PROMPT_LEN / (prefilled - start))
        decode.append(DECODE_STEPS / (done - prefilled))
        others.append(contention.others)
    return {"prefill_tok_s": statistics.median(prefill), "decode_tok_s": statistics.median(decode),
            "prefill_all": prefill, "decode_all": decode, "others_cpu_share": max(others)}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS))
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=REPO / "benchmarks" / "results" / "export")
    args = parser.parse_args()
    rows = args.rows.split(",")
    if len(rows) > 1:  # each row in a fresh process (see above); each one merges its result into the JSON
        for row in rows:
            env = pte_child_environment() if parse_row(row)[0] == "et" else None
            subprocess.run([sys.executable, __file__, "--rows", row, "--runs", str(args.runs), "--output",
                            str(args.output)], check=True, env=env)
        return 0
    gguf = fetch_asset("smollm2-135m-gguf")
    results = json.loads(args.output.with_suffix(".json").read_text()) if args.output.with_suffix(
        ".json").is_file() else {}
    for row in rows:
        backend, scheme, dtype = parse_row(row)
        print(f"== {row}", file=sys.stderr, flush=True)
        if backend == "eager":
            model, info = eager_model(gguf, scheme, dtype), {"export_s": None, "size_mib": None}
        else:
            path, info = build(gguf, backend, scheme, dtype)
            model = load_exported(path)
            info["size_mib"] = path.stat().st_size / 2**20
        threads = pte_pool_size() if backend == "et" else torch.get_num_threads()  # a .pte runs on ExecuTorch's pool
        results[row] = {**info, **measure(model, args.runs), "threads": threads}
        print(json.dumps(results[row]), file=sys.stderr, flush=True)
        args.output.parent.mkdir(parents=True, exist_ok=True)
        args.output.with_suffix(".json").write_text(json.dumps(results, indent=2))
        args.output.with_suffix(".md").write_text(markdown(results))
    return 0


def markdown(results: dict) -> str:
    lines = [f"SmolLM2-135M-Instruct, prompt {PROMPT_LEN} tokens, {DECODE_STEPS} greedy decode steps, KV cache "
             f"{MAX_SEQ_LEN}; median of the runs; `others` is the largest share of the CPU other processes took "
             "during a run (2 cores).", "",
             "| backend | scheme | dtype | export s | size MiB | prefill tok/s | decode tok/s | others |",
             "|---|---|---|---|---|---|---|---|"]
    for row, r in results.items():
        backend, scheme, dtype = parse_row(row)
        export = f"{r['export_s']:.0f}" if r.get("export_s") else "–"
        size = f"{r['size_mib']:.0f}" if r.get("size_mib") else "–"
        lines.append(f"| {backend} | {scheme} | {dtype} | {export} | {size} | {r['prefill_tok_s']:.0f} | "
                     f"{r['decode_tok_s']:.1f} | {r['others_cpu_share']:.0%} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    raise SystemExit(main())
