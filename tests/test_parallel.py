"""Tensor parallelism (torchat.parallel) on CPU: gloo, 2 ranks on 127.0.0.1.

One 2-rank launch (tests/parallel_worker.py) runs every parity case: SmolLM2-135M fp32 and int8 (9 heads on 2 ranks:
attention replicated, MLP and vocabulary split), and a tiny GQA model whose 3 KV heads do not divide 2 ranks (heads
split, each KV head repeated twice). Greedy tokens for 64 steps must equal one process's, fp32 logits within 1e-4.
Then the CLI's own launcher, a refused quantization, and a rank that dies.
"""

import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from tiny_model import SMOLLM2_VOCAB_SIZE, tiny_args, tiny_transformer, write_tiny_checkpoint

from torchat.checkpoint.sliced import WHOLE, Slice, open_sliced
from torchat.errors import TorchatError
from torchat.model import ModelArgs
from torchat.model_source import ModelSource, open_model
from torchat.parallel.launch import free_port, rank_environment
from torchat.parallel.plan import ShardPlan
from torchat.parallel.runtime import check_quant
from torchat.quant import parse_quant

WORKER = Path(__file__).parent / "parallel_worker.py"
STEPS = 64
INT8 = '{"linear:int8": {"group_size": 0}}'
PROMPT = "The capital of France is"


def launch(job: dict, tmp: Path, world: int = 2, env: dict | None = None, timeout: float = 600):
    """Run the worker as `world` ranks -> their exit codes and stderr texts, and the seconds it took."""
    (tmp / "job.json").write_text(json.dumps(job))
    port, start = free_port(), time.monotonic()
    ranks = [subprocess.Popen([sys.executable, str(WORKER), str(tmp / "job.json"), str(tmp)],
                              env=rank_environment(r, world, port, 1) | (env or {}), stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True) for r in range(world)]
    errors = [p.communicate(timeout=timeout)[1] for p in ranks]
    return [p.returncode for p in ranks], errors, time.monotonic() - start


@pytest.fixture(scope="module")
def gqa_checkpoint(tmp_path_factory, smollm2_gguf) -> Path:
    """A tiny model with 6 query heads over 3 KV heads (as SmolLM2's 3), SmolLM2's vocabulary and tokenizer."""
    args = tiny_args(dim=96, n_heads=6, n_kv_heads=3, vocab_size=SMOLLM2_VOCAB_SIZE)
    return write_tiny_checkpoint(tmp_path_factory.mktemp("gqa"), smollm2_gguf, tiny_transformer(args))


@pytest.fixture(scope="module")
def cases(smollm2_gguf, gqa_checkpoint) -> dict[str, ModelSource]:
    smollm2 = ModelSource(checkpoint=smollm2_gguf, max_seq_len=128)
    return {"smollm2-fp32": smollm2, "smollm2-int8": replace(smollm2, quant=INT8),
            "gqa-fp32": ModelSource(checkpoint=gqa_checkpoint, max_seq_len=128)}


@pytest.fixture(scope="module")
def prompt(smollm2_gguf) -> list[int]:
    from torchat.tokenizers import load_tokenizer

    return load_tokenizer(smollm2_gguf).encode(PROMPT, bos=False)


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory, cases, prompt) -> dict[str, dict]:
    """Every case run once over 2 ranks -> rank 0's {tokens, logits, plan, quant} per case."""
    tmp = tmp_path_factory.mktemp("tp2")
    job = {"cases": [{"name": name, "source": {**source.to_dict(), "tp": 2}, "prompt": prompt, "steps": STEPS}
                     for name, source in cases.items()]}
    codes, errors, _ = launch(job, tmp)
    assert codes == [0, 0], errors
    return {name: torch.load(tmp / f"{name}.pt", weights_only=True) for name in cases}


def single_process(source: ModelSource, prompt: list[int]):
    from parallel_worker import greedy

    return greedy(open_model(source).text_model, prompt, STEPS)


@pytest.mark.parametrize("name", ["smollm2-fp32", "smollm2-int8", "gqa-fp32"])
def test_two_ranks_give_one_process_greedy_tokens(two_ranks, cases, prompt, name):
    tokens, logits = single_process(cases[name], prompt)
    got = two_ranks[name]
    assert got["tokens"] == tokens
    assert got["logits"].shape == logits.shape == (STEPS, SMOLLM2_VOCAB_SIZE)
    if name.endswith("fp32"):
        assert (got["logits"] - logits).abs().max().item() <= 1e-4


