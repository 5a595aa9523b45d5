"""The C++ runners against the Python loaders of the same artifacts: greedy ids, chat turns reusing the KV cache,
seeded sampling, text output, and one-line errors with a non-zero exit on bad input. The CI-sized model is a tiny
random one with SmolLM2's vocabulary; the slow tests run the real SmolLM2 in fp32 against eager."""

import subprocess

import pytest
from runner_fixtures import python_greedy, run_runner, runner_for, runner_ids, write_tokenizer_bin
from tiny_model import TINY_CONTEXT

from torchat.tokenizers import load_tokenizer

PROMPT = "Hello, my name is"
SUFFIXES = [".pt2", ".so", ".pte"]


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_greedy_ids_equal_the_python_loader(request, tiny_artifacts, tiny_tokenizer, tiny_tokenizer_bin, suffix):
    artifact = tiny_artifacts[suffix]
    want = python_greedy(artifact, tiny_tokenizer, PROMPT, 40)
    assert runner_ids(runner_for(request, suffix), artifact, tiny_tokenizer_bin, "-i", PROMPT, "-n", "40") == [want]


@pytest.mark.parametrize("suffix", [".pt2", ".pte"])
def test_the_kv_cache_budget_ends_generation_as_python_does(request, tiny_artifacts, tiny_tokenizer,
                                                             tiny_tokenizer_bin, suffix):
    artifact = tiny_artifacts[suffix]
    want = python_greedy(artifact, tiny_tokenizer, PROMPT, 500)  # stops when the cache is full
    got = runner_ids(runner_for(request, suffix), artifact, tiny_tokenizer_bin, "-i", PROMPT, "-n", "500")
    assert got == [want] and len(want) == TINY_CONTEXT - len(tiny_tokenizer.encode(PROMPT)) + 1


@pytest.mark.parametrize("suffix", [".pt2", ".pte"])
def test_chat_turns_equal_the_python_chat_session(request, tiny_artifacts, tiny_tokenizer, tiny_tokenizer_bin,
                                                  suffix):
    from torchat.chat import ChatSession
    from torchat.exported import load_exported
    from torchat.generate import Sampling

    artifact = tiny_artifacts[suffix]
    turns = ["Hi there!", "What is 12 + 30?", "Thanks."]
    session = ChatSession(load_exported(artifact), tiny_tokenizer, "jinja", Sampling(), 12, system="Be brief.")
    want = []
    for turn in turns:
        want.append(list(session.reply(turn)))
    got = runner_ids(runner_for(request, suffix), artifact, tiny_tokenizer_bin, "-m", "chat", "-n", "12", "-y",
                     "Be brief.", "-i", turns[0], stdin="\n".join(turns[1:]) + "\n")
    assert [[t for t in ids if not tiny_tokenizer.stop_ids & {t}] for ids in got] == want


def test_text_output_is_the_prompt_then_the_decoded_completion(runner_et, tiny_artifacts, tiny_tokenizer,
                                                               tiny_tokenizer_bin):
    artifact = tiny_artifacts[".pte"]
    ids = python_greedy(artifact, tiny_tokenizer, PROMPT, 20)
    result = run_runner(runner_et, artifact, tiny_tokenizer_bin, "-i", PROMPT, "-n", "20")
    assert result.returncode == 0
    assert result.stdout == PROMPT + tiny_tokenizer.decode(ids) + "\n"
    assert "achieved tok/s:" in result.stderr


def test_seeded_sampling_repeats(runner_et, tiny_artifacts, tiny_tokenizer_bin):
    artifact = tiny_artifacts[".pte"]
    args = ("-i", PROMPT, "-n", "30", "-t", "0.9", "-p", "0.9")
    first = runner_ids(runner_et, artifact, tiny_tokenizer_bin, *args, "-s", "7")
    assert runner_ids(runner_et, artifact, tiny_tokenizer_bin, *args, "-s", "7") == first
    assert runner_ids(runner_et, artifact, tiny_tokenizer_bin, *args, "-s", "8") != first


# --- bad input: one line on stderr, a non-zero exit, never a crash -------------------------------------------

