"""Test text for the tokenizers, Python's and the C++ runners' (tests/runner/test_tokenizer_bin.py)."""

# Lines that stress pre-tokenizers: digits (alone, in runs, after runs of spaces), punctuation, contractions,
# whitespace runs, tabs and newlines, accents, CJK, emoji (4-byte and ZWJ sequences), special-token spellings.
TRICKY_LINES = [
    "", " ", "  ", "\n", "\n\n\n", "\t", " \t \n ", "a  1", "x\n 1", "x \n1", "3.14159 and 1,000,000", "2024-11-28",
    "Call 555-0123 or +1 (800) 123 4567.", "  12   345    6789  ", "version 0.2.3rc1, id=0x1F", "100%   sure",
    "I'm sure they'll say it's fine, don't you think? We've seen it. I'D SAY IT'S OK", "Hello,  World!!!  ???",
    "multiple   internal    spaces\tand\ttabs", "tabs\tand\nnewlines\r\nmixed\r\r\n", "trailing spaces   ",
    "   leading spaces", "def foo(x):\n    return x ** 2  # square\n", "if (a<=b && c!=d) { x += 1; }",
    "Café naïve résumé façade Ångström", "e\u0301 combining accent", "你好，世界！这是一个测试。", "日本語のテキスト",
    "한국어 텍스트입니다", "Россия и Україна 2022", "مرحبا بالعالم ١٢٣", "हिन्दी १२३", "Emoji: 😀👍🏽🇺🇸 and ❤️",
    "👨‍👩‍👧‍👦 family", "math: x² + y³ = z½ ⅓ Ⅻ", "<|im_start|>user\nHi<|im_end|>", "<|endoftext|>", "<s> </s> <unk>",
    "<|begin_of_text|><|eot_id|>", "\u00a0non-breaking\u2009thin\u3000ideographic", "zero\u200bwidth",
    "'s 's 'S 'Ll", "...---...", "$$$ €€€ £12.50", "a" * 200, "1" * 50, " " * 30 + "x",
]
