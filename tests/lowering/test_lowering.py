"""Exported artifacts against the eager model they came from: logits over prefill and decode, greedy tokens,
the KV cache restarting at position 0, metadata, the automatic check that refuses a wrong lowering, and the
combinations that are refused up front."""

import dataclasses
import json

import pytest
import torch
from tiny_model import TINY_CHECKPOINT_ARGS, TINY_CONTEXT, checkpoint_transformer, tiny_transformer

from torchat.cli import main
from torchat.errors import TorchatError
from torchat.exported import load_exported, read_metadata
from torchat.generate import EagerModel, Sampling, generate
from torchat.lowering import LOWERINGS, export_model
from torchat.quant import parse_quant, quantize_model

SUFFIXES = [".pt2", ".so", ".pte"]


def eager_model() -> EagerModel:
    return EagerModel(checkpoint_transformer(), TINY_CONTEXT)


def run_steps(model, steps):
    return [model.forward(tokens, positions).float() for tokens, positions in steps]


def steps_from(start: int, prompt: torch.Tensor, decodes: list[int]):
    """A prefill of `prompt` at `start`, then one decode step per id."""
    steps = [(prompt, torch.arange(start, start + prompt.shape[1]))]
    position = start + prompt.shape[1]
    for token in decodes:
        steps.append((torch.tensor([[token]]), torch.tensor([position])))
        position += 1
    return steps


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_prefill_and_decode_match_eager(tiny_artifacts, suffix):
    exported, eager = load_exported(tiny_artifacts[suffix]), eager_model()
    generator = torch.Generator().manual_seed(1)
    full = torch.randint(0, TINY_CHECKPOINT_ARGS["vocab_size"], (1, TINY_CONTEXT), generator=generator)
    # a long prompt, decodes, then a new generation from position 0 over stale cache slots, then a prompt
    # that fills the whole cache in one call, then a single-token prompt
    sequences = [steps_from(0, full[:, :29], [5, 17, 999]),
                 steps_from(0, full[:, 3:10], [1, 2]),
                 steps_from(0, full, []),
                 steps_from(0, full[:, :1], [7])]
    with torch.inference_mode():
        for steps in sequences:
            for got, expected in zip(run_steps(exported, steps), run_steps(eager, steps)):
                assert got.shape == expected.shape
                assert (got - expected).abs().max() <= 1e-4, suffix
                assert torch.equal(got.argmax(-1), expected.argmax(-1))


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_last_position_logits_share_the_cache(tiny_artifacts, suffix):
    """Generation's calls (last_only: a .pte's forward_last method, the others' logits sliced) between evaluation's
    (every position's: forward) on one KV cache, prompts and decode steps alike: each call's logits are the eager
    model's. A .pte's two methods share the cache: one with a cache of its own would miss the other's positions."""
    exported, eager = load_exported(tiny_artifacts[suffix]), eager_model()
    generator = torch.Generator().manual_seed(2)
    ids = torch.randint(0, TINY_CHECKPOINT_ARGS["vocab_size"], (1, 20), generator=generator)
    steps = steps_from(0, ids[:, :9], [5, 17]) + [(ids[:, 11:16], torch.arange(11, 16)), (ids[:, 16:17],
                                                                                       torch.tensor([16]))]
    with torch.inference_mode():
        for i, (tokens, positions) in enumerate(steps):
            last_only = i % 2 == 0
            got = exported.forward(tokens, positions, last_only=last_only)
            expected = eager.forward(tokens, positions)
            expected = expected[:, -1:] if last_only else expected
            assert got.shape == expected.shape, (i, suffix)
            assert (got - expected).abs().max() <= 1e-4, (i, suffix)
    if suffix == ".pte":
        from torchat.kernels import load_pte_runtime

        program = load_pte_runtime()._load_program(str(tiny_artifacts[suffix]))
        assert {"forward", "forward_last"} <= {program.get_method_name(i) for i in range(program.num_methods())}


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_greedy_tokens_match_eager(tiny_artifacts, suffix):
    prompt = [11, 250, 3, 42]
    eager = list(generate(eager_model(), prompt, 40, Sampling()))
    exported = list(generate(load_exported(tiny_artifacts[suffix]), prompt, 40, Sampling()))
    assert len(eager) == 40
    assert exported == eager


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_metadata_describes_the_artifact(tiny_artifacts, suffix):
    metadata = read_metadata(tiny_artifacts[suffix])
    assert metadata.backend == LOWERINGS[suffix].backend
    assert metadata.model_args["dim"] == TINY_CHECKPOINT_ARGS["dim"]
    assert metadata.vocab_size == TINY_CHECKPOINT_ARGS["vocab_size"]
    assert (metadata.max_seq_len, metadata.dtype, metadata.device, metadata.quant) == (TINY_CONTEXT, "fp32",
                                                                                       "cpu", [])
    assert (metadata.tokenizer_kind, metadata.tokenizer_file) == ("gguf", "tokenizer.gguf")
    assert (tiny_artifacts[suffix].parent / "tokenizer.gguf").is_file()
    assert len(metadata.build_key) == 64 and metadata.toolchain["torch"] == torch.__version__


def test_build_key_covers_weights_and_backend(tiny_artifacts):
    keys = {suffix: read_metadata(path).build_key for suffix, path in tiny_artifacts.items()}
    assert keys[".pte"] != keys[".pt2"]  # different backend, same weights


def test_pte_constant_methods_for_a_cpp_runner(tiny_artifacts):
    from executorch.extension.pybindings.portable_lib import _load_for_executorch

    module = _load_for_executorch(str(tiny_artifacts[".pte"]))
    assert module.run_method("get_max_seq_len", ())[0] == TINY_CONTEXT
    assert module.run_method("get_vocab_size", ())[0] == TINY_CHECKPOINT_ARGS["vocab_size"]


