"""Cold start: from the command to the first generated token, in a fresh process each time.

Each row is the wall time of one command that generates one token after a short prompt and exits (median of
--runs, each a new process; the OS file cache is warm after the first):
    eager        python -m torchat generate --prompt P --max-new-tokens 1           (the default model: SmolLM2's GGUF)
    .pt2         python -m torchat generate --aoti-package-path X.pt2 ...
    .pte         python -m torchat generate --pte-path X.pte ...
    runner-et    run X.pte -z tokenizer.bin -i P -n 1                                (the C++ runner, if built)
    runner-aoti  run X.pt2 -z tokenizer.bin -i P -n 1
    llama.cpp    llama-cpp-python on the GGUF, Llama(...) then one token              (only if llama_cpp is installed)
and the imports underneath: python itself, `import torch`, the .pte loading path as torchat runs it
(torchat.kernels.load_pte_runtime: the pybindings' C extension and the kernel libraries) and, for comparison, the
executorch wheel's own Python modules for the same (portable_lib, kernels.quantized, the llm custom_ops), which
import its compiler.

The .pt2 and .pte are SmolLM2 exported with `python -m torchat export --gguf-path GGUF --output-path X
--max-seq-length 128` into --artifacts-dir (kept there and reused; minutes each on 2 cores), unless passed with
--pt2/--pte. The runners are --runner-et/--runner-aoti, else the ones the tests built under $TORCHAT_CACHE/runners.
Writes cold_start.json and cold_start.md into --output, naming the machine (lscpu's model name, avx512f or not);
each row also gives the processes' CPU seconds and the other processes' share of the CPU meanwhile (this machine is
shared, and waiting for a core inflates wall time, not CPU time).

    python benchmarks/cold_start.py [--runs 3] [--artifacts-dir DIR] [--output benchmarks/results/cold_start]
"""

import argparse
import importlib.util
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from torchat.assets import fetch_asset  # noqa: E402  (standard library only: no torch in this process)
from torchat.bench import CpuShare, host_info, toolchain_info  # noqa: E402
from torchat.sources import cache_dir  # noqa: E402

PROMPT = "The capital of France is"
MAX_SEQ_LEN = 128
PY = sys.executable
PTE_RUNTIME = "from torchat.kernels import load_pte_runtime; load_pte_runtime()"
WHEEL_PTE_MODULES = ("import torch; import executorch.extension.pybindings.portable_lib; "
                     "import executorch.kernels.quantized; import executorch.extension.llm.custom_ops.custom_ops")
LLAMA_CPP = ("import sys; from llama_cpp import Llama; "
             "m = Llama(sys.argv[1], n_ctx=128, verbose=False); m(sys.argv[2], max_tokens=1, temperature=0)")


def machine() -> dict:
    """lscpu's model name and whether the CPU has AVX-512, with torchat.bench's host facts."""
    info = host_info()
    try:
        lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        names = [line.split(":", 1)[1].strip() for line in lscpu.splitlines() if line.startswith("Model name")]
        info["lscpu_model_name"] = names[0] if names else ""
    except OSError:
        info["lscpu_model_name"] = ""
    info["avx512f"] = "avx512f" in info["isa"]
    return info


def timed(command: list[str], runs: int, env: dict | None = None) -> dict:
    """Median wall seconds of `runs` fresh processes (one untimed run first: it warms the file cache and any
    one-time build, such as torchat's ExecuTorch kernel library)."""
    def once() -> tuple[float, float]:
        """Wall seconds and the child's CPU seconds (user + system), which contention inflates less."""
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        start = time.perf_counter()
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=ROOT)
        seconds = time.perf_counter() - start
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        if result.returncode != 0:
            tail = (result.stderr.strip().splitlines() or ["no output"])[-1]
            raise SystemExit(f"cold_start: {' '.join(command[:4])}... failed ({tail})")
        return seconds, after.ru_utime + after.ru_stime - before.ru_utime - before.ru_stime

    once()
    share = CpuShare()
    wall, cpu = zip(*(once() for _ in range(runs)))
    return {"median_s": round(statistics.median(wall), 3), "runs_s": [round(s, 3) for s in wall],
            "cpu_s": round(statistics.median(cpu), 3), "others_cpu": share.others(), "command": command}


def export(gguf: Path, output: Path) -> Path:
    """SmolLM2 exported once into the artifacts directory (its tokenizer files land beside it)."""
    if not output.is_file():
        print(f"exporting {output.name} (minutes)...", file=sys.stderr)
        command = [PY, "-m", "torchat", "export", "--gguf-path", str(gguf), "--output-path", str(output),
                   "--max-seq-length", str(MAX_SEQ_LEN)]
        subprocess.run(command, check=True, capture_output=True, cwd=ROOT)
    return output


