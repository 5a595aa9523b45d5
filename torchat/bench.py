"""Measurement: prefill and decode speed, time to first token, peak memory and size of one model, and the roofline.

    prompt = bench_prompt(tokenizer, 128)
    result = bench_text_model(model, prompt, BenchConfig(new_tokens=128, runs=3), labels)   # -> dict (JSON)

A result holds every timed run and their median/min/max; the warm-up runs (compilation happens there) are
timed apart. Benchmarks on a small shared CPU are only valid when nothing else runs: each run records the
share of the machine's CPU time that other processes used (from /proc/stat), and a run above
`BenchConfig.max_others_cpu` marks the result contended. The roofline is the decode speed that memory
bandwidth allows when each token reads every weight once: bandwidth / weight bytes per token.

Standard library plus torch (imported where needed); peers (llama.cpp, transformers) live in torchat.peers.
"""

import json
import os
import platform
import resource
import statistics
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from torchat.errors import TorchatError

SCHEMA = 1
CONTENDED = 0.10  # others' share of all CPU time above which a run is not a valid measurement


@dataclass(frozen=True)
class BenchConfig:
    prompt_tokens: int = 128
    new_tokens: int = 128
    runs: int = 3
    warmup_runs: int = 1
    max_others_cpu: float = CONTENDED


class CpuShare:
    """Others' share of the machine's CPU time since construction: (busy jiffies - ours) / all jiffies."""

    def __init__(self):
        self.start = self._read()

    @staticmethod
    def _read() -> tuple[int, int, int]:
        fields = [int(v) for v in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]  # idle + iowait
        stat = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        ours = sum(int(v) for v in stat[11:15])  # utime, stime, cutime, cstime (children: peers in subprocesses)
        return sum(fields[:8]), sum(fields[:8]) - idle, ours

    def others(self) -> float:
        total, busy, ours = (b - a for a, b in zip(self.start, self._read()))
        return round(max(busy - ours, 0) / max(total, 1), 3)


def others_cpu_now(seconds: float = 2.0) -> float:
    """Others' CPU share over the next `seconds` (we sleep meanwhile)."""
    share = CpuShare()
    time.sleep(seconds)
    return share.others()


def wait_for_quiet(limit: float = CONTENDED, timeout_s: float = 0.0, probe_s: float = 2.0) -> float:
    """Wait (up to timeout_s) until others use less than `limit` of the CPU; returns the last share seen."""
    deadline = time.monotonic() + timeout_s
    while True:
        share = others_cpu_now(probe_s)
        if share < limit or time.monotonic() >= deadline:
            return share


def summarize(values: list[float], digits: int = 3) -> dict:
    return {"median": round(statistics.median(values), digits), "min": round(min(values), digits),
            "max": round(max(values), digits), "runs": [round(v, digits) for v in values]}


def peak_rss_mib() -> float:
    """This process's peak resident set (children excluded).

    Linux: VmHWM of /proc/self/status, which starts afresh at exec; ru_maxrss would not (it keeps the high-water
    mark of the process that forked us, so every measurement process reported its parent's 2.8 GiB).
    """
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return round(int(line.split()[1]) / 1024, 1)
    except OSError:
        pass
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / (1024 if sys.platform != "darwin" else 2**20), 1)


def host_info() -> dict:
    model = ""
    flags = set()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name") and not model:
                model = line.split(":", 1)[1].strip()
            elif line.startswith("flags") and not flags:
                flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    isa = [f for f in ("avx2", "fma", "avx512f", "avx512_bf16", "amx_tile", "neon", "asimd") if f in flags]
    return {"cpu": model or platform.processor(), "cores": os.cpu_count(), "isa": isa,
            "machine": platform.machine(), "os": platform.system(), "python": platform.python_version()}


def toolchain_info() -> dict:
    from importlib import metadata

    versions = {}
    for dist in ("torch", "torchao", "executorch", "llama_cpp_python", "transformers"):
        try:
            versions[dist] = metadata.version(dist)
        except metadata.PackageNotFoundError:
            pass
    return versions


