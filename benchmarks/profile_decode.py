"""Where a decode step's time goes: torch.profiler over decode steps of a torchat model (eager or compiled).

    python benchmarks/profile_decode.py QUANTIZED_DIR [--compile] [--threads 1] [--cache-len 257] [--steps 32]

Prefills a 128-token prompt, warms up, then profiles `--steps` decode steps and prints the operators by
self CPU time, plus the time per step outside any operator (Python and dispatch overhead). Shares are what
matter here; absolute times need a quiet machine.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", type=Path, help="a quantized checkpoint directory (torchat quantize)")
    parser.add_argument("--compile", action="store_true")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--cache-len", type=int, default=257)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rows", type=int, default=25)
    args = parser.parse_args()

    import torch

    from torchat.bench import CpuShare, bench_prompt
    from torchat.generate import EagerModel, decode_one_token, prefill
    from torchat.quant import load_quantized
    from torchat.tokenizers import load_tokenizer

    torch.set_num_threads(args.threads)
    model = load_quantized(args.checkpoint)
    tokenizer = load_tokenizer(sorted(args.checkpoint.glob("tokenizer*"))[0])
    text_model = EagerModel(model, args.cache_len, compile=args.compile)
    prompt = bench_prompt(tokenizer, 128)
    token = int(prefill(text_model, prompt, 0).argmax())
    pos = len(prompt)
    for _ in range(4):  # warm-up (compilation)
        token, pos = int(decode_one_token(text_model, token, pos).argmax()), pos + 1
    share = CpuShare()
    start = time.perf_counter()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(args.steps):
            token, pos = int(decode_one_token(text_model, token, pos).argmax()), pos + 1
    wall = (time.perf_counter() - start) / args.steps
    table = profile.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.rows)
    print(table)
    self_total = sum(e.self_cpu_time_total for e in profile.key_averages()) / args.steps / 1e3
    print(f"per step: {wall * 1e3:.2f} ms wall (profiled), {self_total:.2f} ms in operators; "
          f"others' CPU {share.others() * 100:.0f} %")


if __name__ == "__main__":
    main()
