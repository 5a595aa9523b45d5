"""Each scheme runs under torch.export (what the lowering issue consumes) and torch.compile with the eager
numbers, and backend_support refuses the combinations whose numbers would be wrong."""

import pytest
import torch
from tiny_model import tiny_args, tiny_transformer

from torchat.errors import TorchatError
from torchat.model import Transformer
from torchat.quant import QUANTIZERS, backend_support, parse_quant, quantize_model
from torchat.quant.int4 import Int4WeightOnlyLinear
from torchat.quant.int8 import Int8WeightOnlyLinear
from torchat.quant.intx import Int8DynActInt4Linear, Int8DynActInt8Linear, QuantizedEmbedding

# hidden 96: w2's input is no multiple of 64, so group 64 exercises the padding
ARGS = tiny_args(hidden_dim=96)
CALIBRATION = torch.randint(0, ARGS.vocab_size, (2, 16), generator=torch.Generator().manual_seed(3))

EXPORT_SCHEMES = {
    "int8": '{"linear:int8": {"group_size": 0}}',
    "int8-g32": '{"linear:int8": {"group_size": 32}}',
    "int4-g64": '{"linear:int4": {"group_size": 64}}',
    "hqq-g32": '{"linear:hqq": {"group_size": 32}}',
    "gptq-g32": '{"linear:gptq": {"group_size": 32}}',
    "8da4w-g64": '{"linear:8da4w": {"group_size": 64}}',
    "8da8w": '{"linear:8da8w": {}}',
    "emb4": '{"embedding": {"bitwidth": 4, "group_size": 32}}',
    "bf16+int4": '{"precision": {"dtype": "bf16"}, "linear:int4": {"group_size": 32}}',
}


def tiny_model() -> Transformer:
    model = tiny_transformer(ARGS, std=None)
    with torch.no_grad():
        model.tok_embeddings.weight.mul_(0.05)  # a llama-like logit scale
    return model


def prefill_then_decode(run, model) -> torch.Tensor:
    """Logits of a 6-token prefill and one decode step, from fresh caches."""
    model.setup_caches(1, 32)
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        first = run(tokens, torch.arange(6))
        second = run(torch.tensor([[89]]), torch.tensor([6]))
    return torch.cat([first, second], dim=1)


@pytest.mark.parametrize("name", list(EXPORT_SCHEMES))
def test_quantized_model_exports_with_eager_numbers(name):
    model = tiny_model()
    quantize_model(model, parse_quant(EXPORT_SCHEMES[name]), CALIBRATION)
    eager = prefill_then_decode(model, model)
    model.setup_caches(1, 32)
    seq = torch.export.Dim("seq", min=1, max=32)
    with torch.no_grad():
        program = torch.export.export(model, (torch.tensor([[1, 2, 3]]), torch.arange(3)),
                                      dynamic_shapes=({1: seq}, {0: seq}), strict=False)
    exported = program.module()
    # the exported program holds its own copy of the (fresh) caches
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35]])
    with torch.no_grad():
        out = torch.cat([exported(tokens, torch.arange(6)), exported(torch.tensor([[89]]), torch.tensor([6]))], 1)
    torch.testing.assert_close(out, eager, atol=1e-4, rtol=1e-4)
    # each weight is carried once: no plain codes left beside a packed weight or a torchao subclass weight
    names = set(program.state_dict) | set(program.constants)
    runtime = {n.rsplit(".", 1)[0] for n in names if n.endswith((".packed_weight", ".weight"))}
    assert not {n for n in names if n.endswith(".qdata") and n.rsplit(".", 1)[0] in runtime}


def test_every_module_kind_compiles_with_eager_numbers():
    """One compile (they take tens of seconds here) over a model holding every quantized module kind."""
    model = tiny_model()
    w = lambda name: model.get_submodule(name).weight  # noqa: E731
    swaps = {
        "tok_embeddings": QuantizedEmbedding.from_float(w("tok_embeddings"), 4, 32),
        "layers.0.attention.wq": Int4WeightOnlyLinear.from_float(w("layers.0.attention.wq"), 32),
        "layers.0.attention.wk": Int4WeightOnlyLinear.from_float(w("layers.0.attention.wk"), 64, "hqq"),
        "layers.0.feed_forward.w2": Int4WeightOnlyLinear.from_float(w("layers.0.feed_forward.w2"), 64),  # padded
        "layers.0.attention.wv": Int8WeightOnlyLinear.from_float(w("layers.0.attention.wv"), 0),
        "layers.0.attention.wo": Int8WeightOnlyLinear.from_float(w("layers.0.attention.wo"), 32),
        "layers.1.feed_forward.w1": Int8DynActInt4Linear.from_float(w("layers.1.feed_forward.w1"), 32),
        "layers.1.feed_forward.w2": Int8DynActInt4Linear.from_float(w("layers.1.feed_forward.w2"), 64),  # padded
        "layers.1.feed_forward.w3": Int8DynActInt8Linear.from_float(w("layers.1.feed_forward.w3")),
    }
    for name, module in swaps.items():
        module.pack()
        model.set_submodule(name, module)
    tokens = torch.tensor([[3, 14, 15, 92, 65, 35]])
    model.setup_caches(1, 32)
    with torch.no_grad():
        eager = model(tokens, torch.arange(6))
        compiled = torch.compile(model, fullgraph=True, dynamic=False)(tokens, torch.arange(6))  # one graph
    torch.testing.assert_close(compiled, eager, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["linear:int8", "linear:int4", "linear:gptq", "linear:hqq"])
def test_weight_only_linear_is_refused_on_executorch(scheme):
    with pytest.raises(TorchatError, match=f"{scheme} is refused for backend et: .*silently wrong.*linear:8da4w"):
        backend_support(parse_quant(f'{{"{scheme}": {{}}}}'), "et")


def test_dynamic_activation_and_embedding_quant_are_allowed_on_executorch():
    backend_support(parse_quant('{"linear:8da8w": {}}'), "et")
    backend_support(parse_quant('{"linear:a8w4dq": {"groupsize": 32}, "embedding": {"bitwidth": 4, '
                                '"groupsize": 32}, "precision": {"dtype": "fp32"}}'), "et")


@pytest.mark.parametrize("backend", ["eager", "aoti"])
def test_every_scheme_is_allowed_on_eager_and_aoti(backend):
    backend_support([spec for scheme in QUANTIZERS for spec in parse_quant(f'{{"{scheme}": {{}}}}')], backend)


def test_unknown_backend_lists_the_backends():
    with pytest.raises(TorchatError, match="unknown backend 'tflite'; choose one of: aoti, eager, et"):
        backend_support([], "tflite")
