"""SmolLM2-135M fp32 end to end: greedy 64 tokens identical across eager, AOTI and ExecuTorch, and the logits
along that path within 1e-4 (AOTI) / 2e-4 (ExecuTorch) of eager, and each artifact about as far from exact
arithmetic (the same model in float64) as eager fp32 itself is. The artifacts are the build graph's own
(`doit build:smollm2-135m-none-fp32-aoti`, `...-fp32-et`), realized through the artifact store by their content key
(tests/conftest.py smollm2_artifact), so a rerun with the same code exports nothing."""

import pytest
import torch

from torchat.checkpoint import build_model, read_checkpoint
from torchat.exported import load_exported
from torchat.generate import EagerModel, Sampling, generate
from torchat.tokenizers import load_tokenizer

MAX_SEQ_LEN = 128  # the eager reference's KV cache: the prompt and 64 new tokens fit
PROMPT = "The history of the printing press begins"
NEW_TOKENS = 64
# AOTI stays within 1e-4 (measured 4.0e-5 to 5.4e-5). XNNPACK's fp32 GEMMs accumulate in another order than
# eager's: over 64 steps it drifts to 1.5e-4 (AVX2) / 1.8e-4 (AVX-512) on logits of scale 33.5 (~5e-6 relative),
# with identical greedy tokens. That is no lowering error: eager fp32 is itself 1.13e-4 from the float64 model
# along this path, so no artifact with its own summation order can come within 1e-4 of eager. Measured distance
# to float64 (AVX-512): eager 1.13e-4, .pt2 1.08e-4, .pte 1.62e-4 with torchat's sdpa kernel (1.88e-4 on
# ExecuTorch's custom_sdpa).
LOGITS_TOLERANCE = {".pt2": 1e-4, ".pte": 2e-4}
# an artifact's distance to the float64 model, as a multiple of eager fp32's own. That one depends on the machine's
# BLAS: 1.13e-4 on an AMD EPYC, 3.05e-5 on an Intel Xeon (where the .pte measured 1.71e-4, as on the EPYC); where eager
# is that close, the artifact is held to its tolerance against eager instead.
EXACT_ERROR_RATIO = 2.0


@pytest.fixture(scope="module")
def eager_run(smollm2_gguf):
    """(prompt ids, eager greedy ids, eager logits per step along that path)."""
    model = build_model(read_checkpoint(smollm2_gguf))
    prompt = load_tokenizer(smollm2_gguf).encode(PROMPT)
    eager = EagerModel(model, MAX_SEQ_LEN)
    tokens = list(generate(eager, prompt, NEW_TOKENS, Sampling()))
    return prompt, tokens, teacher_forced_logits(EagerModel(model, MAX_SEQ_LEN), prompt, tokens)


@pytest.fixture(scope="module")
def exact_logits(smollm2_gguf, eager_run):
    """The same weights and rope tables in float64, teacher-forced along the eager path: the exact reference."""
    prompt, tokens, _ = eager_run
    model = build_model(read_checkpoint(smollm2_gguf)).double()
    return teacher_forced_logits(EagerModel(model, MAX_SEQ_LEN), prompt, tokens)


def max_distance(got: list[torch.Tensor], want: list[torch.Tensor]) -> float:
    return max(float((a.double() - b.double()).abs().max()) for a, b in zip(got, want))


@torch.inference_mode()
def teacher_forced_logits(model, prompt: list[int], tokens: list[int]) -> list[torch.Tensor]:
    """The prefill's logits, then each decode step's, feeding `tokens` (all but the last)."""
    steps = [model.forward(torch.tensor([prompt]), torch.arange(len(prompt)))[0]]
    for offset, token in enumerate(tokens[:-1]):
        steps.append(model.forward(torch.tensor([[token]]), torch.tensor([len(prompt) + offset]))[0])
    return [step.float() for step in steps]


@pytest.mark.slow
@pytest.mark.parametrize("suffix", [".pt2", ".pte"])
def test_smollm2_fp32_artifact_matches_eager(smollm2_artifact, eager_run, exact_logits, suffix):
    artifact = smollm2_artifact(suffix)
    prompt, eager_tokens, eager_logits = eager_run
    exported = load_exported(artifact)
    assert list(generate(exported, prompt, NEW_TOKENS, Sampling())) == eager_tokens
    assert len(eager_tokens) == NEW_TOKENS
    logits = teacher_forced_logits(exported, prompt, eager_tokens)
    worst = max_distance(logits, eager_logits)
    exact, eager_exact = max_distance(logits, exact_logits), max_distance(eager_logits, exact_logits)
    print(f"SmolLM2 fp32 {suffix}: max |logits - eager| {worst:.3g} over prefill + {NEW_TOKENS - 1} decode steps; "
          f"from float64: artifact {exact:.3g}, eager {eager_exact:.3g}")
    assert worst <= LOGITS_TOLERANCE[suffix]
    assert exact <= max(EXACT_ERROR_RATIO * eager_exact, LOGITS_TOLERANCE[suffix])
