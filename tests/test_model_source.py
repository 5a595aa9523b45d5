"""One way to open any model: every kind of source gives the same greedy tokens through `torchat generate` and
`torchat chat` as `torchat eval`'s model of the same source (the reference: eval's flags -> open_model ->
torchat.generate), for int8, int4 g32, 8da4w and gptq: quantized on the fly with --quant, baked by
`torchat quantize` and opened as a directory, and a build target taken from the store by name.

The model is a random stories15M-shaped llama2.c checkpoint with the Mistral sentencepiece tokenizer, declared as
a catalog model in a private targets dir (TORCHAT_TARGETS_DIR), so the store's graph builds it for real.
"""

import json

import pytest
from tiny_model import write_stories_targets

from torchat import spec, store
from torchat.cli import build_parser, main

PROMPT = "Once upon a time there was"
MESSAGE = "Tell me a story."
NEW = 12
# small calibration so that gptq runs in seconds on the tiny model
QUANTS = {
    "int8": {"linear:int8": {"bitwidth": 8, "group_size": 0}},
    "int4": {"linear:int4": {"groupsize": 32}},
    "8da4w": {"linear:8da4w": {"group_size": 32}},
    "gptq": {"linear:gptq": {"group_size": 32, "calibration_limit": 1, "calibration_seq_length": 32}},
}


def toml_table(value) -> str:
    if isinstance(value, dict):
        return "{ " + ", ".join(f"{json.dumps(k)} = {toml_table(v)}" for k, v in value.items()) + " }"
    return json.dumps(value)


@pytest.fixture(scope="module")
def tiny_catalog(tmp_path_factory, mistral_sentencepiece):
    """A targets dir declaring `tiny` (llama2.c file, pinned) and one preset per scheme; the store beside it."""
    root = tmp_path_factory.mktemp("catalog")
    write_stories_targets(root / "targets", mistral_sentencepiece,
                          {name: toml_table(quant) for name, quant in QUANTS.items()}, '["eager"]', std=0.05)
    return root


@pytest.fixture
def in_catalog(tiny_catalog, monkeypatch):
    monkeypatch.setenv("TORCHAT_TARGETS_DIR", str(tiny_catalog / "targets"))
    monkeypatch.setenv("TORCHAT_ARTIFACTS", str(tiny_catalog / "artifacts"))
    monkeypatch.setattr(store, "_found", {})
    return tiny_catalog


def eval_model(argv: list[str]):
    """The model `torchat eval ARGV` evaluates."""
    from torchat.cli.eval import graph_source
    from torchat.model_source import open_model

    return open_model(graph_source(build_parser("eval").parse_args(["eval", *argv])))


def greedy_text(opened) -> str:
    """What `torchat generate` prints for PROMPT: the prompt, then the greedy continuation up to a stop."""
    from torchat.generate import Sampling, generate

    tokenizer = opened.tokenizer
    ids = tokenizer.encode(PROMPT, bos=tokenizer.add_bos)
    out = [t for t in generate(opened.text_model, ids, NEW, Sampling(), tokenizer.stop_ids)]
    out = out[:next((i for i, t in enumerate(out) if t in tokenizer.stop_ids), len(out))]
    return PROMPT + tokenizer.decode(out) + "\n"


def chat_answer(opened) -> str:
    from torchat.chat import ChatSession
    from torchat.generate import Sampling
    from torchat.templates import pick_template

    template = pick_template(opened.tokenizer, None)
    session = ChatSession(opened.text_model, opened.tokenizer, template, Sampling(), NEW)
    return opened.tokenizer.decode(list(session.reply(MESSAGE))) + "\n"


def run_verb(capsys, monkeypatch, argv: list[str], stdin: str = "") -> str:
    import io

    monkeypatch.setattr("sys.stdin", io.StringIO(stdin))
    capsys.readouterr()
    assert main(argv) == 0, capsys.readouterr().err
    return capsys.readouterr().out


@pytest.mark.parametrize("scheme", list(QUANTS))
def test_every_source_of_a_quantized_model_generates_and_chats_as_eval_runs_it(scheme, in_catalog, capsys,
                                                                               monkeypatch, tmp_path):
    checkpoint = in_catalog / "targets" / "tiny.pt"
    common = ["--dtype", "bf16", "--tokenizer-path", str(in_catalog / "targets" / "tokenizer.model")]
    quant = ["--quant", json.dumps(QUANTS[scheme])]
    reference = eval_model(["--checkpoint-path", str(checkpoint), *quant, *common])
    text, answer = greedy_text(reference), chat_answer(reference)
    generate = ["generate", "--prompt", PROMPT, "--max-new-tokens", str(NEW)]
    chat = ["chat", "--max-new-tokens", str(NEW)]

    # quantized on the fly: the seed's --quantize spelling too
    assert run_verb(capsys, monkeypatch, [*generate, "--checkpoint-path", str(checkpoint), *quant, *common]) == text
    assert run_verb(capsys, monkeypatch, [*chat, "--checkpoint-path", str(checkpoint), "--quantize", json.dumps(QUANTS[scheme]),
                                          *common], MESSAGE + "\n") == answer

    # baked by `torchat quantize`, opened as MODEL and as --checkpoint-dir
    baked = tmp_path / "baked"
    run_verb(capsys, monkeypatch, ["quantize", "--checkpoint-path", str(checkpoint), *quant, *common,
                                   "--output-dir", str(baked)])
    assert run_verb(capsys, monkeypatch, [*generate, str(baked)]) == text
    assert run_verb(capsys, monkeypatch, [*chat, "--checkpoint-dir", str(baked)], MESSAGE + "\n") == answer
    assert greedy_text(eval_model([str(baked)])) == text

    # a build target, from the store by name (built once with --build; the next run finds it)
    target = f"tiny-{scheme}-eager"
    assert main([*generate, target]) == 1
    assert f"run `doit build:{target}` first, or pass --build" in capsys.readouterr().err
    assert run_verb(capsys, monkeypatch, [*generate, target, "--build"]) == text
    assert run_verb(capsys, monkeypatch, [*chat, target], MESSAGE + "\n") == answer
    node = spec.load_catalog().node_for(spec.Step.BUILD, target)
    assert store.find(node) is not None



def test_a_directory_converted_from_a_gguf_finds_its_tokenizer_gguf(tmp_path, smollm2_gguf):
    """A canonical directory keeps its GGUF's metadata ("format": "gguf") but its vocabulary in tokenizer.gguf: the
    tokenizer is that file, not the directory (export wrote tokenizer files from it and failed on a directory)."""
    from torchat.convert import write_tokenizer_gguf
    from torchat.model_source import find_tokenizer

    write_tokenizer_gguf(smollm2_gguf, tmp_path / "tokenizer.gguf")
    assert find_tokenizer(tmp_path, {"format": "gguf"}) == tmp_path / "tokenizer.gguf"
    assert find_tokenizer(smollm2_gguf, {"format": "gguf"}) == smollm2_gguf
