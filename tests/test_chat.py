"""Chat: each format's prompt tokens against a reference rendering, KV reuse across turns, a full context,
and a real multi-turn conversation on SmolLM2 through stdin."""

import subprocess
import sys

import pytest
import sentencepiece

from torchat.chat import ChatSession
from torchat.checkpoint import build_model, read_checkpoint
from torchat.errors import TorchatError
from torchat.generate import EagerModel, Sampling, generate
from torchat.templates import pick_template, render
from torchat.tokenizers import load_tokenizer

CONVERSATION = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "user", "content": "Name a colour."},
    {"role": "assistant", "content": "Blue."},
    {"role": "user", "content": "Another one, please!"},
]
TURNS = ["What is the capital of France?", "And of Germany?", "Which of the two is larger?"]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return build_model(read_checkpoint(smollm2_gguf)), load_tokenizer(smollm2_gguf)


def test_chatml_from_the_gguf_matches_transformers_apply_chat_template(smollm2_gguf):
    transformers = pytest.importorskip("transformers")
    reference = transformers.AutoTokenizer.from_pretrained(smollm2_gguf.parent, gguf_file=smollm2_gguf.name)
    tokenizer = load_tokenizer(smollm2_gguf)
    assert pick_template(tokenizer) == "jinja"
    for messages in (CONVERSATION, CONVERSATION[1:2]):
        expected = reference.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        expected_ids = reference(expected, add_special_tokens=False)["input_ids"]
        assert render(tokenizer, "jinja", messages) == expected_ids
    assert "<|im_start|>assistant\n" in expected


def test_llama3_format_matches_the_published_layout(llama3_tiktoken):
    tokenizer = load_tokenizer(llama3_tiktoken, "tiktoken")
    assert pick_template(tokenizer) == "llama3"
    # the layout of Meta's Llama-3 model card, as text
    text = "<|begin_of_text|>" + "".join(
        f"<|start_header_id|>{m['role']}<|end_header_id|>\n\n{m['content']}<|eot_id|>" for m in CONVERSATION
    ) + "<|start_header_id|>assistant<|end_header_id|>\n\n"
    expected = tokenizer.encode(text, allow_special=True)
    assert render(tokenizer, "llama3", CONVERSATION) == expected
    assert expected.count(128009) == 4 and expected[0] == 128000


def test_llama2_format_matches_metas_reference_algorithm(mistral_sentencepiece):
    tokenizer = load_tokenizer(mistral_sentencepiece)
    assert pick_template(tokenizer) == "llama2"
    sp = sentencepiece.SentencePieceProcessor(model_file=str(mistral_sentencepiece))
    bos, eos = sp.bos_id(), sp.eos_id()
    # Meta's chat_completion: the system prompt folded into the first user turn, each exchange <s>...</s>
    first = "<<SYS>>\nYou are a terse assistant.\n<</SYS>>\n\nName a colour."
    expected = [bos, *sp.encode(f"[INST] {first} [/INST] Blue. "), eos,
                bos, *sp.encode("[INST] Another one, please! [/INST]")]
    assert render(tokenizer, "llama2", CONVERSATION) == expected


def test_unknown_template_lists_choices(llama3_tiktoken):
    with pytest.raises(TorchatError, match="jinja, llama2, llama3"):
        pick_template(load_tokenizer(llama3_tiktoken, "tiktoken"), "chatml2")


def fresh_answer(model, tokenizer, messages, max_new_tokens):
    """The reference: a new cache and the whole conversation prefilled, every turn."""
    ids = render(tokenizer, "jinja", messages)
    out = list(generate(EagerModel(model, 512), ids, max_new_tokens, Sampling(), tokenizer.stop_ids))
    return tokenizer.decode([t for t in out if t not in tokenizer.stop_ids])


@pytest.mark.slow
def test_turns_reuse_the_cache_and_answer_as_a_fresh_prefill_would(smollm2):
    model, tokenizer = smollm2
    session = ChatSession(EagerModel(model, 512), tokenizer, "jinja", Sampling(), 24, system="Be brief.")
    messages = [{"role": "system", "content": "Be brief."}]
    for turn, text in enumerate(TURNS):
        fed_before = list(session.fed)
        answer = tokenizer.decode(list(session.reply(text)))
        messages.append({"role": "user", "content": text})
        assert answer == fresh_answer(model, tokenizer, messages, 24)
        messages.append({"role": "assistant", "content": answer})
        full = render(tokenizer, "jinja", messages[:-1])
        if turn:
            # only what follows the tokens already in the cache was prefilled
            assert session.last_prefill == full[len(fed_before):]
            assert len(session.last_prefill) < len(full) // 2
        assert session.fed[:len(full)] == full


@pytest.mark.slow
def test_a_full_context_drops_the_oldest_turns_and_keeps_going(smollm2):
    model, tokenizer = smollm2
    notices = []
    session = ChatSession(EagerModel(model, 96), tokenizer, "jinja", Sampling(), 16, notice=notices.append)
    for text in TURNS + TURNS:
        assert tokenizer.decode(list(session.reply(text)))
        assert len(session.fed) <= 96
    assert notices and "dropped" in notices[0]
    with pytest.raises(TorchatError, match="shorten it"):
        list(session.reply("word " * 200))


@pytest.mark.slow
def test_piped_multi_turn_chat_on_the_default_model(smollm2):
    model, tokenizer = smollm2
    result = subprocess.run([sys.executable, "-m", "torchat", "chat", "--max-new-tokens", "24"],
                            input="\n".join(TURNS) + "\n", capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    messages, expected = [], []
    for text in TURNS:
        messages.append({"role": "user", "content": text})
        expected.append(fresh_answer(model, tokenizer, messages, 24))
        messages.append({"role": "assistant", "content": expected[-1]})
    assert result.stdout == "".join(answer + "\n" for answer in expected)


@pytest.mark.slow
@pytest.mark.parametrize("flag,suffix", [("--aoti-package-path", ".pt2"), ("--pte-path", ".pte")])
def test_the_same_conversation_gives_the_same_answers_from_an_exported_model(smollm2, smollm2_artifact, flag, suffix):
    """Two turns piped into `torchat chat` on SmolLM2's fp32 artifact (the build graph's, from the artifact store)
    answer exactly as the eager model does given the whole conversation afresh."""
    from torchat.exported import read_metadata

    artifact = smollm2_artifact(suffix)
    model, tokenizer = smollm2
    turns, budget = TURNS[:2], 16
    result = subprocess.run([sys.executable, "-m", "torchat", "chat", flag, str(artifact), "--max-new-tokens",
                             str(budget)], input="\n".join(turns) + "\n", capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stderr
    assert f"loaded {artifact} (" in result.stderr
    messages, expected = [], []
    for text in turns:
        messages.append({"role": "user", "content": text})
        expected.append(fresh_answer(model, tokenizer, messages, budget))
        messages.append({"role": "assistant", "content": expected[-1]})
    # the whole conversation fits the artifact's context, so no turn was dropped
    assert len(render(tokenizer, "jinja", messages)) + budget <= read_metadata(artifact).max_seq_len
    assert result.stdout == "".join(answer + "\n" for answer in expected)
