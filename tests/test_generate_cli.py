"""`torchat generate` end to end on the real default model, against the library driven in-process."""

import re
import subprocess
import sys

import pytest
import torch

from torchat.checkpoint import build_model, read_checkpoint
from torchat.generate import EagerModel, Sampling, generate
from torchat.tokenizers import load_tokenizer

PROMPT = "The three primary colours are"
STATS = re.compile(r"^prompt \d+ tok, generated \d+ tok \| time to first token [\d.]+ s \| prefill [\d.]+ tok/s \| "
                   r"decode [\d.]+ tok/s \| peak memory \d+ MiB$")


def torchat(*args):
    return subprocess.run([sys.executable, "-m", "torchat", *args], capture_output=True, text=True, timeout=600)


@pytest.mark.slow
def test_default_model_streams_the_greedy_completion(smollm2_gguf):
    tokenizer = load_tokenizer(smollm2_gguf)
    model = build_model(read_checkpoint(smollm2_gguf))
    prompt = tokenizer.encode(PROMPT, bos=tokenizer.add_bos)
    ids = list(generate(EagerModel(model, len(prompt) + 24), prompt, 24, Sampling(), tokenizer.stop_ids))
    ids = [i for i in ids if i not in tokenizer.stop_ids]

    result = torchat("generate", "--prompt", PROMPT, "--max-new-tokens", "24")
    assert result.returncode == 0, result.stderr
    assert result.stdout == PROMPT + tokenizer.decode(ids) + "\n"
    assert STATS.match(result.stderr.strip().splitlines()[-1]), result.stderr
    assert "default model" in result.stderr


@pytest.mark.slow
def test_seeded_sampling_repeats_and_the_flag_form_works(smollm2_gguf):
    args = ["--gguf-path", str(smollm2_gguf), "--prompt", PROMPT, "--max-new-tokens", "12", "--temperature", "0.9",
            "--top-k", "50", "--top-p", "0.9"]
    first = torchat("generate", *args, "--seed", "7")
    again = torchat("--generate", *args, "--seed", "7")
    other = torchat("generate", *args, "--seed", "8")
    assert first.returncode == again.returncode == other.returncode == 0, first.stderr
    assert first.stdout == again.stdout
    assert first.stdout != other.stdout


def test_bad_model_and_tokenizer_paths_fail_in_one_line(tmp_path):
    garbage = tmp_path / "tokenizer.model"
    garbage.write_bytes(b"\x00not a tokenizer")
    checkpoint = tmp_path / "stories15M" / "model.pth"
    checkpoint.parent.mkdir()
    torch.save({"tok_embeddings.weight": torch.zeros(4, 4)}, checkpoint)
    for args, needle in [(["--gguf-path", str(tmp_path / "missing.gguf")], "missing.gguf"),
                         (["--checkpoint-path", str(checkpoint), "--params-table", "stories15M"], "missing"),
                         (["--checkpoint-path", str(tmp_path), "--dtype", "fp8"], "fp8")]:
        result = torchat("generate", *args)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], result.stderr