def test_the_cases_split_as_documented(two_ranks):
    assert "attention replicated (9 heads do not divide 2)" in two_ranks["smollm2-fp32"]["plan"]
    assert "MLP 768 of 1536" in two_ranks["smollm2-fp32"]["plan"]
    assert "3 of 6 heads, 3 KV heads (3 KV heads repeated 2x" in two_ranks["gqa-fp32"]["plan"]
    assert "linear:int8" in two_ranks["smollm2-int8"]["quant"]


# --- the plan and the slices, in one process ---------------------------------------------------------------------

def test_plan_repeats_kv_heads_that_do_not_divide_the_ranks():
    args = ModelArgs(dim=96, n_layers=1, n_heads=6, n_kv_heads=3, vocab_size=64, hidden_dim=32)
    plans = [ShardPlan.for_model(args, 2, rank) for rank in (0, 1)]
    assert [(p.attention, p.kv_repeat, p.local_heads, p.local_kv_heads) for p in plans] == [(True, 2, 3, 3)] * 2
    hd = args.head_dim
    # query heads 0-2 read KV heads 0, 0, 1 (as one process: query head i reads KV head i // 2), 3-5 read 1, 2, 2
    assert plans[0].slices()["layers.0.attention.wk.weight"] == Slice(0, ((0, hd), (0, hd), (hd, 2 * hd)))
    assert plans[1].slices()["layers.0.attention.wv.weight"] == Slice(0, ((hd, 2 * hd), (2 * hd, 3 * hd),
                                                                            (2 * hd, 3 * hd)))
    assert plans[1].slices()["layers.0.attention.wo.weight"] == Slice.span(1, 3 * hd, 6 * hd)
    assert plans[1].slices()["layers.0.feed_forward.w2.weight"] == Slice.span(1, 16, 32)


def test_plan_replicates_attention_and_refuses_an_mlp_that_does_not_split():
    smollm2 = ModelArgs(dim=576, n_layers=1, n_heads=9, n_kv_heads=3, vocab_size=49152, hidden_dim=1536)
    plan = ShardPlan.for_model(smollm2, 2, 1)
    assert not plan.attention and plan.slices()["layers.0.attention.wq.weight"] == WHOLE
    assert plan.vocab_range == (24576, 49152)
    llama = ModelArgs(dim=2048, n_layers=1, n_heads=32, n_kv_heads=8, vocab_size=128256, hidden_dim=8192)
    assert ShardPlan.for_model(llama, 4, 3).local_kv_heads == 2
    assert ShardPlan.for_model(llama, 16, 0).kv_repeat == 2
    with pytest.raises(TorchatError, match="hidden dim 1536 does not split into 5"):
        ShardPlan.for_model(smollm2, 5, 0)


def test_gguf_slices_equal_the_whole_tensors_parts(smollm2_gguf):
    sliced = open_sliced(smollm2_gguf)
    hd = sliced.args.head_dim
    for name, part in [("layers.0.attention.wq.weight", Slice.span(0, 3 * hd, 5 * hd)),
                       ("layers.0.attention.wk.weight", Slice(0, ((hd, 2 * hd), (hd, 2 * hd)))),
                       ("layers.1.feed_forward.w2.weight", Slice.span(1, 768, 1536)),
                       ("tok_embeddings.weight", Slice.span(0, 24576, 49152))]:
        whole = sliced.read(name, WHOLE, torch.float32)
        index = [torch.arange(a, b) for a, b in part.ranges]
        assert torch.equal(sliced.read(name, part, torch.float32), whole.index_select(part.dim, torch.cat(index)))
    with pytest.raises(TorchatError, match="split a block"):
        sliced.read("layers.0.feed_forward.w2.weight", Slice.span(1, 0, 40), torch.float32)


def test_safetensors_slices_are_read_at_their_offsets(gqa_checkpoint):
    from safetensors.torch import load_file

    whole = load_file(gqa_checkpoint / "model.safetensors")
    sliced = open_sliced(gqa_checkpoint)
    assert sliced.args.n_kv_heads == 3 and sliced.metadata["format"] == "torchat"
    w2 = "layers.1.feed_forward.w2.weight"
    assert torch.equal(sliced.read(w2, Slice.span(1, 80, 160), torch.float32), whole[w2][:, 80:160])
    wk = "layers.0.attention.wk.weight"
    assert torch.equal(sliced.read(wk, Slice(0, ((16, 32), (16, 32))), torch.bfloat16),
                       torch.cat([whole[wk][16:32]] * 2).bfloat16())
    assert torch.equal(sliced.read("norm.weight", WHOLE, torch.float32), whole["norm.weight"])


