"""`torchat bench` produces well-formed results on a tiny model. A smoke test: no speed is asserted anywhere."""

import json

import pytest

from torchat.bench import bench_prompt, ratios, render_markdown, seed_table, weight_bytes_per_token
from torchat.cli import main
from torchat.configs import KNOWN_CONFIGS

FAST = ["--prompt-tokens", "12", "--new-tokens", "6", "--runs", "2", "--warmup-runs", "1",
        "--bandwidth-gb-s", "10", "--allow-contended"]


def check_stat(stat: dict, runs: int):
    assert len(stat["runs"]) == runs
    assert stat["min"] <= stat["median"] <= stat["max"]
    assert stat["min"] > 0


def check_result(result: dict, runs: int = 2):
    assert result["schema"] == 1 and result["system"] == "torchat"
    for metric in ("prefill_tok_s", "decode_tok_s", "ttft_s"):
        check_stat(result[metric], runs)
    assert result["prompt_tokens"] == 12 and result["new_tokens"] == 6
    assert result["peak_rss_mib"] > 0 and result["artifact_bytes"] > 0
    assert result["tokens_agree"] is True and len(result["tokens_head"]) == 6
    assert isinstance(result["contended"], bool) and 0 <= result["others_cpu"]["max"] <= 1
    roof = result["roofline"]
    assert roof["bandwidth_gb_s"] == 10 and roof["weight_bytes_per_token"] > 0
    assert roof["fraction"]["median"] == pytest.approx(result["decode_tok_s"]["median"] / roof["ceiling_tok_s"],
                                                       rel=0.01, abs=1e-3)


