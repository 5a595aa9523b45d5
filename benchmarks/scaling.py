"""A scaling series on this machine: decode (and prefill) speed against model size and context position, torchat's
8da4w `.pte` against llama.cpp on GGUFs of the same weights, with the bandwidth roofline of every point.

    flock /tmp/torchat-cpu.lock python benchmarks/scaling.py [--models smollm2-135m,llama-3.2-1b]
        [--positions 128,2048,8192] [--repeats 3] [--threads 2] [--build-only]

Models: SmolLM2-135M (the shipped Q4_1 GGUF; its 8da4w `.pte` from the build graph's quantized checkpoint) and a
Llama-3.2-1B-shaped model with random weights (benchmarks/llama_1b.py), written as Q4_1, Q4_0 and Q8_0 GGUFs with
the `gguf` package (head/tied embedding Q8_0, tokenizer SmolLM2's padded to 128256 tokens); its `.pte` is the Q4_1
GGUF converted and quantized by `torchat quantize` with the 8da4w preset (whose asymmetric grid holds Q4_1's
weights exactly), so both sides run the same weights. Each `.pte` is exported once with a KV cache of 8192
(exported attention reads only the filled slots); llama.cpp gets n_ctx 8192.

Each point is a context position N (128, 2048, 8192): decode steps at positions N-32 .. N-1 after a prompt of
N-32 tokens (Botchan prose, the same ids on both sides). At 128 and 2048 every repeat prefills afresh (prefill
tok/s is reported there); at 8192 one prompt of N-96 tokens is prefilled and the repeats are three consecutive
windows of 32 steps (N-96 .. N-1), so the most expensive prefill runs once per system. Each (model, system) runs in
its own process after a short warm-up; medians over the repeats; the others' share of the CPU is recorded per
timed section. Roofline: bytes a decode step reads (the weights in their stored form, plus the KV cache filled
so far: fp16 in a quantized `.pte`, f16 in llama.cpp) / the machine's read bandwidth
(torchat.bench.measure_bandwidth).
Writes benchmarks/results/scaling/scaling.{json,md} and scaling-size.png, scaling-context.png. A benchmark, not a
test: nothing here asserts a speed.
"""

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))

OUT = ROOT / "benchmarks" / "results" / "scaling"
CACHE_LEN = 8192
WINDOW = 32  # decode steps timed per repeat
MODELS = ("smollm2-135m", "llama-3.2-1b")
PEER_TYPES = ("Q4_1", "Q8_0", "Q4_0")
CONTENDED = 0.10


# --- the artifacts -----------------------------------------------------------------------------------------

def smollm2_files() -> dict:
    from run_all import artifact_path, peer_ggufs

    pte, _ = artifact_path("8da4w-et", CACHE_LEN)
    return {"pte": pte, "gguf": peer_ggufs()}