def assert_one_line_error(result: subprocess.CompletedProcess, *fragments: str, code: int = 1) -> None:
    assert result.returncode == code, (result.returncode, result.stderr)
    lines = [line for line in result.stderr.splitlines() if not line.startswith(("I 00:", "E 00:", "W 00:"))]
    assert len(lines) == 1 and lines[0].startswith("run: error: "), result.stderr
    for fragment in fragments:
        assert fragment in lines[0], lines[0]


@pytest.mark.parametrize("suffix", [".pt2", ".so", ".pte"])
def test_a_missing_model(request, tiny_tokenizer_bin, tmp_path, suffix):
    missing = tmp_path / f"nothing{suffix}"
    assert_one_line_error(run_runner(runner_for(request, suffix), missing, tiny_tokenizer_bin, "-i", "x"),
                          str(missing), "no such model file")


@pytest.mark.parametrize("suffix", [".pt2", ".so", ".pte"])
def test_a_corrupt_model(request, tiny_tokenizer_bin, tmp_path, suffix):
    corrupt = tmp_path / f"corrupt{suffix}"
    corrupt.write_bytes(b"\x7fELF" + b"\0" * 4096 if suffix == ".so" else b"PK\3\4 not really" * 100)
    assert_one_line_error(run_runner(runner_for(request, suffix), corrupt, tiny_tokenizer_bin, "-i", "x"),
                          str(corrupt))


def test_the_wrong_runner_for_the_artifact(runner_et, tiny_artifacts, tiny_tokenizer_bin):
    assert_one_line_error(run_runner(runner_et, tiny_artifacts[".pt2"], tiny_tokenizer_bin, "-i", "x"),
                          "runner-et runs .pte", "use runner-aoti")


@pytest.mark.parametrize("suffix", [".pt2", ".pte"])
def test_a_corrupt_tokenizer_file(request, tiny_artifacts, tiny_tokenizer_bin, tmp_path, suffix):
    bad = tmp_path / "tokenizer.bin"
    bad.write_bytes(b"TORCHTOK" + (99).to_bytes(4, "little") + tiny_tokenizer_bin.read_bytes()[12:])
    assert_one_line_error(run_runner(runner_for(request, suffix), tiny_artifacts[suffix], bad, "-i", "x"),
                          "version 99", "torchat tokenizer-bin")


@pytest.mark.parametrize("suffix", [".pt2", ".pte"])
def test_another_models_tokenizer(request, tiny_artifacts, tokenizer_bins, suffix):
    result = run_runner(runner_for(request, suffix), tiny_artifacts[suffix], tokenizer_bins["llama3"], "-i", "x")
    assert_one_line_error(result, "128256 tokens", "49152", "the model's own tokenizer.bin")


@pytest.mark.parametrize("suffix", [".pt2", ".pte"])
def test_a_prompt_longer_than_the_context(request, tiny_artifacts, tiny_tokenizer_bin, suffix):
    prompt = "word " * (TINY_CONTEXT + 5)
    result = run_runner(runner_for(request, suffix), tiny_artifacts[suffix], tiny_tokenizer_bin, "-i", prompt)
    assert_one_line_error(result, f"beyond the context of {TINY_CONTEXT} tokens")


def test_a_chat_message_longer_than_the_context(runner_et, tiny_artifacts, tiny_tokenizer_bin):
    result = run_runner(runner_et, tiny_artifacts[".pte"], tiny_tokenizer_bin, "-m", "chat", "-i",
                        "word " * TINY_CONTEXT)
    assert_one_line_error(result, "this message alone needs")


@pytest.mark.parametrize("args", [["-n", "many"], ["-m", "poem"], ["-q", "1"], ["-t"], ["-p", "0"]])
def test_usage_mistakes_exit_2(runner_et, tiny_artifacts, tiny_tokenizer_bin, args):
    result = run_runner(runner_et, tiny_artifacts[".pte"], tiny_tokenizer_bin, "-i", "x", *args)
    assert_one_line_error(result, "see run -h", code=2)


# --- quantized artifacts and the real SmolLM2 ------------------------------------------------------------------

