"""Micro-measurements behind the speed proposals, at SmolLM2-135M's shapes (dim 576, 9 heads / 3 KV heads of 64,
hidden 1536, vocab 49152), on this machine:

  attention   one decode step's attention (q of 1 position) over a static cache of L slots: torch's SDPA in bf16
              and fp32, over the whole cache (what the model does) and over the filled part only
  head        the output projection in prefill: all 128 positions (what the model does) or only the last
  int4        `_weight_int4pack_mm_for_cpu` with bf16 and fp32 activations, against a bf16 / fp32 linear

    python benchmarks/speed_probes.py [--threads 2] [--output benchmarks/results/speed_probes.md]

Best of 5 rounds of many calls each; the CPU share of other processes is printed with each section.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def best_us(fn, calls: int = 50, rounds: int = 5) -> float:
    for _ in range(5):
        fn()
    best = float("inf")
    for _ in range(rounds):
        start = time.perf_counter()
        for _ in range(calls):
            fn()
        best = min(best, (time.perf_counter() - start) / calls)
    return best * 1e6


def attention_rows(torch, F) -> list[str]:
    rows = ["| cache slots L | filled | bf16 SDPA, whole cache | fp32 SDPA, whole cache | fp32 SDPA, filled part |",
            "|---|---|---|---|---|"]
    for slots, filled in ((257, 250), (2048, 250), (2048, 2000)):
        q = torch.randn(1, 9, 1, 64)
        k, v = torch.randn(1, 3, slots, 64), torch.randn(1, 3, slots, 64)
        mask = torch.arange(slots)[None, :] < filled
        qb, kb, vb = q.bfloat16(), k.bfloat16(), v.bfloat16()
        kf, vf = k[:, :, :filled], v[:, :, :filled]
        cells = [best_us(lambda: F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, enable_gqa=True)),
                 best_us(lambda: F.scaled_dot_product_attention(q, k, v, attn_mask=mask, enable_gqa=True)),
                 best_us(lambda: F.scaled_dot_product_attention(q, kf, vf, enable_gqa=True))]
        rows.append(f"| {slots} | {filled} | " + " | ".join(f"{c:.0f} µs" for c in cells) + " |")
    return rows


def head_rows(torch, F) -> list[str]:
    rows = ["| dtype | head on all 128 positions | head on the last only |", "|---|---|---|"]
    for dtype in (torch.float32, torch.bfloat16):
        h = torch.randn(1, 128, 576, dtype=dtype)
        w = torch.randn(49152, 576, dtype=dtype)
        cells = [best_us(lambda: F.linear(h, w).float(), calls=5), best_us(lambda: F.linear(h[:, -1:], w).float())]
        rows.append(f"| {str(dtype).split('.')[-1]} | {cells[0] / 1e3:.1f} ms | {cells[1] / 1e3:.2f} ms |")
    return rows


def int4_rows(torch, F) -> list[str]:
    from torchat.quant.int4 import Int4WeightOnlyLinear

    rows = ["| matrix (out × in) | int4 g32, bf16 activations | int4 g32, fp32 activations | bf16 linear | "
            "fp32 linear |", "|---|---|---|---|---|"]
    for out_features, in_features in ((1536, 576), (576, 1536), (49152, 576)):
        w = torch.randn(out_features, in_features) * 0.02
        module = Int4WeightOnlyLinear.from_float(w, 32, dtype=torch.bfloat16)
        module.pack()
        x = torch.randn(1, in_features)
        xb = x.bfloat16()
        pad = module.padded_in
        xpad = F.pad(xb, (0, pad - in_features))
        mm = torch.ops.aten._weight_int4pack_mm_for_cpu
        sz = module.scale_and_zero
        cells = [best_us(lambda: mm(xpad, module.packed_weight, 32, sz)),
                 best_us(lambda: mm(xpad.float(), module.packed_weight, 32, sz.float())),
                 best_us(lambda: F.linear(xb, w.bfloat16())), best_us(lambda: F.linear(x, w))]
        rows.append(f"| {out_features} × {in_features} | " + " | ".join(f"{c:.0f} µs" for c in cells) + " |")
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/speed_probes.md")
    args = parser.parse_args()

    import torch
    import torch.nn.functional as F

    from torchat.bench import CpuShare, host_info

    torch.set_num_threads(args.threads)
    host = host_info()
    lines = ["# Speed probes at SmolLM2-135M's shapes", "",
             f"`python benchmarks/speed_probes.py --threads {args.threads}` on {host['cpu']} ({host['cores']} cores, "
             f"{', '.join(host['isa'])}), torch {torch.__version__}. Best of 5 rounds.", ""]
    for title, rows in (("One decode step's attention (per layer; 30 layers per token)", attention_rows),
                        ("The output head in a 128-token prefill", head_rows),
                        ("int4 weight-only matmul at M=1", int4_rows)):
        share = CpuShare()
        table = rows(torch, F)
        lines += [f"## {title}", "", *table, "", f"Other processes' CPU share meanwhile: {share.others() * 100:.0f} %"
                  + (" (contended: the figures understate)" if share.others() > 0.10 else ""), ""]
        print("\n".join(lines[-len(table) - 4:]), flush=True)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
