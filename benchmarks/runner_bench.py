"""C++ runner tok/s against the same artifact loaded from Python (`torchat generate --*-path`'s code path).

For each SmolLM2-135M artifact (fp32 .pt2 and .pte, and 8da4w .pte; exported once and cached by content, see
benchmarks/bench_exports.py) it generates NEW greedy tokens after the same prompt:
    python   the artifact loaded once with torchat.exported.load_exported; one untimed warm-up generation, then
             RUNS timed generations (GenerationStats: prefill tok/s, decode tok/s)
    runner   RUNS fresh processes of runner-aoti / runner-et (`run MODEL -z tokenizer.bin -i PROMPT -n NEW`); their
             own stats line (prefill and decode, model loading excluded) and the process's wall time
Both generate the same ids (checked). Medians are reported. The CPU is shared with other engineers here: the
others' share of the machine during each measurement comes from /proc/stat (all busy time less this process's and
its children's), and is reported next to each number.

    python benchmarks/runner_bench.py [--runs 3] [--new 64] [--output benchmarks/results/runner]
"""

import argparse
import json
import os
import platform
import re
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))
sys.path.insert(0, str(ROOT / "tests" / "runner"))

PROMPT = "The history of the printing press begins"
MAX_SEQ_LEN = 128  # the flags the SmolLM2 end-to-end tests export with: their cached artifacts are shared
ARTIFACTS = [("fp32 .pt2", ".pt2", []), ("fp32 .pte", ".pte", []),
             ("8da4w .pte", ".pte", ["--quant", '{"linear:a8w4dq": {"groupsize": 32}}'])]
STATS = re.compile(r"prefill ([\d.]+) tok/s; generated (\d+) tok, decode ([\d.]+) tok/s")


class CpuShare:
    """The others' share of all CPUs between start() and stop(): busy jiffies less this process tree's CPU time."""

    def start(self):
        self.stat, self.ours = self._stat(), self._ours()

    def stop(self) -> float:
        (busy0, total0), (busy1, total1) = self.stat, self._stat()
        tick = os.sysconf("SC_CLK_TCK")
        ours = (self._ours() - self.ours) * tick
        return max(0.0, (busy1 - busy0 - ours) / max(total1 - total0, 1))

    @staticmethod
    def _stat() -> tuple[int, int]:
        fields = [int(x) for x in Path("/proc/stat").read_text().splitlines()[0].split()[1:]]
        idle = fields[3] + fields[4]
        return sum(fields) - idle, sum(fields)

    @staticmethod
    def _ours() -> float:
        me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def python_runs(artifact: Path, tokenizer, new: int, runs: int) -> tuple[list[int], list[dict]]:
    from torchat.exported import load_exported
    from torchat.generate import GenerationStats, Sampling, generate

    model = load_exported(artifact)
    prompt = tokenizer.encode(PROMPT, bos=tokenizer.add_bos)
    list(generate(model, prompt, new, Sampling()))  # warm-up: the AOTI first run is slow
    results, ids = [], None
    for _ in range(runs):
        share, stats = CpuShare(), GenerationStats()
        share.start()
        ids = list(generate(model, prompt, new, Sampling(), stats=stats))
        results.append({"prefill": stats.prefill_tok_s, "decode": stats.decode_tok_s, "tokens": len(ids),
                        "others": share.stop()})
    return ids, results


def runner_runs(binary: Path, artifact: Path, tokenizer_bin: Path, new: int, runs: int) -> tuple[list, list]:
    results, ids = [], None
    for _ in range(runs):
        share = CpuShare()
        share.start()
        start = time.perf_counter()
        out = subprocess.run([str(binary), str(artifact), "-z", str(tokenizer_bin), "-i", PROMPT, "-n", str(new),
                              "-o", "ids"], capture_output=True, text=True, check=True)
        wall = time.perf_counter() - start
        match = STATS.search(out.stderr)
        ids = [int(x) for x in out.stdout.split()]
        results.append({"prefill": float(match[1]), "decode": float(match[3]), "tokens": int(match[2]),
                        "wall_s": wall, "others": share.stop()})
    return ids, results


def median(results: list[dict], key: str) -> float:
    return statistics.median(r[key] for r in results)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "runner")
    args = parser.parse_args()

    from conftest import cached_runner
    from runner_fixtures import write_tokenizer_bin
    from bench_exports import cached_export

    from torchat.assets import fetch_asset
    from torchat.tokenizers import load_tokenizer

    gguf = fetch_asset("smollm2-135m-gguf")
    tokenizer = load_tokenizer(gguf)
    scratch = Path(tempfile.mkdtemp(prefix="runner-bench-"))
    tokenizer_bin = write_tokenizer_bin(gguf, scratch / "tokenizer.bin")
    rows = []
    for label, suffix, flags in ARTIFACTS:
        try:
            artifact, _ = cached_export(gguf, suffix, ["--max-seq-length", str(MAX_SEQ_LEN), *flags])
        except AssertionError:  # the export's own parity check refused it (its reason is on stderr above)
            rows.append({"artifact": label, "error": "export refused by its parity check"})
            continue
        binary = cached_runner("et" if suffix == ".pte" else "aoti") / "run"
        py_ids, py = python_runs(artifact, tokenizer, args.new, args.runs)
        cpp_ids, cpp = runner_runs(binary, artifact, tokenizer_bin, args.new, args.runs)
        rows.append({"artifact": label, "same_ids": py_ids == cpp_ids, "python": py, "runner": cpp})
        print(f"{label}: python decode {median(py, 'decode'):.1f} tok/s, runner {median(cpp, 'decode'):.1f} tok/s, "
              f"same ids: {py_ids == cpp_ids}", file=sys.stderr)

    machine = {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version(),
               "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())}
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps({"machine": machine, "prompt": PROMPT, "new": args.new,
                                                            "runs": args.runs, "rows": rows}, indent=1) + "\n")
    lines = [f"# C++ runners vs the Python loader, SmolLM2-135M-Instruct, {args.new} greedy tokens",
             "", f"{machine['date']}, {machine['cpus']} CPUs ({machine['platform']}), median of {args.runs} runs; "
             "`python benchmarks/runner_bench.py`. Prefill/decode tok/s exclude model loading; the runner's wall "
             "time is a whole process (load, prefill, decode). Python had one warm-up generation, each runner "
             "process is cold (AOTI's first call is slow). \"others\" is the share of the machine's CPU that other "
             "processes used during the measurement (the machine is shared).", "",
             "| artifact | Python prefill tok/s | Python decode tok/s | runner prefill tok/s | runner decode tok/s "
             "| runner / Python decode | runner process wall s | same ids | others' CPU share |",
             "|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        if "error" in row:
            lines.append(f"| {row['artifact']} | {row['error']} ||||||||")
            continue
        py, cpp = row["python"], row["runner"]
        others = max(median(py, "others"), median(cpp, "others"))
        lines.append(f"| {row['artifact']} | {median(py, 'prefill'):.0f} | {median(py, 'decode'):.1f} | "
                     f"{median(cpp, 'prefill'):.0f} | {median(cpp, 'decode'):.1f} | "
                     f"{median(cpp, 'decode') / median(py, 'decode'):.2f}x | {median(cpp, 'wall_s'):.2f} | "
                     f"{'yes' if row['same_ids'] else 'NO'} | {others:.0%} |")
    args.output.with_suffix(".md").write_text("\n".join(lines) + "\n")
    print(args.output.with_suffix(".md").read_text())
    return 0 if all(row.get("same_ids", True) for row in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
