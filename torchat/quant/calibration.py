"""Calibration and evaluation text: Botchan (torchat.assets.english_text), split so that the two never overlap.

GPTQ calibrates on the first part; the quality benchmark measures perplexity on the last part only.
"""

import torch

from torchat.errors import TorchatError

CALIBRATION_FRACTION = 0.75  # the first 75 % of the paragraphs calibrate, the rest evaluates


def split_english_text() -> tuple[str, str]:
    """(calibration text, evaluation text), cut between paragraphs (the text has one paragraph per line)."""
    from torchat.assets import english_text

    paragraphs = [p for p in english_text().splitlines() if p.strip()]
    cut = int(len(paragraphs) * CALIBRATION_FRACTION)
    assert 0 < cut < len(paragraphs), f"cannot split {len(paragraphs)} paragraphs"
    return "\n".join(paragraphs[:cut]), "\n".join(paragraphs[cut:])


def calibration_tokens(tokenizer, samples: int, seq_len: int) -> torch.Tensor:
    """(samples, seq_len) int64: consecutive windows of the calibration text, each starting with BOS if the
    tokenizer adds one."""
    text, _ = split_english_text()
    ids = tokenizer.encode(text)
    body = seq_len - 1 if tokenizer.add_bos and tokenizer.bos_id is not None else seq_len
    if samples * body > len(ids):
        raise TorchatError(f"the calibration text has {len(ids)} tokens, fewer than calibration_limit {samples} "
                           f"x calibration_seq_length {seq_len}; lower one of them")
    rows = []
    for i in range(samples):
        window = ids[i * body:(i + 1) * body]
        rows.append(([tokenizer.bos_id] if body < seq_len else []) + window)
    return torch.tensor(rows, dtype=torch.long)
