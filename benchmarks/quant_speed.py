"""Decode speed of each quantization scheme on SmolLM2-135M, eager and torch.compile'd, on this machine.

A benchmark, not a test: nothing here asserts a time. Each row bakes the scheme once (`bake_quantized`), loads
it (`load_quantized`), prefills a 128-token English prompt and times greedy decode steps through
`torchat.generate.generate` (EagerModel: decode compiled as one static graph with --compile). The first
--warmup decode steps (compilation included) are not timed. With each run it records the share of the
machine's CPU time that other processes used (from /proc/stat): on a 2-core box a neighbour that takes one
core halves the numbers, so a run with a large share is marked contended.

    python benchmarks/quant_speed.py [--rows fp32,int4-g32] [--modes eager,compile] [--steps 64] [--threads 2]
"""

import argparse
import json
import os
import platform
import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONTENDED_MARGIN = 0.05  # others may use the cores this run leaves idle, plus this much, before it is contended


def contended(share: float, threads: int, cpus: int) -> bool:
    """With `threads` of `cpus` cores busy here, others' use of the rest does not slow this run."""
    return share > (cpus - threads) / cpus + CONTENDED_MARGIN


class CpuShare:
    """Others' share of the machine's CPU time since construction: (busy jiffies - ours) / all jiffies."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[int, int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ours = sum(int(v) for v in stat[11:15])  # utime, stime, cutime, cstime
        return sum(fields[:8]), sum(fields[:8]) - idle, ours

    def others(self) -> float:
        total, busy, ours = (b - a for a, b in zip(self.start, self._read()))
        return round(max(busy - ours, 0) / max(total, 1), 3)


ROWS = {
    "fp32": "",
    "bf16": '{"precision": {"dtype": "bf16"}}',
    "int8": '{"linear:int8": {"group_size": 0}}',
    "int8-g32": '{"linear:int8": {"group_size": 32}}',
    "int4-g32": '{"linear:int4": {"group_size": 32}}',
    "int4-g128": '{"linear:int4": {"group_size": 128}}',
    "hqq-g64": '{"linear:hqq": {"group_size": 64}}',
    "gptq-g64": '{"linear:gptq": {"group_size": 64, "calibration_limit": 2, "calibration_seq_length": 128}}',
    "8da4w-g32": '{"linear:8da4w": {"group_size": 32}}',
    "emb8": '{"embedding": {"bitwidth": 8, "group_size": 0}}',
    "8da4w-g32+emb4-g32": '{"linear:8da4w": {"group_size": 32}, "embedding": {"bitwidth": 4, "group_size": 32}}',
}


def decode_speed(model, prompt: list[int], steps: int, warmup: int, compile: bool) -> dict:
    from torchat.generate import EagerModel, GenerationStats, Sampling, generate

    text_model = EagerModel(model, len(prompt) + warmup + steps + 1, compile=compile)
    times = []
    stats = GenerationStats()
    start = time.perf_counter()
    for _ in generate(text_model, prompt, warmup + steps + 1, Sampling(), stats=stats):
        now = time.perf_counter()
        times.append(now - start)
        start = now
    decode = times[1 + warmup:]  # times[0] is prefill; then warmup decode steps (compilation)
    first_compile = sum(times[1:1 + warmup])
    return {"decode_tok_s": round(len(decode) / sum(decode), 2), "steps": len(decode),
            "warmup_s": round(first_compile, 1)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--modes", default="eager,compile")
    parser.add_argument("--steps", type=int, default=64)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/quant_speed")
    args = parser.parse_args()

    import torch

    from torchat.assets import fetch_asset
    from torchat.checkpoint import build_model, read_checkpoint
    from torchat.checkpoint.canonical import write_canonical
    from torchat.quant import bake_quantized, load_quantized, parse_quant
    from torchat.quant.calibration import split_english_text
    from torchat.tokenizers import load_tokenizer

    torch.set_num_threads(args.threads)
    rows, modes = args.rows.split(","), args.modes.split(",")
    gguf = fetch_asset("smollm2-135m-gguf")
    prompt = load_tokenizer(gguf).encode(split_english_text()[1])[:128]
    work = Path(tempfile.mkdtemp(prefix="quant-speed-"))
    results = []
    try:
        float_dir = work / "fp32"
        float_dir.mkdir()
        write_canonical(read_checkpoint(gguf), float_dir)
        shutil.copyfile(gguf, float_dir / "tokenizer.gguf")
        for row in rows:
            baked = None
            if ROWS[row]:
                baked = bake_quantized(float_dir, parse_quant(ROWS[row]), "fp32", work / row,
                                       float_dir / "tokenizer.gguf")
            for mode in modes:
                torch._dynamo.reset()
                model = load_quantized(baked) if baked else build_model(read_checkpoint(float_dir))
                share = CpuShare()
                try:
                    speed = decode_speed(model, prompt, args.steps, args.warmup, mode == "compile")
                except Exception as error:  # a failed row is recorded, not hidden
                    speed = {"error": f"{type(error).__name__}: {str(error).splitlines()[0][:200]}"}
                result = {"row": row, "mode": mode, "quant": ROWS[row], **speed, "others_cpu_share": share.others()}
                print(json.dumps(result), flush=True)
                results.append(result)
            if baked:
                shutil.rmtree(baked, ignore_errors=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    meta = {"threads": args.threads, "steps": args.steps, "warmup": args.warmup, "prompt_tokens": len(prompt),
            "host": platform.node(), "cpus": os.cpu_count(), "torch": torch.__version__,
            "load_average_end": os.getloadavg()}
    previous = args.output.with_suffix(".json")
    old = json.loads(previous.read_text())["rows"] if previous.is_file() else []
    merged = {(r["row"], r["mode"]): r for r in old} | {(r["row"], r["mode"]): r for r in results}
    ordered = [merged[k] for k in sorted(merged, key=lambda k: (list(ROWS).index(k[0]), k[1]))]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps({"meta": meta, "rows": ordered}, indent=2) + "\n")
    args.output.with_suffix(".md").write_text(render(meta, ordered))


def render(meta: dict, rows: list[dict]) -> str:
    lines = [
        "# Quantization decode speed: SmolLM2-135M-Instruct on this machine",
        "",
        f"`python benchmarks/quant_speed.py --threads {meta['threads']}`: greedy decode after a "
        f"{meta['prompt_tokens']}-token prompt, {meta['steps']} timed steps after {meta['warmup']} untimed "
        f"(compilation happens there), batch 1, fp32 model. {meta['cpus']} CPUs, torch {meta['torch']}. "
        f"'others' CPU' is the share of all CPU time that other processes used during the row; above "
        f"{((meta['cpus'] - meta['threads']) / meta['cpus'] + CONTENDED_MARGIN) * 100:.0f} % (more than the "
        f"cores this run leaves free) the row is contended and its speed understated. One thread: with two, "
        f"OpenMP barriers stall whenever a neighbour holds a core (int8 fell from 31 to 0.6 tok/s).",
        "",
        "| scheme | mode | decode tok/s | warm-up s | others' CPU | note |",
        "|---|---|---|---|---|---|",
    ]
    for r in rows:
        note = r.get("error", "") or ("contended" if contended(r["others_cpu_share"], meta["threads"], meta["cpus"])
                                      else "")
        lines.append(f"| {r['row']} | {r['mode']} | {r.get('decode_tok_s', '-')} | {r.get('warmup_s', '-')} | "
                     f"{r['others_cpu_share'] * 100:.0f} % | {note} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
