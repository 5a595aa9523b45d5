"""SmolLM2-135M artifacts cached under $TORCHAT_CACHE/exported/<key>/, keyed by a content hash of the GGUF, the
export flags, the code that lowers and the toolchain, so reruns (CI, benchmarks) reuse them."""

import hashlib
import json
import os
import time
from pathlib import Path

from torchat.cli import main
from torchat.lowering import toolchain_versions

REPO = Path(__file__).resolve().parents[1]
CODE = ["torchat/lowering", "torchat/exported.py", "torchat/export_cli.py", "torchat/model.py", "torchat/checkpoint"]

def cache_root() -> Path:
    return Path(os.environ.get("TORCHAT_CACHE", Path.home() / ".cache" / "torchat")) / "exported"

def code_digest(quantized: bool) -> str:
    """The code an export runs; torchat/quant only when it quantizes (it changes often, fp32 need not rebuild)."""
    digest = hashlib.sha256()
    for entry in CODE + ["torchat/quant"] * quantized:
        for path in sorted((REPO / entry).rglob("*.py")) if (REPO / entry).is_dir() else [REPO / entry]:
            digest.update(path.relative_to(REPO).as_posix().encode() + path.read_bytes())
    return digest.hexdigest()

def cached_export(gguf: Path, suffix: str, flags: list[str]) -> tuple[Path, bool]:
    """(artifact, built now?) for SmolLM2 exported with `flags`; exported only when not already cached."""
    preimage = {"gguf": gguf.name, "size": gguf.stat().st_size, "suffix": suffix, "flags": flags,
                "code": code_digest("--quant" in flags), "toolchain": toolchain_versions()}
    key = hashlib.sha256(json.dumps(preimage, sort_keys=True).encode()).hexdigest()[:16]
    directory = cache_root() / key
    output = directory / f"model{suffix}"
    if output.is_file():
        return output, False
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "key.json").write_text(json.dumps(preimage, indent=2, sort_keys=True))
    start = time.perf_counter()
    rc = main(["export", "--gguf-path", str(gguf), "--output-path", str(output), *flags])
    assert rc == 0, f"export of SmolLM2 to {output} failed"
    (directory / "export.json").write_text(json.dumps({"export_s": time.perf_counter() - start}))
    return output, True