QUANTIZED = [(".pte", {"linear:a8w4dq": {"groupsize": 32}}),
             (".pte", {"linear:a8w4dq": {"groupsize": 32}, "embedding": {"bitwidth": 4, "groupsize": 32}}),
             (".pt2", {"linear:int8": {"bitwidth": 8, "groupsize": 0}}),
             (".pt2", {"linear:int4": {"groupsize": 32}}),  # torchat::linear_w4, compiled into runner-aoti
             (".pt2", {"linear:a8w4dq": {"groupsize": 32}}),
             (".pt2", {"linear:a8w4dq": {"groupsize": 32, "grid": "asymmetric"}})]  # torchat::linear_q4


@pytest.mark.slow
@pytest.mark.parametrize(("suffix", "quant"), QUANTIZED, ids=[f"{s}-{'+'.join(q)}" for s, q in QUANTIZED])
def test_quantized_artifacts_equal_their_python_loader(request, tiny_artifacts, tiny_tokenizer, tiny_tokenizer_bin,
                                                       suffix, quant):
    artifact = tiny_artifacts.get(suffix, quant)
    want = python_greedy(artifact, tiny_tokenizer, PROMPT, 32)
    assert runner_ids(runner_for(request, suffix), artifact, tiny_tokenizer_bin, "-i", PROMPT, "-n", "32") == [want]


SMOLLM2_PROMPT = "The history of the printing press begins"
SMOLLM2_MAX_SEQ_LEN = 128  # the eager reference's KV cache: the prompt and 64 new tokens fit


@pytest.fixture(scope="module")
def smollm2_eager_greedy(smollm2_gguf):
    from torchat.checkpoint import build_model, read_checkpoint
    from torchat.generate import EagerModel, Sampling, generate

    tokenizer = load_tokenizer(smollm2_gguf)
    model = EagerModel(build_model(read_checkpoint(smollm2_gguf)), SMOLLM2_MAX_SEQ_LEN)
    prompt = tokenizer.encode(SMOLLM2_PROMPT, bos=tokenizer.add_bos)
    return list(generate(model, prompt, 64, Sampling(), tokenizer.stop_ids))


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt2", ".pte"])
def test_smollm2_fp32_greedy_64_equals_eager(request, smollm2_artifact, smollm2_eager_greedy, tokenizer_bins,
                                             suffix):
    artifact = smollm2_artifact(suffix)  # from the store: doit build:smollm2-135m-none-fp32-{aoti,et}
    got = runner_ids(runner_for(request, suffix), artifact, tokenizer_bins["smollm2"], "-i", SMOLLM2_PROMPT,
                     "-n", "64")
    assert len(smollm2_eager_greedy) == 64
    assert got == [smollm2_eager_greedy]


def test_the_writer_step_and_the_runner_agree_on_a_tokenizer_in_a_checkpoint_dir(tiny_checkpoint, tmp_path):
    """`doit tokenizer:MODEL` runs `torchat tokenizer-bin --checkpoint-dir`: the converted directory's tokenizer."""
    written = write_tokenizer_bin(tiny_checkpoint / "tokenizer.gguf", tmp_path / "a.bin")
    from torchat.cli import main

    assert main(["tokenizer-bin", "--checkpoint-dir", str(tiny_checkpoint), "--output-path",
                 str(tmp_path / "b.bin")]) == 0
    assert (tmp_path / "b.bin").read_bytes() == written.read_bytes()


def test_the_tokenizer_bin_beside_the_model_is_the_default(runner_et, tiny_artifacts, tiny_tokenizer_bin, tmp_path):
    import shutil

    model = tmp_path / "model.pte"
    model.symlink_to(tiny_artifacts[".pte"])
    argv = [str(runner_et), str(model), "-i", PROMPT, "-n", "3"]
    assert_one_line_error(subprocess.run(argv, capture_output=True, text=True), "no tokenizer.bin beside")
    shutil.copyfile(tiny_tokenizer_bin, tmp_path / "tokenizer.bin")
    assert subprocess.run(argv, capture_output=True, text=True).returncode == 0
