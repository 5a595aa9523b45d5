"""`torchat VERB --tp N` run plainly: start N ranks of the same command on 127.0.0.1, as torchrun would.

Each rank gets torchrun's environment (RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR, MASTER_PORT) and, unless the user
set OMP_NUM_THREADS, an equal share of the cores. Rank 0 keeps the terminal (stdin, stdout); the others' stdout and
stdin are closed, their stderr shown. When a rank fails the launcher stops the others and says which one failed.
Imports the standard library only.
"""

import os
import signal
import socket
import subprocess
import sys
import time

STOP_GRACE_S = 5.0


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def rank_environment(rank: int, world: int, port: int, threads: int | None) -> dict[str, str]:
    env = dict(os.environ, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
               MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if threads is not None and "OMP_NUM_THREADS" not in os.environ:
        env["OMP_NUM_THREADS"] = str(threads)
    return env


def spawn_ranks(argv: list[str], world: int, device: str = "cpu") -> int:
    """Run `python -m torchat *argv` as ranks 0..world-1; the exit status is the first failing rank's (else 0)."""
    port = free_port()
    threads = max(1, (os.cpu_count() or 1) // world) if device == "cpu" else None
    ranks = []
    for rank in range(world):
        quiet = subprocess.DEVNULL if rank else None
        ranks.append(subprocess.Popen([sys.executable, "-m", "torchat", *argv], env=rank_environment(
            rank, world, port, threads), stdin=quiet, stdout=quiet))
    # Ctrl-C reaches every process of the terminal: rank 0 decides (chat stops an answer, generate ends, and the
    # followers leave when it does); set after the start, as an ignored signal would be inherited
    previous = signal.signal(signal.SIGINT, signal.SIG_IGN)
    previous_term = signal.signal(signal.SIGTERM, _terminated)  # `kill LAUNCHER` stops the ranks too
    try:
        while True:
            codes = [p.poll() for p in ranks]
            failed = next((r for r, code in enumerate(codes) if code not in (None, 0)), None)
            if failed is not None:
                stopped = _stop(ranks)
                print(f"torchat: rank {failed} of {world} exited with status {codes[failed]}; stopped the other "
                      f"{stopped} rank(s)", file=sys.stderr)
                return codes[failed] if codes[failed] > 0 else 1
            if all(code == 0 for code in codes):
                return 0
            time.sleep(0.05)
    except _Terminated:
        _stop(ranks)
        return 128 + signal.SIGTERM
    finally:
        signal.signal(signal.SIGINT, previous)
        signal.signal(signal.SIGTERM, previous_term)


class _Terminated(Exception):
    pass


def _terminated(signum, frame):
    raise _Terminated


def _stop(ranks: list[subprocess.Popen]) -> int:
    """Terminate the ranks still running (SIGTERM, then SIGKILL after a grace period) -> how many there were."""
    running = [p for p in ranks if p.poll() is None]
    for p in running:
        p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + STOP_GRACE_S
    for p in running:
        try:
            p.wait(max(0.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
    return len(running)
