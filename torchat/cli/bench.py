"""`torchat bench`: prefill and decode speed, time to first token, peak memory and size of a model, against peers.

    torchat bench [MODEL | TARGET | PATH | --checkpoint-path P | --gguf-path G] [--quant JSON] [--dtype bf16]
    torchat bench ... --compile | --modes eager,compile
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
import os
import sys
from dataclasses import replace
from pathlib import Path

from torchat.cli.flags import add_model_flags, model_source, non_negative_float, non_negative_int, positive_int
from torchat.errors import TorchatError
from torchat.vocabulary import BACKENDS, Backend


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    add_model_flags(parser)
    parser.add_argument("--modes", help="eager models: comma-separated of eager, compile (default: eager, or "
                                        "compile with --compile; both for --backend eager)")
    graph = parser.add_argument_group("build-graph form (doit bench:TARGET)")
    graph.add_argument("--artifact-dir", type=Path, help="the target's model artifact directory")
    graph.add_argument("--backend", choices=list(Backend), help="what --artifact-dir holds")
    run = parser.add_argument_group("measurement")
    run.add_argument("--prompt-tokens", type=positive_int, default=128)
    run.add_argument("--new-tokens", type=positive_int, default=128)
    run.add_argument("--runs", type=positive_int, default=3, help="timed runs (median, min, max)")
    run.add_argument("--warmup-runs", type=non_negative_int, default=1,
                     help="untimed runs first (compilation happens there)")
    run.add_argument("--threads", type=positive_int, default=None, help="torch/llama.cpp threads (default: torch's)")
    run.add_argument("--bandwidth-gb-s", type=non_negative_float, default=None,
                     help="memory read bandwidth for the roofline (default: measured here)")
    run.add_argument("--max-others-cpu", type=non_negative_float, default=0.10,
                     help="other processes' CPU share above which a run is contended (default 0.10)")
    run.add_argument("--retries", type=non_negative_int, default=1, help="reruns of a contended measurement")
    run.add_argument("--wait-quiet", type=non_negative_float, default=0.0,
                     help="seconds to wait for a quiet CPU before each")
    run.add_argument("--allow-contended", action="store_true",
                     default=bool(os.environ.get("TORCHAT_BENCH_ALLOW_CONTENDED")),
                     help="keep contended results (marked) instead of failing ($TORCHAT_BENCH_ALLOW_CONTENDED)")
    peers = parser.add_argument_group("peers (optional: pip install 'torchat[bench]')")
    peers.add_argument("--peers", default="", help="comma-separated: llama.cpp, transformers")
    peers.add_argument("--peer-gguf", type=Path, action="append", default=[],
                       help="the GGUF the peers run (repeatable; default: the model's GGUF)")
    parser.add_argument("--output-dir", type=Path, help="write bench.json, bench.md and bench.png here")
    parser.add_argument("--title", default="torchat bench")


def plan_jobs(args: argparse.Namespace) -> list[dict]:
    """One job per measurement (torchat.bench_jobs), handed to a child process each."""
    from torchat.bench_jobs import MODES, torchat_job
    from torchat.model_source import find_tokenizer, resolve

    config = {"prompt_tokens": args.prompt_tokens, "new_tokens": args.new_tokens, "runs": args.runs,
              "warmup_runs": args.warmup_runs, "max_others_cpu": args.max_others_cpu}
    peer_ggufs = [str(p) for p in args.peer_gguf]
    if args.artifact_dir is not None:  # the graph's form: the target's artifact directory and its backend
        if args.backend is None:
            raise TorchatError(f"--artifact-dir needs --backend, one of: {', '.join(Backend)}")
        output = BACKENDS[Backend(args.backend)].output
        tokenizer = args.tokenizer_path or (find_tokenizer(args.checkpoint_dir) if args.checkpoint_dir else None)
        flags = argparse.Namespace(**{**vars(args), "checkpoint_dir": None})  # --checkpoint-dir: the peers' GGUF
        source = replace(model_source(flags), checkpoint=args.artifact_dir / output if output else args.artifact_dir,
                         tokenizer_path=tokenizer)
        if args.checkpoint_dir is not None and not peer_ggufs:
            peer_ggufs = [str(p) for p in sorted(Path(args.checkpoint_dir).glob("*.gguf")) if p.stat().st_size > 2**20]
    else:
        source = model_source(args)
    resolved = resolve(source)  # fetched once here, not in every child
    source = replace(source, model=None, checkpoint=resolved.path, format=resolved.format,
                     tokenizer_path=source.tokenizer_path or resolved.tokenizer_path)
    if resolved.kind == "artifact":
        modes = [str(next(b for b, info in BACKENDS.items() if resolved.path.suffix in info.suffixes))]
    else:
        default = ",".join(MODES) if args.backend == Backend.EAGER else ("compile" if args.compile else "eager")
        modes = (args.modes or default).split(",")
        for mode in set(modes) - set(MODES):
            raise TorchatError(f"unknown mode {mode!r}; choose from {', '.join(MODES)} (aoti/et come from an "
                               "artifact)")
        if not peer_ggufs and resolved.path.is_file() and resolved.path.suffix == ".gguf":
            peer_ggufs = [str(resolved.path)]
    jobs = [torchat_job(source, mode, config, args.threads) for mode in modes]
    for peer in filter(None, args.peers.split(",")):
        if not peer_ggufs:
            raise TorchatError(f"the {peer} peer needs a GGUF: pass --peer-gguf")
        jobs += [{"kind": "peer", "peer": peer, "gguf": g, "config": config, "threads": args.threads}
                 for g in peer_ggufs]
    return jobs


def run(args: argparse.Namespace) -> int:
    from torchat.bench import measure_bandwidth, others_cpu_now
    from torchat.bench_jobs import check_results, run_jobs, write_report

    jobs = plan_jobs(args)
    bandwidth = args.bandwidth_gb_s or measure_bandwidth(args.threads)
    print(f"torchat bench: {len(jobs)} measurement(s); read bandwidth {bandwidth} GB/s; others' CPU now "
          f"{others_cpu_now(1.0) * 100:.0f} %", file=sys.stderr)
    results = run_jobs(jobs, bandwidth, retries=args.retries, wait_quiet=args.wait_quiet,
                       max_others_cpu=args.max_others_cpu)
    write_report(results, bandwidth, args.output_dir, args.title)
    check_results(results, args.allow_contended)
    return 0
