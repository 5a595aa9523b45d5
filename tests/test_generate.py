"""Sampling against a direct reading of its definition; generation's budget, stops and compiled parity."""

import pytest
import torch
from tiny_model import tiny_transformer

from torchat.errors import TorchatError
from torchat.generate import EagerModel, GenerationStats, Sampling, generate, sample


def draw(logits, sampling, n=4000, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.bincount(torch.tensor([sample(logits, sampling, generator) for _ in range(n)]),
                          minlength=logits.numel()) / n


LOGITS = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0, 3.0])


def test_greedy_is_argmax():
    assert sample(LOGITS, Sampling()) == 5


def test_top_k_keeps_the_k_largest_in_softmax_proportion():
    freq = draw(LOGITS, Sampling(temperature=1.0, top_k=2))
    assert set(torch.nonzero(freq).flatten().tolist()) == {0, 5}
    expected = torch.tensor([2.0, 3.0]).softmax(-1)
    torch.testing.assert_close(freq[[0, 5]], expected, atol=0.03, rtol=0)


def test_top_p_keeps_the_smallest_set_reaching_p():
    probs = LOGITS.softmax(-1)  # order: 5, 0, 1, 2, 3, 4
    ranked = probs.sort(descending=True)
    # the nucleus: tokens up to and including the first whose cumulative mass reaches p
    p = float(ranked.values[:2].sum()) + 0.01
    nucleus = set(ranked.indices[:3].tolist())
    freq = draw(LOGITS, Sampling(temperature=1.0, top_p=p))
    assert set(torch.nonzero(freq).flatten().tolist()) == nucleus
    torch.testing.assert_close(freq[list(nucleus)], probs[list(nucleus)] / probs[list(nucleus)].sum(),
                               atol=0.03, rtol=0)


def test_temperature_sharpens():
    hot, cold = draw(LOGITS, Sampling(temperature=2.0)), draw(LOGITS, Sampling(temperature=0.25))
    assert cold[5] > 0.95 and hot[5] < 0.5


def test_seed_makes_sampling_repeatable():
    assert torch.equal(draw(LOGITS, Sampling(temperature=1.0), n=50, seed=3),
                       draw(LOGITS, Sampling(temperature=1.0), n=50, seed=3))


@pytest.mark.parametrize("bad", [dict(temperature=-1), dict(top_k=0), dict(top_p=0.0), dict(top_p=1.5)])
def test_bad_sampling_settings_fail(bad):
    with pytest.raises(TorchatError):
        Sampling(**bad)


@pytest.fixture(scope="module")
def tiny():
    return tiny_transformer(std=None)


def greedy_by_recompute(model, prompt, steps):
    """The reference: no cache, the whole sequence recomputed for every new token."""
    tokens = list(prompt)
    model.remove_caches()
    with torch.no_grad():
        for _ in range(steps):
            tokens.append(int(model(torch.tensor([tokens]))[0, -1].argmax()))
    return tokens[len(prompt):]


def test_generate_equals_full_recompute_and_respects_the_budget(tiny):
    prompt = [5, 17, 3, 42, 8]
    stats = GenerationStats()
    out = list(generate(EagerModel(tiny, 32), prompt, 12, Sampling(), stats=stats))
    assert out == greedy_by_recompute(tiny, prompt, 12)
    assert stats.prompt_tokens == 5 and stats.new_tokens == 12
    # a 10-slot cache holds the 5 prompt positions and 5 decoded ones: 6 new tokens in all
    assert len(list(generate(EagerModel(tiny, 10), prompt, 50, Sampling()))) == 6


def test_generate_stops_at_a_stop_id(tiny):
    prompt = [5, 17, 3, 42, 8]
    reference = greedy_by_recompute(tiny, prompt, 12)
    stop = reference[4]
    out = list(generate(EagerModel(tiny, 32), prompt, 12, Sampling(), stop_ids={stop}))
    assert out == reference[:reference.index(stop) + 1]


def test_prompt_beyond_the_context_is_an_error(tiny):
    with pytest.raises(TorchatError, match="beyond the context"):
        list(generate(EagerModel(tiny, 8), list(range(9)), 4, Sampling()))


def test_compiled_decode_and_prefill_match_eager(tiny):
    prompt = [5, 17, 3, 42, 8]
    eager = list(generate(EagerModel(tiny, 32), prompt, 8, Sampling()))
    compiled = EagerModel(tiny, 32, compile=True, compile_prefill=True)
    assert list(generate(compiled, prompt, 8, Sampling())) == eager
    assert list(generate(compiled, prompt[:3], 8, Sampling())) == greedy_by_recompute(tiny, prompt[:3], 8)
