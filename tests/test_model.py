"""The model against itself (cached decode vs full recompute) and against published parameter counts."""

import pytest
import torch
from tiny_model import tiny_args, tiny_transformer

from torchat.configs import KNOWN_CONFIGS, lookup_config, match_config_name
from torchat.errors import TorchatError
from torchat.model import ModelArgs, Transformer

VOCAB = tiny_args().vocab_size


@pytest.mark.parametrize("overrides", [{}, {"n_kv_heads": 4}, {"tie_embeddings": True},
                                       {"rope_scaling": dict(factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
                                                             original_max_position_embeddings=16)}],
                         ids=["gqa", "mha", "tied", "llama31-rope"])
def test_cached_decode_equals_full_recompute(overrides):
    model = tiny_transformer(tiny_args(**overrides), std=None)
    tokens = torch.randint(0, VOCAB, (1, 24))
    with torch.no_grad():
        full = model(tokens)  # no cache: plain causal pass over all 24 positions
        model.setup_caches(1, 40)
        steps = [model(tokens[:, :8], torch.arange(8))]  # prefill 8, then 16 single-token decode steps
        steps += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(8, 24)]
    cached = torch.cat(steps, dim=1)
    assert full.shape == cached.shape == (1, 24, VOCAB)
    torch.testing.assert_close(cached, full, atol=1e-5, rtol=1e-5)


def test_bf16_cached_decode_equals_full_recompute_and_stays_bf16():
    """bf16 models attend in fp32 on CPU (its bf16 attention kernel is slow); the rest stays bf16."""
    model = tiny_transformer(std=None).to(torch.bfloat16)
    tokens = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        full = model(tokens)
        model.setup_caches(1, 16)
        steps = [model(tokens[:, :4], torch.arange(4))]
        steps += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(4, 12)]
        hidden = model.layers[0].attention(torch.randn(1, 3, 64, dtype=torch.bfloat16), model.rope_cos[:3],
                                           model.rope_sin[:3], torch.arange(3), None)
    assert hidden.dtype == torch.bfloat16
    torch.testing.assert_close(torch.cat(steps, dim=1), full, atol=0.05, rtol=0.02)


def test_cache_overwrite_hides_stale_positions():
    """A second prompt written from position 0 must not see what the first left in later slots."""
    model = tiny_transformer(seed=1, std=None)
    first, second = torch.randint(0, VOCAB, (1, 20)), torch.randint(0, VOCAB, (1, 6))
    with torch.no_grad():
        model.setup_caches(1, 32)
        model(first, torch.arange(20))
        reused = model(second, torch.arange(6))
        model.setup_caches(1, 32)
        fresh = model(second, torch.arange(6))
    torch.testing.assert_close(reused, fresh)


def test_kv_cache_takes_the_model_dtype():
    model = tiny_transformer(std=None).to(torch.bfloat16)
    model.setup_caches(1, 16)
    assert model.layers[0].attention.kv_cache.k_cache.dtype == torch.bfloat16


def test_an_fp16_cache_under_an_fp32_model_attends_over_rounded_keys_and_values():
    """What a quantized .pte's cache holds (torchat.lowering.et.kv_cache_dtype), for the export's parity check: the
    cache stores fp16, attention reads it back in fp32, and the logits are the fp32 cache's within fp16's rounding."""
    model = tiny_transformer(std=None)
    tokens = torch.randint(0, VOCAB, (1, 12))

    def cached(dtype):
        model.setup_caches(1, 16, dtype)
        with torch.no_grad():
            steps = [model(tokens[:, :4], torch.arange(4))]
            steps += [model(tokens[:, i:i + 1], torch.tensor([i])) for i in range(4, 12)]
        return torch.cat(steps, dim=1)

    fp32, fp16 = cached(None), cached(torch.float16)
    cache = model.layers[0].attention.kv_cache
    assert cache.k_cache.dtype == cache.v_cache.dtype == torch.float16 and fp16.dtype == torch.float32
    assert not torch.equal(fp16, fp32)
    torch.testing.assert_close(fp16, fp32, atol=5e-3, rtol=5e-3)


# published sizes (the model cards / papers), in parameters
PUBLISHED = {"stories15M": 15.2e6, "stories42M": 41.7e6, "stories110M": 109.5e6, "Llama-2-7b": 6.74e9,
             "Llama-2-13b": 13.0e9, "Llama-2-70b": 69.0e9, "CodeLlama-7b-Python": 6.74e9,
             "CodeLlama-34b-Python": 33.7e9, "Mistral-7B-v0.1": 7.24e9, "Llama-3-8B": 8.03e9,
             "Llama-3.1-8B": 8.03e9, "Llama-3.2-1B": 1.24e9, "Llama-3.2-3B": 3.21e9, "SmolLM2-135M": 134.5e6,
             "open_llama_7b": 6.74e9}


@pytest.mark.parametrize("name", sorted(PUBLISHED))
def test_parameter_count_matches_published(name):
    with torch.device("meta"):
        model = Transformer(ModelArgs(**lookup_config(name)))
    # tied embeddings count once: parameters() yields a shared tensor once
    count = sum(p.numel() for p in model.parameters())
    assert abs(count - PUBLISHED[name]) / PUBLISHED[name] < 0.005, (name, count)


def test_every_known_config_builds_on_meta():
    for name in KNOWN_CONFIGS:
        with torch.device("meta"):
            Transformer(ModelArgs(**lookup_config(name)))


def test_directory_name_picks_the_longest_matching_config():
    assert match_config_name("Llama-2-7b-chat-hf") == "Llama-2-7b-chat"
    assert match_config_name("stories15M") == "stories15M"
    assert match_config_name("Meta-Llama-3.1-8B-Instruct") == "Llama-3.1-8B-Instruct"
    with pytest.raises(TorchatError, match="params-table"):
        match_config_name("gpt2-xl")


def test_unknown_params_table_lists_choices():
    with pytest.raises(TorchatError, match="stories15M"):
        lookup_config("stories16M")
