"""One rank of tests/test_parallel.py's launches: `python tests/parallel_worker.py JOB.json OUT_DIR`, started N times
with torchrun's environment (torchat.parallel.launch.rank_environment).

JOB.json: {"cases": [{"name", "source" (ModelSource.to_dict()), "prompt" (token ids), "steps"}], "die_rank": int?}.
Every rank loads each case's model (torchat.parallel.load_rank); rank 0 leads a greedy generation and saves its
tokens and logits to OUT_DIR/<name>.pt, the others follow. With "die_rank", that rank exits abruptly after loading
the first case, and rank 0 writes the error it gets to OUT_DIR/error.txt.
"""

import json
import os
import sys
from pathlib import Path

import torch


def greedy(text_model, prompt: list[int], steps: int) -> tuple[list[int], torch.Tensor]:
    """`steps` greedy tokens after `prompt` and the logits each was chosen from, (steps, vocab)."""
    from torchat.generate import decode_one_token, prefill

    logits, tokens = [prefill(text_model, prompt, 0)], []
    for pos in range(len(prompt), len(prompt) + steps):
        tokens.append(int(logits[-1].argmax()))
        if len(tokens) < steps:
            logits.append(decode_one_token(text_model, tokens[-1], pos))
    return tokens, torch.stack(logits)


def main(job_path: str, out: str) -> int:
    import torch.distributed as dist

    from torchat.errors import TorchatError
    from torchat.model_source import ModelSource
    from torchat.parallel import load_rank
    from torchat.parallel.runtime import LeaderModel, follow

    job = json.loads(Path(job_path).read_text())
    rank = int(os.environ["RANK"])
    for case in job["cases"]:
        rank_model = load_rank(ModelSource.from_dict(case["source"]))
        if job.get("die_rank") == rank:
            os._exit(3)
        if rank != 0:
            follow(rank_model.text_model, rank_model.control)
            continue
        leader = LeaderModel(rank_model.text_model, rank_model.control)
        try:
            tokens, logits = greedy(leader, case["prompt"], case["steps"])
        except TorchatError as error:
            (Path(out) / "error.txt").write_text(str(error))
            return 1
        leader.close()
        torch.save({"tokens": tokens, "logits": logits, "plan": rank_model.plan.describe(),
                    "quant": rank_model.quant_summary}, Path(out) / f"{case['name']}.pt")
    dist.destroy_process_group()
    return 0


if __name__ == "__main__":
    sys.exit(main(*sys.argv[1:]))