# --- memory bandwidth and the roofline -----------------------------------------------------------------------

def measure_bandwidth(threads: int | None = None, mib: int = 512, repeats: int = 5, device: str = "cpu") -> float:
    """Memory read bandwidth in GB/s (DRAM, or HBM on cuda): the best of `repeats` full reductions of a buffer
    far larger than the caches."""
    import torch

    previous = torch.get_num_threads()
    if threads:
        torch.set_num_threads(threads)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    try:
        x = torch.ones(mib * 2**20 // 4, dtype=torch.float32, device=device)
        x.sum()  # touch every page first
        best = float("inf")
        for _ in range(repeats):
            sync()
            start = time.perf_counter()
            x.sum()
            sync()
            best = min(best, time.perf_counter() - start)
        return round(x.numel() * 4 / best / 1e9, 2)
    finally:
        torch.set_num_threads(previous)


def linear_shapes(model_args: dict) -> list[tuple[int, int]]:
    """(out, in) of every matrix one token multiplies through, the output head included."""
    dim, heads, hidden = model_args["dim"], model_args["n_heads"], model_args["hidden_dim"]
    kv_heads = model_args.get("n_kv_heads") or heads
    head_dim = dim // heads
    layer = [(heads * head_dim, dim), (kv_heads * head_dim, dim), (kv_heads * head_dim, dim), (dim, heads * head_dim),
             (hidden, dim), (dim, hidden), (hidden, dim)]
    return layer * model_args["n_layers"] + [(model_args["vocab_size"], dim)]


DTYPE_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}


