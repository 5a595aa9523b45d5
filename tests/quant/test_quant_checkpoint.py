"""Bake -> load: a baked checkpoint reloads to the logits of the in-memory quantized model, without
re-quantizing; the manifest says what was quantized; broken directories fail clearly."""

import json

import pytest
import torch
from tiny_model import tiny_args, tiny_transformer

from torchat.checkpoint import build_model, read_checkpoint
from torchat.checkpoint.base import Checkpoint
from torchat.checkpoint.canonical import write_canonical
from torchat.errors import TorchatError
from torchat.quant import bake_quantized, load_quantized, parse_quant, quantize_model, read_report
from torchat.quant.base import QuantizedModule

# dim 64, hidden 96: w2's input (96) is no multiple of 64, so group 64 exercises the padding
ARGS = tiny_args(hidden_dim=96)

SCHEMES = {
    "int8": '{"linear:int8": {"group_size": 0}}',
    "int8-g32": '{"linear:int8": {"group_size": 32}}',
    "int4-g32": '{"linear:int4": {"group_size": 32}}',
    "int4-g64": '{"linear:int4": {"groupsize": 64}}',
    "hqq-g32": '{"linear:hqq": {"group_size": 32}}',
    "gptq-g32": '{"linear:gptq": {"group_size": 32}}',
    "8da4w-g32": '{"linear:a8w4dq": {"groupsize": 32}}',
    "8da8w": '{"linear:8da8w": {}}',
    "emb8": '{"embedding": {"bitwidth": 8, "group_size": 0}}',
    "8da4w+emb4": '{"linear:8da4w": {"group_size": 32}, "embedding": {"bitwidth": 4, "group_size": 32}}',
    "bf16+int4": '{"linear:int4": {"group_size": 32}, "precision": {"dtype": "bf16"}}',
}
# bound on the logits' relative error against the float model: loose, a gross-breakage check
ERROR_BOUND = {"int8": 0.03, "int8-g32": 0.03, "emb8": 0.03}


def calibration() -> torch.Tensor:
    return torch.randint(0, ARGS.vocab_size, (4, 32), generator=torch.Generator().manual_seed(3))


def write_float_checkpoint(directory, tie_embeddings: bool):
    args = tiny_args(hidden_dim=96, tie_embeddings=tie_embeddings)
    model = tiny_transformer(args, std=None)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(0.05)  # a llama-like logit scale
    write_canonical(Checkpoint(dict(model.state_dict()), args, {"format": "torchat"}), directory)
    return directory


@pytest.fixture(scope="module")
def float_dir(tmp_path_factory):
    return write_float_checkpoint(tmp_path_factory.mktemp("float"), False)


@pytest.fixture(scope="module")
def tied_dir(tmp_path_factory):
    """SmolLM2's layout: the head is the embedding table."""
    return write_float_checkpoint(tmp_path_factory.mktemp("tied"), True)


def logits(model, tokens):
    with torch.no_grad():
        return model(tokens)


@pytest.mark.parametrize("name", list(SCHEMES))
def test_baked_checkpoint_reloads_to_the_same_logits(name, float_dir, tmp_path):
    check_bake_and_reload(name, float_dir, tmp_path)


@pytest.mark.parametrize("name", ["int4-g32", "emb8", "8da4w+emb4"])
def test_tied_checkpoint_reloads_to_the_same_logits(name, tied_dir, tmp_path):
    check_bake_and_reload(name, tied_dir, tmp_path)