def test_quant_schemes_that_cannot_split_are_refused():
    plan = ShardPlan.for_model(ModelArgs(dim=576, n_layers=1, n_heads=9, n_kv_heads=3, vocab_size=64,
                                         hidden_dim=1536), 2, 0)
    check_quant(parse_quant(INT8) + parse_quant('{"linear:int4": {"group_size": 256}}'), plan)
    with pytest.raises(TorchatError, match="cannot split quantization linear:8da4w"):
        check_quant(parse_quant('{"linear:8da4w": {"group_size": 256}}'), plan)
    plan = ShardPlan.for_model(ModelArgs(dim=64, n_layers=1, n_heads=4, vocab_size=64, hidden_dim=96), 2, 0)
    with pytest.raises(TorchatError, match="groups of 64 do not fit a rank's input width 32"):
        check_quant(parse_quant('{"linear:int8": {"group_size": 64}}'), plan)


# --- the CLI's launcher and failures -----------------------------------------------------------------------------

def torchat(*argv: str, stdin: str | None = None, timeout: float = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "torchat", *argv], capture_output=True, text=True, timeout=timeout,
                          input=stdin)


def test_cli_generate_and_chat_with_tp_2_print_what_one_process_prints_and_refuse_clearly(gqa_checkpoint):
    flags = ["generate", str(gqa_checkpoint), "--max-new-tokens", "24", "--prompt", PROMPT]
    one, two = torchat(*flags), torchat(*flags, "--tp", "2")
    assert one.returncode == two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and two.stdout.startswith(PROMPT)
    assert "tensor parallel over 2 ranks" in two.stderr
    # chat: rank 0 alone reads the turns from stdin and prints the answers
    chat = ["chat", str(gqa_checkpoint), "--max-new-tokens", "12"]
    turns = "Hello there\nWhat is your name?\n"
    one, two = torchat(*chat, stdin=turns), torchat(*chat, "--tp", "2", stdin=turns)
    assert one.returncode == two.returncode == 0, two.stderr
    assert two.stdout == one.stdout and len(two.stdout.splitlines()) == 2
    refused = torchat(*flags, "--tp", "2", "--quant", '{"linear:8da4w": {"group_size": 32}}')
    assert refused.returncode == 1 and refused.stdout == ""
    assert "error: --tp 2 cannot split quantization linear:8da4w" in refused.stderr
    assert "torchat: rank 0 of 2 exited with status 1" in refused.stderr or \
        "torchat: rank 1 of 2 exited with status 1" in refused.stderr


def test_a_rank_that_dies_stops_rank_0_with_a_clear_error(tmp_path, gqa_checkpoint, prompt):
    job = {"cases": [{"name": "gqa", "source": ModelSource(checkpoint=gqa_checkpoint, tp=2).to_dict(),
                      "prompt": prompt, "steps": STEPS}], "die_rank": 1}
    codes, errors, seconds = launch(job, tmp_path, env={"TORCHAT_TP_TIMEOUT": "20"}, timeout=120)
    assert codes == [1, 3], errors
    assert "rank 0: a collective failed" in (tmp_path / "error.txt").read_text()
    assert seconds < 90


@pytest.mark.parametrize("verb", ["export", "quantize", "convert", "bench", "generate", "chat", "eval", "server"])
def test_only_the_running_verbs_take_tp(verb, capsys):
    """torchat.parallel is no part of the build steps' code keys (torchat.model_source.open_model) because their
    verbs (export, quantize, convert; bench measures one process) cannot run with --tp."""
    from torchat.cli import build_parser

    with pytest.raises(SystemExit):
        build_parser(verb).parse_args([verb, "--help"])
    assert ("--tp N" in capsys.readouterr().out) == (verb in ("generate", "chat", "eval", "server"))


def test_torchrun_without_tp_is_refused(gqa_checkpoint):
    """Under torchrun (WORLD_SIZE set) without --tp, each process would run the whole model and print it."""
    run = subprocess.run([sys.executable, "-m", "torchat", "generate", str(gqa_checkpoint), "--max-new-tokens", "2"],
                         capture_output=True, text=True, timeout=120, env={**os.environ, "WORLD_SIZE": "2"})
    assert run.returncode == 1 and run.stdout == ""
    assert run.stderr.strip().splitlines()[-1] == ("torchat generate: error: torchrun started 2 processes but --tp "
                                                   "is 1 (each would run the whole model); pass --tp 2")


def test_a_checkpoint_that_cannot_be_sliced_is_refused(tmp_path):
    pickle = tmp_path / "model.pt"
    pickle.write_bytes(b"not read")
    with pytest.raises(TorchatError, match=r"a llama2c checkpoint cannot be read in slices .* torchat convert"):
        open_sliced(pickle)