def _padded(n: int, group: int) -> int:
    return n if not group else -(-n // group) * group


EIGHT_BIT_LINEARS = ("linear:int8", "linear:8da8w")  # 8-bit weights: their peer is llama.cpp's Q8_0


def weight_bytes_per_token(model_args: dict, quant: list[dict], dtype: str) -> int:
    """Bytes of weights one decode step reads, in the form the kernels read them (codes plus scales).

    quant: the specs as dicts ({"scheme", "options"}), in the order quantize_model applies them: the first linear
    scheme quantizes every linear, the output head included (head_bitwidth 8: the head as 8da8w). The
    embedding lookup reads one row: not counted (a tied head reads the whole table, counted as the head). Scales
    per group or row: int4's scale and zero and the asymmetric 8da4w grid's scale and offset as two fp16 (torchat's
    4-bit kernels; tinygemm's bf16 pair on CUDA is as large), 8da8w's row scale fp32 (linear_q8), int8 weight-only's
    and the symmetric 8da4w grid's in the model's dtype.
    """
    specs = [(s["scheme"], s.get("options", {})) for s in quant]
    for scheme, options in specs:
        if scheme == "precision":
            dtype = options["dtype"]
    float_bytes = DTYPE_BYTES[dtype]
    linear = next(((s, o) for s, o in specs if s.startswith("linear:")), None)
    shapes = linear_shapes(model_args)
    total = 0
    for index, (out_features, in_features) in enumerate(shapes):
        if linear is None:
            total += out_features * in_features * float_bytes
            continue
        scheme, options = linear
        if index == len(shapes) - 1 and options.get("head_bitwidth") == 8:  # int4 or 8da4w with an 8-bit head
            scheme, options = "linear:8da8w", {}
        group = options.get("group_size", 0) if scheme != "linear:8da8w" else 0
        padded = _padded(in_features, group)
        groups = 1 if not group else padded // group
        if scheme == "linear:8da8w":
            total += out_features * padded + out_features * 4
        elif scheme in EIGHT_BIT_LINEARS:
            total += out_features * padded + out_features * groups * float_bytes
        elif scheme == "linear:8da4w" and options.get("grid") != "asymmetric":
            total += out_features * padded // 2 + out_features * groups * float_bytes
        else:  # int4 weight-only (int4, gptq, hqq) and the asymmetric 8da4w grid: codes, two fp16 per group
            total += out_features * padded // 2 + out_features * groups * 2 * 2
    return total


def roofline(decode_tok_s: dict, weight_bytes: int, bandwidth_gb_s: float) -> dict:
    """The decode ceiling bandwidth / bytes per token, and each run's fraction of it."""
    ceiling = bandwidth_gb_s * 1e9 / weight_bytes
    return {"bandwidth_gb_s": bandwidth_gb_s, "weight_bytes_per_token": weight_bytes,
            "ceiling_tok_s": round(ceiling, 1),
            "fraction": {k: (round(v / ceiling, 3) if k != "runs" else [round(r / ceiling, 3) for r in v])
                         for k, v in decode_tok_s.items()}}


# --- timing one TextModel ------------------------------------------------------------------------------------

def bench_prompt(tokenizer, prompt_tokens: int) -> list[int]:
    """`prompt_tokens` tokens of English prose (Botchan, public domain), no BOS: the same for every system."""
    from torchat.assets import english_text

    text = " ".join(english_text().split())  # one line of prose: the book wraps its lines at ~70 characters
    start = text.find(". ", len(text) // 3) + 2  # a sentence start in the body, away from the front matter
    tokens = tokenizer.encode(text[start:start + prompt_tokens * 12])
    if len(tokens) < prompt_tokens:
        raise TorchatError(f"the bench text gives only {len(tokens)} tokens; use --prompt-tokens {len(tokens)}")
    return tokens[:prompt_tokens]


@dataclass
class RunTiming:
    prefill_tok_s: float
    decode_tok_s: float
    ttft_s: float
    total_s: float
    others_cpu: float
    tokens: list[int]


def time_generation(model, prompt: list[int], new_tokens: int) -> RunTiming:
    """One greedy generation of exactly `new_tokens` (no stop token), timed by GenerationStats."""
    from torchat.generate import GenerationStats, Sampling, generate

    share = CpuShare()
    stats = GenerationStats()
    tokens = list(generate(model, prompt, new_tokens, Sampling(), stats=stats))
    if len(tokens) != new_tokens:
        raise TorchatError(f"generated {len(tokens)} of {new_tokens} tokens: the KV cache of {model.max_seq_len} "
                           f"is too short for {len(prompt)} + {new_tokens}; lower --new-tokens")
    return RunTiming(stats.prefill_tok_s, stats.decode_tok_s, stats.time_to_first_token, stats.end - stats.start,
                     share.others(), tokens)


def bench_text_model(model, prompt: list[int], config: BenchConfig, labels: dict, *,
                     weight_bytes: int | None = None, bandwidth_gb_s: float | None = None,
                     artifact_bytes: int | None = None, load_s: float | None = None) -> dict:
    """Warm-up runs, then `config.runs` timed runs of prefill + decode; the result as a JSON-ready dict.

    labels: what was measured (system, mode, model, quant, dtype, ...), copied into the result.
    """
    import torch

    warmup = [time_generation(model, prompt, config.new_tokens) for _ in range(config.warmup_runs)]
    runs = [time_generation(model, prompt, config.new_tokens) for _ in range(config.runs)]
    decode = summarize([r.decode_tok_s for r in runs], 2)
    result = {
        "schema": SCHEMA, **labels,
        "threads": labels.get("threads", torch.get_num_threads()),
        "config": asdict(config),
        "prompt_tokens": len(prompt), "new_tokens": config.new_tokens,
        "prefill_tok_s": summarize([r.prefill_tok_s for r in runs], 1),
        "decode_tok_s": decode,
        "ttft_s": summarize([r.ttft_s for r in runs], 4),
        "warmup_s": [round(r.total_s, 2) for r in warmup],
        "load_s": None if load_s is None else round(load_s, 2),
        "peak_rss_mib": peak_rss_mib(),
        "artifact_bytes": artifact_bytes,
        "others_cpu": summarize([r.others_cpu for r in runs], 3),
        "contended": max(r.others_cpu for r in runs) > config.max_others_cpu,
        # greedy decoding: every run of one system must give the same tokens; across systems they may differ
        "tokens_agree": all(r.tokens == runs[0].tokens for r in [*warmup, *runs]),
        "tokens_head": runs[0].tokens[:16],
        "host": host_info(), "toolchain": toolchain_info(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
    }
    if weight_bytes and bandwidth_gb_s:
        result["roofline"] = roofline(decode, weight_bytes, bandwidth_gb_s)
    return result


def path_bytes(path: Path) -> int:
    """Size of a file, or of every file under a directory."""
    path = Path(path)
    if path.is_file():
        return path.stat().st_size
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def write_json(path: Path, value) -> None:
    tmp = Path(path).with_suffix(".json.part")
    tmp.write_text(json.dumps(value, indent=1) + "\n")
    os.replace(tmp, path)


# --- reports ----------------------------------------------------------------------------------------------

MODE_COLUMNS = {"eager": "eager", "compile": "eager + compile", "aoti": "AOT compile", "et": "ET Runtime"}


def _cell(stat: dict | None, digits: int = 1) -> str:
    if not stat:
        return "-"
    return f"{stat['median']:.{digits}f} ({stat['min']:.{digits}f}–{stat['max']:.{digits}f})"


def label_of(result: dict) -> str:
    if result["system"] != "torchat":
        return f"{result['system']} {result.get('quant', '')}".strip()
    context = f" (KV cache {result['max_seq_len']})" if result.get("max_seq_len") else ""
    return f"torchat {MODE_COLUMNS.get(result['mode'], result['mode'])} {result.get('quant', '')}".strip() + context


def peer_for(result: dict, results: list[dict]) -> dict | None:
    """The peer result of the same precision class (int4 vs Q4_1, int8 vs Q8_0, float vs transformers)."""
    wanted = result.get("precision")
    for system in ("llama.cpp", "transformers"):
        for peer in results:
            if peer["system"] == system and peer.get("precision") == wanted and "decode_tok_s" in peer:
                return peer
    if wanted in ("fp32", "bf16", "fp16"):  # a float model against the float peer whatever its dtype
        return next((p for p in results if p["system"] == "transformers" and "decode_tok_s" in p), None)
    return None


def ratios(results: list[dict]) -> list[dict]:
    """Our decode and prefill medians over the matching peer's."""
    out = []
    for result in results:
        if result["system"] != "torchat" or "decode_tok_s" not in result:
            continue
        peer = peer_for(result, results)
        if peer is None:
            continue
        out.append({"ours": label_of(result), "peer": label_of(peer),
                    "decode": round(result["decode_tok_s"]["median"] / peer["decode_tok_s"]["median"], 2),
                    "prefill": round(result["prefill_tok_s"]["median"] / peer["prefill_tok_s"]["median"], 2)})
    return out


def results_table(results: list[dict]) -> list[str]:
    lines = ["| system | precision | prefill tok/s | decode tok/s | time to first token ms | peak RSS MiB | "
             "size MiB | roofline | others' CPU | note |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in results:
        if "error" in r:
            lines.append(f"| {label_of(r)} | {r.get('precision', '')} | - | - | - | - | - | - | - | "
                         f"failed: {r['error'][:120]} |")
            continue
        ttft = {k: (v * 1000 if k != "runs" else v) for k, v in r["ttft_s"].items()}
        size = f"{r['artifact_bytes'] / 2**20:.0f}" if r.get("artifact_bytes") else "-"
        roof = r.get("roofline")
        roof_cell = f"{roof['fraction']['median'] * 100:.0f} % of {roof['ceiling_tok_s']:.0f}" if roof else "-"
        notes = [n for n in ("contended" if r["contended"] else "",
                             "" if r["tokens_agree"] else "runs disagree") if n]
        lines.append(f"| {label_of(r)} | {r.get('precision', '')} | {_cell(r['prefill_tok_s'])} | "
                     f"{_cell(r['decode_tok_s'])} | {_cell(ttft, 0)} | {r['peak_rss_mib']:.0f} | {size} | "
                     f"{roof_cell} | {r['others_cpu']['max'] * 100:.0f} % | {', '.join(notes)} |")
    return lines


def seed_table(results: list[dict], precision: str, metric: str = "decode_tok_s") -> list[str]:
    """The seed README's table: hardware × eager / eager + compile / AOT compile / ET Runtime, medians."""
    ours = [r for r in results if r["system"] == "torchat" and r.get("precision") == precision and metric in r]
    if not ours:
        return []
    host = ours[0]["host"]
    cells = []
    for mode in MODE_COLUMNS:
        found = [r for r in ours if r["mode"] == mode]
        best = max(found, key=lambda r: r[metric]["median"]) if found else None
        cells.append(f"{best[metric]['median']:.1f} ({best.get('quant', '')})" if best else "-")
    hardware = f"{host['machine']} {host['cores']} cores ({host['cpu']})"
    return ["| Hardware | OS | eager | eager + compile | AOT compile | ET Runtime |", "|---|---|---|---|---|---|",
            f"| {hardware} | {host['os']} | " + " | ".join(cells) + " |"]


def render_markdown(results: list[dict], title: str = "torchat bench") -> str:
    if not results:
        return f"# {title}\n\nno results\n"
    first = next((r for r in results if "host" in r), results[0])
    lines = [f"# {title}", ""]
    if "host" in first:
        host = first["host"]
        lines += [f"{host['cpu']}, {host['cores']} cores ({', '.join(host['isa'])}), {host['os']}; "
                  f"{first['threads']} threads; prompt {first['prompt_tokens']} tokens, then "
                  f"{first['new_tokens']} greedy tokens; {first['config']['runs']} timed runs after "
                  f"{first['config']['warmup_runs']} warm-up; median (min–max). Toolchain: "
                  + ", ".join(f"{k} {v}" for k, v in first["toolchain"].items()) + ".", ""]
    lines += results_table(results)
    made = ratios(results)
    if made:
        lines += ["", "Ratios against the peer of the same precision (medians; > 1 means torchat is faster):", "",
                  "| torchat | peer | decode | prefill |", "|---|---|---|---|"]
        lines += [f"| {r['ours']} | {r['peer']} | {r['decode']:.2f}× | {r['prefill']:.2f}× |" for r in made]
    roof = [r for r in results if r.get("roofline")]
    if roof:
        r0 = roof[0]["roofline"]
        lines += ["", f"Roofline: measured read bandwidth {r0['bandwidth_gb_s']} GB/s; a decode step reads every "
                  "weight once (KV cache and activations not counted), so the ceiling is bandwidth ÷ weight bytes "
                  "per token."]
    if any(r.get("contended") for r in results):
        lines += ["", f"**Contended**: other processes used more than {CONTENDED * 100:.0f} % of the CPU during a "
                  "run marked so; its figures understate the speed. Rerun on a quiet machine."]
    return "\n".join(lines) + "\n"


def plot_results(results: list[dict], path: Path, title: str = "torchat bench") -> bool:
    """A bar chart of prefill and decode medians (min–max whiskers); False when matplotlib is absent."""
    try:
        import matplotlib
    except ImportError:
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [r for r in results if "decode_tok_s" in r]
    if not shown:
        return False
    labels = [label_of(r) for r in shown]
    fig, axes = plt.subplots(1, 2, figsize=(12, 0.45 * len(shown) + 1.5), sharey=True)
    for ax, metric, name in ((axes[0], "prefill_tok_s", "prefill tok/s"), (axes[1], "decode_tok_s", "decode tok/s")):
        med = [r[metric]["median"] for r in shown]
        err = [[m - r[metric]["min"] for m, r in zip(med, shown)], [r[metric]["max"] - m for m, r in zip(med, shown)]]
        colors = ["tab:blue" if r["system"] == "torchat" else "tab:gray" for r in shown]
        ax.barh(range(len(shown)), med, xerr=err, color=colors)
        ax.set_xlabel(name)
        for i, r in enumerate(shown):
            if metric == "decode_tok_s" and r.get("roofline"):
                ax.plot(r["roofline"]["ceiling_tok_s"], i, "k|", markersize=12)
    axes[0].set_yticks(range(len(shown)), labels)
    axes[0].invert_yaxis()
    fig.suptitle(f"{title} (gray: peers; |: bandwidth ceiling)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True
