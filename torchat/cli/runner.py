"""`torchat runner`: build a C++ runner (torchat.runner_build) into --output-dir."""

import argparse
import time
from pathlib import Path


def add_arguments(parser: argparse.ArgumentParser, verb: str) -> None:
    from torchat.runner_build import PROJECTS

    parser.add_argument("--backend", required=True, choices=sorted(PROJECTS))
    parser.add_argument("--output-dir", type=Path, required=True, help="where run (and tokenize) are written")


def run(args: argparse.Namespace) -> int:
    from torchat.runner_build import build_runner

    start = time.perf_counter()
    built = build_runner(args.backend, args.output_dir)
    print(f"built {', '.join(str(p) for p in built)} in {time.perf_counter() - start:.0f} s")
    return 0