def llama_1b_files(peer_types: tuple[str, ...]) -> dict:
    from llama_1b import write_checkpoint, write_gguf

    from torchat.assets import fetch_asset
    from torchat.cli import main as torchat_main
    from torchat.sources import cache_dir

    bench = cache_dir() / "bench"
    checkpoint = bench / "llama-3.2-1b-random"
    if not (checkpoint / "model.safetensors").is_file():
        write_checkpoint(checkpoint)
    tokenizer = fetch_asset("smollm2-135m-gguf")
    ggufs = {t: write_gguf(checkpoint, bench / f"llama-3.2-1b-random.{t}.gguf", t, tokenizer)
             for t in sorted(set(peer_types) | {"Q4_1"})}
    quant = tomllib.loads((ROOT / "targets" / "quant.toml").read_text())["8da4w"]["quant"]
    quantized = bench / "llama-3.2-1b-random-8da4w-fp32"
    if not (quantized / "quant.json").is_file():
        rc = torchat_main(["quantize", str(ggufs["Q4_1"]), "--quant", json.dumps(quant), "--dtype", "fp32",
                           "--output-dir", str(quantized)])
        if rc != 0:
            raise SystemExit("scaling: quantizing the 1B Q4_1 GGUF with 8da4w failed")
    # keyed by the code an export runs, as the store keys a build: a changed lowering exports again
    pte = bench / f"{quantized.name}-ctx{CACHE_LEN}-{lowering_key()}" / "model.pte"
    if not pte.is_file():
        pte.parent.mkdir(parents=True, exist_ok=True)
        start = time.perf_counter()
        rc = torchat_main(["export", str(quantized), "--dtype", "fp32", "--max-seq-length", str(CACHE_LEN),
                           "--output-path", str(pte)])
        if rc != 0:
            raise SystemExit(f"scaling: exporting the 1B 8da4w .pte with a KV cache of {CACHE_LEN} failed")
        print(f"scaling: exported {pte} in {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
    return {"pte": pte, "gguf": ggufs}


def lowering_key() -> str:
    """The store's digest of the code the build step of a .pte runs (torchat's lowering, quant and model)."""
    from torchat import spec, store

    catalog = spec.load_catalog()
    node = catalog.build_node(catalog.parse_target("smollm2-135m-8da4w-et"))
    return store.sha256_json(store.code_digests(node.code))[:12]


def model_files(model: str, peer_types: tuple[str, ...]) -> dict:
    return smollm2_files() if model == "smollm2-135m" else llama_1b_files(peer_types)


# --- one (model, system) in its own process -----------------------------------------------------------------

def kv_bytes_per_position(args: dict, element_bytes: int) -> int:
    """K and V of every layer for one position."""
    head_dim = args["dim"] // args["n_heads"]
    return 2 * args["n_layers"] * args["n_kv_heads"] * head_dim * element_bytes


def open_system(job: dict):
    """(TextModel, facts) for a job: torchat's .pte or llama.cpp on a GGUF."""
    from torchat.bench import weight_bytes_per_token

    if job["system"] == "torchat":
        from torchat.model_source import ModelSource, open_model
        from torchat.threads import pte_pool_size, set_pte_pool_size

        set_pte_pool_size(job["threads"])
        opened = open_model(ModelSource(checkpoint=Path(job["path"])))
        about = opened.description
        args = about["model_args"]
        from torchat.dtypes import dtype_of, torch_dtype
        from torchat.lowering.et import kv_cache_dtype

        kv_dtype = kv_cache_dtype(torch_dtype(about["dtype"]), bool(about["quant"]))
        facts = {"weight_bytes": weight_bytes_per_token(args, about["quant"], about["dtype"]),
                 "kv_bytes_per_position": kv_bytes_per_position(args, kv_dtype.itemsize),
                 "kv_dtype": str(dtype_of(kv_dtype)),
                 "threads": pte_pool_size(), "max_seq_len": opened.text_model.max_seq_len}
        return opened.text_model, facts
    from torchat.peers import gguf_weight_facts, load_peer
    from torchat.checkpoint.gguf import gguf_metadata

    model = load_peer("llama.cpp", Path(job["path"]), job["threads"], CACHE_LEN)
    meta = gguf_metadata(Path(job["path"]))
    args = {"dim": meta["llama.embedding_length"], "n_heads": meta["llama.attention.head_count"],
            "n_kv_heads": meta["llama.attention.head_count_kv"], "n_layers": meta["llama.block_count"]}
    facts = {"weight_bytes": gguf_weight_facts(Path(job["path"]))["weight_bytes"],
             "kv_bytes_per_position": kv_bytes_per_position(args, 2), "kv_dtype": "f16",  # llama.cpp's default
             "threads": job["threads"], "max_seq_len": CACHE_LEN, "peer_version": model.labels["peer_version"]}
    return model, facts


def timed_prefill(model, prompt: list[int]) -> tuple[int, float, float]:
    """(first token, seconds, others' CPU share)."""
    from torchat.bench import CpuShare
    from torchat.generate import prefill

    share, start = CpuShare(), time.perf_counter()
    token = int(prefill(model, prompt, 0).argmax())
    return token, time.perf_counter() - start, share.others()


def timed_decode(model, token: int, pos: int, steps: int) -> tuple[int, float, float]:
    """`steps` greedy decode steps at positions pos .. pos+steps-1: (last token, seconds, others' CPU share)."""
    from torchat.bench import CpuShare
    from torchat.generate import decode_one_token

    share, start = CpuShare(), time.perf_counter()
    for step in range(steps):
        token = int(decode_one_token(model, token, pos + step).argmax())
    return token, time.perf_counter() - start, share.others()


def run_job(job: dict, out: Path) -> None:
    """The job's points, written to `out` after each one: a process killed at 8192 (memory) keeps the others."""
    from torchat.bench import bench_prompt, peak_rss_mib, write_json
    from torchat.tokenizers import load_tokenizer

    start = time.perf_counter()
    model, facts = open_system(job)
    load_s = time.perf_counter() - start
    # SmolLM2's tokenizer for both models: the 1B GGUFs carry it (padded), ids below 49152 mean the same
    text = bench_prompt(load_tokenizer(Path(job["tokenizer_gguf"])), max(job["positions"]))
    token, _, _ = timed_prefill(model, text[:96])  # warm-up: the first calls pay for allocation and packing
    timed_decode(model, token, 96, 8)
    points = []
    for position in job["positions"]:
        repeats = []
        if position < CACHE_LEN:
            for _ in range(job["repeats"]):
                prompt = text[:position - WINDOW]
                token, prefill_s, prefill_share = timed_prefill(model, prompt)
                _, decode_s, decode_share = timed_decode(model, token, len(prompt), WINDOW)
                repeats.append({"first_pos": len(prompt), "prefill_tok_s": len(prompt) / prefill_s,
                                "decode_tok_s": WINDOW / decode_s, "others_cpu": max(prefill_share, decode_share)})
        else:  # one prefill, then consecutive windows: the 8k prefill is the series' most expensive step
            prompt = text[:position - WINDOW * job["repeats"]]
            token, prefill_s, prefill_share = timed_prefill(model, prompt)
            pos = len(prompt)
            for index in range(job["repeats"]):
                token, decode_s, decode_share = timed_decode(model, token, pos, WINDOW)
                repeats.append({"first_pos": pos, "prefill_tok_s": len(prompt) / prefill_s if index == 0 else None,
                                "decode_tok_s": WINDOW / decode_s,
                                "others_cpu": max(prefill_share, decode_share) if index == 0 else decode_share})
                pos += WINDOW
        decode = [r["decode_tok_s"] for r in repeats]
        prefill = [r["prefill_tok_s"] for r in repeats if r["prefill_tok_s"] is not None]
        # the KV cache read by the window's middle step
        mid = statistics.median(r["first_pos"] for r in repeats) + WINDOW // 2
        bytes_per_token = facts["weight_bytes"] + facts["kv_bytes_per_position"] * mid
        ceiling = job["bandwidth_gb_s"] * 1e9 / bytes_per_token
        points.append({"position": position, "prompt_tokens": len(prompt),
                       "decode_tok_s": statistics.median(decode), "decode_runs": decode,
                       "prefill_tok_s": statistics.median(prefill), "prefill_runs": prefill,
                       "bytes_per_token": int(bytes_per_token),
                       "kv_bytes": int(bytes_per_token - facts["weight_bytes"]),
                       "roofline_tok_s": ceiling, "roofline_fraction": statistics.median(decode) / ceiling,
                       "others_cpu_max": max(r["others_cpu"] for r in repeats),
                       "contended": max(r["others_cpu"] for r in repeats) > CONTENDED, "repeats": repeats})
        print(f"  {job['model']} {job['label']} @{position}: decode {points[-1]['decode_tok_s']:.2f} tok/s, "
              f"prefill {points[-1]['prefill_tok_s']:.1f} tok/s, {points[-1]['roofline_fraction']:.0%} of roofline, "
              f"others {points[-1]['others_cpu_max']:.0%}", file=sys.stderr, flush=True)
        write_json(out, {**{k: job[k] for k in ("model", "system", "label", "path", "params", "bandwidth_gb_s")},
                         **facts, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
                         "load_s": round(load_s, 2), "peak_rss_mib": peak_rss_mib(), "points": points})


def run_child(job: dict, scratch: Path) -> dict:
    from torchat.threads import pte_child_environment

    job_file, out_file = scratch / "job.json", scratch / "result.json"
    out_file.unlink(missing_ok=True)
    job_file.write_text(json.dumps(job))
    env = pte_child_environment() if job["system"] == "torchat" else dict(os.environ)
    env.update(job.get("env") or {})
    proc = subprocess.run([sys.executable, __file__, "--job", str(job_file), str(out_file)], env=env,
                          stdin=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if proc.returncode == 0 and out_file.is_file():
        print(proc.stderr.strip(), file=sys.stderr)
        return json.loads(out_file.read_text())
    lines = [line for line in proc.stderr.strip().splitlines() if line.strip()] or ["no output"]
    print("\n".join(lines[-20:]), file=sys.stderr)
    error = f"exit {proc.returncode}: {lines[-1][:300]}"
    if out_file.is_file():  # the points measured before it failed
        return {**json.loads(out_file.read_text()), "error_after": error}
    return {**{k: job[k] for k in ("model", "system", "label", "path", "params")}, "error": error}


def count_params(gguf: Path) -> int:
    """Parameters in the GGUF's tensor table (the tied embedding once; rope_freqs is not a weight)."""
    from gguf import GGUFReader

    return sum(int(t.n_elements) for t in GGUFReader(str(gguf)).tensors if t.name != "rope_freqs.weight")


def plan(models: list[str], peer_types: tuple[str, ...], positions: list[int], repeats: int,
         threads: int) -> list[dict]:
    jobs = []
    for model in models:
        files = model_files(model, peer_types)
        tokenizer = files["gguf"]["Q4_1"]
        params = count_params(tokenizer)
        base = {"model": model, "params": params, "positions": positions, "repeats": repeats, "threads": threads,
                "tokenizer_gguf": str(tokenizer)}
        jobs.append({**base, "system": "torchat", "label": "torchat 8da4w .pte", "path": str(files["pte"])})
        jobs += [{**base, "system": "llama.cpp", "label": f"llama.cpp {t}", "path": str(files["gguf"][t])}
                 for t in peer_types if t in files["gguf"]]
    return jobs


def add_ratios(results: list[dict]) -> None:
    """Each torchat point against llama.cpp Q4_1 on the same model and position, in the same run."""
    for result in results:
        if result["system"] != "torchat" or "error" in result:
            continue
        peer = next((r for r in results if r["model"] == result["model"] and r["label"] == "llama.cpp Q4_1"
                     and "error" not in r), None)
        for point in result["points"]:
            theirs = next((p for p in peer["points"] if p["position"] == point["position"]), None) if peer else None
            if theirs:
                point["decode_vs_llama_q4_1"] = point["decode_tok_s"] / theirs["decode_tok_s"]
                point["prefill_vs_llama_q4_1"] = point["prefill_tok_s"] / theirs["prefill_tok_s"]


def pte_kv_dtype(report: dict) -> str:
    """The .pte rows' KV cache dtype, as their processes read it (fp32 in series from before fp16 caches)."""
    found = {r.get("kv_dtype", "fp32") for r in report["results"] if r["system"].startswith("torchat")}
    return " / ".join(sorted(found)) or "?"


def render(report: dict) -> str:
    from avx2_emulation import EMULATION_NOTE

    m = report["machine"]
    bandwidths = sorted({r.get("bandwidth_gb_s") or report["bandwidth_gb_s"] for r in report["results"]})
    lines = [f"# Scaling: model size and context position ({report['created'][:10]})", "",
             f"{m['model_name']}, {m['cores']} cores, {m['memory_gib']} GiB; ISA {', '.join(report['host']['isa'])}; "
             f"{report['threads']} threads; read bandwidth {' / '.join(map(str, bandwidths))} GB/s "
             f"(torchat.bench.measure_bandwidth, at the start of each run; other processes lower it, so every point's "
             f"roofline here uses the highest, {bandwidths[-1]} GB/s). torchat's ExecuTorch "
             f"{report['toolchain'].get('executorch', '?')} `.pte` (8da4w: int8 dynamic activations, int4 weights "
             f"group 32 asymmetric, 8-bit head; fp32, KV cache {CACHE_LEN} {pte_kv_dtype(report)}) against "
             f"llama.cpp (llama-cpp-python {report.get('peer_version', '?')}, "
             f"n_ctx {CACHE_LEN}, KV f16) on GGUFs of the same weights. Decode: {WINDOW} steps ending at the "
             f"position, median of {report['repeats']} (at {CACHE_LEN}: three consecutive windows after one "
             "prefill); prefill: the prompt before the window. Roofline: read bandwidth / (weight bytes + KV "
             "bytes filled) per step.", "",
             *([f"**Incomplete**: {report['jobs_done']} of {report['jobs_planned']} (model, system) jobs measured.",
                ""] if report.get("jobs_done", 0) < report.get("jobs_planned", 0) else []),
             *([EMULATION_NOTE, ""] if report.get("avx2_emulated") else []),
             "| model (params) | position | system | decode tok/s (min-max) | vs llama.cpp Q4_1 | prefill tok/s "
             "(prompt) | vs llama.cpp Q4_1 | MB read/token (KV) | % of roofline | others' CPU (max) |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for result in report["results"]:
        name = f"{result['model']} ({result['params'] / 1e6:.0f} M)"
        if "error" in result:
            lines.append(f"| {name} | - | {result['label']} | failed: {result['error']} | | | | | | |")
            continue
        for p in result["points"]:
            decode = f"{p['decode_tok_s']:.2f} ({min(p['decode_runs']):.2f}-{max(p['decode_runs']):.2f})"
            prefill = f"{p['prefill_tok_s']:.1f} ({p['prompt_tokens']})" + (" one run" if len(p["prefill_runs"]) == 1
                                                                           else "")
            ratio = f"{p['decode_vs_llama_q4_1']:.2f}x" if "decode_vs_llama_q4_1" in p else ""
            pratio = f"{p['prefill_vs_llama_q4_1']:.2f}x" if "prefill_vs_llama_q4_1" in p else ""
            lines.append(f"| {name} | {p['position']} | {result['label']} | {decode} | {ratio} | {prefill} | "
                         f"{pratio} | {p['bytes_per_token'] / 1e6:.0f} ({p['kv_bytes'] / 1e6:.0f}) | "
                         f"{p['decode_tok_s'] * p['bytes_per_token'] / (bandwidths[-1] * 1e9):.0%} | "
                         f"{p['others_cpu_max']:.0%}"
                         + (" contended" if p["contended"] else "") + " |")
        if "error_after" in result:
            lines.append(f"| {name} | later | {result['label']} | failed: {result['error_after']} | | | | | | |")
    return "\n".join(lines) + "\n"


def plot(report: dict, out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    m = report["machine"]
    subtitle = f"{m['model_name']}, {report['threads']} threads" + (", AVX2 emulated" if report.get("avx2_emulated")
                                                                   else "")
    results = [r for r in report["results"] if "error" not in r]
    labels = sorted({r["label"] for r in results}, key=lambda s: (s != "torchat 8da4w .pte", s))
    positions = sorted({p["position"] for r in results for p in r["points"]})
    styles = {"torchat 8da4w .pte": "o-", "llama.cpp Q4_1": "s--", "llama.cpp Q8_0": "^:", "llama.cpp Q4_0": "v-."}

    fig, ax = plt.subplots(figsize=(7, 4.5))
    for label in labels:
        for position, alpha in zip(positions, (1.0, 0.65, 0.35)):
            xs, ys = [], []
            for r in sorted((r for r in results if r["label"] == label), key=lambda r: r["params"]):
                point = next((p for p in r["points"] if p["position"] == position), None)
                if point:
                    xs.append(r["params"] / 1e9)
                    ys.append(point["decode_tok_s"])
            if xs:
                ax.plot(xs, ys, styles.get(label, "x-"), alpha=alpha, label=f"{label} @ {position}",
                        color="C0" if label.startswith("torchat") else f"C{labels.index(label)}")
    ax.set(xscale="log", yscale="log", xlabel="parameters (billions)", ylabel="decode tok/s",
           title=f"Decode speed against model size\n{subtitle}")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    fig.savefig(out / "scaling-size.png", dpi=120)
    plt.close(fig)

    models = sorted({r["model"] for r in results}, key=lambda name: next(r["params"] for r in results
                                                                         if r["model"] == name))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4.2), squeeze=False)
    for ax, model in zip(axes[0], models):
        for label in labels:
            r = next((r for r in results if r["model"] == model and r["label"] == label), None)
            if r:
                ax.plot([p["position"] for p in r["points"]], [p["decode_tok_s"] for p in r["points"]],
                        styles.get(label, "x-"), label=label,
                        color="C0" if label.startswith("torchat") else f"C{labels.index(label)}")
                if label.startswith("torchat"):
                    ax.plot([p["position"] for p in r["points"]], [p["roofline_tok_s"] for p in r["points"]], "k:",
                            alpha=0.5, label="roofline (torchat's bytes)")
        ax.set(xscale="log", xlabel="context position", ylabel="decode tok/s", title=model)
        ax.set_xticks(positions, [str(p) for p in positions])
        ax.minorticks_off()
        ax.set_ylim(bottom=0)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"Decode speed against context position, {subtitle}", fontsize=10)
    fig.tight_layout()
    fig.savefig(out / "scaling-context.png", dpi=120)
    plt.close(fig)


def write_report(results: list[dict], args, bandwidth: float, planned: int) -> dict:
    from tp_bench import lscpu

    from torchat.bench import host_info, toolchain_info, write_json

    add_ratios(results)
    results.sort(key=lambda r: (r["params"], r["label"] != "torchat 8da4w .pte", r["label"]))
    report = {"schema": 1, "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), "machine": lscpu(),
              "host": host_info(), "toolchain": toolchain_info(), "threads": args.threads,
              "bandwidth_gb_s": bandwidth, "repeats": args.repeats, "window": WINDOW, "cache_len": CACHE_LEN,
              "avx2_emulated": args.avx2_emulated, "jobs_planned": planned, "jobs_done": len(results),
              "peer_version": next((r["peer_version"] for r in results if r.get("peer_version")), None),
              "results": results}
    args.output.mkdir(parents=True, exist_ok=True)
    write_json(args.output / "scaling.json", report)
    (args.output / "scaling.md").write_text(render(report))
    plot(report, args.output)
    return report


def main() -> int:
    if sys.argv[1:2] == ["--job"]:  # a child: one (model, system)
        run_job(json.loads(Path(sys.argv[2]).read_text()), Path(sys.argv[3]))
        return 0
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of: {', '.join(MODELS)}")
    parser.add_argument("--peers", default=",".join(PEER_TYPES), help="llama.cpp GGUF types, comma-separated")
    parser.add_argument("--positions", default="128,2048,8192")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--output", type=Path, default=OUT)
    parser.add_argument("--build-only", action="store_true", help="write the GGUFs and export the .pte files")
    parser.add_argument("--systems", default=None,
                        help="only these systems, comma-separated: torchat, Q4_1, Q8_0, Q4_0 (default: all)")
    parser.add_argument("--merge", action="store_true",
                        help="keep the output's earlier results for the (model, system) pairs not run now")
    parser.add_argument("--wait-quiet", type=float, default=0.0,
                        help="seconds to wait before each job for others to use <10 %% of the CPU")
    parser.add_argument("--avx2-emulated", action="store_true",
                        help="hide AVX-512 from XNNPACK, MKL and llama.cpp (benchmarks/avx2_emulation.py's way)")
    args = parser.parse_args()
    models = [m for m in args.models.split(",") if m]
    for model in models:
        if model not in MODELS:
            parser.error(f"unknown model {model!r}; choose from {', '.join(MODELS)}")
    positions = sorted(int(p) for p in args.positions.split(","))
    if any(p <= WINDOW * args.repeats or p > CACHE_LEN for p in positions):
        parser.error(f"positions must lie in ({WINDOW * args.repeats}, {CACHE_LEN}]")
    peer_types = tuple(t for t in args.peers.split(",") if t)
    jobs = plan(models, peer_types, positions, args.repeats, args.threads)
    if args.systems:
        wanted = {f"llama.cpp {s}" if s != "torchat" else "torchat 8da4w .pte" for s in args.systems.split(",")}
        jobs = [job for job in jobs if job["label"] in wanted]
    if args.build_only:
        return 0

    import tempfile

    from torchat.bench import measure_bandwidth, wait_for_quiet

    hook_dir = tempfile.TemporaryDirectory(prefix="torchat-avx2-") if args.avx2_emulated else None
    if hook_dir:
        from avx2_emulation import emulation_environment

        env = emulation_environment(Path(hook_dir.name))
        jobs = [{**job, "env": env} for job in jobs]
        if args.output == OUT:
            args.output = OUT.with_name("scaling-avx2-emulated")
    if args.wait_quiet:
        wait_for_quiet(CONTENDED, args.wait_quiet)
    bandwidth = measure_bandwidth(args.threads)
    print(f"scaling: {len(jobs)} jobs, read bandwidth {bandwidth} GB/s", file=sys.stderr, flush=True)
    results = []
    if args.merge and (args.output / "scaling.json").is_file():
        rerun = {(job["model"], job["label"]) for job in jobs}
        results = [r for r in json.loads((args.output / "scaling.json").read_text())["results"]
                   if (r["model"], r["label"]) not in rerun]
    planned = len(results) + len(jobs)
    with tempfile.TemporaryDirectory(prefix="torchat-scaling-") as scratch:
        for job in jobs:  # the report is rewritten after each job: a series cut short keeps what it measured
            if args.wait_quiet:
                wait_for_quiet(CONTENDED, args.wait_quiet)
            results.append(run_child({**job, "bandwidth_gb_s": bandwidth}, Path(scratch)))
            report = write_report(results, args, bandwidth, planned)
    print(render(report))
    return 0 if all("error" not in r for r in results) else 1


if __name__ == "__main__":
    sys.exit(main())