def test_bench_writes_json_markdown_and_plot(tiny_checkpoint, tmp_path):
    out = tmp_path / "out"
    assert main(["bench", "--checkpoint-dir", str(tiny_checkpoint), "--modes", "eager", *FAST,
                 "--output-dir", str(out)]) == 0
    report = json.loads((out / "bench.json").read_text())
    assert report["bandwidth_gb_s"] == 10 and report["ratios"] == []
    [result] = report["results"]
    check_result(result)
    assert result["mode"] == "eager" and result["precision"] == "fp32"
    markdown = (out / "bench.md").read_text()
    assert "| system | precision | prefill tok/s | decode tok/s |" in markdown
    assert "torchat eager fp32" in markdown
    assert (out / "bench.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_build_graph_form_reads_a_quantized_artifact(tiny_checkpoint, tmp_path):
    """`doit bench:TARGET` runs `torchat bench --artifact-dir D --checkpoint-dir C --backend B --output-dir OUT`."""
    from torchat.quant import bake_quantized, parse_quant

    baked = bake_quantized(tiny_checkpoint, parse_quant('{"linear:int8": {"group_size": 0}}'), "fp32",
                           tmp_path / "int8")
    out = tmp_path / "out"
    assert main(["bench", "--artifact-dir", str(baked), "--checkpoint-dir", str(tiny_checkpoint),
                 "--backend", "eager", "--modes", "eager", *FAST, "--output-dir", str(out)]) == 0
    [result] = json.loads((out / "bench.json").read_text())["results"]
    check_result(result)
    assert result["precision"] == "int8" and result["quant"] == "int8 + fp32"


def test_a_failed_measurement_fails_the_command(tmp_path, capsys):
    assert main(["bench", "--aoti-package-path", str(tmp_path / "missing.pt2"), *FAST]) == 1
    assert "failed" in capsys.readouterr().err


def test_weight_bytes_per_token_of_smollm2():
    args = KNOWN_CONFIGS["SmolLM2-135M"]
    params = 134_479_872  # every matrix a token passes through, the tied head included (notes: "134.5 M")
    assert weight_bytes_per_token(args, [], "fp32") == params * 4
    assert weight_bytes_per_token(args, [{"scheme": "precision", "options": {"dtype": "bf16"}}], "fp32") == params * 2
    int4 = weight_bytes_per_token(args, [{"scheme": "linear:int4", "options": {"group_size": 32}}], "fp32")
    assert int4 == pytest.approx(params * 5 / 8, rel=0.01)  # 4 bits + a bf16 scale and zero per 32
    # 8 bits + one fp32 scale per output channel
    for scheme in ("linear:int8", "linear:8da8w"):
        int8 = weight_bytes_per_token(args, [{"scheme": scheme, "options": {"group_size": 0}}], "fp32")
        assert params < int8 < params * 1.01


def test_prompt_is_fixed_prose(botchan_sp_models):
    from torchat.tokenizers import load_tokenizer

    tokenizer = load_tokenizer(botchan_sp_models["bpe"])
    assert bench_prompt(tokenizer, 64) == bench_prompt(tokenizer, 128)[:64]


def fake(system, mode, precision, decode, prefill=100.0):
    stat = lambda v: {"median": v, "min": v, "max": v, "runs": [v]}  # noqa: E731
    return {"system": system, "mode": mode, "precision": precision, "quant": precision,
            "decode_tok_s": stat(decode), "prefill_tok_s": stat(prefill), "ttft_s": stat(0.1), "peak_rss_mib": 1,
            "others_cpu": stat(0.0), "contended": False, "tokens_agree": True, "artifact_bytes": 1,
            "prompt_tokens": 1, "new_tokens": 1, "threads": 2, "config": {"runs": 1, "warmup_runs": 1},
            "toolchain": {}, "host": {"machine": "x86_64", "cores": 2, "cpu": "cpu", "os": "Linux", "isa": []}}


def test_ratios_pair_each_precision_with_its_peer():
    results = [fake("torchat", "aoti", "int4", 90), fake("torchat", "eager", "bf16", 20),
               fake("llama.cpp", "llama.cpp", "int4", 60), fake("transformers", "transformers", "fp32", 10)]
    made = {r["ours"]: r for r in ratios(results)}
    assert made["torchat AOT compile int4"]["decode"] == 1.5
    assert made["torchat AOT compile int4"]["peer"] == "llama.cpp int4"
    assert made["torchat eager bf16"]["decode"] == 2.0
    table = seed_table(results, "int4")
    assert table[0].startswith("| Hardware | OS | eager | eager + compile | AOT compile | ET Runtime |")
    assert "| - | - | 90.0 (int4) | - |" in table[2]
    assert "Ratios against the peer" in render_markdown(results)


def test_a_pte_is_measured_on_executorchs_pool(tiny_checkpoint, tiny_artifacts, tmp_path):
    """A .pte's child runs with OpenMP on one thread and --threads sizing ExecuTorch's pool (torchat/threads.py),
    whose size the result reports."""
    out = tmp_path / "out"
    assert main(["bench", "--pte-path", str(tiny_artifacts[".pte"]),
                 "--tokenizer-path", str(tiny_checkpoint / "tokenizer.gguf"),
                 "--threads", "1", *FAST, "--output-dir", str(out)]) == 0
    [result] = json.loads((out / "bench.json").read_text())["results"]
    check_result(result)
    assert result["mode"] == "et" and result["threads"] == 1


@pytest.mark.parametrize("quant", ['{"linear:8da4w": {"group_size": 32, "grid": "asymmetric", "head_bitwidth": 8}}',
                                   '{"linear:8da4w": {"group_size": 32, "grid": "asymmetric"}}',
                                   '{"linear:8da8w": {}}', '{"linear:int4": {"group_size": 32, "head_bitwidth": 8}}',
                                   '{"linear:int4": {"group_size": 32}}'])
def test_weight_bytes_per_token_are_what_the_kernels_read(quant):
    """The count from the specs alone against the tensors torchat's kernels read for every linear of the tiny model
    (Llama-3.2-1B's proportions: every input a multiple of 64), quantized and packed for CPU: each layer's runtime
    parts, codes, scales and offsets, the head's 8 bits where the spec keeps them."""
    from tiny_model import tiny_args, tiny_transformer

    from torchat.quant import parse_quant
    from torchat.quant.asym4 import KernelLinear
    from torchat.quant.int4 import Int4WeightOnlyLinear
    from torchat.quant.quantizer import pack_model, quantize_model

    model = tiny_transformer(tiny_args(hidden_dim=192))
    specs = parse_quant(quant)
    quantize_model(model, specs)
    pack_model(model)
    layers = [m for m in model.modules() if isinstance(m, (KernelLinear, Int4WeightOnlyLinear))]
    assert len(layers) == 7 * model.args.n_layers + 1
    parts = [layer.kernel_parts() if isinstance(layer, KernelLinear) else
             (layer.packed_weight, layer.q4_scales, layer.q4_offsets) for layer in layers]
    read = sum(t.nbytes for layer_parts in parts for t in layer_parts)
    assert weight_bytes_per_token(model.args.to_dict(), [s.to_dict() for s in specs], "fp32") == read
