"""A Llama-2-7B-shaped model with random weights on CUDA: bf16, int8 and int4, eager + compile and AOTI.

    python benchmarks/cuda_7b.py [--variants bf16,int8,int4] [--modes compile,aoti] [--runs 3]

UNTESTED: written without a GPU (the project's machines have none); it refuses to run without CUDA. Random
weights are fine for speed: the kernels do not look at the values. Reports decode and prefill tok/s and the
fraction of the measured HBM read bandwidth (bandwidth / weight bytes per token). Writes
benchmarks/results/cuda_7b.{json,md}.
"""

import argparse
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

VARIANTS = {"bf16": "", "int8": '{"linear:int8": {"group_size": 0}}', "int4": '{"linear:int4": {"group_size": 128}}'}


class PromptTokens:
    """Stands in for a tokenizer: random ids below the vocabulary (the weights are random too)."""

    def __init__(self, vocab_size: int):
        self.vocab_size = vocab_size

    def encode(self, text: str) -> list[int]:
        import torch

        return torch.randint(3, self.vocab_size, (len(text),), generator=torch.Generator().manual_seed(0)).tolist()


def random_model(config: str, device: str):
    import torch

    from torchat.configs import KNOWN_CONFIGS
    from torchat.model import ModelArgs, Transformer

    args = ModelArgs.from_dict(KNOWN_CONFIGS[config])
    torch.manual_seed(0)
    with torch.device(device):
        model = Transformer(args).to(torch.bfloat16)
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.normal_(0, 0.02)
    return model.eval()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--config", default="Llama-2-7b")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--modes", default="compile,aoti")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results/cuda_7b")
    args = parser.parse_args()

    import torch

    if not torch.cuda.is_available():
        print("cuda_7b: no CUDA device; this benchmark needs a GPU", file=sys.stderr)
        return 2
    from torchat.bench import (BenchConfig, bench_text_model, measure_bandwidth, render_markdown,
                               weight_bytes_per_token, write_json)
    from torchat.generate import EagerModel
    from torchat.quant import parse_quant, quantize_model

    bandwidth = measure_bandwidth(mib=4096, device="cuda")
    config = BenchConfig(args.prompt_tokens, args.new_tokens, args.runs, 1, max_others_cpu=1.0)
    cache_len = args.prompt_tokens + args.new_tokens + 1
    results = []
    for variant in args.variants.split(","):
        for mode in args.modes.split(","):
            torch._dynamo.reset()
            model = random_model(args.config, "cuda")
            specs = parse_quant(VARIANTS[variant]) if VARIANTS[variant] else []
            if specs:
                with torch.no_grad():
                    quantize_model(model, specs)
            start = time.perf_counter()
            if mode == "aoti":
                from torchat.exported import load_exported
                from torchat.lowering import export_model

                path = Path(tempfile.mkdtemp(prefix="cuda7b-")) / "model.pt2"
                export_model(model, path, max_seq_len=cache_len, dtype="bf16", device="cuda",
                             quant=[s.to_dict() for s in specs], quant_specs=specs)
                text_model = load_exported(path)
                size = path.stat().st_size
            else:
                text_model = EagerModel(model, cache_len, compile=mode == "compile")
                size = None
            prompt = PromptTokens(model.args.vocab_size).encode("x" * args.prompt_tokens)
            labels = {"system": "torchat", "mode": mode, "model": f"{args.config} (random weights)",
                      "quant": variant, "precision": variant, "dtype": "bf16", "device": "cuda",
                      "gpu": torch.cuda.get_device_name()}
            weight_bytes = weight_bytes_per_token(model.args.to_dict(), [s.to_dict() for s in specs], "bf16")
            torch.cuda.reset_peak_memory_stats()
            result = bench_text_model(text_model, prompt, config, labels, weight_bytes=weight_bytes,
                                      bandwidth_gb_s=bandwidth, artifact_bytes=size,
                                      load_s=time.perf_counter() - start)
            result["peak_cuda_mib"] = round(torch.cuda.max_memory_allocated() / 2**20)
            results.append(result)
            print(f"{variant} {mode}: decode {result['decode_tok_s']['median']} tok/s, "
                  f"{result['roofline']['fraction']['median'] * 100:.0f} % of {bandwidth} GB/s", flush=True)
            del model, text_model
            torch.cuda.empty_cache()
    args.output.parent.mkdir(parents=True, exist_ok=True)
    write_json(args.output.with_suffix(".json"), {"bandwidth_gb_s": bandwidth, "results": results})
    args.output.with_suffix(".md").write_text(render_markdown(results, f"{args.config} (random weights) on CUDA"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
