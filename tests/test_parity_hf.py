"""Headline parity: SmolLM2-135M from its GGUF, our Transformer against Hugging Face transformers, both fp32.

Both sides read the same file with their own code (transformers dequantizes through `gguf` too, and undoes
llama.cpp's q/k permutation itself), and the token ids come from transformers' own GGUF tokenizer, so this
test depends on nothing of ours but the GGUF reader and the model.
"""

import pytest
import torch

from torchat.checkpoint import build_model
from torchat.checkpoint.gguf import read_gguf

pytestmark = pytest.mark.slow

TEXT = ("The GGUF format stores every tensor with its innermost dimension first, and llama.cpp keeps the "
        "query and key rows of each attention head in the interleaved rotary layout that Meta released, "
        "while Hugging Face checkpoints pair each row with the one half a head away. A reader that forgets "
        "either detail still produces numbers, just not the right ones.")
PROMPT_TOKENS = 64
NEW_TOKENS = 32


@pytest.fixture(scope="module")
def models(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    directory, name = smollm2_gguf.parent, smollm2_gguf.name
    tokenizer = transformers.AutoTokenizer.from_pretrained(directory, gguf_file=name)
    reference = transformers.AutoModelForCausalLM.from_pretrained(directory, gguf_file=name,
                                                                  dtype=torch.float32).eval()
    ours = build_model(read_gguf(smollm2_gguf), dtype=torch.float32)
    tokens = tokenizer(TEXT, return_tensors="pt").input_ids[:, :PROMPT_TOKENS]  # (1, 64)
    assert tokens.shape == (1, PROMPT_TOKENS)
    return ours, reference, tokens


def test_logits_match_transformers(models):
    ours, reference, tokens = models
    with torch.no_grad():
        ours_logits = ours(tokens)  # (1, 64, 49152)
        reference_logits = reference(tokens).logits
    delta = (ours_logits - reference_logits).abs().max().item()
    print(f"SmolLM2-135M GGUF fp32, {PROMPT_TOKENS} tokens: max |logits delta| vs transformers = {delta:.3g}")
    assert delta <= 1e-3


def test_greedy_tokens_match_transformers(models):
    ours, reference, tokens = models
    prompt_len = tokens.shape[1]
    ours.setup_caches(1, prompt_len + NEW_TOKENS)
    generated = []
    with torch.no_grad():
        logits = ours(tokens, torch.arange(prompt_len))  # prefill: (1, prompt_len, vocab)
        for pos in range(prompt_len, prompt_len + NEW_TOKENS):
            token = logits[0, -1].argmax()
            generated.append(int(token))
            logits = ours(token.view(1, 1), torch.tensor([pos]))  # one step through the KV cache
        # no eos: both sides produce exactly NEW_TOKENS tokens
        expected = reference.generate(tokens, attention_mask=torch.ones_like(tokens), do_sample=False,
                                      max_new_tokens=NEW_TOKENS, min_new_tokens=0, eos_token_id=None,
                                      pad_token_id=0)[0, prompt_len:].tolist()
    assert len(expected) == NEW_TOKENS and generated == expected
