"""Quantized exports reproduce the eager quantized model, and the combinations a backend would run wrongly are
refused before anything is lowered."""

import json

import pytest
import torch
from tiny_model import TINY_CONTEXT, checkpoint_transformer

from torchat.cli import main
from torchat.exported import load_exported, read_metadata
from torchat.generate import EagerModel, Sampling, generate
from torchat.lowering.parity import TOLERANCES
from torchat.quant import parse_quant, quantize_model

# (quant JSON, artifact suffix): what XNNPACK and torchat's kernels run correctly, and AOTI's own paths
SUPPORTED = [
    ({"linear:8da4w": {"group_size": 32}, "embedding": {"bitwidth": 4, "group_size": 32}}, ".pte"),
    ({"linear:8da4w": {"group_size": 32, "grid": "asymmetric"}}, ".pte"),
    ({"embedding": {"bitwidth": 8, "group_size": 0}}, ".pte"),
    ({"linear:8da8w": {}}, ".pte"),
    ({"linear:8da4w": {"group_size": 32}}, ".pt2"),
    ({"linear:8da4w": {"group_size": 32, "grid": "asymmetric"}}, ".pt2"),  # torchat::linear_q4, C shim
    ({"linear:int4": {"group_size": 32}}, ".pt2"),  # torchat::linear_w4, C shim
    ({"linear:int4": {"group_size": 32}}, ".so"),
]


def eager_quantized(quant: dict) -> EagerModel:
    model = checkpoint_transformer()
    with torch.no_grad():
        quantize_model(model, parse_quant(json.dumps(quant)))
    return EagerModel(model, TINY_CONTEXT)


@pytest.mark.parametrize("quant, suffix", SUPPORTED, ids=lambda v: v if isinstance(v, str) else "+".join(v))
def test_quantized_artifact_reproduces_eager_quantized(tiny_artifacts, quant, suffix):
    output = tiny_artifacts.get(suffix, quant)
    exported, eager = load_exported(output), eager_quantized(quant)
    schemes = [spec.scheme for spec in parse_quant(json.dumps(quant))]
    assert [spec["scheme"] for spec in read_metadata(output).quant] == schemes
    tolerance = TOLERANCES[("fp32", True)]
    prompt = [11, 250, 3, 42, 97, 5]
    eager_tokens = list(generate(eager, prompt, 24, Sampling()))
    # teacher-forced along eager's greedy path, so one flipped argmax does not derail the comparison
    steps = [(torch.tensor([prompt]), torch.arange(len(prompt)))]
    steps += [(torch.tensor([[t]]), torch.tensor([len(prompt) + i])) for i, t in enumerate(eager_tokens[:-1])]
    with torch.inference_mode():
        for tokens, positions in steps:
            expected, got = eager.forward(tokens, positions), exported.forward(tokens, positions)
            assert (got - expected).abs().max() <= tolerance.allowed(float(expected.abs().max()))
    # AOTI runs the same quantized kernels as eager: the same greedy tokens (but linear_q4 rounds its input to int8,
    # and Inductor's arithmetic around it can land a value the other side of a tie: the logits bound holds it)
    if suffix == ".pt2" and quant.get("linear:8da4w", {}).get("grid") != "asymmetric":
        assert list(generate(exported, prompt, 24, Sampling())) == eager_tokens


@pytest.mark.parametrize("scheme", ["linear:int8", "linear:int4", "linear:hqq"])
def test_weight_only_linear_to_executorch_is_refused(tiny_checkpoint, tmp_path, capsys, scheme):
    rc = main(["export", "--checkpoint-dir", str(tiny_checkpoint), "--output-pte-path", str(tmp_path / "m.pte"),
               "--quant", json.dumps({scheme: {"group_size": 32}})])
    assert rc == 1
    err = capsys.readouterr().err
    assert "refused for backend et" in err and "8da4w" in err
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("quant, op, head", [
    ({"linear:8da4w": {"group_size": 32, "grid": "asymmetric"}}, "torchat::linear_q4", "torchat::linear_q4"),
    ({"linear:8da8w": {}}, "torchat::linear_q8", "torchat::linear_q8"),
    ({"linear:8da4w": {"group_size": 32, "grid": "asymmetric", "head_bitwidth": 8}}, "torchat::linear_q4",
     "torchat::linear_q8")], ids=["asymmetric-8da4w", "8da8w", "8-bit-head"])