def find_runner(given: Path | None, backend: str) -> Path | None:
    if given is not None:
        return given
    built = sorted((cache_dir() / "runners").glob(f"*-{backend}/run"), key=lambda p: p.stat().st_mtime)
    return built[-1] if built else None


def tokenizer_bin(artifact: Path) -> Path:
    """The tokenizer.bin the C++ runners read: beside the artifact, written by `torchat tokenizer-bin` if absent."""
    path = artifact.parent / "tokenizer.bin"
    if not path.is_file():
        subprocess.run([PY, "-m", "torchat", "tokenizer-bin", "--tokenizer-path", str(artifact.parent /
                        "tokenizer.gguf"), "--output", str(path)], check=True, capture_output=True, cwd=ROOT)
    return path


def measure(args) -> dict:
    gguf = args.gguf or fetch_asset("smollm2-135m-gguf")
    artifacts = args.artifacts_dir or Path(tempfile.mkdtemp(prefix="cold-start-"))
    artifacts.mkdir(parents=True, exist_ok=True)
    pt2 = args.pt2 or export(gguf, artifacts / "smollm2.pt2")
    pte = args.pte or export(gguf, artifacts / "smollm2.pte")
    generate = [PY, "-m", "torchat", "generate", "--prompt", PROMPT, "--max-new-tokens", "1"]
    rows = {
        "python (no imports)": [PY, "-c", "pass"],
        "import torch": [PY, "-c", "import torch"],
        "import torch + .pte loading path (torchat)": [PY, "-c", f"import torch; {PTE_RUNTIME}"],
        "import torch + executorch's own Python modules for it": [PY, "-c", WHEEL_PTE_MODULES],
        "torchat generate, eager (SmolLM2 GGUF)": generate,
        "torchat generate, .pt2": [*generate, "--aoti-package-path", str(pt2)],
        "torchat generate, .pte": [*generate, "--pte-path", str(pte)],
    }
    for backend, artifact in (("et", pte), ("aoti", pt2)):
        runner = find_runner(getattr(args, f"runner_{backend}"), backend)
        if runner is not None:
            rows[f"runner-{backend}, {artifact.suffix}"] = [str(runner), str(artifact), "-z",
                                                             str(tokenizer_bin(artifact)), "-i", PROMPT, "-n", "1"]
    if importlib.util.find_spec("llama_cpp") is not None:
        rows["llama.cpp (llama-cpp-python), GGUF"] = [PY, "-c", LLAMA_CPP, str(gguf), PROMPT]
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    results = {}
    for name, command in rows.items():
        results[name] = timed(command, args.runs, env)
        row = results[name]
        print(f"{name:<58} {row['median_s']:7.2f} s  (CPU {row['cpu_s']:.2f} s; others' CPU {row['others_cpu']:.0%})",
              file=sys.stderr)
    return {"machine": machine(), "toolchain": toolchain_info(), "runs": args.runs, "prompt": PROMPT,
            "max_seq_len": MAX_SEQ_LEN, "results": results,
            "artifacts": {"gguf": str(gguf), "pt2": str(pt2), "pte": str(pte)}}


def markdown(report: dict) -> str:
    m = report["machine"]
    lines = [f"# Cold start: command to first token ({report['runs']} fresh processes each, median)", "",
             f"CPU: {m['lscpu_model_name'] or m['cpu']} ({m['cores']} cores; avx512f: "
             f"{'yes' if m['avx512f'] else 'no'}); " + ", ".join(f"{k} {v}" for k, v in report["toolchain"].items()),
             "", "| command | median wall s | runs s | median CPU s (user+sys) | others' CPU |",
             "|---|---:|---|---:|---:|"]
    for name, row in report["results"].items():
        lines.append(f"| {name} | {row['median_s']:.2f} | {', '.join(f'{s:.2f}' for s in row['runs_s'])} | "
                     f"{row['cpu_s']:.2f} | {row['others_cpu']:.0%} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--gguf", type=Path, help="default: the SmolLM2 asset")
    parser.add_argument("--pt2", type=Path)
    parser.add_argument("--pte", type=Path)
    parser.add_argument("--artifacts-dir", type=Path, help="where exports are kept and reused (default: a temp dir)")
    parser.add_argument("--runner-et", type=Path)
    parser.add_argument("--runner-aoti", type=Path)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "cold_start")
    args = parser.parse_args()
    report = measure(args)
    args.output.mkdir(parents=True, exist_ok=True)
    (args.output / "cold_start.json").write_text(json.dumps(report, indent=2) + "\n")
    (args.output / "cold_start.md").write_text(markdown(report))
    print(markdown(report))


if __name__ == "__main__":
    main()
