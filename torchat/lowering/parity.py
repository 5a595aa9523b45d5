"""The check every export ends with: the artifact's logits against the eager model's on a few tokens.

A prefill of a short prompt then two decode steps, on the same inputs in both (a .pte's prompt through both its
forward methods, its decode steps alternating between them); the artifact fails when any logit
differs from eager by more than atol + rtol * max|eager logits|. This is what catches a lowering that runs but is
silently wrong (XNNPACK's weight-only linear: errors of 200 to 3000 on logits of scale 5).
"""

from dataclasses import dataclass
from pathlib import Path

import torch

from torchat.exported import load_exported
from torchat.model import Transformer


@dataclass(frozen=True)
class Tolerance:
    atol: float
    rtol: float  # of the largest eager logit in the step

    def allowed(self, scale: float) -> float:
        return self.atol + self.rtol * scale


# Float lowerings reorder sums (fusions, XNNPACK's GEMM): ~1e-5 of the logit scale in fp32. Dynamic-activation
# quant rounds the activations itself (XNNPACK with its own qd8 parameters), and a rounding flip cascades through
# the layers: SmolLM2's 30-layer 8da4w .pte differs from eager by 2.41 on random tokens (logit scale 32, 7.5 %),
# with the weight scales already rounded to XNNPACK's bf16, and by 3.07 (9.4 %) on the asymmetric grid, 3.41
# (10.6 %) with a 4-bit embedding too (issue 18); a wrong lowering is off by 40x the scale or more. A quantized
# .pte keeps its KV cache in fp16, and eager here then does too (Lowering.cache_dtype): against an fp32-cache
# eager, fp16's rounding of keys and values flipped enough activation codes to take the 4-bit-embedding .pte to
# 6.22 (19 %); against the fp16-cache eager it is 3.6 (11 %). How far a cascade runs depends on the prompt and on
# the float arithmetic around the roundings, so on the host and its build: the same 8da4w .pte (Botchan / Macbeth
# word perplexity +1.6 % / +2.8 % there, as on the AVX2 EPYC) was 4.96 from eager (14.7 %) on an Emerald Rapids
# Xeon with the kernels built -march=native, 2.56 (7.6 %) with them built for x86-64-v3, and 9-17 % and 8-36 % on
# four other random prompts; so 25 %, still far below a wrong lowering's error.
# bf16 rounds every op to 8 bits of mantissa, and a compiler that fuses ops rounds less often than eager does:
# SmolLM2's bf16 eager model is itself 1.13 away from its fp32 self on these inputs (scale 33.5, 3.4 %), and its
# AOTI artifact 1.19 away from bf16 eager, so bf16 gets a bound of 5 % of the scale. Quantized in bf16, the
# quantization's own rounding (of the weights, and the kernels' of the activations) joins bf16's in the cascade:
# SmolLM2's int4 .pt2 (torchat::linear_w4) is 0.88-1.75 away from bf16 eager on four random prompts (scale 31-34,
# up to 5.3 %), so 8 %.
TOLERANCES = {
    ("fp32", False): Tolerance(1e-4, 1e-5),
    ("bf16", False): Tolerance(0.1, 0.05),
    ("fp16", False): Tolerance(0.05, 0.01),
    ("fp32", True): Tolerance(0.05, 0.25),
    ("bf16", True): Tolerance(0.1, 0.08),
    ("fp16", True): Tolerance(0.1, 0.04),
}


@dataclass(frozen=True)
class ParityReport:
    max_abs_diff: float   # the largest |artifact - eager| over all steps
    allowed: float        # atol + rtol * scale
    scale: float          # max |eager logits| over all steps
    same_argmax: bool     # every position's argmax agrees
    steps: int

    @property
    def ok(self) -> bool:
        return self.max_abs_diff <= self.allowed

    def summary(self) -> str:
        verdict = "ok" if self.ok else "MISMATCH"
        return (f"parity {verdict}: max |logits - eager| {self.max_abs_diff:.3g} (allowed {self.allowed:.3g}, "
                f"logit scale {self.scale:.3g}) over prefill + {self.steps - 1} decode steps; argmax "
                f"{'agrees' if self.same_argmax else 'differs'}")


def parity_inputs(vocab_size: int, prompt_len: int = 6, decode_steps: int = 2, seed: int = 0):
    """[(tokens (1, S), input_pos (S,))]: one prefill, then single-token decode steps."""
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (1, prompt_len + decode_steps), generator=generator)
    steps = [(ids[:, :prompt_len], torch.arange(prompt_len))]
    steps += [(ids[:, p:p + 1], torch.tensor([p])) for p in range(prompt_len, prompt_len + decode_steps)]
    return steps


@torch.no_grad()
def check_parity(model: Transformer, artifact: Path, tolerance: Tolerance, max_seq_len: int,
                 cache_dtype: torch.dtype | None = None) -> ParityReport:
    """Compare `artifact` with `model` (its cache re-made here, in the artifact's `cache_dtype` where given) step by
    step from position 0."""
    steps = parity_inputs(model.args.vocab_size, prompt_len=min(6, max_seq_len - 2))
    model.setup_caches(1, max_seq_len, cache_dtype)
    device = next(model.parameters()).device
    exported = load_exported(artifact)
    worst, scale, same = 0.0, 0.0, True
    for i, (tokens, input_pos) in enumerate(steps):
        expected = model(tokens.to(device), input_pos.to(device)).float().cpu()
        # the prompt through both of a .pte's forward methods (the second rewrites the same cache slots), then the
        # decode steps alternating, from forward: a method that kept a cache of its own would miss a step
        calls = [False, True] if i == 0 else [i % 2 == 0]
        for last_only in calls:
            got = exported.forward(tokens, input_pos, last_only=last_only).float().cpu()
            want = expected[:, -1:] if last_only else expected
            if got.shape != want.shape:
                return ParityReport(float("inf"), tolerance.allowed(scale), scale, False, len(steps))
            diff = float((got - want).abs().max())
            worst = max(worst, diff if diff == diff else float("inf"))  # a NaN fails the check
            scale = max(scale, float(want.abs().max()))
            same = same and bool((got.argmax(-1) == want.argmax(-1)).all())
    return ParityReport(worst, tolerance.allowed(scale), scale, same, len(steps))