def test_pte_runs_each_layer_as_one_xnnpack_call(tiny_artifacts):
    """XNNPACK takes a whole layer between two attention calls: the program calls its delegate once a layer plus
    once for the head, and runs outside it only the embedding, the RoPE tables' rows and one torchat::attention a
    layer (RoPE, the cache writes and sdpa on the fused q/k/v projection, no slices of it: a layer broken into
    several calls costs ~16 us a call; SmolLM2 went from 122 to 31 calls a token)."""
    from collections import Counter

    from executorch.exir._serialize._program import deserialize_pte_binary

    program = deserialize_pte_binary(tiny_artifacts[".pte"].read_bytes())
    program = getattr(program, "program", program)
    plan = next(plan for plan in program.execution_plan if plan.name == "forward")
    kinds = Counter(type(instruction.instr_args).__name__ for chain in plan.chains
                    for instruction in chain.instructions)
    assert kinds["DelegateCall"] == TINY_CHECKPOINT_ARGS["n_layers"] + 1
    kernels = Counter(plan.operators[instruction.instr_args.op_index].name for chain in plan.chains
                      for instruction in chain.instructions if type(instruction.instr_args).__name__ == "KernelCall")
    assert not {"aten::mean", "aten::split_with_sizes_copy", "aten::slice_copy", "aten::unsqueeze_copy"} & set(
        kernels), kernels
    assert kernels["torchat::attention"] == TINY_CHECKPOINT_ARGS["n_layers"], kernels


def test_pt2_metadata_visible_to_the_aoti_loader(tiny_artifacts):
    runner = torch._inductor.aoti_load_package(str(tiny_artifacts[".pt2"]))
    assert runner.get_metadata()["max_seq_len"] == str(TINY_CONTEXT)


@pytest.mark.parametrize("suffix", SUFFIXES)
def test_positions_beyond_the_cache_are_refused(tiny_artifacts, suffix):
    exported = load_exported(tiny_artifacts[suffix])
    with pytest.raises(TorchatError, match="outside its KV cache"):
        exported.forward(torch.tensor([[1]]), torch.tensor([TINY_CONTEXT]))


def test_wrong_lowering_fails_the_export_and_publishes_nothing(tmp_path, monkeypatch):
    """A lowering that runs but computes something else (here: weights scaled) must not be published."""
    pte = LOWERINGS[".pte"]

    def wrong_lower(programs, metadata, output):
        for program in programs.values():
            program.state_dict["norm.weight"] = torch.nn.Parameter(program.state_dict["norm.weight"] * 1.5,
                                                                   requires_grad=False)
        pte.lower(programs, metadata, output)

    monkeypatch.setitem(LOWERINGS, ".pte", dataclasses.replace(pte, lower=wrong_lower))
    model = tiny_transformer()
    with pytest.raises(TorchatError, match="disagrees with the eager model"):
        export_model(model, tmp_path / "wrong.pte", max_seq_len=16, dtype="fp32")
    assert list(tmp_path.iterdir()) == []


def test_wrong_quantized_lowering_fails_the_export(tiny_artifacts, tmp_path, monkeypatch):
    """The dynamic-activation bound (a quarter of the logit scale) still refuses a lowering whose final norm is
    off by a half, which the right lowering of the same 8da4w model passes (the shared export: made, so checked)."""
    pte = LOWERINGS[".pte"]
    quant = {"linear:8da4w": {"group_size": 32, "grid": "asymmetric"}}
    assert tiny_artifacts.get(".pte", quant).is_file()

    def wrong_lower(programs, metadata, output):
        for program in programs.values():
            program.state_dict["norm.weight"] = torch.nn.Parameter(program.state_dict["norm.weight"] * 1.5,
                                                                   requires_grad=False)
        pte.lower(programs, metadata, output)

    model = checkpoint_transformer()
    with torch.no_grad():
        quantize_model(model, parse_quant(json.dumps(quant)))
    monkeypatch.setitem(LOWERINGS, ".pte", dataclasses.replace(pte, lower=wrong_lower))
    with pytest.raises(TorchatError, match="disagrees with the eager model"):
        export_model(model, tmp_path / "wrong.pte", max_seq_len=TINY_CONTEXT, dtype="fp32", quant=[quant])
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("flags, message", [
    (["--output-pte-path", "m.pte", "--dtype", "bf16"], "does not take --dtype bf16"),
    (["--output-pte-path", "m.pt2"], "must end in .pte"),
    (["--output-path", "m.onnx"], "unknown artifact suffix"),
    (["--output-pt2-path", "m.pt2"], None),
])
def test_unsupported_requests_are_refused_before_lowering(tiny_checkpoint, tmp_path, capsys, flags, message):
    flags = [tmp_path / f if f.startswith("m.") else f for f in flags]
    if message is None:
        with pytest.raises(SystemExit):
            main(["export", "--checkpoint-dir", str(tiny_checkpoint), *map(str, flags)])
        return
    assert main(["export", "--checkpoint-dir", str(tiny_checkpoint), *map(str, flags)]) == 1
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir())


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the refusal on a machine without CUDA")
def test_cuda_export_refused_without_cuda(tiny_checkpoint, tmp_path, capsys):
    assert main(["export", "--checkpoint-dir", str(tiny_checkpoint), "--device", "cuda",
                 "--output-path", str(tmp_path / "m.pt2")]) == 1
    assert "CUDA" in capsys.readouterr().err
