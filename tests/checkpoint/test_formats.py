"""Each checkpoint format round-trips: a random stories15M-shaped model written in the llama2.c, gpt-fast,
Meta and Hugging Face layouts loads to identical logits, and those equal transformers' own LlamaForCausalLM."""

import json
import subprocess
import sys

import pytest
import torch

from torchat.checkpoint import build_model, detect_format, read_checkpoint, resolve_args
from torchat.checkpoint.base import permute_hf_to_meta
from torchat.convert import convert_checkpoint
from torchat.errors import TorchatError

transformers = pytest.importorskip("transformers")

STORIES15M = dict(dim=288, n_layers=6, n_heads=6, n_kv_heads=6, vocab_size=32000, hidden_dim=768,
                  norm_eps=1e-5, rope_theta=10000.0, max_seq_len=256)


@pytest.fixture(scope="module")
def hf_model(tmp_path_factory):
    """transformers' LlamaForCausalLM with random weights, saved with save_pretrained (the independent writer)."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(hidden_size=288, intermediate_size=768, num_hidden_layers=6,
                                      num_attention_heads=6, num_key_value_heads=6, vocab_size=32000,
                                      rms_norm_eps=1e-5, rope_theta=10000.0, max_position_embeddings=256,
                                      tie_word_embeddings=False)
    model = transformers.LlamaForCausalLM(config).eval()
    directory = tmp_path_factory.mktemp("stories15M-hf")
    model.save_pretrained(directory)
    return model, directory


@pytest.fixture(scope="module")
def tokens():
    return torch.randint(0, 32000, (1, 33), generator=torch.Generator().manual_seed(1))


def logits_of(path, tokens, fmt=None, args=None):
    model = build_model(read_checkpoint(path, fmt, args))
    with torch.no_grad():
        return model(tokens)


def meta_layout(state_dict, n_heads=6):
    """Our rotate-half state dict as Meta/llama2.c store it: q/k rows in interleaved pairs."""
    out = dict(state_dict)
    for name in state_dict:
        if name.endswith(("attention.wq.weight", "attention.wk.weight")):
            out[name] = permute_hf_to_meta(state_dict[name], n_heads)
    return out


def test_hf_layout_matches_transformers(hf_model, tokens):
    model, directory = hf_model
    assert detect_format(directory) == "hf"
    with torch.no_grad():
        reference = model(tokens).logits
    torch.testing.assert_close(logits_of(directory, tokens), reference, atol=1e-4, rtol=1e-4)


def test_llama2c_gptfast_meta_layouts_match_hf(hf_model, tokens, tmp_path):
    _, directory = hf_model
    canonical = read_checkpoint(directory)
    expected = logits_of(directory, tokens)
    meta_sd = meta_layout(canonical.state_dict)

    # llama2.c's train.py format: the model plus its model_args (hidden_dim absent, as llama2.c leaves it)
    llama2c = tmp_path / "stories15M" / "stories15M.pt"
    llama2c.parent.mkdir()
    model_args = {k: STORIES15M[k] for k in ("dim", "n_layers", "n_heads", "n_kv_heads", "vocab_size",
                                             "norm_eps", "max_seq_len")} | {"multiple_of": 32, "dropout": 0.0}
    torch.save({"model": {"_orig_mod." + k: v for k, v in meta_sd.items()}, "model_args": model_args,
                "iter_num": 1000}, llama2c)
    assert detect_format(llama2c) == "llama2c"
    assert torch.equal(logits_of(llama2c, tokens), expected)

    # gpt-fast: a bare state dict with q, k, v fused into wqkv; the config comes from the directory name
    gptfast = tmp_path / "stories15M-gptfast" / "model.pth"
    gptfast.parent.mkdir()
    fused = {k: v for k, v in meta_sd.items() if ".wq." not in k and ".wk." not in k and ".wv." not in k}
    for i in range(6):
        p = f"layers.{i}.attention."
        fused[p + "wqkv.weight"] = torch.cat([meta_sd[p + "wq.weight"], meta_sd[p + "wk.weight"],
                                              meta_sd[p + "wv.weight"]])
    torch.save(fused, gptfast)
    untied = dict(STORIES15M)
    assert torch.equal(logits_of(gptfast, tokens, args=resolve_args(params_path=_params_file(tmp_path, untied))),
                       expected)

    # Meta's release layout, split into two model-parallel shards
    meta = tmp_path / "meta"
    meta.mkdir()
    split_dims = {"tok_embeddings": 1, "output": 0, "wq": 0, "wk": 0, "wv": 0, "wo": 1, "w1": 0, "w3": 0, "w2": 1}
    shards = [{}, {}]
    for name, tensor in meta_sd.items():
        dim = split_dims.get(name.split(".")[-2])
        parts = tensor.chunk(2, dim=dim) if dim is not None else (tensor, tensor)
        for shard, part in zip(shards, parts):
            shard[name] = part.clone()
    for i, shard in enumerate(shards):
        torch.save(shard, meta / f"consolidated.{i:02d}.pth")
    (meta / "params.json").write_text(json.dumps({k: STORIES15M[k] for k in ("dim", "n_layers", "n_heads",
                                                  "norm_eps")} | {"vocab_size": -1, "multiple_of": 32}))
    assert detect_format(meta) == "meta"
    assert torch.equal(logits_of(meta, tokens), expected)


def _params_file(tmp_path, values):
    path = tmp_path / "params.json"
    path.write_text(json.dumps(values))
    return path


def test_convert_round_trips_and_publishes_atomically(hf_model, tokens, tmp_path):
    _, directory = hf_model
    out = convert_checkpoint(directory, tmp_path / "converted")
    assert sorted(p.name for p in out.iterdir()) == ["metadata.json", "model.safetensors", "model_args.json"]
    assert detect_format(out) == "torchat"
    assert torch.equal(logits_of(out, tokens), logits_of(directory, tokens))
    assert [p.name for p in tmp_path.iterdir()] == ["converted"]  # no temporary directory left behind


class NotATensor:
    pass


def test_pickled_object_is_refused(tmp_path):
    path = tmp_path / "evil.pt"
    torch.save({"model": {"tok_embeddings.weight": torch.zeros(2, 2)}, "payload": NotATensor()}, path)
    with pytest.raises(TorchatError, match="refused to unpickle"):
        read_checkpoint(path, args=resolve_args("stories15M"))


def cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "torchat", *args], capture_output=True, text=True, cwd=cwd)


def test_cli_bad_inputs_print_one_line_and_exit_nonzero(tmp_path):
    evil = tmp_path / "evil.pt"
    torch.save({"payload": NotATensor()}, evil)
    out = tmp_path / "out"
    for args, needle in [
        (["convert", "--checkpoint-path", str(evil), "--params-table", "stories15M", "--output-dir", str(out)],
         "refused to unpickle"),
        (["convert", "--checkpoint-path", str(evil), "--params-table", "stories16M", "--output-dir", str(out)],
         "unknown --params-table 'stories16M'"),
        (["convert", "--checkpoint-path", str(tmp_path / "missing.pt"), "--output-dir", str(out)],
         "no such file"),
    ]:
        result = cli(*args)
        assert result.returncode != 0
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and needle in lines[0], result.stderr
        assert not out.exists()
