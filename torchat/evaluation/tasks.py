"""The local lm-eval tasks: perplexity on English text that ships through the package registries, no hub needed.

`botchan` (prose): word/byte perplexity and bits per byte (wikitext's metrics, `loglikelihood_rolling`) on the
evaluation part of Botchan, the part GPTQ never calibrates on (torchat.quant.calibration.split_english_text is
the one definition of that split). `shakespeare` (verse, which no calibration sees): the same on Macbeth
(torchat.assets.verse_text): one text is not enough, per-channel int8 cost +1.5 % on verse against +0.02 % on
Botchan. Each text is cut into documents of at least DOC_WORDS words at line breaks; the documents are written as
JSON lines into the cache, under a name keyed by their content, and the task names that file by its absolute path
(lm-eval resolves relative data files against the working directory). The default tasks are both, DEFAULT_LIMIT
documents each.
"""

import hashlib
import json
import os
import tempfile
from pathlib import Path

DOC_WORDS = 400      # words per document (about 550 SmolLM2 tokens): one window each at the default length
DEFAULT_TASKS = ("botchan", "shakespeare")
DEFAULT_LIMIT = 5    # documents of each local task unless --limit says otherwise: about 3,000 SmolLM2 tokens
# metric -> lm-eval's aggregation of it over documents (lm-eval's own defaults, said so that it does not warn)
PERPLEXITY_METRICS = {"word_perplexity": "weighted_perplexity", "byte_perplexity": "weighted_perplexity",
                      "bits_per_byte": "bits_per_byte"}


def evaluation_documents() -> list[str]:
    """The evaluation part of the English text (Botchan), as documents (split_documents)."""
    from torchat.quant.calibration import split_english_text

    return split_documents(split_english_text()[1])


def split_documents(text: str) -> list[str]:
    """Documents of whole lines of text, each of at least DOC_WORDS words (the remainder joins the last one)."""
    documents, lines, words = [], [], 0
    for line in text.splitlines():
        lines.append(line)
        words += len(line.split())
        if words >= DOC_WORDS:
            documents.append("\n".join(lines))
            lines, words = [], 0
    if lines:
        if documents:
            documents[-1] += "\n" + "\n".join(lines)
        else:
            documents.append("\n".join(lines))
    return documents


def write_documents(documents: list[str], directory: Path, stem: str) -> Path:
    """`directory/<stem>-<sha16>.jsonl` holding one {"page": document} per line, written once (atomically)."""
    body = "".join(json.dumps({"page": doc}) + "\n" for doc in documents).encode()
    path = Path(directory) / f"{stem}-{hashlib.sha256(body).hexdigest()[:16]}.jsonl"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(body)
            os.replace(tmp, path)
        finally:
            Path(tmp).unlink(missing_ok=True)
    return path


def perplexity_task(name: str, data_file: Path) -> dict:
    """The lm-eval task config of a wikitext-style perplexity task over the JSON lines in `data_file`."""
    assert Path(data_file).is_absolute(), data_file
    return {
        "task": name,
        "dataset_path": "json",
        "dataset_kwargs": {"data_files": {"test": str(data_file)}},
        "output_type": "loglikelihood_rolling",
        "test_split": "test",
        "doc_to_text": "",
        "doc_to_target": "{{page}}",
        "metric_list": [{"metric": metric, "aggregation": aggregation, "higher_is_better": False}
                        for metric, aggregation in PERPLEXITY_METRICS.items()],
        "metadata": {"version": 1.0},
    }


def botchan_task(cache: Path) -> dict:
    return perplexity_task("botchan", write_documents(evaluation_documents(), Path(cache) / "eval", "botchan"))


def shakespeare_task(cache: Path) -> dict:
    from torchat.assets import verse_text

    return perplexity_task("shakespeare", write_documents(split_documents(verse_text()), Path(cache) / "eval",
                                                          "shakespeare"))


# name -> the task config, given the cache directory
LOCAL_TASKS = {"botchan": botchan_task, "shakespeare": shakespeare_task}
