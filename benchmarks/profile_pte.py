"""Where a .pte decode step's time goes: ExecuTorch's etdump over decode steps, summed by operator.

    python benchmarks/profile_pte.py MODEL.pte [--threads 2] [--prompt 128] [--steps 32]

Prefills `--prompt` random tokens, decodes a few untimed steps, then profiles `--steps` decode steps and prints,
per operator (an XNNPACK delegate call counts as "DELEGATE_CALL", its own work as the delegate's events), the time
per step and the calls per step. Shares are what matter; absolute times need a quiet machine (profiling adds a
little per operator).
"""

import argparse
import collections
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("pte", type=Path)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--steps", type=int, default=32)
    parser.add_argument("--rows", type=int, default=20)
    args = parser.parse_args()

    from torchat.threads import prepare_for_pte, set_pte_pool_size

    prepare_for_pte()  # before torch loads libgomp (see torchat/threads.py)
    import torch
    from executorch.devtools import Inspector
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    import executorch.kernels.quantized  # noqa: F401  (the quantized embedding kernels)
    from torchat.bench import CpuShare
    from torchat.exported import load_llm_ops, read_metadata

    set_pte_pool_size(args.threads)
    load_llm_ops()
    metadata = read_metadata(args.pte)
    module = _load_for_executorch(str(args.pte), enable_etdump=True)
    tokens = torch.randint(0, metadata.vocab_size, (1, args.prompt + 4 + args.steps),
                           generator=torch.Generator().manual_seed(0))
    module.forward((tokens[:, :args.prompt], torch.arange(args.prompt)))
    for pos in range(args.prompt, args.prompt + 4):
        module.forward((tokens[:, pos:pos + 1], torch.tensor([pos])))
    with tempfile.TemporaryDirectory() as scratch:
        # only the profiled steps count: the etdump so far is written away and a fresh one begins
        module.write_etdump_result_to_file(str(Path(scratch) / "warmup.etdp"))
        share = CpuShare()
        for pos in range(args.prompt + 4, args.prompt + 4 + args.steps):
            module.forward((tokens[:, pos:pos + 1], torch.tensor([pos])))
        others = share.others()
        path = Path(scratch) / "decode.etdp"
        module.write_etdump_result_to_file(str(path))
        inspector = Inspector(etdump_path=str(path))
    totals, calls = collections.Counter(), collections.Counter()
    for block in inspector.event_blocks:
        if block.name != "Execute":
            continue
        for event in block.events:
            if event.perf_data is None:
                continue
            name = event.name if not event.is_delegated_op else f"xnnpack: {event.name}"
            totals[name] += sum(event.perf_data.raw)
            calls[name] += len(event.perf_data.raw)
    method = totals.pop("Method::execute", None)
    calls.pop("Method::execute", None)
    steps = args.steps
    print(f"{'operator':60} {'ms/step':>8} {'calls/step':>10}")
    for name, total in totals.most_common(args.rows):
        print(f"{name[:60]:60} {total / steps:8.3f} {calls[name] / steps:10.1f}")
    if method is not None:
        print(f"{'Method::execute':60} {method / steps:8.3f}")
    print(f"positions {args.prompt + 4}..{args.prompt + 4 + steps}, {args.threads} threads, others' CPU "
          f"{others * 100:.0f} %")


if __name__ == "__main__":
    main()
