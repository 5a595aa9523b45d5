"""Fill the README's performance tables on this machine: SmolLM2-135M through every torchat path, and the peers
(llama.cpp on the Q4_1 GGUF and on a Q8_0 GGUF of the same weights, transformers in fp32) in the same run.

    python benchmarks/run_all.py [--rows int4-aoti,8da4w-et,...] [--runs 5] [--threads 2] [--wait-quiet 900]

The artifacts come from the build graph (the store builds what is missing: quantize, export), each
measurement runs in its own process (torchat.bench_jobs.run_jobs), and the CPU share of other processes is
recorded per run. Contended results are kept but marked, and the tables say so: rerun on a quiet machine.
Writes benchmarks/results/bench.{json,md,png}. A benchmark, not a test: nothing here asserts a speed.
"""

import argparse
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

MODEL = "smollm2-135m"
# row -> (target, mode, max_seq_len): the target's artifact run by that mode (eager artifacts: eager or compile).
# max_seq_len None: the artifact the build graph makes (KV cache of matrix.toml's 2048). A number: the target built
# through the store with that KV cache (exported attention reads only the filled slots, but a shorter cache still
# costs less memory).
ROWS = {
    "fp32-eager": ("none-fp32-eager", "eager", None),
    "bf16-eager": ("none-eager", "eager", None),
    "bf16-compile": ("none-eager", "compile", None),
    "int8-eager": ("int8-eager", "eager", None),
    "int8-compile": ("int8-eager", "compile", None),
    "int8-aoti": ("int8-aoti", "aoti", None),
    "int8-aoti-512": ("int8-aoti", "aoti", 512),
    "int4-eager": ("int4-eager", "eager", None),
    "int4-compile": ("int4-eager", "compile", None),
    "int4-aoti": ("int4-aoti", "aoti", None),
    "int4-aoti-512": ("int4-aoti", "aoti", 512),
    "int4-fp32-aoti": ("int4-fp32-aoti", "aoti", None),
    "8da4w-aoti": ("8da4w-fp32-aoti", "aoti", None),
    "8da4w-et": ("8da4w-et", "et", None),
    "8da4w-et-512": ("8da4w-et", "et", 512),
    "8da8w-et": ("8da8w-et", "et", None),
}
PEERS = {"llama.cpp-q4_1": ("llama.cpp", "Q4_1"), "llama.cpp-q8_0": ("llama.cpp", "Q8_0"),
         "transformers-fp32": ("transformers", "Q4_1")}


def peer_ggufs() -> dict[str, Path]:
    """The shipped Q4_1 GGUF and a Q8_0 GGUF of its weights (written once into the cache)."""
    from make_q8_gguf import write_q8_0

    from torchat.assets import fetch_asset
    from torchat.sources import cache_dir

    q4 = fetch_asset("smollm2-135m-gguf")
    q8 = cache_dir() / "bench" / "SmolLM2-135M-Instruct.Q8_0.gguf"
    if not q8.is_file():
        q8.parent.mkdir(parents=True, exist_ok=True)
        write_q8_0(q4, q8.with_suffix(".part"))
        q8.with_suffix(".part").rename(q8)
    return {"Q4_1": q4, "Q8_0": q8}


def artifact_path(target_name: str, max_seq_len: int | None) -> tuple[Path, str]:
    """(the target's model: a quantized checkpoint directory or an artifact file, its backend), built through the
    store if missing; with a given max_seq_len, the target exported with that KV cache (a store node of its own,
    keyed like every build by its spec, inputs and code, so a changed lowering is exported again)."""
    from torchat import spec, store
    from torchat.vocabulary import BACKENDS

    catalog = spec.load_catalog()
    if max_seq_len is not None:
        catalog.max_seq_len = max_seq_len
    target = catalog.parse_target(f"{MODEL}-{target_name}")
    backend = str(target.backend)
    directory, _ = store.realize_with_inputs(catalog.model_node(target))
    return (directory if backend == "eager" else directory / BACKENDS[target.backend].output), backend


def plan(rows: list[str], peers: list[str], config: dict, threads: int | None) -> list[dict]:
    from torchat.bench_jobs import torchat_job
    from torchat.model_source import ModelSource

    ggufs = peer_ggufs() if peers else {}
    jobs = [{"kind": "peer", "peer": PEERS[p][0], "gguf": str(ggufs[PEERS[p][1]]), "config": config,
             "threads": threads} for p in peers]
    for row in rows:
        target, mode, max_seq_len = ROWS[row]
        start = time.perf_counter()
        path, backend = artifact_path(target, max_seq_len)
        print(f"run_all: {row}: {path} ({time.perf_counter() - start:.0f} s)", file=sys.stderr, flush=True)
        jobs.append(torchat_job(ModelSource(checkpoint=path), mode, config, threads) | {"row": row})
    return jobs


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", default=",".join(ROWS), help=f"comma-separated, of: {', '.join(ROWS)}")
    parser.add_argument("--peers", default=",".join(PEERS), help=f"comma-separated, of: {', '.join(PEERS)}")
    parser.add_argument("--prompt-tokens", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=128)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--warmup-runs", type=int, default=1)
    parser.add_argument("--threads", type=int, default=None)
    parser.add_argument("--wait-quiet", type=float, default=0.0, help="seconds to wait for a quiet CPU per job")
    parser.add_argument("--retries", type=int, default=1)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks/results")
    parser.add_argument("--build-only", action="store_true", help="build the artifacts and the Q8_0 GGUF, measure nothing")
    args = parser.parse_args()

    from torchat.bench import measure_bandwidth, seed_table
    from torchat.bench_jobs import run_jobs, write_report

    config = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
              "warmup_runs": args.warmup_runs, "max_others_cpu": 0.10}
    rows = [r for r in args.rows.split(",") if r]
    peers = [p for p in args.peers.split(",") if p]
    for name in rows:
        if name not in ROWS:
            parser.error(f"unknown row {name!r}; choose from {', '.join(ROWS)}")
    jobs = plan(rows, peers, config, args.threads)
    if args.build_only:
        return 0
    bandwidth = measure_bandwidth(args.threads)
    print(f"run_all: {len(jobs)} measurements, read bandwidth {bandwidth} GB/s", file=sys.stderr, flush=True)
    results = run_jobs(jobs, bandwidth, retries=args.retries, wait_quiet=args.wait_quiet)
    for job, result in zip(jobs, results):
        result["row"] = job.get("row") or f"{job['peer']} {Path(job['gguf']).name}"
    title = "SmolLM2-135M-Instruct on this machine: torchat and its peers"
    report = write_report(results, bandwidth, args.output, title)
    with open(args.output / "bench.md", "a") as f:
        for precision, name in (("int4", "4-bit"), ("int8", "8-bit"), ("bf16", "bf16"), ("fp32", "fp32")):
            for metric in ("decode_tok_s", "prefill_tok_s"):
                table = seed_table(results, precision, metric)
                if table:
                    f.write(f"\n### {name}, {metric.split('_')[0]} tokens per second (the seed's table)\n\n")
                    f.write("\n".join(table) + "\n")
    print((args.output / "bench.md").read_text())
    return 0 if all("error" not in r for r in report["results"]) else 1


if __name__ == "__main__":
    sys.exit(main())
