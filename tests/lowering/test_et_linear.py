"""torchat::linear_q4's and torchat::linear_q8's kernels, ExecuTorch's (torchat/kernels/et_linear.cpp, run by the
pybindings) and torch's (torch_linear.cpp: eager and .pt2 on CPU), and torch's torchat::linear_w4 (linear_q4's
weights against a 16-bit input: int4 weight-only on CPU) against the packed layers written out in float64 (8da4w on
the asymmetric grid, whose weights for a GGUF tensor are gguf's dequantized ones, test_asym4.py; 8da8w's per-channel
int8 from torchao): decode and prefill, an input dim padded to the kernel's 64, a group of 64 (two blocks a scale),
row counts that leave the kernel's 4-row tiles a remainder (of 1, 2 and 3 rows), shapes large enough for the thread
pool, the norm, gate and residual a .pte's layer fuses into the op, and each of the kernel's code paths: built for
this machine (VNNI where it has it), for AVX2 without VNNI (x86-64-v3) and portable C++ (x86-64), each in a process
of its own (TORCHAT_KERNEL_MARCH keys the library torchat.kernels builds)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from gguf import GGMLQuantizationType
from torch import nn
from torch.export import Dim

from torchat.quant.asym4 import Int8DynActAsymInt4Linear, q4_block_parts
from torchat.quant.intx import Int8DynActInt8Linear, from_q8_layout

HERE = Path(__file__).resolve().parent
# (out_features, in_features, group_size, tokens, fused), GGUF Q4_1 weights (random ones for the large shapes);
# fused: with an RMSNorm before, the SiLU gate and a residual after (what a .pte's layer asks of the op)
CASES = [(64, 256, 32, (1, 7), False), (62, 80, 32, (1, 3), False), (36, 576, 64, (1, 5), False),
         (35, 192, 32, (1, 3), False),
         (1536, 576, 32, (1, 33), False), (577, 1536, 32, (1, 2), False), (64, 80, 32, (1, 4), True),
         (3072, 576, 32, (1, 9), True)]
EPS = 1e-5


class Linear(nn.Module):
    def __init__(self, layer, norm=None):
        super().__init__()
        self.layer, self.norm = layer, norm

    def forward(self, x, residual):
        if self.norm is None:
            return self.layer(x)
        return self.layer(x, norm=self.norm, eps=EPS, residual=residual, gated=True)


def reference(layer, x: torch.Tensor, norm=None, residual=None, levels: int = 127) -> torch.Tensor:
    """The packed layer written out: x quantized to int8 per block of 32 (levels 127; linear_w4: 16 bits, 32767) in
    float32, as the kernel rounds it, the rest in float64: for linear_q4 the codes times their fp16 scale against the
    int8 values, plus the fp16 offsets against the blocks' float sums; for linear_q8 the int8 weights against the
    int8 values, times the row's scale. (Packing's fp16 scales move a weight that lies on no fp16 grid a little:
    test_asym4 checks that a GGUF one stays exact.) With a norm: x RMS-normalized first (float32, as RMSNorm), then
    silu(gate) · up and the residual added, in float64."""
    if norm is not None:
        x = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + EPS) * norm
    if isinstance(layer, Int8DynActAsymInt4Linear):
        codes, scales, offsets = q4_block_parts(*layer.kernel_parts())
        weight = codes.double().view(layer.out_features, -1, 32) * scales.double()[..., None]
        offsets = offsets.double()
    else:
        codes, scales = layer.kernel_parts()
        weight = (from_q8_layout(codes).double() * scales.double()[:, None]).view(layer.out_features, -1, 32)
        offsets = torch.zeros(weight.shape[:2], dtype=torch.float64)
    blocks = nn.functional.pad(x, (0, weight.shape[1] * 32 - x.shape[-1])).unflatten(-1, (-1, 32))
    peak = blocks.abs().amax(-1, keepdim=True)
    q = torch.round(blocks * torch.where(peak > 0, levels / peak, 0.0)).double() * (peak.double() / levels)
    y = q.flatten(-2) @ weight.flatten(1).T + blocks.double().sum(-1) @ offsets.T
    if norm is None:
        return y
    gate, up = y.chunk(2, dim=-1)
    return gate * torch.sigmoid(gate) * up + residual.double()


def kernel_layer(kind: str, w: torch.Tensor, group: int):
    """The layer of `kind` (q4: 8da4w on the asymmetric grid, q8: 8da8w; w4: the q4 layer, whose parts linear_w4
    takes too) for weight w, packed and set to call the op itself (as torchat.lowering.et exports it), not its torch
    form."""
    if kind in ("q4", "w4"):
        layer = Int8DynActAsymInt4Linear.from_float(w, group)
    else:
        layer = Int8DynActInt8Linear.from_float(w)
    layer.pack()
    layer.set_kernel(True)
    return layer


KINDS = ("q4", "q8", "w4")
OPS = {"q4": "linear_q4", "q8": "linear_q8", "w4": "linear_w4"}
LEVELS = {"q4": 127, "q8": 127, "w4": 32767}
PTE_KINDS = ("q4", "q8")  # the ops with an ExecuTorch kernel


@pytest.fixture(scope="module")
def cases(tmp_path_factory):
    """Each case as an ExecuTorch program (the op undelegated, on the kernel; for the ops that have one) beside its
    inputs and the reference's outputs: a directory of case<i>.pte and case<i>.pt."""
    from executorch.exir import EdgeCompileConfig, to_edge
    from gguf.quants import dequantize, quantize

    directory = tmp_path_factory.mktemp("linear")
    for i, (kind, (n, k, group, tokens, fused)) in enumerate((kind, case) for kind in KINDS for case in CASES):
        generator = torch.Generator().manual_seed(i)
        width = -(-k // 32) * 32  # gguf quantizes whole blocks: the columns past k are dropped
        w = (torch.randn(n, width, generator=generator) * 0.05).numpy()
        if n * k < 500_000:
            w = dequantize(quantize(w, GGMLQuantizationType.Q4_1), GGMLQuantizationType.Q4_1).reshape(w.shape)
        layer = kernel_layer(kind, torch.from_numpy(w[:, :k].copy()), group)
        norm = torch.rand(k, generator=generator) + 0.5 if fused else None
        inputs = [(torch.randn(1, t, k, generator=generator) * 3, torch.randn(1, t, n // 2, generator=generator))
                  for t in tokens]
        expected = [reference(layer, x, norm, residual, LEVELS[kind]) for x, residual in inputs]
        torch.save({"inputs": inputs, "expected": expected, "op": OPS[kind], "parts": layer.kernel_parts(),
                    "norm": norm}, directory / f"case{i}.pt")
        if kind not in PTE_KINDS:
            continue
        seq = Dim("seq", max=64)
        example = (torch.zeros(1, 3, k), torch.zeros(1, 3, n // 2))
        exported = torch.export.export(Linear(layer, norm), example, dynamic_shapes=({1: seq}, {1: seq}))
        edge = to_edge(exported, compile_config=EdgeCompileConfig(_check_ir_validity=False))
        (directory / f"case{i}.pte").write_bytes(edge.to_executorch().buffer)
    return directory


# each case on both kernels: the .pte (ExecuTorch's) and the op called in torch (torch's CPU kernel), with the fused
# arguments the .pte's module passes
RUN = """
import os, sys, torch
from torchat.kernels import load_pte_runtime, load_torch_kernels
runtime = load_pte_runtime()
load_torch_kernels()
for i in range(int(sys.argv[2])):
    pte = f"{sys.argv[1]}/case{i}.pte"
    program = runtime._load_for_executorch(pte) if os.path.exists(pte) else None
    data = torch.load(f"{sys.argv[1]}/case{i}.pt", weights_only=True)
    op, norm = getattr(torch.ops.torchat, data["op"]), data["norm"]
    for (x, residual), expected in zip(data["inputs"], data["expected"]):
        fused = {} if norm is None else {"norm": norm, "eps": EPS, "residual": residual, "gated": True}
        ran = [op(x, *data["parts"], **fused)] + ([program.forward((x, residual))[0]] if program else [])
        for got in ran:
            assert got.shape == expected.shape, (i, got.shape, expected.shape)
            torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-4 * float(expected.abs().max()))
print("ok")
""".replace("EPS", repr(EPS))


@pytest.mark.parametrize("march", ["native", "x86-64-v3", "x86-64"])
def test_kernel_matches_the_layer_written_out(cases, march):
    if march != "native" and os.uname().machine != "x86_64":
        pytest.skip("an x86-64 code path")
    env = {**os.environ, "TORCHAT_KERNEL_MARCH": "" if march == "native" else march}
    result = subprocess.run([sys.executable, "-c", RUN, str(cases), str(len(KINDS) * len(CASES))], env=env,
                            capture_output=True, text=True, timeout=600)
    assert result.returncode == 0 and result.stdout.strip().endswith("ok"), result.stderr[-3000:]


@pytest.mark.parametrize("kind", KINDS)
def test_torch_form_is_the_layer_written_out(kind):
    """The op's torch form (what a CUDA model runs and compiles) agrees with the written-out layer too."""
    from torchat.quant.asym4 import linear_w4
    for n, k, group, tokens, fused in CASES[:4] + CASES[6:7]:
        generator = torch.Generator().manual_seed(n)
        layer = kernel_layer(kind, torch.randn(n, k, generator=generator) * 0.05, group)
        x, residual = torch.randn(2, tokens[-1], k, generator=generator), torch.randn(2, tokens[-1], n // 2)
        norm = torch.rand(k, generator=generator) + 0.5 if fused else None
        expected = reference(layer, x, norm, residual, LEVELS[kind])
        fused_args = {"norm": norm, "eps": EPS, "residual": residual, "gated": True} if fused else {}
        got = (linear_w4 if kind == "w4" else layer.torch_form)(x, *layer.kernel_parts(), **fused_args)
        torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-5 * float(expected.abs().max()))


@pytest.mark.parametrize("kind", PTE_KINDS)
def test_a_layer_on_cpu_runs_the_torch_kernel_in_any_float_dtype(kind):
    """On CPU a layer calls the op, which torch runs on torchat's C++ kernel: for bf16 and fp16 input as well (a
    .pt2 in bf16), reading x as float32 and answering in x's dtype, as the torch form does."""
    generator = torch.Generator().manual_seed(1)
    layer = kernel_layer(kind, torch.randn(96, 576, generator=generator) * 0.05, 32)
    layer.set_kernel(False)  # eager: the op on CPU all the same
    x = torch.randn(1, 3, 576, generator=generator)
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        got, expected = layer(x.to(dtype)), layer.torch_form(x.to(dtype), *layer.kernel_parts())
        assert got.dtype == dtype
        torch.testing.assert_close(got.float(), expected.float(), rtol=1e-2 if dtype != torch.float32 else 1e-5,
                                   atol=1e-2 * float(expected.abs().max()))
    with torch.profiler.profile() as profile:
        layer(x)
    assert any(event.name == f"torchat::{layer.op}" for event in profile.events())


def test_the_c_shims_are_defined_as_inductor_is_told():
    """torch_linear.cpp defines each C function that torchat.lowering.aoti declares to Inductor, with the same
    signature (the generated code calls it as declared; a mismatch would corrupt the call, not fail to link)."""
    import re

    from torchat.kernels import TORCH_C_SHIMS

    source = (Path(__file__).parents[2] / "torchat/kernels/torch_linear.cpp").read_text()
    defined = {" ".join(m.split()) for m in re.findall(r"^(AOTITorchError aoti_torch_cpu_\w+\([^)]*\))", source,
                                                        re.MULTILINE)}
    assert defined == set(TORCH_C_SHIMS.values())
    for name in TORCH_C_SHIMS:  # and each names its op's arguments in the schema's order
        arguments = [a.name for a in getattr(torch.ops.torchat, name).default._schema.arguments]
        declared = re.findall(r"(\w+)(?:,|\))", TORCH_C_SHIMS[name])
        assert declared == [*arguments, "ret0"], (name, declared)