def test_kernel_schemes_run_their_linears_on_torchats_kernels(tiny_artifacts, quant, op, head):
    """Every linear on the asymmetric 4-bit grid runs on torchat::linear_q4, every 8da8w one (the presets' 8-bit head
    too) on torchat::linear_q8, with the layer's norms, gate and residual adds fused in
    (torchat.lowering.fusion.KernelBlock): four calls a layer (q, k and v as one, w1 and w3 as one) and the head, and
    between them one torchat::attention (RoPE, the cache writes, sdpa); XNNPACK keeps what is left (the final norm)."""
    from collections import Counter

    from executorch.exir._serialize._program import deserialize_pte_binary
    from tiny_model import TINY_CHECKPOINT_ARGS

    path = tiny_artifacts.get(".pte", quant)
    program = deserialize_pte_binary(path.read_bytes())
    program = getattr(program, "program", program)
    plan = next(plan for plan in program.execution_plan if plan.name == "forward")
    instructions = [instruction.instr_args for chain in plan.chains for instruction in chain.instructions]
    calls = Counter(plan.operators[args.op_index].name for args in instructions
                    if type(args).__name__ == "KernelCall")
    layers = TINY_CHECKPOINT_ARGS["n_layers"]
    expected = Counter({op: 4 * layers, "torchat::attention": layers}) + Counter({head: 1})
    assert {name: calls[name] for name in expected} == dict(expected)
    assert "llama::update_cache" not in calls and "torchat::sdpa" not in calls
    assert any(type(args).__name__ == "DelegateCall" for args in instructions)


@pytest.mark.parametrize("quant", [{}, {"linear:8da4w": {"group_size": 32}}, {"linear:8da8w": {}},
                                   {"linear:8da4w": {"group_size": 32, "grid": "asymmetric"}}], ids=json.dumps)
def test_fused_qkv_projection_is_the_three_projections_side_by_side(quant):
    """The .pte's one q/k/v GEMM (torchat.lowering.fusion.fused_linear) computes what wq, wk and wv compute apart:
    the same codes and scales, and the same activation quantization."""
    from tiny_model import tiny_transformer

    from torchat.lowering.fusion import fused_linear

    model = tiny_transformer()
    if quant:
        quantize_model(model, parse_quant(json.dumps(quant)))
    attention = model.layers[0].attention
    projections = [attention.wq, attention.wk, attention.wv]
    fused = fused_linear(projections)
    assert fused is not None and type(fused) is type(attention.wq)
    x = torch.randn(2, 5, model.args.dim, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(fused(x), torch.cat([p(x) for p in projections], dim=-1), rtol=1e-5, atol=1e-5)
    if quant:  # a quantized and a float projection have no one form
        assert fused_linear([attention.wq, torch.nn.Linear(model.args.dim, 8, bias=False)]) is None


@pytest.mark.parametrize("quant, dtype", [({}, "FLOAT"), ({"linear:8da8w": {}}, "HALF"),
                                          ({"linear:8da4w": {"group_size": 32, "grid": "asymmetric"}}, "HALF")],
                         ids=["fp32", "8da8w", "8da4w-asymmetric"])
def test_pte_kv_cache_is_fp16_when_quantized(tiny_artifacts, quant, dtype):
    """A quantized .pte keeps its KV cache in fp16 (half the bytes a long-context step reads; its parity with the
    eager fp32-cache model is the test above), an fp32 .pte in fp32: the dtype of the program's cache tensors, the
    static (1, max_seq_len, kv_heads, head_dim) buffers llama::update_cache writes (k and v as they come out of
    the projections have that shape as their bound, but a dynamic one)."""
    from executorch.exir._serialize._program import deserialize_pte_binary
    from executorch.exir.schema import ScalarType, TensorShapeDynamism
    from tiny_model import TINY_CHECKPOINT_ARGS

    path = tiny_artifacts.get(".pte", quant)
    program = deserialize_pte_binary(path.read_bytes())
    program = getattr(program, "program", program)
    plan = next(plan for plan in program.execution_plan if plan.name == "forward")
    args = TINY_CHECKPOINT_ARGS
    shape = [1, read_metadata(path).max_seq_len, args["n_kv_heads"], args["dim"] // args["n_heads"]]
    caches = [value.val for value in plan.values if type(value.val).__name__ == "Tensor" and
              list(value.val.sizes) == shape and value.val.shape_dynamism == TensorShapeDynamism.STATIC]
    assert len(caches) == 2 * args["n_layers"], len(caches)
    assert {cache.scalar_type for cache in caches} == {getattr(ScalarType, dtype)}