def check_bake_and_reload(name, float_dir, tmp_path):
    specs = parse_quant(SCHEMES[name])
    tokens = torch.randint(0, ARGS.vocab_size, (1, 12), generator=torch.Generator().manual_seed(4))
    reference = build_model(read_checkpoint(float_dir))
    in_memory = build_model(read_checkpoint(float_dir))
    report = quantize_model(in_memory, specs, calibration())
    baked = bake_quantized(float_dir, specs, "fp32", tmp_path / "q", calibration_tokens=calibration())

    loaded = load_quantized(baked)
    assert torch.equal(logits(loaded, tokens), logits(in_memory, tokens))
    manifest = json.loads((baked / "quant.json").read_text())
    assert set(manifest["modules"]) == set(report.quantized())
    assert read_report(baked).to_dict() == report.to_dict()
    quantized = {n for n, m in loaded.named_modules() if isinstance(m, QuantizedModule)}
    assert quantized == set(report.quantized()) and all(m.packed for m in loaded.modules()
                                                         if isinstance(m, QuantizedModule))
    want, got = logits(reference, tokens), logits(loaded, tokens)
    error = float((got - want).norm() / want.norm())
    assert error < ERROR_BOUND.get(name, 0.3), error
    assert sorted(p.name for p in tmp_path.iterdir()) == ["q"]  # published by rename, no temp dir left


def test_report_counts_padding_and_skips(float_dir):
    model = build_model(read_checkpoint(float_dir))
    report = quantize_model(model, parse_quant(
        '{"embedding": {"bitwidth": 8, "group_size": 128}, "linear:int4": {"group_size": 64}, '
        '"linear:int8": {"group_size": 0}}'))
    embedding, int4, int8 = report.schemes
    assert embedding.quantized == [] and "not a multiple of group_size 128" in embedding.skipped["tok_embeddings"]
    assert len(int4.quantized) == 2 * 7 + 1  # every linear, the head included
    assert int4.padded == {f"layers.{i}.feed_forward.w2": [96, 128] for i in range(2)}
    assert int8.quantized == [] and set(int8.skipped.values()) == {"already quantized by linear:int4"}
    assert "quantized 15 of 15" in int4.summary() and "96->128" in int4.summary()


def test_tied_embeddings_stay_tied_when_neither_side_is_quantized(tied_dir, tmp_path):
    baked = bake_quantized(tied_dir, parse_quant('{"precision": {"dtype": "bf16"}}'), "fp32", tmp_path / "q")
    model = load_quantized(baked)
    assert model.output.weight is model.tok_embeddings.weight
    assert model.output.weight.dtype == torch.bfloat16


def test_gptq_without_calibration_fails_clearly(float_dir):
    model = build_model(read_checkpoint(float_dir))
    with pytest.raises(TorchatError, match="linear:gptq needs calibration"):
        quantize_model(model, parse_quant('{"linear:gptq": {}}'))


def test_not_a_quantized_checkpoint(float_dir):
    with pytest.raises(TorchatError, match="quant.json: missing"):
        load_quantized(float_dir)


def test_tampered_checkpoint_fails_clearly(float_dir, tmp_path):
    baked = bake_quantized(float_dir, parse_quant('{"linear:int4": {"group_size": 32}}'), "fp32", tmp_path / "q")
    manifest = json.loads((baked / "quant.json").read_text())
    manifest["modules"]["layers.0.attention.wq"]["kind"] = "int3_magic"
    (baked / "quant.json").write_text(json.dumps(manifest))
    with pytest.raises(TorchatError, match="int3_magic.*int4_weight_only"):
        load_quantized(baked)
    del manifest["modules"]["layers.0.attention.wq"]
    (baked / "quant.json").write_text(json.dumps(manifest))
    with pytest.raises(TorchatError, match="does not match quant.json"):
        load_quantized(baked)


def test_quantize_verb(float_dir, tmp_path, capsys):
    from torchat.cli import main

    out = tmp_path / "q"
    assert main(["quantize", "--checkpoint-dir", str(float_dir), "--quant", "{'linear:int4': {'groupsize': 32}}",
                 "--output-dir", str(out)]) == 0
    assert (out / "quant.json").is_file() and "quantized 15 of 15" in capsys.readouterr().err
    assert main(["quantize", "--checkpoint-dir", str(float_dir), "--quant", '{"linear:int4": {"groupsize": 48}}',
                 "--output-dir", str(tmp_path / "bad")]) == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "groupsize = 48" in err[0] and not (tmp_path / "bad").exists()
