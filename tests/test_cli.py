"""The command line: every verb listed by `torchat --help`, each flag spelled, defaulted and checked once, the
seed README's command lines accepted as written, one-line errors."""

import subprocess
import sys

import pytest

from torchat.cli import VERBS, build_parser, main, runs_pte
from torchat.cli.flags import model_source

MODEL_VERBS = ("generate", "chat", "eval", "bench", "export", "quantize")


def test_help_lists_every_verb_with_a_line():
    result = subprocess.run([sys.executable, "-m", "torchat", "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for verb, (_, line) in VERBS.items():
        assert f"  {verb}" in result.stdout and line in result.stdout, verb


def _option_table(verb: str) -> dict[str, tuple]:
    """option string -> (dest, default, help) of a verb's parser."""
    sub = build_parser(verb)._subparsers._group_actions[0].choices[verb]
    return {option: (action.dest, action.default, action.help) for action in sub._actions
            for option in action.option_strings}


@pytest.mark.parametrize("flag", ["--quant", "--quantize", "--max-seq-length", "--compile", "--compile-prefill",
                                  "--compile_prefill", "--dtype", "-d", "--device", "--checkpoint-path",
                                  "--checkpoint-dir", "--gguf-path", "--load_gguf", "--pte-path", "--dso-path",
                                  "--aoti-package-path", "--tokenizer-path", "--verbose", "--build"])
def test_a_model_flag_is_the_same_on_every_verb_that_opens_a_model(flag):
    tables = {verb: _option_table(verb) for verb in MODEL_VERBS}
    assert all(flag in table for table in tables.values()), [v for v, t in tables.items() if flag not in t]
    assert len({table[flag] for table in tables.values()}) == 1, {v: t[flag] for v, t in tables.items()}


@pytest.mark.parametrize("flag", ["--max-new-tokens", "--num-tokens", "--temperature", "--top-k", "--top-p", "--seed"])
def test_generation_flags_are_the_same_for_generate_and_chat(flag):
    assert _option_table("generate")[flag] == _option_table("chat")[flag]


@pytest.mark.parametrize("argv,message", [
    (["generate", "--max-new-tokens", "-5"], "--max-new-tokens/--num-tokens: '-5' is not a positive integer"),
    (["chat", "--temperature", "-1"], "--temperature: '-1' is not a finite number >= 0"),
    (["generate", "--top-p", "1.5"], "--top-p: '1.5' is not a number in (0, 1]"),
    (["eval", "--max-seq-length", "0"], "--max-seq-length: '0' is not a positive integer"),
    (["bench", "--runs", "x"], "--runs: 'x' is not a positive integer"),
    (["generate", "--dtype", "int3"], "unknown dtype 'int3'; choose one of: fp32, bf16, fp16"),
    (["generate", "--pte-p", "m.pte"], "unrecognized arguments: --pte-p"),  # an abbreviation is refused
])
def test_a_bad_flag_value_is_one_line_at_parse_time(argv, message):
    result = subprocess.run([sys.executable, "-m", "torchat", *argv], capture_output=True, text=True, timeout=60)
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and message in result.stderr, result.stderr
    assert "Traceback" not in result.stderr


def source_of(argv: list[str]):
    return model_source(build_parser(argv[0]).parse_args(argv))


# the seed README's generate / export / eval lines (python generate.py ... == torchat generate ...), with the
# default model's GGUF in place of ${MODEL_PATH} and a scratch directory in place of ${MODEL_OUT}
SEED_LINES = [
    'generate --compile --checkpoint-path {gguf} --prompt "Hello, my name is" --device cpu',
    'export --checkpoint-path {gguf} --device cpu --output-dso-path {out}/model.so',
    'generate --device cpu --dso-path {out}/model.so --prompt "Hello my name is"',
    'export --checkpoint-path {gguf} -d fp32 --output-pte-path {out}/model.pte',
    'generate --checkpoint-path {gguf} --pte {out}/model.pte --device cpu --prompt "Once upon a time"',
    'generate --dtype bf16 --checkpoint-path {gguf}',
    'generate --compile --checkpoint-path {gguf} --prompt "Hello, my name is" --quant '
    '\'{{"linear:int8" : {{"bitwidth": 8, "group_size": 0}}}}\' --device cpu',
    'export --checkpoint-path {gguf} -d fp32 --quant \'{{"embedding": {{"bitwidth": 8, "group_size": 0}} }}\' '
    '--output-pte-path {out}/model_emb8b-gw256.pte',
    'generate --pte-path {out}/model_int8.pte --checkpoint-path {gguf} --prompt "Hello my name is"',
    'export --checkpoint-path {gguf} -d fp32 --quant "{{\'linear:int4\': {{\'group_size\' : 32}} }}" '
    '--output-dso-path {out}/model_int4-gw32.so',
    'generate --load_gguf {gguf} --compile_prefill --prompt "Hello"',
    'eval --checkpoint-path {gguf} --compile --quantize \'{{"linear:int8": {{"group_size": 0}}}}\' --limit 2',
    '--generate --checkpoint-path {gguf} --prompt "Hello"',
]


@pytest.mark.parametrize("line", SEED_LINES)
def test_the_seed_readme_lines_parse_into_one_model_source(line, smollm2_gguf, tmp_path):
    import shlex

    from torchat.cli import _verb_argv

    argv = _verb_argv(shlex.split(line.format(gguf=smollm2_gguf, out=tmp_path)))
    args = build_parser(argv[0]).parse_args(argv)
    source = model_source(args)
    named = source.checkpoint or source.model
    assert named is not None
    if any(flag in argv for flag in ("--pte", "--pte-path", "--dso-path")):
        assert str(named).endswith((".pte", ".so"))  # the artifact runs; the seed's checkpoint lends its tokenizer
        if "--checkpoint-path" in line:
            assert source.tokenizer_path == smollm2_gguf
    else:
        assert named == smollm2_gguf
    if "--quant" in line:
        from torchat.quant import parse_quant

        assert parse_quant(source.quant)


def test_the_seed_pte_spelling_sets_up_the_process_as_pte_path_does():
    assert runs_pte(["generate", "--pte", "m.pte"]) and runs_pte(["generate", "--pte-path=m.pte"])
    assert runs_pte(["chat", "smollm2-135m-8da4w-et"]) and runs_pte(["eval", "x/model.pte"])
    assert not runs_pte(["generate", "smollm2-135m-int4-aoti"])


def test_a_seed_line_runs_as_written(smollm2_gguf, capsys):
    """The seed's quantized generate line, for real, on the default model (int8, a few tokens): the same greedy
    text as `torchat eval`'s model of the same source (the SmolLM2 end-to-end case of tests/test_model_source.py)."""
    from test_model_source import greedy_text

    quant = '{"linear:int8" : {"bitwidth": 8, "group_size": 0}}'
    prompt = "Once upon a time there was"
    assert main(["generate", "--checkpoint-path", str(smollm2_gguf), "--prompt", prompt, "--quant", quant,
                 "--device", "cpu", "--max-new-tokens", "12"]) == 0
    out = capsys.readouterr()
    assert "decode" in out.err
    from torchat.cli.eval import graph_source
    from torchat.model_source import open_model

    reference = open_model(graph_source(build_parser("eval").parse_args(
        ["eval", "--checkpoint-path", str(smollm2_gguf), "--quant", quant])))
    assert out.out == greedy_text(reference) and len(out.out) > len(prompt) + 1


def test_naming_the_model_twice_is_one_line(smollm2_gguf, capsys):
    assert main(["generate", "smollm2-135m", "--gguf-path", str(smollm2_gguf)]) == 1
    assert "name the model once" in capsys.readouterr().err


def test_export_writes_what_the_c_runner_reads_beside_the_artifact(tiny_artifacts, tmp_path, capsys):
    """`doit build:...` and `torchat export` leave tokenizer.bin beside the model, so `run model.pte` needs no -z:
    the same bytes `torchat tokenizer-bin` writes for the artifact's tokenizer."""
    artifact = tiny_artifacts[".pte"]
    assert main(["tokenizer-bin", "--tokenizer-path", str(artifact.parent / "tokenizer.gguf"), "--output",
                 str(tmp_path / "tokenizer.bin")]) == 0
    assert (artifact.parent / "tokenizer.bin").read_bytes() == (tmp_path / "tokenizer.bin").read_bytes()
