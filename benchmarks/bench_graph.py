"""How fast the build graph decides that there is nothing to do.

Runs against the checked-in targets/ (the real matrix) with a private artifact store and doit database in a
temp dir and a frozen copy of torchat/ + dodo.py (code digests are part of the keys, and the checkout changes
while others work in it). The store is filled once by building every matrix target with a stand-in CLI that
writes a few bytes per step (it cannot download the hub models here); then it times:

    doit list / doit list --all          (and checks that no heavy module was imported)
    doit build:<one target>              all up to date
    doit build                           the whole matrix, all up to date

    python benchmarks/bench_graph.py [--runs 5] [--output benchmarks/results/graph.md]
"""

import argparse
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
HEAVY = ("torch", "torchao", "executorch", "numpy", "safetensors", "gguf")
STUB = '''import os, sys
from pathlib import Path
args = sys.argv[2:]
options = {a: b for a, b in zip(args, args[1:]) if a.startswith("--")}
out = options.get("--output-dir")
if out is None:
    out_file = Path(next(v for k, v in options.items() if k.startswith("--output")))
    out, name = out_file.parent, out_file.name
else:
    name = "model.safetensors"
Path(out).mkdir(parents=True, exist_ok=True)
(Path(out) / name).write_bytes(repr(sorted(options.items())).encode())
'''


def timed(command: list[str], env: dict, runs: int) -> tuple[list[float], subprocess.CompletedProcess]:
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = subprocess.run(command, env=env, capture_output=True, text=True)
        times.append(time.perf_counter() - start)
        if result.returncode:
            raise SystemExit(f"{' '.join(command)} failed:\n{result.stdout}\n{result.stderr}")
    return times, result


def summary(times: list[float]) -> str:
    return f"{statistics.median(times) * 1000:.0f} ms (min {min(times) * 1000:.0f}, max {max(times) * 1000:.0f})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--output", type=Path, default=ROOT / "benchmarks" / "results" / "graph.md")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        shutil.copytree(ROOT / "torchat", tmp / "repo" / "torchat", ignore=shutil.ignore_patterns("__pycache__"))
        shutil.copy(ROOT / "dodo.py", tmp / "repo" / "dodo.py")
        (tmp / "stub.py").write_text(STUB)
        env = {**os.environ, "PYTHONPATH": str(tmp / "repo"), "TORCHAT_TARGETS_DIR": str(ROOT / "targets"),
               "TORCHAT_ARTIFACTS": str(tmp / "artifacts"), "TORCHAT_DOIT_DB": str(tmp / "doit.db"),
               "TORCHAT_STEP_CLI": f"{sys.executable} {tmp / 'stub.py'}", "TORCHAT_ALLOW_UNPINNED": "1"}
        doit = [sys.executable, "-m", "doit", "-f", str(tmp / "repo" / "dodo.py")]

        probe = ("import sys\nfrom doit.doit_cmd import DoitMain\nfrom doit.cmd_base import DodoTaskLoader\n"
                 f"DoitMain(DodoTaskLoader()).run(['-f', {str(tmp / 'repo' / 'dodo.py')!r}, 'list', '--all'])\n"
                 f"print(sorted(m for m in sys.modules if m.split('.')[0] in {HEAVY!r}))\n")
        heavy = subprocess.run([sys.executable, "-c", probe], env=env, capture_output=True, text=True)
        heavy_modules = heavy.stdout.strip().splitlines()[-1]

        list_times, _ = timed([*doit, "list"], env, args.runs)
        list_all_times, listed = timed([*doit, "list", "--all"], env, args.runs)
        n_targets = sum(line.startswith("build:") for line in listed.stdout.splitlines())
        n_tasks = len(listed.stdout.splitlines())

        start = time.perf_counter()
        first, _ = timed([*doit, "-n", "2", "build"], env, 1)
        first_build = time.perf_counter() - start
        one = "build:smollm2-135m-int4-aoti"
        one_times, one_result = timed([*doit, one], env, args.runs)
        all_times, all_result = timed([*doit, "build"], env, args.runs)
        executed = [line for line in all_result.stdout.splitlines() if line.startswith(".  ")]
        up_to_date = [line for line in all_result.stdout.splitlines() if line.startswith("-- ")]
        n_artifacts = sum(1 for d in (tmp / "artifacts").glob("*/*") if not d.name.startswith("."))

    lines = [
        "# Build graph: no-op timings",
        "",
        f"`python benchmarks/bench_graph.py --runs {args.runs}` on {platform.node() or 'this machine'} "
        f"({os.cpu_count()} cores, shared with other work: load average "
        f"{', '.join(f'{x:.2f}' for x in os.getloadavg())} at the end), Python {platform.python_version()}, "
        "doit sqlite3 backend. Median of the runs (min, max); each run is a fresh `python -m doit` process.",
        "",
        f"Matrix: {n_targets} targets, {n_tasks} declared tasks; the `build` closure holds {n_artifacts} artifacts "
        "(download, convert, quantize, build), filled by a stand-in CLI that writes a few bytes per step.",
        "",
        "| what | time | limit |",
        "|---|---|---|",
        f"| `doit list` | {summary(list_times)} | |",
        f"| `doit list --all` | {summary(list_all_times)} | |",
        f"| `doit {one}`, all up to date ({len(one_result.stdout.splitlines())} tasks) | {summary(one_times)} "
        "| < 2 s |",
        f"| `doit build`, the whole matrix up to date ({len(up_to_date)} tasks, {len(executed)} executed) | "
        f"{summary(all_times)} | < 1 s |",
        f"| `doit -n 2 build`, first build of the whole matrix with the stand-in CLI | {first_build:.1f} s | |",
        "",
        f"Heavy modules imported by `doit list --all` (of {', '.join(HEAVY)}): {heavy_modules}",
        "",
    ]
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text("\n".join(lines))
    print("\n".join(lines))
    assert not executed, executed


if __name__ == "__main__":
    main()
